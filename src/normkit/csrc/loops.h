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
    if (ACT == kIdentity && !dz) {
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

  // dx = p·dy + q·(x − m) + rr, vector loads (restrict: the stores cannot alias the loads)
  static void span_dx(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t len, A p, A q,
                      A m, A rr) {
    using V = vec_t<T>;
    constexpr int H = kHalfLanes<A>;
    int64_t i = 0;
    for (; i + H <= len; i += H) vst(dx, i, p * vld(dy, i) + q * (vld(x, i) - m) + rr);
    for (; i < len; ++i) st(dx, i, p * ld(dy, i) + q * (ld(x, i) - m) + rr);
  }

  // ------------------------------------------------------------------------- positions (CL)
  // a[c] += x − k[c], q[c] += (x − k[c])² over `np` positions of C channels starting at x.
  static void pos_sums(const T* x, int64_t np, int64_t C, const A* k, A* a, A* q) {
    for (int64_t s = 0; s < np; ++s) {
      const T* xs = x + s * C;
      for (int64_t c = 0; c < C; ++c) {
        A d = ld(xs, c) - k[c];
        a[c] += d;
        q[c] += d * d;
      }
    }
  }

  static void pos_apply(const T* x, const T* r, T* y, int64_t np, int64_t C, const A* a, const A* b) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      if (r) {
        for (int64_t c = 0; c < C; ++c) st(y + o, c, act_fwd<ACT>(ld(x + o, c) * a[c] + b[c] + ld(r + o, c)));
      } else {
        for (int64_t c = 0; c < C; ++c) st(y + o, c, act_fwd<ACT>(ld(x + o, c) * a[c] + b[c]));
      }
    }
  }

  // a[c] += dz, q[c] += dz·(x − m[c])
  static void pos_bwd_sums(const T* x, const T* dy, const T* r, int64_t np, int64_t C, const A* fa, const A* fb,
                           const A* m, A* a, A* q) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      if (ACT == kIdentity) {
        for (int64_t c = 0; c < C; ++c) {
          A g = ld(dy + o, c);
          a[c] += g;
          q[c] += g * (ld(x + o, c) - m[c]);
        }
      } else if (r) {
        for (int64_t c = 0; c < C; ++c) {
          A xv = ld(x + o, c);
          A g = act_bwd<ACT>(xv * fa[c] + fb[c] + ld(r + o, c), ld(dy + o, c));
          a[c] += g;
          q[c] += g * (xv - m[c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          A xv = ld(x + o, c);
          A g = act_bwd<ACT>(xv * fa[c] + fb[c], ld(dy + o, c));
          a[c] += g;
          q[c] += g * (xv - m[c]);
        }
      }
    }
  }

  static void pos_bwd_dx(const T* x, const T* dy, const T* r, T* dx, T* dz, int64_t np, int64_t C, const A* fa,
                         const A* fb, const A* p, const A* q, const A* m, const A* rr) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      if (ACT == kIdentity && !dz) {
        for (int64_t c = 0; c < C; ++c)
          st(dx + o, c, p[c] * ld(dy + o, c) + q[c] * (ld(x + o, c) - m[c]) + rr[c]);
      } else if (r && dz) {
        for (int64_t c = 0; c < C; ++c) {
          A xv = ld(x + o, c);
          A g = act_bwd<ACT>(xv * fa[c] + fb[c] + ld(r + o, c), ld(dy + o, c));
          st(dx + o, c, p[c] * g + q[c] * (xv - m[c]) + rr[c]);
          st(dz + o, c, g);
        }
      } else if (r) {
        for (int64_t c = 0; c < C; ++c) {
          A xv = ld(x + o, c);
          A g = act_bwd<ACT>(xv * fa[c] + fb[c] + ld(r + o, c), ld(dy + o, c));
          st(dx + o, c, p[c] * g + q[c] * (xv - m[c]) + rr[c]);
        }
      } else if (dz) {
        for (int64_t c = 0; c < C; ++c) {
          A xv = ld(x + o, c);
          A g = act_bwd<ACT>(xv * fa[c] + fb[c], ld(dy + o, c));
          st(dx + o, c, p[c] * g + q[c] * (xv - m[c]) + rr[c]);
          st(dz + o, c, g);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          A xv = ld(x + o, c);
          A g = act_bwd<ACT>(xv * fa[c] + fb[c], ld(dy + o, c));
          st(dx + o, c, p[c] * g + q[c] * (xv - m[c]) + rr[c]);
        }
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
