// Row family, part 1: LayerNorm and RMSNorm over the rows of a contiguous (M, K) tensor.
//
// A row is the parallel unit. Its statistics are one blocked pass of shifted sums (common.h):
// Σ(x − x0) and Σ(x − x0)² merged in double (RMS: Σx²), then the output from cache. The weight
// gradient sums over rows: fixed blocks of rows (about 64 blocks, at most 1024 rows each) keep
// per-column accumulators, and their totals are added in block order in double — the same bits
// for any thread count.
#pragma once

#include "channel.h"

namespace normkit {

template <typename T>
std::tuple<Tensor, Tensor, Tensor> row_forward_impl(const Tensor& x, const Tensor& w_, const Tensor& b_, double eps,
                                                    bool rms) {
  using A = acc_t<T>;
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  Tensor y = at::empty_like(x);
  T* yp = y.data_ptr<T>();
  Tensor mean = rms ? Tensor() : at::empty({M}, x.options().dtype(stat_type(x)));
  Tensor rstd = at::empty({M}, x.options().dtype(stat_type(x)));
  A* mp = rms ? nullptr : mean.data_ptr<A>();
  A* rp = rstd.data_ptr<A>();
  const A* w = ptr_or_null<A>(w_);
  const A* b = ptr_or_null<A>(b_);
  parallel(M, grain_for(K), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = xp + r * K;
      T* yr = yp + r * K;
      // one pass from memory: shifted sums Σ(x − k), Σ(x − k)² (k = x0; RMS: k = 0, Σx²)
      const A k = rms ? A(0) : ld(xr, 0);
      double s1 = 0, s2 = 0;
      chunked_sums<A>(K, [&](int64_t i, A& u, A& v) {
        const A d = ld(xr, i) - k;
        u = d;
        v = d * d;
      }, s1, s2);
      double m = 0, var_d = s2 / static_cast<double>(K);
      if (!rms) moments(k, s1, s2, K, m, var_d);
      const A mu = static_cast<A>(m);
      if (!rms) mp[r] = mu;
      const A var = static_cast<A>(var_d);
      const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
      rp[r] = rs;
      if (w && b) {
        for (int64_t i = 0; i < K; ++i) st(yr, i, (ld(xr, i) - mu) * rs * w[i] + b[i]);
      } else if (w) {
        for (int64_t i = 0; i < K; ++i) st(yr, i, (ld(xr, i) - mu) * rs * w[i]);
      } else if (b) {
        for (int64_t i = 0; i < K; ++i) st(yr, i, (ld(xr, i) - mu) * rs + b[i]);
      } else {
        for (int64_t i = 0; i < K; ++i) st(yr, i, (ld(xr, i) - mu) * rs);
      }
    }
  });
  return {y, mean, rstd};
}

inline int64_t weight_rows(int64_t M) { return std::max<int64_t>(1, std::min<int64_t>(1024, (M + 63) / 64)); }

template <typename T>
std::tuple<Tensor, Tensor, Tensor> row_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& mean,
                                                     const Tensor& rstd, const Tensor& w_, bool rms, bool need_dw) {
  using A = acc_t<T>;
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  Tensor dx = at::empty_like(x);
  T* dxp = dx.data_ptr<T>();
  const A* mp = rms ? nullptr : mean.data_ptr<A>();
  const A* rp = rstd.data_ptr<A>();
  const auto w = vec_or<T>(w_, K, A(1));
  const int64_t R = weight_rows(M);
  const int64_t nb = (M + R - 1) / R;
  const bool need_db = need_dw && !rms;
  std::vector<double> tw(need_dw ? nb * K : 0), tb(need_db ? nb * K : 0);
  parallel(nb, grain_for(R * K), [&](int64_t lo, int64_t hi) {
    std::vector<A> dwl(need_dw ? K : 0), dbl(need_db ? K : 0);
    for (int64_t j = lo; j < hi; ++j) {
      std::fill(dwl.begin(), dwl.end(), A(0));
      std::fill(dbl.begin(), dbl.end(), A(0));
      for (int64_t r = j * R; r < std::min(M, (j + 1) * R); ++r) {
        const T* xr = xp + r * K;
        const T* dr = dyp + r * K;
        T* dxr = dxp + r * K;
        const A mu = rms ? A(0) : mp[r];
        const A rs = rp[r];
        double sg = 0, sgx = 0;
        chunked_sums<A>(K, [&](int64_t i, A& u, A& v) {
          const A g = ld(dr, i) * w[i];
          u = g;
          v = g * ((ld(xr, i) - mu) * rs);
        }, sg, sgx);
        const A mg = rms ? A(0) : static_cast<A>(sg / static_cast<double>(K));
        const A mgx = static_cast<A>(sgx / static_cast<double>(K));
        if (need_db) {
          A* dw = dwl.data();
          A* db = dbl.data();
          for (int64_t i = 0; i < K; ++i) {
            const A d = ld(dr, i);
            const A xh = (ld(xr, i) - mu) * rs;
            st(dxr, i, rs * (d * w[i] - mg - xh * mgx));
            dw[i] += d * xh;
            db[i] += d;
          }
        } else if (need_dw) {
          A* dw = dwl.data();
          for (int64_t i = 0; i < K; ++i) {
            const A d = ld(dr, i);
            const A xh = (ld(xr, i) - mu) * rs;
            st(dxr, i, rs * (d * w[i] - mg - xh * mgx));
            dw[i] += d * xh;
          }
        } else {
          for (int64_t i = 0; i < K; ++i) {
            const A xh = (ld(xr, i) - mu) * rs;
            st(dxr, i, rs * (ld(dr, i) * w[i] - mg - xh * mgx));
          }
        }
      }
      for (int64_t i = 0; i < (need_dw ? K : 0); ++i) tw[j * K + i] = static_cast<double>(dwl[i]);
      for (int64_t i = 0; i < (need_db ? K : 0); ++i) tb[j * K + i] = static_cast<double>(dbl[i]);
    }
  });
  Tensor dweight, dbias;
  auto merge = [&](const std::vector<double>& t) {
    std::vector<double> s(K, 0.0);
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < K; ++i) s[i] += t[j * K + i];
    Tensor out = at::empty({K}, x.options().dtype(stat_type(x)));
    A* o = out.data_ptr<A>();
    for (int64_t i = 0; i < K; ++i) o[i] = static_cast<A>(s[i]);
    return out;
  };
  if (need_dw) dweight = merge(tw);
  if (need_db) dbias = merge(tb);
  return {dx, dweight, dbias};
}

}  // namespace normkit
