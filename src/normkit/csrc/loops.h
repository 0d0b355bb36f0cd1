// The element loops every family is made of, in the two loop orders:
//
// * span      — a contiguous run of values sharing one set of per-channel coefficients
//               (NCHW: one (n, c) row of S values);
// * position  — the C contiguous channels of one spatial position, coefficients per channel
//               (channels_last, and BatchNorm1d's (N, C)).
//
// Forward: y = act(x·a + b + r). Backward, with z = x·fa + fb + r the forward's pre-activation:
// dz = dy·act'(z), sums Σ dz and Σ dz·(x − m), and dx = p·dz + q·(x − m) + rr. `r` (residual)
// and `dz_out` may be null; the null checks sit outside the element loops, which the compiler
// then keeps branch-free and vectorises (check with -fopt-info-vec).
#pragma once

#include "common.h"

namespace normkit {

// The activations on a vector of H lanes (VecOf<A>), lane for lane the values of act_fwd and
// act_bwd: ReLU as a select / a bit mask, which vectorise; SiLU and GELU call the scalar forms.
template <typename A> struct IVecOf {
  using I = typename std::conditional<sizeof(A) == 4, int32_t, int64_t>::type;
  typedef I type __attribute__((vector_size(32)));
};

template <int ACT, typename A>
inline typename VecOf<A>::type vact_fwd(typename VecOf<A>::type z) {
  using V = typename VecOf<A>::type;
  if constexpr (ACT == kIdentity) {
    return z;
  } else if constexpr (ACT == kRelu) {
    const V zero = {};
    return z < zero ? zero : z;  // NaN passes through, as act_fwd
  } else {
    V out;
    for (int j = 0; j < kHalfLanes<A>; ++j) out[j] = act_fwd<ACT>(z[j]);
    return out;
  }
}

template <int ACT, typename A>
inline typename VecOf<A>::type vact_bwd(typename VecOf<A>::type z, typename VecOf<A>::type g) {
  using V = typename VecOf<A>::type;
  using I = typename IVecOf<A>::type;
  if constexpr (ACT == kIdentity) {
    return g;
  } else if constexpr (ACT == kRelu) {
    const V zero = {};
    const I keep = ~(z <= zero);  // all ones unless z <= 0: keep_unless_clipped lane-wise
    return reinterpret_cast<V>(reinterpret_cast<I>(g) & keep);
  } else {
    V out;
    for (int j = 0; j < kHalfLanes<A>; ++j) out[j] = act_bwd<ACT>(z[j], g[j]);
    return out;
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

template <typename T, int ACT>
struct Loops {
  using A = acc_t<T>;

  // ------------------------------------------------------------------------- span (NCHW)
  // (s1, s2) += (Σ (x − k), Σ (x − k)²): the shifted sums of one span, blocked (common.h).
  static void span_sums(const T* x, int64_t len, A k, double& s1, double& s2) {
    chunked_sums<A>(len, [&](int64_t i, A& u, A& v) {
      A d = ld(x, i) - k;
      u = d;
      v = d * d;
    }, s1, s2);
  }

  static void span_apply(const T* x, const T* r, T* y, int64_t len, A a, A b) {
    if (r) {
      for (int64_t i = 0; i < len; ++i) st(y, i, act_fwd<ACT>(ld(x, i) * a + b + ld(r, i)));
    } else {
      for (int64_t i = 0; i < len; ++i) st(y, i, act_fwd<ACT>(ld(x, i) * a + b));
    }
  }

  // (s1, s2) += (Σ dz, Σ dz·(x − m))
  static void span_bwd_sums(const T* x, const T* dy, const T* r, int64_t len, A fa, A fb, A m, double& s1,
                            double& s2) {
    if constexpr (ACT == kIdentity) {
      using V = vec_t<T>;
      chunked_vsums<A>(len, [&](int64_t i, V& u, V& v) {
        const V g = vld(dy, i);
        u = g;
        v = g * (vld(x, i) - m);
      }, [&](int64_t i, A& u, A& v) {
        A g = ld(dy, i);
        u = g;
        v = g * (ld(x, i) - m);
      }, s1, s2);
    } else if (r) {
      chunked_sums<A>(len, [&](int64_t i, A& u, A& v) {
        A xv = ld(x, i);
        A g = act_bwd<ACT>(xv * fa + fb + ld(r, i), ld(dy, i));
        u = g;
        v = g * (xv - m);
      }, s1, s2);
    } else {
      chunked_sums<A>(len, [&](int64_t i, A& u, A& v) {
        A xv = ld(x, i);
        A g = act_bwd<ACT>(xv * fa + fb, ld(dy, i));
        u = g;
        v = g * (xv - m);
      }, s1, s2);
    }
  }

  static void span_bwd_dx(const T* x, const T* dy, const T* r, T* dx, T* dz, int64_t len, A fa, A fb, A p, A q,
                          A m, A rr) {
    if (q == A(0) && rr == A(0)) {
      span_bwd_dx_constant_stats(x, dy, r, dx, dz, len, fa, fb, p);
    } else if (ACT == kIdentity && !dz) {
      span_dx(x, dy, dx, len, p, q, m, rr);
    } else if (r && dz) {
      for (int64_t i = 0; i < len; ++i) {
        A xv = ld(x, i);
        A g = act_bwd<ACT>(xv * fa + fb + ld(r, i), ld(dy, i));
        st(dx, i, p * g + q * (xv - m) + rr);
        st(dz, i, g);
      }
    } else if (r) {
      for (int64_t i = 0; i < len; ++i) {
        A xv = ld(x, i);
        A g = act_bwd<ACT>(xv * fa + fb + ld(r, i), ld(dy, i));
        st(dx, i, p * g + q * (xv - m) + rr);
      }
    } else if (dz) {
      for (int64_t i = 0; i < len; ++i) {
        A xv = ld(x, i);
        A g = act_bwd<ACT>(xv * fa + fb, ld(dy, i));
        st(dx, i, p * g + q * (xv - m) + rr);
        st(dz, i, g);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        A xv = ld(x, i);
        A g = act_bwd<ACT>(xv * fa + fb, ld(dy, i));
        st(dx, i, p * g + q * (xv - m) + rr);
      }
    }
  }

  // q = rr = 0 (eval: the statistics were constants; or a channel whose sums vanish): dx = p·dz, x entering
  // only through dz, as torch's eval backward (dz·γ·rstd). 0·(x − m) would carry a NaN or Inf of x into dx.
  static void span_bwd_dx_constant_stats(const T* x, const T* dy, const T* r, T* dx, T* dz, int64_t len, A fa,
                                         A fb, A p) {
    for (int64_t i = 0; i < len; ++i) {
      A g = ld(dy, i);
      if constexpr (ACT != kIdentity) g = act_bwd<ACT>(r ? ld(x, i) * fa + fb + ld(r, i) : ld(x, i) * fa + fb, g);
      st(dx, i, p * g);
      if (dz) st(dz, i, g);
    }
  }

  // dx = p·dy + q·(x − m) + rr, vector loads (restrict: the stores cannot alias the loads)
  static void span_dx(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t len, A p, A q,
                      A m, A rr) {
    constexpr int H = kHalfLanes<A>;
    int64_t i = 0;
    for (; i + H <= len; i += H) vst(dx, i, p * vld(dy, i) + q * (vld(x, i) - m) + rr);
    for (; i < len; ++i) st(dx, i, p * ld(dy, i) + q * (ld(x, i) - m) + rr);
  }

  // ------------------------------------------------------------------------- positions (CL)
  // Each position's C channels run in vectors of H channels (explicit vectors, as span_dx: the
  // plain loops over ld/st stayed scalar — the per-channel accumulators and the outputs could
  // alias the inputs as far as the compiler knew — and the ReLU backward ran 2.5x slower than
  // the identity's). Every value is computed with the scalar code's operations in its order, and
  // each accumulator still adds the positions in order: the same bits as the scalar loops.
  using V = vec_t<T>;
  static constexpr int H = kHalfLanes<A>;

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

  static void pos_apply(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, int64_t np, int64_t C,
                        const A* __restrict__ a, const A* __restrict__ b, bool stream = false) {
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

  // y 32-byte aligned and whole vectors per position: every vector store may bypass the cache
  static bool streamable(const T* y, int64_t C) {
    return C % H == 0 && reinterpret_cast<uintptr_t>(y) % 32 == 0;
  }

  template <bool RES, bool NT = false>
  static void pos_apply_impl(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, int64_t np,
                             int64_t C, const A* __restrict__ a, const A* __restrict__ b) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        V z = vld(x + o, c) * vacc(a + c) + vacc(b + c);
        if constexpr (RES) z = z + vld(r + o, c);
        if constexpr (NT) {
          vst_stream(y + o, c, vact_fwd<ACT, A>(z));
        } else {
          vst(y + o, c, vact_fwd<ACT, A>(z));
        }
      }
      for (; c < C; ++c) {
        A z = ld(x + o, c) * a[c] + b[c];
        if constexpr (RES) z = z + ld(r + o, c);
        st(y + o, c, act_fwd<ACT>(z));
      }
    }
  }

  // a[c] += dz, q[c] += dz·(x − m[c])
  static void pos_bwd_sums(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r, int64_t np,
                           int64_t C, const A* __restrict__ fa, const A* __restrict__ fb, const A* __restrict__ m,
                           A* __restrict__ a, A* __restrict__ q) {
    if (ACT != kIdentity && r) {
      pos_bwd_sums_impl<true>(x, dy, r, np, C, fa, fb, m, a, q);
    } else {
      pos_bwd_sums_impl<false>(x, dy, r, np, C, fa, fb, m, a, q);
    }
  }

  // dy·act'(z) at channels c.. of the position starting at o, z = x·fa + fb (+ r): the gradient through the
  // activation, shared by the backward's sums and dx passes (vector of H channels, and one channel)
  template <bool RES>
  static inline V vgrad(const V& xv, const T* __restrict__ dy, const T* __restrict__ r, int64_t o, int64_t c,
                        const A* __restrict__ fa, const A* __restrict__ fb) {
    V g = vld(dy + o, c);
    if constexpr (ACT != kIdentity) {
      V z = xv * vacc(fa + c) + vacc(fb + c);
      if constexpr (RES) z = z + vld(r + o, c);
      g = vact_bwd<ACT, A>(z, g);
    }
    return g;
  }

  template <bool RES>
  static inline A grad(A xv, const T* __restrict__ dy, const T* __restrict__ r, int64_t o, int64_t c,
                       const A* __restrict__ fa, const A* __restrict__ fb) {
    A g = ld(dy + o, c);
    if constexpr (ACT != kIdentity) {
      A z = xv * fa[c] + fb[c];
      if constexpr (RES) z = z + ld(r + o, c);
      g = act_bwd<ACT>(z, g);
    }
    return g;
  }

  template <bool RES>
  static void pos_bwd_sums_impl(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r,
                                int64_t np, int64_t C, const A* __restrict__ fa, const A* __restrict__ fb,
                                const A* __restrict__ m, A* __restrict__ a, A* __restrict__ q) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        const V xv = vld(x + o, c);
        const V g = vgrad<RES>(xv, dy, r, o, c, fa, fb);
        vput(a + c, vacc(a + c) + g);
        vput(q + c, vacc(q + c) + g * (xv - vacc(m + c)));
      }
      for (; c < C; ++c) {
        const A xv = ld(x + o, c);
        const A g = grad<RES>(xv, dy, r, o, c, fa, fb);
        a[c] += g;
        q[c] += g * (xv - m[c]);
      }
    }
  }

  static void pos_bwd_dx(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r,
                         T* __restrict__ dx, T* __restrict__ dz, int64_t np, int64_t C, const A* __restrict__ fa,
                         const A* __restrict__ fb, const A* __restrict__ p, const A* __restrict__ q,
                         const A* __restrict__ m, const A* __restrict__ rr, bool stream = false) {
    if (std::all_of(q, q + C, [](A v) { return v == A(0); }) && std::all_of(rr, rr + C, [](A v) { return v == A(0); })) {
      if (r) {
        pos_bwd_dx_constant_stats<true>(x, dy, r, dx, dz, np, C, fa, fb, p);
      } else {
        pos_bwd_dx_constant_stats<false>(x, dy, r, dx, dz, np, C, fa, fb, p);
      }
      return;
    }
    if constexpr (kCanStream<T>) {
      if (stream && !dz && streamable(dx, C)) {
        if (ACT != kIdentity && r) {
          pos_bwd_dx_impl<true, false, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
        } else {
          pos_bwd_dx_impl<false, false, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
        }
        stream_fence();
        return;
      }
    }
    if (ACT == kIdentity && !dz) {
      pos_bwd_dx_impl<false, false>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    } else if (r && dz) {
      pos_bwd_dx_impl<true, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    } else if (r) {
      pos_bwd_dx_impl<true, false>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    } else if (dz) {
      pos_bwd_dx_impl<false, true>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    } else {
      pos_bwd_dx_impl<false, false>(x, dy, r, dx, dz, np, C, fa, fb, p, q, m, rr);
    }
  }

  // span_bwd_dx_constant_stats for positions: dx = p·dz (dz where asked for)
  template <bool RES>
  static void pos_bwd_dx_constant_stats(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r,
                                        T* __restrict__ dx, T* __restrict__ dz, int64_t np, int64_t C,
                                        const A* __restrict__ fa, const A* __restrict__ fb, const A* __restrict__ p) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        const V g = vgrad<RES>(vld(x + o, c), dy, r, o, c, fa, fb);
        vst(dx + o, c, vacc(p + c) * g);
        if (dz) vst(dz + o, c, g);
      }
      for (; c < C; ++c) {
        const A g = grad<RES>(ld(x + o, c), dy, r, o, c, fa, fb);
        st(dx + o, c, p[c] * g);
        if (dz) st(dz + o, c, g);
      }
    }
  }

  // dz = dy·act'(x·fa + fb + r) (ACT == kIdentity: dy, r unused), dx = p·dz + q·(x − m) + rr
  template <bool RES, bool DZ, bool NT = false>
  static void pos_bwd_dx_impl(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ r,
                              T* __restrict__ dx, T* __restrict__ dz, int64_t np, int64_t C,
                              const A* __restrict__ fa, const A* __restrict__ fb, const A* __restrict__ p,
                              const A* __restrict__ q, const A* __restrict__ m, const A* __restrict__ rr) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        const V xv = vld(x + o, c);
        const V g = vgrad<RES>(xv, dy, r, o, c, fa, fb);
        const V d = vacc(p + c) * g + vacc(q + c) * (xv - vacc(m + c)) + vacc(rr + c);
        if constexpr (NT) {
          vst_stream(dx + o, c, d);
        } else {
          vst(dx + o, c, d);
        }
        if constexpr (DZ) vst(dz + o, c, g);
      }
      for (; c < C; ++c) {
        const A xv = ld(x + o, c);
        const A g = grad<RES>(xv, dy, r, o, c, fa, fb);
        st(dx + o, c, p[c] * g + q[c] * (xv - m[c]) + rr[c]);
        if constexpr (DZ) st(dz + o, c, g);
      }
    }
  }
};

}  // namespace normkit

#define NK_ACT_CALL(act, fn, ...)                                                              \
  switch (act) {                                                                               \
    case 0: return fn<T, 0>(__VA_ARGS__);                                                      \
    case 1: return fn<T, 1>(__VA_ARGS__);                                                      \
    case 2: return fn<T, 2>(__VA_ARGS__);                                                      \
    case 3: return fn<T, 3>(__VA_ARGS__);                                                      \
    default: TORCH_CHECK_VALUE(false, "normkit cpu backend: unknown activation code ", act);   \
  }
