// Channel family (BatchNorm and friends): statistics per channel over N × spatial.
//
// NCHW — x is (N, C, S): channel c is N rows of S contiguous values. Every per-channel sum is
//   Σ_n (row total), each row total blocked as in common.h. The whole-BatchNorm kernels take
//   blocks of adjacent channels as the parallel unit: the second pass over a block (apply after
//   the statistics, dx after the two sums) finds its rows still in cache, so x and dy come from
//   memory about once. With fewer channels than threads the same sums run row-parallel into a
//   table and are added in the same order: both paths give the same bits.
// CL — x is (P, C) with P = N·S positions (channels_last, BatchNorm1d's (N, C), S == 1): blocks
//   of at most 4096 positions keep one accumulator per channel (the inner loop over c
//   vectorises); block totals go to a (blocks, C) table of doubles added in block order.
//
// Statistics are shifted sums Σ(x − k), Σ(x − k)² with k a value of the channel (Chan, Golub &
// LeVeque 1983): one pass, and a large common mean cancels before it can ruin the variance.
#pragma once

#include "loops.h"

namespace normkit {

// positions per CL block: about 64 blocks, at least 16 positions, at most kChunk (fp32 drift), the blocks evened
// out (72 positions: 5 blocks of 15 or 12, not 64 + 8 — with the activations' work in the backward's sums pass, one
// big block left a thread idle at small maps). A function of P only: the same blocks, hence the same sums, for any
// thread count.
inline int64_t cl_rows(int64_t P) {
  const int64_t r = std::min<int64_t>(kChunk, std::max<int64_t>(16, (P + 63) / 64));
  const int64_t blocks = (P + r - 1) / r;
  return std::max<int64_t>(1, (P + blocks - 1) / std::max<int64_t>(blocks, 1));
}

inline void moments(double k, double s1, double s2, int64_t count, double& mean, double& var) {
  const double d = s1 / static_cast<double>(count);
  mean = k + d;
  var = std::max(s2 / static_cast<double>(count) - d * d, 0.0);
}

// Per-channel (s1, s2) from per-(n, c) row sums f(row, a, q) — rows in parallel, merged in n order.
template <typename F>
inline void nchw_channel_sums(int64_t N, int64_t C, int64_t S, const F& f, std::vector<double>& s1,
                              std::vector<double>& s2) {
  std::vector<double> r1(N * C), r2(N * C);
  parallel(N * C, grain_for(S), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double a = 0, q = 0;
      f(r, a, q);
      r1[r] = a;
      r2[r] = q;
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += r1[n * C + c];
      s2[c] += r2[n * C + c];
    }
  }
}

// Per-channel (s1, s2) over P positions of C channels from per-block accumulation
// f(first_position, positions, a, q) into A accumulators — blocks in parallel, merged in order.
template <typename A, typename F>
inline void cl_channel_sums(int64_t P, int64_t C, const F& f, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t R = cl_rows(P);
  const int64_t nb = (P + R - 1) / R;
  std::vector<double> t1(nb * C), t2(nb * C);
  parallel(nb, grain_for(R * C), [&](int64_t b, int64_t e) {
    std::vector<A> a(C), q(C);
    for (int64_t j = b; j < e; ++j) {
      std::fill(a.begin(), a.end(), A(0));
      std::fill(q.begin(), q.end(), A(0));
      const int64_t p0 = j * R;
      f(p0, std::min(R, P - p0), a.data(), q.data());
      for (int64_t c = 0; c < C; ++c) {
        t1[j * C + c] = static_cast<double>(a[c]);
        t2[j * C + c] = static_cast<double>(q[c]);
      }
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int64_t j = 0; j < nb; ++j) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += t1[j * C + c];
      s2[c] += t2[j * C + c];
    }
  }
}

// BatchNorm's view: CL order treats all N·S positions as one sample.
struct ChannelView {
  int64_t N, C, S, P;
  bool cl;
};

inline ChannelView channel_view(const Tensor& x) {
  Geometry g = geometry(x);
  return {g.n, g.c, g.s, g.n * g.s, g.cl};
}

// The shift of each channel's sums: its first value.
template <typename T>
inline std::vector<acc_t<T>> channel_shift(const T* x, const ChannelView& v) {
  std::vector<acc_t<T>> k(v.C);
  for (int64_t c = 0; c < v.C; ++c) k[c] = ld(x, v.cl ? c : c * v.S);
  return k;
}

// (Σ dz, Σ dz·x̂) → (sum_dz, sum_dz_xhat, q, rr) in A, with dx = scale·dz + q·(x − mean) + rr.
template <typename A>
inline void dx_coefficients(double s1, double s2, A scale, A rstd, int64_t count, bool batch_stats, A& sdz, A& sdzx,
                            A& q, A& rr) {
  sdz = static_cast<A>(s1);
  sdzx = static_cast<A>(s2 * static_cast<double>(rstd));
  const A mdz = batch_stats ? sdz / static_cast<A>(count) : A(0);
  const A mdzx = batch_stats ? sdzx / static_cast<A>(count) : A(0);
  const double sc = scale;
  q = static_cast<A>(-sc * static_cast<double>(rstd) * static_cast<double>(mdzx));
  rr = static_cast<A>(-sc * static_cast<double>(mdz));
}

// scale = γ·rsqrt(var + eps), shift = β − mean·scale, in the stat dtype as the composed path does
template <typename A>
inline void scale_shift(A mean, A var, A w, A b, double eps, A& scale, A& shift) {
  const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
  scale = w * rs;
  shift = -mean * scale + b;
}

// ----------------------------------------------------------------------------- channel_stats
template <typename T>
std::tuple<Tensor, Tensor> channel_stats_impl(const Tensor& x) {
  using A = acc_t<T>;
  const ChannelView v = channel_view(x);
  const T* xp = x.data_ptr<T>();
  const auto k = channel_shift(xp, v);
  std::vector<double> s1, s2;
  if (v.cl) {
    cl_channel_sums<A>(v.P, v.C, [&](int64_t p0, int64_t np, A* a, A* q) {
      Loops<T, 0>::pos_sums(xp + p0 * v.C, np, v.C, k.data(), a, q);
    }, s1, s2);
  } else {
    nchw_channel_sums(v.N, v.C, v.S, [&](int64_t r, double& a, double& q) {
      Loops<T, 0>::span_sums(xp + r * v.S, v.S, k[r % v.C], a, q);
    }, s1, s2);
  }
  Tensor mean = at::empty({v.C}, x.options().dtype(stat_type(x)));
  Tensor var = at::empty({v.C}, x.options().dtype(stat_type(x)));
  A* mp = mean.data_ptr<A>();
  A* vp = var.data_ptr<A>();
  for (int64_t c = 0; c < v.C; ++c) {
    double m, s;
    moments(k[c], s1[c], s2[c], v.P, m, s);
    mp[c] = static_cast<A>(m);
    vp[c] = static_cast<A>(s);
  }
  return {mean, var};
}

// ----------------------------------------------------------------------------- passes
// Whether the CL element passes write their output (y, dx) with non-temporal stores: outputs of
// 8 MiB or more, which a core's share of the last-level cache would not keep anyway (memcpy
// implementations stream above a similar size). The store then skips reading each output line
// from memory first (a quarter of the forward's traffic, a sixth of the backward's) and leaves the
// cache to the inputs: CL BN+ReLU forward 3.3 -> 3.0 ms at 32x64x56x56 fp32, 1 thread. Where
// the values go changes no value.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

inline bool stream_outputs(int64_t bytes) { return bytes >= kStreamBytes; }

// The four passes on raw pointers, coefficient vectors (C,) in A.

template <typename T, int ACT>
void apply_channels(const ChannelView& v, const T* x, const T* r, T* y, const acc_t<T>* a, const acc_t<T>* b,
                    double act_param) {
  const Loops<T, ACT> L(act_param);
  if (v.cl) {
    const bool nt = stream_outputs(v.P * v.C * static_cast<int64_t>(sizeof(T)));
    parallel(v.P, grain_for(v.C), [&](int64_t lo, int64_t hi) {
      L.pos_apply(x + lo * v.C, r ? r + lo * v.C : nullptr, y + lo * v.C, hi - lo, v.C, a, b, nt);
    });
  } else {
    parallel(v.N * v.C, grain_for(v.S), [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t c = row % v.C, o = row * v.S;
        L.span_apply(x + o, r ? r + o : nullptr, y + o, v.S, a[c], b[c]);
      }
    });
  }
}

template <typename T, int ACT>
void bwd_sums_channels(const ChannelView& v, const T* x, const T* dy, const T* r, const acc_t<T>* fa,
                       const acc_t<T>* fb, const acc_t<T>* m, std::vector<double>& s1, std::vector<double>& s2,
                       acc_t<T>* gs, double act_param) {
  using A = acc_t<T>;
  const Loops<T, ACT> L(act_param);
  if (v.cl) {
    cl_channel_sums<A>(v.P, v.C, [&](int64_t p0, int64_t np, A* a, A* q) {
      const int64_t o = p0 * v.C;
      L.pos_bwd_sums(x + o, dy + o, r ? r + o : nullptr, np, v.C, fa, fb, m, a, q, gs ? gs + o : nullptr);
    }, s1, s2);
  } else {
    nchw_channel_sums(v.N, v.C, v.S, [&](int64_t row, double& a, double& q) {
      const int64_t c = row % v.C, o = row * v.S;
      L.span_bwd_sums(x + o, dy + o, r ? r + o : nullptr, v.S, fa[c], fb[c], m[c], a, q, gs ? gs + o : nullptr);
    }, s1, s2);
  }
}

template <typename T, int ACT>
void bwd_dx_channels(const ChannelView& v, const T* x, const T* dy, const T* r, T* dx, T* dz, const acc_t<T>* fa,
                     const acc_t<T>* fb, const acc_t<T>* p, const acc_t<T>* q, const acc_t<T>* m,
                     const acc_t<T>* rr, const acc_t<T>* gs, double act_param) {
  const Loops<T, ACT> L(act_param);
  if (v.cl) {
    const bool nt = stream_outputs(v.P * v.C * static_cast<int64_t>(sizeof(T)));
    parallel(v.P, grain_for(v.C), [&](int64_t lo, int64_t hi) {
      const int64_t o = lo * v.C;
      L.pos_bwd_dx(x + o, dy + o, r ? r + o : nullptr, dx + o, dz ? dz + o : nullptr, hi - lo, v.C, fa, fb, p, q,
                   m, rr, nt, gs ? gs + o : nullptr);
    });
  } else {
    parallel(v.N * v.C, grain_for(v.S), [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t c = row % v.C, o = row * v.S;
        L.span_bwd_dx(x + o, dy + o, r ? r + o : nullptr, dx + o, dz ? dz + o : nullptr, v.S, fa[c], fb[c], p[c],
                      q[c], m[c], rr[c], gs ? gs + o : nullptr);
      }
    });
  }
}

// Channels per block of the whole-BatchNorm NCHW kernels: runs of >= 2048 values per sample keep
// the prefetcher busy, and about 4 blocks per thread balance the load. Only the work split: each
// channel's sums run over n in the same order whatever the width.
inline int64_t channel_block(const ChannelView& v) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>((2048 + v.S - 1) / v.S, v.C / (4 * threads)));
}

inline bool blocked_nchw(const ChannelView& v) {
  return !v.cl && v.C >= 2 * static_cast<int64_t>(at::get_num_threads());
}

// Whether NCHW BatchNorm's blocked passes run the activation over each sample's run of the block's channels
// (flat_apply / flat_grad with per-value coefficients) rather than channel by channel: for maps shorter than 64
// values, whose spans would end in a partial vector pair every few values. The values are the same either way.
inline bool flat_runs(const ChannelView& v) { return v.S < 64; }

// The per-channel coefficients (a_c, b_c) of `channels` channels as one pair per value of their run of
// channels·S values (each repeated S times), into ea, eb
template <typename A>
inline void expand(const A* a, const A* b, int64_t channels, int64_t S, std::vector<A>& ea, std::vector<A>& eb) {
  ea.resize(channels * S);
  eb.resize(channels * S);
  for (int64_t c = 0; c < channels; ++c) {
    std::fill(ea.begin() + c * S, ea.begin() + (c + 1) * S, a[c]);
    std::fill(eb.begin() + c * S, eb.begin() + (c + 1) * S, b[c]);
  }
}

// ----------------------------------------------------------------------------- whole BatchNorm
template <typename T, int ACT>
std::tuple<Tensor, Tensor, Tensor> channel_forward_impl(const Tensor& x, const Tensor& w_, const Tensor& b_,
                                                        double eps, const Tensor& res, double act_param) {
  using A = acc_t<T>;
  using L = Loops<T, ACT>;
  const L loops(act_param);
  const ChannelView v = channel_view(x);
  const T* xp = x.data_ptr<T>();
  const T* rp = ptr_or_null<T>(res);
  Tensor y = empty_like_x(x);
  T* yp = y.data_ptr<T>();
  Tensor mean = at::empty({v.C}, x.options().dtype(stat_type(x)));
  Tensor var = at::empty({v.C}, x.options().dtype(stat_type(x)));
  A* mp = mean.data_ptr<A>();
  A* vp = var.data_ptr<A>();
  const auto w = vec_or<T>(w_, v.C, A(1));
  const auto b = vec_or<T>(b_, v.C, A(0));
  const auto k = channel_shift(xp, v);
  std::vector<A> scale(v.C), shift(v.C);
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
      std::vector<A> ea, eb;  // the block's coefficients per value (kKeepsGrad kinds)
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t c0 = j * cb, c1 = std::min(v.C, c0 + cb);
        for (int64_t c = c0; c < c1; ++c) {
          double s1 = 0, s2 = 0;
          for (int64_t n = 0; n < v.N; ++n) {
            double a = 0, q = 0;
            L::span_sums(xp + (n * v.C + c) * v.S, v.S, k[c], a, q);
            s1 += a;
            s2 += q;
          }
          finish(c, s1, s2);
        }
        if (kKeepsGrad<ACT> && flat_runs(v)) {
          // the block's channels of one sample are one run of (c1 − c0)·S values: one vector loop with a coefficient
          // pair per value, so short maps (3×3) do not pay a partial vector of the activation every few values
          const int64_t len = (c1 - c0) * v.S;
          expand(scale.data() + c0, shift.data() + c0, c1 - c0, v.S, ea, eb);
          for (int64_t n = 0; n < v.N; ++n) {
            const int64_t o = (n * v.C + c0) * v.S;
            loops.flat_apply(xp + o, rp ? rp + o : nullptr, yp + o, ea.data(), eb.data(), len);
          }
          continue;
        }
        for (int64_t n = 0; n < v.N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t o = (n * v.C + c) * v.S;
            loops.span_apply(xp + o, rp ? rp + o : nullptr, yp + o, v.S, scale[c], shift[c]);
          }
        }
      }
    });
  } else {
    std::vector<double> s1, s2;
    if (v.cl) {
      cl_channel_sums<A>(v.P, v.C, [&](int64_t p0, int64_t np, A* a, A* q) {
        L::pos_sums(xp + p0 * v.C, np, v.C, k.data(), a, q);
      }, s1, s2);
    } else {
      nchw_channel_sums(v.N, v.C, v.S, [&](int64_t r, double& a, double& q) {
        L::span_sums(xp + r * v.S, v.S, k[r % v.C], a, q);
      }, s1, s2);
    }
    for (int64_t c = 0; c < v.C; ++c) finish(c, s1[c], s2[c]);
    apply_channels<T, ACT>(v, xp, rp, yp, scale.data(), shift.data(), act_param);
  }
  return {y, mean, var};
}

template <typename T, int ACT>
std::tuple<Tensor, Tensor, Tensor, Tensor> channel_backward_impl(const Tensor& x, const Tensor& dy,
                                                                 const Tensor& mean, const Tensor& rstd,
                                                                 const Tensor& scale, const Tensor& shift,
                                                                 const Tensor& res, bool batch_stats, bool need_dz,
                                                                 double act_param) {
  using A = acc_t<T>;
  const Loops<T, ACT> L(act_param);
  const ChannelView v = channel_view(x);
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  const T* rp = ptr_or_null<T>(res);
  Tensor dx = empty_like_x(x);
  Tensor dz = need_dz ? empty_like_x(x) : Tensor();
  T* dxp = dx.data_ptr<T>();
  T* dzp = need_dz ? dz.data_ptr<T>() : nullptr;
  const A* m = mean.data_ptr<A>();
  const A* rs = rstd.data_ptr<A>();
  const A* fa = scale.data_ptr<A>();
  const A* fb = shift.data_ptr<A>();
  Tensor sum_dz = at::empty({v.C}, x.options().dtype(stat_type(x)));
  Tensor sum_dz_xhat = at::empty({v.C}, x.options().dtype(stat_type(x)));
  A* sa = sum_dz.data_ptr<A>();
  A* sb = sum_dz_xhat.data_ptr<A>();
  std::vector<A> q(v.C), rr(v.C);
  Tensor kept;  // dz between the passes (kKeepsGrad kinds): kept_grad_memory, loops.h
  A* gs = kept_grad_memory<T, ACT>(x, dxp, kept);
  if (blocked_nchw(v)) {
    const int64_t cb = channel_block(v);
    const int64_t blocks = (v.C + cb - 1) / cb;
    parallel(blocks, grain_for(2 * cb * v.N * v.S), [&](int64_t lo, int64_t hi) {
      std::vector<A> ea, eb;  // the block's coefficients per value (kKeepsGrad kinds)
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t c0 = j * cb, c1 = std::min(v.C, c0 + cb);
        if (kKeepsGrad<ACT> && flat_runs(v)) {
          // dz of the block's run of (c1 − c0)·S values per sample, one vector loop (as the forward's flat_apply),
          // kept; then the sums and dx per channel from it
          expand(fa + c0, fb + c0, c1 - c0, v.S, ea, eb);
          for (int64_t n = 0; n < v.N; ++n) {
            const int64_t o = (n * v.C + c0) * v.S;
            L.flat_grad(xp + o, dyp + o, rp ? rp + o : nullptr, ea.data(), eb.data(), (c1 - c0) * v.S, gs + o);
          }
          for (int64_t c = c0; c < c1; ++c) {
            double s1 = 0, s2 = 0;
            for (int64_t n = 0; n < v.N; ++n) {
              double a = 0, qq = 0;
              const int64_t o = (n * v.C + c) * v.S;
              Loops<T, ACT>::span_kept_sums(xp + o, gs + o, v.S, m[c], a, qq);
              s1 += a;
              s2 += qq;
            }
            dx_coefficients<A>(s1, s2, fa[c], rs[c], v.P, batch_stats, sa[c], sb[c], q[c], rr[c]);
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            double s1 = 0, s2 = 0;
            for (int64_t n = 0; n < v.N; ++n) {
              double a = 0, qq = 0;
              const int64_t o = (n * v.C + c) * v.S;
              L.span_bwd_sums(xp + o, dyp + o, rp ? rp + o : nullptr, v.S, fa[c], fb[c], m[c], a, qq,
                              gs ? gs + o : nullptr);
              s1 += a;
              s2 += qq;
            }
            dx_coefficients<A>(s1, s2, fa[c], rs[c], v.P, batch_stats, sa[c], sb[c], q[c], rr[c]);
          }
        }
        for (int64_t n = 0; n < v.N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t o = (n * v.C + c) * v.S;
            L.span_bwd_dx(xp + o, dyp + o, rp ? rp + o : nullptr, dxp + o, dzp ? dzp + o : nullptr, v.S, fa[c],
                          fb[c], fa[c], q[c], m[c], rr[c], gs ? gs + o : nullptr);
          }
        }
      }
    });
  } else {
    std::vector<double> s1, s2;
    bwd_sums_channels<T, ACT>(v, xp, dyp, rp, fa, fb, m, s1, s2, gs, act_param);
    for (int64_t c = 0; c < v.C; ++c) dx_coefficients<A>(s1[c], s2[c], fa[c], rs[c], v.P, batch_stats, sa[c], sb[c], q[c], rr[c]);
    bwd_dx_channels<T, ACT>(v, xp, dyp, rp, dxp, dzp, fa, fb, fa, q.data(), m, rr.data(), gs, act_param);
  }
  return {dx, sum_dz, sum_dz_xhat, dz};
}

}  // namespace normkit
