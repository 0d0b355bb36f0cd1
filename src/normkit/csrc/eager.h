// The eager path's entry points (defined in autograd.h, compiled in normkit_cpu.cpp), declared for the
// other translation unit, layers.cpp, which calls them from Python without the dispatcher.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
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

inline c10::optional<Tensor> opt(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

// aten_path.finish: act(y + residual) in torch's own functions (GELU the exact erf form), act as the kernels'
// code (normkit.activations: 0 identity, 1 relu, 2 silu, 3 gelu). Out of place when a backward may follow
// through y; in place on a fresh y otherwise (the same kernels, so the same values).
inline Tensor finish(Tensor y, const Tensor& residual, int64_t act) {
  if (residual.defined()) y = y + residual;
  switch (act) {
    case 1: return at::relu(y);
    case 2: return at::silu(y);
    case 3: return at::gelu(y);
    default: return y;
  }
}

inline Tensor finish_in_place(Tensor y, const Tensor& residual, int64_t act) {
  if (residual.defined()) y.add_(residual);
  switch (act) {
    case 1: return y.relu_();
    case 2: return at::silu_(y);
    case 3: return at::gelu_(y);
    default: return y;
  }
}

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
