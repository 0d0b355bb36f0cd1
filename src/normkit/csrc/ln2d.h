// LayerNorm2d on NCHW input: LayerNorm across the strided channels of each position.
//
// For x contiguous (N, C, S), the C values x[n, :, s] (S apart in memory) are one LayerNorm row:
//   mean = k + Σ_c (x − k)/C  (k = x[n, 0, s]: a large common offset cancels first),
//   var = Σ_c (x − mean)²/C,  rstd = 1/√(var + eps),  y = (x − mean)·rstd·γ_c + β_c;
// backward, with g = dy·γ: dx = rstd·(g − mean_c(g) − x̂·mean_c(g·x̂)), dγ = Σ dy·x̂, dβ = Σ dy.
//
// A task is kPositions consecutive positions of one sample; it walks the channels, each a
// contiguous run of those positions (the inner loop vectorises along s), with per-position
// accumulators in A over blocks of kChunk channels whose totals go to double (common.h's rule).
// Statistics are two passes from cache (a task's C × 64 block is usually in L2), then the output.
// dγ/dβ: fixed blocks of tasks keep per-channel accumulators whose totals are merged in block
// order in double, so results are the same bits for any thread count.
// channels_last input needs none of this: its (N·S, C) view is a contiguous row matrix for the
// row kernels (row.h); the Python backend routes it there.
//
// Included at the end of normkit_cpu.cpp; registers its two operators as a fragment of the
// normkit_cpu library: normkit_cpu::ln2d_forward, normkit_cpu::ln2d_backward.
#pragma once

#include <torch/library.h>

#include "common.h"

namespace normkit {
namespace ln2d {

constexpr int64_t kPositions = 64;

struct Shape {
  int64_t n, c, s, blocks;  // blocks: position blocks per sample
};

inline Shape shape_of(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.is_contiguous(), "normkit cpu backend: ln2d expects a contiguous (N, C, *) ",
                    "tensor, got shape ", x.sizes(), " strides ", x.strides());
  Shape sh;
  sh.n = x.size(0);
  sh.c = x.size(1);
  sh.s = x.numel() / std::max<int64_t>(sh.n * sh.c, 1);
  sh.blocks = (sh.s + kPositions - 1) / kPositions;
  return sh;
}

inline std::vector<int64_t> stat_sizes(const Tensor& x) {
  std::vector<int64_t> sizes{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
  return sizes;
}

// tot[j] = Σ_c f(c, j) for j < len: A accumulators over kChunk channels, totals in double.
template <typename A, typename F>
inline void channel_sums(int64_t C, int64_t len, F&& f, double* tot) {
  A acc[kPositions];
  for (int64_t j = 0; j < len; ++j) tot[j] = 0.0;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = std::min(C, c0 + kChunk);
    for (int64_t j = 0; j < len; ++j) acc[j] = A(0);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t j = 0; j < len; ++j) acc[j] += f(c, j);
    }
    for (int64_t j = 0; j < len; ++j) tot[j] += static_cast<double>(acc[j]);
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w_, const Tensor& b_, double eps) {
  using A = acc_t<T>;
  const Shape sh = shape_of(x);
  const int64_t C = sh.c, S = sh.s;
  const T* xp = x.data_ptr<T>();
  Tensor y = at::empty_like(x);
  T* yp = y.data_ptr<T>();
  Tensor mean = at::empty(stat_sizes(x), x.options().dtype(stat_type(x)));
  Tensor rstd = at::empty_like(mean);
  A* mp = mean.data_ptr<A>();
  A* rp = rstd.data_ptr<A>();
  const auto w = vec_or<T>(w_, C, A(1));
  const auto b = vec_or<T>(b_, C, A(0));
  parallel(sh.n * sh.blocks, grain_for(C * kPositions), [&](int64_t lo, int64_t hi) {
    A k[kPositions], mu[kPositions], rs[kPositions];
    double tot[kPositions];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / sh.blocks, s0 = (t % sh.blocks) * kPositions;
      const int64_t len = std::min(kPositions, S - s0);
      const T* xb = xp + n * C * S + s0;
      T* yb = yp + n * C * S + s0;
      for (int64_t j = 0; j < len; ++j) k[j] = ld(xb, j);
      channel_sums<A>(C, len, [&](int64_t c, int64_t j) { return ld(xb + c * S, j) - k[j]; }, tot);
      for (int64_t j = 0; j < len; ++j)
        mu[j] = static_cast<A>(static_cast<double>(k[j]) + tot[j] / static_cast<double>(C));
      channel_sums<A>(C, len, [&](int64_t c, int64_t j) {
        const A d = ld(xb + c * S, j) - mu[j];
        return d * d;
      }, tot);
      for (int64_t j = 0; j < len; ++j) {
        rs[j] = A(1) / std::sqrt(static_cast<A>(tot[j] / static_cast<double>(C)) + static_cast<A>(eps));
        mp[n * S + s0 + j] = mu[j];
        rp[n * S + s0 + j] = rs[j];
      }
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = xb + c * S;
        T* yc = yb + c * S;
        const A wc = w[c], bc = b[c];
        for (int64_t j = 0; j < len; ++j) st(yc, j, (ld(xc, j) - mu[j]) * rs[j] * wc + bc);
      }
    }
  });
  return {y, mean, rstd};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& x, const Tensor& dy, const Tensor& mean,
                                                 const Tensor& rstd, const Tensor& w_, bool need_dw) {
  using A = acc_t<T>;
  const Shape sh = shape_of(x);
  const int64_t C = sh.c, S = sh.s;
  const int64_t tasks = sh.n * sh.blocks;
  const int64_t R = std::max<int64_t>(1, (tasks + 63) / 64);  // tasks per dγ/dβ block: about 64 blocks
  const int64_t nb = (tasks + R - 1) / R;
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  Tensor dx = at::empty_like(x);
  T* dxp = dx.data_ptr<T>();
  const A* mp = mean.data_ptr<A>();
  const A* rp = rstd.data_ptr<A>();
  const auto w = vec_or<T>(w_, C, A(1));
  std::vector<double> tw(need_dw ? nb * C : 0), tb(need_dw ? nb * C : 0);
  parallel(nb, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> dwl(need_dw ? C : 0), dbl(need_dw ? C : 0);
    A mu[kPositions], rs[kPositions], mg[kPositions], mgx[kPositions];
    double sg[kPositions], sgx[kPositions];
    for (int64_t blk = lo; blk < hi; ++blk) {
      std::fill(dwl.begin(), dwl.end(), A(0));
      std::fill(dbl.begin(), dbl.end(), A(0));
      for (int64_t t = blk * R; t < std::min(tasks, (blk + 1) * R); ++t) {
        const int64_t n = t / sh.blocks, s0 = (t % sh.blocks) * kPositions;
        const int64_t len = std::min(kPositions, S - s0);
        const int64_t base = n * C * S + s0;
        for (int64_t j = 0; j < len; ++j) {
          mu[j] = mp[n * S + s0 + j];
          rs[j] = rp[n * S + s0 + j];
        }
        channel_sums<A>(C, len, [&](int64_t c, int64_t j) { return ld(dyp + base + c * S, j) * w[c]; }, sg);
        channel_sums<A>(C, len, [&](int64_t c, int64_t j) {
          return ld(dyp + base + c * S, j) * w[c] * ((ld(xp + base + c * S, j) - mu[j]) * rs[j]);
        }, sgx);
        for (int64_t j = 0; j < len; ++j) {
          mg[j] = static_cast<A>(sg[j] / static_cast<double>(C));
          mgx[j] = static_cast<A>(sgx[j] / static_cast<double>(C));
        }
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = xp + base + c * S;
          const T* dc = dyp + base + c * S;
          T* dxc = dxp + base + c * S;
          const A wc = w[c];
          A sw = A(0), sb = A(0);
          for (int64_t j = 0; j < len; ++j) {
            const A d = ld(dc, j);
            const A xh = (ld(xc, j) - mu[j]) * rs[j];
            st(dxc, j, rs[j] * (d * wc - mg[j] - xh * mgx[j]));
            sw += d * xh;
            sb += d;
          }
          if (need_dw) {
            dwl[c] += sw;
            dbl[c] += sb;
          }
        }
      }
      for (int64_t c = 0; c < (need_dw ? C : 0); ++c) {
        tw[blk * C + c] = static_cast<double>(dwl[c]);
        tb[blk * C + c] = static_cast<double>(dbl[c]);
      }
    }
  });
  if (!need_dw) return {dx, Tensor(), Tensor()};
  auto merge = [&](const std::vector<double>& t) {
    std::vector<double> s(C, 0.0);
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t c = 0; c < C; ++c) s[c] += t[j * C + c];
    Tensor out = at::empty({C}, x.options().dtype(stat_type(x)));
    A* o = out.data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<A>(s[c]);
    return out;
  };
  return {dx, merge(tw), merge(tb)};
}

inline std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                  const c10::optional<Tensor>& bias, double eps) {
  const Shape sh = shape_of(x);
  const auto sd = stat_type(x);
  Tensor w = opt_vec(weight, sd, sh.c, "weight"), b = opt_vec(bias, sd, sh.c, "bias");
  return NK_DISPATCH_T(x.scalar_type(), [&] { return forward_impl<T>(x, w, b, eps); });
}

inline std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& x, const Tensor& dy_, const Tensor& mean,
                                                   const Tensor& rstd, const c10::optional<Tensor>& weight,
                                                   bool need_dweight) {
  const Shape sh = shape_of(x);
  const auto sd = stat_type(x);
  Tensor dy = like_x(dy_, x);
  Tensor m = vec(mean, sd, sh.n * sh.s, "mean"), rs = vec(rstd, sd, sh.n * sh.s, "rstd");
  Tensor w = opt_vec(weight, sd, sh.c, "weight");
  return NK_DISPATCH_T(x.scalar_type(), [&] { return backward_impl<T>(x, dy, m, rs, w, need_dweight); });
}

}  // namespace ln2d
}  // namespace normkit

TORCH_LIBRARY_FRAGMENT(normkit_cpu, m) {
  m.def("ln2d_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("ln2d_backward(Tensor x, Tensor dy, Tensor mean, Tensor rstd, Tensor? weight, bool need_dweight) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit_cpu, CPU, m) {
  m.impl("ln2d_forward", &normkit::ln2d::forward);
  m.impl("ln2d_backward", &normkit::ln2d::backward);
}
