/*!
 * \file cuda_attention.h
 * \brief The fused attention kernel's parameters and shared-memory layout, and the host-side shape checks that
 *        fill them. Included by the kernel (``cuda_attention.cuh``, device code), the launcher
 *        (``cuda_kernels.cc``) and the CPU emulation test (``tests/native/attention_emulated.cc``); plain C++.
 *
 * ``out = softmax(scale * q @ k^T + bias) @ v`` (the scaled scores optionally soft-capped before the bias) for
 * float16/bfloat16 ``q [..., M, D]``, ``k [..., N, D]`` (or ``kt [..., D, N]``), ``v [..., N, D]``, an optional
 * ``bias`` broadcasting to the scores ``[..., M, N]``, and D = 16, 32, 64 or 128. ``k``/``v`` batch dims divide ``q``'s: 1 (multi-query attention) or a divisor (grouped-query: query
 * index i reads key/value index i / group). Every tensor is contiguous.
 */
#ifndef BMC_CPP_CUDA_ATTENTION_H_
#define BMC_CPP_CUDA_ATTENTION_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace bmc {
namespace attention {

constexpr int kBatchDims = 4;    // q's batch dims, left-padded with 1s (more: not fused)
constexpr int kWarps = 4;        // warps per thread block; each owns 16 query rows
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // query rows per thread block
constexpr int kKeys = 64;        // keys per tile of the loop over K/V

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* bias;  // nullptr: none
  void* out;
  int64_t m, n;                   // query rows, keys
  int64_t m_tiles;                // ceil(m / kRows): grid.x = m_tiles * prod(batch)
  int64_t batch[kBatchDims];      // q's (and out's) batch dims
  int64_t k_group[kBatchDims];    // q's indices per k / v index (q's dim / theirs)
  int64_t v_group[kBatchDims];
  int64_t k_stride[kBatchDims];   // elements between batch indices of k / v / bias (0: broadcast)
  int64_t v_stride[kBatchDims];
  int64_t bias_stride[kBatchDims];
  int64_t bias_m_stride, bias_n_stride;
  float scale;
  float softcap;    // > 0: the scaled scores soft-capped, softcap * tanh(s / softcap), before the bias
  int transpose_k;  // 1: k is [N, D]; 0: kt [D, N]
};

constexpr size_t RoundUp(size_t x) { return (x + 127) / 128 * 128; }
constexpr size_t Max(size_t a, size_t b) { return a > b ? a : b; }

/*! \brief Shared memory of one thread block for head dim D, 16-bit elements; row strides padded (fewer bank
 *  conflicts) and multiples of what WMMA needs (8 elements for 16-bit, 4 for float), every region 128-B aligned. */
template <int D>
struct Layout {
  static constexpr int kLdT = D + 8;       // Q/K/V tiles [rows][D]
  static constexpr int kLdKt = kKeys + 8;  // a kt tile [D][keys]
  static constexpr int kLdS = kKeys + 4;   // float scores, per warp [16][keys]
  static constexpr int kLdP = kKeys + 8;   // probabilities (16-bit), per warp [16][keys]
  static constexpr int kLdO = D + 4;       // float output staging, per warp [16][D]
  // Q tile (read once into fragments) then the scores
  static constexpr size_t kQS = 0;
  static constexpr size_t kQSBytes = RoundUp(Max(size_t(kRows) * kLdT * 2, size_t(kWarps) * 16 * kLdS * 4));
  // K (or kt) and V tiles, then the output staging
  static constexpr size_t kK = kQS + kQSBytes;
  static constexpr size_t kKBytes = RoundUp(Max(size_t(kKeys) * kLdT, size_t(D) * kLdKt) * 2);
  static constexpr size_t kV = kK + kKBytes;
  static constexpr size_t kVBytes = RoundUp(size_t(kKeys) * kLdT * 2);
  static constexpr size_t kP = kV + kVBytes;
  static constexpr size_t kPBytes = RoundUp(size_t(kWarps) * 16 * kLdP * 2);
  // per warp: 16 floats (the rescale factors, then 1 / sum); then two ints (the keys the block needs: one past
  // the last, the first)
  static constexpr size_t kStats = kP + kPBytes;
  static constexpr size_t kBytes = kStats + RoundUp(size_t(kWarps) * 16 * 4 + 8);
  static_assert(size_t(kWarps) * 16 * kLdO * 4 <= kKBytes + kVBytes, "output staging must fit the K/V tiles");
  static_assert(16 * kLdP * 2 >= 256 * 4, "the row probe must fit a warp's probability tile");
};

//! head dims with a kernel (index of one: HeadDimIndex)
constexpr int kHeadDims[4] = {16, 32, 64, 128};

inline int HeadDimIndex(int64_t d) {
  for (int i = 0; i < 4; ++i) {
    if (kHeadDims[i] == d) return i;
  }
  return -1;
}

inline size_t SharedBytes(int64_t d) {
  switch (d) {
    case 16: return Layout<16>::kBytes;
    case 32: return Layout<32>::kBytes;
    case 64: return Layout<64>::kBytes;
    case 128: return Layout<128>::kBytes;
    default: return 0;
  }
}

/*!
 * \brief Check shapes and fill \a p (all but the pointers and scale). Shapes are row-major dims; \a bias_rank < 0
 *        means no bias. Returns "" or what does not fit the kernel.
 */
inline std::string MakeParams(const int64_t* q, int q_rank, const int64_t* k, int k_rank, const int64_t* v,
                              int v_rank, const int64_t* bias, int bias_rank, int transpose_k, Params* p) {
  if (q_rank < 2 || q_rank - 2 > kBatchDims || k_rank != q_rank || v_rank != q_rank) {
    return "q, k and v must have the same rank, 2 to " + std::to_string(kBatchDims + 2);
  }
  int nb = q_rank - 2;
  int64_t m = q[nb], d = q[nb + 1];
  int64_t n = transpose_k ? k[nb] : k[nb + 1], kd = transpose_k ? k[nb + 1] : k[nb];
  if (HeadDimIndex(d) < 0) return "head dim " + std::to_string(d) + " (the kernel has 16, 32, 64 and 128)";
  if (kd != d || v[nb] != n || v[nb + 1] != d) return "k/v do not match q [.., M, D] (v must be [.., N, D])";
  if (m <= 0 || n <= 0) return "empty attention";
  if (n > INT32_MAX) return "more than 2^31 keys";
  p->m = m;
  p->n = n;
  p->m_tiles = (m + kRows - 1) / kRows;
  p->transpose_k = transpose_k ? 1 : 0;
  // batch dims right-aligned into kBatchDims slots; strides of a contiguous tensor, 0 where it broadcasts
  int64_t ks = n * d, vs = n * d, bs = 1;
  int64_t bias_dims[kBatchDims + 2];
  if (bias_rank > q_rank) return "bias rank above the scores'";
  for (int i = 0; i < kBatchDims + 2; ++i) bias_dims[i] = 1;
  for (int i = 0; i < bias_rank; ++i) bias_dims[kBatchDims + 2 - bias_rank + i] = bias[i];
  int64_t bn = bias_dims[kBatchDims + 1], bm = bias_dims[kBatchDims];
  if (bias_rank >= 0 && ((bn != 1 && bn != n) || (bm != 1 && bm != m))) return "bias does not broadcast to the scores";
  p->bias_n_stride = bn == 1 ? 0 : 1;
  p->bias_m_stride = bm == 1 ? 0 : bn;
  bs = bm * bn;
  for (int slot = kBatchDims - 1, i = nb - 1; slot >= 0; --slot, --i) {
    int64_t qd = i >= 0 ? q[i] : 1, kdim = i >= 0 ? k[i] : 1, vdim = i >= 0 ? v[i] : 1;
    int64_t bdim = bias_dims[slot];
    if (kdim <= 0 || vdim <= 0 || qd % kdim != 0 || qd % vdim != 0) return "k/v batch dims must divide q's";
    if (bias_rank >= 0 && bdim != qd && bdim != 1) return "bias does not broadcast to the scores";
    p->batch[slot] = qd;
    p->k_group[slot] = qd / kdim;
    p->v_group[slot] = qd / vdim;
    p->k_stride[slot] = kdim == 1 ? 0 : ks;
    p->v_stride[slot] = vdim == 1 ? 0 : vs;
    p->bias_stride[slot] = bdim == 1 ? 0 : bs;
    ks *= kdim;
    vs *= vdim;
    bs *= bdim;
  }
  return "";
}

}  // namespace attention
}  // namespace bmc

#endif  // BMC_CPP_CUDA_ATTENTION_H_
