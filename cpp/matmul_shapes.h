/*!
 * \file matmul_shapes.h
 * \brief numpy ``matmul`` shape logic shared by the CPU (BLAS) and CUDA (cuBLAS) library kernels: operands as stacks
 *        of row-major matrices, and the broadcasting of their batch dims.
 */
#ifndef BMC_CPP_MATMUL_SHAPES_H_
#define BMC_CPP_MATMUL_SHAPES_H_

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace bmc {
namespace native {

/*! \brief One operand as a stack of row-major matrices: batch dims, rows, cols as stored. */
struct Operand {
  std::vector<int64_t> batch;
  int64_t rows = 0, cols = 0;
};

/*! \brief \a t as an operand; a 1-D ``a`` is a row (1, K), a 1-D ``b`` a column (K, 1) (numpy's promotion). */
inline Operand Describe(const tvm::ffi::TensorView& t, bool is_a) {
  Operand op;
  int nd = t.ndim();
  if (nd == 1) {
    op.rows = is_a ? 1 : t.shape()[0];
    op.cols = is_a ? t.shape()[0] : 1;
    return op;
  }
  for (int i = 0; i < nd - 2; ++i) op.batch.push_back(t.shape()[i]);
  op.rows = t.shape()[nd - 2];
  op.cols = t.shape()[nd - 1];
  return op;
}

inline int64_t Prod(const std::vector<int64_t>& v) {
  int64_t p = 1;
  for (int64_t x : v) p *= x;
  return p;
}

/*! \brief The broadcast batch dims of ``a @ b`` and, per output batch dim, each operand's stride in matrices (0 where
 *         it is broadcast); dims are right-aligned as in numpy. */
struct Batch {
  std::vector<int64_t> dims, sa, sb;
};

inline Batch BroadcastBatch(const Operand& A, const Operand& B, const char* who) {
  size_t nb = std::max(A.batch.size(), B.batch.size());
  Batch out{std::vector<int64_t>(nb), std::vector<int64_t>(nb, 0), std::vector<int64_t>(nb, 0)};
  int64_t stride_a = 1, stride_b = 1;
  for (size_t i = 0; i < nb; ++i) {  // i counts from the innermost batch dim
    int64_t da = i < A.batch.size() ? A.batch[A.batch.size() - 1 - i] : 1;
    int64_t db = i < B.batch.size() ? B.batch[B.batch.size() - 1 - i] : 1;
    if (da != db && da != 1 && db != 1) {
      TVM_FFI_THROW(ValueError) << who << ": batch dims " << da << " and " << db << " do not broadcast";
    }
    out.dims[nb - 1 - i] = std::max(da, db);
    out.sa[nb - 1 - i] = da == 1 ? 0 : stride_a;
    out.sb[nb - 1 - i] = db == 1 ? 0 : stride_b;
    stride_a *= da;
    stride_b *= db;
  }
  return out;
}

}  // namespace native
}  // namespace bmc

#endif  // BMC_CPP_MATMUL_SHAPES_H_
