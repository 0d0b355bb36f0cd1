// The eager path in C++: normkit's differentiable CPU ops with their autograd in C++.
//
// torch.ops.normkit.* (ops.py) are torch.library custom ops whose autograd is Python; on torch
// 2.13 that costs about 100 µs of Python per call, and a Python autograd.Function still 25-50 µs,
// against aten's 5. These operators are the same computations with the autograd formulas of
// ops.py written as hand-written autograd nodes (as aten's generated ones), so an eager call is one
// dispatcher call (or one call from csrc/layers.cpp) and its backward runs without Python:
//
//   normkit_cpu::bn_train(x, weight, bias, residual, eps, act)            -> (y, mean, var)
//   normkit_cpu::bn_infer(x, mean, var, weight, bias, residual, eps, act) -> y
//   normkit_cpu::gn(x, num_groups, weight, bias, residual, eps, act)      -> (y, mean, var)
//   normkit_cpu::ln(x, normalized_shape, weight, bias, eps)               -> (y, mean, rstd)
//   normkit_cpu::rms(x, normalized_shape, weight, eps)                    -> (y, rstd)
//   eager::ln2d(x, weight, bias, eps)                                     -> (y, mean, rstd)  (LayerNorm2d)
//   normkit_cpu::update_running_stats(running_mean!, running_var!, num_batches_tracked!?, mean, var,
//                                     count, momentum?, skip)             -> skipped (bool)
//
// Same arguments, outputs and numbers as the custom ops with the cpu backend (the statistics,
// scale and shift are formed by the same tensor operations, the kernels are the same), and the
// same rules: first-order gradients from the kernels; with grad mode on inside backward
// (create_graph=True) the forward is recomputed in aten's differentiable operators from the
// saved inputs and differentiated, so the gradient is differentiable again (ops.py,
// _differentiable_vjp). Callers (normkit.ops.eager) have checked every argument and send only
// non-empty CPU tensors here; torch.compile keeps the custom ops.
//
// update_running_stats is running_stats.update_running_stats's arithmetic in one call:
// r ← r·(1 − m) + b·m in the statistics' dtype, op by op as the tensor expression rounds it.
//
// Included at the end of normkit_cpu.cpp (it calls the kernels defined there).
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "eager.h"

namespace normkit {
namespace eager {

using torch::autograd::variable_list;

inline Tensor value_or_undefined(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// x itself when dense in its layout, else a contiguous copy (ops.py, _dense)
inline Tensor dense(const Tensor& x) {
  const auto fmt = format_of(x);
  return x.is_contiguous(fmt) ? x : x.contiguous();
}

inline Tensor as_layout(const Tensor& t, const Tensor& x) {
  return t.defined() ? t.contiguous(format_of(x)) : t;
}

inline Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// Whether autograd has anything to record (grad mode on and some input requiring grad); when not, the
// entry points below compute without building an autograd node
inline bool records(const Tensor& x, const c10::optional<Tensor>& a = c10::nullopt,
                    const c10::optional<Tensor>& b = c10::nullopt, const c10::optional<Tensor>& c = c10::nullopt) {
  if (!at::GradMode::is_enabled()) return false;
  auto wants = [](const c10::optional<Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return x.requires_grad() || wants(a) || wants(b) || wants(c);
}

// A parameter's gradient in the parameter's dtype; undefined where the parameter is absent or not needed
inline Tensor param_grad(const Tensor& g, const Tensor& param, bool needed) {
  if (!param.defined() || !needed || !g.defined()) return Tensor();
  return cast(g, param.scalar_type());
}

// backends.scale_shift: scale = γ·rstd, shift = β − mean·scale in the statistics' dtype. For dense float32/
// float64 vectors of one dtype (every layer's case) one loop over the channels does it: the tensor
// expression's operations (a product, a negation, a product, a sum) are each exactly rounded, so the
// loop gives their bits (-ffp-contract=off: no fused multiply-add) without four small aten calls.
inline std::pair<Tensor, Tensor> scale_shift(const Tensor& w, const Tensor& b, const Tensor& mean,
                                             const Tensor& rstd) {
  const auto sd = rstd.scalar_type();
  const int64_t n = rstd.numel();
  auto fits = [&](const Tensor& t) {
    return !t.defined() || (t.scalar_type() == sd && t.is_contiguous() && t.numel() == n && t.is_cpu());
  };
  if ((sd == at::kFloat || sd == at::kDouble) && rstd.dim() == 1 && rstd.is_contiguous() && mean.defined() &&
      fits(mean) && fits(w) && fits(b)) {
    Tensor scale = at::empty_like(rstd), shift = at::empty_like(rstd);
    AT_DISPATCH_FLOATING_TYPES(sd, "normkit_scale_shift", [&] {
      using S = scalar_t;
      const S *r = rstd.data_ptr<S>(), *m = mean.data_ptr<S>();
      const S* g = w.defined() ? w.data_ptr<S>() : nullptr;
      const S* be = b.defined() ? b.data_ptr<S>() : nullptr;
      S *sc = scale.data_ptr<S>(), *sh = shift.data_ptr<S>();
      for (int64_t i = 0; i < n; ++i) {
        const S k = g ? g[i] * r[i] : r[i];
        const S h = -m[i] * k;
        sc[i] = k;
        sh[i] = be ? h + be[i] : h;
      }
    });
    return {scale, shift};
  }
  Tensor scale = w.defined() ? w.to(sd) * rstd : rstd;
  Tensor shift = -mean * scale;
  if (b.defined()) shift = shift + b.to(sd);
  return {scale, shift};
}

// rsqrt(var + eps) as the tensor expression computes it, with one allocation (the in-place form is the
// same kernel)
inline Tensor rstd_of(const Tensor& var, double eps) { return (var + eps).rsqrt_(); }

// Whether a backward computes in torch's differentiable, batchable operators instead of the kernels: with
// grad mode on (create_graph=True: the gradient must be differentiable again) and for a gradient the kernels
// cannot read — one without storage, such as functorch's batched gradients (torch.autograd.grad with
// is_grads_batched=True, torch.func.vmap over a backward)
inline bool composite_backward(const Tensor& dy) {
  return at::GradMode::is_enabled() || (dy.defined() && !dy.has_storage());
}

// ops._differentiable_vjp: the gradients of forward(inputs) · dy, recomputed from the saved inputs and
// differentiated by autograd (a graph itself when grad mode was on: create_graph=True); zeros for a wanted
// input the forward does not reach, undefined where not wanted
template <typename F>
variable_list differentiable_vjp(F&& forward, const variable_list& inputs, const std::vector<bool>& needs,
                                 const Tensor& dy) {
  const bool create_graph = at::GradMode::is_enabled();
  variable_list out(inputs.size());
  variable_list wanted;
  std::vector<size_t> where;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (needs[i] && inputs[i].defined() && inputs[i].requires_grad()) {
      wanted.push_back(inputs[i]);
      where.push_back(i);
    }
  }
  if (wanted.empty()) return out;
  at::AutoGradMode grad_on(true);
  Tensor y = forward();
  variable_list grads = torch::autograd::grad({y}, wanted, {dy}, /*retain_graph=*/create_graph, create_graph,
                                              /*allow_unused=*/true);
  for (size_t j = 0; j < where.size(); ++j)
    out[where[j]] = grads[j].defined() ? grads[j] : at::zeros_like(inputs[where[j]]);
  return out;
}

// ----------------------------------------------------------------------------- the autograd nodes
// Each op's backward is a hand-written autograd node, as aten's generated nodes are: a
// torch::autograd::Function's bookkeeping (input and output infos, a string-keyed map of constants,
// _wrap_outputs) cost about 4 µs of every small forward with grad, as much as the kernel. The forward
// computes under no-grad (the tensor ops inside it must not record graphs of their own), then hangs the
// node behind y. Edges are the differentiable inputs in order (x, weight, bias, residual); an absent one
// has an invalid edge. The running statistics of eval BatchNorm have none (they never require grad).
using torch::autograd::SavedVariable;

template <typename NodeT, typename... Inputs>
c10::intrusive_ptr<NodeT> attach(const Tensor& y, const Inputs&... inputs) {
  auto node = c10::make_intrusive<NodeT>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(y, node);
  return node;
}

// the gradient a node returns for its edge i: undefined unless that input exists and this graph task wants it
inline bool wanted(const torch::autograd::Node& node, size_t i, const Tensor& input) {
  return input.defined() && node.task_should_compute_output(i);
}

// ReLU after a residual add keeps the output instead of the residual. The gradient through the ReLU,
// dz = dy·[y > 0], is torch's own threshold_backward(dy, y, 0) (the ReLU's backward: a NaN output passes dy
// on, as torch.relu's does) and is also the residual's gradient; the rest is the backward without an
// activation. The output is what the next layer keeps for its own backward (a convolution's input), so the
// fused layer saves nothing torch's norm → add → ReLU would not; the residual may be a tensor of its own
// (a downsampling shortcut's BatchNorm output) that nothing else keeps.
// tanh and sigmoid keep the output too, residual or not, as torch's own modules do: their backward is torch's
// tanh_backward(dy, y) = dy·(1 − y²) / sigmoid_backward(dy, y) = dy·(1 − y)·y, no transcendental function evaluated
// again (recomputing tanh(z) from x cost more than the fused forward saved, and torch's pair pays none).
inline bool keeps_output(const Tensor& r, int64_t act) {
  const int kind = decode_act(act).kind;
  return (r.defined() && kind == kRelu) || kind == kTanh || kind == kSigmoid;
}

// (dy, act) for the rest of a backward: below a kept output's activation, (dy·act'(z) from y, identity)
inline std::pair<Tensor, int64_t> below_activation(const Tensor& dy, const Tensor& y, int64_t act) {
  if (!y.defined()) return {dy, act};
  switch (decode_act(act).kind) {
    case kTanh: return {at::tanh_backward(dy, y), int64_t(kIdentity)};
    case kSigmoid: return {at::sigmoid_backward(dy, y), int64_t(kIdentity)};
    default: return {at::threshold_backward(dy, y, 0), int64_t(kIdentity)};
  }
}

// The inputs both channel nodes save: x, weight, bias, and the residual or (keeps_output) the output y
template <typename NodeT>
void save_inputs(NodeT& node, const Tensor& y, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& r,
                 int64_t act) {
  node.x_ = SavedVariable(x, false);
  node.w_ = SavedVariable(w, false);
  node.b_ = SavedVariable(b, false);
  node.has_r_ = r.defined();
  if (keeps_output(r, act)) {
    node.y_ = SavedVariable(y, true);
  } else {
    node.r_ = SavedVariable(r, false);
  }
}

// ----------------------------------------------------------------------------- BatchNorm
// The gradients (dx, dγ, dβ, dresidual) of y = act(γ·(x − mean)·rstd + β + residual): training with the batch
// mean and rstd; eval (batch_stats false) with the running mean and variance as given (rstd is formed
// here, in the backward, which most eval calls never run)
inline variable_list bn_grads(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& r,
                              const Tensor& saved_mean, const Tensor& saved_stat, const Tensor& dy, bool batch_stats,
                              int64_t act, double eps, const std::vector<bool>& needs) {
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_r = needs[3];
  if (composite_backward(dy)) {  // create_graph=True or batched gradients: torch's operators
    const Tensor rm = batch_stats ? Tensor() : saved_mean, rv = batch_stats ? Tensor() : saved_stat;
    return differentiable_vjp(
        [&] { return finish(at::batch_norm(x, opt(w), opt(b), opt(rm), opt(rv), batch_stats, 0.0, eps, true), r, act); },
        {x, w, b, r}, needs, dy);
  }
  const auto sd = stat_type(x);
  const Tensor mean = batch_stats ? saved_mean : cast(saved_mean, sd);
  const Tensor rstd = batch_stats ? saved_stat : rstd_of(cast(saved_stat, sd), eps);
  const Tensor xd = dense(x), dyd = as_layout(dy, xd), rd = as_layout(r, xd);
  const auto [scale, shift] = scale_shift(w, b, mean, rstd);
  Tensor dx, sum_dz, sum_dz_xhat, dz;
  if (!batch_stats && act == kIdentity) {
    // constant statistics, no activation: dx = γ·rstd·dy exactly (a NaN in x reaches dγ, not dx, as in torch;
    // with an activation the kernels' constant-statistics loops form dx = γ·rstd·dz alike); the sums only for
    // a dγ/dβ asked for
    if (need_w || need_b) {
      std::tie(sum_dz, sum_dz_xhat) = channel_backward_reduce(xd, dyd, mean, rstd, scale, shift, opt(rd), act);
    }
    std::vector<int64_t> shape(xd.dim(), 1);
    shape[1] = -1;
    dx = as_layout((dyd.to(stat_type(xd)) * scale.reshape(shape)).to(xd.scalar_type()), xd);
    dz = need_r ? dyd : Tensor();
  } else if (!batch_stats && !need_w && !need_b) {
    // constant statistics and no dγ/dβ asked for (FrozenBatchNorm, frozen parameters): dx = γ·rstd·dz in one
    // pass of the kernels' constant-statistics loops, no sums
    const Tensor zero = at::zeros_like(mean);
    std::tie(dx, dz) = channel_backward_dx(xd, dyd, mean, rstd, scale, shift, opt(rd), act, zero, zero, need_r);
  } else {
    std::tie(dx, sum_dz, sum_dz_xhat, dz) =
        channel_backward(xd, dyd, mean, rstd, scale, shift, opt(rd), act, batch_stats, need_r);
  }
  return {need_x ? dx : Tensor(), param_grad(sum_dz_xhat, w, need_w), param_grad(sum_dz, b, need_b),
          need_r ? dz : Tensor()};
}

// Saved: x, weight, bias, the residual (or, keeps_output, the output y), and the batch mean and rstd
// (training) or the running mean and variance (eval)
struct BatchNormBackward : public torch::autograd::Node {
  SavedVariable x_, w_, b_, r_, y_, mean_, stat_;
  double eps_ = 0;
  int64_t act_ = 0;
  bool batch_stats_ = true, has_r_ = false;

  std::string name() const override {
    return batch_stats_ ? "normkit::eager::BatchNormBackward" : "normkit::eager::BatchNormEvalBackward";
  }

  void release_variables() override {
    for (SavedVariable* v : {&x_, &w_, &b_, &r_, &y_, &mean_, &stat_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(4);  // no gradient reached y
    const auto self = getptr();
    const Tensor x = x_.unpack(self), w = w_.unpack(self), b = b_.unpack(self), r = r_.unpack(self);
    const Tensor y = y_.unpack(self);
    const bool need_r = has_r_ && task_should_compute_output(3);
    // with the output kept (keeps_output), the gradient below the activation is the residual's and the rest has none
    const auto [dz, act] = below_activation(grads[0], y, act_);
    variable_list out = bn_grads(x, w, b, r, mean_.unpack(self), stat_.unpack(self), dz, batch_stats_, act, eps_,
                                 {wanted(*this, 0, x), wanted(*this, 1, w), wanted(*this, 2, b), need_r && !y.defined()});
    if (y.defined() && need_r) out[3] = dz;
    return out;
  }
};

inline void record_batch_norm(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& r,
                              const Tensor& mean, const Tensor& stat, double eps, int64_t act, bool batch_stats) {
  auto node = attach<BatchNormBackward>(y, x, w, b, r);
  save_inputs(*node, y, x, w, b, r, act);
  node->mean_ = SavedVariable(mean, false);
  node->stat_ = SavedVariable(stat, false);
  node->eps_ = eps;
  node->act_ = act;
  node->batch_stats_ = batch_stats;
}

// torch.nn's own sequence, BatchNorm (aten's eval kernel) → + residual → activation (in place), so eval
// outputs are torch.nn's to the bit on every route, fused or not, with or without a backward
// (normkit.route); the backward is normkit's kernel (thread-count independent dγ/dβ)
inline Tensor infer_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& w, const Tensor& b,
                            const Tensor& r, double eps, int64_t act) {
  return finish_in_place(at::batch_norm(dense(x), opt(w), opt(b), mean, var, false, 0.0, eps, false), r, act);
}

std::tuple<Tensor, Tensor, Tensor> bn_train(const Tensor& x, const c10::optional<Tensor>& w_,
                                            const c10::optional<Tensor>& b_, const c10::optional<Tensor>& r_,
                                            double eps, int64_t act) {
  const Tensor w = value_or_undefined(w_), b = value_or_undefined(b_), r = value_or_undefined(r_);
  const bool record = records(x, w_, b_, r_);
  Tensor y, mean, var;
  {
    at::AutoGradMode no_grad(false);
    const Tensor xd = dense(x);
    std::tie(y, mean, var) = channel_forward(xd, w_, b_, eps, opt(as_layout(r, xd)), act);
    if (record) record_batch_norm(y, x, w, b, r, mean, rstd_of(var, eps), eps, act, true);
  }
  return {y, mean, var};
}

Tensor bn_infer(const Tensor& x, const Tensor& mean, const Tensor& var, const c10::optional<Tensor>& w_,
                const c10::optional<Tensor>& b_, const c10::optional<Tensor>& r_, double eps, int64_t act) {
  const Tensor w = value_or_undefined(w_), b = value_or_undefined(b_), r = value_or_undefined(r_);
  const bool record = records(x, w_, b_, r_);
  at::AutoGradMode no_grad(false);
  Tensor y = infer_forward(x, mean, var, w, b, r, eps, act);
  if (record) record_batch_norm(y, x, w, b, r, mean, var, eps, act, false);
  return y;
}

// ----------------------------------------------------------------------------- GroupNorm
// Saved: x, weight, bias, the residual (or, keeps_output, the output y), the (N, G) mean and rstd
struct GroupNormBackward : public torch::autograd::Node {
  SavedVariable x_, w_, b_, r_, y_, mean_, rstd_;
  double eps_ = 0;
  int64_t act_ = 0, groups_ = 1;
  bool has_r_ = false;

  std::string name() const override { return "normkit::eager::GroupNormBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&x_, &w_, &b_, &r_, &y_, &mean_, &rstd_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(4);
    const auto self = getptr();
    const Tensor x = x_.unpack(self), w = w_.unpack(self), b = b_.unpack(self), r = r_.unpack(self);
    const Tensor y = y_.unpack(self);
    const bool need_x = wanted(*this, 0, x), need_w = wanted(*this, 1, w), need_b = wanted(*this, 2, b),
               need_r = has_r_ && task_should_compute_output(3);
    // with the output kept (keeps_output), the gradient below the activation is the residual's and the rest has none
    const auto [dy, act] = below_activation(grads[0], y, act_);
    const Tensor dr = y.defined() && need_r ? dy : Tensor();
    if (composite_backward(dy)) {  // create_graph=True or batched gradients: torch's operators
      variable_list out = differentiable_vjp(
          [&] { return finish(at::group_norm(x, groups_, opt(w), opt(b), eps_), r, act); }, {x, w, b, r},
          {need_x, need_w, need_b, need_r && !y.defined()}, dy);
      if (dr.defined()) out[3] = dr;
      return out;
    }
    const Tensor xd = dense(x);
    auto [dx, dw, db, dz] = group_backward(xd, as_layout(dy, xd), mean_.unpack(self), rstd_.unpack(self), groups_,
                                           opt(w), opt(b), opt(as_layout(r, xd)), act, need_w || need_b,
                                           need_r && !y.defined());
    return {need_x ? dx : Tensor(), param_grad(dw, w, need_w), param_grad(db, b, need_b),
            dr.defined() ? dr : (need_r ? dz : Tensor())};
  }
};

std::tuple<Tensor, Tensor, Tensor> gn(const Tensor& x, int64_t groups, const c10::optional<Tensor>& w_,
                                      const c10::optional<Tensor>& b_, const c10::optional<Tensor>& r_, double eps,
                                      int64_t act) {
  const Tensor w = value_or_undefined(w_), b = value_or_undefined(b_), r = value_or_undefined(r_);
  const bool record = records(x, w_, b_, r_);
  Tensor y, mean, var;
  {
    at::AutoGradMode no_grad(false);
    const Tensor xd = dense(x);
    std::tie(y, mean, var) = group_forward(xd, groups, w_, b_, eps, opt(as_layout(r, xd)), act);
    if (record) {
      auto node = attach<GroupNormBackward>(y, x, w, b, r);
      save_inputs(*node, y, x, w, b, r, act);
      node->mean_ = SavedVariable(mean, false);
      node->rstd_ = SavedVariable(rstd_of(var, eps), false);
      node->eps_ = eps;
      node->act_ = act;
      node->groups_ = groups;
    }
  }
  return {y, mean, var};
}

// ----------------------------------------------------------------------------- LayerNorm / RMSNorm
// the row length: the product of the normalized trailing dimensions
inline int64_t row_length(at::IntArrayRef normalized_shape) {
  int64_t k = 1;
  for (int64_t d : normalized_shape) k *= d;
  return k;
}

// The kernels read rows of k values (the normalized trailing dimensions) from a contiguous tensor of any
// shape, write outputs of its shape, and take the weight and bias as k contiguous values whatever their
// shape: no view is made (each is a new TensorImpl, about a microsecond; a small LayerNorm's forward +
// backward used to make ten). Only the weight's and bias's gradients take the normalized shape back.
inline Tensor shaped(const Tensor& t, const std::vector<int64_t>& shape) {
  return t.defined() && t.sizes() != at::IntArrayRef(shape) ? t.view(shape) : t;
}

// The backward of ln and rms. Edges: x 0, weight 1, bias 2.
struct RowNormBackward : public torch::autograd::Node {
  SavedVariable x_, w_, b_, mean_, rstd_;
  std::vector<int64_t> shape_;
  double eps_ = 0;
  bool rms_ = false;

  std::string name() const override {
    return rms_ ? "normkit::eager::RMSNormBackward" : "normkit::eager::LayerNormBackward";
  }

  void release_variables() override {
    for (SavedVariable* v : {&x_, &w_, &b_, &mean_, &rstd_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;  // no gradient reached y
    const auto self = getptr();
    const Tensor x = x_.unpack(self), w = w_.unpack(self), b = b_.unpack(self);
    const bool need_x = wanted(*this, 0, x), need_w = wanted(*this, 1, w), need_b = wanted(*this, 2, b);
    if (composite_backward(dy)) {  // create_graph=True or batched gradients: torch's operators
      return differentiable_vjp(
          [&] {
            return rms_ ? at::rms_norm(x, shape_, opt(w), eps_) : at::layer_norm(x, shape_, opt(w), opt(b), eps_, true);
          },
          {x, w, b}, {need_x, need_w, need_b}, dy);
    }
    const Tensor mean = mean_.unpack(self), rstd = rstd_.unpack(self);
    // (an expanded or transposed gradient arrives as well)
    auto [dx, dw, db] = rows_backward(x.contiguous(), row_length(shape_), dy.contiguous(), opt(mean), rstd, opt(w),
                                      rms_, need_w || need_b);
    if (need_x) out[0] = dx;
    out[1] = param_grad(shaped(dw, shape_), w, need_w);
    out[2] = param_grad(shaped(db, shape_), b, need_b);
    return out;
  }
};

// LayerNorm (rms false) or RMSNorm (rms true, b undefined) over the trailing normalized_shape:
// (y, mean (undefined for RMSNorm), rstd), with a RowNormBackward node behind y when autograd records
inline std::tuple<Tensor, Tensor, Tensor> row_norm(const Tensor& x, at::IntArrayRef normalized_shape, const Tensor& w,
                                                   const Tensor& b, double eps, bool rms) {
  const bool record = records(x, opt(w), opt(b));
  at::AutoGradMode no_grad(false);
  auto [y, mean, rstd] = rows_forward(x.contiguous(), row_length(normalized_shape), opt(w), opt(b), eps, rms);
  if (record) {
    auto node = attach<RowNormBackward>(y, x, w, b);
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w, false);
    node->b_ = SavedVariable(b, false);
    node->mean_ = SavedVariable(mean, false);
    node->rstd_ = SavedVariable(rstd, false);
    node->shape_ = normalized_shape.vec();
    node->eps_ = eps;
    node->rms_ = rms;
  }
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> ln(const Tensor& x, at::IntArrayRef normalized_shape,
                                      const c10::optional<Tensor>& w, const c10::optional<Tensor>& b, double eps) {
  return row_norm(x, normalized_shape, value_or_undefined(w), value_or_undefined(b), eps, false);
}

std::tuple<Tensor, Tensor> rms(const Tensor& x, at::IntArrayRef normalized_shape, const c10::optional<Tensor>& w,
                               double eps) {
  auto [y, mean, rstd] = row_norm(x, normalized_shape, value_or_undefined(w), Tensor(), eps, true);
  return {y, rstd};
}

// ----------------------------------------------------------------------------- LayerNorm2d
// ops_channels.layer_norm_2d on the cpu backend (cpu_backend.ln2d_forward/ln2d_backward): LayerNorm over dim 1
// of (N, C, *spatial) at every position. Where the channels are the fastest dimension (channels_last, or
// one position) the tensor is a contiguous (..., C) matrix of rows: the row kernels; NCHW: ln2d's kernels
// over strided channels. Output in x's layout; mean and rstd (N, *spatial).
inline std::vector<int64_t> channels_last_order(int64_t dim) {  // (0, 2, ..., dim − 1, 1)
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < dim; ++d) perm.push_back(d);
  perm.push_back(1);
  return perm;
}

inline std::vector<int64_t> channels_first_order(int64_t dim) {  // its inverse
  std::vector<int64_t> perm{0, dim - 1};
  for (int64_t d = 1; d < dim - 1; ++d) perm.push_back(d);
  return perm;
}

inline std::vector<int64_t> stat_shape(const Tensor& x) {
  std::vector<int64_t> shape{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(x.size(d));
  return shape;
}

// xd dense in its layout (dense()). The row kernels write into the rows of a tensor allocated in x's layout, so
// y and dx are tensors of their own, not views of a permuted result (autograd refuses in-place changes to a
// view made under no-grad, and y.relu_() after a LayerNorm2d must work)
inline std::tuple<Tensor, Tensor, Tensor> ln2d_forward(const Tensor& xd, const Tensor& w, const Tensor& b, double eps) {
  const auto to_rows = channels_last_order(xd.dim());
  const Tensor rows = xd.permute(to_rows);
  if (!rows.is_contiguous()) return ln2d::forward(xd, opt(w), opt(b), eps);
  const Tensor y = at::empty_like(xd);
  auto [unused, mean, rstd] = rows_forward(rows, xd.size(1), opt(w), opt(b), eps, false, y.permute(to_rows));
  const auto shape = stat_shape(xd);
  return {y, mean.view(shape), rstd.view(shape)};
}

inline std::tuple<Tensor, Tensor, Tensor> ln2d_backward(const Tensor& xd, const Tensor& dy_, const Tensor& mean,
                                                        const Tensor& rstd, const Tensor& w, bool need_dw) {
  const Tensor dy = dy_.contiguous(format_of(xd));  // ops_channels._backward_impl: dy in x's layout
  const auto to_rows = channels_last_order(xd.dim());
  const Tensor rows = xd.permute(to_rows);
  if (!rows.is_contiguous()) return ln2d::backward(xd, dy, mean, rstd, opt(w), need_dw);
  const Tensor dx = at::empty_like(xd);
  auto [unused, dw, db] = rows_backward(rows, xd.size(1), dy.permute(to_rows).contiguous(), mean.reshape(-1),
                                        rstd.reshape(-1), opt(w), false, need_dw, dx.permute(to_rows));
  return {dx, dw, db};
}

// Saved: x, weight, bias, mean, rstd. Edges: x 0, weight 1, bias 2.
struct LayerNorm2dBackward : public torch::autograd::Node {
  SavedVariable x_, w_, b_, mean_, rstd_;
  double eps_ = 0;

  std::string name() const override { return "normkit::eager::LayerNorm2dBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&x_, &w_, &b_, &mean_, &rstd_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(3);
    const auto self = getptr();
    const Tensor x = x_.unpack(self), w = w_.unpack(self), b = b_.unpack(self);
    const Tensor& dy = grads[0];
    const bool need_x = wanted(*this, 0, x), need_w = wanted(*this, 1, w), need_b = wanted(*this, 2, b);
    if (composite_backward(dy)) {  // create_graph=True or batched gradients: the permute form, differentiated
      return differentiable_vjp(
          [&] {
            return at::layer_norm(x.permute(channels_last_order(x.dim())), {x.size(1)}, opt(w), opt(b), eps_, true)
                .permute(channels_first_order(x.dim()));
          },
          {x, w, b}, {need_x, need_w, need_b}, dy);
    }
    const auto sd = stat_type(x);
    auto [dx, dw, db] = ln2d_backward(dense(x), dy, cast(mean_.unpack(self), sd), cast(rstd_.unpack(self), sd), w,
                                      need_w || need_b);
    return {need_x ? dx : Tensor(), param_grad(dw, w, need_w), param_grad(db, b, need_b)};
  }
};

std::tuple<Tensor, Tensor, Tensor> ln2d(const Tensor& x, const c10::optional<Tensor>& w_,
                                        const c10::optional<Tensor>& b_, double eps) {
  const Tensor w = value_or_undefined(w_), b = value_or_undefined(b_);
  const bool record = records(x, w_, b_);
  at::AutoGradMode no_grad(false);
  auto [y, mean, rstd] = ln2d_forward(dense(x), w, b, eps);
  if (record) {
    auto node = attach<LayerNorm2dBackward>(y, x, w, b);
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w, false);
    node->b_ = SavedVariable(b, false);
    node->mean_ = SavedVariable(mean, false);
    node->rstd_ = SavedVariable(rstd, false);
    node->eps_ = eps;
  }
  return {y, mean, rstd};
}

// ----------------------------------------------------------------------------- running statistics
// running_stats.update_running_stats's arithmetic, each tensor operation's rounding reproduced:
//   var_u = var·(n/(n − 1))                 in the batch statistics' dtype B
//   r     = r·(1 − m) + B→S(b)·m            in the running statistics' dtype S (two roundings, no FMA)
template <typename S, typename B>
void blend_stats(S* running_mean, S* running_var, const B* mean, const B* var, int64_t n, S keep, S take, B unbias) {
  for (int64_t i = 0; i < n; ++i) {
    const S m = static_cast<S>(mean[i]);
    const S v = static_cast<S>(var[i] * unbias);
    const S kept_mean = running_mean[i] * keep, taken_mean = m * take;
    running_mean[i] = kept_mean + taken_mean;
    const S kept_var = running_var[i] * keep, taken_var = v * take;
    running_var[i] = kept_var + taken_var;
  }
}

template <typename B>
bool all_finite(const B* mean, const B* var, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(mean[i]) && std::isfinite(var[i]);
  return finite;
}

bool update_running_stats(Tensor& running_mean, Tensor& running_var, const c10::optional<Tensor>& nbt_opt,
                          const Tensor& mean, const Tensor& var, int64_t count, c10::optional<double> momentum,
                          bool skip) {
  const auto S_type = running_mean.scalar_type(), B_type = mean.scalar_type();
  const int64_t n = running_mean.numel();
  auto floating = [](at::ScalarType t) { return t == at::kFloat || t == at::kDouble; };
  TORCH_CHECK_VALUE(floating(S_type) && running_var.scalar_type() == S_type && floating(B_type) &&
                        var.scalar_type() == B_type,
                    "normkit update_running_stats: expected float32/float64 running statistics of one dtype and "
                    "float32/float64 batch statistics of one dtype");
  TORCH_CHECK_VALUE(running_mean.is_contiguous() && running_var.is_contiguous() && running_var.numel() == n &&
                        mean.numel() == n && var.numel() == n && count > 0,
                    "normkit update_running_stats: expected contiguous statistics of equal length and count > 0");
  const Tensor m_c = mean.contiguous(), v_c = var.contiguous();
  Tensor nbt = value_or_undefined(nbt_opt);
  bool finite = true;
  if (skip) {
    AT_DISPATCH_FLOATING_TYPES(B_type, "normkit_finite",
                               [&] { finite = all_finite(m_c.data_ptr<scalar_t>(), v_c.data_ptr<scalar_t>(), n); });
  }
  if (!finite) return true;  // skipped: nothing moves, num_batches_tracked included
  if (nbt.defined()) nbt.add_(1);
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  AT_DISPATCH_FLOATING_TYPES(S_type, "normkit_update_running_stats", [&] {
    using S = scalar_t;
    S keep, take;
    if (momentum.has_value()) {  // a Python float: 1 − m in double, each factor rounded to S by the tensor op
      keep = static_cast<S>(1.0 - *momentum);
      take = static_cast<S>(*momentum);
    } else {  // cumulative average: m = 1/num_batches_tracked as an S tensor, 1 − m in S
      take = nbt.defined() ? S(1) / static_cast<S>(nbt.item<int64_t>()) : S(0);
      keep = S(1) - take;
    }
    if (B_type == at::kDouble) {
      blend_stats<S, double>(running_mean.data_ptr<S>(), running_var.data_ptr<S>(), m_c.data_ptr<double>(),
                             v_c.data_ptr<double>(), n, keep, take, unbias);
    } else {
      blend_stats<S, float>(running_mean.data_ptr<S>(), running_var.data_ptr<S>(), m_c.data_ptr<float>(),
                            v_c.data_ptr<float>(), n, keep, take, static_cast<float>(unbias));
    }
  });
  return false;
}

std::tuple<Tensor, Tensor> batch_moments(const Tensor& x) { return channel_stats(x); }

}  // namespace eager
}  // namespace normkit

TORCH_LIBRARY_FRAGMENT(normkit_cpu, m) {
  m.def("bn_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, int act) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("bn_infer(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
        "int act) -> Tensor");
  m.def("gn(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? residual, float eps, int act) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ln(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms(Tensor x, int[] normalized_shape, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor mean, Tensor var, int count, float? momentum, bool skip) -> bool");
}

// CompositeImplicitAutograd: one kernel for every dispatch key; the autograd node it hangs behind y
// records the graph itself when an input requires grad
TORCH_LIBRARY_IMPL(normkit_cpu, CompositeImplicitAutograd, m) {
  m.impl("bn_train", &normkit::eager::bn_train);
  m.impl("bn_infer", &normkit::eager::bn_infer);
  m.impl("gn", &normkit::eager::gn);
  m.impl("ln", &normkit::eager::ln);
  m.impl("rms", &normkit::eager::rms);
}

TORCH_LIBRARY_IMPL(normkit_cpu, CPU, m) { m.impl("update_running_stats", &normkit::eager::update_running_stats); }
