// out = in^T for a row-major matrix, in square tiles. The curvature operators hand blocks
// of k directions between the user's (P, k) layout and the engine's (k, P) one; for such
// skinny matrices ATen's strided copy ran at about 1 GB/s on the 2-core CPU machine,
// slower than the products it surrounds.
#include "cpu_kernels.h"

namespace pyflat {
namespace cpu {

template <typename T>
void transpose(const TransposeParams<T>& p, int64_t begin, int64_t end) {
  const int64_t col_tiles = (p.cols + kTransposeTile - 1) / kTransposeTile;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t i0 = tile / col_tiles * kTransposeTile, j0 = tile % col_tiles * kTransposeTile;
    const int64_t i1 = i0 + kTransposeTile < p.rows ? i0 + kTransposeTile : p.rows;
    const int64_t j1 = j0 + kTransposeTile < p.cols ? j0 + kTransposeTile : p.cols;
    for (int64_t j = j0; j < j1; ++j) {
      T* out = p.out + j * p.rows;
      for (int64_t i = i0; i < i1; ++i) out[i] = p.in[i * p.cols + j];
    }
  }
}

template void transpose<float>(const TransposeParams<float>&, int64_t, int64_t);
template void transpose<double>(const TransposeParams<double>&, int64_t, int64_t);

}  // namespace cpu
}  // namespace pyflat
