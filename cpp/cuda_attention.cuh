/*!
 * \file cuda_attention.cuh
 * \brief Fused attention on tensor cores (WMMA 16x16x16, float32 accumulation), flash-attention style: the scores
 *        of a tile of 64 keys live in shared memory only, an online softmax rescales the output as later tiles
 *        raise a row's maximum, and nothing of size M x N is ever written to global memory.
 *
 * One thread block: 4 warps, 64 query rows of one batch index (16 rows per warp), looping over the keys in tiles
 * of 64. Per tile: the block loads K and V into shared memory; each warp computes its 16 x 64 scores S = Q K^T
 * (Q held in fragments), stores them, runs the softmax update on them (lane pair 2r, 2r+1 owns row r: even and odd
 * columns), writes P (16-bit) and the per-row rescale factors, multiplies its output fragments by those factors
 * and adds P V. The output stays in accumulator fragments for the whole loop. Scaling a fragment by row needs the
 * row of each fragment element, which WMMA leaves unspecified: each warp finds it once by loading a matrix whose
 * entries are their own row numbers (``load_matrix_sync`` and ``mma_sync`` use the same layout for a fragment
 * type, or ``load → mma → store`` of an accumulator would not round-trip). Tiles of keys that every row of the
 * block masks (past a causal mask's diagonal) are skipped.
 *
 * Softmax as the composition computes it: t = scale * s + bias in float32, p = exp2((t - max) * log2 e), summed in
 * float32 before P is rounded to 16 bits for the P V product. A fully masked row (every t equal, e.g. -3.4e38)
 * averages V, as softmax does; keys past N get t = -inf.
 *
 * Written once for two compilers: nvcc (``cuda_attention.cu``), and the C++ CUDA emulator of the tests
 * (``tests/native/cuda_emulator.h``, which defines the CUDA names used here before including this file).
 */
#ifndef BMC_CPP_CUDA_ATTENTION_CUH_
#define BMC_CPP_CUDA_ATTENTION_CUH_

#include "cuda_attention.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define BMC_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
__device__ __forceinline__ uint4 BmcLoad16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void BmcStore16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
#endif

namespace bmc {
namespace attention {

namespace wmma = nvcuda::wmma;

template <typename T>
struct Num;
// A bias at or below kMasked gives a key no weight (its probability underflows to 0 in float32 for any score below
// 2^14 in magnitude); float16 masks are clamped to its lowest value, -65504.
template <>
struct Num<__nv_bfloat16> {
  static constexpr float kMasked = -1e30f;
  static __device__ __forceinline__ float Load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 Store(float x) { return __float2bfloat16(x); }
  static __device__ __forceinline__ unsigned Bits(float x) { return __bfloat16_as_ushort(__float2bfloat16(x)); }
};
template <>
struct Num<__half> {
  static constexpr float kMasked = -6e4f;
  static __device__ __forceinline__ float Load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half Store(float x) { return __float2half(x); }
  static __device__ __forceinline__ unsigned Bits(float x) { return __half_as_ushort(__float2half(x)); }
};

using Accum = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

/*! \brief Rows [r0, r0 + rows) of a row-major [total, D] matrix into shared memory (row stride ld), zeros past
 *  \a total; 16-byte accesses (D is a multiple of 8 and every row starts 16-byte aligned). */
template <typename T, int D>
__device__ __forceinline__ void LoadRows(T* dst, int ld, const T* src, int64_t r0, int64_t total, int rows) {
  constexpr int kVecs = D / 8;
  for (int i = threadIdx.x; i < rows * kVecs; i += kThreads) {
    int r = i / kVecs, c = (i % kVecs) * 8;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (r0 + r < total) x = BmcLoad16(src + (r0 + r) * D + c);
    BmcStore16(dst + r * ld + c, x);
  }
}

/*! \brief Columns [c0, c0 + kKeys) of a row-major kt [D, total] into shared memory [D][ld], zeros past \a total. */
template <typename T, int D>
__device__ __forceinline__ void LoadColumns(T* dst, int ld, const T* src, int64_t c0, int64_t total) {
  for (int i = threadIdx.x; i < D * kKeys; i += kThreads) {
    int r = i / kKeys, c = i % kKeys;
    dst[r * ld + c] = c0 + c < total ? src[r * total + c0 + c] : Num<T>::Store(0.0f);
  }
}

template <typename T, int D>
__device__ __forceinline__ void Attention(const Params& p, unsigned char* smem) {
  using L = Layout<D>;
  constexpr int kFrags = D / 16;
  constexpr float kLog2e = 1.4426950408889634f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane >> 1, h = lane & 1;  // this lane's row of the warp's 16, and column parity

  // which rows of which batch index; k/v/bias offsets of that batch index (they may broadcast or be grouped)
  const int64_t tile = blockIdx.x % p.m_tiles;
  int64_t b = blockIdx.x / p.m_tiles, rest = b, k_off = 0, v_off = 0, bias_off = 0;
  for (int i = kBatchDims - 1; i >= 0; --i) {
    int64_t idx = rest % p.batch[i];
    rest /= p.batch[i];
    k_off += idx / p.k_group[i] * p.k_stride[i];
    v_off += idx / p.v_group[i] * p.v_stride[i];
    bias_off += idx * p.bias_stride[i];
  }
  const int64_t m0 = tile * kRows;
  const int64_t row = m0 + warp * 16 + r;  // the query row this lane's softmax works on
  const T* q = static_cast<const T*>(p.q) + b * p.m * D;
  const T* k = static_cast<const T*>(p.k) + k_off;
  const T* v = static_cast<const T*>(p.v) + v_off;
  const T* bias = p.bias == nullptr || row >= p.m ? nullptr
                                                   : static_cast<const T*>(p.bias) + bias_off + row * p.bias_m_stride;

  T* qs = reinterpret_cast<T*>(smem + L::kQS);
  float* ss = reinterpret_cast<float*>(smem + L::kQS) + warp * 16 * L::kLdS;
  T* ks = reinterpret_cast<T*>(smem + L::kK);
  T* vs = reinterpret_cast<T*>(smem + L::kV);
  T* ps = reinterpret_cast<T*>(smem + L::kP) + warp * 16 * L::kLdP;
  float* stats = reinterpret_cast<float*>(smem + L::kStats) + warp * 16;

  // the row of each accumulator element (see the file comment)
  float* probe = reinterpret_cast<float*>(ps);
  for (int i = lane; i < 256; i += 32) probe[i] = static_cast<float>(i / 16);
  __syncwarp();
  Accum rows;
  wmma::load_matrix_sync(rows, probe, 16, wmma::mem_row_major);
  int row_of[Accum::num_elements];
#pragma unroll
  for (int i = 0; i < Accum::num_elements; ++i) row_of[i] = static_cast<int>(rows.x[i]);

  LoadRows<T, D>(qs, L::kLdT, q, m0, p.m, kRows);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kFrags];
#pragma unroll
  for (int j = 0; j < kFrags; ++j) wmma::load_matrix_sync(qf[j], qs + warp * 16 * L::kLdT + j * 16, L::kLdT);
  Accum o[kFrags];
#pragma unroll
  for (int j = 0; j < kFrags; ++j) wmma::fill_fragment(o[j], 0.0f);
  float row_max = -INFINITY, row_sum = 0.0f;

  // The keys this block needs: from the first key any of its rows does not mask (a sliding window: about m0 -
  // window) to one past the last (a causal mask: the diagonal), unless a row is masked everywhere (it attends to
  // every key alike, as the composition's softmax does). Keys outside would get weight 0, so their tiles are
  // skipped: half the work of a causal attention, all but the window's of a long sliding-window one.
  int64_t n_begin = 0, n_end = p.n;
  if (p.bias != nullptr && p.bias_n_stride != 0) {
    int* needed = reinterpret_cast<int*>(smem + L::kStats) + kWarps * 16;  // [one past the last, the first]
    if (threadIdx.x == 0) needed[0] = 0, needed[1] = static_cast<int>(p.n);
    __syncthreads();
    if (h == 0 && bias != nullptr) {
      int64_t j = p.n, f = 0;
      while (j > 0 && Num<T>::Load(bias[(j - 1) * p.bias_n_stride]) <= Num<T>::kMasked) --j;
      while (f < j && Num<T>::Load(bias[f * p.bias_n_stride]) <= Num<T>::kMasked) ++f;
      atomicMax(needed, static_cast<int>(j == 0 ? p.n : j));
      atomicMin(needed + 1, static_cast<int>(j == 0 ? 0 : f));
    }
    __syncthreads();
    n_end = needed[0];
    n_begin = needed[1] / kKeys * kKeys;
  }

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kKeys) {
    __syncthreads();  // every warp is done with the previous K/V tiles (and with the Q tile)
    if (p.transpose_k) {
      LoadRows<T, D>(ks, L::kLdT, k, n0, p.n, kKeys);
    } else {
      LoadColumns<T, D>(ks, L::kLdKt, k, n0, p.n);
    }
    LoadRows<T, D>(vs, L::kLdT, v, n0, p.n, kKeys);
    __syncthreads();

    // S = Q K^T: 16 x 64 per warp, four 16 x 16 accumulators
#pragma unroll
    for (int j = 0; j < kKeys / 16; ++j) {
      Accum s;
      wmma::fill_fragment(s, 0.0f);
      if (p.transpose_k) {  // K [keys][D] read column-major is K^T
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
#pragma unroll
        for (int c = 0; c < kFrags; ++c) {
          wmma::load_matrix_sync(kf, ks + j * 16 * L::kLdT + c * 16, L::kLdT);
          wmma::mma_sync(s, qf[c], kf, s);
        }
      } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> kf;
#pragma unroll
        for (int c = 0; c < kFrags; ++c) {
          wmma::load_matrix_sync(kf, ks + c * 16 * L::kLdKt + j * 16, L::kLdKt);
          wmma::mma_sync(s, qf[c], kf, s);
        }
      }
      wmma::store_matrix_sync(ss + j * 16, s, L::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax of row r over columns h, h + 2, ..., h + 62 (t = scale * s + bias kept in place of s)
    float* t = ss + r * L::kLdS + h;
    float tile_max = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < kKeys / 2; ++c) {
      int64_t key = n0 + h + 2 * c;
      float x = t[2 * c] * p.scale;
      if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap);
      if (key >= p.n) {
        x = -INFINITY;
      } else if (bias != nullptr) {
        x += Num<T>::Load(bias[key * p.bias_n_stride]);
      }
      t[2 * c] = x;
      tile_max = fmaxf(tile_max, x);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);
    const float base = new_max == -INFINITY ? 0.0f : new_max;  // a row of -inf so far: keep exp2 finite
    const float alpha = exp2f((row_max - base) * kLog2e);
    float sum = 0.0f;
#pragma unroll 8
    for (int c = 0; c < kKeys / 2; ++c) {
      float e = exp2f((t[2 * c] - base) * kLog2e);
      sum += e;
      ps[r * L::kLdP + h + 2 * c] = Num<T>::Store(e);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    row_sum = row_sum * alpha + sum;
    row_max = new_max;
    if (h == 0) stats[r] = alpha;
    __syncwarp();

    // O = diag(alpha) O + P V
#pragma unroll
    for (int j = 0; j < kFrags; ++j) {
#pragma unroll
      for (int i = 0; i < Accum::num_elements; ++i) o[j].x[i] *= stats[row_of[i]];
    }
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf[kKeys / 16];
#pragma unroll
    for (int c = 0; c < kKeys / 16; ++c) wmma::load_matrix_sync(pf[c], ps + c * 16, L::kLdP);
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
#pragma unroll
    for (int j = 0; j < kFrags; ++j) {
#pragma unroll
      for (int c = 0; c < kKeys / 16; ++c) {
        wmma::load_matrix_sync(vf, vs + c * 16 * L::kLdT + j * 16, L::kLdT);
        wmma::mma_sync(o[j], pf[c], vf, o[j]);
      }
    }
  }

  // O / sum → global, through shared memory (the K/V tiles' space)
  __syncthreads();
  float* os = reinterpret_cast<float*>(smem + L::kK) + warp * 16 * L::kLdO;
#pragma unroll
  for (int j = 0; j < kFrags; ++j) wmma::store_matrix_sync(os + j * 16, o[j], L::kLdO, wmma::mem_row_major);
  if (h == 0) stats[r] = 1.0f / row_sum;
  __syncwarp();
  T* out = static_cast<T*>(p.out) + b * p.m * D;
  constexpr int kVecs = D / 8;
  for (int i = lane; i < 16 * kVecs; i += 32) {
    int rr = i / kVecs, c = (i % kVecs) * 8;
    int64_t out_row = m0 + warp * 16 + rr;
    if (out_row >= p.m) continue;
    const float* x = os + rr * L::kLdO + c;
    const float inv = stats[rr];
    unsigned w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = Num<T>::Bits(x[2 * e] * inv) | (Num<T>::Bits(x[2 * e + 1] * inv) << 16);
    BmcStore16(out + out_row * D + c, make_uint4(w[0], w[1], w[2], w[3]));
  }
}

}  // namespace attention
}  // namespace bmc

#endif  // BMC_CPP_CUDA_ATTENTION_CUH_
