// The element loops every family is made of, in the two loop orders:
//
// * span      — a contiguous run of values sharing one set of per-channel coefficients
//               (NCHW: one (n, c) row of S values);
// * position  — the C contiguous channels of one spatial position, coefficients per channel
//               (channels_last, and BatchNorm1d's (N, C)).
//
// Forward: y = act(x·a + b + r). Backward, with z = x·fa + fb + r the forward's pre-activation:
// dz = dy·act'(z), sums Σ dz and Σ dz·(x − m), and dx = p·dz + q·(x − m) + rr. `r` (residual)
// and `dz_out` may be null; the null checks sit outside the element loops (template flags), which
// stay branch-free.
//
// Every loop runs in explicit vectors of H = kHalfLanes<A> values (8 float or 4 double lanes), two at a time
// (the transcendental activations of float then take one AVX-512 call of 16 lanes where the CPU has it, act.h),
// its tail in partial vectors (vld_n / vst_n, common.h): a value gets the same bits in a body or a tail.
#pragma once

#include "common.h"

namespace normkit {

template <typename A> struct IVecOf {
  using I = typename std::conditional<sizeof(A) == 4, int32_t, int64_t>::type;
  typedef I type __attribute__((vector_size(32)));
};

// The kinds whose act or act' costs a vector function or a division (exp, erf, tanh, log1p; hardswish's and
// hardsigmoid's divisions by 3 and 6, which aten's formulas fix): a whole backward (channel_backward,
// group_backward) forms their dz once, in the sums pass, and keeps it for the dx pass (in dx's own memory for
// float/double, a float buffer for float16/bfloat16): one evaluation per value instead of two; and their float runs
// take act512's AVX-512 forms. ReLU, leaky ReLU and ReLU6 recompute dz (a compare and a select), cheaper than a
// pass over the kept values.
template <int ACT>
constexpr bool kKeepsGrad = !(ACT == kIdentity || ACT == kRelu || ACT == kLeakyRelu || ACT == kRelu6);

// Where a backward of a kKeepsGrad kind keeps dz between its passes: in dx's own memory when dx has the
// accumulation type (dx overwrites each value after its dz is read), else in `buffer`, allocated here in the
// statistics' dtype; nullptr for the other kinds
template <typename T, int ACT>
acc_t<T>* kept_grad_memory(const Tensor& x, T* dxp, Tensor& buffer) {
  if constexpr (!kKeepsGrad<ACT>) {
    return nullptr;
  } else if constexpr (std::is_same_v<T, acc_t<T>>) {
    return reinterpret_cast<acc_t<T>*>(dxp);
  } else {
    buffer = at::empty({x.numel()}, x.options().dtype(stat_type(x)));
    return buffer.data_ptr<acc_t<T>>();
  }
}

// The activations on a vector of H lanes (VecOf<A>): identity and ReLU as a select / a bit mask on the GCC
// vector; the others through act.h's at::vec forms (AVX2).
template <int ACT, typename A>
inline typename VecOf<A>::type vact_fwd(typename VecOf<A>::type z, A ap) {
  using V = typename VecOf<A>::type;
  if constexpr (ACT == kIdentity) {
    return z;
  } else if constexpr (ACT == kRelu) {
    const V zero = {};
    return z < zero ? zero : z;  // NaN passes through, as act_fwd
  } else {
    return from_vec<V, A>(act_fwd_v<ACT, A>(to_vec<A>(z), ap));
  }
}

template <int ACT, typename A>
inline typename VecOf<A>::type vact_bwd(typename VecOf<A>::type z, typename VecOf<A>::type g, A ap) {
  using V = typename VecOf<A>::type;
  using I = typename IVecOf<A>::type;
  if constexpr (ACT == kIdentity) {
    return g;
  } else if constexpr (ACT == kRelu) {
    const V zero = {};
    const I keep = ~(z <= zero);  // all ones unless z <= 0: keep_unless_clipped lane-wise
    return reinterpret_cast<V>(reinterpret_cast<I>(g) & keep);
  } else {
    return from_vec<V, A>(act_bwd_v<ACT, A>(to_vec<A>(z), to_vec<A>(g), ap));
  }
}

// act of two vectors (z0, z1 in place); g0, g1 ← g·act'(z) of two vectors (the piecewise-linear kinds; the others
// run over staged runs, act_run)
template <int ACT, typename A>
inline void vact_fwd2(typename VecOf<A>::type& z0, typename VecOf<A>::type& z1, A ap) {
  z0 = vact_fwd<ACT, A>(z0, ap);
  z1 = vact_fwd<ACT, A>(z1, ap);
}

template <int ACT, typename A>
inline void vact_bwd2(const typename VecOf<A>::type& z0, const typename VecOf<A>::type& z1,
                      typename VecOf<A>::type& g0, typename VecOf<A>::type& g1, A ap) {
  g0 = vact_bwd<ACT, A>(z0, g0, ap);
  g1 = vact_bwd<ACT, A>(z1, g1, ap);
}

// Values a staged run holds (2 KiB of float, 4 KiB of double: they stay in L1). The kKeepsGrad kinds run their
// activation over such runs: the loops write the pre-activations (and incoming gradients) of up to kRun values to
// a buffer, act_run / act_grad_run transform it in place — for float, one AVX-512 call a run where the CPU has it
// (an out-of-line call per vector pair cost more in spilled registers than it saved) — and the loops read it back.
// A multiple of 2H, so runs do not move a value's lane in the sums (pair_sums).
constexpr int64_t kRun = 512;

// z ← act(z) over n staged values
template <int ACT, typename A>
inline void act_run(A* z, int64_t n, A ap) {
#if NK_HAVE_ACT512
  if constexpr (std::is_same_v<A, float>) {
    if (act512_enabled()) {
      act512::fwd_run<ACT>(z, n, ap);
      return;
    }
  }
#endif
  constexpr int H = kHalfLanes<A>;
  int64_t i = 0;
  for (; i + H <= n; i += H) vst(z, i, vact_fwd<ACT, A>(vld(z, i), ap));
  if (i < n) vst_n(z, i, vact_fwd<ACT, A>(vld_n(z, i, static_cast<int>(n - i)), ap), static_cast<int>(n - i));
}

// g ← g·act'(z) over n staged values
template <int ACT, typename A>
inline void act_grad_run(const A* z, A* g, int64_t n, A ap) {
#if NK_HAVE_ACT512
  if constexpr (std::is_same_v<A, float>) {
    if (act512_enabled()) {
      act512::bwd_run<ACT>(z, g, n, ap);
      return;
    }
  }
#endif
  constexpr int H = kHalfLanes<A>;
  int64_t i = 0;
  for (; i + H <= n; i += H) vst(g, i, vact_bwd<ACT, A>(vld(z, i), vld(g, i), ap));
  if (i < n) {
    const int k = static_cast<int>(n - i);
    vst_n(g, i, vact_bwd<ACT, A>(vld_n(z, i, k), vld_n(g, i, k), ap), k);
  }
}

// vst bypassing the caches (a non-temporal store), for float and double at 32-byte aligned
// addresses (the caller checks); stream_fence() orders them before the pass returns.
#if defined(__AVX__)
template <typename T>
constexpr bool kCanStream = std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
template <typename T>
constexpr bool kCanStream = false;
#endif

template <typename T>
inline void vst_stream(T* p, int64_t i, vec_t<T> v) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    _mm256_stream_ps(p + i, f);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    __m256d f;
    std::memcpy(&f, &v, sizeof(f));
    _mm256_stream_pd(p + i, f);
    return;
  }
#endif
  vst(p, i, v);
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// The loops of one dtype T and activation kind ACT. An instance carries the activation's parameter (leaky ReLU's
// slope, ELU's alpha; unused by the other kinds) in the accumulation type, as aten's kernels convert it.
template <typename T, int ACT>
struct Loops {
  using A = acc_t<T>;
  using V = vec_t<T>;
  static constexpr int H = kHalfLanes<A>;

  A ap = A(0);

  Loops() = default;
  explicit Loops(double param) : ap(static_cast<A>(param)) {}

  // act / act' of two vectors (the piecewise-linear kinds; kKeepsGrad kinds go through the staged runs below)
  void act2(V& z0, V& z1) const { vact_fwd2<ACT, A>(z0, z1, ap); }
  void act_grad2(const V& z0, const V& z1, V& g0, V& g1) const { vact_bwd2<ACT, A>(z0, z1, g0, g1, ap); }

  // f(i, n0, n1) over [0, len): steps of two whole vectors (n0 = n1 = H), then one step for the rest
  // (n0 = min(H, rest), n1 = rest − n0, possibly 0)
  template <typename F>
  __attribute__((always_inline)) static void pair_steps(int64_t len, const F& f) {
    int64_t i = 0;
    for (; i + 2 * H <= len; i += 2 * H) f(i, H, H);
    if (i < len) {
      const int rest = static_cast<int>(len - i);
      const int n0 = std::min(H, rest);
      f(i, n0, rest - n0);
    }
  }

  // chunked_vsums (common.h) with the terms of two vectors a step, its tail in partial vectors too (a term may cost
  // an activation's vector function): fv(i, n0, n1, u0, v0, u1, v1) gives the terms of
  // [i, i + n0) and [i + H, i + H + n1). Blocks of kChunk values (a multiple of 2H), lanes a0 (first vector of
  // each step) and a1 (second), their tree (lane_total2), block totals in double, in order.
  template <typename FV>
  __attribute__((always_inline)) static void pair_sums(int64_t len, const FV& fv, double& s1, double& s2) {
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t c1 = std::min(len, c0 + kChunk);
      V a0 = {}, a1 = {}, q0 = {}, q1 = {};
      V u0, v0, u1, v1;
      int64_t i = c0;
      for (; i + 2 * H <= c1; i += 2 * H) {
        fv(i, H, H, u0, v0, u1, v1);
        a0 += u0;
        q0 += v0;
        a1 += u1;
        q1 += v1;
      }
      if (i < c1) {
        const int rest = static_cast<int>(c1 - i);
        const int n0 = std::min(H, rest), n1 = rest - n0;
        fv(i, n0, n1, u0, v0, u1, v1);
        a0 += first_lanes<A>(u0, n0);
        q0 += first_lanes<A>(v0, n0);
        if (n1 > 0) {
          a1 += first_lanes<A>(u1, n1);
          q1 += first_lanes<A>(v1, n1);
        }
      }
      s1 += static_cast<double>(lane_total2(a0, a1));
      s2 += static_cast<double>(lane_total2(q0, q1));
    }
  }

  // ------------------------------------------------------------------------- direct runs (float, AVX-512)
  // For float tensors on an AVX-512 CPU the kKeepsGrad kinds skip the staging: one AVX-512 call forms z from x
  // (and r), applies the activation and writes y, or dz = dy·act'(z) to g (act512::affine_fwd / affine_bwd) — the
  // staging's extra store and load of every value cost a quarter of a SiLU. Coefficients per value (a, b) or, with
  // a null, the scalars sa, sb. The same operations in the same order: the staged path's bits. False where it does
  // not apply (the caller stages).
  bool direct_fwd(const T* x, const T* r, T* y, int64_t n, const A* a, const A* b, A sa, A sb) const {
#if NK_HAVE_ACT512
    if constexpr (std::is_same_v<T, float> && kKeepsGrad<ACT>) {
      if (act512_enabled()) {
        if (a) {
          (r ? act512::affine_fwd<ACT, true, true> : act512::affine_fwd<ACT, true, false>)(x, r, y, n, a, b, sa, sb,
                                                                                          ap);
        } else {
          (r ? act512::affine_fwd<ACT, false, true> : act512::affine_fwd<ACT, false, false>)(x, r, y, n, a, b, sa,
                                                                                            sb, ap);
        }
        return true;
      }
    }
#endif
    return false;
  }

  bool direct_grad(const T* x, const T* r, const T* dy, A* g, int64_t n, const A* a, const A* b, A sa, A sb) const {
#if NK_HAVE_ACT512
    if constexpr (std::is_same_v<T, float> && kKeepsGrad<ACT>) {
      if (act512_enabled()) {
        if (a) {
          (r ? act512::affine_bwd<ACT, true, true> : act512::affine_bwd<ACT, true, false>)(x, r, dy, g, n, a, b, sa,
                                                                                          sb, ap);
        } else {
          (r ? act512::affine_bwd<ACT, false, true> : act512::affine_bwd<ACT, false, false>)(x, r, dy, g, n, a, b,
                                                                                            sa, sb, ap);
        }
        return true;
      }
    }
#endif
    return false;
  }

  // ------------------------------------------------------------------------- staged runs (kKeepsGrad kinds)
  // A run of n <= kRun values [i0, i0 + n): zf(i, k) gives the pre-activations of [i, i + k) (k <= H) as a vector,
  // staged, transformed by act_run, then handed to yf(i, k, y)
  template <typename ZF, typename YF>
  __attribute__((always_inline)) void run_act(int64_t i0, int64_t n, A* zb, const ZF& zf, const YF& yf) const {
    for (int64_t i = 0; i < n; i += H) {
      const int k = static_cast<int>(std::min<int64_t>(H, n - i));
      vst_n(zb, i, zf(i0 + i, k), k);
    }
    act_run<ACT, A>(zb, n, ap);
    for (int64_t i = 0; i < n; i += H) {
      const int k = static_cast<int>(std::min<int64_t>(H, n - i));
      yf(i0 + i, k, vld_n(zb, i, k));
    }
  }

  // g[0, n) ← dz of the run [i0, i0 + n): zf as run_act's, gf(i, k) the incoming gradient of [i, i + k)
  template <typename ZF, typename GF>
  __attribute__((always_inline)) void run_grad(int64_t i0, int64_t n, A* zb, A* g, const ZF& zf,
                                               const GF& gf) const {
    for (int64_t i = 0; i < n; i += H) {
      const int k = static_cast<int>(std::min<int64_t>(H, n - i));
      vst_n(zb, i, zf(i0 + i, k), k);
      vst_n(g, i, gf(i0 + i, k), k);
    }
    act_grad_run<ACT, A>(zb, g, n, ap);
  }

  // (s1, s2) += pair_sums of (g, g·(x − m)) over a span [0, len) whose dz the run's grad(r0, n, g) writes to g
  // (kept: gs + r0; else a stack buffer): run by run inside each kChunk block, the lanes as pair_sums adds them
  template <typename G>
  __attribute__((always_inline)) static void staged_sums(const T* x, int64_t len, A m, A* gs, A* gbuf, const G& grad,
                                                         double& s1, double& s2) {
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t c1 = std::min(len, c0 + kChunk);
      V a0 = {}, a1 = {}, q0 = {}, q1 = {};
      for (int64_t r0 = c0; r0 < c1; r0 += kRun) {
        const int64_t n = std::min(kRun, c1 - r0);
        A* g = gs ? gs + r0 : gbuf;
        grad(r0, n, g);
        const T* xr = x + r0;
        int64_t i = 0;
        for (; i + 2 * H <= n; i += 2 * H) {
          const V g0 = vld(g, i), g1 = vld(g, i + H);
          a0 += g0;
          q0 += g0 * (vld(xr, i) - m);
          a1 += g1;
          q1 += g1 * (vld(xr, i + H) - m);
        }
        if (i < n) {
          const int rest = static_cast<int>(n - i);
          const int n0 = std::min(H, rest), n1 = rest - n0;
          const V g0 = vld_n(g, i, n0);
          a0 += first_lanes<A>(g0, n0);
          q0 += first_lanes<A>(g0 * (vld_n(xr, i, n0) - m), n0);
          if (n1 > 0) {
            const V g1 = vld_n(g, i + H, n1);
            a1 += first_lanes<A>(g1, n1);
            q1 += first_lanes<A>(g1 * (vld_n(xr, i + H, n1) - m), n1);
          }
        }
      }
      s1 += static_cast<double>(lane_total2(a0, a1));
      s2 += static_cast<double>(lane_total2(q0, q1));
    }
  }

  // Runs over np positions of C channels (kKeepsGrad kinds): f(o, n, c0, npr) for the run of n values from value o,
  // either npr whole positions (c0 = 0; up to kRun / C of them) or, for C > kRun, one position's channels
  // [c0, c0 + n)
  template <typename F>
  __attribute__((always_inline)) static void position_runs(int64_t np, int64_t C, const F& f) {
    if (C <= kRun) {
      const int64_t R = kRun / C;
      for (int64_t p0 = 0; p0 < np; p0 += R) {
        const int64_t npr = std::min(R, np - p0);
        f(p0 * C, npr * C, int64_t(0), npr);
      }
    } else {
      for (int64_t s = 0; s < np; ++s) {
        for (int64_t c0 = 0; c0 < C; c0 += kRun) f(s * C + c0, std::min(kRun, C - c0), c0, int64_t(1));
      }
    }
  }

  // The per-value coefficients of position_runs' runs: `coef` repeated over kRun / C positions into `expanded`
  // (C <= kRun; returned), or coef itself (a run then starts at channel c0: the caller adds it)
  static const A* repeated(const A* coef, int64_t C, A* expanded) {
    if (C > kRun) return coef;
    for (int64_t j = 0; j + C <= kRun; j += C) std::copy(coef, coef + C, expanded + j);
    return expanded;
  }

  // ------------------------------------------------------------------------- span (NCHW)
  // (s1, s2) += (Σ (x − k), Σ (x − k)²): the shifted sums of one span, blocked (common.h).
  static void span_sums(const T* x, int64_t len, A k, double& s1, double& s2) {
    chunked_sums<A>(len, [&](int64_t i, A& u, A& v) {
      A d = ld(x, i) - k;
      u = d;
      v = d * d;
    }, s1, s2);
  }

  void span_apply(const T* x, const T* r, T* y, int64_t len, A a, A b) const {
    if constexpr (kKeepsGrad<ACT>) {
      if (direct_fwd(x, r, y, len, nullptr, nullptr, a, b)) return;
      alignas(64) A zb[kRun];
      for (int64_t r0 = 0; r0 < len; r0 += kRun) {
        run_act(r0, std::min(kRun, len - r0), zb, [&](int64_t i, int k) __attribute__((always_inline)) {
          V z = vld_n(x, i, k) * a + b;
          return r ? z + vld_n(r, i, k) : z;
        }, [&](int64_t i, int k, const V& yv) __attribute__((always_inline)) { vst_n(y, i, yv, k); });
      }
      return;
    }
    if (r) {
      span_apply_impl<true>(x, r, y, len, a, b);
    } else {
      span_apply_impl<false>(x, r, y, len, a, b);
    }
  }

  template <bool RES>
  void span_apply_impl(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, int64_t len, A a,
                       A b) const {
    pair_steps(len, [&](int64_t i, int n0, int n1) __attribute__((always_inline)) {
      V z0 = vld_n(x, i, n0) * a + b, z1 = vld_n(x, i + H, n1) * a + b;
      if constexpr (RES) {
        z0 = z0 + vld_n(r, i, n0);
        z1 = z1 + vld_n(r, i + H, n1);
      }
      act2(z0, z1);
      vst_n(y, i, z0, n0);
      vst_n(y, i + H, z1, n1);
    });
  }

  // y = act(x·a_i + b_i (+ r)) over a run of `len` values with a coefficient pair per value (NCHW BatchNorm's
  // blocks of channels of one sample: the run crosses channels, so a short map (3×3) does not end every few
  // values in a partial vector)
  void flat_apply(const T* x, const T* r, T* y, const A* a, const A* b, int64_t len) const {
    if constexpr (kKeepsGrad<ACT>) {
      if (direct_fwd(x, r, y, len, a, b, A(0), A(0))) return;
      alignas(64) A zb[kRun];
      for (int64_t r0 = 0; r0 < len; r0 += kRun) {
        run_act(r0, std::min(kRun, len - r0), zb, [&](int64_t i, int k) __attribute__((always_inline)) {
          V z = vld_n(x, i, k) * vld_n(a, i, k) + vld_n(b, i, k);
          return r ? z + vld_n(r, i, k) : z;
        }, [&](int64_t i, int k, const V& yv) __attribute__((always_inline)) { vst_n(y, i, yv, k); });
      }
      return;
    }
    if (r) {
      flat_apply_impl<true>(x, r, y, a, b, len);
    } else {
      flat_apply_impl<false>(x, r, y, a, b, len);
    }
  }

  template <bool RES>
  void flat_apply_impl(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, const A* __restrict__ a,
                       const A* __restrict__ b, int64_t len) const {
    pair_steps(len, [&](int64_t i, int n0, int n1) __attribute__((always_inline)) {
      V z0 = vld_n(x, i, n0) * vld_n(a, i, n0) + vld_n(b, i, n0);
      V z1 = vld_n(x, i + H, n1) * vld_n(a, i + H, n1) + vld_n(b, i + H, n1);
      if constexpr (RES) {
        z0 = z0 + vld_n(r, i, n0);
        z1 = z1 + vld_n(r, i + H, n1);
      }
      act2(z0, z1);
      vst_n(y, i, z0, n0);
      vst_n(y, i + H, z1, n1);
    });
  }

  // gs[i] = dy·act'(x·fa_i + fb_i (+ r)) over a run with a coefficient pair per value (flat_apply's backward)
  void flat_grad(const T* x, const T* dy, const T* r, const A* fa, const A* fb, int64_t len, A* gs) const {
    if constexpr (kKeepsGrad<ACT>) {
      if (direct_grad(x, r, dy, gs, len, fa, fb, A(0), A(0))) return;
      alignas(64) A zb[kRun];
      for (int64_t r0 = 0; r0 < len; r0 += kRun) {
        run_grad(r0, std::min(kRun, len - r0), zb, gs + r0, [&](int64_t i, int k) __attribute__((always_inline)) {
          V z = vld_n(x, i, k) * vld_n(fa, i, k) + vld_n(fb, i, k);
          return r ? z + vld_n(r, i, k) : z;
        }, [&](int64_t i, int k) __attribute__((always_inline)) { return vld_n(dy, i, k); });
      }
      return;
    }
    if (r) {
      flat_grad_impl<true>(x, dy, r, fa, fb, len, gs);
    } else {
      flat_grad_impl<false>(x, dy, r, fa, fb, len, gs);
    }
  }

  template <bool RES>
  void flat_grad_impl(const T* x, const T* dy, const T* r, const A* fa, const A* fb, int64_t len, A* gs) const {
    pair_steps(len, [&](int64_t i, int n0, int n1) __attribute__((always_inline)) {
      V z0 = vld_n(x, i, n0) * vld_n(fa, i, n0) + vld_n(fb, i, n0);
      V z1 = vld_n(x, i + H, n1) * vld_n(fa, i + H, n1) + vld_n(fb, i + H, n1);
      if constexpr (RES) {
        z0 = z0 + vld_n(r, i, n0);
        z1 = z1 + vld_n(r, i + H, n1);
      }
      V g0 = vld_n(dy, i, n0), g1 = vld_n(dy, i + H, n1);
      act_grad2(z0, z1, g0, g1);
      vst_n(gs, i, g0, n0);
      vst_n(gs, i + H, g1, n1);
    });
  }

  // dz of the two vectors at [i, i + n0) and [i + H, i + H + n1) of a span, z = x·fa + fb (+ r)
  template <bool RES>
  void span_grad2(const V& x0, const V& x1, const T* __restrict__ dy, const T* __restrict__ r, int64_t i, int n0,
                  int n1, A fa, A fb, V& g0, V& g1) const {
    g0 = vld_n(dy, i, n0);
    g1 = vld_n(dy, i + H, n1);
    if constexpr (ACT != kIdentity) {
      V z0 = x0 * fa + fb, z1 = x1 * fa + fb;
      if constexpr (RES) {
        z0 = z0 + vld_n(r, i, n0);
        z1 = z1 + vld_n(r, i + H, n1);
      }
      act_grad2(z0, z1, g0, g1);
    }
  }

  // (s1, s2) += (Σ dz, Σ dz·(x − m)); with gs, dz is kept there (kKeepsGrad kinds)
  void span_bwd_sums(const T* x, const T* dy, const T* r, int64_t len, A fa, A fb, A m, double& s1, double& s2,
                     A* gs = nullptr) const {
    if constexpr (ACT == kIdentity) {
      chunked_vsums<A>(len, [&](int64_t i, V& u, V& v) {
        const V g = vld(dy, i);
        u = g;
        v = g * (vld(x, i) - m);
      }, [&](int64_t i, A& u, A& v) {
        A g = ld(dy, i);
        u = g;
        v = g * (ld(x, i) - m);
      }, s1, s2);
    } else if constexpr (kKeepsGrad<ACT>) {
      alignas(64) A zb[kRun], gbuf[kRun];
      staged_sums(x, len, m, gs, gbuf, [&](int64_t r0, int64_t n, A* g) __attribute__((always_inline)) {
        if (direct_grad(x + r0, r ? r + r0 : nullptr, dy + r0, g, n, nullptr, nullptr, fa, fb)) return;
        run_grad(r0, n, zb, g, [&](int64_t i, int k) __attribute__((always_inline)) {
          V z = vld_n(x, i, k) * fa + fb;
          return r ? z + vld_n(r, i, k) : z;
        }, [&](int64_t i, int k) __attribute__((always_inline)) { return vld_n(dy, i, k); });
      }, s1, s2);
    } else if (r) {
      span_bwd_sums_impl<true>(x, dy, r, len, fa, fb, m, s1, s2, gs);
    } else {
      span_bwd_sums_impl<false>(x, dy, r, len, fa, fb, m, s1, s2, gs);
    }
  }

  template <bool RES>
  void span_bwd_sums_impl(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r, int64_t len,
                          A fa, A fb, A m, double& s1, double& s2, A* gs) const {
    pair_sums(len, [&](int64_t i, int n0, int n1, V& u0, V& v0, V& u1, V& v1) __attribute__((always_inline)) {
      const V x0 = vld_n(x, i, n0), x1 = vld_n(x, i + H, n1);
      V g0, g1;
      span_grad2<RES>(x0, x1, dy, r, i, n0, n1, fa, fb, g0, g1);
      if (gs) {
        vst_n(gs, i, g0, n0);
        vst_n(gs, i + H, g1, n1);
      }
      u0 = g0;
      v0 = g0 * (x0 - m);
      u1 = g1;
      v1 = g1 * (x1 - m);
    }, s1, s2);
  }

  // span_bwd_sums of a span whose dz was kept (flat_grad): the same terms in the same order, hence the same bits
  static void span_kept_sums(const T* x, const A* gs, int64_t len, A m, double& s1, double& s2) {
    staged_sums(x, len, m, const_cast<A*>(gs), nullptr, [](int64_t, int64_t, A*) {}, s1, s2);
  }

  // gs: the span's dz as span_bwd_sums / flat_grad kept it (then dy and r are not read; gs may be dx itself)
  void span_bwd_dx(const T* x, const T* dy, const T* r, T* dx, T* dz, int64_t len, A fa, A fb, A p, A q, A m,
                   A rr, const A* gs = nullptr) const {
    if (gs) {
      if (q == A(0) && rr == A(0)) {
        span_kept_dx<true>(x, gs, dx, dz, len, p, q, m, rr);
      } else {
        span_kept_dx<false>(x, gs, dx, dz, len, p, q, m, rr);
      }
    } else if constexpr (kKeepsGrad<ACT>) {
      alignas(64) A zb[kRun], g[kRun];
      const bool cnst = q == A(0) && rr == A(0);
      for (int64_t r0 = 0; r0 < len; r0 += kRun) {
        const int64_t n = std::min(kRun, len - r0);
        if (!direct_grad(x + r0, r ? r + r0 : nullptr, dy + r0, g, n, nullptr, nullptr, fa, fb)) {
          run_grad(r0, n, zb, g, [&](int64_t i, int k) __attribute__((always_inline)) {
            V z = vld_n(x, i, k) * fa + fb;
            return r ? z + vld_n(r, i, k) : z;
          }, [&](int64_t i, int k) __attribute__((always_inline)) { return vld_n(dy, i, k); });
        }
        if (cnst) {
          span_kept_dx<true>(x + r0, g, dx + r0, dz ? dz + r0 : nullptr, n, p, q, m, rr);
        } else {
          span_kept_dx<false>(x + r0, g, dx + r0, dz ? dz + r0 : nullptr, n, p, q, m, rr);
        }
      }
    } else if (q == A(0) && rr == A(0)) {
      if (r) {
        span_bwd_dx_impl<true, true>(x, dy, r, dx, dz, len, fa, fb, p, q, m, rr);
      } else {
        span_bwd_dx_impl<false, true>(x, dy, r, dx, dz, len, fa, fb, p, q, m, rr);
      }
    } else if (ACT == kIdentity && !dz) {
      span_dx(x, dy, dx, len, p, q, m, rr);
    } else if (ACT != kIdentity && r) {
      span_bwd_dx_impl<true, false>(x, dy, r, dx, dz, len, fa, fb, p, q, m, rr);
    } else {
      span_bwd_dx_impl<false, false>(x, dy, r, dx, dz, len, fa, fb, p, q, m, rr);
    }
  }

  // dz = dy·act'(z), dx = p·dz + q·(x − m) + rr (dz stored where asked for). CONST (q = rr = 0: eval, the
  // statistics were constants; or a channel whose sums vanish): dx = p·dz, x entering only through dz, as torch's
  // eval backward (dz·γ·rstd) — 0·(x − m) would carry a NaN or Inf of x into dx.
  template <bool RES, bool CONST>
  void span_bwd_dx_impl(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r,
                        T* __restrict__ dx, T* __restrict__ dz, int64_t len, A fa, A fb, A p, A q, A m, A rr) const {
    pair_steps(len, [&](int64_t i, int n0, int n1) __attribute__((always_inline)) {
      const V x0 = vld_n(x, i, n0), x1 = vld_n(x, i + H, n1);
      V g0, g1;
      span_grad2<RES>(x0, x1, dy, r, i, n0, n1, fa, fb, g0, g1);
      if constexpr (CONST) {
        vst_n(dx, i, p * g0, n0);
        vst_n(dx, i + H, p * g1, n1);
      } else {
        vst_n(dx, i, p * g0 + q * (x0 - m) + rr, n0);
        vst_n(dx, i + H, p * g1 + q * (x1 - m) + rr, n1);
      }
      if (dz) {
        vst_n(dz, i, g0, n0);
        vst_n(dz, i + H, g1, n1);
      }
    });
  }

  // span_bwd_dx_impl with the kept dz (no restrict: gs may be dx's own memory, each value read before it is
  // overwritten)
  template <bool CONST>
  static void span_kept_dx(const T* x, const A* gs, T* dx, T* dz, int64_t len, A p, A q, A m, A rr) {
    auto step = [&](int64_t i, int n) {
      const V g = vld_n(gs, i, n);
      if (dz) vst_n(dz, i, g, n);
      if constexpr (CONST) {
        vst_n(dx, i, p * g, n);
      } else {
        vst_n(dx, i, p * g + q * (vld_n(x, i, n) - m) + rr, n);
      }
    };
    int64_t i = 0;
    for (; i + H <= len; i += H) step(i, H);
    if (i < len) step(i, static_cast<int>(len - i));
  }

  // dx = p·dy + q·(x − m) + rr, vector loads (restrict: the stores cannot alias the loads)
  static void span_dx(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t len, A p, A q,
                      A m, A rr) {
    int64_t i = 0;
    for (; i + H <= len; i += H) vst(dx, i, p * vld(dy, i) + q * (vld(x, i) - m) + rr);
    for (; i < len; ++i) st(dx, i, p * ld(dy, i) + q * (ld(x, i) - m) + rr);
  }

  // ------------------------------------------------------------------------- positions (CL)
  // Each position's C channels run in vectors of H channels (explicit vectors, as span_dx: the
  // plain loops over ld/st stayed scalar — the per-channel accumulators and the outputs could
  // alias the inputs as far as the compiler knew — and the ReLU backward ran 2.5x slower than
  // the identity's), two at a time, the last ones in partial vectors. Each accumulator still adds the
  // positions in order.

  // a[c] += x − k[c], q[c] += (x − k[c])² over `np` positions of C channels starting at x.
  static void pos_sums(const T* __restrict__ x, int64_t np, int64_t C, const A* __restrict__ k, A* __restrict__ a,
                       A* __restrict__ q) {
    for (int64_t s = 0; s < np; ++s) {
      const T* xs = x + s * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        const V d = vld(xs, c) - vacc(k + c);
        vput(a + c, vacc(a + c) + d);
        vput(q + c, vacc(q + c) + d * d);
      }
      for (; c < C; ++c) {
        A d = ld(xs, c) - k[c];
        a[c] += d;
        q[c] += d * d;
      }
    }
  }

  void pos_apply(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, int64_t np, int64_t C,
                 const A* __restrict__ a, const A* __restrict__ b, bool stream = false) const {
    if constexpr (kKeepsGrad<ACT>) {
      if (stream && kCanStream<T> && streamable(y, C)) {
        pos_apply_staged<true>(x, r, y, np, C, a, b);
        stream_fence();
      } else {
        pos_apply_staged<false>(x, r, y, np, C, a, b);
      }
      return;
    }
    if constexpr (kCanStream<T>) {
      if (stream && streamable(y, C)) {
        if (r) {
          pos_apply_impl<true, true>(x, r, y, np, C, a, b);
        } else {
          pos_apply_impl<false, true>(x, r, y, np, C, a, b);
        }
        stream_fence();
        return;
      }
    }
    if (r) {
      pos_apply_impl<true>(x, r, y, np, C, a, b);
    } else {
      pos_apply_impl<false>(x, r, y, np, C, a, b);
    }
  }

  template <bool NT>
  void pos_apply_staged(const T* x, const T* r, T* y, int64_t np, int64_t C, const A* a, const A* b) const {
    alignas(64) A zb[kRun], ea[kRun], eb[kRun];
    const A* ca = repeated(a, C, ea);
    const A* cb = repeated(b, C, eb);
    position_runs(np, C, [&](int64_t o, int64_t n, int64_t c0, int64_t) __attribute__((always_inline)) {
      if (!NT && direct_fwd(x + o, r ? r + o : nullptr, y + o, n, ca + c0, cb + c0, A(0), A(0))) return;
      run_act(0, n, zb, [&](int64_t i, int k) __attribute__((always_inline)) {
        V z = vld_n(x + o, i, k) * vld_n(ca + c0, i, k) + vld_n(cb + c0, i, k);
        return r ? z + vld_n(r + o, i, k) : z;
      }, [&](int64_t i, int k, const V& yv) __attribute__((always_inline)) { put<NT>(y + o, i, yv, k); });
    });
  }

  // y 32-byte aligned and whole vectors per position: every vector store may bypass the cache
  static bool streamable(const T* y, int64_t C) {
    return C % H == 0 && reinterpret_cast<uintptr_t>(y) % 32 == 0;
  }

  // n values of v at p + i; NT: bypassing the caches (only ever whole vectors: streamable())
  template <bool NT>
  static void put(T* p, int64_t i, const V& v, int n) {
    if constexpr (NT) {
      if (n == H) vst_stream(p, i, v);
    } else {
      vst_n(p, i, v, n);
    }
  }

  template <bool RES, bool NT = false>
  void pos_apply_impl(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, int64_t np, int64_t C,
                      const A* __restrict__ a, const A* __restrict__ b) const {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      pair_steps(C, [&](int64_t c, int n0, int n1) __attribute__((always_inline)) {
        V z0 = vld_n(x + o, c, n0) * vld_n(a, c, n0) + vld_n(b, c, n0);
        V z1 = vld_n(x + o, c + H, n1) * vld_n(a, c + H, n1) + vld_n(b, c + H, n1);
        if constexpr (RES) {
          z0 = z0 + vld_n(r + o, c, n0);
          z1 = z1 + vld_n(r + o, c + H, n1);
        }
        act2(z0, z1);
        put<NT>(y + o, c, z0, n0);
        put<NT>(y + o, c + H, z1, n1);
      });
    }
  }

  // dy·act'(z) at channels [c, c + n0) and [c + H, c + H + n1) of the position starting at o, z = x·fa + fb (+ r):
  // the gradient through the activation, shared by the backward's sums and dx passes
  template <bool RES>
  void vgrad2(const V& x0, const V& x1, const T* __restrict__ dy, const T* __restrict__ r, int64_t o, int64_t c,
              int n0, int n1, const A* __restrict__ fa, const A* __restrict__ fb, V& g0, V& g1) const {
    g0 = vld_n(dy + o, c, n0);
    g1 = vld_n(dy + o, c + H, n1);
    if constexpr (ACT != kIdentity) {
      V z0 = x0 * vld_n(fa, c, n0) + vld_n(fb, c, n0);
      V z1 = x1 * vld_n(fa, c + H, n1) + vld_n(fb, c + H, n1);
      if constexpr (RES) {
        z0 = z0 + vld_n(r + o, c, n0);
        z1 = z1 + vld_n(r + o, c + H, n1);
      }
      act_grad2(z0, z1, g0, g1);
    }
  }

  // a[c] += dz, q[c] += dz·(x − m[c]); with gs, dz is kept there (at the positions' offsets)
  void pos_bwd_sums(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r, int64_t np,
                    int64_t C, const A* __restrict__ fa, const A* __restrict__ fb, const A* __restrict__ m,
                    A* __restrict__ a, A* __restrict__ q, A* gs = nullptr) const {
    if constexpr (kKeepsGrad<ACT>) {
      pos_bwd_sums_staged(x, dy, r, np, C, fa, fb, m, a, q, gs);
      return;
    }
    if (ACT != kIdentity && r) {
      pos_bwd_sums_impl<true>(x, dy, r, np, C, fa, fb, m, a, q, gs);
    } else {
      pos_bwd_sums_impl<false>(x, dy, r, np, C, fa, fb, m, a, q, gs);
    }
  }

  template <bool RES>
  void pos_bwd_sums_impl(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r, int64_t np,
                         int64_t C, const A* __restrict__ fa, const A* __restrict__ fb, const A* __restrict__ m,
                         A* __restrict__ a, A* __restrict__ q, A* gs) const {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      pair_steps(C, [&](int64_t c, int n0, int n1) __attribute__((always_inline)) {
        const V x0 = vld_n(x + o, c, n0), x1 = vld_n(x + o, c + H, n1);
        V g0, g1;
        vgrad2<RES>(x0, x1, dy, r, o, c, n0, n1, fa, fb, g0, g1);
        if (gs) {
          vst_n(gs + o, c, g0, n0);
          vst_n(gs + o, c + H, g1, n1);
        }
        vst_n(a, c, vld_n(a, c, n0) + g0, n0);
        vst_n(q, c, vld_n(q, c, n0) + g0 * (x0 - vld_n(m, c, n0)), n0);
        if (n1 > 0) {
          vst_n(a, c + H, vld_n(a, c + H, n1) + g1, n1);
          vst_n(q, c + H, vld_n(q, c + H, n1) + g1 * (x1 - vld_n(m, c + H, n1)), n1);
        }
      });
    }
  }

  // dz of each run staged (in gs when kept, else a stack buffer), then added position by position, each accumulator
  // in position order
  void pos_bwd_sums_staged(const T* x, const T* dy, const T* r, int64_t np, int64_t C, const A* fa, const A* fb,
                           const A* m, A* a, A* q, A* gs) const {
    alignas(64) A zb[kRun], gbuf[kRun], ea[kRun], eb[kRun];
    const A* ca = repeated(fa, C, ea);
    const A* cb = repeated(fb, C, eb);
    position_runs(np, C, [&](int64_t o, int64_t n, int64_t c0, int64_t npr) __attribute__((always_inline)) {
      A* g = gs ? gs + o : gbuf;
      if (!direct_grad(x + o, r ? r + o : nullptr, dy + o, g, n, ca + c0, cb + c0, A(0), A(0))) {
        run_grad(0, n, zb, g, [&](int64_t i, int k) __attribute__((always_inline)) {
          V z = vld_n(x + o, i, k) * vld_n(ca + c0, i, k) + vld_n(cb + c0, i, k);
          return r ? z + vld_n(r + o, i, k) : z;
        }, [&](int64_t i, int k) __attribute__((always_inline)) { return vld_n(dy + o, i, k); });
      }
      const int64_t width = n / npr;  // the channels of each position in the run
      for (int64_t j = 0; j < npr; ++j) {
        const A* gj = g + j * width;
        const T* xj = x + o + j * width;
        for (int64_t c = 0; c < width; c += H) {
          const int k = static_cast<int>(std::min<int64_t>(H, width - c));
          const V gv = vld_n(gj, c, k);
          A* ac = a + c0 + c;
          A* qc = q + c0 + c;
          vst_n(ac, 0, vld_n(ac, 0, k) + gv, k);
          vst_n(qc, 0, vld_n(qc, 0, k) + gv * (vld_n(xj, c, k) - vld_n(m + c0, c, k)), k);
        }
      }
    });
  }

  void pos_bwd_dx(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r, T* __restrict__ dx,
                  T* __restrict__ dz, int64_t np, int64_t C, const A* __restrict__ fa, const A* __restrict__ fb,
                  const A* __restrict__ p, const A* __restrict__ q, const A* __restrict__ m, const A* __restrict__ rr,
                  bool stream = false, const A* gs = nullptr) const {
    const bool cnst = std::all_of(q, q + C, [](A v) { return v == A(0); }) &&
                      std::all_of(rr, rr + C, [](A v) { return v == A(0); });
    if (gs) {  // the dz pos_bwd_sums kept (gs may be dx's own memory: no restrict, no streaming)
      pos_kept_dx(x, gs, dx, dz, np, C, p, q, m, rr, cnst);
      return;
    }
    if constexpr (kKeepsGrad<ACT>) {  // dz of each run staged, then dx from it
      alignas(64) A zb[kRun], g[kRun], ea[kRun], eb[kRun];
      const A* ca = repeated(fa, C, ea);
      const A* cb = repeated(fb, C, eb);
      position_runs(np, C, [&](int64_t o, int64_t n, int64_t c0, int64_t npr) __attribute__((always_inline)) {
        if (!direct_grad(x + o, r ? r + o : nullptr, dy + o, g, n, ca + c0, cb + c0, A(0), A(0))) {
          run_grad(0, n, zb, g, [&](int64_t i, int k) __attribute__((always_inline)) {
            V z = vld_n(x + o, i, k) * vld_n(ca + c0, i, k) + vld_n(cb + c0, i, k);
            return r ? z + vld_n(r + o, i, k) : z;
          }, [&](int64_t i, int k) __attribute__((always_inline)) { return vld_n(dy + o, i, k); });
        }
        pos_kept_dx(x + o, g, dx + o, dz ? dz + o : nullptr, npr, n / npr, p + c0, q + c0, m + c0, rr + c0, cnst);
      });
      return;
    }
    const bool res = ACT != kIdentity && r;
    if (cnst) {
      if (res) {
        pos_bwd_dx_impl<true, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
      } else {
        pos_bwd_dx_impl<false, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
      }
      return;
    }
    if constexpr (kCanStream<T>) {
      if (stream && !dz && streamable(dx, C)) {
        if (res) {
          pos_bwd_dx_impl<true, false, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
        } else {
          pos_bwd_dx_impl<false, false, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
        }
        stream_fence();
        return;
      }
    }
    if (res) {
      pos_bwd_dx_impl<true, false>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    } else {
      pos_bwd_dx_impl<false, false>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    }
  }

  // dx = p·dz + q·(x − m) + rr from the kept dz (cnst: dx = p·dz)
  static void pos_kept_dx(const T* x, const A* gs, T* dx, T* dz, int64_t np, int64_t C, const A* p, const A* q,
                          const A* m, const A* rr, bool cnst) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      for (int64_t c = 0; c < C; c += H) {
        const int n = static_cast<int>(std::min<int64_t>(H, C - c));
        const V g = vld_n(gs + o, c, n);
        if (dz) vst_n(dz + o, c, g, n);
        V d = vld_n(p, c, n) * g;
        if (!cnst) d = d + vld_n(q, c, n) * (vld_n(x + o, c, n) - vld_n(m, c, n)) + vld_n(rr, c, n);
        vst_n(dx + o, c, d, n);
      }
    }
  }

  // dz = dy·act'(x·fa + fb + r) (ACT == kIdentity: dy, r unused), dx = p·dz + q·(x − m) + rr (CONST, the
  // constant-statistics case of span_bwd_dx_impl: dx = p·dz), dz stored where asked for
  template <bool RES, bool CONST, bool NT = false>
  void pos_bwd_dx_impl(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r,
                       T* __restrict__ dx, T* __restrict__ dz, int64_t np, int64_t C, const A* __restrict__ fa,
                       const A* __restrict__ fb, const A* __restrict__ p, const A* __restrict__ q,
                       const A* __restrict__ m, const A* __restrict__ rr) const {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      pair_steps(C, [&](int64_t c, int n0, int n1) __attribute__((always_inline)) {
        const V x0 = vld_n(x + o, c, n0), x1 = vld_n(x + o, c + H, n1);
        V g0, g1;
        vgrad2<RES>(x0, x1, dy, r, o, c, n0, n1, fa, fb, g0, g1);
        V d0 = vld_n(p, c, n0) * g0, d1 = vld_n(p, c + H, n1) * g1;
        if constexpr (!CONST) {
          d0 = d0 + vld_n(q, c, n0) * (x0 - vld_n(m, c, n0)) + vld_n(rr, c, n0);
          d1 = d1 + vld_n(q, c + H, n1) * (x1 - vld_n(m, c + H, n1)) + vld_n(rr, c + H, n1);
        }
        put<NT>(dx + o, c, d0, n0);
        put<NT>(dx + o, c + H, d1, n1);
        if (dz) {
          vst_n(dz + o, c, g0, n0);
          vst_n(dz + o, c + H, g1, n1);
        }
      });
    }
  }
};

}  // namespace normkit
