// The eager path's entry points (defined in autograd.h, compiled in normkit_cpu.cpp), declared for the
// other translation unit, layers.cpp, which calls them from Python without the dispatcher.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace normkit {

// the row kernels' entry points (normkit_cpu.cpp): rows of K values of a contiguous x, written to `out` when given
std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_forward(const at::Tensor& x, int64_t K,
                                                            const c10::optional<at::Tensor>& weight,
                                                            const c10::optional<at::Tensor>& bias, double eps,
                                                            bool rms, const at::Tensor& out = at::Tensor());
std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_backward(const at::Tensor& x, int64_t K, const at::Tensor& dy,
                                                             const c10::optional<at::Tensor>& mean,
                                                             const at::Tensor& rstd,
                                                             const c10::optional<at::Tensor>& weight, bool rms,
                                                             bool need_dweight, const at::Tensor& out = at::Tensor());

namespace eager {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> bn_train(const Tensor& x, const c10::optional<Tensor>& w,
                                            const c10::optional<Tensor>& b, const c10::optional<Tensor>& r,
                                            double eps, int64_t act);
Tensor bn_infer(const Tensor& x, const Tensor& mean, const Tensor& var, const c10::optional<Tensor>& w,
                const c10::optional<Tensor>& b, const c10::optional<Tensor>& r, double eps, int64_t act);
std::tuple<Tensor, Tensor, Tensor> gn(const Tensor& x, int64_t groups, const c10::optional<Tensor>& w,
                                      const c10::optional<Tensor>& b, const c10::optional<Tensor>& r, double eps,
                                      int64_t act);
std::tuple<Tensor, Tensor, Tensor> ln(const Tensor& x, at::IntArrayRef normalized_shape,
                                      const c10::optional<Tensor>& w, const c10::optional<Tensor>& b, double eps);
std::tuple<Tensor, Tensor> rms(const Tensor& x, at::IntArrayRef normalized_shape, const c10::optional<Tensor>& w,
                               double eps);
std::tuple<Tensor, Tensor, Tensor> ln2d(const Tensor& x, const c10::optional<Tensor>& w,
                                        const c10::optional<Tensor>& b, double eps);
bool update_running_stats(Tensor& running_mean, Tensor& running_var, const c10::optional<Tensor>& nbt,
                          const Tensor& mean, const Tensor& var, int64_t count, c10::optional<double> momentum,
                          bool skip);
// the per-channel mean and biased variance of x (N, C, *), float32/float64 (the channel_stats kernel)
std::tuple<Tensor, Tensor> batch_moments(const Tensor& x);

}  // namespace eager

// layers.cpp: the Python functions of normkit._C (the layers' one-call forwards)
extern PyMethodDef layer_methods[];

}  // namespace normkit
