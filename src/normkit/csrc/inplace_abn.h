// In-place activated BatchNorm (InPlace-ABN; Rota Bulò, Porzi & Kontschieder, CVPR 2018), computing exactly
// BatchNorm → activation with torch's γ: y = act(γ·x̂ + β), x̂ = (x − μ)·rstd, act one of
//
//   kind 0  identity     a(z) = z                                  a'(z) = 1
//   kind 1  leaky ReLU   a(z) = z > 0 ? z : s·z      (slope s > 0)  a'(z) = z > 0 ? 1 : s
//   kind 2  ELU          a(z) = z > 0 ? z : α·(e^z − 1)   (α > 0)   a'(z) = z > 0 ? 1 : α·e^z = y + α
//
// The forward may write y over x (normkit.ops_inplace decides; it marks x dirty). The backward reads
// either the output y ("from_output": x itself is gone) or the input x (the fallback, where inversion is not
// exact), and dy:
//
//   from the output:  z = a⁻¹(y)  (leaky: y > 0 ? y : y/s;  ELU: y > 0 ? y : log1p(y/α);  identity: y)
//                     dz = dy·a'(z) (leaky: y > 0 ? dy : s·dy;  ELU: y > 0 ? dy : (y + α)·dy)
//                     x̂ = (z − β)·(1/γ)                           centre β, factor 1/γ
//   from the input:   z = x·scale + shift, dz = dy·a'(z),  x̂ = (x − μ)·rstd   centre μ, factor rstd
//
// then, with d = (source − centre) and x̂ = d·factor, BatchNorm's backward in two passes as channel.h's:
//
//   Σ dz, Σ dz·d  (blocked sums, common.h)  →  Σ dz·x̂ = factor·Σ dz·d   (dβ and dγ, in double)
//   dx = scale·dz + q·d + rr,   q = −scale·factor·mean(dz·x̂),  rr = −scale·mean(dz)
//
// Layouts, parallel split and summation order are channel.h's (NCHW spans, blocks of adjacent channels with
// the second pass in cache; channels_last positions in blocks of rows), so every result is bit-identical for
// any thread count. Leaky ReLU and identity run in explicit vectors (selects); ELU calls expm1/log1p/exp per
// lane. Included by normkit_cpu.cpp (after the families it builds on).
#pragma once

#include <torch/library.h>

#include "channel.h"

namespace normkit {
namespace iabn {

enum Kind : int { kLinear = 0, kLeaky = 1, kElu = 2 };

// Per-channel constants of the backward's element formula, as scalars (NCHW span) or vectors (CL positions).
template <typename X>
struct Coef {
  X p, inv_p;  // the activation's parameter (slope or α) and its reciprocal
  X centre, scale, shift;
};

template <typename A, typename X>
inline X bcast(A v) {
  if constexpr (std::is_same_v<X, A>) {
    return v;
  } else {
    return X{} + v;
  }
}

// y = a(z) elementwise (A or a vector of A)
template <int KIND, typename A, typename X>
inline X act(const X& z, const X& p) {
  if constexpr (KIND == kLeaky) {
    const X zero{};
    return z > zero ? z : z * p;  // NaN: z·s = NaN, as torch's leaky_relu
  } else if constexpr (KIND == kElu) {
    if constexpr (std::is_same_v<X, A>) {
      return z > A(0) ? z : p * std::expm1(z);
    } else {
      X out;
      for (int j = 0; j < kHalfLanes<A>; ++j) out[j] = z[j] > A(0) ? z[j] : p[j] * std::expm1(z[j]);
      return out;
    }
  } else {
    return z;
  }
}

// (dz, d) of one element (or a vector of them): the gradient through the activation and the source's
// distance from the channel's centre (module comment)
template <int KIND, bool FROM_Y, typename A, typename X>
inline void element(const X& v, const X& gin, const Coef<X>& k, X& g, X& d) {
  const X zero{};
  if constexpr (FROM_Y) {
    if constexpr (KIND == kLeaky) {
      const auto pos = v > zero;
      g = pos ? gin : gin * k.p;
      d = (pos ? v : v * k.inv_p) - k.centre;
    } else if constexpr (KIND == kElu) {
      if constexpr (std::is_same_v<X, A>) {
        const bool pos = v > A(0);
        g = pos ? gin : gin * (v + k.p);
        d = (pos ? v : std::log1p(v * k.inv_p)) - k.centre;
      } else {
        for (int j = 0; j < kHalfLanes<A>; ++j) {
          const bool pos = v[j] > A(0);
          g[j] = pos ? gin[j] : gin[j] * (v[j] + k.p[j]);
          d[j] = (pos ? v[j] : std::log1p(v[j] * k.inv_p[j])) - k.centre[j];
        }
      }
    } else {
      g = gin;
      d = v - k.centre;
    }
  } else {
    if constexpr (KIND == kLeaky) {
      const X z = v * k.scale + k.shift;
      g = z > zero ? gin : gin * k.p;
    } else if constexpr (KIND == kElu) {
      const X z = v * k.scale + k.shift;
      if constexpr (std::is_same_v<X, A>) {
        g = z > A(0) ? gin : gin * (k.p * std::exp(z));
      } else {
        for (int j = 0; j < kHalfLanes<A>; ++j) g[j] = z[j] > A(0) ? gin[j] : gin[j] * (k.p[j] * std::exp(z[j]));
      }
    } else {
      g = gin;
    }
    d = v - k.centre;
  }
}

template <typename T, int KIND, bool FROM_Y>
struct Loops {
  using A = acc_t<T>;
  using V = vec_t<T>;
  static constexpr int H = kHalfLanes<A>;

  static Coef<V> widen(const Coef<A>& k) {
    return {bcast<A, V>(k.p), bcast<A, V>(k.inv_p), bcast<A, V>(k.centre), bcast<A, V>(k.scale),
            bcast<A, V>(k.shift)};
  }

  // ----------------------------------------------------------------------- NCHW spans
  // y = a(x·sa + sb) over one span; y may be x (in place: each value is read before it is written)
  static void span_apply(const T* x, T* y, int64_t len, A sa, A sb, A p) {
    const V va = bcast<A, V>(sa), vb = bcast<A, V>(sb), vp = bcast<A, V>(p);
    int64_t i = 0;
    for (; i + H <= len; i += H) vst(y, i, act<KIND, A>(vld(x, i) * va + vb, vp));
    for (; i < len; ++i) st(y, i, act<KIND, A>(ld(x, i) * sa + sb, p));
  }

  // (s1, s2) += (Σ dz, Σ dz·d) over one span
  static void span_sums(const T* s, const T* dy, int64_t len, const Coef<A>& k, double& s1, double& s2) {
    const Coef<V> kv = widen(k);
    chunked_vsums<A>(len, [&](int64_t i, V& u, V& w) {
      V g, d;
      element<KIND, FROM_Y, A>(vld(s, i), vld(dy, i), kv, g, d);
      u = g;
      w = g * d;
    }, [&](int64_t i, A& u, A& w) {
      A g, d;
      element<KIND, FROM_Y, A>(ld(s, i), ld(dy, i), k, g, d);
      u = g;
      w = g * d;
    }, s1, s2);
  }

  // dx = p·dz + q·d + rr over one span
  static void span_dx(const T* s, const T* dy, T* __restrict__ dx, int64_t len, const Coef<A>& k, A p, A q, A rr) {
    const Coef<V> kv = widen(k);
    const V vp = bcast<A, V>(p), vq = bcast<A, V>(q), vr = bcast<A, V>(rr);
    int64_t i = 0;
    for (; i + H <= len; i += H) {
      V g, d;
      element<KIND, FROM_Y, A>(vld(s, i), vld(dy, i), kv, g, d);
      vst(dx, i, vp * g + vq * d + vr);
    }
    for (; i < len; ++i) {
      A g, d;
      element<KIND, FROM_Y, A>(ld(s, i), ld(dy, i), k, g, d);
      st(dx, i, p * g + q * d + rr);
    }
  }

  // ----------------------------------------------------------------------- CL positions
  static Coef<V> coef_at(const Coef<const A*>& k, int64_t c) {
    return {vacc(k.p + c), vacc(k.inv_p + c), vacc(k.centre + c), vacc(k.scale + c), vacc(k.shift + c)};
  }

  static Coef<A> coef_one(const Coef<const A*>& k, int64_t c) {
    return {k.p[c], k.inv_p[c], k.centre[c], k.scale[c], k.shift[c]};
  }

  static void pos_apply(const T* x, T* y, int64_t np, int64_t C, const A* sa, const A* sb, const A* p) {
    for (int64_t s = 0; s < np; ++s) {
      const int64_t o = s * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) vst(y + o, c, act<KIND, A>(vld(x + o, c) * vacc(sa + c) + vacc(sb + c), vacc(p + c)));
      for (; c < C; ++c) st(y + o, c, act<KIND, A>(ld(x + o, c) * sa[c] + sb[c], p[c]));
    }
  }

  // a[c] += dz, q[c] += dz·d over np positions (each accumulator adds the positions in order)
  static void pos_sums(const T* s, const T* dy, int64_t np, int64_t C, const Coef<const A*>& k, A* __restrict__ a,
                       A* __restrict__ q) {
    for (int64_t t = 0; t < np; ++t) {
      const int64_t o = t * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        V g, d;
        element<KIND, FROM_Y, A>(vld(s + o, c), vld(dy + o, c), coef_at(k, c), g, d);
        vput(a + c, vacc(a + c) + g);
        vput(q + c, vacc(q + c) + g * d);
      }
      for (; c < C; ++c) {
        A g, d;
        element<KIND, FROM_Y, A>(ld(s + o, c), ld(dy + o, c), coef_one(k, c), g, d);
        a[c] += g;
        q[c] += g * d;
      }
    }
  }

  static void pos_dx(const T* s, const T* dy, T* __restrict__ dx, int64_t np, int64_t C, const Coef<const A*>& k,
                     const A* p, const A* q, const A* rr) {
    for (int64_t t = 0; t < np; ++t) {
      const int64_t o = t * C;
      int64_t c = 0;
      for (; c + H <= C; c += H) {
        V g, d;
        element<KIND, FROM_Y, A>(vld(s + o, c), vld(dy + o, c), coef_at(k, c), g, d);
        vst(dx + o, c, vacc(p + c) * g + vacc(q + c) * d + vacc(rr + c));
      }
      for (; c < C; ++c) {
        A g, d;
        element<KIND, FROM_Y, A>(ld(s + o, c), ld(dy + o, c), coef_one(k, c), g, d);
        st(dx + o, c, p[c] * g + q[c] * d + rr[c]);
      }
    }
  }
};

// ----------------------------------------------------------------------------- per-channel constants
// The constants of the whole call, per channel, in A: the activation parameter (and 1/it), the scale γ·rstd
// and shift β − μ·scale of the forward (backends.scale_shift's rounding), and the backward's centre / factor.
template <typename A>
struct Channels {
  std::vector<A> p, inv_p, centre, factor, scale, shift;

  Coef<const A*> coef() const { return {p.data(), inv_p.data(), centre.data(), scale.data(), shift.data()}; }
  Coef<A> at(int64_t c) const { return {p[c], inv_p[c], centre[c], scale[c], shift[c]}; }
};

// mean, rstd: (C,) A; w, b: A vectors or undefined
template <typename A>
Channels<A> channels(int64_t C, const A* mean, const A* rstd, const Tensor& w, const Tensor& b, double param,
                     bool from_y) {
  Channels<A> k;
  const A* wp = ptr_or_null<A>(w);
  const A* bp = ptr_or_null<A>(b);
  k.p.assign(C, static_cast<A>(param));
  k.inv_p.assign(C, A(1) / static_cast<A>(param));
  k.centre.resize(C);
  k.factor.resize(C);
  k.scale.resize(C);
  k.shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const A g = wp ? wp[c] : A(1), be = bp ? bp[c] : A(0);
    k.scale[c] = wp ? g * rstd[c] : rstd[c];
    const A h = -mean[c] * k.scale[c];
    k.shift[c] = bp ? h + be : h;
    k.centre[c] = from_y ? be : mean[c];
    k.factor[c] = from_y ? A(1) / g : rstd[c];
  }
  return k;
}

// (Σ dz, Σ dz·d) per channel → (dβ, dγ) and the dx coefficients q, rr (formed in double, as
// channel_backward_dx does)
template <typename A>
inline void finish_sums(double s1, double s2, A factor, A scale, double mean_dz, double mean_dzx, A& sdz, A& sdzx,
                        A& q, A& rr) {
  sdz = static_cast<A>(s1);
  sdzx = static_cast<A>(s2 * static_cast<double>(factor));
  q = static_cast<A>(-static_cast<double>(scale) * static_cast<double>(factor) * mean_dzx);
  rr = static_cast<A>(-static_cast<double>(scale) * mean_dz);
}

// ----------------------------------------------------------------------------- forward
template <typename T, int KIND>
void apply_all(const ChannelView& v, const T* x, T* y, const acc_t<T>* a, const acc_t<T>* b, const acc_t<T>* p) {
  using L = Loops<T, KIND, false>;
  if (v.cl) {
    parallel(v.P, grain_for(v.C), [&](int64_t lo, int64_t hi) {
      L::pos_apply(x + lo * v.C, y + lo * v.C, hi - lo, v.C, a, b, p);
    });
  } else {
    parallel(v.N * v.C, grain_for(v.S), [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t c = row % v.C;
        L::span_apply(x + row * v.S, y + row * v.S, v.S, a[c], b[c], p[c]);
      }
    });
  }
}

// Training forward: batch statistics, then y = a(x·scale + shift) into x itself (in_place) or a new tensor.
template <typename T, int KIND>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w_, const Tensor& b_, double eps,
                                                double param, bool in_place) {
  using A = acc_t<T>;
  using L = Loops<T, KIND, false>;
  const ChannelView v = channel_view(x);
  T* xp = const_cast<T*>(x.data_ptr<T>());
  Tensor y = in_place ? x : empty_like_x(x);
  T* yp = y.data_ptr<T>();
  Tensor mean = at::empty({v.C}, x.options().dtype(stat_type(x)));
  Tensor var = at::empty({v.C}, x.options().dtype(stat_type(x)));
  A* mp = mean.data_ptr<A>();
  A* vp = var.data_ptr<A>();
  const auto w = vec_or<T>(w_, v.C, A(1));
  const auto b = vec_or<T>(b_, v.C, A(0));
  const auto k = channel_shift(xp, v);
  std::vector<A> scale(v.C), shift(v.C), p(v.C, static_cast<A>(param));
  auto finish = [&](int64_t c, double s1, double s2) {
    double m, s;
    moments(k[c], s1, s2, v.P, m, s);
    mp[c] = static_cast<A>(m);
    vp[c] = static_cast<A>(s);
    scale_shift<A>(mp[c], vp[c], w[c], b[c], eps, scale[c], shift[c]);
  };
  if (blocked_nchw(v)) {
    const int64_t cb = channel_block(v);
    const int64_t blocks = (v.C + cb - 1) / cb;
    parallel(blocks, grain_for(cb * v.N * v.S), [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t c0 = j * cb, c1 = std::min(v.C, c0 + cb);
        for (int64_t c = c0; c < c1; ++c) {
          double s1 = 0, s2 = 0;
          for (int64_t n = 0; n < v.N; ++n) {
            double a = 0, q = 0;
            normkit::Loops<T, 0>::span_sums(xp + (n * v.C + c) * v.S, v.S, k[c], a, q);
            s1 += a;
            s2 += q;
          }
          finish(c, s1, s2);
        }
        for (int64_t n = 0; n < v.N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t o = (n * v.C + c) * v.S;
            L::span_apply(xp + o, yp + o, v.S, scale[c], shift[c], p[c]);
          }
        }
      }
    });
    return {y, mean, var};
  }
  std::vector<double> s1, s2;
  if (v.cl) {
    cl_channel_sums<A>(v.P, v.C, [&](int64_t p0, int64_t np, A* a, A* q) {
      normkit::Loops<T, 0>::pos_sums(xp + p0 * v.C, np, v.C, k.data(), a, q);
    }, s1, s2);
  } else {
    nchw_channel_sums(v.N, v.C, v.S, [&](int64_t r, double& a, double& q) {
      normkit::Loops<T, 0>::span_sums(xp + r * v.S, v.S, k[r % v.C], a, q);
    }, s1, s2);
  }
  for (int64_t c = 0; c < v.C; ++c) finish(c, s1[c], s2[c]);
  apply_all<T, KIND>(v, xp, yp, scale.data(), shift.data(), p.data());
  return {y, mean, var};
}

// ----------------------------------------------------------------------------- backward
// The two sums per channel (Σ dz, Σ dz·d), in the order channel.h's reductions use.
template <typename T, int KIND, bool FROM_Y>
void sums_all(const ChannelView& v, const T* s, const T* dy, const Channels<acc_t<T>>& k, std::vector<double>& s1,
              std::vector<double>& s2) {
  using A = acc_t<T>;
  using L = Loops<T, KIND, FROM_Y>;
  if (v.cl) {
    const auto kc = k.coef();
    cl_channel_sums<A>(v.P, v.C, [&](int64_t p0, int64_t np, A* a, A* q) {
      L::pos_sums(s + p0 * v.C, dy + p0 * v.C, np, v.C, kc, a, q);
    }, s1, s2);
  } else {
    nchw_channel_sums(v.N, v.C, v.S, [&](int64_t r, double& a, double& q) {
      L::span_sums(s + r * v.S, dy + r * v.S, v.S, k.at(r % v.C), a, q);
    }, s1, s2);
  }
}

template <typename T, int KIND, bool FROM_Y>
void dx_all(const ChannelView& v, const T* s, const T* dy, T* dx, const Channels<acc_t<T>>& k, const acc_t<T>* q,
            const acc_t<T>* rr) {
  using L = Loops<T, KIND, FROM_Y>;
  if (v.cl) {
    const auto kc = k.coef();
    parallel(v.P, grain_for(v.C), [&](int64_t lo, int64_t hi) {
      const int64_t o = lo * v.C;
      L::pos_dx(s + o, dy + o, dx + o, hi - lo, v.C, kc, k.scale.data(), q, rr);
    });
  } else {
    parallel(v.N * v.C, grain_for(v.S), [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t c = row % v.C, o = row * v.S;
        L::span_dx(s + o, dy + o, dx + o, v.S, k.at(c), k.scale[c], q[c], rr[c]);
      }
    });
  }
}

// Whole backward: (dx or undefined, Σ dz, Σ dz·x̂). With the channels in blocks (NCHW, enough channels), each
// block's dx pass follows its sums while its rows are in cache, as channel_backward_impl.
template <typename T, int KIND, bool FROM_Y>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& src, const Tensor& dy, const Tensor& mean,
                                                 const Tensor& rstd, const Tensor& w, const Tensor& b, double param,
                                                 bool need_dx) {
  using A = acc_t<T>;
  using L = Loops<T, KIND, FROM_Y>;
  const ChannelView v = channel_view(src);
  const T* sp = src.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  const auto k = channels<A>(v.C, mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, param, FROM_Y);
  Tensor dx = need_dx ? empty_like_x(src) : Tensor();
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  Tensor sum_dz = at::empty({v.C}, src.options().dtype(stat_type(src)));
  Tensor sum_dzx = at::empty({v.C}, src.options().dtype(stat_type(src)));
  A* sa = sum_dz.data_ptr<A>();
  A* sb = sum_dzx.data_ptr<A>();
  std::vector<A> q(v.C), rr(v.C);
  const double count = static_cast<double>(v.P);
  if (need_dx && blocked_nchw(v)) {
    const int64_t cb = channel_block(v);
    const int64_t blocks = (v.C + cb - 1) / cb;
    parallel(blocks, grain_for(2 * cb * v.N * v.S), [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t c0 = j * cb, c1 = std::min(v.C, c0 + cb);
        for (int64_t c = c0; c < c1; ++c) {
          double s1 = 0, s2 = 0;
          const Coef<A> kc = k.at(c);
          for (int64_t n = 0; n < v.N; ++n) {
            double a = 0, qq = 0;
            const int64_t o = (n * v.C + c) * v.S;
            L::span_sums(sp + o, dyp + o, v.S, kc, a, qq);
            s1 += a;
            s2 += qq;
          }
          finish_sums<A>(s1, s2, k.factor[c], k.scale[c], s1 / count, s2 * k.factor[c] / count, sa[c], sb[c], q[c],
                         rr[c]);
        }
        for (int64_t n = 0; n < v.N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t o = (n * v.C + c) * v.S;
            L::span_dx(sp + o, dyp + o, dxp + o, v.S, k.at(c), k.scale[c], q[c], rr[c]);
          }
        }
      }
    });
    return {dx, sum_dz, sum_dzx};
  }
  std::vector<double> s1, s2;
  sums_all<T, KIND, FROM_Y>(v, sp, dyp, k, s1, s2);
  for (int64_t c = 0; c < v.C; ++c) {
    finish_sums<A>(s1[c], s2[c], k.factor[c], k.scale[c], s1[c] / count, s2[c] * k.factor[c] / count, sa[c], sb[c],
                   q[c], rr[c]);
  }
  if (need_dx) dx_all<T, KIND, FROM_Y>(v, sp, dyp, dxp, k, q.data(), rr.data());
  return {dx, sum_dz, sum_dzx};
}

// The two halves, for SyncBatchNorm's all-reduce between them: the local sums, then dx from the global means
// mean_dz = Σ dz / count and mean_dzx = Σ dz·x̂ / count (double (C,) vectors).
template <typename T, int KIND, bool FROM_Y>
std::tuple<Tensor, Tensor> reduce_impl(const Tensor& src, const Tensor& dy, const Tensor& mean, const Tensor& rstd,
                                       const Tensor& w, const Tensor& b, double param) {
  using A = acc_t<T>;
  const ChannelView v = channel_view(src);
  const auto k = channels<A>(v.C, mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, param, FROM_Y);
  std::vector<double> s1, s2;
  sums_all<T, KIND, FROM_Y>(v, src.data_ptr<T>(), dy.data_ptr<T>(), k, s1, s2);
  Tensor sum_dz = at::empty({v.C}, src.options().dtype(stat_type(src)));
  Tensor sum_dzx = at::empty({v.C}, src.options().dtype(stat_type(src)));
  for (int64_t c = 0; c < v.C; ++c) {
    sum_dz.data_ptr<A>()[c] = static_cast<A>(s1[c]);
    sum_dzx.data_ptr<A>()[c] = static_cast<A>(s2[c] * static_cast<double>(k.factor[c]));
  }
  return {sum_dz, sum_dzx};
}

template <typename T, int KIND, bool FROM_Y>
Tensor dx_impl(const Tensor& src, const Tensor& dy, const Tensor& mean, const Tensor& rstd, const Tensor& w,
               const Tensor& b, double param, const double* mean_dz, const double* mean_dzx) {
  using A = acc_t<T>;
  const ChannelView v = channel_view(src);
  const auto k = channels<A>(v.C, mean.data_ptr<A>(), rstd.data_ptr<A>(), w, b, param, FROM_Y);
  std::vector<A> q(v.C), rr(v.C);
  for (int64_t c = 0; c < v.C; ++c) {
    A unused1, unused2;
    finish_sums<A>(0.0, 0.0, k.factor[c], k.scale[c], mean_dz[c], mean_dzx[c], unused1, unused2, q[c], rr[c]);
  }
  Tensor dx = empty_like_x(src);
  dx_all<T, KIND, FROM_Y>(v, src.data_ptr<T>(), dy.data_ptr<T>(), dx.data_ptr<T>(), k, q.data(), rr.data());
  return dx;
}

}  // namespace iabn
}  // namespace normkit

// Dispatch on the kind (KIND) and, for the backward, the source (FROM_Y)
#define NK_IABN_KIND(kind, ...)                                                                 \
  [&] {                                                                                         \
    switch (kind) {                                                                             \
      case 0: { constexpr int KIND = 0; return __VA_ARGS__(); }                                 \
      case 1: { constexpr int KIND = 1; return __VA_ARGS__(); }                                 \
      case 2: { constexpr int KIND = 2; return __VA_ARGS__(); }                                 \
      default: TORCH_CHECK_VALUE(false, "normkit cpu backend: unknown in-place ABN kind ", kind); \
    }                                                                                           \
  }()

// ----------------------------------------------------------------------------- operators
// torch.ops.normkit_cpu.iabn_* (a fragment of the private library): called by normkit.cpu_backend from the
// autograd Function of normkit.ops_inplace with grad mode off, never traced. iabn_forward and iabn_apply write
// their output into x itself when in_place is true (the caller marks x dirty and bumps its version).
namespace normkit {
namespace iabn {

inline void check_source(const Tensor& x, const char* what) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "normkit cpu backend: expected a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0 && x.dim() >= 2, "normkit cpu backend: in-place ABN expects a non-empty (N, C, *) ",
                    what, ", got shape ", x.sizes());
  (void)geometry(x);  // raises for a non-dense tensor
}

// the kind, and a parameter the inversion can divide by when the backward reads the output
inline void check_kind(int64_t kind, double param, bool from_output = false) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "normkit cpu backend: unknown in-place ABN kind ", kind);
  TORCH_CHECK_VALUE(!from_output || kind == kLinear || param > 0.0,
                    "normkit cpu backend: inverting the activation needs a positive slope / alpha, got ", param);
}

inline std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                  const c10::optional<Tensor>& bias, double eps, int64_t kind,
                                                  double param, bool in_place) {
  check_source(x, "x");
  check_kind(kind, param);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor w = opt_vec(weight, sd, v.C, "weight"), b = opt_vec(bias, sd, v.C, "bias");
  return NK_DISPATCH_T(x.scalar_type(), [&] {
    return NK_IABN_KIND(kind, [&] { return forward_impl<T, KIND>(x, w, b, eps, param, in_place); });
  });
}

inline Tensor apply(const Tensor& x, const Tensor& scale, const Tensor& shift, int64_t kind, double param,
                    bool in_place) {
  check_source(x, "x");
  check_kind(kind, param);
  const ChannelView v = channel_view(x);
  const auto sd = stat_type(x);
  Tensor a = vec(scale, sd, v.C, "scale"), b = vec(shift, sd, v.C, "shift");
  Tensor y = in_place ? x : empty_like_x(x);
  NK_DISPATCH_T(x.scalar_type(), [&] {
    using A = acc_t<T>;
    std::vector<A> p(v.C, static_cast<A>(param));
    NK_IABN_KIND(kind, [&] {
      apply_all<T, KIND>(v, x.data_ptr<T>(), y.data_ptr<T>(), a.data_ptr<A>(), b.data_ptr<A>(), p.data());
    });
  });
  return y;
}

// the backward's arguments, checked and in the kernels' types: dy in src's strides, (C,) vectors in A
struct Args {
  Tensor dy, mean, rstd, w, b;
};

inline Args backward_args(const Tensor& src, const Tensor& dy, const Tensor& mean, const Tensor& rstd,
                          const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t kind,
                          double param, bool from_output) {
  check_source(src, "source");
  check_kind(kind, param, from_output);
  const int64_t C = src.size(1);
  const auto sd = stat_type(src);
  Args a{like_x(dy, src), vec(mean, sd, C, "mean"), vec(rstd, sd, C, "rstd"), opt_vec(weight, sd, C, "weight"),
         opt_vec(bias, sd, C, "bias")};
  return a;
}

#define NK_IABN_BWD(kind, from_output, fn, ...)                                           \
  NK_DISPATCH_T(src.scalar_type(), [&] {                                                  \
    return NK_IABN_KIND(kind, [&] {                                                       \
      return from_output ? fn<T, KIND, true>(__VA_ARGS__) : fn<T, KIND, false>(__VA_ARGS__); \
    });                                                                                   \
  })

inline std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& src, const Tensor& dy_, const Tensor& mean_,
                                                   const Tensor& rstd_, const c10::optional<Tensor>& weight,
                                                   const c10::optional<Tensor>& bias, int64_t kind, double param,
                                                   bool from_output, bool need_dx) {
  const Args a = backward_args(src, dy_, mean_, rstd_, weight, bias, kind, param, from_output);
  return NK_IABN_BWD(kind, from_output, backward_impl, src, a.dy, a.mean, a.rstd, a.w, a.b, param, need_dx);
}

inline std::tuple<Tensor, Tensor> backward_reduce(const Tensor& src, const Tensor& dy_, const Tensor& mean_,
                                                  const Tensor& rstd_, const c10::optional<Tensor>& weight,
                                                  const c10::optional<Tensor>& bias, int64_t kind, double param,
                                                  bool from_output) {
  const Args a = backward_args(src, dy_, mean_, rstd_, weight, bias, kind, param, from_output);
  return NK_IABN_BWD(kind, from_output, reduce_impl, src, a.dy, a.mean, a.rstd, a.w, a.b, param);
}

inline Tensor backward_dx(const Tensor& src, const Tensor& dy_, const Tensor& mean_, const Tensor& rstd_,
                          const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t kind,
                          double param, bool from_output, const Tensor& mean_dz, const Tensor& mean_dz_xhat) {
  const Args a = backward_args(src, dy_, mean_, rstd_, weight, bias, kind, param, from_output);
  const int64_t C = src.size(1);
  const Tensor mdz = vec(mean_dz, at::kDouble, C, "mean_dz"), mdzx = vec(mean_dz_xhat, at::kDouble, C, "mean_dz_xhat");
  return NK_IABN_BWD(kind, from_output, dx_impl, src, a.dy, a.mean, a.rstd, a.w, a.b, param,
                     mdz.data_ptr<double>(), mdzx.data_ptr<double>());
}

#undef NK_IABN_BWD

}  // namespace iabn
}  // namespace normkit

TORCH_LIBRARY_FRAGMENT(normkit_cpu, m) {
  m.def("iabn_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int kind, float param, bool in_place) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("iabn_apply(Tensor x, Tensor scale, Tensor shift, int kind, float param, bool in_place) -> Tensor");
  m.def("iabn_backward(Tensor source, Tensor dy, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, int kind, "
        "float param, bool from_output, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("iabn_backward_reduce(Tensor source, Tensor dy, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "int kind, float param, bool from_output) -> (Tensor, Tensor)");
  m.def("iabn_backward_dx(Tensor source, Tensor dy, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "int kind, float param, bool from_output, Tensor mean_dz, Tensor mean_dz_xhat) -> Tensor");
}

TORCH_LIBRARY_IMPL(normkit_cpu, CPU, m) {
  m.impl("iabn_forward", &normkit::iabn::forward);
  m.impl("iabn_apply", &normkit::iabn::apply);
  m.impl("iabn_backward", &normkit::iabn::backward);
  m.impl("iabn_backward_reduce", &normkit::iabn::backward_reduce);
  m.impl("iabn_backward_dx", &normkit::iabn::backward_dx);
}
