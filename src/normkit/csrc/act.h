// The fused activations of the C++ kernels: their codes, and their forward and backward on a vector of lanes.
//
// An activation travels through every operator as one int64 `act` code (normkit.activations.code): the kind in
// the low 8 bits and, for the kinds with a parameter (leaky ReLU's negative_slope, ELU's alpha), the parameter as
// an exact decimal m·10^−k, k in bits 8..11 and the signed integer m in bits 12..63. Decoded here as
// m / 10^k (both exact doubles, the division correctly rounded): the very double of the Python float the act
// string names, so the parameter reaches the kernels exactly as torch's module holds it.
//
//   kind  name          act(z)                                  act'(z)·g (torch's backward kernel, its order)
//   0     identity      z                                       g
//   1     relu          max(z, 0), NaN passes                   g unless z <= 0 (a NaN passes g on)
//   2     silu          z / (1 + e^{−z})                        g·s·(1 + z·(1 − s)),  s = 1/(1 + e^{−z})
//   3     gelu          z·½·(1 + erf(z/√2))                     g·(½(1 + erf(z/√2)) + z·e^{−z²/2}/√(2π))
//   4     gelu_tanh     ½z·(1 + tanh(β(z + κz³)))               g·(½(1 + t) + ½z·(1 − t²)·β(1 + 3κz²))
//   5     hardswish     z·min(max(z + 3, 0), 6)/6               0 if z < −3, g if z >= 3, else g·(z/3 + ½)
//   6     leaky_relu    z if z > 0 else z·slope                 g if z > 0 else g·slope
//   7     relu6         min(max(z, 0), 6)                       g if 0 < z < 6 else 0
//   8     hardsigmoid   min(max(z + 3, 0), 6)/6                 g·(1/6) if −3 < z < 3 else 0
//   9     mish          z·tanh(log1p(e^z))                      g·(t + z·s·(1 − t²)),  t = tanh(log1p(e^z))
//   10    elu           z if z > 0 else (e^z − 1)·alpha         g if z > 0 else g·alpha·e^z
//   11    tanh          tanh(z)                                 g·(1 − y²),  y = tanh(z)
//   12    sigmoid       1/(1 + e^{−z})                          g·(1 − y)·y, y = σ(z)
//
// The vector forms are aten's own CPU activation kernels (ATen/native/cpu/Activation.cpp, UnaryOpsKernel.cpp):
// at::vec::Vectorized's exp, erf, tanh and log1p (Sleef) in the same order of operations, so values are
// torch's to rounding (aten's float GELU runs oneDNN's erf on contiguous input, a few ulps away; the vector
// semantics of aten are kept for NaN: relu6's and hardsigmoid's gradient at a NaN is 0, hardswish's NaN, as
// torch gives on all but a tensor's last few elements). The scalar forms evaluate the same vector function on a
// broadcast value, so an element gets the same bits wherever it sits (a vector body or a tail).
#pragma once

// The vector library in its AVX2 form where the kernels are compiled with AVX2 (at::vec selects the
// implementation by CPU_CAPABILITY_*; torch's own build compiles each kernel file once per capability). The
// inline namespace gets a name of its own, so these inline functions never meet torch's copies.
#if defined(__AVX2__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX2
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY normkit_vec
#endif
#include <type_traits>
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // the headers' `#pragma unroll` (a CUDA/clang pragma)
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#if defined(__AVX2__)
static_assert(std::is_constructible_v<at::vec::Vectorized<float>, __m256>,
              "normkit: at::vec was included before act.h without CPU_CAPABILITY_AVX2 (its scalar fallback)");
#endif

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "act_code.h"

namespace normkit {

// ----------------------------------------------------------------------------- vector math
// GCC vectors of 32 bytes (VecOf<A>::type: 8 float or 4 double lanes, common.h) in and out; at::vec's
// Vectorized<A> (the same 32 bytes under AVX2) inside.
template <typename A> using VecA = at::vec::Vectorized<A>;

template <typename A, typename V>
inline VecA<A> to_vec(const V& v) {
  static_assert(sizeof(V) == VecA<A>::size() * sizeof(A), "normkit: vector widths differ");
  return VecA<A>::loadu(&v);
}

template <typename V, typename A>
inline V from_vec(const VecA<A>& v) {
  V out;
  v.store(&out);
  return out;
}

template <typename A> constexpr A kSqrt1_2 = A(0.70710678118654752440);                  // M_SQRT1_2
template <typename A> constexpr A kGeluBeta = A(1.41421356237309504880 * 1.12837916709551257390 * 0.5);  // √2·2/√π·½
template <typename A> constexpr A kGeluPdf = A(1.12837916709551257390 * 0.70710678118654752440 * 0.5);   // 1/√(2π)
template <typename A> constexpr A kKappa = A(0.044715);

template <typename A> inline VecA<A> vmin(const VecA<A>& a, const VecA<A>& b) { return at::vec::minimum(a, b); }
template <typename A> inline VecA<A> vmax(const VecA<A>& a, const VecA<A>& b) { return at::vec::maximum(a, b); }
template <typename A> inline VecA<A> vfma(const VecA<A>& a, const VecA<A>& b, const VecA<A>& c) {
  return at::vec::fmadd(a, b, c);
}

#define NK_ACT_ATTR
#include "act_math.inc"
#undef NK_ACT_ATTR

template <int K, typename A>
inline VecA<A> act_fwd_v(const VecA<A>& z, A ap) {
  return act_fwd_w<K>(z, ap);
}

template <int K, typename A>
inline VecA<A> act_bwd_v(const VecA<A>& z, const VecA<A>& g, A ap) {
  return act_bwd_w<K>(z, g, ap);
}

}  // namespace normkit

// ----------------------------------------------------------------------------- AVX-512 (float)
// torch runs its activation kernels in AVX-512 where the CPU has it (CPU capability AVX512), twice the lanes of
// the kernels' AVX2 build: on such a CPU the float forms of the transcendental kinds (kKeepsGrad, loops.h) run
// here, 16 lanes a vector over the runs of values the loops stage, chosen at run time (act512_enabled). The same
// formulas (act_math.inc) on a 16-lane float vector whose exp, tanh and log1p are Sleef's AVX-512 functions
// (torch's own) and whose erf is aten's AVX-512 erf; compiled under a target pragma, so the rest of the
// translation unit stays AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__AVX2__)
#define NK_HAVE_ACT512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl")
#include <immintrin.h>
extern "C" {
__m512 Sleef_expf16_u10(__m512);
__m512 Sleef_tanhf16_u10(__m512);
__m512 Sleef_log1pf16_u10(__m512);
}

namespace normkit {
namespace act512 {

#define NK_ACT_ATTR __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// 16 float lanes with the interface of at::vec::Vectorized<float> that act_math.inc uses; comparisons give
// all-ones lanes, as at::vec's
struct F16 {
  __m512 v;
  F16() = default;
  F16(__m512 x) : v(x) {}
  explicit F16(float s) : v(_mm512_set1_ps(s)) {}
  F16 operator+(const F16& b) const { return _mm512_add_ps(v, b.v); }
  F16 operator-(const F16& b) const { return _mm512_sub_ps(v, b.v); }
  F16 operator*(const F16& b) const { return _mm512_mul_ps(v, b.v); }
  F16 operator/(const F16& b) const { return _mm512_div_ps(v, b.v); }
  F16 operator&(const F16& b) const { return _mm512_and_ps(v, b.v); }
  static F16 lanes(__mmask16 m) { return _mm512_castsi512_ps(_mm512_movm_epi32(m)); }
  F16 operator<(const F16& b) const { return lanes(_mm512_cmp_ps_mask(v, b.v, _CMP_LT_OQ)); }
  F16 operator<=(const F16& b) const { return lanes(_mm512_cmp_ps_mask(v, b.v, _CMP_LE_OQ)); }
  F16 operator>(const F16& b) const { return lanes(_mm512_cmp_ps_mask(v, b.v, _CMP_GT_OQ)); }
  F16 operator>=(const F16& b) const { return lanes(_mm512_cmp_ps_mask(v, b.v, _CMP_GE_OQ)); }
  static F16 blendv(const F16& a, const F16& b, const F16& mask) {  // b where mask, as at::vec
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(mask.v)), a.v, b.v);
  }
  F16 neg() const { return _mm512_xor_ps(_mm512_set1_ps(-0.f), v); }
  F16 reciprocal() const { return _mm512_div_ps(_mm512_set1_ps(1.f), v); }
  F16 exp() const { return Sleef_expf16_u10(v); }
  F16 tanh() const { return Sleef_tanhf16_u10(v); }
  F16 log1p() const { return Sleef_log1pf16_u10(v); }
  // aten's AVX-512 Vectorized<float>::erf (Abramowitz & Stegun 7.1.26 with Sleef's exp), step for step
  F16 erf() const {
    const __m512 neg_zero = _mm512_set1_ps(-0.f), one = _mm512_set1_ps(1.0f);
    const __m512 sign_mask = _mm512_and_ps(neg_zero, v);
    const __m512 abs_v = _mm512_abs_ps(v);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), abs_v, one));
    const __m512 t1 = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    const __m512 t2 = _mm512_fmadd_ps(t1, t, _mm512_set1_ps(1.421413741f));
    const __m512 t3 = _mm512_fmadd_ps(t2, t, _mm512_set1_ps(-0.284496736f));
    const __m512 r = _mm512_fmadd_ps(t3, t, _mm512_set1_ps(0.254829592f));
    const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(neg_zero, _mm512_mul_ps(v, v)));
    const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_xor_ps(neg_zero, e), t), r, one);
    return _mm512_xor_ps(sign_mask, y);
  }
};

// at::vec::minimum / maximum: a NaN in either operand gives a NaN (all ones)
inline F16 vmin(const F16& a, const F16& b) {
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_min_ps(a.v, b.v), nan, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
}
inline F16 vmax(const F16& a, const F16& b) {
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), nan, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
}
inline F16 vfma(const F16& a, const F16& b, const F16& c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }

#include "act_math.inc"

// A run of n floats in place: z ← act(z); g ← g·act'(z). Out of line (the AVX2 callers pass memory, not 512-bit
// registers), one call per run of values the loops stage (loops.h), so the call costs little per value.
template <int K>
NK_ACT_ATTR __attribute__((noinline)) void fwd_run(float* z, int64_t n, float ap) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(z + i, act_fwd_w<K>(F16(_mm512_loadu_ps(z + i)), ap).v);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(z + i, m, act_fwd_w<K>(F16(_mm512_maskz_loadu_ps(m, z + i)), ap).v);
  }
}

template <int K>
NK_ACT_ATTR __attribute__((noinline)) void bwd_run(const float* z, float* g, int64_t n, float ap) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(g + i, act_bwd_w<K>(F16(_mm512_loadu_ps(z + i)), F16(_mm512_loadu_ps(g + i)), ap).v);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const F16 zv = _mm512_maskz_loadu_ps(m, z + i), gv = _mm512_maskz_loadu_ps(m, g + i);
    _mm512_mask_storeu_ps(g + i, m, act_bwd_w<K>(zv, gv, ap).v);
  }
}

// A run read straight from float tensors, no staging: z = x·a + b (+ r) with per-value coefficients a, b (ARR) or the
// scalars sa, sb — a product and two sums, each rounded, as the AVX2 loops form z — then y = act(z), or g = dy·act'(z)
// (g may be the kept-gradient buffer). The last vector masked.
template <int K, bool ARR, bool RES>
NK_ACT_ATTR inline __m512 affine_z(const float* x, const float* r, const float* a, const float* b, const __m512& va,
                                   const __m512& vb, int64_t i, __mmask16 m) {
  __m512 z = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), ARR ? _mm512_maskz_loadu_ps(m, a + i) : va);
  z = _mm512_add_ps(z, ARR ? _mm512_maskz_loadu_ps(m, b + i) : vb);
  if constexpr (RES) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(m, r + i));
  return z;
}

NK_ACT_ATTR inline __mmask16 lanes_left(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

template <int K, bool ARR, bool RES>
NK_ACT_ATTR __attribute__((noinline)) void affine_fwd(const float* x, const float* r, float* y, int64_t n,
                                                      const float* a, const float* b, float sa, float sb, float ap) {
  const __m512 va = _mm512_set1_ps(sa), vb = _mm512_set1_ps(sb);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_left(n - i);
    const F16 z = affine_z<K, ARR, RES>(x, r, a, b, va, vb, i, m);
    _mm512_mask_storeu_ps(y + i, m, act_fwd_w<K>(z, ap).v);
  }
}

template <int K, bool ARR, bool RES>
NK_ACT_ATTR __attribute__((noinline)) void affine_bwd(const float* x, const float* r, const float* dy, float* g,
                                                      int64_t n, const float* a, const float* b, float sa, float sb,
                                                      float ap) {
  const __m512 va = _mm512_set1_ps(sa), vb = _mm512_set1_ps(sb);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_left(n - i);
    const F16 z = affine_z<K, ARR, RES>(x, r, a, b, va, vb, i, m);
    _mm512_mask_storeu_ps(g + i, m, act_bwd_w<K>(z, F16(_mm512_maskz_loadu_ps(m, dy + i)), ap).v);
  }
}

#undef NK_ACT_ATTR

}  // namespace act512
}  // namespace normkit
#pragma GCC pop_options
#else
#define NK_HAVE_ACT512 0
#endif

namespace normkit {

// Whether the float activations run in AVX-512 (act512): the CPU has AVX-512 F/DQ/BW/VL and the environment does
// not say NORMKIT_AVX512=0 (read once; the tests run both paths). Results are bit-identical run to run and for
// any thread count either way; the two paths differ in the last bit of some exp/tanh values (Sleef's AVX2 and
// AVX-512 functions), as torch's own results do between CPUs.
inline bool act512_enabled() {
#if NK_HAVE_ACT512
  static const bool enabled = [] {
    const char* env = std::getenv("NORMKIT_AVX512");
    if (env != nullptr && env[0] == '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return enabled;
#else
  return false;
#endif
}

// ReLU's backward one value at a time, as a bit mask (the select `z <= 0 ? 0 : g` kept the lane loops of
// chunked_sums from vectorising): g unless z <= 0, where it is +0; a NaN z passes g on.
template <typename A>
inline A keep_unless_clipped(A z, A g) {
  using U = typename std::conditional<sizeof(A) == 4, uint32_t, uint64_t>::type;
  U bits;
  std::memcpy(&bits, &g, sizeof(A));
  bits &= U(0) - static_cast<U>(!(z <= A(0)));
  A out;
  std::memcpy(&out, &bits, sizeof(A));
  return out;
}

// One value: identity and ReLU directly, the others as lane 0 of the vector form (the same bits as any lane)
template <int K, typename A>
inline A act_fwd(A z, A ap = A(0)) {
  if constexpr (K == kIdentity) {
    return z;
  } else if constexpr (K == kRelu) {
    return z < A(0) ? A(0) : z;
  } else {
    A out[VecA<A>::size()];
    act_fwd_v<K, A>(VecA<A>(z), ap).store(out);
    return out[0];
  }
}

template <int K, typename A>
inline A act_bwd(A z, A g, A ap = A(0)) {
  if constexpr (K == kIdentity) {
    return g;
  } else if constexpr (K == kRelu) {
    return keep_unless_clipped(z, g);
  } else {
    A out[VecA<A>::size()];
    act_bwd_v<K, A>(VecA<A>(z), VecA<A>(g), ap).store(out);
    return out[0];
  }
}

}  // namespace normkit

// Dispatch on the activation code: fn<T, KIND>(args..., param) with the decoded parameter last (T: the
// dtype of NK_DISPATCH_T).
#define NK_ACT_CASE(k, fn, p, ...) \
  case k: return fn<T, k>(__VA_ARGS__, p);
#define NK_ACT_CALL(act, fn, ...)                                                                 \
  {                                                                                               \
    const ::normkit::ActCode nk_ac_ = ::normkit::decode_act(act);                                 \
    const double nk_p_ = nk_ac_.param;                                                            \
    switch (nk_ac_.kind) {                                                                        \
      NK_ACT_CASE(0, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(1, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(2, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(3, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(4, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(5, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(6, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(7, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(8, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(9, fn, nk_p_, __VA_ARGS__)                                                      \
      NK_ACT_CASE(10, fn, nk_p_, __VA_ARGS__)                                                     \
      NK_ACT_CASE(11, fn, nk_p_, __VA_ARGS__)                                                     \
      NK_ACT_CASE(12, fn, nk_p_, __VA_ARGS__)                                                     \
      default: TORCH_CHECK_VALUE(false, "normkit cpu backend: unknown activation code ", act);    \
    }                                                                                             \
  }
