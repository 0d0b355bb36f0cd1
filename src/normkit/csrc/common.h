// Shared pieces of normkit's CPU kernels: element access for the four dtypes, the activations (act.h),
// the blocked summation every reduction uses, tensor geometry and the parallel loop.
//
// Numerics (DESIGN.md §4). Every reduction sums in the accumulation type A (float for
// float32/float16/bfloat16, double for float64) over blocks of at most kChunk values, in kLanes
// independent lanes (so the compiler vectorises the loop without reassociating anything), adds
// the lanes in a fixed tree, and merges the block totals in double, in order. A 2048x2048 image
// or a 2^26-value group therefore does not drift, and the order of every sum is fixed by the
// shape alone: results are bit-identical for any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pthread.h>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "act.h"

namespace normkit {

using at::Tensor;

// ----------------------------------------------------------------------------- element access
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

inline float ld(const float* p, int64_t i) { return p[i]; }
inline double ld(const double* p, int64_t i) { return p[i]; }
inline float ld(const c10::Half* p, int64_t i) {
#if defined(__FLT16_MAX__)
  _Float16 h;  // the compiler's IEEE half: converts with vcvtph2ps where F16C is on
  std::memcpy(&h, reinterpret_cast<const char*>(p) + 2 * i, 2);
  return static_cast<float>(h);
#else
  return static_cast<float>(p[i]);  // compilers without _Float16: c10's conversion
#endif
}
inline float ld(const c10::BFloat16* p, int64_t i) {
  uint16_t b;
  std::memcpy(&b, reinterpret_cast<const char*>(p) + 2 * i, 2);
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(double* p, int64_t i, double v) { p[i] = v; }
inline void st(c10::Half* p, int64_t i, float v) {
#if defined(__FLT16_MAX__)
  _Float16 h = static_cast<_Float16>(v);  // round to nearest even
  std::memcpy(reinterpret_cast<char*>(p) + 2 * i, &h, 2);
#else
  p[i] = c10::Half(v);
#endif
}
inline void st(c10::BFloat16* p, int64_t i, float v) {
  // round to nearest even as torch does; NaN stays a quiet NaN (branch-free: the loop vectorises)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  uint32_t bits = (v != v) ? (u | 0x00400000u) : rounded;
  uint16_t b = static_cast<uint16_t>(bits >> 16);
  std::memcpy(reinterpret_cast<char*>(p) + 2 * i, &b, 2);
}

// ----------------------------------------------------------------------------- blocked sums
constexpr int64_t kChunk = 4096;  // values summed in A before the block total goes to double
constexpr int64_t kGrain = 32768;  // elements below which a loop runs inline (no pool hand-off)

// Two 32-byte vectors of lanes (GCC vector extensions): 16 float or 8 double lanes. Lane j sums
// the values i ≡ j (mod lanes); the lanes are then added in a fixed tree. Written with explicit
// vectors because the compiler's loop vectoriser, given lane arrays, vectorised the wrong loop
// (4x slower); the order of the sums is the same either way.
template <typename A> struct VecOf { typedef A type __attribute__((vector_size(32))); };
template <typename A> constexpr int kHalfLanes = static_cast<int>(32 / sizeof(A));

template <typename A, int L>
inline A lane_total(A* a) {
  for (int w = L / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  }
  return a[0];
}

// (s1, s2) += (Σ u(i), Σ v(i)) over i in [0, len), with f(i, u, v) giving both terms: blocks of
// kChunk values summed in A lanes, each block's total added to the double sums in order.
template <typename A, typename F>
inline void chunked_sums(int64_t len, F&& f, double& s1, double& s2) {
  using V = typename VecOf<A>::type;
  constexpr int H = kHalfLanes<A>;
  constexpr int L = 2 * H;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t c1 = std::min(len, c0 + kChunk);
    V a0 = {}, a1 = {}, q0 = {}, q1 = {};
    int64_t i = c0;
    for (; i + L <= c1; i += L) {
      V u0, u1, w0, w1;
      for (int j = 0; j < H; ++j) {
        A u, v;
        f(i + j, u, v);
        u0[j] = u;
        w0[j] = v;
      }
      for (int j = 0; j < H; ++j) {
        A u, v;
        f(i + H + j, u, v);
        u1[j] = u;
        w1[j] = v;
      }
      a0 += u0;
      a1 += u1;
      q0 += w0;
      q1 += w1;
    }
    A a[L], q[L];
    for (int j = 0; j < H; ++j) {
      a[j] = a0[j];
      a[H + j] = a1[j];
      q[j] = q0[j];
      q[H + j] = q1[j];
    }
    A ta = A(0), tq = A(0);
    for (; i < c1; ++i) {
      A u, v;
      f(i, u, v);
      ta += u;
      tq += v;
    }
    if (c1 - c0 < L) {  // no lane was used (a short span: 3×3 maps): the lanes' tree adds only zeros, skip it
      s1 += static_cast<double>(ta);
      s2 += static_cast<double>(tq);
      continue;
    }
    s1 += static_cast<double>(lane_total<A, L>(a) + ta);
    s2 += static_cast<double>(lane_total<A, L>(q) + tq);
  }
}

// ----------------------------------------------------------------------------- vector access
// kHalfLanes<A> consecutive values of T as one VecOf<A> and back: the same values as ld/st one
// element at a time (the conversions are exact or round to nearest even alike), in one load or
// store. The element-wise loops below written with these keep the scalar code's order of every
// operation, so their results are the scalar code's bits; written as plain loops over ld/st they
// did not vectorise where the compiler could not rule out aliasing between outputs and inputs.
template <typename T> using vec_t = typename VecOf<acc_t<T>>::type;

// GCC 12 lowers __builtin_convertvector between 16-bit and 32-bit lanes one lane at a time (3x
// slower fp16 kernels than fp32); the intrinsics below are the one-instruction conversions.
template <typename T>
inline vec_t<T> vld(const T* p, int64_t i) {
  using V = vec_t<T>;
  V v;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    std::memcpy(&v, p + i, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX2__)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16);
    std::memcpy(&v, &u, sizeof(V));
#else
    for (int j = 0; j < kHalfLanes<float>; ++j) v[j] = ld(p, i + j);
#endif
  } else {
#if defined(__F16C__)
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    std::memcpy(&v, &f, sizeof(V));
#else
    for (int j = 0; j < kHalfLanes<float>; ++j) v[j] = ld(p, i + j);
#endif
  }
  return v;
}

template <typename T>
inline void vst(T* p, int64_t i, vec_t<T> v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    std::memcpy(p + i, &v, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX2__)
    // st()'s rounding, lane-wise: nearest even, NaN kept quiet
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    const __m256i bits = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    // the 8 high halves, in order: pack within 128-bit lanes, then gather the two lanes' results
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), _mm256_castsi256_si128(packed));
#else
    for (int j = 0; j < kHalfLanes<float>; ++j) st(p, i + j, v[j]);
#endif
  } else {
#if defined(__F16C__)
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    // _MM_FROUND_CUR_DIRECTION: the rounding st()'s scalar conversion uses (nearest even)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), _mm256_cvtps_ph(f, _MM_FROUND_CUR_DIRECTION));
#else
    for (int j = 0; j < kHalfLanes<float>; ++j) st(p, i + j, v[j]);
#endif
  }
}

// kHalfLanes<A> accumulators (A) at p, as one vector
template <typename A>
inline typename VecOf<A>::type vacc(const A* p) {
  typename VecOf<A>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A>
inline void vput(A* p, typename VecOf<A>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// The first n < H lanes of a vector: a partial load (the other lanes 0) and store, for the tails of the loops.
// Every value of a tail then goes through the vector code the body runs (the activations' vector forms give
// the same bits lane for lane, so an element's value does not depend on where it sits). Loads of float and double
// with AVX's masked loads (a variable-length memcpy was a library call, as slow as the values), the 16-bit types
// and every store through a small buffer.
#if defined(__AVX2__)
inline __m256i lanes_below32(int n) {  // 8 lanes of 32 bits: all ones below n
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}
inline __m256i lanes_below64(int n) {  // 4 lanes of 64 bits
  alignas(32) static const int64_t table[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 4 - n));
}
#endif

template <typename T>
inline vec_t<T> vld_n(const T* p, int64_t i, int n) {
  constexpr int H = kHalfLanes<acc_t<T>>;
  if (n >= H) return vld(p, i);
  vec_t<T> v;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 f = _mm256_maskload_ps(p + i, lanes_below32(n));
    std::memcpy(&v, &f, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<T, double>) {
    const __m256d f = _mm256_maskload_pd(p + i, lanes_below64(n));
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
#endif
  T buf[H];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  for (int j = 0; j < n && j < H; ++j) buf[j] = p[i + j];
  return vld(buf, 0);
}

template <typename T>
inline void vst_n(T* p, int64_t i, vec_t<T> v, int n) {
  constexpr int H = kHalfLanes<acc_t<T>>;
  if (n >= H) {
    vst(p, i, v);
    return;
  }
  // (not a masked store: AMD's vmaskmovps/pd store is microcoded, about as slow as the values it writes)
  T buf[H];
  vst(buf, 0, v);
  for (int j = 0; j < n && j < H; ++j) p[i + j] = buf[j];
}

// v with the lanes from n on set to +0
template <typename A>
inline typename VecOf<A>::type first_lanes(typename VecOf<A>::type v, int n) {
#if defined(__AVX2__)
  using V = typename VecOf<A>::type;
  const __m256i keep = sizeof(A) == 4 ? lanes_below32(n) : lanes_below64(n);
  V mask;
  std::memcpy(&mask, &keep, sizeof(mask));
  typedef typename std::conditional<sizeof(A) == 4, int32_t, int64_t>::type I;
  typedef I IV __attribute__((vector_size(32)));
  return reinterpret_cast<V>(reinterpret_cast<IV>(v) & reinterpret_cast<IV>(mask));
#else
  for (int j = n; j < kHalfLanes<A>; ++j) v[j] = A(0);
  return v;
#endif
}

// lane_total<A, 2H> of the lanes (a0, a1): the same tree (a[j] += a[j + w], w = H, H/2, ..., 1),
// each step one vector add of halves
inline float lane_total2(VecOf<float>::type a0, VecOf<float>::type a1) {
  typedef float V4 __attribute__((vector_size(16)));
  const VecOf<float>::type s = a0 + a1;
  const V4 t = __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
  const V4 u = t + __builtin_shufflevector(t, t, 2, 3, 2, 3);
  return u[0] + u[1];
}

inline double lane_total2(VecOf<double>::type a0, VecOf<double>::type a1) {
  typedef double V2 __attribute__((vector_size(16)));
  const VecOf<double>::type s = a0 + a1;
  const V2 t = __builtin_shufflevector(s, s, 0, 1) + __builtin_shufflevector(s, s, 2, 3);
  return t[0] + t[1];
}

// chunked_sums with the terms of H = kHalfLanes<A> consecutive indices at a time: fv(i, u, v)
// gives the vectors of terms of [i, i + H), fs(i, u, v) the terms of one index (the tail). The
// same lanes, blocks and order as chunked_sums, hence the same bits.
template <typename A, typename FV, typename FS>
inline void chunked_vsums(int64_t len, const FV& fv, const FS& fs, double& s1, double& s2) {
  using V = typename VecOf<A>::type;
  constexpr int H = kHalfLanes<A>;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t c1 = std::min(len, c0 + kChunk);
    V a0 = {}, a1 = {}, q0 = {}, q1 = {};
    int64_t i = c0;
    for (; i + 2 * H <= c1; i += 2 * H) {
      V u, v;
      fv(i, u, v);
      a0 += u;
      q0 += v;
      fv(i + H, u, v);
      a1 += u;
      q1 += v;
    }
    A ta = A(0), tq = A(0);
    for (; i < c1; ++i) {
      A u, v;
      fs(i, u, v);
      ta += u;
      tq += v;
    }
    s1 += static_cast<double>(lane_total2(a0, a1) + ta);
    s2 += static_cast<double>(lane_total2(q0, q1) + tq);
  }
}

// ----------------------------------------------------------------------------- geometry
// (N, C, S, cl) of x = (N, C, *spatial). cl: the loop order is (N, S, C) — channels_last 4-D/5-D,
// 2-D (N, C), or S == 1 — else (N, C, S) (contiguous NCHW).
struct Geometry {
  int64_t n, c, s;
  bool cl;
};

inline bool channels_last_dense(const Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

inline Geometry geometry(const Tensor& x) {
  const bool plain = x.is_contiguous();
  TORCH_CHECK_VALUE(plain || channels_last_dense(x), "normkit cpu backend: expected a dense tensor ",
                    "(contiguous or channels_last), got strides ", x.strides(), " for shape ", x.sizes());
  Geometry g;
  g.n = x.dim() > 0 ? x.size(0) : 1;
  g.c = x.dim() > 1 ? x.size(1) : 1;
  g.s = x.numel() / std::max<int64_t>(g.n * g.c, 1);
  g.cl = x.dim() == 2 || g.s == 1 || !plain;
  return g;
}

inline at::MemoryFormat format_of(const Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// t in x's dtype and exact strides (the kernels index x, dy and residual alike); undefined stays so.
inline Tensor like_x(const c10::optional<Tensor>& t, const Tensor& x) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "normkit cpu backend: expected a tensor shaped like x ", x.sizes(),
                    ", got ", t->sizes());
  Tensor r = t->scalar_type() == x.scalar_type() ? *t : t->to(x.scalar_type());
  if (r.strides() != x.strides()) r = r.contiguous(format_of(x));
  return r;
}

// A small vector (statistics, affine) as a contiguous tensor of dtype sd with `len` values.
inline Tensor vec(const Tensor& t, at::ScalarType sd, int64_t len, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == len, "normkit cpu backend: expected ", what, " with ", len, " values, got ",
                    t.numel());
  Tensor r = t.scalar_type() == sd ? t : t.to(sd);
  return r.is_contiguous() ? r : r.contiguous();
}

inline Tensor opt_vec(const c10::optional<Tensor>& t, at::ScalarType sd, int64_t len, const char* what) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return vec(*t, sd, len, what);
}

template <typename P>
inline const P* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}

// (n,) values of t (a stat-dtype vector or undefined) as A, `fill` where undefined
template <typename T>
std::vector<acc_t<T>> vec_or(const Tensor& t, int64_t n, acc_t<T> fill) {
  std::vector<acc_t<T>> out(n, fill);
  if (t.defined()) std::copy(t.data_ptr<acc_t<T>>(), t.data_ptr<acc_t<T>>() + n, out.begin());
  return out;
}

inline at::ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Tensor empty_like_x(const Tensor& x) { return at::empty_like(x, format_of(x)); }

// True in a process forked from the one that loaded the kernels. torch's CPU wheels run
// at::parallel_for on GNU OpenMP, whose thread pool does not survive fork(): a forked child
// that enters a parallel region after its parent did waits forever (torch's own ops too, which
// is why DataLoader workers set one thread). The kernels therefore run inline in a forked child;
// the results are the same bits, as for any thread count.
inline std::atomic<bool>& forked_child() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline bool register_fork_handler() {
  static const bool done = pthread_atfork(nullptr, nullptr, [] { forked_child().store(true); }) == 0;
  return done;
}

// Tasks [0, n) on torch's intra-op pool; `grain` tasks or fewer run inline on the caller.
template <typename F>
inline void parallel(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  if (n <= grain || forked_child().load(std::memory_order_relaxed)) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, std::max<int64_t>(grain, 1), f);
}

inline int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(elements_per_task, 1));
}

}  // namespace normkit

// Dispatch on x's dtype (T) and the activation code (ACT).
#define NK_DISPATCH_T(stype, ...)                                             \
  [&] {                                                                       \
    switch (stype) {                                                          \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }             \
      case at::kDouble: { using T = double; return __VA_ARGS__(); }           \
      case at::kHalf: { using T = c10::Half; return __VA_ARGS__(); }          \
      case at::kBFloat16: { using T = c10::BFloat16; return __VA_ARGS__(); }  \
      default: TORCH_CHECK_TYPE(false, "normkit cpu backend: dtype ", stype,  \
                                " is not one of float32, float64, float16, bfloat16"); \
    }                                                                         \
  }()
