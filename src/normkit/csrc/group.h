// Row family, part 2: GroupNorm and InstanceNorm (num_groups = C); statistics per (sample, group).
//
// NCHW — a (sample, group) block of C/G × S values is contiguous and is the parallel unit: its
//   statistics pass brings it into cache and the apply (dx) pass rereads it from there.
// channels_last — a group is strided, a sample is contiguous. Per-channel accumulators run over
//   chunks of at most kGroupChunk positions (flushed to double in chunk order), channels are
//   added into their group in double. With at least two samples per thread the sample is the
//   unit (statistics, then apply from cache); with fewer, chunks are the unit and their totals
//   go through a table added in the same order — the same bits either way.
#pragma once

#include <memory>

#include "channel.h"

namespace normkit {

constexpr int64_t kGroupChunk = 512;

inline bool per_sample_units(int64_t N) { return N >= 2 * static_cast<int64_t>(at::get_num_threads()); }

// Per-sample, per-channel (t1, t2) of the CL layout: acc(n, p0, np, a, q) accumulates positions
// [p0, p0 + np) of sample n into A accumulators; chunk totals are added in chunk order. With
// `fused`, each sample runs whole in one task and after(n, t1, t2) follows at once (data in
// cache); otherwise chunks run in parallel into a table, then after() runs per sample.
template <typename A, typename Acc, typename After>
void cl_group_pass(int64_t N, int64_t S, int64_t C, const Acc& acc, const After& after) {
  const int64_t nch = (S + kGroupChunk - 1) / kGroupChunk;
  auto chunk = [&](int64_t n, int64_t j, A* a, A* q) {
    std::fill(a, a + C, A(0));
    std::fill(q, q + C, A(0));
    const int64_t p0 = j * kGroupChunk;
    acc(n, p0, std::min(kGroupChunk, S - p0), a, q);
  };
  if (per_sample_units(N)) {
    parallel(N, grain_for(2 * S * C), [&](int64_t lo, int64_t hi) {
      std::vector<A> a(C), q(C);
      std::vector<double> t1(C), t2(C);
      for (int64_t n = lo; n < hi; ++n) {
        std::fill(t1.begin(), t1.end(), 0.0);
        std::fill(t2.begin(), t2.end(), 0.0);
        for (int64_t j = 0; j < nch; ++j) {
          chunk(n, j, a.data(), q.data());
          for (int64_t c = 0; c < C; ++c) {
            t1[c] += static_cast<double>(a[c]);
            t2[c] += static_cast<double>(q[c]);
          }
        }
        after(n, t1.data(), t2.data(), true);
      }
    });
    return;
  }
  std::vector<double> tab1(N * nch * C), tab2(N * nch * C);
  parallel(N * nch, grain_for(kGroupChunk * C), [&](int64_t lo, int64_t hi) {
    std::vector<A> a(C), q(C);
    for (int64_t t = lo; t < hi; ++t) {
      chunk(t / nch, t % nch, a.data(), q.data());
      for (int64_t c = 0; c < C; ++c) {
        tab1[t * C + c] = static_cast<double>(a[c]);
        tab2[t * C + c] = static_cast<double>(q[c]);
      }
    }
  });
  std::vector<double> t1(C), t2(C);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(t1.begin(), t1.end(), 0.0);
    std::fill(t2.begin(), t2.end(), 0.0);
    for (int64_t j = 0; j < nch; ++j) {
      const double* r1 = tab1.data() + (n * nch + j) * C;
      const double* r2 = tab2.data() + (n * nch + j) * C;
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += r1[c];
        t2[c] += r2[c];
      }
    }
    after(n, t1.data(), t2.data(), false);
  }
}

// The elementwise second pass of the CL layout over all samples (split mode): f(n, p0, np).
template <typename F>
void cl_positions(int64_t N, int64_t S, int64_t C, const F& f) {
  const int64_t nch = (S + kGroupChunk - 1) / kGroupChunk;
  parallel(N * nch, grain_for(kGroupChunk * C), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / nch, p0 = (t % nch) * kGroupChunk;
      f(n, p0, std::min(kGroupChunk, S - p0));
    }
  });
}

template <typename T, int ACT>
std::tuple<Tensor, Tensor, Tensor> group_forward_impl(const Tensor& x, int64_t G, const Tensor& w_, const Tensor& b_,
                                                      double eps, const Tensor& res, double act_param) {
  using A = acc_t<T>;
  using L = Loops<T, ACT>;
  const L loops(act_param);
  const Geometry geo = geometry(x);
  const int64_t N = geo.n, C = geo.c, S = geo.s, cg = C / G;
  const T* xp = x.data_ptr<T>();
  const T* rp = ptr_or_null<T>(res);
  Tensor y = empty_like_x(x);
  T* yp = y.data_ptr<T>();
  Tensor mean = at::empty({N, G}, x.options().dtype(stat_type(x)));
  Tensor var = at::empty({N, G}, x.options().dtype(stat_type(x)));
  A* mp = mean.data_ptr<A>();
  A* vp = var.data_ptr<A>();
  const auto w = vec_or<T>(w_, C, A(1));
  const auto b = vec_or<T>(b_, C, A(0));
  if (x.is_contiguous()) {
    const int64_t len = cg * S;
    parallel(N * G, grain_for(2 * len), [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t start = blk * len, g = blk % G;
        const A k = ld(xp, start);  // a value of the block: the shift that keeps a large mean exact
        double s1 = 0, s2 = 0, m, v;
        L::span_sums(xp + start, len, k, s1, s2);
        moments(k, s1, s2, len, m, v);
        const A mu = static_cast<A>(m);
        mp[blk] = mu;
        vp[blk] = static_cast<A>(v);
        const A rs = A(1) / std::sqrt(vp[blk] + static_cast<A>(eps));
        for (int64_t ci = 0; ci < cg; ++ci) {
          const int64_t c = g * cg + ci, o = start + ci * S;
          const A aa = rs * w[c];
          loops.span_apply(xp + o, rp ? rp + o : nullptr, yp + o, S, aa, b[c] - mu * aa);
        }
      }
    });
    return {y, mean, var};
  }
  // channels_last: (N, S, C)
  std::vector<A> k(N * C), scale(N * C), shift(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) k[n * C + c] = ld(xp, n * S * C + (c / cg) * cg);
  auto apply = [&](int64_t n, int64_t p0, int64_t np) {
    const int64_t o = (n * S + p0) * C;
    loops.pos_apply(xp + o, rp ? rp + o : nullptr, yp + o, np, C, scale.data() + n * C, shift.data() + n * C);
  };
  cl_group_pass<A>(N, S, C, [&](int64_t n, int64_t p0, int64_t np, A* a, A* q) {
    L::pos_sums(xp + (n * S + p0) * C, np, C, k.data() + n * C, a, q);
  }, [&](int64_t n, const double* t1, const double* t2, bool fused) {
    for (int64_t g = 0; g < G; ++g) {
      double s1 = 0, s2 = 0, m, v;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        s1 += t1[c];
        s2 += t2[c];
      }
      moments(k[n * C + g * cg], s1, s2, cg * S, m, v);
      const A mu = static_cast<A>(m);
      mp[n * G + g] = mu;
      vp[n * G + g] = static_cast<A>(v);
      const A rs = A(1) / std::sqrt(vp[n * G + g] + static_cast<A>(eps));
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        scale[n * C + c] = rs * w[c];
        shift[n * C + c] = b[c] - mu * scale[n * C + c];
      }
    }
    if (fused) apply(n, 0, S);
  });
  if (!per_sample_units(N)) cl_positions(N, S, C, apply);
  return {y, mean, var};
}

template <typename T, int ACT>
std::tuple<Tensor, Tensor, Tensor, Tensor> group_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& mean,
                                                               const Tensor& rstd, int64_t G, const Tensor& w_,
                                                               const Tensor& b_, const Tensor& res, bool need_dw,
                                                               bool need_dz, double act_param) {
  using A = acc_t<T>;
  const Loops<T, ACT> L(act_param);
  const Geometry geo = geometry(x);
  const int64_t N = geo.n, C = geo.c, S = geo.s, cg = C / G;
  const double inv_count = 1.0 / static_cast<double>(cg * S);
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  const T* rp = ptr_or_null<T>(res);
  Tensor dx = empty_like_x(x);
  Tensor dz = need_dz ? empty_like_x(x) : Tensor();
  T* dxp = dx.data_ptr<T>();
  T* dzp = need_dz ? dz.data_ptr<T>() : nullptr;
  const A* mp = mean.data_ptr<A>();
  const A* rsp = rstd.data_ptr<A>();
  const auto w = vec_or<T>(w_, C, A(1));
  const auto b = vec_or<T>(b_, C, A(0));
  // Σ_s dz and Σ_s dz·x̂ per (n, c): every entry is written before it is read (when dγ/dβ are wanted, or by
  // the per-channel passes), so the buffers are left uninitialised (zeroing them was a serial memset of 16·N·C
  // bytes ahead of the parallel passes)
  const std::unique_ptr<double[]> sa_buf(new double[N * C]), sb_buf(new double[N * C]);
  double* const sa = sa_buf.get();
  double* const sb = sb_buf.get();
  Tensor kept;  // dz between the passes (kKeepsGrad kinds): kept_grad_memory, loops.h
  A* gs = kept_grad_memory<T, ACT>(x, dxp, kept);
  if (x.is_contiguous()) {
    const int64_t len = cg * S;
    // Without weight and bias every channel of a group has the same coefficients and no per-channel sums
    // are wanted (no dγ/dβ asked for): the group's cg·S values are one span, not cg spans of S (7×7 maps: 49 values a
    // span, where the vector loops' tails and reductions cost as much as the values)
    const bool one_span = !w_.defined() && !b_.defined() && !need_dw;
    // (qq, rr) of block blk from its channel sums (sa, sb filled on the way)
    auto sums = [&](int64_t blk, A& qq, A& rr) {
      const int64_t n = blk / G, g = blk % G, start = blk * len;
      const A mu = mp[blk], rs = rsp[blk];
      double sum_g = 0, sum_gx = 0;
      if (one_span) {
        double t2 = 0;
        L.span_bwd_sums(xp + start, dyp + start, rp ? rp + start : nullptr, len, rs, A(0) - mu * rs, mu, sum_g, t2,
                        gs ? gs + start : nullptr);
        sum_gx = t2 * rs;
        const double drs = rs;
        qq = static_cast<A>(-drs * drs * (sum_gx * inv_count));
        rr = static_cast<A>(-drs * (sum_g * inv_count));
        return;
      }
      for (int64_t ci = 0; ci < cg; ++ci) {
        const int64_t c = g * cg + ci, o = start + ci * S;
        const A aa = rs * w[c];
        double t1 = 0, t2 = 0;
        L.span_bwd_sums(xp + o, dyp + o, rp ? rp + o : nullptr, S, aa, b[c] - mu * aa, mu, t1, t2,
                        gs ? gs + o : nullptr);
        sa[n * C + c] = t1;
        sb[n * C + c] = t2 * rs;
        sum_g += w[c] * t1;
        sum_gx += w[c] * t2 * rs;
      }
      const double drs = rs;
      qq = static_cast<A>(-drs * drs * (sum_gx * inv_count));
      rr = static_cast<A>(-drs * (sum_g * inv_count));
    };
    auto apply = [&](int64_t blk, A qq, A rr) {
      const int64_t g = blk % G, start = blk * len;
      const A mu = mp[blk], rs = rsp[blk];
      if (one_span) {
        L.span_bwd_dx(xp + start, dyp + start, rp ? rp + start : nullptr, dxp + start, dzp ? dzp + start : nullptr,
                      len, rs, A(0) - mu * rs, rs, qq, mu, rr, gs ? gs + start : nullptr);
        return;
      }
      for (int64_t ci = 0; ci < cg; ++ci) {
        const int64_t c = g * cg + ci, o = start + ci * S;
        const A aa = rs * w[c];
        L.span_bwd_dx(xp + o, dyp + o, rp ? rp + o : nullptr, dxp + o, dzp ? dzp + o : nullptr, S, aa,
                      b[c] - mu * aa, aa, qq, mu, rr, gs ? gs + o : nullptr);
      }
    };
    parallel(N * G, grain_for(3 * len), [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        A qq, rr;
        sums(blk, qq, rr);
        apply(blk, qq, rr);
      }
    });
  } else {
    std::vector<A> fa(N * C), fb(N * C), m(N * C), qq(N * C), rr(N * C);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c, ng = n * G + c / cg;
        m[i] = mp[ng];
        fa[i] = rsp[ng] * w[c];
        fb[i] = b[c] - m[i] * fa[i];
      }
    }
    auto dx_pass = [&](int64_t n, int64_t p0, int64_t np) {
      const int64_t o = (n * S + p0) * C, v = n * C;
      L.pos_bwd_dx(xp + o, dyp + o, rp ? rp + o : nullptr, dxp + o, dzp ? dzp + o : nullptr, np, C, fa.data() + v,
                   fb.data() + v, fa.data() + v, qq.data() + v, m.data() + v, rr.data() + v, false,
                   gs ? gs + o : nullptr);
    };
    cl_group_pass<A>(N, S, C, [&](int64_t n, int64_t p0, int64_t np, A* a, A* q) {
      const int64_t o = (n * S + p0) * C, v = n * C;
      L.pos_bwd_sums(xp + o, dyp + o, rp ? rp + o : nullptr, np, C, fa.data() + v, fb.data() + v, m.data() + v, a,
                     q, gs ? gs + o : nullptr);
    }, [&](int64_t n, const double* t1, const double* t2, bool fused) {
      for (int64_t g = 0; g < G; ++g) {
        const double rs = rsp[n * G + g];
        double mg = 0, mgx = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          sa[n * C + c] = t1[c];
          sb[n * C + c] = t2[c] * rs;
          mg += w[c] * t1[c];
          mgx += w[c] * t2[c] * rs;
        }
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          qq[n * C + c] = static_cast<A>(-rs * rs * (mgx * inv_count));
          rr[n * C + c] = static_cast<A>(-rs * (mg * inv_count));
        }
      }
      if (fused) dx_pass(n, 0, S);
    });
    if (!per_sample_units(N)) cl_positions(N, S, C, dx_pass);
  }
  Tensor dweight, dbias;
  if (need_dw) {
    dweight = at::empty({C}, x.options().dtype(stat_type(x)));
    dbias = at::empty({C}, x.options().dtype(stat_type(x)));
    A* dw = dweight.data_ptr<A>();
    A* db = dbias.data_ptr<A>();
    // each channel adds its samples in order n = 0, 1, ... (the bits of a column-wise loop), row by row: the
    // column-wise walk of the (N, C) sums strode C doubles a load and ran serially after the parallel passes
    // (64×128×7×7: about a tenth of the backward at 2 threads)
    std::vector<double> s1(C, 0.0), s2(C, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const double* a = sa + n * C;
      const double* q = sb + n * C;
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += a[c];
        s2[c] += q[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      db[c] = static_cast<A>(s1[c]);
      dw[c] = static_cast<A>(s2[c]);
    }
  }
  return {dx, dweight, dbias, dz};
}

}  // namespace normkit
