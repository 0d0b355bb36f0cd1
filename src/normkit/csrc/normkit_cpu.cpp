// normkit's CPU kernels as torch operators: torch.ops.normkit_cpu.* (a private namespace; the
// public, differentiable ops are torch.ops.normkit.*, see ops.py). One translation unit: the
// families live in the headers (channel.h, row.h, group.h) and compile once, together.
//
// Every operator here is one backend entry point of normkit.backends (same arguments, `act` as
// the int64 code of normkit.activations.code: the kind, 0 identity … 12 sigmoid, and leaky ReLU's / ELU's
// parameter, act_code.h), runs on torch's intra-op thread pool
// (at::parallel_for; small tensors inline) and allocates its own outputs. The arguments are
// checked for what the kernels read (dense layout, vector lengths, dtypes), so a direct call
// with mismatched inputs raises instead of reading out of bounds.
#include <Python.h>
#include <torch/library.h>

#include "channel.h"
#include "group.h"
#include "row.h"

namespace normkit {
namespace {

using c10::optional;

void check_x(const Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "normkit cpu backend: expected a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, "normkit cpu backend: empty tensors go to the reference backend");
}

Tensor dense(const Tensor& x) {
  (void)geometry(x);  // raises for a non-dense tensor
  return x;
}

std::tuple<Tensor, Tensor> channel_stats(const Tensor& x) {
  check_x(x);
  dense(x);
  return NK_DISPATCH_T(x.scalar_type(), [&] { return channel_stats_impl<T>(x); });
}

Tensor channel_apply(const Tensor& x, const Tensor& scale, const Tensor& shift, const optional<Tensor>& residual,
                     int64_t act) {
  check_x(x);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor a = vec(scale, sd, v.C, "scale"), b = vec(shift, sd, v.C, "shift");
  Tensor r = like_x(residual, x);
  Tensor y = empty_like_x(x);
  NK_DISPATCH_T(x.scalar_type(), [&] {
    using A = acc_t<T>;
    NK_ACT_CALL(act, apply_channels, v, x.data_ptr<T>(), ptr_or_null<T>(r), y.data_ptr<T>(), a.data_ptr<A>(),
                b.data_ptr<A>());
  });
  return y;
}

std::tuple<Tensor, Tensor> channel_backward_reduce(const Tensor& x, const Tensor& dy_, const Tensor& mean,
                                                   const Tensor& rstd, const Tensor& scale, const Tensor& shift,
                                                   const optional<Tensor>& residual, int64_t act) {
  check_x(x);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor dy = like_x(dy_, x), r = like_x(residual, x);
  Tensor m = vec(mean, sd, v.C, "mean"), rs = vec(rstd, sd, v.C, "rstd");
  Tensor fa = vec(scale, sd, v.C, "scale"), fb = vec(shift, sd, v.C, "shift");
  std::vector<double> s1, s2;
  NK_DISPATCH_T(x.scalar_type(), [&] {
    using A = acc_t<T>;
    NK_ACT_CALL(act, bwd_sums_channels, v, x.data_ptr<T>(), dy.data_ptr<T>(), ptr_or_null<T>(r), fa.data_ptr<A>(),
                fb.data_ptr<A>(), m.data_ptr<A>(), s1, s2, static_cast<A*>(nullptr));
  });
  Tensor sum_dz = at::empty({v.C}, x.options().dtype(at::kDouble));
  Tensor sum_dz_xhat = at::empty({v.C}, x.options().dtype(at::kDouble));
  const Tensor rs64 = rs.to(at::kDouble);
  for (int64_t c = 0; c < v.C; ++c) {
    sum_dz.data_ptr<double>()[c] = s1[c];
    sum_dz_xhat.data_ptr<double>()[c] = s2[c] * rs64.data_ptr<double>()[c];
  }
  return {sum_dz.to(sd), sum_dz_xhat.to(sd)};
}

std::tuple<Tensor, Tensor> channel_backward_dx(const Tensor& x, const Tensor& dy_, const Tensor& mean,
                                               const Tensor& rstd, const Tensor& scale, const Tensor& shift,
                                               const optional<Tensor>& residual, int64_t act, const Tensor& mean_dz,
                                               const Tensor& mean_dz_xhat, bool need_dz) {
  check_x(x);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor dy = like_x(dy_, x), r = like_x(residual, x);
  Tensor m = vec(mean, sd, v.C, "mean");
  Tensor fa = vec(scale, sd, v.C, "scale"), fb = vec(shift, sd, v.C, "shift");
  // dx = scale·dz + q·(x − mean) + rr, the coefficients formed in double
  const Tensor sc = vec(scale, at::kDouble, v.C, "scale"), rs = vec(rstd, at::kDouble, v.C, "rstd");
  const Tensor mdz = vec(mean_dz, at::kDouble, v.C, "mean_dz");
  const Tensor mdzx = vec(mean_dz_xhat, at::kDouble, v.C, "mean_dz_xhat");
  const Tensor q = (-sc * rs * mdzx).to(sd), rr = (-sc * mdz).to(sd);
  Tensor dx = empty_like_x(x);
  Tensor dz = need_dz ? empty_like_x(x) : Tensor();
  NK_DISPATCH_T(x.scalar_type(), [&] {
    using A = acc_t<T>;
    NK_ACT_CALL(act, bwd_dx_channels, v, x.data_ptr<T>(), dy.data_ptr<T>(), ptr_or_null<T>(r), dx.data_ptr<T>(),
                need_dz ? dz.data_ptr<T>() : nullptr, fa.data_ptr<A>(), fb.data_ptr<A>(), fa.data_ptr<A>(),
                q.data_ptr<A>(), m.data_ptr<A>(), rr.data_ptr<A>(), static_cast<const A*>(nullptr));
  });
  return {dx, dz};
}

std::tuple<Tensor, Tensor, Tensor> channel_forward(const Tensor& x, const optional<Tensor>& weight,
                                                   const optional<Tensor>& bias, double eps,
                                                   const optional<Tensor>& residual, int64_t act) {
  check_x(x);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor w = opt_vec(weight, sd, v.C, "weight"), b = opt_vec(bias, sd, v.C, "bias");
  Tensor r = like_x(residual, x);
  return NK_DISPATCH_T(x.scalar_type(), [&] {
    NK_ACT_CALL(act, channel_forward_impl, x, w, b, eps, r);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> channel_backward(const Tensor& x, const Tensor& dy_, const Tensor& mean,
                                                            const Tensor& rstd, const Tensor& scale,
                                                            const Tensor& shift, const optional<Tensor>& residual,
                                                            int64_t act, bool batch_stats, bool need_dz) {
  check_x(x);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor dy = like_x(dy_, x), r = like_x(residual, x);
  Tensor m = vec(mean, sd, v.C, "mean"), rs = vec(rstd, sd, v.C, "rstd");
  Tensor fa = vec(scale, sd, v.C, "scale"), fb = vec(shift, sd, v.C, "shift");
  return NK_DISPATCH_T(x.scalar_type(), [&] {
    NK_ACT_CALL(act, channel_backward_impl, x, dy, m, rs, fa, fb, r, batch_stats, need_dz);
  });
}

void check_out(const Tensor& out, const Tensor& x) {
  TORCH_CHECK_VALUE(!out.defined() || (out.is_contiguous() && out.sizes() == x.sizes() &&
                                       out.scalar_type() == x.scalar_type() && out.device() == x.device()),
                    "normkit cpu backend: expected an output tensor like x");
}

void check_rows(const Tensor& x, int64_t K) {
  check_x(x);
  TORCH_CHECK_VALUE(x.is_contiguous() && K > 0 && x.numel() % K == 0,
                    "normkit cpu backend: expected a contiguous tensor of rows of ", K, " values, got shape ", x.sizes(),
                    " strides ", x.strides());
}

}  // namespace

// LayerNorm/RMSNorm over rows of K values of a contiguous x: its trailing dimensions that hold K values (the
// eager ops pass a multi-dimensional normalized_shape's product), or its last dimension (the operators).
// `out`, when given, is a contiguous tensor of x's size the output is written to (LayerNorm2d hands in the
// channels_last result's rows, so that the result is not a view).
std::tuple<Tensor, Tensor, Tensor> rows_forward(const Tensor& x, int64_t K, const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias, double eps, bool rms,
                                                const Tensor& out) {
  check_rows(x, K);
  check_out(out, x);
  const auto sd = stat_type(x);
  Tensor w = opt_vec(weight, sd, K, "weight"), b = opt_vec(bias, sd, K, "bias");
  return NK_DISPATCH_T(x.scalar_type(), [&] { return row_forward_impl<T>(x, K, w, b, eps, rms, out); });
}

std::tuple<Tensor, Tensor, Tensor> rows_backward(const Tensor& x, int64_t K, const Tensor& dy_,
                                                 const c10::optional<Tensor>& mean, const Tensor& rstd,
                                                 const c10::optional<Tensor>& weight, bool rms, bool need_dweight,
                                                 const Tensor& out) {
  check_rows(x, K);
  check_out(out, x);
  const auto sd = stat_type(x);
  const int64_t M = x.numel() / K;
  TORCH_CHECK_VALUE(rms || (mean.has_value() && mean->defined()), "normkit cpu backend: LayerNorm needs the mean");
  Tensor dy = like_x(dy_, x);
  Tensor m = rms ? Tensor() : vec(*mean, sd, M, "mean");
  Tensor rs = vec(rstd, sd, M, "rstd");
  Tensor w = opt_vec(weight, sd, K, "weight");
  return NK_DISPATCH_T(x.scalar_type(),
                       [&] { return row_backward_impl<T>(x, K, dy, m, rs, w, rms, need_dweight, out); });
}

namespace {

std::tuple<Tensor, Tensor, Tensor> row_forward(const Tensor& x, const optional<Tensor>& weight,
                                               const optional<Tensor>& bias, double eps, bool rms) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "normkit cpu backend: expected a (..., K) tensor, got shape ", x.sizes());
  return rows_forward(x, x.size(-1), weight, bias, eps, rms, Tensor());
}

std::tuple<Tensor, Tensor, Tensor> row_backward(const Tensor& x, const Tensor& dy, const optional<Tensor>& mean,
                                                const Tensor& rstd, const optional<Tensor>& weight, bool rms,
                                                bool need_dweight) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "normkit cpu backend: expected a (..., K) tensor, got shape ", x.sizes());
  return rows_backward(x, x.size(-1), dy, mean, rstd, weight, rms, need_dweight, Tensor());
}

void check_groups(const Tensor& x, int64_t G) {
  check_x(x);
  const int64_t C = x.dim() > 1 ? x.size(1) : 1;
  TORCH_CHECK_VALUE(G > 0 && C % G == 0, "normkit cpu backend: num_groups must divide the ", C, " channels, got ", G);
}

std::tuple<Tensor, Tensor, Tensor> group_forward(const Tensor& x, int64_t G, const optional<Tensor>& weight,
                                                 const optional<Tensor>& bias, double eps,
                                                 const optional<Tensor>& residual, int64_t act) {
  check_groups(x, G);
  const auto sd = stat_type(x);
  const int64_t C = geometry(x).c;
  Tensor w = opt_vec(weight, sd, C, "weight"), b = opt_vec(bias, sd, C, "bias");
  Tensor r = like_x(residual, x);
  return NK_DISPATCH_T(x.scalar_type(), [&] { NK_ACT_CALL(act, group_forward_impl, x, G, w, b, eps, r); });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> group_backward(const Tensor& x, const Tensor& dy_, const Tensor& mean,
                                                          const Tensor& rstd, int64_t G,
                                                          const optional<Tensor>& weight,
                                                          const optional<Tensor>& bias,
                                                          const optional<Tensor>& residual, int64_t act,
                                                          bool need_dweight, bool need_dz) {
  check_groups(x, G);
  const auto sd = stat_type(x);
  const Geometry geo = geometry(x);
  Tensor dy = like_x(dy_, x), r = like_x(residual, x);
  Tensor m = vec(mean, sd, geo.n * G, "mean"), rs = vec(rstd, sd, geo.n * G, "rstd");
  Tensor w = opt_vec(weight, sd, geo.c, "weight"), b = opt_vec(bias, sd, geo.c, "bias");
  return NK_DISPATCH_T(x.scalar_type(), [&] {
    NK_ACT_CALL(act, group_backward_impl, x, dy, m, rs, G, w, b, r, need_dweight, need_dz);
  });
}

}  // namespace
}  // namespace normkit

TORCH_LIBRARY(normkit_cpu, m) {
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("channel_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, int act) -> Tensor");
  m.def("channel_backward_reduce(Tensor x, Tensor dy, Tensor mean, Tensor rstd, Tensor scale, Tensor shift, "
        "Tensor? residual, int act) -> (Tensor, Tensor)");
  m.def("channel_backward_dx(Tensor x, Tensor dy, Tensor mean, Tensor rstd, Tensor scale, Tensor shift, "
        "Tensor? residual, int act, Tensor mean_dz, Tensor mean_dz_xhat, bool need_dz) -> (Tensor, Tensor)");
  m.def("channel_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual, int act) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("channel_backward(Tensor x, Tensor dy, Tensor mean, Tensor rstd, Tensor scale, Tensor shift, "
        "Tensor? residual, int act, bool batch_stats, bool need_dz) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("row_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor)");
  m.def("row_backward(Tensor x, Tensor dy, Tensor? mean, Tensor rstd, Tensor? weight, bool rms, bool need_dweight) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("group_forward(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor? residual, "
        "int act) -> (Tensor, Tensor, Tensor)");
  m.def("group_backward(Tensor x, Tensor dy, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, "
        "Tensor? bias, Tensor? residual, int act, bool need_dweight, bool need_dz) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit_cpu, CPU, m) {
  m.impl("channel_stats", &normkit::channel_stats);
  m.impl("channel_apply", &normkit::channel_apply);
  m.impl("channel_backward_reduce", &normkit::channel_backward_reduce);
  m.impl("channel_backward_dx", &normkit::channel_backward_dx);
  m.impl("channel_forward", &normkit::channel_forward);
  m.impl("channel_backward", &normkit::channel_backward);
  m.impl("row_forward", &normkit::row_forward);
  m.impl("row_backward", &normkit::row_backward);
  m.impl("group_forward", &normkit::group_forward);
  m.impl("group_backward", &normkit::group_backward);
}

// LayerNorm2d on NCHW input (a fragment of the normkit_cpu library)
#include "ln2d.h"

// The eager path: the differentiable ops with their autograd in C++ (a fragment of the library)
#include "autograd.h"

// In-place activated BatchNorm: its kernels and operators (a fragment of the library)
#include "inplace_abn.h"

// `import normkit._C` loads this library, whose static initialisers above register the operators; the
// module's own functions are the layers' one-call forwards (layers.cpp).
static struct PyModuleDef normkit_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "normkit's CPU kernels (registers torch.ops.normkit_cpu) and the layers' one-call forwards", -1,
    normkit::layer_methods};

PyMODINIT_FUNC PyInit__C(void) {
  normkit::register_fork_handler();
  return PyModule_Create(&normkit_c_module);
}
