// Row family, part 1: LayerNorm and RMSNorm over the rows of K values of a contiguous tensor (M rows).
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
std::tuple<Tensor, Tensor, Tensor> row_forward_impl(const Tensor& x, int64_t K, const Tensor& w_, const Tensor& b_,
                                                    double eps, bool rms, Tensor y) {
  using A = acc_t<T>;
  const int64_t M = x.numel() / K;  // rows of K values (the trailing dimensions that hold K values)
  const T* xp = x.data_ptr<T>();
  if (!y.defined()) y = at::empty_like(x);
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

// Rows per weight-gradient block: about 64 blocks (the parallel units), at least 16 rows (merging
// a block's totals costs about one row's work: one-row blocks made dw 4x slower than dx at 64 rows),
// at most 1024 (the fp32 accumulation length). A function of M alone.
inline int64_t weight_rows(int64_t M) { return std::min<int64_t>(1024, std::max<int64_t>(16, (M + 63) / 64)); }

// s[i] += t[i] (double) for i < K: one block's fp32 column totals merged into the double sums
template <typename A>
inline void add_block(double* __restrict__ s, const A* __restrict__ t, int64_t K) {
  for (int64_t i = 0; i < K; ++i) s[i] += static_cast<double>(t[i]);
}

// The row sums of the backward, as the dx coefficients: mg = mean(g) and q = rs²·mean(g·x̂) with
// g = dy·w, x̂ = (x − mu)·rs.
template <typename T>
inline void row_bwd_sums(const T* __restrict__ xr, const T* __restrict__ dr, const acc_t<T>* __restrict__ w,
                         int64_t K, double inv_k, acc_t<T> mu, acc_t<T> rs, bool rms, acc_t<T>& mg, acc_t<T>& q) {
  using A = acc_t<T>;
  using V = vec_t<T>;
  double sg = 0, sgx = 0;
  chunked_vsums<A>(K, [&](int64_t i, V& u, V& v) {
    const V g = vld(dr, i) * vacc(w + i);
    u = g;
    v = g * (vld(xr, i) - mu);
  }, [&](int64_t i, A& u, A& v) {
    const A g = ld(dr, i) * w[i];
    u = g;
    v = g * (ld(xr, i) - mu);
  }, sg, sgx);  // Σg·x̂ = rs·Σg·(x − mu): rs goes on the double total
  const double r = rs, r3k = r * r * r * inv_k;  // off the sums' dependency chain
  mg = rms ? A(0) : static_cast<A>(sg * inv_k);
  q = static_cast<A>(sgx * r3k);
}

// dx = rs·(g − mean(g) − x̂·mean(g·x̂)) = rs·(g − mg) − q·(x − mu) of one row (one operation fewer
// per value than the first form), and with DW dw += dy·x̂, with DB db += dy (the row block's fp32
// accumulators: each column adds its rows in row order). Vector loads over the columns; the restrict
// pointers let the compiler keep dw/db in flight across the dx stores.
template <typename T, bool DW, bool DB>
inline void row_bwd_dx(const T* __restrict__ xr, const T* __restrict__ dr, T* __restrict__ dxr,
                       const acc_t<T>* __restrict__ w, int64_t K, acc_t<T> mu, acc_t<T> rs, acc_t<T> mg,
                       acc_t<T> q, acc_t<T>* __restrict__ dw, acc_t<T>* __restrict__ db) {
  using A = acc_t<T>;
  using V = vec_t<T>;
  constexpr int H = kHalfLanes<A>;
  int64_t i = 0;
  for (; i + H <= K; i += H) {
    const V d = vld(dr, i);
    const V xm = vld(xr, i) - mu;
    vst(dxr, i, rs * (d * vacc(w + i) - mg) - q * xm);
    if constexpr (DW) vput(dw + i, vacc(dw + i) + d * (xm * rs));
    if constexpr (DB) vput(db + i, vacc(db + i) + d);
  }
  for (; i < K; ++i) {
    const A d = ld(dr, i);
    const A xm = ld(xr, i) - mu;
    st(dxr, i, rs * (d * w[i] - mg) - q * xm);
    if constexpr (DW) dw[i] += d * (xm * rs);
    if constexpr (DB) db[i] += d;
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> row_backward_impl(const Tensor& x, int64_t K, const Tensor& dy, const Tensor& mean,
                                                     const Tensor& rstd, const Tensor& w_, bool rms, bool need_dw,
                                                     Tensor dx) {
  using A = acc_t<T>;
  const int64_t M = x.numel() / K;
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  if (!dx.defined()) dx = at::empty_like(x);
  T* dxp = dx.data_ptr<T>();
  const A* mp = rms ? nullptr : mean.data_ptr<A>();
  const A* rp = rstd.data_ptr<A>();
  const auto w = vec_or<T>(w_, K, A(1));
  const int64_t R = weight_rows(M);
  const int64_t nb = (M + R - 1) / R;
  const bool need_db = need_dw && !rms;
  // Block j's fp32 column totals are added to the double sums in block order. Run inline (one
  // thread, or a small call), each block is added as it finishes; run in parallel, the blocks
  // leave their totals in a table, added in the same order afterwards: the same bits.
  std::vector<double> sw(need_dw ? K : 0, 0.0), sb(need_db ? K : 0, 0.0);
  std::vector<A> tw, tb;
  bool tabled = false;
  const double inv_k = 1.0 / static_cast<double>(K);
  auto rows = [&](auto dw_tag, auto db_tag, int64_t r0, int64_t r1, A* dw, A* db) {
    for (int64_t r = r0; r < r1; ++r) {
      const A mu = rms ? A(0) : mp[r];
      A mg, q;
      row_bwd_sums(xp + r * K, dyp + r * K, w.data(), K, inv_k, mu, rp[r], rms, mg, q);
      row_bwd_dx<T, decltype(dw_tag)::value, decltype(db_tag)::value>(xp + r * K, dyp + r * K, dxp + r * K,
                                                                      w.data(), K, mu, rp[r], mg, q, dw, db);
    }
  };
  auto task = [&](int64_t lo, int64_t hi) {
    if (!need_dw) {
      rows(std::false_type{}, std::false_type{}, lo * R, std::min(M, hi * R), nullptr, nullptr);
      return;
    }
    const bool whole = !tabled;
    std::vector<A> dwl(whole ? K : 0), dbl(whole && need_db ? K : 0);
    for (int64_t j = lo; j < hi; ++j) {
      A* dw = whole ? dwl.data() : tw.data() + j * K;
      A* db = need_db ? (whole ? dbl.data() : tb.data() + j * K) : nullptr;
      std::fill(dw, dw + K, A(0));
      if (db) std::fill(db, db + K, A(0));
      const int64_t r0 = j * R, r1 = std::min(M, (j + 1) * R);
      if (db) {
        rows(std::true_type{}, std::true_type{}, r0, r1, dw, db);
      } else {
        rows(std::true_type{}, std::false_type{}, r0, r1, dw, nullptr);
      }
      if (whole) {
        add_block(sw.data(), dw, K);
        if (db) add_block(sb.data(), db, K);
      }
    }
  };
  const int64_t grain = grain_for(R * K);
  if (nb <= grain || at::get_num_threads() == 1 || forked_child().load(std::memory_order_relaxed)) {
    task(0, nb);
  } else {
    tabled = need_dw;
    tw.resize(need_dw ? nb * K : 0);
    tb.resize(need_db ? nb * K : 0);
    parallel(nb, grain, task);
  }
  if (tabled) {
    for (int64_t j = 0; j < nb; ++j) {
      add_block(sw.data(), tw.data() + j * K, K);
      if (need_db) add_block(sb.data(), tb.data() + j * K, K);
    }
  }
  Tensor dweight, dbias;
  auto out = [&](const std::vector<double>& s) {
    Tensor t = at::empty({K}, x.options().dtype(stat_type(x)));
    A* o = t.data_ptr<A>();
    for (int64_t i = 0; i < K; ++i) o[i] = static_cast<A>(s[i]);
    return t;
  };
  if (need_dw) dweight = out(sw);
  if (need_db) dbias = out(sb);
  return {dx, dweight, dbias};
}

}  // namespace normkit
