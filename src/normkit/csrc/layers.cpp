// The layers' forward in one call: normkit._C.{batch_norm, group_norm, layer_norm, layer_norm_2d, rms_norm}.
//
// Why: a normkit layer's forward in Python — the fast checks, the op call through the dispatcher, the
// running-statistics update — cost 15-60 µs a call, where torch.nn's whole forward on a small tensor costs
// 8-50 µs (issue 12: BatchNorm1d 64×256 training forward 85 µs against torch's 55). These functions do the
// same work in C++, called straight from Python (METH_FASTCALL, no argument parser, no dispatcher), and
// compute with exactly the functions the Python path reaches: the eager ops of autograd.h, aten's
// batch_norm where the route picks aten, and eager::update_running_stats. So a served call gives the
// Python path's bits, and its errors.
//
// They decide nothing: normkit.route chose this path and, for BatchNorm, whether aten's kernel computes it
// (`aten`) and whether the running statistics move (`update`: training, tracked, not a recomputation —
// normkit.running_stats); the caller passes the answers. What each function does check is whether it can
// run the call as given — argument types, a plain dense CPU tensor of a floating dtype, shapes that every
// Python check would accept — and it returns None for anything else. The caller (normkit.functional) then
// runs its checks, which raise the clear error or serve the rare case (a non-empty tensor of an unusual
// shape, a mismatched dtype...). Nothing is touched before every check has passed, so "not served" leaves
// no trace.
//
//   batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, dims_mask, channels,
//              batch_stats, update, momentum, eps, residual, act, skip_nonfinite, aten)
//                                                  -> (y, skipped) | None
//   group_norm(x, num_groups, channels, weight, bias, eps, residual, act)            -> y | None
//   layer_norm(x, normalized_shape, weight, bias, eps)                               -> y | None
//   layer_norm_2d(x, weight, bias, channels, eps)                                    -> y | None
//   rms_norm(x, normalized_shape, weight, eps)                                       -> y | None
#include "eager.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <limits>

namespace normkit {
namespace {

using at::Tensor;

// ----------------------------------------------------------------------------- what can be run
// The dispatch keys of a plain dense CPU tensor, with autograd (any tensor made outside inference mode)
// and without (an inference tensor). A wrapper, subclass with __torch_dispatch__, sparse, conjugate or
// negative-bit tensor has other keys.
bool plain_keys(const Tensor& t) {
  static const c10::DispatchKeySet with_autograd = at::empty({0}).key_set();
  static const c10::DispatchKeySet inference = [] {
    c10::InferenceMode guard;
    return at::empty({0}).key_set();
  }();
  const auto keys = t.key_set();
  return keys == with_autograd || keys == inference;
}

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// One positional argument: None -> an undefined tensor; a torch.Tensor or nn.Parameter (not a subclass,
// which may override __torch_function__) holding a plain CPU tensor -> that tensor; else not served.
bool tensor_arg(PyObject* obj, Tensor& out) {
  if (obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !plain_keys(t)) return false;
  out = t;
  return true;
}

bool int_arg(PyObject* obj, int64_t& out) {
  if (!PyLong_Check(obj)) return false;
  out = PyLong_AsLongLong(obj);
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// a Python float or int (not a bool, a tensor or anything else with __float__)
bool float_arg(PyObject* obj, double& out) {
  if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyLong_Check(obj))) return false;
  out = PyFloat_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool bool_arg(PyObject* obj, bool& out) {
  if (!PyBool_Check(obj)) return false;
  out = obj == Py_True;
  return true;
}

// normalized_shape as the trailing sizes: an int, or a non-empty tuple/list/torch.Size of ints
bool shape_arg(PyObject* obj, std::vector<int64_t>& out) {
  out.clear();
  int64_t k;
  if (PyLong_Check(obj)) {
    if (!int_arg(obj, k)) return false;
    out.push_back(k);
    return true;
  }
  if (!(PyTuple_Check(obj) || PyList_Check(obj))) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  if (n < 1) return false;
  PyObject** items = PySequence_Fast_ITEMS(obj);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!int_arg(items[i], k)) return false;
    out.push_back(k);
  }
  return true;
}

// normkit._checks.vectors_ok and functional.check_param_dtypes: each given parameter has exactly `shape`, one
// dtype among them, the input's or float32 beside float16/bfloat16 input
bool params_ok(const Tensor& x, at::IntArrayRef shape, std::initializer_list<const Tensor*> params) {
  c10::optional<at::ScalarType> dtype;
  for (const Tensor* t : params) {
    if (!t->defined()) continue;
    if (t->sizes() != shape || (dtype.has_value() && t->scalar_type() != *dtype)) return false;
    dtype = t->scalar_type();
  }
  return !dtype.has_value() || *dtype == x.scalar_type() || (*dtype == at::kFloat && reduced(x.scalar_type()));
}

// per-channel vectors of `size` values
bool vectors_ok(const Tensor& x, int64_t size, std::initializer_list<const Tensor*> vectors) {
  return params_ok(x, {size}, vectors);
}

// functional.check_row_norm: x's trailing sizes are `shape`, and the parameters have it
bool row_params_ok(const Tensor& x, at::IntArrayRef shape, std::initializer_list<const Tensor*> params) {
  const int64_t k = static_cast<int64_t>(shape.size());
  return x.dim() >= k && x.sizes().slice(x.dim() - k) == shape && params_ok(x, shape, params);
}

// normkit._checks.fused_args_ok: the residual, if any, is floating with the input's shape; act a known code
bool fused_ok(const Tensor& x, const Tensor& residual, int64_t act) {
  if (!act_code_ok(act)) return false;
  return !residual.defined() || (floating(residual.scalar_type()) && residual.sizes() == x.sizes());
}

bool wants_grad(std::initializer_list<const Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

using eager::finish;
using eager::finish_in_place;
using eager::opt;

PyObject* wrap(Tensor t) { return THPVariable_Wrap(std::move(t)); }

PyObject* not_served() { Py_RETURN_NONE; }

// ----------------------------------------------------------------------------- BatchNorm
// functional.batch_norm_module's ONE_CALL path (and functional.batch_norm's without an update)
PyObject* batch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  RECORD_FUNCTION("normkit::batch_norm", std::vector<c10::IValue>());  // the layer's name in torch.profiler
  if (nargs != 16) return not_served();
  Tensor x, w, b, rm, rv, nbt, r;
  int64_t dims_mask, channels, act;
  bool batch_stats, update, skip, aten;
  double eps;
  c10::optional<double> momentum;
  if (!(tensor_arg(args[0], x) && tensor_arg(args[1], w) && tensor_arg(args[2], b) && tensor_arg(args[3], rm) &&
        tensor_arg(args[4], rv) && tensor_arg(args[5], nbt) && int_arg(args[6], dims_mask) &&
        int_arg(args[7], channels) && bool_arg(args[8], batch_stats) && bool_arg(args[9], update) &&
        float_arg(args[11], eps) && tensor_arg(args[12], r) && int_arg(args[13], act) && bool_arg(args[14], skip) &&
        bool_arg(args[15], aten)))
    return not_served();
  if (args[10] != Py_None) {
    double m;
    if (!float_arg(args[10], m)) return not_served();
    momentum = m;
  }
  // shapes and dtypes every check of normkit._checks.batch_norm accepts
  if (!x.defined() || !floating(x.scalar_type()) || x.dim() < 2 || x.dim() > 30 || !((dims_mask >> x.dim()) & 1))
    return not_served();
  if (x.size(1) != channels || !(eps > 0) || x.numel() == 0) return not_served();
  if (rm.defined() != rv.defined() || (rm.defined() && (rm.requires_grad() || rv.requires_grad())))
    return not_served();
  if (!batch_stats && !rm.defined()) return not_served();
  if (batch_stats && x.numel() == channels) return not_served();  // one value per channel: the clear error
  if (!vectors_ok(x, channels, {&w, &b, &rm, &rv}) || !fused_ok(x, r, act)) return not_served();
  update = update && batch_stats && rm.defined();
  if (update) {  // eager::update_running_stats writes dense float32/float64 statistics and an int64 count
    const auto st = rm.scalar_type();
    if ((st != at::kFloat && st != at::kDouble) || !rm.is_contiguous() || !rv.is_contiguous() ||
        (nbt.defined() && nbt.scalar_type() != at::kLong))
      return not_served();
  }

  const bool cudnn = at::globalContext().userEnabledCuDNN();
  Tensor y;
  bool skipped = false;
  {
    pybind11::gil_scoped_release no_gil;  // torch's own ops release it too: other Python threads run meanwhile
    if (batch_stats) {
      Tensor mean, var;
      if (aten) {
        y = at::batch_norm(x, opt(w), opt(b), {}, {}, true, 0.0, eps, cudnn);
        // the statistics kernel reads x's data directly (no op recorded), its outputs are fresh: no detach
        if (update) std::tie(mean, var) = eager::batch_moments(x);
      } else {
        std::tie(y, mean, var) = eager::bn_train(x, opt(w), opt(b), opt(r), eps, act);
        if (update) {
          mean = mean.detach();
          var = var.detach();
        }
      }
      if (update) {
        skipped = eager::update_running_stats(rm, rv, opt(nbt), mean, var, x.numel() / channels, momentum, skip);
      }
    } else if (aten) {
      y = at::batch_norm(x, opt(w), opt(b), rm, rv, false, 0.0, eps, cudnn);
      // without a backward, the residual and the activation go in place on the fresh output (the same
      // values: the in-place forms are the same kernels), saving an allocation and a pass per op
      y = wants_grad({&x, &w, &b, &r}) ? finish(y, r, act) : finish_in_place(y, r, act);
    } else {
      y = eager::bn_infer(x, rm, rv, opt(w), opt(b), opt(r), eps, act);
    }
  }
  PyObject* out = wrap(std::move(y));
  if (out == nullptr) return nullptr;
  return Py_BuildValue("(NO)", out, skipped ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

// ----------------------------------------------------------------------------- GroupNorm
// nn/groupnorm.py _normalize and functional.group_norm (the route never sends GroupNorm to aten on CPU)
PyObject* group_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  RECORD_FUNCTION("normkit::group_norm", std::vector<c10::IValue>());  // the layer's name in torch.profiler
  if (nargs != 8) return not_served();
  Tensor x, w, b, r;
  int64_t groups, channels, act;
  double eps;
  if (!(tensor_arg(args[0], x) && int_arg(args[1], groups) && int_arg(args[2], channels) && tensor_arg(args[3], w) &&
        tensor_arg(args[4], b) && float_arg(args[5], eps) && tensor_arg(args[6], r) && int_arg(args[7], act)))
    return not_served();
  if (!x.defined() || !floating(x.scalar_type()) || x.dim() < 2 || x.size(1) != channels || x.numel() == 0)
    return not_served();
  if (groups <= 0 || channels % groups != 0) return not_served();
  if (!vectors_ok(x, channels, {&w, &b}) || !fused_ok(x, r, act)) return not_served();
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(eager::gn(x, groups, opt(w), opt(b), opt(r), eps, act));
  }
  return wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// ----------------------------------------------------------------------------- LayerNorm / RMSNorm
// functional.layer_norm (the route never sends it to aten)
PyObject* layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  RECORD_FUNCTION("normkit::layer_norm", std::vector<c10::IValue>());  // the layer's name in torch.profiler
  if (nargs != 5) return not_served();
  Tensor x, w, b;
  std::vector<int64_t> shape;
  double eps;
  if (!(tensor_arg(args[0], x) && shape_arg(args[1], shape) && tensor_arg(args[2], w) && tensor_arg(args[3], b) &&
        float_arg(args[4], eps)))
    return not_served();
  if (!x.defined() || !floating(x.scalar_type()) || x.numel() == 0 || !row_params_ok(x, shape, {&w, &b}))
    return not_served();
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(eager::ln(x, shape, opt(w), opt(b), eps));
  }
  return wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// nn/layernorm2d.py LayerNorm2d.forward: (N, C, H, W) input, NCHW or channels_last (the route never sends it
// to aten)
PyObject* layer_norm_2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  RECORD_FUNCTION("normkit::layer_norm_2d", std::vector<c10::IValue>());
  if (nargs != 5) return not_served();
  Tensor x, w, b;
  int64_t channels;
  double eps;
  if (!(tensor_arg(args[0], x) && tensor_arg(args[1], w) && tensor_arg(args[2], b) && int_arg(args[3], channels) &&
        float_arg(args[4], eps)))
    return not_served();
  if (!x.defined() || !floating(x.scalar_type()) || x.dim() != 4 || x.size(1) != channels || x.numel() == 0)
    return not_served();
  if (!vectors_ok(x, channels, {&w, &b})) return not_served();
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(eager::ln2d(x, opt(w), opt(b), eps));
  }
  return wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// eps=None: the epsilon of the statistics' dtype (float32's for float16/bfloat16 input), as torch's rms_norm
// kernels use (its documentation says the input dtype's)
double dtype_eps(at::ScalarType t) {
  return t == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

// functional.rms_norm on contiguous real input with a one-dimensional normalized_shape; eps None as dtype_eps.
// The weight may have any floating dtype (torch accepts it, so does the kernel).
PyObject* rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  RECORD_FUNCTION("normkit::rms_norm", std::vector<c10::IValue>());  // the layer's name in torch.profiler
  if (nargs != 4) return not_served();
  Tensor x, w;
  std::vector<int64_t> shape;
  double eps = 0;
  if (!(tensor_arg(args[0], x) && shape_arg(args[1], shape) && shape.size() == 1 && tensor_arg(args[2], w) &&
        (args[3] == Py_None || float_arg(args[3], eps))))
    return not_served();
  const int64_t k = shape[0];
  if (!x.defined() || !floating(x.scalar_type()) || x.dim() < 1 || x.size(-1) != k || x.numel() == 0 ||
      !x.is_contiguous())
    return not_served();
  if (w.defined() && (!floating(w.scalar_type()) || w.dim() != 1 || w.size(0) != k)) return not_served();
  if (args[3] == Py_None) eps = dtype_eps(x.scalar_type());
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(eager::rms(x, shape, opt(w), eps));
  }
  return wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// ----------------------------------------------------------------------------- plain_cpu
// normkit.route's question "is this a plain eager call on plain CPU tensors?", answered in one C call:
// no tracer, no functorch transform, no dispatch or torch function mode, and every argument None or a
// torch.Tensor / nn.Parameter (not a subclass) holding a plain dense CPU tensor (not meta, sparse,
// conjugate...). The route asks it on every call of every layer: in Python the same tests cost about
// 0.6 µs (route._plain_eager_python, which the route uses without the extension; tests/test_route.py
// checks that the two agree in every state). Forward-mode AD is the route's own test (a Python level).
//   plain_cpu(x, others: tuple) -> bool
PyObject* plain_cpu(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !PyTuple_Check(args[1])) Py_RETURN_FALSE;
  if (torch::jit::tracer::isTracing() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled())
    Py_RETURN_FALSE;
  // a torch.Tensor or nn.Parameter (not a subclass) holding a plain dense CPU tensor, as tensor_arg accepts
  auto plain = [](PyObject* obj) {
    if (!THPVariable_CheckExact(obj)) return false;
    const Tensor& t = THPVariable_Unpack(obj);
    return t.defined() && plain_keys(t);
  };
  if (!plain(args[0])) Py_RETURN_FALSE;
  const Py_ssize_t n = PyTuple_GET_SIZE(args[1]);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyTuple_GET_ITEM(args[1], i);
    if (obj != Py_None && !plain(obj)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef layer_methods[] = {
    {"plain_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_cpu)), METH_FASTCALL,
     "whether a call is plain eager on plain dense CPU tensors (csrc/layers.cpp)"},
    {"batch_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(batch_norm)), METH_FASTCALL,
     "BatchNorm layers' forward in one call (csrc/layers.cpp); None when not served"},
    {"group_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(group_norm)), METH_FASTCALL,
     "GroupNorm's forward in one call (csrc/layers.cpp); None when not served"},
    {"layer_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_norm)), METH_FASTCALL,
     "LayerNorm's forward in one call (csrc/layers.cpp); None when not served"},
    {"layer_norm_2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_norm_2d)), METH_FASTCALL,
     "LayerNorm2d's forward in one call (csrc/layers.cpp); None when not served"},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(rms_norm)), METH_FASTCALL,
     "RMSNorm's forward in one call (csrc/layers.cpp); None when not served"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace normkit
