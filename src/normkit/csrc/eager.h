// The eager path's entry points (defined in autograd.h, compiled in normkit_cpu.cpp), declared for the
// other translation unit, layers.cpp, which calls them from Python without the dispatcher.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "act_code.h"

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

// aten_path.finish: act(y + residual) in torch's own functions, the functions torch.nn's activation modules call
// (GELU exact or tanh, ReLU6 as hardtanh(0, 6)), act as the kernels' code (act_code.h; normkit.activations).
// Out of place when a backward may follow through y; in place on a fresh y otherwise (the same kernels, so the
// same values).
inline Tensor activate(const Tensor& y, int64_t act) {
  const ActCode a = decode_act(act);
  switch (a.kind) {
    case kRelu: return at::relu(y);
    case kSilu: return at::silu(y);
    case kGelu: return at::gelu(y);
    case kGeluTanh: return at::gelu(y, "tanh");
    case kHardswish: return at::hardswish(y);
    case kLeakyRelu: return at::leaky_relu(y, a.param);
    case kRelu6: return at::hardtanh(y, 0.0, 6.0);
    case kHardsigmoid: return at::hardsigmoid(y);
    case kMish: return at::mish(y);
    case kElu: return at::elu(y, a.param);
    case kTanh: return at::tanh(y);
    case kSigmoid: return at::sigmoid(y);
    default: return y;
  }
}

inline Tensor activate_(Tensor& y, int64_t act) {
  const ActCode a = decode_act(act);
  switch (a.kind) {
    case kRelu: return y.relu_();
    case kSilu: return at::silu_(y);
    case kGelu: return at::gelu_(y);
    case kGeluTanh: return at::gelu_(y, "tanh");
    case kHardswish: return at::hardswish_(y);
    case kLeakyRelu: return at::leaky_relu_(y, a.param);
    case kRelu6: return at::hardtanh_(y, 0.0, 6.0);
    case kHardsigmoid: return at::hardsigmoid_(y);
    case kMish: return at::mish_(y);
    case kElu: return at::elu_(y, a.param);
    case kTanh: return y.tanh_();
    case kSigmoid: return y.sigmoid_();
    default: return y;
  }
}

inline Tensor finish(Tensor y, const Tensor& residual, int64_t act) {
  if (residual.defined()) y = y + residual;
  return activate(y, act);
}

inline Tensor finish_in_place(Tensor y, const Tensor& residual, int64_t act) {
  if (residual.defined()) y.add_(residual);
  return activate_(y, act);
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
