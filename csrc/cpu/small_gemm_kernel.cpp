// GEMMs with one dimension of at most 16: the classifier layer (C classes) and logistic
// regression. BLAS takes slow paths for such shapes (on the 2-core CPU machine, MKL spent
// 0.5 ms on (1024 x 10) @ (10 x 256), 10 GFLOP/s). These loops keep a block of outputs
// in vector registers across the short dimension and stream the long one. Every sum runs
// in a fixed order, so results do not depend on the thread split.
//
// On x86-64 the file is compiled for AVX2 + FMA; the glue calls it only where the CPU
// has both (small_gemm_supported) and uses BLAS elsewhere.
#include <cstring>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define PYFLAT_SMALL_GEMM_X86 1
#endif

namespace pyflat {
namespace cpu {
namespace {

constexpr int64_t kSumBlock = 64;  // terms summed before joining the running total

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
  typename Vec<T>::type v = {};
  return v + s;
}

template <typename T>
inline T lane_sum(typename Vec<T>::type v) {
  T sum = T(0);
  for (int64_t l = 0; l < Vec<T>::lanes; ++l) sum += v[l];
  return sum;
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

// c[i, :n] (+)= sum_t a[i, t] b16[t, :n], n small: b16 is b padded to 16 columns, so a
// row of c is 64 bytes of registers (two float vectors, four double ones); four rows at
// a time for float (two for double) give independent accumulator chains that hide FMA
// latency without spilling registers.
template <typename T>
void small_gemm_n(const SmallGemmParams<T>& p, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int64_t W = Vec<T>::lanes;
  constexpr int64_t kPad = kSmallGemmPad;
  constexpr int64_t kParts = kPad / W;  // vectors per padded row
  constexpr int64_t kRows = 8 / kParts;   // 8 accumulator registers of the 16 AVX ones
  for (int64_t i0 = begin; i0 < end; i0 += kRows) {
    const int64_t rows = end - i0 < kRows ? end - i0 : kRows;
    V acc[kRows][kParts] = {};
    const T* a[kRows];
    for (int64_t r = 0; r < kRows; ++r) a[r] = p.a + (i0 + (r < rows ? r : 0)) * p.k;
    for (int64_t t0 = 0; t0 < p.k; t0 += kSumBlock) {  // two-level sum, as for small_gemm_m
      const int64_t t1 = p.k - t0 < kSumBlock ? p.k : t0 + kSumBlock;
      V part[kRows][kParts] = {};
      for (int64_t t = t0; t < t1; ++t) {
        V b[kParts];
        for (int64_t q = 0; q < kParts; ++q) b[q] = load(p.b + t * kPad + q * W);
        for (int64_t r = 0; r < kRows; ++r) {
          const V s = broadcast(a[r][t]);
          for (int64_t q = 0; q < kParts; ++q) part[r][q] += s * b[q];
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
        for (int64_t q = 0; q < kParts; ++q) acc[r][q] += part[r][q];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      T out[kPad];
      for (int64_t q = 0; q < kParts; ++q) store(out + q * W, acc[r][q]);
      T* c = p.c + (i0 + r) * p.n;
      for (int64_t j = 0; j < p.n; ++j) c[j] = p.accumulate ? c[j] + out[j] : out[j];
    }
  }
}

// c[i, j] (+)= sum_t at[t, i] b[t, j], m small (at most 16): for one vector of columns,
// up to eight rows of outputs stay in registers while t runs over the long dimension.
// The range splits the columns of c; each column's sum runs over t in order.
template <typename T>
void small_gemm_m(const SmallGemmParams<T>& p, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int64_t W = Vec<T>::lanes;
  constexpr int64_t kRows = 8;
  int64_t j = begin;
  for (; j + W <= end; j += W) {
    for (int64_t i0 = 0; i0 < p.m; i0 += kRows) {
      const int64_t rows = p.m - i0 < kRows ? p.m - i0 : kRows;
      V acc[kRows] = {};
      // Two-level sum over the long dimension (the batch): blocks of kSumBlock terms,
      // then the blocks, which keeps float32 rounding near BLAS's instead of growing
      // with one chain of a thousand additions.
      for (int64_t t0 = 0; t0 < p.k; t0 += kSumBlock) {
        const int64_t t1 = p.k - t0 < kSumBlock ? p.k : t0 + kSumBlock;
        V part[kRows] = {};
        for (int64_t t = t0; t < t1; ++t) {
          const V bv = load(p.b + t * p.n + j);
          const T* at = p.a + t * p.m + i0;
          for (int64_t i = 0; i < kRows; ++i) {
            if (i < rows) part[i] += broadcast(at[i]) * bv;
          }
        }
        for (int64_t i = 0; i < kRows; ++i) acc[i] += part[i];
      }
      for (int64_t i = 0; i < rows; ++i) {
        T* c = p.c + (i0 + i) * p.n + j;
        store(c, p.accumulate ? load(c) + acc[i] : acc[i]);
      }
    }
  }
  for (; j < end; ++j) {
    for (int64_t i = 0; i < p.m; ++i) {
      T sum = T(0);
      for (int64_t t = 0; t < p.k; ++t) sum += p.a[t * p.m + i] * p.b[t * p.n + j];
      T& c = p.c[i * p.n + j];
      c = p.accumulate ? c + sum : sum;
    }
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
