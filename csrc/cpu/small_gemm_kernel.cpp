// GEMMs with one dimension of at most 16: the classifier layer (C classes) and logistic
// regression. BLAS takes slow paths for such shapes (on the 2-core CPU machine, MKL spent
// 0.5 ms on (1024 x 10) @ (10 x 256), 10 GFLOP/s). These loops keep a tile of outputs in
// vector registers, ten to twelve independent FMA chains (enough to hide FMA latency on
// two FMA units), and stream the long dimension. Every sum runs in a fixed order, so
// results do not depend on the thread split.
//
// On x86-64 the file is compiled for AVX2 + FMA; the glue calls it only where the CPU
// has both (small_gemm_supported) and uses BLAS elsewhere.
#include <cstring>
#include <type_traits>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define PYFLAT_SMALL_GEMM_X86 1
#endif

namespace pyflat {
namespace cpu {
namespace {

// Terms of the long dimension summed in registers before joining the running total: a
// two-level sum keeps float32 rounding near BLAS's instead of growing with one chain of
// a thousand additions.
constexpr int64_t kSumBlock = 64;

// A 32-byte vector of T (GCC/Clang vector extension: one AVX register on x86-64).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
inline typename Vec<T>::type broadcast(T s) {
  typename Vec<T>::type v;
  for (int64_t l = 0; l < Vec<T>::lanes; ++l) v[l] = s;
  return v;
}

// Two-source lane shuffles with constant indices.
#if defined(__clang__)  // clang takes the indices as arguments; sizeof keeps the type used
#define PYFLAT_SHUFFLE(mask_type, x, y, ...) \
  (static_cast<void>(sizeof(mask_type)), __builtin_shufflevector(x, y, __VA_ARGS__))
#else
#define PYFLAT_SHUFFLE(mask_type, x, y, ...) __builtin_shuffle(x, y, mask_type{__VA_ARGS__})
#endif

// Transposed lane sums: out[l] = sum of the lanes of v[l], for one full set of
// accumulators, in a fixed tree (halves, quarters, pairs).
inline Vec<float>::type lane_sums(const Vec<float>::type (&v)[8]) {
  typedef int mask __attribute__((vector_size(32)));
  using V = Vec<float>::type;
  // After three halvings lane l holds the accumulator at position order[l] of the input;
  // feeding the accumulators in that (self-inverse) order gives lanes in natural order.
  const V in[8] = {v[0], v[4], v[2], v[6], v[1], v[5], v[3], v[7]};
  V half[4], quarter[2];
  for (int q = 0; q < 4; ++q) {
    half[q] = PYFLAT_SHUFFLE(mask, in[2 * q], in[2 * q + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
              PYFLAT_SHUFFLE(mask, in[2 * q], in[2 * q + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int q = 0; q < 2; ++q) {
    quarter[q] = PYFLAT_SHUFFLE(mask, half[2 * q], half[2 * q + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
                 PYFLAT_SHUFFLE(mask, half[2 * q], half[2 * q + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return PYFLAT_SHUFFLE(mask, quarter[0], quarter[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         PYFLAT_SHUFFLE(mask, quarter[0], quarter[1], 1, 9, 3, 11, 5, 13, 7, 15);
}

inline Vec<double>::type lane_sums(const Vec<double>::type (&v)[4]) {
  typedef long long mask __attribute__((vector_size(32)));
  using V = Vec<double>::type;
  const V in[4] = {v[0], v[2], v[1], v[3]};
  V half[2];
  for (int q = 0; q < 2; ++q) {
    half[q] = PYFLAT_SHUFFLE(mask, in[2 * q], in[2 * q + 1], 0, 1, 4, 5) +
              PYFLAT_SHUFFLE(mask, in[2 * q], in[2 * q + 1], 2, 3, 6, 7);
  }
  return PYFLAT_SHUFFLE(mask, half[0], half[1], 0, 4, 2, 6) +
         PYFLAT_SHUFFLE(mask, half[0], half[1], 1, 5, 3, 7);
}
#undef PYFLAT_SHUFFLE

// Splits `total` items into `parts` runs as even as possible; run r starts at
// part_start(total, parts, r).
inline int64_t part_start(int64_t total, int64_t parts, int64_t r) {
  return r * (total / parts) + (r < total % parts ? r : total % parts);
}

// Calls fn(std::integral_constant<int, N>) for N = n in 1..8: tile sizes are template
// parameters so that accumulators live in registers.
template <typename Fn>
void with_constant(int64_t n, Fn&& fn) {
  switch (n) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 4: fn(std::integral_constant<int, 4>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    case 6: fn(std::integral_constant<int, 6>()); break;
    case 7: fn(std::integral_constant<int, 7>()); break;
    default: fn(std::integral_constant<int, 8>()); break;
  }
}

}  // namespace

bool small_gemm_supported() {
#if defined(PYFLAT_SMALL_GEMM_X86)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

// c[i, j] (+)= sum_t a[i, t] b[t, j], k small: four vectors of outputs stay in registers
// while t runs over the k rows of b.
template <typename T>
void small_gemm_k(const SmallGemmParams<T>& p, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int64_t W = Vec<T>::lanes;
  const int64_t blocked = p.n - p.n % (4 * W);
  for (int64_t i = begin; i < end; ++i) {
    const T* a = p.a + i * p.k;
    T* c = p.c + i * p.n;
    for (int64_t j = 0; j < blocked; j += 4 * W) {
      V acc[4] = {};
      if (p.accumulate) {
        for (int q = 0; q < 4; ++q) acc[q] = load(c + j + q * W);
      }
      for (int64_t t = 0; t < p.k; ++t) {
        const V s = broadcast(a[t]);
        const T* b = p.b + t * p.n + j;
        for (int q = 0; q < 4; ++q) acc[q] += s * load(b + q * W);
      }
      for (int q = 0; q < 4; ++q) store(c + j + q * W, acc[q]);
    }
    for (int64_t j = blocked; j < p.n; ++j) {
      T sum = p.accumulate ? c[j] : T(0);
      for (int64_t t = 0; t < p.k; ++t) sum += a[t] * p.b[t * p.n + j];
      c[j] = sum;
    }
  }
}

namespace {

// small_gemm_n on a tile of R rows of c and G <= W of its columns, from column j0: one
// accumulator vector per output runs along t (dot products of a's rows with bt's rows);
// every kSumBlock vectors the accumulators are reduced across lanes into the totals.
template <typename T, int R, int G>
void dot_tile(const SmallGemmParams<T>& p, int64_t i0, int64_t j0) {
  using V = typename Vec<T>::type;
  constexpr int64_t W = Vec<T>::lanes;
  const int64_t vectorized = p.k - p.k % W;
  const T* a[R];
  const T* bt[G];
  for (int r = 0; r < R; ++r) a[r] = p.a + (i0 + r) * p.k;
  for (int g = 0; g < G; ++g) bt[g] = p.b + (j0 + g) * p.k;
  V total[R] = {};  // lane g: output (i0 + r, j0 + g)
  for (int64_t t0 = 0; t0 < vectorized; t0 += kSumBlock * W) {
    const int64_t t1 = vectorized - t0 < kSumBlock * W ? vectorized : t0 + kSumBlock * W;
    V acc[R][G] = {};
    for (int64_t t = t0; t < t1; t += W) {
      V bv[G];
      for (int g = 0; g < G; ++g) bv[g] = load(bt[g] + t);
      for (int r = 0; r < R; ++r) {
        const V av = load(a[r] + t);
        for (int g = 0; g < G; ++g) acc[r][g] += av * bv[g];
      }
    }
    for (int r = 0; r < R; ++r) {
      V group[W] = {};
      for (int g = 0; g < G; ++g) group[g] = acc[r][g];
      total[r] += lane_sums(group);
    }
  }
  for (int r = 0; r < R; ++r) {
    T* c = p.c + (i0 + r) * p.n + j0;
    for (int g = 0; g < G; ++g) {
      T sum = total[r][g];  // a lane read, not a store and reload (that stalls forwarding)
      for (int64_t t = vectorized; t < p.k; ++t) sum += a[r][t] * bt[g][t];
      c[g] = p.accumulate ? c[g] + sum : sum;
    }
  }
}

// Rows of one column group: tiles of R rows with R * G <= 12 accumulators, then single rows.
template <typename T, int G>
void dot_rows(const SmallGemmParams<T>& p, int64_t begin, int64_t end, int64_t j0) {
  constexpr int R = G >= 7 ? 1 : G >= 5 ? 2 : G >= 4 ? 3 : 4;
  int64_t i = begin;
  for (; i + R <= end; i += R) dot_tile<T, R, G>(p, i, j0);
  for (; i < end; ++i) dot_tile<T, 1, G>(p, i, j0);
}

}  // namespace

// c[i, j] (+)= sum_t a[i, t] b[j, t] (b holds the transpose, n x k), n small: the columns split into groups of at most W
// (a vector's lanes), even in size; within a group, dot_tile.
template <typename T>
void small_gemm_n(const SmallGemmParams<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<T>::lanes;
  const int64_t groups = (p.n + W - 1) / W;
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t j0 = part_start(p.n, groups, q);
    with_constant(part_start(p.n, groups, q + 1) - j0, [&](auto G) {
      if constexpr (decltype(G)::value <= W) dot_rows<T, decltype(G)::value>(p, begin, end, j0);
    });
  }
}

namespace {

// small_gemm_m on a tile of R rows of c (from i0) and N vectors of columns (from j0):
// R * N accumulators, each step of t one load per column vector and one broadcast per row.
template <typename T, int R, int N>
void outer_tile(const SmallGemmParams<T>& p, int64_t i0, int64_t j0) {
  using V = typename Vec<T>::type;
  constexpr int64_t W = Vec<T>::lanes;
  V total[R][N] = {};
  for (int64_t t0 = 0; t0 < p.k; t0 += kSumBlock) {
    const int64_t t1 = p.k - t0 < kSumBlock ? p.k : t0 + kSumBlock;
    V acc[R][N] = {};
    for (int64_t t = t0; t < t1; ++t) {
      V bv[N];
      for (int q = 0; q < N; ++q) bv[q] = load(p.b + t * p.n + j0 + q * W);
      const T* at = p.a + t * p.m + i0;
      for (int r = 0; r < R; ++r) {
        const V s = broadcast(at[r]);
        for (int q = 0; q < N; ++q) acc[r][q] += s * bv[q];
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < N; ++q) total[r][q] += acc[r][q];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* c = p.c + (i0 + r) * p.n + j0;
    for (int q = 0; q < N; ++q) {
      store(c + q * W, p.accumulate ? load(c + q * W) + total[r][q] : total[r][q]);
    }
  }
}

// Columns j0.. of one row group of R rows: pairs of vectors, one vector, then single
// columns in scalar loops.
template <typename T, int R>
void outer_columns(const SmallGemmParams<T>& p, int64_t i0, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<T>::lanes;
  int64_t j = begin;
  for (; j + 2 * W <= end; j += 2 * W) outer_tile<T, R, 2>(p, i0, j);
  for (; j + W <= end; j += W) outer_tile<T, R, 1>(p, i0, j);
  for (; j < end; ++j) {
    for (int r = 0; r < R; ++r) {
      T total = T(0);
      for (int64_t t0 = 0; t0 < p.k; t0 += kSumBlock) {
        const int64_t t1 = p.k - t0 < kSumBlock ? p.k : t0 + kSumBlock;
        T part = T(0);
        for (int64_t t = t0; t < t1; ++t) part += p.a[t * p.m + i0 + r] * p.b[t * p.n + j];
        total += part;
      }
      T& c = p.c[(i0 + r) * p.n + j];
      c = p.accumulate ? c + total : total;
    }
  }
}

}  // namespace

// c[i, j] (+)= sum_t at[t, i] b[t, j], m small (at most 16): the rows split into groups of
// at most 6, even in size (5 + 5 for ten classes); a group's rows times two vectors of
// columns stay in registers while t runs over the long dimension. The range splits the
// columns of c; each column's sum runs over t in order.
template <typename T>
void small_gemm_m(const SmallGemmParams<T>& p, int64_t begin, int64_t end) {
  const int64_t groups = (p.m + 5) / 6;
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t i0 = part_start(p.m, groups, q);
    with_constant(part_start(p.m, groups, q + 1) - i0, [&](auto R) {
      outer_columns<T, decltype(R)::value>(p, i0, begin, end);
    });
  }
}

#define PYFLAT_INSTANTIATE(T)                                                 \
  template void small_gemm_k<T>(const SmallGemmParams<T>&, int64_t, int64_t); \
  template void small_gemm_n<T>(const SmallGemmParams<T>&, int64_t, int64_t); \
  template void small_gemm_m<T>(const SmallGemmParams<T>&, int64_t, int64_t);
PYFLAT_INSTANTIATE(float)
PYFLAT_INSTANTIATE(double)
#undef PYFLAT_INSTANTIATE

}  // namespace cpu
}  // namespace pyflat
