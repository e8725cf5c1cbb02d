// CUDA kernels for softmax cross-entropy: the prepared forward (loss, probabilities,
// gradient) and the loss-Hessian product on k directions, in the same numerically stable
// forms as the CPU loops (csrc/cpu/softmax_cross_entropy_kernel.cpp).
//
// Grid mapping: one warp per row (a sample for the forward, a (sample, direction) pair for
// the Hessian product), 8 warps per block, grid-stride over rows; lanes stride over the
// classes, so any number of classes works. Reductions are warp shuffles in a fixed
// butterfly order: no atomics, the same bits on every run. The forward accumulates in
// float64; the Hessian product in the storage type (float32 for float32).
#include <algorithm>
#include <cmath>

#include "cuda_kernels.h"

namespace pyflat {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

inline int blocks_for_rows(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

template <typename A>
__device__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Index of the largest value of row[0..C) (the first one on ties), on every lane.
template <typename T>
__device__ int64_t warp_argmax(const T* row, int64_t C, int lane) {
  T best = row[0];
  int64_t index = 0;
  for (int64_t c = lane; c < C; c += kWarp) {
    if (row[c] > best || (row[c] == best && c < index)) {
      best = row[c];
      index = c;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other > best || (other == best && other_index < index)) {
      best = other;
      index = other_index;
    }
  }
  return index;
}

template <typename T>
__global__ void cross_entropy_kernel(SoftmaxCrossEntropyParams<T> p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const int64_t C = p.classes;
  for (int64_t n = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; n < p.rows;
       n += warps) {
    const T* f = p.logits + n * C;
    const int64_t y = p.target[n];
    const int64_t m = warp_argmax(f, C, lane);
    const double fmax = static_cast<double>(f[m]);
    double rest = 0.0;  // sum over c != m of exp(f_c - max)
    for (int64_t c = lane; c < C; c += kWarp) {
      if (c != m) rest += exp(static_cast<double>(f[c]) - fmax);
    }
    rest = warp_sum(rest);
    const double inv_total = 1.0 / (1.0 + rest);
    double others = 0.0;  // sum over c != y of p_c: 1 - p_y is never formed
    for (int64_t c = lane; c < C; c += kWarp) {
      const double pc = c == m ? inv_total : exp(static_cast<double>(f[c]) - fmax) * inv_total;
      p.probs[n * C + c] = static_cast<T>(pc);
      if (c != y) {
        others += pc;
        p.grad[n * C + c] = static_cast<T>(pc * static_cast<double>(p.scale));
      }
    }
    others = warp_sum(others);
    if (lane == 0) {
      p.grad[n * C + y] = static_cast<T>(-others * static_cast<double>(p.scale));
      p.row_loss[n] = log1p(rest) + (fmax - static_cast<double>(f[y]));
    }
  }
}

template <typename T>
__global__ void hessian_kernel(SoftmaxHessianParams<T> p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const int64_t C = p.classes;
  const int64_t rows = p.batch * p.k;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const T* probs = p.probs + (r / p.k) * C;
    T* u = p.u + r * C;
    const int64_t m = warp_argmax(probs, C, lane);
    const T um = u[m];
    T s = T(0);
    for (int64_t c = lane; c < C; c += kWarp) s += probs[c] * (u[c] - um);
    s = warp_sum(s);
    for (int64_t c = lane; c < C; c += kWarp) u[c] = p.scale * probs[c] * ((u[c] - um) - s);
  }
}

}  // namespace

template <typename T>
cudaError_t softmax_cross_entropy(const SoftmaxCrossEntropyParams<T>& p, cudaStream_t stream) {
  cross_entropy_kernel<T><<<blocks_for_rows(p.rows), kWarp * kWarpsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_hessian(const SoftmaxHessianParams<T>& p, cudaStream_t stream) {
  hessian_kernel<T><<<blocks_for_rows(p.batch * p.k), kWarp * kWarpsPerBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

#define PYFLAT_INSTANTIATE(T)                                                                 \
  template cudaError_t softmax_cross_entropy<T>(const SoftmaxCrossEntropyParams<T>&,         \
                                                cudaStream_t);                                \
  template cudaError_t softmax_hessian<T>(const SoftmaxHessianParams<T>&, cudaStream_t);
PYFLAT_INSTANTIATE(float)
PYFLAT_INSTANTIATE(double)
#undef PYFLAT_INSTANTIATE

}  // namespace cuda
}  // namespace pyflat
