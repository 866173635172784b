/*!
 * \file cpu_kernels.cc
 * \brief CPU library kernels that bmc's compiled Relax programs call (``R.call_dps_packed``): ``libbmc_cpu_kernels``.
 *
 * Exported as tvm-ffi module functions (``tvm_ffi.load_module(path)["cpu_matmul"]``), never as globals, so any
 * number of copies can be loaded into one process; ``bmc.runtime.kernels`` registers the global ``bmc.cpu.matmul``.
 *
 * ``cpu_matmul(a, b, trans_a, trans_b, out)``: numpy ``matmul`` semantics (batched, broadcast batch
 * dims, 1-D operands promoted) on contiguous row-major float32/float64 CPU tensors; ``trans_a``/``trans_b`` say the
 * operand is stored with its last two axes swapped. float32 products of up to 8 rows (decoding): bmc's own AVX2
 * kernels read b where it lies, once; more rows (a not transposed): bmc's panel GEMM (below, "float32 GEMM on
 * panels of b"); float64 and transposed-a products: ``cblas_sgemm``/``cblas_dgemm``.
 *
 * ``cpu_pack_weight(w, trans, out)`` / ``cpu_matmul_packed(a, wp, n, out)``: a float32 weight packed once, when the
 * model is loaded, into the panel GEMM's layout ``[ceil(N / 32), K, 32]``, and ``a [..., M, K] @`` it; a
 * float16/bfloat16 weight is packed so too but stays 16-bit (each slice of a panel is widened as the GEMM takes it:
 * one contiguous conversion instead of gathering the panel from the weight every call). On CPUs with AVX512_BF16
 * a bfloat16 product is not widened at all: each slice's rows are interleaved in pairs (PairRows) and 12 x 32
 * tiles of ``vdpbf16ps`` (two products a lane an instruction, float32 sums) read bfloat16 a as it is.
 *
 * ``cpu_matmul_nbits(a, codes, scales, out)`` / ``cpu_matmul_nbits_zp(a, codes, scales, zero_points, out)``: float32
 * ``a [M, K] @ W.T`` with ``W [N, K]`` given as 4-bit codes ``[N, blocks, block/2]`` (two a byte, low nibble first)
 * dequantized per block as ``(code - zero_point) * scale`` (zero point 8 when not given). For up to 16 rows of
 * ``a`` (decoding) each row of W is decoded (in registers: with AVX-512 32 values at a time for all the rows of
 * ``a`` at once, blocks of a multiple of 32; with AVX2 16 values for 4 rows; else into a small buffer) and dotted
 * with every row of ``a``: the weight is read once, half a byte a value. For more rows W is dequantized into a scratch matrix and multiplied by sgemm. Rows of W are split over
 * ``set_kernel_threads(n)`` threads (kept between calls).
 *
 * ``cpu_matmul_float8(a, codes, table, scale, mantissa_bits, bias, out)``: float32 ``a @ (table[codes] * scale).T``
 * of float8 codes ``[N, K]`` (their 256 values in ``table``; with AVX2 most decode by shifting their bits into a
 * float32's) and a scale per row of the codes, or one; the same two paths.
 *
 * ``cpu_matmul_integer(a, bt, a_zero_point, b_zero_point, out)``: the exact int32 ``(a - za) @ (bt - zb).T`` of
 * 8-bit ``a [..., M, K]`` and ``bt [N, K]`` (each uint8 or int8; ``za`` one value or one per row of the last M,
 * ``zb`` one value or one per row of ``bt``), for ONNX's MatMulInteger / QLinearMatMul. Computed as
 * ``sum(a * b) - zb * rowsum(a) - za * rowsum(b) + K * za * zb`` with the products of uint8 ``a`` and int8 ``b``
 * (an int8 ``a`` or a uint8 ``b`` is moved there by flipping its sign bit and its zero point by 128): AVX-512 VNNI
 * ``vpdpbusd`` (64 products an instruction) where the CPU has it, else plain loops; up to 16 rows 4x4 tiles of dot
 * products, more rows 8 x 32 tiles on b packed per call. Rows of ``bt`` are split over the kernel threads. Sums
 * wrap modulo 2^32 like onnxruntime's (K < 65793 cannot overflow).
 *
 * ``cpu_pack_int8_weight(bt, out)`` / ``cpu_matmul_integer_packed(a, bp, a_zero_point, b_zero_point, n, out)``: an
 * 8-bit weight packed once, when the model is loaded, into those panels with their row sums (``[ceil(N/16),
 * ceil(K/4) + 1, 64]`` int8, see PackInt8Panel), and ``cpu_matmul_integer`` on it: the 8 x 32 tiles for every row
 * count.
 *
 * ``cpu_conv2d(x, w, stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups, out)``: NCHW x OIHW
 * float32/float64 cross-correlation as one GEMM per image and group: float32 on the panel GEMM, which packs its
 * panels of the column matrix straight from the image (groups too small to keep the threads busy one at a time run
 * whole a thread); float64 (and CPUs without AVX2) im2col (per image, tap by tap, into a per-thread scratch matrix;
 * none for a 1x1 stride-1 unpadded convolution) + the BLAS. A float32 convolution of up to 64 output channels a
 * group (depthwise, ResNeXt's) is direct instead (DirectConv: each output plane's taps summed in registers).
 *
 * ``cpu_conv3d(x, w, stride_d, stride_h, stride_w, pad_f, pad_t, pad_l, pad_k, pad_b, pad_r, dil_d, dil_h, dil_w,
 * groups, out)``: NCDHW x OIDHW float32 (16-bit x and w widened) on the same panel GEMM, its panels packed from the
 * zero-padded volume (ConvCols with a depth); without AVX2 im2col + the BLAS.
 *
 * ``cpu_conv2d_fused(x, w, scale, shift, residual, relu, stride_h, ..., groups, out)``: float32 ``cpu_conv2d`` whose
 * sums are stored as ``relu?(sum * scale[channel] + shift[channel] + residual)`` (an empty scale, shift or residual
 * is left out): a bias or a folded batch norm, a residual add and a ReLU applied by the panel GEMM to each block
 * of the output while it is in cache, instead of by a TVM kernel reading the whole output again.
 * ``cpu_conv2d_fused_act(x, w, scale, shift, residual, act, lo, hi, stride_h, ..., groups, out)``: the same with
 * another activation: ``act`` 0 none, 1 ``min(max(v, lo), hi)`` (ReLU6, any Clip), 2 SiLU ``v * sigmoid(v)``, 3
 * HardSwish ``v * min(max(v / 6 + 1/2, 0), 1)``.
 *
 * ``cpu_minmax(x, out)``: ``out [2] = [min(x), max(x)]`` of a float32 tensor in one pass (NaN in x: both NaN; AVX-512,
 * else plain loops), for DynamicQuantizeLinear's range and any max/min of a whole float32 tensor.
 *
 * ``cpu_attention(q, k, v, scale, transpose_k, out)`` / ``cpu_attention_bias(q, k, v, bias, scale, transpose_k,
 * out)``: float32 ``softmax(scale * q @ kt + bias) @ v`` of ``q [..., M, D]``, ``kt [..., D, N]`` (or ``k [..., N,
 * D]`` with transpose_k), ``v [..., N, E]`` (k's and v's batch dims divide q's: 1 for multi-query, a divisor for
 * grouped-query attention, query index i reading key/value index i / group) and a bias broadcasting to ``[..., M,
 * N]``, a block of query rows at a time so the score matrix is never stored; keys a causal mask hides from a whole
 * block are skipped. 12 x 16 AVX-512 or 6 x 16 AVX2 register tiles, else plain loops. A few query rows with the key
 * as rows (a decoding step) take the skinny GEMMs' tiles instead, together with the rows of the next batch indices
 * that read the same keys and values (a grouped-query head's query heads; up to 8 rows), which are then read once
 * for all.
 * The keys and values may also be float16 or bfloat16 (both the same; a 16-bit key/value cache): those few rows
 * read them in place, 8 widened in registers at a time; otherwise each thread widens a batch index's into float32
 * once, in cache. ``cpu_attention[_bias]_lse(..., out, lse)`` also store each row's log-sum-exp of the scores
 * (float32 ``[..., M]``; -inf for a row of -inf): attention to a block of the keys, which context parallelism
 * combines with the other blocks'. ``cpu_attention_softcap[_lse](q, k, v, bias, scale, softcap, transpose_k, out[,
 * lse])``: the scaled scores soft-capped before the bias, ``softcap * tanh(s / softcap)`` (Gemma 2; the bias may be a
 * scalar 0).
 *
 * The BLAS is not linked: Python finds the OpenBLAS that numpy's wheel ships (already loaded into the process) and
 * calls ``blas_bind(path, sgemm, dgemm, int64)`` with its symbol names (``scipy_cblas_sgemm64_`` ...,
 * ILP64 integers), so this library works with whichever numpy is installed and shares numpy's thread pool.
 */
#include <dlfcn.h>
#include <unistd.h>
#include <immintrin.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include "float16.h"
#include "matmul_shapes.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <memory>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace bmc {
namespace native {

namespace ffi = tvm::ffi;

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };  // CBLAS_ORDER / CBLAS_TRANSPOSE values

// cblas_?gemm with 64-bit (ILP64) or 32-bit (LP64) integers; the enums are C ints either way.
using SgemmI64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, float, float*, int64_t);
using DgemmI64 = void (*)(int, int, int, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                          int64_t, double, double*, int64_t);
using SgemmI32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                          int32_t, float, float*, int32_t);
using DgemmI32 = void (*)(int, int, int, int32_t, int32_t, int32_t, double, const double*, int32_t,
                          const double*, int32_t, double, double*, int32_t);

struct Blas {
  void* sgemm = nullptr;
  void* dgemm = nullptr;
  bool int64 = true;
  std::string path;
};

std::mutex bind_mutex;
std::atomic<const Blas*> bound{nullptr};

const Blas& GetBlas() {
  const Blas* blas = bound.load(std::memory_order_acquire);
  if (blas == nullptr) {
    TVM_FFI_THROW(RuntimeError) << "cpu_matmul: no BLAS bound; call bmc.native.blas_bind first "
                                << "(bmc.runtime.kernels.register_cpu_kernels() does)";
  }
  return *blas;
}

template <typename T>
T* Data(const ffi::TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

void CheckOperand(const ffi::TensorView& t, DLDataType want, const char* what) {
  DLDataType dt = t.dtype();
  if (dt.code != want.code || dt.bits != want.bits || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << "cpu_matmul: " << what << " is " << ffi::DLDataTypeToString(dt)
                             << " but the output is " << ffi::DLDataTypeToString(want);
  }
  if (t.device().device_type != kDLCPU) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul: " << what << " must be on the CPU";
  }
  if (!t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul: " << what << " must be contiguous";
  }
}

// 16-bit float storage types the few-row kernels read b in (decoded 8 at a time in AVX2 registers)
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

template <typename TB = float>
bool SkinnyGemm(bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const TB* b, int64_t ldb,
                float* c, int64_t ldc);

bool PanelSgemm(bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                float* c, int64_t ldc);

template <typename T>
void Gemm(const Blas& blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, T* c, int64_t ldc) {
  if constexpr (sizeof(T) == 4) {
    if (!ta && (SkinnyGemm(tb, m, n, k, a, lda, b, ldb, c, ldc) || PanelSgemm(tb, m, n, k, a, lda, b, ldb, c, ldc))) {
      return;
    }
  }
  int opa = ta ? kTrans : kNoTrans, opb = tb ? kTrans : kNoTrans;
  if constexpr (sizeof(T) == 4) {
    if (blas.int64) {
      reinterpret_cast<SgemmI64>(blas.sgemm)(kRowMajor, opa, opb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
    } else {
      reinterpret_cast<SgemmI32>(blas.sgemm)(kRowMajor, opa, opb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
    }
  } else {
    if (blas.int64) {
      reinterpret_cast<DgemmI64>(blas.dgemm)(kRowMajor, opa, opb, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc);
    } else {
      reinterpret_cast<DgemmI32>(blas.dgemm)(kRowMajor, opa, opb, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc);
    }
  }
}

/*! \brief out = op(a) @ op(b) with the shapes of the views \a ta_, \a tb_, \a out and the data at \a a, \a b,
 *  \a c (the views' own, or float32 copies of 16-bit ones). */
template <typename T>
void MatmulImpl(const Blas& blas, const ffi::TensorView& ta_, const ffi::TensorView& tb_, bool ta, bool tb,
                const ffi::TensorView& out, const T* a, const T* b, T* c) {
  Operand A = Describe(ta_, true), B = Describe(tb_, false);
  if ((ta && ta_.ndim() < 2) || (tb && tb_.ndim() < 2)) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul: a transposed operand must have rank >= 2";
  }
  int64_t m = ta ? A.cols : A.rows, k = ta ? A.rows : A.cols;
  int64_t kb = tb ? B.cols : B.rows, n = tb ? B.rows : B.cols;
  if (k != kb) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul: contraction dims differ (" << k << " vs " << kb << ")";
  }
  Batch bt = BroadcastBatch(A, B, "cpu_matmul");
  const std::vector<int64_t>&batch = bt.dims, &sa = bt.sa, &sb = bt.sb;
  size_t nb = batch.size();
  int64_t count = Prod(batch);
  if (out.numel() != count * m * n) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul: out has " << out.numel() << " elements, expected "
                              << count * m * n;
  }
  if (count == 0 || m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < count * m * n; ++i) c[i] = T(0);
    return;
  }
  int64_t lda = A.cols, ldb = B.cols, ldc = n;
  int64_t a_mat = A.rows * A.cols, b_mat = B.rows * B.cols;
  // b is one matrix shared by every batch and a is not transposed: one GEMM with the batches stacked into M
  if (Prod(B.batch) == 1 && !ta && Prod(A.batch) == count) {
    Gemm<T>(blas, false, tb, count * m, n, k, a, lda, b, ldb, c, ldc);
    return;
  }
  std::vector<int64_t> idx(nb, 0);
  for (int64_t i = 0; i < count; ++i) {
    int64_t oa = 0, ob = 0;
    for (size_t d = 0; d < nb; ++d) {
      oa += idx[d] * sa[d];
      ob += idx[d] * sb[d];
    }
    Gemm<T>(blas, ta, tb, m, n, k, a + oa * a_mat, lda, b + ob * b_mat, ldb, c + i * m * n, ldc);
    for (size_t d = nb; d-- > 0;) {  // odometer increment
      if (++idx[d] < batch[d]) break;
      idx[d] = 0;
    }
  }
}

int64_t Dim(const ffi::TensorView& t, int i) { return t.shape()[i < 0 ? t.ndim() + i : i]; }

// ---- 2-D convolution -------------------------------------------------------------------------------------------

/*! \brief [lo, hi): the outputs ``o`` whose input index ``o * stride + offset - pad`` lies inside ``[0, size)``. */
inline std::pair<int64_t, int64_t> ValidOutputs(int64_t n_out, int64_t size, int64_t offset, int64_t pad,
                                                int64_t stride) {
  int64_t lo = pad - offset <= 0 ? 0 : (pad - offset + stride - 1) / stride;
  lo = std::min(lo, n_out);
  const int64_t last = size - 1 + pad - offset;
  const int64_t hi = last >= 0 ? std::min(n_out, last / stride + 1) : 0;
  return {lo, std::max(lo, hi)};
}

/*! \brief The column matrix ``[C * KH * KW, OH * OW]`` of one image (and group) of an unpadded 2-D convolution
 *  (a padded one reads a zero-padded copy of its image), described rather than stored: the panel GEMM packs its
 *  panels straight from the image. A 3-D convolution's (``[C * KD * KH * KW, OD * OH * OW]``) has a depth too. */
struct ConvCols {
  const float* x;  // [c, d, h, w]
  int64_t c, h, w, kh, kw, sh, sw, dh, dw, oh, ow;
  int64_t d = 1, kd = 1, sd = 1, dd = 1, od = 1;  // depth: input, taps, stride, dilation, output
};

/*! \brief exp(x) for x ≤ 0 and NaN (Cephes' expf: 2^n e^r, |r| ≤ ln2/2, degree-5 polynomial; ~1 ulp); branch-free
 *  so that loops over it vectorize. Below -87.3 (2^-126) the result is 2^-126 instead of smaller. */
__attribute__((always_inline)) inline float ExpNonPositive(float x) {
  x = std::max(x, -87.3f);  // keeps NaN
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

/*! \brief ExpNonPositive of eight lanes (a NaN stays NaN: maxps returns its second operand when one is NaN). */
__attribute__((target("avx2,fma"), always_inline)) inline __m256 ExpNonPositive8(__m256 v) {
  v = _mm256_max_ps(_mm256_set1_ps(-87.3f), v);
  const __m256 fn = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fmadd_ps(fn, _mm256_set1_ps(2.12194440e-4f),
                                   _mm256_fmadd_ps(fn, _mm256_set1_ps(-0.693359375f), v));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/*! \brief ``x[j] = x[j] * sigmoid(x[j])`` over a row: ``(v >= 0 ? v : v e^v) / (1 + e^-|v|)``, which cannot
 *  overflow, with e^v taken as 0 below -87.3 (where ExpNonPositive stops: v e^v would be subnormal there, and
 *  subnormals slow every later kernel down); eight lanes at a time with AVX2, else plain code. */
__attribute__((target("avx2,fma"))) void SiluRowAvx2(float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 floor = _mm256_set1_ps(-87.3f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j), a = _mm256_or_ps(v, sign);  // -|v|
    const __m256 e = _mm256_and_ps(ExpNonPositive8(a), _mm256_cmp_ps(a, floor, _CMP_GE_OQ));
    const __m256 num = _mm256_blendv_ps(_mm256_mul_ps(v, e), v, _mm256_cmp_ps(v, zero, _CMP_GE_OQ));
    _mm256_storeu_ps(x + j, _mm256_div_ps(num, _mm256_add_ps(one, e)));
  }
  for (; j < n; ++j) {
    const float v = x[j], a = -std::fabs(v), e = a < -87.3f ? 0.0f : ExpNonPositive(a);
    x[j] = (v >= 0.0f ? v : v * e) / (1.0f + e);
  }
}

/*! \brief ExpNonPositive8 in sixteen lanes, for x >= -87.3 (SiluRowAvx512 masks the rest). */
__attribute__((target("avx512f"), always_inline)) inline __m512 ExpNonPositive16(__m512 v) {
  const __m512 fn = _mm512_roundscale_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f),
                                                         _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF);
  const __m512 r = _mm512_fmadd_ps(fn, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fmadd_ps(fn, _mm512_set1_ps(-0.693359375f), v));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fn), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/*! \brief SiluRowAvx2 sixteen lanes at a time, the tail masked, and 1 / (1 + e) as a 14-bit reciprocal and a
 *  Newton step (a relative error of ~2^-27 instead of a division's latency). */
__attribute__((target("avx512f"))) void SiluRowAvx512(float* x, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), floor = _mm512_set1_ps(-87.3f);
  const __m512i sign = _mm512_set1_epi32(INT32_MIN);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + j);
    const __m512 a = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));  // -|v|
    // e^-|v| where -|v| >= -87.3, else 0 (a NaN fails the test too)
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, floor, _CMP_GE_OQ), ExpNonPositive16(a));
    const __m512 d = _mm512_add_ps(one, e);
    __m512 rcp = _mm512_rcp14_ps(d);
    rcp = _mm512_mul_ps(rcp, _mm512_fnmadd_ps(d, rcp, two));
    const __m512 num = _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v, e);
    _mm512_mask_storeu_ps(x + j, live, _mm512_mul_ps(num, rcp));
  }
}

/*! \brief ``x[j] = x[j] * sigmoid(x[j])`` over a row (SiluRowAvx512, SiluRowAvx2, else plain code). */
void SiluRow(float* x, int64_t n) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512) {
    SiluRowAvx512(x, n);
    return;
  }
  if (avx2) {
    SiluRowAvx2(x, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j], a = -std::fabs(v), e = a < -87.3f ? 0.0f : ExpNonPositive(a);
    x[j] = (v >= 0.0f ? v : v * e) / (1.0f + e);
  }
}

/*! \brief The activation an Epilogue ends with. */
enum class Activation : int64_t {
  kNone = 0,
  kClamp = 1,  // min(max(v, lo), hi): ReLU (lo 0, hi inf), ReLU6 (0, 6), any Clip
  kSilu = 2,   // v * sigmoid(v) (SiLU, Swish)
  kHardSwish = 3,  // v * min(max(v / 6 + 1/2, 0), 1) (MobileNetV3)
};

/*! \brief What a GEMM does to its sums as it stores them: ``c = act(c * scale[row] + shift[row] + residual)``,
 *  each part optional (a convolution's bias or folded batch norm, a residual add, an activation). */
struct Epilogue {
  const float* scale = nullptr;     // per row of c (an output channel), or none
  const float* shift = nullptr;     // per row of c, or none
  const float* residual = nullptr;  // laid out as c (row stride ldr), or none
  int64_t ldr = 0;
  Activation act = Activation::kNone;
  float lo = -INFINITY, hi = INFINITY;  // kClamp's bounds

  bool Active() const {
    return scale != nullptr || shift != nullptr || residual != nullptr || act != Activation::kNone;
  }
  /*! \brief The epilogue of the rows from \a row on (the residual's from \a at on). */
  Epilogue From(int64_t row, int64_t at) const {
    Epilogue e = *this;
    e.scale = scale ? scale + row : nullptr;
    e.shift = shift ? shift + row : nullptr;
    e.residual = residual ? residual + at : nullptr;
    return e;
  }
};

/*! \brief ``c[j] = act(c[j] * s + t + r[j])`` over one row of \a n (\a r may be null): one pass per part over a row
 *  that is in cache, each a loop GCC vectorizes (the SiLU's: SiluRow). */
__attribute__((target_clones("avx512f", "avx2", "default")))
void EpilogueRow(float* c, int64_t n, float s, float t, const float* r, Activation act, float lo, float hi) {
  if (s != 1.0f || t != 0.0f) {
    for (int64_t j = 0; j < n; ++j) c[j] = c[j] * s + t;
  }
  if (r != nullptr) {
    for (int64_t j = 0; j < n; ++j) c[j] += r[j];
  }
  if (act == Activation::kClamp) {
    for (int64_t j = 0; j < n; ++j) c[j] = std::min(std::max(c[j], lo), hi);  // NaN stays NaN
  } else if (act == Activation::kSilu) {
    SiluRow(c, n);
  } else if (act == Activation::kHardSwish) {
    for (int64_t j = 0; j < n; ++j) c[j] *= std::min(std::max(c[j] * (1.0f / 6.0f) + 0.5f, 0.0f), 1.0f);
  }
}

/*! \brief Applies \a e to rows [r0, r0 + rows) and columns [c0, c0 + cols) of \a c (row stride \a ldc). */
inline void ApplyEpilogue(const Epilogue& e, float* c, int64_t ldc, int64_t r0, int64_t rows, int64_t c0,
                          int64_t cols) {
  for (int64_t i = r0; i < r0 + rows; ++i) {
    EpilogueRow(c + i * ldc + c0, cols, e.scale ? e.scale[i] : 1.0f, e.shift ? e.shift[i] : 0.0f,
                e.residual ? e.residual + i * e.ldr + c0 : nullptr, e.act, e.lo, e.hi);
  }
}

/*! \brief Applies \a e to the \a m channels of one pixel, \a c [m] (one row, instead of m rows of one). */
inline void ApplyPixelEpilogue(const Epilogue& e, float* c, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    c[i] = c[i] * (e.scale ? e.scale[i] : 1.0f) + (e.shift ? e.shift[i] : 0.0f) + (e.residual ? e.residual[i] : 0.0f);
  }
  EpilogueRow(c, m, 1.0f, 0.0f, nullptr, e.act, e.lo, e.hi);
}

/*! \brief c [m, n] = a [m, k] @ (the convolution's columns \a cols, or \a b [k, n] itself) on the panel GEMM, then
 *  \a ep (false, nothing done: this CPU or shape is for the im2col + BLAS path). */
bool PanelConv(int64_t m, int64_t n, int64_t k, const float* a, const float* b, const ConvCols* cols, float* c,
               const Epilogue* ep);
void PadImage(const float* x, int64_t c, int64_t h, int64_t w, int64_t pt, int64_t pl, int64_t hp, int64_t wp,
              float* out);

/*! \brief The geometry of a 2-D convolution (NCHW input, OIHW weight). */
struct ConvShape {
  int64_t n, c, h, w, m, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, oh, ow;
};
/*! \brief A convolution of \a g groups of few channels (a depthwise one's, one input channel a group; ResNeXt's
 *  four), direct: each output plane's taps summed in registers over the stride phases of its group's zero-padded
 *  input planes, then \a ep. */
void DirectConv(const ConvShape& s, int64_t g, const float* x, const float* w, float* out, const Epilogue& ep);
/*! \brief The most output channels (and input channels) a group that DirectConv takes (``MAX_DIRECT_CONV_GROUP_M`` in
 *  bmc/codegen/cpu.py): against a GEMM a group (2 threads, 3x3 taps, ResNeXt/RegNet shapes, as many input channels
 *  a group as output ones), 4 a group 0.11x the time, 8 0.45-0.58x, 16 0.56-0.72x, 32 0.75-0.78x, 64 0.92-0.99x,
 *  128 0.99-1.03x (the GEMM packs a panel of few rows per group). More input channels than that make every output
 *  chunk read more streams than L2 holds. */
constexpr int64_t kDirectMaxGroup = 64;

/*! \brief \a group (gi) for each of \a g groups of \a work multiply-adds each; false if any returned false (then
 *  none computed anything: PanelConv declines before it starts, and for every group alike). One group at a time,
 *  each on every thread, or, when a group is too small to keep the threads busy (ResNeXt's), whole groups a thread. */
bool ConvGroups(int64_t g, int64_t work, const std::function<bool(int64_t)>& group);

/*! \brief NCHW x OIHW cross-correlation as im2col + one GEMM per image and group: the column matrix
 *  ``[C * KH * KW, OH * OW]`` is written tap by tap from the unpadded input (the border zero-filled) into a
 *  per-thread scratch buffer; a 1x1, stride-1, unpadded convolution multiplies the input itself. */
template <typename T>
void Conv2dImpl(const Blas& blas, const ffi::TensorView& tx, const ffi::TensorView& tw, int64_t sh, int64_t sw,
                int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw, int64_t g,
                const ffi::TensorView& tout, const T* x, const T* w, T* out, const Epilogue& ep = Epilogue()) {
  if (tx.ndim() != 4 || tw.ndim() != 4 || tout.ndim() != 4) {
    TVM_FFI_THROW(ValueError) << "cpu_conv2d: x, w and out must be 4-D (NCHW, OIHW)";
  }
  const int64_t n = Dim(tx, 0), c = Dim(tx, 1), h = Dim(tx, 2), wd = Dim(tx, 3);
  const int64_t m = Dim(tw, 0), cg = Dim(tw, 1), kh = Dim(tw, 2), kw = Dim(tw, 3);
  if (g < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || c != cg * g || m % g != 0) {
    TVM_FFI_THROW(ValueError) << "cpu_conv2d: channels " << c << " and " << m << " do not fit groups " << g
                              << " (or a stride/dilation < 1)";
  }
  const int64_t oh = (h + pt + pb - dh * (kh - 1) - 1) / sh + 1, ow = (wd + pl + pr - dw * (kw - 1) - 1) / sw + 1;
  if (Dim(tout, 0) != n || Dim(tout, 1) != m || Dim(tout, 2) != oh || Dim(tout, 3) != ow) {
    TVM_FFI_THROW(ValueError) << "cpu_conv2d: out must be [" << n << ", " << m << ", " << oh << ", " << ow << "]";
  }
  const int64_t mg = m / g, k = cg * kh * kw, pixels = oh * ow;
  const bool direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0 && pb == 0 && pr == 0;
  if (h == 1 && wd == 1 && kh == 1 && kw == 1 && g == 1 && pt == 0 && pl == 0 && pb == 0 && pr == 0) {
    // one pixel (a squeeze-and-excitation block's convs, after its pooling): out [n, m] = x [n, c] @ w [m, c]^T, a
    // product of few rows with w read where it lies (the panel GEMM would fill one of its 32 columns)
    Gemm<T>(blas, false, true, n, m, c, x, c, w, c, out, m);
    if constexpr (sizeof(T) == 4) {
      for (int64_t b = 0; b < n && ep.Active(); ++b) ApplyPixelEpilogue(ep.From(0, b * m), out + b * m, m);
    }
    return;
  }
  if constexpr (sizeof(T) == 4) {  // float32: the panel GEMM packs its panels of the columns from the image itself
    // few channels a group (depthwise, ResNeXt's): a GEMM of few rows a group would waste its tiles
    if (g > 1 && (cg == 1 || (mg <= kDirectMaxGroup && cg <= kDirectMaxGroup))) {
      DirectConv({n, c, h, wd, m, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, oh, ow}, g, x, w, out, ep);
      return;
    }
    const int64_t hp = h + pt + pb, wp = wd + pl + pr;
    thread_local std::vector<float> padded;  // a padded image: every tap's rows are plain copies
    bool done = true;
    for (int64_t b = 0; b < n && done; ++b) {
      const float* xb = x + b * c * h * wd;
      if (!direct && (hp != h || wp != wd)) {
        padded.resize(static_cast<size_t>(c * hp * wp));
        PadImage(xb, c, h, wd, pt, pl, hp, wp, padded.data());
        xb = padded.data();
      }
      const auto group = [&, xb, b](int64_t gi) {
        const ConvCols cols{xb + gi * cg * hp * wp, cg, hp, wp, kh, kw, sh, sw, dh, dw, oh, ow};
        const int64_t first = b * m + gi * mg;
        const Epilogue e = ep.From(gi * mg, first * pixels);
        return PanelConv(mg, pixels, k, w + gi * mg * k, direct ? xb + gi * cg * h * wd : nullptr,
                         direct ? nullptr : &cols, out + first * pixels, e.Active() ? &e : nullptr);
      };
      done = ConvGroups(g, mg * pixels * k, group);
    }
    if (done) return;
  }
  thread_local std::vector<T> scratch;  // the column matrix, reused by the next call of this size or smaller
  if (!direct) scratch.resize(static_cast<size_t>(c * kh * kw * pixels));
  for (int64_t b = 0; b < n; ++b) {
    const T* xb = x + b * c * h * wd;
    const T* col = xb;
    if (!direct) {
      T* cols = scratch.data();
      for (int64_t i = 0; i < kh; ++i) {
        const auto [r0, r1] = ValidOutputs(oh, h, i * dh, pt, sh);
        for (int64_t j = 0; j < kw; ++j) {
          const auto [c0, c1] = ValidOutputs(ow, wd, j * dw, pl, sw);
          for (int64_t ch = 0; ch < c; ++ch) {
            T* tap = cols + ((ch * kh + i) * kw + j) * pixels;
            const T* src = xb + ch * h * wd;
            std::fill(tap, tap + r0 * ow, T(0));
            for (int64_t r = r0; r < r1; ++r) {
              T* row = tap + r * ow;
              const T* in = src + (r * sh + i * dh - pt) * wd + (c0 * sw + j * dw - pl);  // output column c0's
              std::fill(row, row + c0, T(0));
              if (sw == 1) {
                std::memcpy(row + c0, in, sizeof(T) * (c1 - c0));
              } else {
                for (int64_t q = c0; q < c1; ++q) row[q] = in[(q - c0) * sw];
              }
              std::fill(row + c1, row + ow, T(0));
            }
            std::fill(tap + r1 * ow, tap + pixels, T(0));
          }
        }
      }
      col = cols;
    }
    for (int64_t gi = 0; gi < g; ++gi) {
      Gemm<T>(blas, false, false, mg, pixels, k, w + gi * mg * k, k, col + gi * k * pixels, pixels,
              out + (b * m + gi * mg) * pixels, pixels);
    }
    if constexpr (sizeof(T) == 4) {
      if (ep.Active()) ApplyEpilogue(ep.From(0, b * m * pixels), out + b * m * pixels, pixels, 0, m, 0, pixels);
    }
  }
}

// ---- 4-bit weights ---------------------------------------------------------------------------------------------

constexpr int64_t kFusedRows = 16;  // up to this many rows of a, dot products on the fly; more: dequantize + sgemm
std::atomic<int> kernel_threads{1};

struct NBits {
  const float* a;
  const uint8_t* codes;
  const float* scales;
  const float* zp;  // nullptr: 8
  float* out;
  int64_t m, n, blocks, half, k;
};

__attribute__((target_clones("avx2", "default")))
void DequantRow(const NBits& p, int64_t row, float* w) {
  const uint8_t* c = p.codes + row * p.blocks * p.half;
  for (int64_t b = 0; b < p.blocks; ++b) {
    const float s = p.scales[row * p.blocks + b];
    const float z = p.zp != nullptr ? p.zp[row * p.blocks + b] : 8.0f;
    const uint8_t* cb = c + b * p.half;
    float* wb = w + b * 2 * p.half;
    for (int64_t j = 0; j < p.half; ++j) {
      wb[2 * j] = (static_cast<float>(cb[j] & 15) - z) * s;
      wb[2 * j + 1] = (static_cast<float>(cb[j] >> 4) - z) * s;
    }
  }
}

/*! \brief Sixteen 4-bit values (eight bytes, low nibble first) as two vectors of ``code - z``. */
__attribute__((target("avx2"))) inline void DecodeNibbles(const uint8_t* codes, __m256 z, __m256& v0, __m256& v1) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i values = _mm_unpacklo_epi8(_mm_and_si128(bytes, low4),
                                           _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));  // in order
  v0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(values)), z);
  v1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(values, 8))), z);
}

/*! \brief DequantRow with AVX2, for blocks of a multiple of 16 values. */
__attribute__((target("avx2"))) void DequantRowAvx2(const NBits& p, int64_t row, float* w) {
  const uint8_t* c = p.codes + row * p.blocks * p.half;
  for (int64_t b = 0; b < p.blocks; ++b) {
    const __m256 s = _mm256_set1_ps(p.scales[row * p.blocks + b]);
    const __m256 z = _mm256_set1_ps(p.zp != nullptr ? p.zp[row * p.blocks + b] : 8.0f);
    for (int64_t j = 0; j < p.half; j += 8) {
      __m256 v0, v1;
      DecodeNibbles(c + b * p.half + j, z, v0, v1);
      _mm256_storeu_ps(w + b * 2 * p.half + 2 * j, _mm256_mul_ps(v0, s));
      _mm256_storeu_ps(w + b * 2 * p.half + 2 * j + 8, _mm256_mul_ps(v1, s));
    }
  }
}

/*! \brief ``out[r * ldo] = dot(a[r], W[row])`` for MR rows of a (``p.k`` apart), W's row decoded in registers
 *  once for all of them, blocks of a multiple of 16 values: per block the products of ``code - z`` are summed,
 *  then scaled. */
template <int MR>
__attribute__((target("avx2,fma"))) void DotRowsNBitsAvx2(const NBits& p, int64_t row, const float* a, float* out,
                                                           int64_t ldo) {
  const uint8_t* c = p.codes + row * p.blocks * p.half;
  __m256 acc[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.blocks; ++b) {
    const __m256 s = _mm256_set1_ps(p.scales[row * p.blocks + b]);
    const __m256 z = _mm256_set1_ps(p.zp != nullptr ? p.zp[row * p.blocks + b] : 8.0f);
    constexpr int kChains = MR < 3 ? 2 : 1;  // independent sums a row (an FMA waits ~4 cycles for the last)
    __m256 t[MR][kChains];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      for (int q = 0; q < kChains; ++q) t[r][q] = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < p.half; j += 8) {
      __m256 v0, v1;
      DecodeNibbles(c + b * p.half + j, z, v0, v1);
      const float* ab = a + b * 2 * p.half + 2 * j;
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        t[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(ab + r * p.k), v0, t[r][0]);
        t[r][kChains - 1] = _mm256_fmadd_ps(_mm256_loadu_ps(ab + r * p.k + 8), v1, t[r][kChains - 1]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      if constexpr (kChains == 2) t[r][0] = _mm256_add_ps(t[r][0], t[r][1]);
      acc[r] = _mm256_fmadd_ps(t[r][0], s, acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[r]);
    float sum = 0.0f;
    for (float x : lanes) sum += x;
    out[r * ldo] = sum;
  }
}

/*! \brief a [m, k] as DotRowsNBits512 reads it: its 32-value chunks (the nibbles of 16 code bytes) of one row after
 *  another, a chunk as the 16 values at even positions (the low nibbles) then the 16 at odd ones (the high
 *  nibbles); so the rows sit at fixed offsets from one pointer (8 row pointers had spilled). \a k is a multiple
 *  of 32. */
void SplitEvenOdd(const float* a, int64_t m, int64_t k, float* out) {
  for (int64_t g = 0; g < k / 32; ++g) {
    for (int64_t r = 0; r < m; ++r) {
      const float* src = a + r * k + 32 * g;
      float* dst = out + (g * m + r) * 32;
      for (int j = 0; j < 16; ++j) {
        dst[j] = src[2 * j];
        dst[16 + j] = src[2 * j + 1];
      }
    }
  }
}

/*! \brief DotRowsNBitsAvx2 with AVX-512 for MR <= kFusedRows rows of a laid out by SplitEvenOdd (\a ae), blocks of
 *  a multiple of 32 values: 16 code bytes give the low and the high nibbles as two vectors with no interleaving, so
 *  a weight row is decoded 32 values at a time, once for all the rows. Up to 8 rows, a block's products are summed
 *  then scaled (8 + 8 registers); more rows scale the decoded values instead (16 accumulators; 7% faster at 16
 *  rows, 15% slower at one, where decoding is the work). */
template <int MR>
__attribute__((target("avx512f,avx512bw"))) void DotRowsNBits512(const NBits& p, int64_t row, const float* ae,
                                                                  float* out, int64_t ldo) {
  static_assert(MR >= 1 && MR <= kFusedRows);
  constexpr bool kScaled = MR > 8;
  const uint8_t* c = p.codes + row * p.blocks * p.half;
  const __m512i low4 = _mm512_set1_epi32(15);
  __m512 acc[MR], t[kScaled ? 1 : MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < p.blocks; ++b) {
    const __m512 z = _mm512_set1_ps(p.zp != nullptr ? p.zp[row * p.blocks + b] : 8.0f);
    const __m512 s = _mm512_set1_ps(p.scales[row * p.blocks + b]);
    if constexpr (!kScaled) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) t[r] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < p.half; j += 16) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * p.half + j)));
      __m512 lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, low4)), z);
      __m512 hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), z);
      const float* ab = ae + (b * p.half + j) / 16 * MR * 32;
      if constexpr (kScaled) {
        lo = _mm512_mul_ps(lo, s);
        hi = _mm512_mul_ps(hi, s);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ab + r * 32), lo, acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ab + r * 32 + 16), hi, acc[r]);
        }
      } else {
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          t[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ab + r * 32), lo, t[r]);
          t[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ab + r * 32 + 16), hi, t[r]);
        }
      }
    }
    if constexpr (!kScaled) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(t[r], s, acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) out[r * ldo] = _mm512_reduce_add_ps(acc[r]);
}

using DotRowsNBitsFn = void (*)(const NBits&, int64_t, const float*, float*, int64_t);
const DotRowsNBitsFn kDotRowsNBits512[kFusedRows] = {
    DotRowsNBits512<1>, DotRowsNBits512<2>, DotRowsNBits512<3>, DotRowsNBits512<4>, DotRowsNBits512<5>,
    DotRowsNBits512<6>, DotRowsNBits512<7>, DotRowsNBits512<8>, DotRowsNBits512<9>, DotRowsNBits512<10>,
    DotRowsNBits512<11>, DotRowsNBits512<12>, DotRowsNBits512<13>, DotRowsNBits512<14>, DotRowsNBits512<15>,
    DotRowsNBits512<16>};

/*! \brief DotRowsNBitsAvx2 for every row of a, four at a time. */
void DotAllRowsNBitsAvx2(const NBits& p, int64_t row) {
  int64_t i = 0;
  for (; i + 4 <= p.m; i += 4) DotRowsNBitsAvx2<4>(p, row, p.a + i * p.k, p.out + i * p.n + row, p.n);
  switch (p.m - i) {
    case 3: DotRowsNBitsAvx2<3>(p, row, p.a + i * p.k, p.out + i * p.n + row, p.n); break;
    case 2: DotRowsNBitsAvx2<2>(p, row, p.a + i * p.k, p.out + i * p.n + row, p.n); break;
    case 1: DotRowsNBitsAvx2<1>(p, row, p.a + i * p.k, p.out + i * p.n + row, p.n); break;
    default: break;
  }
}

__attribute__((target_clones("avx2", "default")))
float Dot(const float* x, const float* y, int64_t k) {
  float acc[16] = {0.0f};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += x[i + l] * y[i + l];
  }
  float s = 0.0f;
  for (; i < k; ++i) s += x[i] * y[i];
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

/*! \brief Worker threads kept between kernel calls, where TVM's pool cannot be used (RunOnTvmPool: no TVM runtime
 *  in the process, ``BMC_KERNEL_POOL=own``, a forked child). Starting and joining a thread costs ~36 us on the
 *  test VM, and waking one asleep on a condition variable ~45 us (its vCPU halts), against ~1 us while it is awake; a decoding
 *  step makes dozens of kernel calls. So a worker, and the caller waiting for the workers, stay awake (a pause
 *  loop) for kSpinMicros before they sleep: a step's next call usually comes within that, and a longer wait
 *  would take a core from TVM's or the BLAS' threads. One call at a time uses the pool (another caller, or a task
 *  that calls back into a kernel, starts its own threads); a forked child builds a new one (threads do not
 *  survive fork). */
constexpr int kSpinMicros = 50;
class KernelPool {
 public:
  static KernelPool* Get() {
    static std::atomic<KernelPool*> pool{nullptr};
    KernelPool* p = pool.load(std::memory_order_acquire);
    if (p == nullptr || p->pid_ != getpid()) {
      static std::mutex create;
      std::lock_guard<std::mutex> lock(create);
      p = pool.load(std::memory_order_acquire);
      if (p == nullptr || p->pid_ != getpid()) {
        p = new KernelPool();  // never freed: workers may sleep in it until exit (a forked child's copy leaks)
        pool.store(p, std::memory_order_release);
      }
    }
    return p;
  }

  /*! \brief task(t) for t in [0, count) on the caller (t = 0) and count - 1 workers; false if the pool is busy. */
  bool Run(int64_t count, const std::function<void(int64_t)>& task) {
    bool idle = false;
    if (!busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int64_t>(workers_.size()) < count - 1) {
        const int64_t index = static_cast<int64_t>(workers_.size()) + 1;
        workers_.emplace_back([this, index] { Work(index); });
        workers_.back().detach();
      }
      task_ = &task;
      count_ = count;
      pending_ = count - 1;
      published_.store(++generation_, std::memory_order_release);
    }
    wake_.notify_all();
    task(0);
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    while (pending_.load(std::memory_order_acquire) != 0 && std::chrono::steady_clock::now() < until) _mm_pause();
    {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
      task_ = nullptr;
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  void Work(int64_t index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* task;
      // a little while awake first: the next kernel call of a step usually comes within it
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      while (published_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) {
        _mm_pause();
      }
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= count_) continue;
        task = task_;
      }
      (*task)(index);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // the caller is spinning, or waiting (or about to) under the lock
        done_.notify_one();
      }
    }
  }

  const pid_t pid_ = getpid();
  std::atomic<bool> busy_{false};
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> pending_{0};
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};  // generation_, readable without the lock
};

/*! \brief TVM's ``TVMBackendParallelLaunch`` (``tvm/runtime/c_backend_api.h``), found in the process (the TVM
 *  runtime that loaded this library), unless ``BMC_KERNEL_POOL=own`` or in a forked child (KernelPool then):
 *  bmc's kernels run on TVM's thread pool,
 *  so that two pools do not spin against each other on the same cores between a model's TVM and native kernels
 *  (2 cores: MobileNetV2 -22%, ShuffleNet -13..21%, ViT and ConvNeXt -7%; see ParallelRows). */
struct TvmParallelEnv {
  void* sync_handle;
  int32_t num_task;
};
using TvmParallelLambda = int (*)(int task_id, TvmParallelEnv* penv, void* cdata);
using TvmParallelLaunch = int (*)(TvmParallelLambda flambda, void* cdata, int num_task);

TvmParallelLaunch TvmPool() {
  static const pid_t pid = getpid();  // a forked child has none of TVM's workers, which its copy would wait for
  static const TvmParallelLaunch launch = [] {
    const char* env = std::getenv("BMC_KERNEL_POOL");
    if (env != nullptr && std::string(env) == "own") return TvmParallelLaunch(nullptr);
    return reinterpret_cast<TvmParallelLaunch>(dlsym(RTLD_DEFAULT, "TVMBackendParallelLaunch"));
  }();
  return getpid() == pid ? launch : nullptr;
}

thread_local bool on_tvm_pool = false;  // this thread runs a part of RunOnTvmPool (a nested call runs alone)

/*! \brief task(t) for t in [0, count) on TVM's pool: its tasks take the parts in turn (it may have more or fewer
 *  threads than \a count); an exception of a part is rethrown here, not through TVM's C frames. False: no pool,
 *  or called from one of its parts. */
template <typename Task>
bool RunOnTvmPool(int64_t count, const Task& task) {
  const TvmParallelLaunch launch = TvmPool();
  if (launch == nullptr || on_tvm_pool) return false;
  struct Closure {
    const Task* task;
    int64_t count;
    std::mutex mu;
    std::exception_ptr error;
  } closure{&task, count, {}, nullptr};
  const auto lambda = [](int id, TvmParallelEnv* env, void* data) -> int {
    auto* c = static_cast<Closure*>(data);
    const bool outer = on_tvm_pool;
    on_tvm_pool = true;
    for (int64_t t = id; t < c->count; t += std::max<int32_t>(env->num_task, 1)) {
      try {
        (*c->task)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(c->mu);
        if (!c->error) c->error = std::current_exception();
      }
    }
    on_tvm_pool = outer;
    return 0;
  };
  if (launch(lambda, &closure, 0) != 0) return false;  // 0 tasks: all of the pool's threads
  if (closure.error) std::rethrow_exception(closure.error);
  return true;
}

/*! \brief fn(begin, end) over [0, n) in contiguous chunks, one per thread (the caller's thread takes the first),
 *  on at most \a max_threads threads: TVM's pool's (RunOnTvmPool), else KernelPool's. */
template <typename Fn>
void ParallelRows(int64_t n, Fn fn, int64_t max_threads = INT64_MAX) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({kernel_threads.load(), n, max_threads}));
  const int64_t chunk = (n + threads - 1) / threads;
  const auto part = [&](int64_t t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) fn(begin, end);
  };
  if (threads == 1 || on_tvm_pool) {  // (on the pool already: the other threads run the sibling parts)
    fn(0, n);
    return;
  }
  if (RunOnTvmPool(threads, part)) return;
  if (KernelPool::Get()->Run(threads, part)) return;
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < threads; ++t) workers.emplace_back(part, t);
  part(0);
  for (auto& w : workers) w.join();
}

bool ConvGroups(int64_t g, int64_t work, const std::function<bool(int64_t)>& group) {
  if (g == 1 || (work >> 19) >= kernel_threads.load()) {  // (PanelGemmRun's threads: one per 2^19 multiply-adds)
    for (int64_t gi = 0; gi < g; ++gi) {
      if (!group(gi)) return false;
    }
    return true;
  }
  std::atomic<bool> all{true};
  ParallelRows(g, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi) {
      if (!group(gi)) all = false;
    }
  }, g * work / (int64_t{1} << 19) + 1);
  return all;
}

/*! \brief out [hp, wp] = the plane x [h, w] at row \a pt, column \a pl, in a zero border. */
inline void PadPlane(const float* x, int64_t h, int64_t w, int64_t pt, int64_t pl, int64_t hp, int64_t wp,
                     float* out) {
  std::fill(out, out + pt * wp, 0.0f);
  for (int64_t r = 0; r < h; ++r) {
    float* row = out + (pt + r) * wp;
    std::fill(row, row + pl, 0.0f);
    std::memcpy(row + pl, x + r * w, sizeof(float) * w);
    std::fill(row + pl + w, row + wp, 0.0f);
  }
  std::fill(out + (pt + h) * wp, out + hp * wp, 0.0f);
}

/*! \brief out [c, h + pt + pb, w + pl + pr] = x [c, h, w] with a zero border, channels split over the threads. */
void PadImage(const float* x, int64_t c, int64_t h, int64_t w, int64_t pt, int64_t pl, int64_t hp, int64_t wp,
              float* out) {
  ParallelRows(c, [=](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) PadPlane(x + ch * h * w, h, w, pt, pl, hp, wp, out + ch * hp * wp);
  }, c * hp * wp / (int64_t{1} << 16) + 1);
}

constexpr int64_t kDepthwiseChunk = 64;  // outputs summed in registers at a time
constexpr int64_t kDirectOutputs = 4;    // output planes DirectTaps sums at once (16 vector registers)

/*! \brief DirectTaps for kOc output planes. */
template <int kOc>
__attribute__((always_inline)) inline void DirectTapsOf(const float* const* src, const float* w, int64_t ldw,
                                                         int64_t terms, int64_t len, float* out, int64_t ldo) {
  typedef float Vec __attribute__((vector_size(64)));
  const auto load = [](const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  for (int64_t o0 = 0; o0 < len; o0 += kDepthwiseChunk) {
    Vec acc[kOc][4] = {};
    for (int64_t t = 0; t < terms; ++t) {
      const float* in = src[t] + o0;
      const Vec v[4] = {load(in), load(in + 16), load(in + 32), load(in + 48)};
      for (int k = 0; k < kOc; ++k) {
        const float wv = w[k * ldw + t];
        for (int u = 0; u < 4; ++u) acc[k][u] += wv * v[u];
      }
    }
    for (int k = 0; k < kOc; ++k) {
      std::memcpy(out + k * ldo + o0, acc[k], sizeof(float) * static_cast<size_t>(std::min(kDepthwiseChunk, len - o0)));
    }
  }
}

/*! \brief \a out [oc][len] (plane stride \a ldo) = sum over the terms t of \a w [oc][t] (row stride \a ldw) * \a src
 *  [t][0, len), for \a oc <= kDirectOutputs output planes: 64 outputs of each at a time in four 16-lane vectors
 *  (GCC's vector extension: zmm registers in the AVX-512 clone, halves or quarters in the others), every stream's
 *  vectors loaded once for all the planes, summed over every term before they are stored. Reads up to
 *  ``kDepthwiseChunk - 1`` floats past each term's \a len. (Written as a plain loop over a 64-float array, GCC
 *  unrolled the terms and left the sums scalar.) */
__attribute__((target_clones("avx512f", "avx2", "default")))
void DirectTaps(const float* const* src, const float* w, int64_t ldw, int64_t terms, int64_t len, int64_t oc,
                float* out, int64_t ldo) {
  switch (oc) {
    case 1: DirectTapsOf<1>(src, w, ldw, terms, len, out, ldo); break;
    case 2: DirectTapsOf<2>(src, w, ldw, terms, len, out, ldo); break;
    case 3: DirectTapsOf<3>(src, w, ldw, terms, len, out, ldo); break;
    default: DirectTapsOf<4>(src, w, ldw, terms, len, out, ldo); break;
  }
}

/*! \brief Column b of \a row [w] every \a sw to \a out + b * \a stride, for each b < \a sw (stride 2 spelled out:
 *  GCC then vectorizes the even/odd split with permutes; the general loop stays scalar, ~1 ns a value). */
__attribute__((target_clones("avx512f", "avx2", "default")))
void SplitColumns(const float* row, int64_t w, int64_t sw, float* out, int64_t stride) {
  if (sw == 2) {
    float* even = out;
    float* odd = out + stride;
    const int64_t pairs = w / 2;
    for (int64_t q = 0; q < pairs; ++q) {
      even[q] = row[2 * q];
      odd[q] = row[2 * q + 1];
    }
    if (w % 2) even[pairs] = row[w - 1];
    return;
  }
  for (int64_t b = 0; b < sw; ++b) {
    float* dst = out + b * stride;
    for (int64_t x = b; x < w; x += sw) *dst++ = row[x];
  }
}

constexpr int64_t kDepthwiseLanes = 16;  // channels a DepthwiseLanes block computes at once, one a vector lane

/*! \brief DirectConv of up to kDepthwiseLanes channels (\a lanes) with one input channel each, the channels in the
 *  lanes of a vector: the planes \a x are transposed into a zero-bordered ``[hp, wp, kDepthwiseLanes]`` image, each
 *  output pixel sums its taps (any stride or dilation) as vectors of all the channels, four pixels of a row at a
 *  time (four independent sums), and the ``[pixels, kDepthwiseLanes]`` result is transposed back into the planes \a
 *  out. Nothing is computed that is dropped, and no phase is copied: for small maps (DepthwiseInLanes), where the
 *  per-plane work and wide rows of DirectConv's own path cost more than the taps. \a buf holds ``(hp wp + taps +
 *  pixels) kDepthwiseLanes`` floats. */
__attribute__((target_clones("avx512f", "avx2", "default")))
void DepthwiseLanes(const ConvShape& s, const float* x, const float* w, int64_t lanes, float* buf, float* out) {
  typedef float Vec __attribute__((vector_size(64)));
  static_assert(sizeof(Vec) == kDepthwiseLanes * sizeof(float));
  const auto load = [](const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  const int64_t hp = s.h + s.pt + s.pb, wp = s.w + s.pl + s.pr, taps = s.kh * s.kw, pixels = s.oh * s.ow;
  float* in = buf;
  float* wt = in + hp * wp * kDepthwiseLanes;
  float* res = wt + taps * kDepthwiseLanes;
  std::fill(in, in + hp * wp * kDepthwiseLanes, 0.0f);
  std::fill(wt, wt + taps * kDepthwiseLanes, 0.0f);
  for (int64_t l = 0; l < lanes; ++l) {
    const float* plane = x + l * s.h * s.w;
    for (int64_t r = 0; r < s.h; ++r) {
      float* row = in + ((s.pt + r) * wp + s.pl) * kDepthwiseLanes + l;
      for (int64_t c = 0; c < s.w; ++c) row[c * kDepthwiseLanes] = plane[r * s.w + c];
    }
    for (int64_t t = 0; t < taps; ++t) wt[t * kDepthwiseLanes + l] = w[l * taps + t];
  }
  // eight output pixels at a time, across rows (a 7-wide row would leave most of its pixels to a slower tail), each
  // its own sum: eight independent chains of multiply-adds hide their latency
  constexpr int64_t kPix = 8;
  for (int64_t q0 = 0; q0 < pixels; q0 += kPix) {
    const float* base[kPix];
    for (int64_t u = 0; u < kPix; ++u) {
      const int64_t q = std::min(q0 + u, pixels - 1), r = q / s.ow, c = q % s.ow;  // past the end: the last again
      base[u] = in + (r * s.sh * wp + c * s.sw) * kDepthwiseLanes;
    }
    Vec acc[kPix] = {};
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        const Vec wv = load(wt + (i * s.kw + j) * kDepthwiseLanes);
        const int64_t off = (i * s.dh * wp + j * s.dw) * kDepthwiseLanes;
        for (int64_t u = 0; u < kPix; ++u) acc[u] += wv * load(base[u] + off);
      }
    }
    std::memcpy(res + q0 * kDepthwiseLanes, acc,
                sizeof(Vec) * static_cast<size_t>(std::min(kPix, pixels - q0)));
  }
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t q = 0; q < pixels; ++q) out[l * pixels + q] = res[q * kDepthwiseLanes + l];
  }
}

/*! \brief Whether DirectConv takes DepthwiseLanes: one input and one output channel a group, and small output maps,
 *  where the per-plane costs (and wide rows) of its own path weigh most. Measured against it (2 threads): 7 x 7
 *  outputs 0.46-0.71x the time, 14 x 14 0.75x with 7 x 7 taps (ConvNeXt), 0.94-1.2x with 3 x 3 and 5 x 5, 28 x 28
 *  and larger 1.1-3x. */
inline bool DepthwiseInLanes(const ConvShape& s, int64_t g) {
  const int64_t pixels = s.oh * s.ow;
  return s.m == s.c && g == s.c && (pixels <= 64 || (pixels <= 256 && s.kh * s.kw >= 49));
}

/*! Each input plane is zero-padded and cut into ``sh * sw`` phases (the rows ``y = a mod sh`` and columns ``x = b mod
 *  sw`` of the padded plane, each ``hq x wq``), so that every tap reads one phase at stride 1: output (r, c) of tap
 *  (i, j) is phase ``(i dh mod sh, j dw mod sw)`` at ``(r + i dh / sh, c + j dw / sw)``. Laid out flat, a tap is then
 *  one contiguous stream over ``oh`` rows of ``wq`` ("wide" rows: their last ``wq - ow`` outputs are dropped), and
 *  :func:`DirectTaps` sums a group's streams (its input planes' taps) into up to four of its output planes at a time
 *  in registers; small maps (7 x 7) waste only the few dropped columns. A thread takes whole groups. */
void DirectConv(const ConvShape& s, int64_t g, const float* x, const float* w, float* out, const Epilogue& ep) {
  const int64_t hp = s.h + s.pt + s.pb, wp = s.w + s.pl + s.pr, pixels = s.oh * s.ow, taps = s.kh * s.kw;
  const int64_t cg = s.c / g, mg = s.m / g, terms = cg * taps;
  if (DepthwiseInLanes(s, g)) {
    const int64_t blocks = (s.m + kDepthwiseLanes - 1) / kDepthwiseLanes;
    ParallelRows(s.n * blocks, [&](int64_t p0, int64_t p1) {
      thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>((hp * wp + taps + pixels) * kDepthwiseLanes));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / blocks, c0 = p % blocks * kDepthwiseLanes, lanes = std::min(kDepthwiseLanes, s.m - c0);
        float* o = out + (b * s.m + c0) * pixels;
        DepthwiseLanes(s, x + (b * s.c + c0) * s.h * s.w, w + c0 * taps, lanes, buf.data(), o);
        if (ep.Active()) ApplyEpilogue(ep.From(c0, (b * s.m + c0) * pixels), o, pixels, 0, lanes, 0, pixels);
      }
    }, s.n * s.m * pixels * taps / (int64_t{1} << 15) + 1);
    return;
  }
  const int64_t hq = (hp + s.sh - 1) / s.sh, wq = (wp + s.sw - 1) / s.sw;
  const int64_t phase = hq * wq + kDepthwiseChunk + s.kw * s.dw;  // a phase and what the last chunk reads past it
  const int64_t planes = s.sh * s.sw * phase;                     // an input plane's phases
  const int64_t wide = s.oh * wq;
  const bool strided = s.sh > 1 || s.sw > 1;
  ParallelRows(s.n * g, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> buf;  // a padded plane, the group's input planes' phases, its wide outputs
    buf.resize(static_cast<size_t>(hp * wp + cg * planes + kDirectOutputs * wide));
    float* padded = buf.data();
    float* phases = padded + hp * wp;
    float* wide_out = phases + cg * planes;
    std::vector<const float*> src(static_cast<size_t>(terms));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / g, gi = p % g;
      for (int64_t ci = 0; ci < cg; ++ci) {
        float* ph = phases + ci * planes;
        PadPlane(x + (b * s.c + gi * cg + ci) * s.h * s.w, s.h, s.w, s.pt, s.pl, hp, wp, strided ? padded : ph);
        if (!strided) std::fill(ph + hp * wp, ph + phase, 0.0f);  // what dropped outputs read: finite
        if (strided) {
          std::fill(ph, ph + planes, 0.0f);
          for (int64_t y = 0; y < hp; ++y) {
            SplitColumns(padded + y * wp, wp, s.sw, ph + (y % s.sh) * s.sw * phase + (y / s.sh) * wq, phase);
          }
        }
        for (int64_t i = 0; i < s.kh; ++i) {
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t ri = i * s.dh, cj = j * s.dw;
            src[ci * taps + i * s.kw + j] =
                ph + ((ri % s.sh) * s.sw + cj % s.sw) * phase + (ri / s.sh) * wq + cj / s.sw;
          }
        }
      }
      for (int64_t o0 = 0; o0 < mg; o0 += kDirectOutputs) {
        const int64_t oc = gi * mg + o0, count = std::min(kDirectOutputs, mg - o0);
        float* o = out + (b * s.m + oc) * pixels;
        const bool in_place = wq == s.ow;
        DirectTaps(src.data(), w + oc * terms, terms, terms, wide, count, in_place ? o : wide_out,
                   in_place ? pixels : wide);
        for (int64_t k = 0; k < count && !in_place; ++k) {
          for (int64_t r = 0; r < s.oh; ++r) {
            std::memcpy(o + k * pixels + r * s.ow, wide_out + k * wide + r * wq, sizeof(float) * s.ow);
          }
        }
        if (ep.Active()) ApplyEpilogue(ep.From(oc, (b * s.m + oc) * pixels), o, pixels, 0, count, 0, pixels);
      }
    }
  }, s.n * s.m * pixels * terms / (int64_t{1} << 15) + 1);
}

// ---- 16-bit floats ---------------------------------------------------------------------------------------------

constexpr int64_t kConvertChunk = 1 << 16;  // elements per thread task; threads from 4 chunks on

__attribute__((target("avx2,f16c"))) void HalfToFloatF16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx2,f16c"))) void FloatToHalfF16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/*! \brief bfloat16 → float32, 8 at a time: each value into the top half of a 32-bit lane. */
__attribute__((target("avx2"))) void BfloatToFloatAvx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i], true);
}

/*! \brief float16 (\a bf16: bfloat16) → float32. */
void Convert(const uint16_t* src, float* dst, int64_t n, bool bf16) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  static const bool f16c = avx2 && __builtin_cpu_supports("f16c");
  if (!bf16 && f16c) {
    HalfToFloatF16c(src, dst, n);
  } else if (bf16 && avx2) {  // (the scalar loop's shift vectorizes only to the baseline's 4 lanes)
    BfloatToFloatAvx2(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(src[i], bf16);  // bfloat16: a shift (vectorized)
  }
}

/*! \brief float32 → float16 (\a bf16: bfloat16), round to nearest even. */
void Convert(const float* src, uint16_t* dst, int64_t n, bool bf16) {
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (!bf16 && f16c) {
    FloatToHalfF16c(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = FloatToHalf(src[i], bf16);
  }
}

/*! \brief Convert in parallel for large tensors (float16/bfloat16 ↔ float32). */
template <typename From, typename To>
void ConvertAll(const From* src, To* dst, int64_t n, bool bf16) {
  ParallelRows((n + kConvertChunk - 1) / kConvertChunk, [&](int64_t begin, int64_t end) {
    int64_t lo = begin * kConvertChunk, hi = std::min(n, end * kConvertChunk);
    Convert(src + lo, dst + lo, hi - lo, bf16);
  }, n >= 4 * kConvertChunk ? INT64_MAX : 1);
}

void MatmulNBitsImpl(const ffi::TensorView& a, const ffi::TensorView& codes, const ffi::TensorView& scales,
                     const ffi::TensorView* zp, const ffi::TensorView& out) {
  DLDataType f32{kDLFloat, 32, 1}, u8{kDLUInt, 8, 1};
  CheckOperand(a, f32, "a");
  CheckOperand(scales, f32, "scales");
  CheckOperand(out, f32, "out");
  if (zp != nullptr) CheckOperand(*zp, f32, "zero_points");
  CheckOperand(codes, u8, "codes");
  if (codes.ndim() != 3) TVM_FFI_THROW(ValueError) << "cpu_matmul_nbits: codes must be [N, blocks, block/2]";
  NBits p{Data<float>(a), Data<uint8_t>(codes), Data<float>(scales), zp ? Data<float>(*zp) : nullptr,
          Data<float>(out), 0, codes.shape()[0], codes.shape()[1], codes.shape()[2], 0};
  p.k = p.blocks * 2 * p.half;
  if (a.ndim() < 1 || a.shape()[a.ndim() - 1] != p.k || a.numel() % std::max<int64_t>(p.k, 1) != 0) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_nbits: a's last dim must be K = " << p.k;
  }
  p.m = p.k ? a.numel() / p.k : 0;
  if (out.numel() != p.m * p.n || scales.numel() != p.n * p.blocks || (zp && zp->numel() != p.n * p.blocks)) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_nbits: out, scales or zero points do not fit [" << p.m << ", "
                              << p.n << "] with " << p.blocks << " blocks";
  }
  if (p.m == 0 || p.n == 0) return;
  // BMC_CPU_NO_AVX2: the plain loops (what CPUs without AVX2 run; a test takes them this way)
  static const bool cpu_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx2 = cpu_avx2 && p.half % 8 == 0 && std::getenv("BMC_CPU_NO_AVX2") == nullptr;
  static const bool cpu_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (p.m <= kFusedRows && avx2 && cpu_avx512 && p.half % 16 == 0 && std::getenv("BMC_CPU_NO_AVX512") == nullptr) {
    thread_local std::vector<float> split;
    split.resize(static_cast<size_t>(p.m * p.k));
    SplitEvenOdd(p.a, p.m, p.k, split.data());
    const float* ae = split.data();
    ParallelRows(p.n, [&p, ae](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) kDotRowsNBits512[p.m - 1](p, row, ae, p.out + row, p.n);
    });
    return;
  }
  if (p.m <= kFusedRows && avx2) {
    ParallelRows(p.n, [&p](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) DotAllRowsNBitsAvx2(p, row);
    });
    return;
  }
  if (p.m <= kFusedRows) {
    ParallelRows(p.n, [&p](int64_t begin, int64_t end) {
      std::vector<float> w(p.k);
      for (int64_t row = begin; row < end; ++row) {
        DequantRow(p, row, w.data());
        for (int64_t i = 0; i < p.m; ++i) p.out[i * p.n + row] = Dot(p.a + i * p.k, w.data(), p.k);
      }
    });
    return;
  }
  const Blas& blas = GetBlas();
  thread_local std::vector<float> scratch;  // W [N, K], reused by the next call of this size or smaller
  scratch.resize(static_cast<size_t>(p.n * p.k));
  float* w = scratch.data();
  const auto dequant = avx2 ? DequantRowAvx2 : DequantRow;
  ParallelRows(p.n, [&p, w, dequant](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) dequant(p, row, w + row * p.k);
  });
  Gemm<float>(blas, false, true, p.m, p.n, p.k, p.a, p.k, w, p.k, p.out, p.n);
}

// ---- float8 weights ---------------------------------------------------------------------------------------------

/*! \brief How most codes of a sign-magnitude float8 format decode without the table: the 7-bit magnitude shifted
 *  into a float32's exponent and mantissa fields, times 2^(127 - bias) (exact, subnormals included), the sign bit
 *  moved to bit 31. Magnitudes in [lo, hi] decode so (checked against the table, so the table stays the definition);
 *  the rest (NaN, infinity, fnuz's NaN at -0) are looked up. hi < lo: the table for every code. */
struct Float8Layout {
  int shift = 0;
  float multiplier = 0.0f;
  int lo = 1, hi = 0;
};

Float8Layout MakeLayout(const float* table, int64_t mantissa_bits, int64_t bias) {
  Float8Layout l;
  if (mantissa_bits < 1 || mantissa_bits > 6 || bias < 1 || bias > 64) return l;
  l.shift = 23 - static_cast<int>(mantissa_bits);
  l.multiplier = std::ldexp(1.0f, 127 - static_cast<int>(bias));
  auto formula_holds = [&](int mag) {
    for (int sign : {0, 128}) {
      uint32_t bits = static_cast<uint32_t>(mag) << l.shift;
      float f;
      std::memcpy(&f, &bits, 4);
      f *= l.multiplier;
      if (sign) f = -f;
      if (std::memcmp(&f, &table[mag | sign], 4) != 0) return false;
    }
    return true;
  };
  int lo = 0;
  while (lo < 128 && !formula_holds(lo)) ++lo;  // fnuz: -0 is NaN, so magnitude 0 goes to the table
  int hi = lo;
  while (hi + 1 < 128 && formula_holds(hi + 1)) ++hi;
  if (lo < 128) l.lo = lo, l.hi = hi;
  return l;
}

/*! \brief Eight codes decoded (the layout, the table for the other codes). */
__attribute__((target("avx2"))) inline __m256 DecodeLanes(const uint8_t* codes, const float* table,
                                                          const Float8Layout& l) {
  const __m256i low7 = _mm256_set1_epi32(0x7F);
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i mag = _mm256_and_si256(v, low7);
  const __m256i sign = _mm256_slli_epi32(_mm256_andnot_si256(low7, v), 24);  // bit 7 -> bit 31
  const __m256 f = _mm256_or_ps(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_sll_epi32(mag, _mm_cvtsi32_si128(l.shift))),
                                              _mm256_set1_ps(l.multiplier)),
                                _mm256_castsi256_ps(sign));
  const __m256i other = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(l.lo), mag),
                                        _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(l.hi)));
  if (_mm256_testz_si256(other, other)) return f;
  return _mm256_mask_i32gather_ps(f, table, v, _mm256_castsi256_ps(other), 4);
}

__attribute__((target("avx2")))
void DecodeRowAvx2(const uint8_t* codes, const float* table, float scale, int64_t k, float* w,
                   const Float8Layout& l) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) _mm256_storeu_ps(w + j, _mm256_mul_ps(DecodeLanes(codes + j, table, l), s));
  for (; j < k; ++j) w[j] = table[codes[j]] * scale;
}

/*! \brief ``out[r * ldo] = scale * sum_j a[r, j] * table[codes[j]]`` for MR rows of a (\a k apart), the codes
 *  decoded as DecodeRowAvx2 does, once for all the rows and without storing them (decoding steps, where the decode
 *  is the work). */
template <int MR>
__attribute__((target("avx2,fma"))) void DotRowsFloat8Avx2(const uint8_t* codes, const float* table, const float* a,
                                                            int64_t k, const Float8Layout& l, float scale, float* out,
                                                            int64_t ldo) {
  constexpr int kChains = MR < 3 ? 2 : 1;  // independent sums a row (an FMA waits ~4 cycles for the last)
  __m256 acc[MR][kChains];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    for (int q = 0; q < kChains; ++q) acc[r][q] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m256 v0 = DecodeLanes(codes + j, table, l), v1 = DecodeLanes(codes + j + 8, table, l);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(a + r * k + j), acc[r][0]);
      acc[r][kChains - 1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(a + r * k + j + 8), acc[r][kChains - 1]);
    }
  }
  for (; j + 8 <= k; j += 8) {
    const __m256 v = DecodeLanes(codes + j, table, l);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(a + r * k + j), acc[r][0]);
  }
  for (int r = 0; r < MR; ++r) {
    if constexpr (kChains == 2) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][1]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[r][0]);
    float sum = 0.0f;
    for (float x : lanes) sum += x;
    for (int64_t q = j; q < k; ++q) sum += a[r * k + q] * table[codes[q]];
    out[r * ldo] = scale * sum;
  }
}

/*! \brief One weight row, decoded and scaled: by the layout (\a arithmetic: AVX2 and a layout), else the table. */
void DecodeRow(const uint8_t* codes, const float* table, float scale, int64_t k, float* w, const Float8Layout& l,
               bool arithmetic) {
  if (arithmetic) {
    DecodeRowAvx2(codes, table, scale, k, w, l);
    return;
  }
  for (int64_t j = 0; j < k; ++j) w[j] = table[codes[j]] * scale;
}

/*! \brief ``out = a @ (table[codes] * scale).T``: float8 codes [N, K] (their 256 values in the table; the format's
 *  mantissa bits and bias let most of them decode by arithmetic), a scale per row of the codes (or one). Up to
 *  kFusedRows rows of a: each weight row decoded into a buffer and dotted (the weight read a byte a value); more:
 *  the whole weight decoded, then sgemm. */
void CpuMatmulFloat8(ffi::TensorView a, ffi::TensorView codes, ffi::TensorView table, ffi::TensorView scale,
                     int64_t mantissa_bits, int64_t bias, ffi::TensorView out) {
  DLDataType f32{kDLFloat, 32, 1}, u8{kDLUInt, 8, 1};
  CheckOperand(a, f32, "a");
  CheckOperand(codes, u8, "codes");
  CheckOperand(table, f32, "table");
  CheckOperand(scale, f32, "scale");
  CheckOperand(out, f32, "out");
  if (codes.ndim() != 2 || table.numel() != 256) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_float8: codes must be [N, K] and the table 256 values";
  }
  const int64_t n = codes.shape()[0], k = codes.shape()[1];
  if (a.ndim() < 1 || a.shape()[a.ndim() - 1] != k || a.numel() % std::max<int64_t>(k, 1) != 0) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_float8: a's last dim must be K = " << k;
  }
  const int64_t m = k ? a.numel() / k : 0;
  if (out.numel() != m * n || (scale.numel() != 1 && scale.numel() != n)) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_float8: out or scale do not fit [" << m << ", " << n << "]";
  }
  if (m == 0 || n == 0) return;
  const float* A = Data<float>(a);
  const uint8_t* Q = Data<uint8_t>(codes);
  const float* T = Data<float>(table);
  const float* S = Data<float>(scale);
  float* C = Data<float>(out);
  const bool per_row = scale.numel() == n;
  const Float8Layout layout = MakeLayout(T, mantissa_bits, bias);
  // BMC_CPU_NO_AVX2: the table for every code (what CPUs without AVX2 run; a test takes it this way)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  const bool arithmetic = avx2 && std::getenv("BMC_CPU_NO_AVX2") == nullptr && layout.lo <= layout.hi;
  if (m <= kFusedRows && arithmetic) {  // decoding steps: decode and dot in one pass, 4 rows of a at a time
    ParallelRows(n, [=, &layout](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const uint8_t* q = Q + row * k;
        const float s = S[per_row ? row : 0];
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) DotRowsFloat8Avx2<4>(q, T, A + i * k, k, layout, s, C + i * n + row, n);
        switch (m - i) {
          case 3: DotRowsFloat8Avx2<3>(q, T, A + i * k, k, layout, s, C + i * n + row, n); break;
          case 2: DotRowsFloat8Avx2<2>(q, T, A + i * k, k, layout, s, C + i * n + row, n); break;
          case 1: DotRowsFloat8Avx2<1>(q, T, A + i * k, k, layout, s, C + i * n + row, n); break;
          default: break;
        }
      }
    });
    return;
  }
  if (m <= kFusedRows) {
    ParallelRows(n, [=, &layout](int64_t begin, int64_t end) {
      std::vector<float> w(k);
      for (int64_t row = begin; row < end; ++row) {
        DecodeRow(Q + row * k, T, S[per_row ? row : 0], k, w.data(), layout, arithmetic);
        for (int64_t i = 0; i < m; ++i) C[i * n + row] = Dot(A + i * k, w.data(), k);
      }
    });
    return;
  }
  const Blas& blas = GetBlas();
  thread_local std::vector<float> scratch;  // W [N, K], reused by the next call of this size or smaller
  scratch.resize(static_cast<size_t>(n * k));
  float* w = scratch.data();
  ParallelRows(n, [=, &layout](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      DecodeRow(Q + row * k, T, S[per_row ? row : 0], k, w + row * k, layout, arithmetic);
    }
  });
  Gemm<float>(blas, false, true, m, n, k, A, k, w, k, C, n);
}

// ---- 8-bit integer matmul -------------------------------------------------------------------------------------

// GCC 12's AVX-512 headers build some intrinsics (512 -> 256 casts, shuffles) from an undefined value, then warn
// that it is used (PR 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

/*! \brief The lane sums of four vectors, ``[sum a, sum b, sum c, sum d]``: pairwise interleave-and-add, then the
 *  four 128-bit quarters (10 instructions for four sums). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
inline __m128i SumLanes4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/*! \brief ``s[i * lds + j] = sum_p a[i * lda + p] * b[j * k + p]`` for an MT x NT tile (uint8 a, int8 b). */
template <int MT, int NT>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void DotTileVnni(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k, int32_t* s, int64_t lds) {
  __m512i acc[MT][NT];
  for (int i = 0; i < MT; ++i) {
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  int64_t p = 0;
  for (; p + 64 <= k; p += 64) {  // (one loop with a computed mask made GCC spill the accumulators)
    __m512i bv[NT];
    for (int j = 0; j < NT; ++j) bv[j] = _mm512_loadu_si512(b + j * k + p);
    for (int i = 0; i < MT; ++i) {
      const __m512i av = _mm512_loadu_si512(a + i * lda + p);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  if (p < k) {  // the last k % 64 bytes, masked
    const __mmask64 mask = ~0ULL >> (64 - (k - p));
    __m512i bv[NT];
    for (int j = 0; j < NT; ++j) bv[j] = _mm512_maskz_loadu_epi8(mask, b + j * k + p);
    for (int i = 0; i < MT; ++i) {
      const __m512i av = _mm512_maskz_loadu_epi8(mask, a + i * lda + p);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    const __m512i zero = _mm512_setzero_si512();
    const __m128i sums = SumLanes4(acc[i][0], NT > 1 ? acc[i][NT > 1 ? 1 : 0] : zero,  // (indices kept in bounds
                                   NT > 2 ? acc[i][NT > 2 ? 2 : 0] : zero,            // for the narrower tiles)
                                   NT > 3 ? acc[i][NT > 3 ? 3 : 0] : zero);
    if (NT == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(s + i * lds), sums);
    } else {
      alignas(16) int32_t part[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(part), sums);
      for (int j = 0; j < NT; ++j) s[i * lds + j] = part[j];
    }
  }
}

template <int MT, int NT>
__attribute__((target_clones("avx2", "default")))
void DotTilePlain(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k, int32_t* s, int64_t lds) {
  for (int i = 0; i < MT; ++i) {
    for (int j = 0; j < NT; ++j) {
      uint32_t acc = 0;  // wraps like vpdpbusd (a signed overflow would be undefined)
      for (int64_t p = 0; p < k; ++p) acc += static_cast<uint32_t>(static_cast<int32_t>(a[i * lda + p]) * b[j * k + p]);
      s[i * lds + j] = static_cast<int32_t>(acc);
    }
  }
}

using DotTileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t);

// tiles[MT - 1][NT - 1] for 1 <= MT, NT <= 4
#define BMC_DOT_TILES(F)                                        \
  {                                                             \
    {F<1, 1>, F<1, 2>, F<1, 3>, F<1, 4>},                       \
    {F<2, 1>, F<2, 2>, F<2, 3>, F<2, 4>},                       \
    {F<3, 1>, F<3, 2>, F<3, 3>, F<3, 4>},                       \
    {F<4, 1>, F<4, 2>, F<4, 3>, F<4, 4>}                        \
  }
const DotTileFn kVnniTiles[4][4] = BMC_DOT_TILES(DotTileVnni);
const DotTileFn kPlainTiles[4][4] = BMC_DOT_TILES(DotTilePlain);
#undef BMC_DOT_TILES

/*! \brief Whether to use AVX-512 VNNI: the CPU has it and ``BMC_CPU_NO_VNNI`` is not set (the tests set it to run
 *  the plain loops, what CPUs without VNNI take). */
bool HasVnni() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return cpu && std::getenv("BMC_CPU_NO_VNNI") == nullptr;
}

/*! \brief Row sums of an 8-bit matrix ``[rows, k]`` (uint8 or int8), as int32. */
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void RowSumsVnni(const T* x, int64_t rows, int64_t k, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {  // four rows at a time, for one SumLanes4
    __m512i acc[4];
    for (int i = 0; i < 4; ++i) {
      acc[i] = _mm512_setzero_si512();
      if (r0 + i >= rows) continue;
      for (int64_t p = 0; p < k; p += 64) {
        const __m512i v = _mm512_maskz_loadu_epi8(k - p >= 64 ? ~0ULL : ~0ULL >> (64 - (k - p)), x + (r0 + i) * k + p);
        acc[i] = std::is_signed_v<T> ? _mm512_dpbusd_epi32(acc[i], ones, v) : _mm512_dpbusd_epi32(acc[i], v, ones);
      }
    }
    alignas(16) int32_t sums[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(sums), SumLanes4(acc[0], acc[1], acc[2], acc[3]));
    for (int64_t i = 0; i < 4 && r0 + i < rows; ++i) out[r0 + i] = sums[i];
  }
}

template <typename T>
__attribute__((target_clones("avx2", "default")))
void RowSumsPlain(const T* x, int64_t rows, int64_t k, int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t s = 0;
    for (int64_t p = 0; p < k; ++p) s += static_cast<uint32_t>(static_cast<int32_t>(x[r * k + p]));
    out[r] = static_cast<int32_t>(s);
  }
}

template <typename T>
void RowSums(const T* x, int64_t rows, int64_t k, int32_t* out, bool vnni) {
  vnni ? RowSumsVnni(x, rows, k, out) : RowSumsPlain(x, rows, k, out);
}

/*! \brief \a t's 8-bit data with the sign bit flipped (int8 <-> uint8 plus or minus 128) into \a scratch. */
template <typename To>
const To* Flipped(const ffi::TensorView& t, std::vector<uint8_t>& scratch) {
  const uint8_t* src = Data<uint8_t>(t);
  scratch.resize(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) scratch[i] = src[i] ^ 0x80;
  return reinterpret_cast<const To*>(scratch.data());
}

/*! \brief Zero points as int32 per row (``rows`` of them from one value or a period of ``period``), shifted by
 *  \a shift (the sign-bit flip of their operand). */
std::vector<int32_t> ZeroPoints(const ffi::TensorView& zp, int64_t rows, int64_t period, int32_t shift,
                                const char* what) {
  if (zp.numel() != 1 && zp.numel() != period) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_integer: " << what << " has " << zp.numel()
                              << " values; it must have 1 or " << period;
  }
  std::vector<int32_t> out(static_cast<size_t>(rows));
  bool is_signed = zp.dtype().code == kDLInt;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t i = zp.numel() == 1 ? 0 : r % period;
    int32_t v = is_signed ? Data<int8_t>(zp)[i] : Data<uint8_t>(zp)[i];
    out[r] = v + shift;
  }
  return out;
}

// Packed b: panels of 16 rows of bt (16 columns of the result), 4 bytes of K at a time (``[K/4][16][4]``, what one
// ``vpdpbusd`` multiplies with a broadcast quad of a), each followed by 64 bytes holding its 16 row sums as int32:
// a panel is ``(ceil(K/4) + 1) * 64`` bytes. 8 x 32 tiles of the result accumulate in registers with no horizontal
// sums (1.7x the dot-product tiles at 128 rows). A constant weight is packed once, when the program is loaded
// (``cpu_pack_int8_weight``, ``cpu_matmul_integer_packed``); packing per call costs a pass over b, so a product of
// few rows by an unpacked b keeps the dot-product tiles.

constexpr int kPanel = 16;   // rows of b (columns of the result) a panel
constexpr int kTileRows = 8;  // rows of a a packed tile
constexpr int kTilePanels = 2;

/*! \brief Bytes of one packed panel of a b with \a kq quads of K: the quads, then the 16 row sums. */
constexpr int64_t PanelBytes(int64_t kq) { return (kq + 1) * 64; }

/*! \brief The 16 x 16 transpose of 32-bit elements of \a r (row j, element e -> row e, element j). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved within each 128-bit lane
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4g + s], lane L: element 4L + s of rows 4g..4g+3
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int s = 0; s < 4; ++s) {  // gather lane L of the four row groups
    const __m512i p = _mm512_shuffle_i32x4(u[s], u[4 + s], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i q = _mm512_shuffle_i32x4(u[s], u[4 + s], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i v = _mm512_shuffle_i32x4(u[8 + s], u[12 + s], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i w = _mm512_shuffle_i32x4(u[8 + s], u[12 + s], _MM_SHUFFLE(3, 1, 3, 1));
    r[s] = _mm512_shuffle_i32x4(p, v, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + s] = _mm512_shuffle_i32x4(q, w, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + s] = _mm512_shuffle_i32x4(p, v, _MM_SHUFFLE(3, 1, 3, 1));
    r[12 + s] = _mm512_shuffle_i32x4(q, w, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

/*! \brief Rows [n0, n0 + 16) of b [n, k] as the quads ``[ceil(k/4)][16][4]`` of a panel, zeros past n and k. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void PackQuadsVnni(const int8_t* b, int64_t n, int64_t k, int64_t n0, int8_t* out) {
  const int64_t kq = (k + 3) / 4;
  for (int64_t q0 = 0; q0 < kq; q0 += 16) {  // 16 quads (64 bytes) of 16 rows: one transpose
    const int64_t bytes = std::min<int64_t>(64, k - 4 * q0);
    const __mmask64 mask = bytes >= 64 ? ~0ULL : (~0ULL >> (64 - bytes));
    __m512i r[16];
    for (int j = 0; j < kPanel; ++j) {
      r[j] = n0 + j < n ? _mm512_maskz_loadu_epi8(mask, b + (n0 + j) * k + 4 * q0) : _mm512_setzero_si512();
    }
    Transpose16x16(r);
    for (int64_t t = 0; t < std::min<int64_t>(16, kq - q0); ++t) _mm512_storeu_si512(out + (q0 + t) * 64, r[t]);
  }
}

void PackQuadsPlain(const int8_t* b, int64_t n, int64_t k, int64_t n0, int8_t* out) {
  const int64_t kq = (k + 3) / 4;
  for (int64_t q = 0; q < kq; ++q) {
    for (int64_t j = 0; j < kPanel; ++j) {
      for (int64_t e = 0; e < 4; ++e) {
        const int64_t p = 4 * q + e;
        out[(q * kPanel + j) * 4 + e] = n0 + j < n && p < k ? b[(n0 + j) * k + p] : 0;
      }
    }
  }
}

/*! \brief Panel \a p of b [n, k] (int8) into \a out, PanelBytes(ceil(k/4)) bytes: its quads, then its row sums. */
void PackInt8Panel(const int8_t* b, int64_t n, int64_t k, int64_t p, int8_t* out, bool vnni) {
  const int64_t kq = (k + 3) / 4, n0 = p * kPanel;
  vnni ? PackQuadsVnni(b, n, k, n0, out) : PackQuadsPlain(b, n, k, n0, out);
  int32_t sums[kPanel] = {};
  RowSums(b + n0 * k, std::min<int64_t>(kPanel, n - n0), k, sums, vnni);
  std::memcpy(out + kq * 64, sums, sizeof(sums));
}

/*! \brief ``c[i * ldc + 16 * j + l] = sum over quads of a's quad x panel j's column l``, MR rows, NP panels
 *  (\a ps bytes apart; the last panel's columns past \a last_cols not written). \a a has ``4 * kq`` readable bytes
 *  a row. The accumulators are named variables, not an array, stored unmasked: for an array, or masked stores of
 *  them, GCC 12 copied each ``vpdpbusd``'s accumulator between registers twice an instruction (1.3-1.5x slower,
 *  measured on this tile alone). */
template <int MR, int NP>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void PackedTile(const uint8_t* a, int64_t lda, const int8_t* panels, int64_t ps, int64_t kq, int32_t* c,
                int64_t ldc, int last_cols) {
  static_assert(MR >= 1 && MR <= 8 && (NP == 1 || NP == 2));
  const __m512i zero = _mm512_setzero_si512();
  __m512i c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero, c30 = zero, c31 = zero,
          c40 = zero, c41 = zero, c50 = zero, c51 = zero, c60 = zero, c61 = zero, c70 = zero, c71 = zero;
  // row i's quad qq times b0 (and b1) into accumulators c<acc>0 (and c<acc>1)
#define BMC_TILE_STEP(acc, i, qq, b0, b1)                                         \
  if constexpr (MR > i) {                                                         \
    int32_t quad;                                                                 \
    std::memcpy(&quad, a + i * lda + 4 * (qq), 4);                                \
    const __m512i av = _mm512_set1_epi32(quad);                                   \
    c##acc##0 = _mm512_dpbusd_epi32(c##acc##0, av, b0);                           \
    if constexpr (NP > 1) c##acc##1 = _mm512_dpbusd_epi32(c##acc##1, av, b1);    \
  }
  int64_t q = 0;
  if constexpr (MR <= 4) {  // few rows: odd quads into the unused accumulators of rows 4-7 (vpdpbusd's latency)
    for (; q + 2 <= kq; q += 2) {
      const __m512i b0 = _mm512_loadu_si512(panels + q * 64), b2 = _mm512_loadu_si512(panels + q * 64 + 64);
      const __m512i b1 = NP > 1 ? _mm512_loadu_si512(panels + ps + q * 64) : zero;
      const __m512i b3 = NP > 1 ? _mm512_loadu_si512(panels + ps + q * 64 + 64) : zero;
      BMC_TILE_STEP(0, 0, q, b0, b1) BMC_TILE_STEP(1, 1, q, b0, b1)
      BMC_TILE_STEP(2, 2, q, b0, b1) BMC_TILE_STEP(3, 3, q, b0, b1)
      BMC_TILE_STEP(4, 0, q + 1, b2, b3) BMC_TILE_STEP(5, 1, q + 1, b2, b3)
      BMC_TILE_STEP(6, 2, q + 1, b2, b3) BMC_TILE_STEP(7, 3, q + 1, b2, b3)
    }
    c00 = _mm512_add_epi32(c00, c40), c01 = _mm512_add_epi32(c01, c41);
    c10 = _mm512_add_epi32(c10, c50), c11 = _mm512_add_epi32(c11, c51);
    c20 = _mm512_add_epi32(c20, c60), c21 = _mm512_add_epi32(c21, c61);
    c30 = _mm512_add_epi32(c30, c70), c31 = _mm512_add_epi32(c31, c71);
  }
  for (; q < kq; ++q) {
    const __m512i b0 = _mm512_loadu_si512(panels + q * 64);
    const __m512i b1 = NP > 1 ? _mm512_loadu_si512(panels + ps + q * 64) : zero;
    BMC_TILE_STEP(0, 0, q, b0, b1) BMC_TILE_STEP(1, 1, q, b0, b1)
    BMC_TILE_STEP(2, 2, q, b0, b1) BMC_TILE_STEP(3, 3, q, b0, b1)
    BMC_TILE_STEP(4, 4, q, b0, b1) BMC_TILE_STEP(5, 5, q, b0, b1)
    BMC_TILE_STEP(6, 6, q, b0, b1) BMC_TILE_STEP(7, 7, q, b0, b1)
  }
#undef BMC_TILE_STEP
  alignas(64) int32_t sums[MR][NP * kPanel];  // (masked stores of the accumulators brought the copies back)
#define BMC_TILE_STORE(i)                                                            \
  if constexpr (MR > i) {                                                            \
    _mm512_store_si512(sums[i], c##i##0);                                            \
    if constexpr (NP > 1) _mm512_store_si512(sums[i] + kPanel, c##i##1);             \
  }
  BMC_TILE_STORE(0) BMC_TILE_STORE(1) BMC_TILE_STORE(2) BMC_TILE_STORE(3)
  BMC_TILE_STORE(4) BMC_TILE_STORE(5) BMC_TILE_STORE(6) BMC_TILE_STORE(7)
  const __mmask16 last = static_cast<__mmask16>((1u << last_cols) - 1);
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NP; ++j) {
      _mm512_mask_storeu_epi32(c + i * ldc + kPanel * j, j + 1 < NP ? 0xffff : last,
                               _mm512_load_si512(sums[i] + kPanel * j));
    }
  }
#undef BMC_TILE_STORE
}

/*! \brief PackedTile's product in plain loops (CPUs without AVX-512 VNNI), \a mr rows and \a cols columns. */
__attribute__((target_clones("avx2", "default")))
void PackedTilePlain(const uint8_t* a, int64_t lda, const int8_t* panels, int64_t ps, int64_t kq, int32_t* c,
                     int64_t ldc, int64_t mr, int64_t cols) {
  for (int64_t i = 0; i < mr; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const int8_t* col = panels + (j / kPanel) * ps + (j % kPanel) * 4;
      uint32_t acc = 0;  // wraps like vpdpbusd
      for (int64_t q = 0; q < kq; ++q) {
        for (int e = 0; e < 4; ++e) {
          acc += static_cast<uint32_t>(static_cast<int32_t>(a[i * lda + 4 * q + e]) * col[q * 64 + e]);
        }
      }
      c[i * ldc + j] = static_cast<int32_t>(acc);
    }
  }
}

using PackedTileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t, int);
const PackedTileFn kPackedTiles[kTileRows][kTilePanels] = {
    {PackedTile<1, 1>, PackedTile<1, 2>}, {PackedTile<2, 1>, PackedTile<2, 2>},
    {PackedTile<3, 1>, PackedTile<3, 2>}, {PackedTile<4, 1>, PackedTile<4, 2>},
    {PackedTile<5, 1>, PackedTile<5, 2>}, {PackedTile<6, 1>, PackedTile<6, 2>},
    {PackedTile<7, 1>, PackedTile<7, 2>}, {PackedTile<8, 1>, PackedTile<8, 2>}};

/*! \brief ``c -= zb * rowsum(a) + za * rowsum(b) - k * za * zb`` on an mt x nt block at (i0, j0), wrapping
 *  (vectorized over j: the scalar loop was 5% of a dynamically quantized MLP's time at 128 rows). */
__attribute__((target_clones("avx512f", "avx2", "default")))
void ApplyZeroPoints(int32_t* c, int64_t ldc, int64_t i0, int64_t mt, int64_t j0, int64_t nt,
                            const int32_t* za, const int32_t* zb, const int32_t* a_sums, const int32_t* b_sums,
                            int64_t k) {
  for (int64_t i = 0; i < mt; ++i) {
    for (int64_t j = 0; j < nt; ++j) {
      const uint32_t zi = za[i0 + i], zj = zb[j0 + j];
      int32_t& s = c[(i0 + i) * ldc + j0 + j];
      s = static_cast<int32_t>(static_cast<uint32_t>(s) - zj * a_sums[i0 + i] - zi * b_sums[j] +
                               static_cast<uint32_t>(k) * zi * zj);
    }
  }
}

void Check8Bit(const ffi::TensorView& t, const char* what) {
  DLDataType dt = t.dtype();
  if ((dt.code != kDLInt && dt.code != kDLUInt) || dt.bits != 8 || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << "cpu_matmul_integer: " << what << " must be uint8 or int8, got "
                             << ffi::DLDataTypeToString(dt);
  }
  CheckOperand(t, dt, what);
}

/*! \brief The uint8 rows of a (an int8 a flipped), their zero points and row sums: what both entries share. */
struct IntegerRows {
  const uint8_t* a;
  int64_t rows;
  std::vector<int32_t> za, a_sums;
};

IntegerRows PrepareRows(const ffi::TensorView& ta, const ffi::TensorView& tza, int64_t k, bool vnni) {
  Check8Bit(ta, "a");
  Check8Bit(tza, "a_zero_point");
  if (tza.dtype().code != ta.dtype().code) {
    TVM_FFI_THROW(TypeError) << "cpu_matmul_integer: a zero point's type differs from its operand's";
  }
  thread_local std::vector<uint8_t> a_scratch;
  const bool a_signed = ta.dtype().code == kDLInt;
  IntegerRows r{a_signed ? Flipped<uint8_t>(ta, a_scratch) : Data<uint8_t>(ta), k ? ta.numel() / k : 0, {}, {}};
  const int64_t m = ta.ndim() >= 2 ? ta.shape()[ta.ndim() - 2] : 1;
  r.za = ZeroPoints(tza, r.rows, m, a_signed ? 128 : 0, "a_zero_point");
  r.a_sums.resize(static_cast<size_t>(r.rows));
  RowSums(r.a, r.rows, k, r.a_sums.data(), vnni);
  return r;
}

/*! \brief c [rows, n] = the product of a's rows by the packed panels \a pk of b (PanelBytes(kq) bytes each),
 *  zero points applied. Threads take pairs of panels and call ``prepare(p0, p1)`` on theirs first. */
template <typename Prepare>
void PackedProduct(const IntegerRows& r, int64_t k, int64_t n, const int32_t* zb, const int8_t* pk,
                   Prepare prepare, int32_t* c, bool vnni, int64_t threads) {
  const int64_t kq = (k + 3) / 4, lda = 4 * kq, ps = PanelBytes(kq);
  const uint8_t* a = r.a;
  thread_local std::vector<uint8_t> a_padded;  // rows of a padded to whole quads, for the 4-byte broadcasts
  if (lda != k) {
    a_padded.assign(static_cast<size_t>(r.rows * lda), 0);
    for (int64_t i = 0; i < r.rows; ++i) std::memcpy(a_padded.data() + i * lda, a + i * k, k);
    a = a_padded.data();
  }
  const int64_t panels = (n + kPanel - 1) / kPanel;
  ParallelRows((panels + kTilePanels - 1) / kTilePanels, [&](int64_t begin, int64_t end) {
    const int64_t p0 = begin * kTilePanels, p1 = std::min(panels, end * kTilePanels);
    prepare(p0, p1);
    for (int64_t p = p0; p < p1; p += kTilePanels) {
      const int64_t np = std::min<int64_t>(kTilePanels, p1 - p), j0 = p * kPanel;
      const int64_t cols = std::min(np * kPanel, n - j0);
      const int8_t* panel = pk + p * ps;
      int32_t b_sums[kTilePanels * kPanel];
      for (int64_t j = 0; j < np; ++j) std::memcpy(b_sums + j * kPanel, panel + j * ps + kq * 64, 64);
      for (int64_t i0 = 0; i0 < r.rows; i0 += kTileRows) {
        const int64_t mt = std::min<int64_t>(kTileRows, r.rows - i0);
        if (vnni) {
          kPackedTiles[mt - 1][np - 1](a + i0 * lda, lda, panel, ps, kq, c + i0 * n + j0, n,
                                       static_cast<int>(cols - (np - 1) * kPanel));
        } else {
          PackedTilePlain(a + i0 * lda, lda, panel, ps, kq, c + i0 * n + j0, n, mt, cols);
        }
        ApplyZeroPoints(c, n, i0, mt, j0, cols, r.za.data(), zb, r.a_sums.data(), b_sums, k);
      }
    }
  }, threads);
}

/*! \brief Threads worth using for \a products multiply-adds (a pool worker wakes in ~1 us). */
int64_t IntegerThreads(int64_t products) { return products / (int64_t{1} << 20) + 1; }

void MatmulIntegerImpl(const ffi::TensorView& ta, const ffi::TensorView& tb, const ffi::TensorView& tza,
                       const ffi::TensorView& tzb, const ffi::TensorView& out) {
  Check8Bit(tb, "bt");
  Check8Bit(tzb, "b_zero_point");
  CheckOperand(out, DLDataType{kDLInt, 32, 1}, "out");
  if (tzb.dtype().code != tb.dtype().code) {
    TVM_FFI_THROW(TypeError) << "cpu_matmul_integer: a zero point's type differs from its operand's";
  }
  if (tb.ndim() != 2 || ta.ndim() < 1 || ta.shape()[ta.ndim() - 1] != tb.shape()[1]) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_integer: takes a [..., K] and bt [N, K]";
  }
  const int64_t n = tb.shape()[0], k = tb.shape()[1];
  const bool vnni = HasVnni();  // (once: it reads the environment)
  IntegerRows r = PrepareRows(ta, tza, k, vnni);
  if (out.numel() != r.rows * n) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_integer: out has " << out.numel() << " elements, expected "
                              << r.rows * n;
  }
  if (r.rows == 0 || n == 0) return;
  // products of uint8 a and int8 b: a uint8 b is flipped (b - 128), and its zero point
  thread_local std::vector<uint8_t> b_scratch;
  const bool b_unsigned = tb.dtype().code == kDLUInt;
  const int8_t* b = b_unsigned ? Flipped<int8_t>(tb, b_scratch) : Data<int8_t>(tb);
  const std::vector<int32_t> zb = ZeroPoints(tzb, n, n, b_unsigned ? -128 : 0, "b_zero_point");
  int32_t* c = Data<int32_t>(out);
  const int64_t threads = IntegerThreads(r.rows * n * k);
  if (r.rows > kFusedRows && vnni) {
    thread_local std::vector<int8_t> packed;  // every panel; each thread packs and multiplies its own
    const int64_t ps = PanelBytes((k + 3) / 4);
    packed.resize(static_cast<size_t>((n + kPanel - 1) / kPanel * ps));
    int8_t* pk = packed.data();
    PackedProduct(r, k, n, zb.data(), pk, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) PackInt8Panel(b, n, k, p, pk + p * ps, vnni);
    }, c, vnni, threads);
    return;
  }
  const DotTileFn(*tiles)[4] = vnni ? kVnniTiles : kPlainTiles;
  ParallelRows((n + 3) / 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j0 = 4 * t, nt = std::min<int64_t>(4, n - j0);
      int32_t b_sums[4];
      RowSums(b + j0 * k, nt, k, b_sums, vnni);  // (while these rows of b are in the cache)
      for (int64_t i0 = 0; i0 < r.rows; i0 += 4) {
        const int64_t mt = std::min<int64_t>(4, r.rows - i0);
        tiles[mt - 1][nt - 1](r.a + i0 * k, k, b + j0 * k, k, c + i0 * n + j0, n);
        ApplyZeroPoints(c, n, i0, mt, j0, nt, r.za.data(), zb.data(), r.a_sums.data(), b_sums, k);
      }
    }
  }, threads);
}

/*! \brief Checks \a bp is an 8-bit weight [N, K] packed for \a n columns of \a k products (int8,
 *  ``[ceil(N/16), ceil(K/4) + 1, 64]``). */
void CheckPackedInt8(const ffi::TensorView& bp, int64_t n, int64_t k, const char* fn) {
  CheckOperand(bp, DLDataType{kDLInt, 8, 1}, "the packed weight");
  const int64_t panels = (n + kPanel - 1) / kPanel, rows = (k + 3) / 4 + 1;
  if (bp.ndim() != 3 || Dim(bp, 0) != panels || Dim(bp, 1) != rows || Dim(bp, 2) != 64) {
    TVM_FFI_THROW(ValueError) << fn << ": the packed weight must be [" << panels << ", " << rows << ", 64] for N = "
                              << n << ", K = " << k;
  }
}

/*! \brief \a out = the 8-bit weight \a bt [N, K] packed in panels (a uint8 one flipped to int8), with row sums. */
void PackInt8Weight(const ffi::TensorView& tb, const ffi::TensorView& out) {
  Check8Bit(tb, "bt");
  if (tb.ndim() != 2) TVM_FFI_THROW(ValueError) << "cpu_pack_int8_weight: the weight must be [N, K]";
  const int64_t n = Dim(tb, 0), k = Dim(tb, 1);
  CheckPackedInt8(out, n, k, "cpu_pack_int8_weight");
  std::vector<uint8_t> scratch;
  const int8_t* b = tb.dtype().code == kDLUInt ? Flipped<int8_t>(tb, scratch) : Data<int8_t>(tb);
  const int64_t ps = PanelBytes((k + 3) / 4);
  const bool vnni = HasVnni();
  int8_t* dst = Data<int8_t>(out);
  ParallelRows(Dim(out, 0), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) PackInt8Panel(b, n, k, p, dst + p * ps, vnni);
  });
}

/*! \brief cpu_matmul_integer with bt packed by cpu_pack_int8_weight (\a n rows; a uint8 bt is known by its zero
 *  point's type): every row count runs the packed tiles. */
void MatmulIntegerPackedImpl(const ffi::TensorView& ta, const ffi::TensorView& bp, const ffi::TensorView& tza,
                             const ffi::TensorView& tzb, int64_t n, const ffi::TensorView& out) {
  Check8Bit(tzb, "b_zero_point");
  CheckOperand(out, DLDataType{kDLInt, 32, 1}, "out");
  if (ta.ndim() < 1) TVM_FFI_THROW(ValueError) << "cpu_matmul_integer_packed: takes a [..., K]";
  const int64_t k = Dim(ta, -1);
  CheckPackedInt8(bp, n, k, "cpu_matmul_integer_packed");
  const bool vnni = HasVnni();
  IntegerRows r = PrepareRows(ta, tza, k, vnni);
  if (out.numel() != r.rows * n) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_integer_packed: out has " << out.numel() << " elements, expected "
                              << r.rows * n;
  }
  if (r.rows == 0 || n == 0) return;
  const std::vector<int32_t> zb = ZeroPoints(tzb, n, n, tzb.dtype().code == kDLUInt ? -128 : 0, "b_zero_point");
  PackedProduct(r, k, n, zb.data(), Data<int8_t>(bp), [](int64_t, int64_t) {}, Data<int32_t>(out), vnni,
                IntegerThreads(r.rows * n * k));
}

#pragma GCC diagnostic pop

// ---- attention --------------------------------------------------------------------------------------------------
//
// softmax(scale * q @ kt + bias) @ v a block of query rows at a time: the block's scores (kAttentionScores floats
// at most, in cache) are computed, turned into probabilities in place and multiplied by v before the next block, so
// the [M, N] score matrix of a head never exists. Blocks of every batch index are spread over the kernel threads.
// The small GEMMs are register tiles of kGemmRows rows x kGemmCols columns; the bodies are inlined into an
// AVX2+FMA and a baseline copy, picked at run time.

constexpr int kGemmRows = 6;   // a tile: 6 rows x 16 columns, 12 AVX2 accumulators (BLIS' Haswell shape)
constexpr int kGemmCols = 16;
constexpr int64_t kAttentionScores = 65536;  // floats of one block's scores (256 KiB, in L2)
constexpr int64_t kPackRows = 16;  // query rows from which packing the keys and values pays

/*! \brief ``acc[r] += a[r * lda] * (b0, b1)`` for MR rows: one row of b (16 columns, in two registers) against a
 *  broadcast element of each row of a; the inner step of every register tile below. */
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void FmaRowAvx2(const float* a, int64_t lda, __m256 b0,
                                                                          __m256 b1, __m256 (&acc)[MR][2]) {
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    const __m256 ar = _mm256_broadcast_ss(a + r * lda);
    acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
    acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
  }
}

/*! \brief ``c[i, j] = sum_p a[i, p] * b[p, j]`` for ``MR`` rows and the first ``nc`` ≤ 16 columns of \a b (rows
 *  \a ldb apart: a packed panel, ldb 16, or the matrix itself), in 12 AVX2 registers. */
template <int MR>
__attribute__((target("avx2,fma"))) void GemmTileAvx2(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                       float* c, int64_t ldc, int64_t k, int64_t nc) {
  alignas(32) static const int32_t kLaneMask[24] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                    0,  0,  0,  0,  0,  0,  0,  0};
  // the first min(nc, 8) lanes, and the first max(nc - 8, 0)
  const __m256i m0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMask + 16 - std::min<int64_t>(nc, 8)));
  const __m256i m1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMask + 16 - std::max<int64_t>(nc - 8, 0)));
  const bool whole = nc == kGemmCols;
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    const __m256 b0 = whole ? _mm256_loadu_ps(bp) : _mm256_maskload_ps(bp, m0);
    const __m256 b1 = whole ? _mm256_loadu_ps(bp + 8) : _mm256_maskload_ps(bp + 8, m1);
    FmaRowAvx2<MR>(a + p, lda, b0, b1, acc);
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if (whole) {
      _mm256_storeu_ps(c + r * ldc, acc[r][0]);
      _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    } else {
      _mm256_maskstore_ps(c + r * ldc, m0, acc[r][0]);
      _mm256_maskstore_ps(c + r * ldc + 8, m1, acc[r][1]);
    }
  }
}

/*! \brief The same product in 16-wide registers, one a row: up to 12 rows (12 accumulators). Full-width on Zen 5
 *  and Intel, where it is up to twice the AVX2 tile's multiply-adds a cycle (Zen 4 splits it in two halves). */
template <int MR>
__attribute__((target("avx512f"))) void GemmTileAvx512(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                        float* c, int64_t ldc, int64_t k, int64_t nc) {
  const __mmask16 mask = static_cast<__mmask16>((1u << nc) - 1);  // nc <= 16
  __m512 acc[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m512 bp = _mm512_maskz_loadu_ps(mask, b + p * ldb);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + p]), bp, acc[r]);
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(c + r * ldc, mask, acc[r]);
}

/*! \brief The same tile in plain loops (CPUs without AVX2). */
template <int MR>
__attribute__((always_inline)) inline void GemmTilePlain(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                         float* c, int64_t ldc, int64_t k, int64_t nc) {
  float acc[MR][kGemmCols] = {};
  for (int64_t p = 0; p < k; ++p) {
    for (int r = 0; r < MR; ++r) {
      for (int64_t j = 0; j < nc; ++j) acc[r][j] += a[r * lda + p] * b[p * ldb + j];
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(c + r * ldc, acc[r], sizeof(float) * nc);
}

/*! \brief ``b [k, n]`` (row-major, leading dim \a ldb) as panels of 16 columns, ``[ceil(n / 16)][k][16]``,
 *  zero-padded: every tile then reads its panel contiguously (rows of a strided b 4 KiB apart would all fall into
 *  one L1 set). Worth its copy when many rows of a reuse it. */
inline void PackPanels(const float* b, int64_t ldb, int64_t k, int64_t n, float* panels) {
  for (int64_t j0 = 0; j0 < n; j0 += kGemmCols) {
    const int64_t nc = std::min<int64_t>(kGemmCols, n - j0);
    float* panel = panels + j0 * k;
    if (nc == kGemmCols) {  // a constant size: two vector moves a row
      for (int64_t p = 0; p < k; ++p) std::memcpy(panel + p * kGemmCols, b + p * ldb + j0, sizeof(float) * kGemmCols);
      continue;
    }
    for (int64_t p = 0; p < k; ++p) {
      std::memcpy(panel + p * kGemmCols, b + p * ldb + j0, sizeof(float) * nc);
      std::fill(panel + p * kGemmCols + nc, panel + (p + 1) * kGemmCols, 0.0f);
    }
  }
}

/*! \brief PackPanels of ``b = k.T`` for ``k [n, kdim]`` (row-major): the key stored untransposed. */
inline void PackPanelsTransposed(const float* k, int64_t kdim, int64_t n, float* panels) {
  for (int64_t j0 = 0; j0 < n; j0 += kGemmCols) {
    const int64_t nc = std::min<int64_t>(kGemmCols, n - j0);
    float* panel = panels + j0 * kdim;
    if (nc < kGemmCols) std::fill(panel, panel + kdim * kGemmCols, 0.0f);
    for (int64_t jj = 0; jj < nc; ++jj) {
      const float* row = k + (j0 + jj) * kdim;
      for (int64_t p = 0; p < kdim; ++p) panel[p * kGemmCols + jj] = row[p];
    }
  }
}

/*! \brief A GEMM operand ``b [k, n]``: the matrix itself, or its PackPanels panels (``k`` rows each). */
struct Operand16 {
  const float* data;
  int64_t ldb;          // rows apart: the matrix's leading dim, or 16 in panels
  int64_t group_stride;  // floats from one group of 16 columns to the next: 16, or 16 * k in panels

  static Operand16 Plain(const float* b, int64_t ldb) { return {b, ldb, kGemmCols}; }
  static Operand16 Packed(const float* panels, int64_t k) { return {panels, kGemmCols, kGemmCols * k}; }
  /*! \brief The operand from column \a j (a multiple of 16) on. */
  Operand16 FromColumn(int64_t j) const { return {data + j / kGemmCols * group_stride, ldb, group_stride}; }
  /*! \brief The operand from row \a i on. */
  Operand16 FromRow(int64_t i) const { return {data + i * ldb, ldb, group_stride}; }
};

/*! \brief The instruction set of attention's small GEMMs (its softmax runs AVX2 code for both wide ones). */
enum class TileIsa { kPlain, kAvx2, kAvx512 };

/*! \brief Rows of a tile: 12 AVX-512 accumulators of 16 columns, or 6 rows of two AVX2 ones. */
constexpr int TileRows(TileIsa isa) { return isa == TileIsa::kAvx512 ? 12 : kGemmRows; }

template <TileIsa kIsa, int MR>
__attribute__((always_inline)) inline void Tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                                int64_t ldc, int64_t k, int64_t nc) {
  if constexpr (kIsa == TileIsa::kAvx512) {
    GemmTileAvx512<MR>(a, lda, b, ldb, c, ldc, k, nc);
  } else if constexpr (kIsa == TileIsa::kAvx2) {
    GemmTileAvx2<MR>(a, lda, b, ldb, c, ldc, k, nc);
  } else {
    GemmTilePlain<MR>(a, lda, b, ldb, c, ldc, k, nc);
  }
}

/*! \brief The last \a left < MR rows, as one tile of that many. */
template <TileIsa kIsa, int MR>
__attribute__((always_inline)) inline void TailTile(int64_t left, const float* a, int64_t lda, const float* b,
                                                    int64_t ldb, float* c, int64_t ldc, int64_t k, int64_t nc) {
  if constexpr (MR > 1) {
    if (left == MR - 1) {
      Tile<kIsa, MR - 1>(a, lda, b, ldb, c, ldc, k, nc);
    } else {
      TailTile<kIsa, MR - 1>(left, a, lda, b, ldb, c, ldc, k, nc);
    }
  }
}

/*! \brief ``c [m, n] = a [m, k] @ b [k, n]``, tile by tile, a group of 16 columns of b at a time. */
template <TileIsa kIsa>
__attribute__((always_inline)) inline void SmallGemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                                     Operand16 b, float* c, int64_t ldc) {
  constexpr int kRows = TileRows(kIsa);
  for (int64_t j0 = 0; j0 < n; j0 += kGemmCols) {
    const int64_t nc = std::min<int64_t>(kGemmCols, n - j0);
    const float* group = b.data + j0 / kGemmCols * b.group_stride;
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows) Tile<kIsa, kRows>(a + i * lda, lda, group, b.ldb, c + i * ldc + j0, ldc, k, nc);
    if (i < m) TailTile<kIsa, kRows>(m - i, a + i * lda, lda, group, b.ldb, c + i * ldc + j0, ldc, k, nc);
  }
}

/*! \brief ``x[j] = exp(x[j] - shift)`` over a row, returning the sum: ExpNonPositive eight lanes at a time. */
__attribute__((target("avx2,fma"))) float ExpShiftedAvx2(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 y = ExpNonPositive8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    _mm256_storeu_ps(x + j, y);
    sum = _mm256_add_ps(sum, y);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.0f;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  for (; j < n; ++j) {
    x[j] = ExpNonPositive(x[j] - shift);
    total += x[j];
  }
  return total;
}

/*! \brief ``x[j] = cap * tanh(x[j] * scale / cap)`` over a row: tanh(t) = sign(t) (1 - e) / (1 + e) with
 *  e = exp(-2 |t|), eight lanes at a time (an absolute error of a few ulps of cap; NaN stays NaN). */
__attribute__((target("avx2,fma"))) void SoftcapRowAvx2(float* x, int64_t n, float scale, float cap) {
  const __m256 sc = _mm256_set1_ps(scale), c = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f), minus2 = _mm256_set1_ps(-2.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 t = _mm256_div_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), sc), c);
    const __m256 e = ExpNonPositive8(_mm256_mul_ps(minus2, _mm256_andnot_ps(sign, t)));
    const __m256 th = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    _mm256_storeu_ps(x + j, _mm256_mul_ps(c, _mm256_or_ps(th, _mm256_and_ps(sign, t))));
  }
  for (; j < n; ++j) x[j] = cap * std::tanh(x[j] * scale / cap);
}

struct KeyRange {
  int64_t first, end;  // keys [first, end)
  int64_t size() const { return end - first; }
};

struct Attention {
  const float *q, *kt, *v, *bias;  // bias: nullptr for none; kt and v nullptr when they are 16-bit (below)
  float *out, *lse;  // lse: nullptr for none
  float scale;
  int64_t m, n, d, e;  // q [B, m, d], kt [B, d, n] (k [B, n, d] when transpose_k), v [B, n, e], out [B, m, e]
  bool transpose_k;
  std::vector<int64_t> batch, bias_batch_stride;  // per batch dim: q's size, the bias' stride (0: broadcast)
  std::vector<int64_t> group;  // per batch dim: q's indices per key/value index (q's size / k's and v's)
  int64_t bias_row_stride = 0, bias_col_stride = 0;
  int64_t block = 0;  // query rows a block
  const uint16_t *kt16 = nullptr, *v16 = nullptr;  // 16-bit keys and values (float16, or bfloat16 when bf16)
  bool bf16 = false;
  float softcap = 0.0f;  // > 0: the scaled scores are soft-capped, softcap * tanh(s / softcap)
  // a bias varying along the keys: per row of it as stored, its first unmasked key and one past its last (first
  // == n: masked everywhere), found once per call rather than once per head
  std::vector<KeyRange> bias_rows;
};

constexpr int kLanes = 8;  // partial maxima and sums a row (float reductions vectorize only in independent lanes)

/*! \brief One row of scores: ``x = x * scale + bias`` (bias stride 0 or 1, or none; with a \a softcap,
 *  ``softcap * tanh(x * scale / softcap) + bias``), then the softmax in place; the row's log-sum-exp into \a lse
 *  unless it is null. */
template <bool kAvx2>
__attribute__((always_inline)) inline void SoftmaxRow(float* x, int64_t n, float scale, const float* bias,
                                                      int64_t bias_stride, float* lse, float softcap) {
  if (softcap > 0.0f) {
    if constexpr (kAvx2) {
      SoftcapRowAvx2(x, n, scale, softcap);
    } else {
      for (int64_t j = 0; j < n; ++j) x[j] = softcap * std::tanh(x[j] * scale / softcap);
    }
    scale = 1.0f;
  }
  float mx[kLanes];
  std::fill(mx, mx + kLanes, -INFINITY);
  const int64_t whole = n / kLanes * kLanes;
  auto scaled = [&](auto add) {
    for (int64_t j = 0; j < whole; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        x[j + l] = x[j + l] * scale + add(j + l);
        mx[l] = std::max(mx[l], x[j + l]);
      }
    }
    for (int64_t j = whole; j < n; ++j) {
      x[j] = x[j] * scale + add(j);
      mx[0] = std::max(mx[0], x[j]);
    }
  };
  if (bias == nullptr) {
    scaled([](int64_t) { return 0.0f; });
  } else if (bias_stride == 1) {
    scaled([bias](int64_t j) { return bias[j]; });
  } else {
    scaled([bias](int64_t) { return bias[0]; });
  }
  float m = mx[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, mx[l]);
  float total = 0.0f;
  if constexpr (kAvx2) {
    total = ExpShiftedAvx2(x, n, m);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      x[j] = ExpNonPositive(x[j] - m);
      total += x[j];
    }
  }
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  if (lse != nullptr) *lse = m == -INFINITY ? -INFINITY : m + std::log(total);
}

constexpr float kMasked = -1e30f;  // a bias at or below this gives a key no weight (exp underflows to 0)

/*! \brief The keys rows [i0, i0 + rows) need, when each row has an unmasked key: from the first key any of them
 *  does not mask (rounded down to a multiple of 16, the GEMMs' column groups) to one past the last (a causal mask:
 *  [0, i0 + rows); a sliding window of w keys: from about i0 - w). Keys outside would get weight 0 (their
 *  probabilities underflow), so they are skipped: half the work of a causal attention, all but the window of a
 *  long sliding-window one. A fully masked row attends to every key alike (the reference's softmax of equal
 *  values), so then nothing is skipped. */
inline KeyRange KeysNeeded(const Attention& p, int64_t bias_offset, int64_t i0, int64_t rows) {
  if (p.bias_rows.empty()) return {0, p.n};
  int64_t begin = p.n, end = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const KeyRange row = p.bias_rows[(bias_offset + (i0 + i) * p.bias_row_stride) / p.n];
    if (row.first == p.n) return {0, p.n};  // this row is masked everywhere
    begin = std::min(begin, row.first);
    end = std::max(end, row.end);
  }
  return {begin - begin % kGemmCols, end};
}

/*! \brief Attention::bias_rows of a bias of \a count elements varying along the keys (stored rows of n). */
std::vector<KeyRange> BiasRows(const float* bias, int64_t count, int64_t n) {
  std::vector<KeyRange> rows(static_cast<size_t>(count / n));
  for (size_t r = 0; r < rows.size(); ++r) {
    const float* row = bias + static_cast<int64_t>(r) * n;
    int64_t first = 0, end = n;
    while (first < n && row[first] <= kMasked) ++first;
    while (end > first && row[end - 1] <= kMasked) --end;
    rows[r] = {first, end};
  }
  return rows;
}

/*! \brief Rows [i0, i0 + rows) of batch index \a b: scores into \a s (row stride \a lds), then the output.
 *  \a kt and \a v are batch index b's, packed by PackPanels. */
template <TileIsa kIsa>
__attribute__((always_inline)) inline void AttentionBlockBody(const Attention& p, int64_t b, int64_t bias_offset,
                                                              int64_t i0, int64_t rows, Operand16 kt,
                                                              const float* k_rows, Operand16 v, float* s,
                                                              int64_t lds) {
  const KeyRange keys = KeysNeeded(p, bias_offset, i0, rows);
  const int64_t n = keys.size();
  const float* q = p.q + (b * p.m + i0) * p.d;
  if (k_rows != nullptr) {  // few rows and an untransposed key: a dot product per score, both read in place
    const float* k = k_rows + keys.first * p.d;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < n; ++j) s[i * lds + j] = Dot(q + i * p.d, k + j * p.d, p.d);
    }
  } else {
    SmallGemm<kIsa>(rows, n, p.d, q, p.d, kt.FromColumn(keys.first), s, lds);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* bias = p.bias == nullptr ? nullptr : p.bias + bias_offset + (i0 + i) * p.bias_row_stride +
                                                          keys.first * p.bias_col_stride;
    SoftmaxRow<kIsa != TileIsa::kPlain>(s + i * lds, n, p.scale, bias, p.bias_col_stride,
                                        p.lse == nullptr ? nullptr : p.lse + b * p.m + i0 + i, p.softcap);
  }
  SmallGemm<kIsa>(rows, p.e, n, s, lds, v.FromRow(keys.first), p.out + (b * p.m + i0) * p.e, p.e);
}

__attribute__((target("avx512f,avx2,fma"))) void AttentionBlockAvx512(const Attention& p, int64_t b,
                                                                       int64_t bias_offset, int64_t i0, int64_t rows,
                                                                       Operand16 kt, const float* k_rows, Operand16 v,
                                                                       float* s, int64_t lds) {
  AttentionBlockBody<TileIsa::kAvx512>(p, b, bias_offset, i0, rows, kt, k_rows, v, s, lds);
}

__attribute__((target("avx2,fma"))) void AttentionBlockAvx2(const Attention& p, int64_t b, int64_t bias_offset,
                                                             int64_t i0, int64_t rows, Operand16 kt,
                                                             const float* k_rows, Operand16 v, float* s,
                                                             int64_t lds) {
  AttentionBlockBody<TileIsa::kAvx2>(p, b, bias_offset, i0, rows, kt, k_rows, v, s, lds);
}

void AttentionBlockBaseline(const Attention& p, int64_t b, int64_t bias_offset, int64_t i0, int64_t rows,
                            Operand16 kt, const float* k_rows, Operand16 v, float* s, int64_t lds) {
  AttentionBlockBody<TileIsa::kPlain>(p, b, bias_offset, i0, rows, kt, k_rows, v, s, lds);
}

/*! \brief 8 consecutive values of b as float32: float, bfloat16 (the top half of a float32), float16 (F16C). */
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 Load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 Load8(const Bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 Load8(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

/*! \brief The few-row block of 16-bit keys ``k [n, d]`` (transpose_k) and values without AVX2: dot products with
 *  the key rows and the probabilities times the value rows, both read in 16 bits where they lie (with AVX2,
 *  AttentionFewRows). */
void AttentionRows16Baseline(const Attention& p, int64_t b, int64_t kb, int64_t bias_offset, int64_t i0,
                             int64_t rows, float* s) {
  const KeyRange keys = KeysNeeded(p, bias_offset, i0, rows);
  const int64_t n = keys.size();
  const uint16_t *k = p.kt16 + (kb * p.n + keys.first) * p.d, *v = p.v16 + (kb * p.n + keys.first) * p.e;
  for (int64_t i = 0; i < rows; ++i) {
    const float* q = p.q + (b * p.m + i0 + i) * p.d;
    float* o = p.out + (b * p.m + i0 + i) * p.e;
    for (int64_t j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int64_t c = 0; c < p.d; ++c) dot += q[c] * HalfToFloat(k[j * p.d + c], p.bf16);
      s[j] = dot;
    }
    SoftmaxRow<false>(s, n, p.scale,
                      p.bias == nullptr ? nullptr : p.bias + bias_offset + (i0 + i) * p.bias_row_stride +
                                                        keys.first * p.bias_col_stride,
                      p.bias_col_stride, p.lse == nullptr ? nullptr : p.lse + b * p.m + i0 + i, p.softcap);
    std::fill(o, o + p.e, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < p.e; ++c) o[c] += s[j] * HalfToFloat(v[j * p.e + c], p.bf16);
    }
  }
}

constexpr int64_t kFewRows = 8;  // query rows of consecutive batch indices that share keys and values, together

void AttentionFewRows(const Attention& p, int64_t b, int64_t i0, int64_t rows, int64_t together, int64_t kb,
                      const int64_t* bias_offsets, float* s, int64_t lds);

void AttentionImpl(const ffi::TensorView& q, const ffi::TensorView& kt, const ffi::TensorView& v,
                   const ffi::TensorView* bias, double scale, bool transpose_k, const ffi::TensorView& out,
                   const ffi::TensorView* lse = nullptr, double softcap = 0.0) {
  DLDataType f32{kDLFloat, 32, 1};
  const DLDataType kv = kt.dtype();  // float32, or float16/bfloat16 keys and values
  const bool narrow = kv.bits == 16 && (kv.code == kDLFloat || kv.code == kDLBfloat);
  CheckOperand(q, f32, "q");
  CheckOperand(kt, narrow ? kv : f32, "kt");
  CheckOperand(v, narrow ? kv : f32, "v");
  CheckOperand(out, f32, "out");
  if (bias != nullptr) CheckOperand(*bias, f32, "bias");
  if (lse != nullptr) CheckOperand(*lse, f32, "lse");
  const int rank = q.ndim();
  if (rank < 2 || kt.ndim() != rank || v.ndim() != rank || out.ndim() != rank) {
    TVM_FFI_THROW(ValueError) << "cpu_attention: q, kt, v and out must have one rank >= 2";
  }
  Attention p{Data<float>(q), narrow ? nullptr : Data<float>(kt), narrow ? nullptr : Data<float>(v),
              bias ? Data<float>(*bias) : nullptr, Data<float>(out), lse ? Data<float>(*lse) : nullptr,
              static_cast<float>(scale), Dim(q, -2), Dim(kt, transpose_k ? -2 : -1), Dim(q, -1), Dim(v, -1),
              transpose_k, {}, {}};
  if (!(softcap >= 0.0)) TVM_FFI_THROW(ValueError) << "cpu_attention: softcap must be >= 0, got " << softcap;
  p.softcap = static_cast<float>(softcap);
  if (narrow) {
    p.kt16 = Data<uint16_t>(kt);
    p.v16 = Data<uint16_t>(v);
    p.bf16 = kv.code == kDLBfloat;
  }
  for (int i = 0; i < rank - 2; ++i) {
    p.batch.push_back(Dim(q, i));
    const int64_t kv = Dim(kt, i);
    if (kv != Dim(v, i) || Dim(out, i) != Dim(q, i) || (kv != Dim(q, i) && (kv <= 0 || Dim(q, i) % kv != 0))) {
      TVM_FFI_THROW(ValueError) << "cpu_attention: q and out must have the same batch dims, and kt's and v's (one "
                                   "shape) must divide them";
    }
    p.group.push_back(kv == Dim(q, i) ? 1 : Dim(q, i) / kv);
  }
  if (Dim(kt, transpose_k ? -1 : -2) != p.d || Dim(v, -2) != p.n || Dim(out, -2) != p.m || Dim(out, -1) != p.e) {
    TVM_FFI_THROW(ValueError) << "cpu_attention: expected q [..., M, D], kt [..., D, N] (k [..., N, D] with "
                                 "transpose_k), v [..., N, E], out [..., M, E]";
  }
  if (lse != nullptr) {
    bool same = lse->ndim() == rank - 1;
    for (int i = 0; same && i < rank - 1; ++i) same = Dim(*lse, i) == Dim(q, i);
    if (!same) TVM_FFI_THROW(ValueError) << "cpu_attention: lse must be [..., M], q's shape without its last dim";
  }
  if (bias != nullptr) {  // right-aligned numpy broadcasting against the scores [..., M, N]
    const int br = bias->ndim();
    if (br > rank) TVM_FFI_THROW(ValueError) << "cpu_attention: bias has a higher rank than the scores";
    std::vector<int64_t> want(p.batch);
    want.push_back(p.m);
    want.push_back(p.n);
    std::vector<int64_t> stride(rank, 0);
    int64_t st = 1;
    for (int i = rank - 1; i >= rank - br; --i) {
      const int64_t dim = bias->shape()[i - (rank - br)];
      if (dim != 1 && dim != want[i]) {
        TVM_FFI_THROW(ValueError) << "cpu_attention: bias does not broadcast to the scores";
      }
      stride[i] = dim == 1 ? 0 : st;
      st *= dim;
    }
    p.bias_batch_stride.assign(stride.begin(), stride.end() - 2);
    p.bias_row_stride = stride[rank - 2];
    p.bias_col_stride = stride[rank - 1];
    if (p.bias_col_stride == 1 && p.n > 0) p.bias_rows = BiasRows(p.bias, bias->numel(), p.n);
  }
  const int64_t count = Prod(p.batch);
  if (count == 0 || p.m == 0 || p.e == 0) return;
  if (p.n == 0) TVM_FFI_THROW(ValueError) << "cpu_attention: no keys (a softmax over nothing)";
  // BMC_CPU_NO_AVX512 / BMC_CPU_NO_AVX2: the narrower tiles, as older CPUs run them (the tests take them this way)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool f16c = avx2 && __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  const bool wide = avx2 && std::getenv("BMC_CPU_NO_AVX2") == nullptr;
  const bool widest = wide && avx512 && std::getenv("BMC_CPU_NO_AVX512") == nullptr;
  const auto run = widest ? AttentionBlockAvx512 : wide ? AttentionBlockAvx2 : AttentionBlockBaseline;
  const int64_t tile = widest ? TileRows(TileIsa::kAvx512) : kGemmRows;  // a block: whole tiles of query rows
  p.block = std::max<int64_t>(1, std::min<int64_t>(p.m, kAttentionScores / p.n));
  p.block = std::max<int64_t>(tile, p.block / tile * tile);
  const int64_t blocks = (p.m + p.block - 1) / p.block;
  constexpr int64_t kThreadWork = int64_t{1} << 19;  // multiply-adds a thread is worth (starting one ~50 us)
  const int64_t work = count * p.m * p.n * (p.d + p.e);
  ParallelRows(count * blocks, [&p, blocks, run, wide](int64_t begin, int64_t end) {
    const auto whole = [](int64_t x) { return (x + kGemmCols - 1) / kGemmCols * kGemmCols; };
    const int64_t lds = whole(p.n) + kGemmCols;  // rows of scores not 4 KiB apart
    std::vector<float> scores(static_cast<size_t>(std::max(p.block, kFewRows) * lds));
    // a thread's items are consecutive: the keys and values of a batch index are packed once per thread, when
    // enough query rows reuse them (a decoding step's few rows read them once, in place)
    const bool pack = std::min(p.m, (end - begin) * p.block) >= kPackRows;
    // AVX2 and few rows with the key as rows (a decoding step): the skinny GEMMs' tiles, with the rows of the next
    // batch indices that read the same key/value index (a grouped-query head's query heads) when a batch index is
    // one block, each key and value row read once for all of them, in place (16-bit ones widened in registers)
    const bool few = wide && f16c && !pack && p.transpose_k;
    std::vector<float> kt_panels, v_panels, kt_wide, v_wide;
    if (pack) {
      kt_panels.resize(static_cast<size_t>(p.d * whole(p.n)));
      v_panels.resize(static_cast<size_t>(p.n * whole(p.e)));
    }
    // 16-bit keys and values: read in place by the few-row paths when the key comes as rows (a decoding step),
    // else a batch index's widened here, once, while in cache
    const bool direct = p.kt16 != nullptr && !pack && p.transpose_k && !few;  // (without AVX2)
    if (p.kt16 != nullptr && !direct && !few) {
      kt_wide.resize(static_cast<size_t>(p.d * p.n));
      v_wide.resize(static_cast<size_t>(p.n * p.e));
    }
    const auto locate = [&p](int64_t b, int64_t* bias_offset) {  // batch index b's bias offset and key/value index
      int64_t kb = 0;
      *bias_offset = 0;
      for (int64_t i = static_cast<int64_t>(p.batch.size()) - 1, rest = b, kv_stride = 1; i >= 0; --i) {
        const int64_t index = rest % p.batch[i];
        *bias_offset += index * (p.bias_batch_stride.empty() ? 0 : p.bias_batch_stride[i]);
        kb += index / p.group[i] * kv_stride;
        kv_stride *= p.batch[i] / p.group[i];
        rest /= p.batch[i];
      }
      return kb;
    };
    for (int64_t item = begin, packed = -1, widened = -1; item < end; ++item) {
      const int64_t b = item / blocks, i0 = item % blocks * p.block;
      int64_t bias_offset = 0;
      const int64_t kb = locate(b, &bias_offset);  // consecutive query heads may share one key/value head
      const int64_t rows = std::min(p.block, p.m - i0);
      if (few) {
        int64_t offsets[kFewRows] = {bias_offset}, together = 1, next = 0;
        while (blocks == 1 && item + together < end && (together + 1) * p.m <= kFewRows &&
               locate(b + together, &next) == kb) {
          offsets[together++] = next;
        }
        AttentionFewRows(p, b, i0, rows, together, kb, offsets, scores.data(), lds);
        item += together - 1;
        continue;
      }
      if (direct) {
        AttentionRows16Baseline(p, b, kb, bias_offset, i0, rows, scores.data());
        continue;
      }
      if (p.kt16 != nullptr && kb != widened) {
        Convert(p.kt16 + kb * p.d * p.n, kt_wide.data(), p.d * p.n, p.bf16);
        Convert(p.v16 + kb * p.n * p.e, v_wide.data(), p.n * p.e, p.bf16);
        widened = kb;
      }
      const float *kt = p.kt16 != nullptr ? kt_wide.data() : p.kt + kb * p.d * p.n,
                  *v = p.kt16 != nullptr ? v_wide.data() : p.v + kb * p.n * p.e;
      if (pack && kb != packed) {
        if (p.transpose_k) {
          PackPanelsTransposed(kt, p.d, p.n, kt_panels.data());
        } else {
          PackPanels(kt, p.n, p.d, p.n, kt_panels.data());
        }
        PackPanels(v, p.e, p.n, p.e, v_panels.data());
        packed = kb;
      }
      const Operand16 kt_op = pack ? Operand16::Packed(kt_panels.data(), p.d) : Operand16::Plain(kt, p.n);
      const Operand16 v_op = pack ? Operand16::Packed(v_panels.data(), p.n) : Operand16::Plain(v, p.e);
      run(p, b, bias_offset, i0, rows, kt_op, !pack && p.transpose_k ? kt : nullptr, v_op, scores.data(), lds);
    }
  }, work / kThreadWork + 1);
}

enum class PackedIsa { kAvx512, kAvx2, kPlain };

/*! \brief The widest panel kernel this CPU runs (BMC_CPU_NO_AVX512 / BMC_CPU_NO_AVX2: the narrower ones, as older
 *  CPUs run them; the tests take them this way). */
PackedIsa PanelIsa() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::getenv("BMC_CPU_NO_AVX2") != nullptr || !avx2) return PackedIsa::kPlain;
  return avx512 && std::getenv("BMC_CPU_NO_AVX512") == nullptr ? PackedIsa::kAvx512 : PackedIsa::kAvx2;
}

// ---- skinny float32 GEMMs (decoding) ---------------------------------------------------------------------------
//
// A GEMM of a few rows (a decoding step: M = batch) reads the whole weight for a few products per element; the
// BLAS packs the weight into its panel layout on every call first (OpenBLAS' sgemm_itcopy was 64% of a GPT-2
// decoding step), which triples the memory traffic. These kernels read b where it lies, once.

__attribute__((target("avx2,fma,f16c"), always_inline)) inline float Load1(const float* p) { return *p; }
__attribute__((target("avx2,fma,f16c"), always_inline)) inline float Load1(const Bf16* p) {
  uint32_t u = uint32_t(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
__attribute__((target("avx2,fma,f16c"), always_inline)) inline float Load1(const F16* p) {
  return _cvtsh_ss(p->bits);
}

/*! \brief 16 consecutive values of b as float32 (AVX-512). */
__attribute__((target("avx512f,avx2,fma,f16c"), always_inline)) inline __m512 Load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f,avx2,fma,f16c"), always_inline)) inline __m512 Load16(const Bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
__attribute__((target("avx512f,avx2,fma,f16c"), always_inline)) inline __m512 Load16(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

constexpr int64_t kSkinnyRows = 8;              // up to this many rows of a (at 16 the BLAS won)
constexpr int kSkinnyStreams = 8;                // rows of b read together (4 and 16 measured no better)
constexpr int64_t kSkinnyThreadWork = 1 << 18;  // multiply-adds a thread must have to be worth starting

/*! \brief ``c[i, j] = dot(a[i, :], bt[j, :])`` for MR rows of a and 4 rows of bt (``b`` stored transposed: every
 *  row of bt streams through once), 4 * MR AVX2 accumulators. */
template <int MR, typename TB>
__attribute__((target("avx2,fma,f16c"))) void DotTileAvx2(const float* a, int64_t lda, const TB* bt, int64_t ldb,
                                                           float* c, int64_t ldc, int64_t k, int64_t nr) {
  __m256 acc[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
  const TB* rows[4];
  for (int j = 0; j < 4; ++j) rows[j] = bt + std::min<int64_t>(j, nr - 1) * ldb;  // a short group repeats a row
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) {
    const __m256 b0 = Load8(rows[0] + p), b1 = Load8(rows[1] + p);
    const __m256 b2 = Load8(rows[2] + p), b3 = Load8(rows[3] + p);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_loadu_ps(a + r * lda + p);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(ar, b2, acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(ar, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    // the four sums at once: pairwise adds of the accumulators' halves, then one 128-bit add
    const __m256 s01 = _mm256_hadd_ps(acc[r][0], acc[r][1]), s23 = _mm256_hadd_ps(acc[r][2], acc[r][3]);
    const __m256 s = _mm256_hadd_ps(s01, s23);
    alignas(16) float sums[4];
    _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    for (int j = 0; j < nr; ++j) {
      float v = sums[j];
      for (int64_t q = p; q < k; ++q) v += a[r * lda + q] * Load1(rows[j] + q);
      c[r * ldc + j] = v;
    }
  }
}

/*! \brief ``c[i, j] += a[i, 0:KB] @ b[0:KB, j]`` for MR rows and the columns [j0, n), one at a time: the tiles'
 *  last columns. */
template <int MR, int KB, typename TB>
__attribute__((target("avx2,fma,f16c"))) void AxpyColumns(const float* a, int64_t lda, const TB* b, int64_t ldb,
                                                           float* c, int64_t ldc, int64_t j0, int64_t n) {
  for (int64_t j = j0; j < n; ++j) {
    for (int r = 0; r < MR; ++r) {
      float acc = c[r * ldc + j];
      for (int q = 0; q < KB; ++q) acc += a[r * lda + q] * Load1(b + q * ldb + j);
      c[r * ldc + j] = acc;
    }
  }
}

/*! \brief ``c[i, :] += a[i, 0:KB] @ b[0:KB, :]`` for MR rows of a over the first \a n columns of b (``[k, n]``,
 *  row-major): KB rows of b stream through together; each 16-column tile of c is held in registers across them. */
template <int MR, int KB, typename TB>
__attribute__((target("avx2,fma,f16c"))) void AxpyTileAvx2(const float* a, int64_t lda, const TB* b, int64_t ldb,
                                                            float* c, int64_t ldc, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 acc[MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm256_loadu_ps(c + r * ldc + j);
      acc[r][1] = _mm256_loadu_ps(c + r * ldc + j + 8);
    }
#pragma GCC unroll 16
    for (int q = 0; q < KB; ++q) {
      FmaRowAvx2<MR>(a + q, lda, Load8(b + q * ldb + j), Load8(b + q * ldb + j + 8), acc);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(c + r * ldc + j, acc[r][0]);
      _mm256_storeu_ps(c + r * ldc + j + 8, acc[r][1]);
    }
  }
  AxpyColumns<MR, KB>(a, lda, b, ldb, c, ldc, j, n);
}

/*! \brief AxpyTileAvx2 with AVX-512 for up to 8 rows at once (16 accumulators of 32 columns): a decoding step of
 *  up to 8 rows reads (and widens) b once, where the AVX2 tiles of 4 rows read it twice for 8. */
template <int MR, int KB, typename TB>
__attribute__((target("avx512f,avx2,fma,f16c"))) void AxpyTile512(const float* a, int64_t lda, const TB* b, int64_t ldb,
                                                          float* c, int64_t ldc, int64_t n) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm512_loadu_ps(c + r * ldc + j);
      acc[r][1] = _mm512_loadu_ps(c + r * ldc + j + 16);
    }
#pragma GCC unroll 16
    for (int q = 0; q < KB; ++q) {
      const __m512 b0 = Load16(b + q * ldb + j), b1 = Load16(b + q * ldb + j + 16);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 ar = _mm512_set1_ps(a[r * lda + q]);
        acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(c + r * ldc + j, acc[r][0]);
      _mm512_storeu_ps(c + r * ldc + j + 16, acc[r][1]);
    }
  }
  AxpyColumns<MR, KB>(a, lda, b, ldb, c, ldc, j, n);
}

/*! \brief ``c [m, n] += a [m, k] @ b [k, n]`` (row-major b read in order: KB rows at a time, all columns). */
template <int KB, typename TB>
void AxpyRows(const float* a, int64_t lda, int64_t m, const TB* b, int64_t ldb, float* c, int64_t ldc,
              int64_t n, int64_t k) {
  int64_t p = 0;
  const bool wide = PanelIsa() == PackedIsa::kAvx512;
  const auto rows = [&](auto kb, int64_t p) {
    constexpr int kKb = decltype(kb)::value;
    if (wide) {
      const float* ap = a + p;
      const TB* bp = b + p * ldb;
      switch (m) {
#define BMC_AXPY512(R) case R: AxpyTile512<R, kKb, TB>(ap, lda, bp, ldb, c, ldc, n); return;
        BMC_AXPY512(1) BMC_AXPY512(2) BMC_AXPY512(3) BMC_AXPY512(4)
        BMC_AXPY512(5) BMC_AXPY512(6) BMC_AXPY512(7) BMC_AXPY512(8)
#undef BMC_AXPY512
        default: break;
      }
    }
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) AxpyTileAvx2<4, kKb, TB>(a + i * lda + p, lda, b + p * ldb, ldb, c + i * ldc, ldc, n);
    switch (m - i) {
      case 3: AxpyTileAvx2<3, kKb, TB>(a + i * lda + p, lda, b + p * ldb, ldb, c + i * ldc, ldc, n); break;
      case 2: AxpyTileAvx2<2, kKb, TB>(a + i * lda + p, lda, b + p * ldb, ldb, c + i * ldc, ldc, n); break;
      case 1: AxpyTileAvx2<1, kKb, TB>(a + i * lda + p, lda, b + p * ldb, ldb, c + i * ldc, ldc, n); break;
      default: break;
    }
  };
  for (; p + KB <= k; p += KB) rows(std::integral_constant<int, KB>{}, p);
  for (; p < k; ++p) rows(std::integral_constant<int, 1>{}, p);
}

/*! \brief ``c [m, n] = a [m, k] @ b`` for m ≤ kSkinnyRows with AVX2, ``b [k, n]`` (its rows split over the kernel
 *  threads) or (\a tb) ``[n, k]`` (its rows, i.e. the columns of c, split); false (nothing done) where the BLAS
 *  should run instead. */
template <typename TB>
bool SkinnyGemm(bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const TB* b, int64_t ldb,
                float* c, int64_t ldc) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  if (m > kSkinnyRows || !avx2 || std::getenv("BMC_CPU_NO_AVX2") != nullptr) return false;
  const int64_t threads = std::max<int64_t>(1, m * n * k / kSkinnyThreadWork);
  if (!tb) {  // each thread a range of b's rows (contiguous memory) into its own partial sum; then one sum
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({threads, kernel_threads.load(), k}));
    thread_local std::vector<float> scratch;
    scratch.assign(static_cast<size_t>((parts - 1) * m * n), 0.0f);
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    float* partial = scratch.data();
    const int64_t chunk = (k + parts - 1) / parts;
    ParallelRows(parts, [=](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p0 = t * chunk, p1 = std::min(k, p0 + chunk);
        float* ct = t == 0 ? c : partial + (t - 1) * m * n;
        const int64_t ldt = t == 0 ? ldc : n;
        if (p0 < p1) AxpyRows<kSkinnyStreams, TB>(a + p0, lda, m, b + p0 * ldb, ldb, ct, ldt, n, p1 - p0);
      }
    }, parts);
    for (int64_t t = 1; t < parts; ++t) {
      for (int64_t i = 0; i < m; ++i) {
        const float* src = partial + ((t - 1) * m + i) * n;
        float* dst = c + i * ldc;
        for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
      }
    }
    return true;
  }
  ParallelRows((n + 3) / 4, [=](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t j = 4 * g, nr = std::min<int64_t>(4, n - j);
      int64_t i = 0;
      for (; i + 3 <= m; i += 3) DotTileAvx2<3, TB>(a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc, k, nr);
      if (m - i == 2) DotTileAvx2<2, TB>(a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc, k, nr);
      if (m - i == 1) DotTileAvx2<1, TB>(a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc, k, nr);
    }
  }, threads);
  return true;
}

/*! \brief Attention of rows [i0, i0 + \a rows) of \a together consecutive batch indices from \a b (all of their
 *  rows when more than one) that read key/value index \a kb (keys as rows ``k [n, d]``; \a bias_offsets: each
 *  index's bias offset): scores of up to 3 rows x 4 keys a tile (DotTileAvx2), the softmax row by row, then
 *  ``p @ v`` by the skinny GEMMs' row streams (AxpyRows). Each row's arithmetic is the same whichever rows it is
 *  computed with. */
template <typename TB>
__attribute__((target("avx2,fma,f16c"))) void AttentionFewRowsT(const Attention& p, int64_t b, int64_t i0,
                                                               int64_t per_index, int64_t together, const TB* k,
                                                               const TB* v, const int64_t* bias_offsets, float* s,
                                                               int64_t lds) {
  const int64_t rows = together * per_index, d = p.d;
  KeyRange keys{p.n, 0};
  for (int64_t r = 0; r < together; ++r) {
    const KeyRange own = KeysNeeded(p, bias_offsets[r], i0, per_index);
    keys = {std::min(keys.first, own.first), std::max(keys.end, own.end)};
  }
  const int64_t n = keys.size();
  k += keys.first * d;
  v += keys.first * p.e;
  const float* q = p.q + (b * p.m + i0) * d;
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t nr = std::min<int64_t>(4, n - j);
    int64_t i = 0;
    for (; i + 3 <= rows; i += 3) DotTileAvx2<3, TB>(q + i * d, d, k + j * d, d, s + i * lds + j, lds, d, nr);
    if (rows - i == 2) DotTileAvx2<2, TB>(q + i * d, d, k + j * d, d, s + i * lds + j, lds, d, nr);
    if (rows - i == 1) DotTileAvx2<1, TB>(q + i * d, d, k + j * d, d, s + i * lds + j, lds, d, nr);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* bias = p.bias == nullptr
                            ? nullptr
                            : p.bias + bias_offsets[r / per_index] + (i0 + r % per_index) * p.bias_row_stride +
                                  keys.first * p.bias_col_stride;
    SoftmaxRow<true>(s + r * lds, n, p.scale, bias, p.bias_col_stride,
                     p.lse == nullptr ? nullptr : p.lse + b * p.m + i0 + r, p.softcap);
  }
  float* out = p.out + (b * p.m + i0) * p.e;
  std::fill(out, out + rows * p.e, 0.0f);
  AxpyRows<kSkinnyStreams, TB>(s, lds, rows, v, p.e, out, p.e, p.e, n);
}

void AttentionFewRows(const Attention& p, int64_t b, int64_t i0, int64_t rows, int64_t together, int64_t kb,
                      const int64_t* bias_offsets, float* s, int64_t lds) {
  const int64_t kv = kb * p.n;
  if (p.kt16 == nullptr) {
    AttentionFewRowsT<float>(p, b, i0, rows, together, p.kt + kv * p.d, p.v + kv * p.e, bias_offsets, s, lds);
  } else if (p.bf16) {
    AttentionFewRowsT<Bf16>(p, b, i0, rows, together, reinterpret_cast<const Bf16*>(p.kt16) + kv * p.d,
                            reinterpret_cast<const Bf16*>(p.v16) + kv * p.e, bias_offsets, s, lds);
  } else {
    AttentionFewRowsT<F16>(p, b, i0, rows, together, reinterpret_cast<const F16*>(p.kt16) + kv * p.d,
                           reinterpret_cast<const F16*>(p.v16) + kv * p.e, bias_offsets, s, lds);
  }
}

// ---- float32 GEMM on panels of b -------------------------------------------------------------------------------

/* bmc's own float32 GEMM c [m, n] = a [m, k] @ b, for every float32 product of more than kSkinnyRows rows with a
 * not transposed. b is read in panels of kPackPanel columns, [ceil(N / kPackPanel), K, kPackPanel] (the last
 * zero-padded), so a panel's K x kPackPanel block is contiguous and the register tiles stream it with plain loads:
 * a weight is packed so once, when the model is loaded (``cpu_pack_weight``, ``cpu_matmul_packed``); any other b
 * is packed a panel at a time into a per-thread buffer as the work reaches it. A register tile is MR rows of a
 * times one panel, MR x kPackPanel float32 accumulators: AVX-512 12 x 32 (24 zmm), AVX2 6 x 16 (12 ymm, a panel in
 * two halves), else plain loops. Single-threaded it runs at 95-115 GFLOP/s on this host's core against OpenBLAS'
 * 75-100 at the models' shapes; and it keeps float32 models off OpenBLAS' threads, which spin after each call and
 * took the second core from bmc's own threads (2 cores: the packed kernel ran at one core's speed when interleaved
 * with sgemm calls). */
constexpr int64_t kPackPanel = 32;
constexpr int64_t kPackedDepth = 4096;        // K per pass: a panel's slice (512 KiB) stays in L2
constexpr int64_t kPackedRowBytes = 1 << 19;  // rows of a per block: this many bytes of a [rows, K] (L2)

/*! \brief One GEMM for the panel kernels: b given packed (\a bp) or as stored (\a b, \a ldb; \a tb: [n, k]). */
struct PanelGemm {
  const float* a;
  int64_t lda;
  const float* bp;  // packed panels, or nullptr: pack b's panels as they are needed
  const float* b;
  int64_t ldb;
  bool tb;
  float* c;
  int64_t ldc, m, n, k;
  const ConvCols* conv = nullptr;  // b is this convolution's column matrix (b, ldb, tb unused)
  const uint16_t* b16 = nullptr;   // b is 16-bit (bfloat16 when bf16, else float16), widened as it is packed
  const uint16_t* bp16 = nullptr;  // packed 16-bit panels (cpu_pack_weight of a 16-bit weight), widened per slice
  bool bf16 = false;
  const uint16_t* a16 = nullptr;   // bfloat16 a (with bfloat16 b, b16 or bp16): the dot-product tiles (Bf16Dot) on
                                   // b's slices paired as they are, not widened
  const Epilogue* ep = nullptr;    // applied to each block of c after its last pass over k
};

/*! rief Whether the bfloat16 dot-product tiles run (AVX512_BF16's ``vdpbf16ps``: 32 products into 16 float32
 *  sums an instruction, twice the float32 FMA's; BMC_CPU_NO_BF16_DOT widens both operands instead). */
bool Bf16Dot() {
  static const bool have = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return have && PanelIsa() == PackedIsa::kAvx512 && std::getenv("BMC_CPU_NO_BF16_DOT") == nullptr;
}

/*! \brief dst[0:n] = src[0:n] for n <= kPackPanel, as fixed-size copies the compiler inlines: a whole panel row, or
 *  two overlapping copies of a power of two (a call of libc's memcpy per 128-byte row was 5% of ResNet-50, and per
 *  7-pixel run of a 7 x 7 map's panels 18% of ResNeXt's last grouped convolutions). */
inline void CopyShort(float* dst, const float* src, int64_t n) {
  const auto ends = [&](auto size) {  // the first and the last `size` floats
    std::memcpy(dst, src, sizeof(float) * size);
    std::memcpy(dst + n - size, src + n - size, sizeof(float) * size);
  };
  if (n == kPackPanel) {
    std::memcpy(dst, src, sizeof(float) * kPackPanel);
  } else if (n >= 16) {
    ends(std::integral_constant<int64_t, 16>());
  } else if (n >= 8) {
    ends(std::integral_constant<int64_t, 8>());
  } else if (n >= 4) {
    ends(std::integral_constant<int64_t, 4>());
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

/*! \brief Panel \a j (depth rows from \a d0) of a convolution's column matrix into \a out [depth, kPackPanel]:
 *  the panel's pixels are runs along output rows, and each run of each row (channel, tap) is a copy of a stretch of
 *  an input row (strided when the stride is). */
void PackConvPanel(const ConvCols& v, int64_t j, int64_t d0, int64_t depth, float* out) {
  const int64_t plane = v.oh * v.ow, q0 = j * kPackPanel, cols = std::min(kPackPanel, v.od * plane - q0);
  struct Run {
    int64_t q, len, at;  // panel offset, length, offset of its first input value from the tap's origin
  } runs[kPackPanel];
  int64_t count = 0;
  for (int64_t q = 0; q < cols;) {
    const int64_t z = (q0 + q) / plane, row = (q0 + q) % plane / v.ow, col = (q0 + q) % v.ow;
    const int64_t len = std::min(cols - q, v.ow - col);
    runs[count++] = {q, len, (z * v.sd * v.h + row * v.sh) * v.w + col * v.sw};
    q += len;
  }
  const int64_t taps = v.kd * v.kh * v.kw;
  int64_t ch = d0 / taps, kz = d0 % taps / (v.kh * v.kw), i = d0 % (v.kh * v.kw) / v.kw, jj = d0 % v.kw;
  for (int64_t p = 0; p < depth; ++p) {
    const float* origin = v.x + ((ch * v.d + kz * v.dd) * v.h + i * v.dh) * v.w + jj * v.dw;
    float* row = out + p * kPackPanel;
    for (int64_t r = 0; r < count; ++r) {
      const Run& run = runs[r];
      if (v.sw == 1) {
        CopyShort(row + run.q, origin + run.at, run.len);
      } else {
        for (int64_t o = 0; o < run.len; ++o) row[run.q + o] = origin[run.at + o * v.sw];
      }
    }
    std::fill(row + cols, row + kPackPanel, 0.0f);
    if (++jj == v.kw) {
      jj = 0;
      if (++i == v.kh) {
        i = 0;
        if (++kz == v.kd) kz = 0, ++ch;
      }
    }
  }
}

/*! \brief out[p * kPackPanel + q] = b[q * ldb + p] for an 8 x 8 block (AVX2 in-register transpose). */
__attribute__((target("avx2"))) inline void Transpose8x8(const float* b, int64_t ldb, float* out) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(b + i * ldb);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      r[i + h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 2 + h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  // r[0..3]: columns 0, 2, 1, 3 of rows 0-3 (low lanes) and 4-7... of the first four rows; r[4..7] the last four
  const int order[4] = {0, 2, 1, 3};
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(out + c * kPackPanel, _mm256_permute2f128_ps(r[order[c]], r[4 + order[c]], 0x20));
    _mm256_storeu_ps(out + (c + 4) * kPackPanel, _mm256_permute2f128_ps(r[order[c]], r[4 + order[c]], 0x31));
  }
}

/*! \brief Panel \a j of b (depth rows \a d0 ... d0 + depth) into \a out [depth, kPackPanel], zero-padded. */
void PackPanelF32(const PanelGemm& g, int64_t j, int64_t d0, int64_t depth, float* out) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (g.conv == nullptr && g.b16 == nullptr && g.tb && avx2 && g.n - j * kPackPanel >= kPackPanel) {
    // b [n, k]: the panel's 32 rows of b, 8 x 8 blocks transposed in registers (a column-by-column gather was 8%
    // of a GEMM)
    const float* src = g.b + j * kPackPanel * g.ldb + d0;
    int64_t p = 0;
    for (; p + 8 <= depth; p += 8) {
      for (int64_t q = 0; q < kPackPanel; q += 8) Transpose8x8(src + q * g.ldb + p, g.ldb, out + p * kPackPanel + q);
    }
    for (; p < depth; ++p) {
      for (int64_t q = 0; q < kPackPanel; ++q) out[p * kPackPanel + q] = src[q * g.ldb + p];
    }
    return;
  }
  if (g.conv != nullptr) {
    PackConvPanel(*g.conv, j, d0, depth, out);
    return;
  }
  const int64_t c0 = j * kPackPanel, cols = std::min(kPackPanel, g.n - c0);
  for (int64_t p = 0; p < depth; ++p) {
    float* row = out + p * kPackPanel;
    if (g.b16 != nullptr && g.tb) {
      for (int64_t q = 0; q < cols; ++q) row[q] = HalfToFloat(g.b16[(c0 + q) * g.ldb + d0 + p], g.bf16);
    } else if (g.b16 != nullptr) {
      Convert(g.b16 + (d0 + p) * g.ldb + c0, row, cols, g.bf16);
    } else if (g.tb) {
      for (int64_t q = 0; q < cols; ++q) row[q] = g.b[(c0 + q) * g.ldb + d0 + p];
    } else {
      CopyShort(row, g.b + (d0 + p) * g.ldb + c0, cols);
    }
    std::fill(row + cols, row + kPackPanel, 0.0f);
  }
}

/*! \brief c[MR x 16 NV] (= or +=) a register tile's sums, the columns masked by \a m0 / \a m1. */
template <int MR, int NV>
__attribute__((target("avx512f"), always_inline)) inline void StoreTile512(__m512 (&acc)[MR][NV], float* c,
                                                                          int64_t ldc, __mmask16 m0, __mmask16 m1,
                                                                          bool accumulate) {
  const __mmask16 masks[2] = {m0, m1};
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    for (int v = 0; v < NV; ++v) {
      if (accumulate) acc[i][v] = _mm512_add_ps(acc[i][v], _mm512_maskz_loadu_ps(masks[v], ci + 16 * v));
      _mm512_mask_storeu_ps(ci + 16 * v, masks[v], acc[i][v]);
    }
  }
}

/*! \brief c[MR x 16 NV] (= or +=) a[MR, k0:k1] @ the first 16 NV columns of panel[k0:k1] with AVX-512 (NV = 1:
 *  a last panel of at most 16 columns, whose zero half is not multiplied); \a m0/\a m1 mask the stored columns. */
template <int MR, int NV>
__attribute__((target("avx512f"))) inline void PackedTile512(const float* a, int64_t lda, const float* bp,
                                                            int64_t depth, float* c, int64_t ldc, __mmask16 m0,
                                                            __mmask16 m1, bool accumulate) {
  static_assert(NV == 1 || NV == 2);
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < depth; ++p) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(bp + p * kPackPanel + 16 * v);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + p]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, b[v], acc[i][v]);
    }
  }
  StoreTile512<MR, NV>(acc, c, ldc, m0, m1, accumulate);
}

/*! \brief A [depth, kPackPanel] slice of 16-bit panel as the dot-product tiles read it: rows 2q and 2q + 1
 *  interleaved, [ceil(depth / 2), kPackPanel, 2] (an odd depth's last pair completed with zeros). */
__attribute__((target("avx512f,avx512bw"))) void PairRows(const uint16_t* rows, int64_t depth, uint16_t* out) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  static_assert(kPackPanel == 32, "a panel row is one zmm of 16-bit values");
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t p = 0; p < depth; p += 2) {
    const __m512i r0 = _mm512_loadu_si512(rows + p * kPackPanel);
    const __m512i r1 = p + 1 < depth ? _mm512_loadu_si512(rows + (p + 1) * kPackPanel) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + p * kPackPanel, _mm512_permutex2var_epi16(r0, lo, r1));
    _mm512_storeu_si512(out + p * kPackPanel + kPackPanel, _mm512_permutex2var_epi16(r0, hi, r1));
  }
}

/*! \brief c[MR x 16 NV] (= or +=) bfloat16 a[MR, :depth] @ a paired slice (PairRows) with ``vdpbf16ps``: per pair
 *  of k, a row's two values broadcast as one 32-bit lane, each lane of b holding the pair of its column; float32
 *  sums (an odd depth's last value paired with a zero, never with what follows it in a). */
template <int MR, int NV>
__attribute__((target("avx512f,avx512bf16"))) inline void PairedTile512(const uint16_t* a, int64_t lda,
                                                                       const uint16_t* bp, int64_t depth, float* c,
                                                                       int64_t ldc, __mmask16 m0, __mmask16 m1,
                                                                       bool accumulate) {
  static_assert(NV == 1 || NV == 2);
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  const int64_t pairs = (depth + 1) / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const bool last = 2 * q + 1 == depth;  // an odd depth's last value: its pair's other half is zero
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(bp + q * 2 * kPackPanel + 32 * v);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      uint32_t pair = a[i * lda + 2 * q];
      if (!last) std::memcpy(&pair, a + i * lda + 2 * q, 4);
      const __m512bh ai = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, reinterpret_cast<__m512bh>(b[v]));
    }
  }
  StoreTile512<MR, NV>(acc, c, ldc, m0, m1, accumulate);
}

template <int MR, int NV>
inline void Tile512(const float* a, int64_t lda, const float* bp, int64_t depth, float* c, int64_t ldc,
                    __mmask16 m0, __mmask16 m1, bool accumulate) {
  PackedTile512<MR, NV>(a, lda, bp, depth, c, ldc, m0, m1, accumulate);
}

template <int MR, int NV>
inline void Tile512(const uint16_t* a, int64_t lda, const uint16_t* bp, int64_t depth, float* c, int64_t ldc,
                    __mmask16 m0, __mmask16 m1, bool accumulate) {
  PairedTile512<MR, NV>(a, lda, bp, depth, c, ldc, m0, m1, accumulate);
}

/*! \brief c[MR x cols] (= or +=) a[MR, :depth] @ half a panel (16 columns, \a cols of them real) with AVX2. */
template <int MR>
__attribute__((target("avx2,fma"))) inline void PackedTile256(const float* a, int64_t lda, const float* bp,
                                                             int64_t depth, float* c, int64_t ldc, int64_t cols,
                                                             bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < depth; ++p) {
    const __m256 b0 = _mm256_loadu_ps(bp + p * kPackPanel), b1 = _mm256_loadu_ps(bp + p * kPackPanel + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + p);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  alignas(32) float row[16];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(row, acc[i][0]);
    _mm256_store_ps(row + 8, acc[i][1]);
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < cols; ++j) ci[j] = accumulate ? ci[j] + row[j] : row[j];
  }
}

/*! \brief The plain-loop tile (CPUs without AVX2, and BMC_CPU_NO_AVX2). */
void PackedTilePlain(const float* a, int64_t lda, int64_t rows, const float* bp, int64_t depth, float* c,
                     int64_t ldc, int64_t cols, bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    float acc[kPackPanel] = {};
    for (int64_t p = 0; p < depth; ++p) {
      const float ai = a[i * lda + p];
      for (int64_t j = 0; j < kPackPanel; ++j) acc[j] += ai * bp[p * kPackPanel + j];
    }
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < cols; ++j) ci[j] = accumulate ? ci[j] + acc[j] : acc[j];
  }
}

/*! \brief c[rows, panel cols] (= or +=) a[rows, depth] @ one panel's depth slice, MR rows at a time. */
template <PackedIsa Isa>
void PackedRows(const float* a, int64_t lda, int64_t rows, const float* bp, int64_t depth, float* c, int64_t ldc,
                int64_t cols, bool accumulate);

/*! \brief The AVX-512 rows of PackedRows: float32 a and panels, or bfloat16 a and paired panels (PairRows). */
template <typename T>
void Rows512(const T* a, int64_t lda, int64_t rows, const T* bp, int64_t depth, float* c, int64_t ldc, int64_t cols,
             bool accumulate) {
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  // 12-row tiles; a remainder under 8 rows shares the last 12 with it as two tiles of 7-10 rows (a tile of few rows
  // loads almost as much as it multiplies: 64 rows run as 4 x 12 + 2 x 8, not 5 x 12 + 4)
  const int64_t rem = rows % 12, full = rows / 12 - (rem > 0 && rem < 8 && rows > 12);
  const auto run = [&](auto nv) {
    constexpr int kNv = decltype(nv)::value;
    for (int64_t t = 0; t < full; ++t) {
      Tile512<12, kNv>(a + 12 * t * lda, lda, bp, depth, c + 12 * t * ldc, ldc, m0, m1, accumulate);
    }
    const auto tile = [&](int64_t i, int64_t r) {
      const T* ai = a + i * lda;
      float* ci = c + i * ldc;
      switch (r) {
#define BMC_TILE512(R) \
  case R: Tile512<R, kNv>(ai, lda, bp, depth, ci, ldc, m0, m1, accumulate); break;
        BMC_TILE512(1) BMC_TILE512(2) BMC_TILE512(3) BMC_TILE512(4) BMC_TILE512(5) BMC_TILE512(6)
        BMC_TILE512(7) BMC_TILE512(8) BMC_TILE512(9) BMC_TILE512(10) BMC_TILE512(11)
#undef BMC_TILE512
        default: break;
      }
    };
    const int64_t left = rows - 12 * full;  // 0-11 rows, or 13-19 to split in two
    if (left > 12) {
      tile(12 * full, left - left / 2);
      tile(12 * full + left - left / 2, left / 2);
    } else {
      tile(12 * full, left);
    }
  };
  if (cols > 16) {
    run(std::integral_constant<int, 2>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

template <>
void PackedRows<PackedIsa::kAvx512>(const float* a, int64_t lda, int64_t rows, const float* bp, int64_t depth,
                                    float* c, int64_t ldc, int64_t cols, bool accumulate) {
  Rows512(a, lda, rows, bp, depth, c, ldc, cols, accumulate);
}

template <>
void PackedRows<PackedIsa::kAvx2>(const float* a, int64_t lda, int64_t rows, const float* bp, int64_t depth,
                                  float* c, int64_t ldc, int64_t cols, bool accumulate) {
  for (int64_t h = 0; h < 2 && 16 * h < cols; ++h) {
    const float* bh = bp + 16 * h;
    float* ch = c + 16 * h;
    const int64_t w = std::min<int64_t>(16, cols - 16 * h);
    int64_t i = 0;
    for (; i + 6 <= rows; i += 6) PackedTile256<6>(a + i * lda, lda, bh, depth, ch + i * ldc, ldc, w, accumulate);
    const float* ai = a + i * lda;
    float* ci = ch + i * ldc;
    switch (rows - i) {
#define BMC_TILE256(R) \
  case R: PackedTile256<R>(ai, lda, bh, depth, ci, ldc, w, accumulate); break;
      BMC_TILE256(1) BMC_TILE256(2) BMC_TILE256(3) BMC_TILE256(4) BMC_TILE256(5)
#undef BMC_TILE256
      default: break;
    }
  }
}

template <>
void PackedRows<PackedIsa::kPlain>(const float* a, int64_t lda, int64_t rows, const float* bp, int64_t depth,
                                   float* c, int64_t ldc, int64_t cols, bool accumulate) {
  PackedTilePlain(a, lda, rows, bp, depth, c, ldc, cols, accumulate);
}

/*! \brief Rows \a d ... d + depth of 16-bit panel \a j of b as [depth, kPackPanel]: in place when b is packed,
 *  else gathered from b (zero-padded) into \a buffer. */
const uint16_t* Slice16(const PanelGemm& g, int64_t j, int64_t d, int64_t depth, std::vector<uint16_t>& buffer) {
  if (g.bp16 != nullptr) return g.bp16 + (j * g.k + d) * kPackPanel;
  const int64_t c0 = j * kPackPanel, cols = std::min(kPackPanel, g.n - c0);
  buffer.assign(static_cast<size_t>(depth * kPackPanel), 0);
  for (int64_t p = 0; p < depth; ++p) {
    uint16_t* row = buffer.data() + p * kPackPanel;
    if (g.tb) {
      for (int64_t q = 0; q < cols; ++q) row[q] = g.b16[(c0 + q) * g.ldb + d + p];
    } else {
      std::memcpy(row, g.b16 + (d + p) * g.ldb + c0, sizeof(uint16_t) * cols);
    }
  }
  return buffer.data();
}

/*! \brief c = a @ b on panels (see above). The threads split the panels (contiguous ranges; or, with fewer
 *  panels than threads, the rows, in whole register tiles). A thread runs its rows in blocks of kPackedRowBytes of
 *  a (kept in its L2 across its panels) when b is packed, and packs each of its panels once otherwise. */
template <PackedIsa Isa>
void PanelGemmRun(const PanelGemm& g) {
  const int64_t panels = (g.n + kPackPanel - 1) / kPackPanel;
  const int64_t depth = std::min(g.k, kPackedDepth);
  const int64_t block = std::max<int64_t>(1, kPackedRowBytes / (4 * std::max<int64_t>(depth, 1)) / 12) * 12;
  const auto body = [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    thread_local std::vector<float> buffer;
    const auto run = [&](int64_t b0, int64_t b1, int64_t j, const auto* panel, int64_t d) {
      const int64_t cols = std::min(kPackPanel, g.n - j * kPackPanel), depth = std::min(kPackedDepth, g.k - d);
      float* c = g.c + b0 * g.ldc + j * kPackPanel;
      if (g.k == 0) {
        for (int64_t i = 0; i < b1 - b0; ++i) std::fill(c + i * g.ldc, c + i * g.ldc + cols, 0.0f);
      } else if constexpr (std::is_same_v<std::decay_t<decltype(*panel)>, uint16_t>) {  // paired bfloat16
        Rows512(g.a16 + b0 * g.lda + d, g.lda, b1 - b0, panel, depth, c, g.ldc, cols, d > 0);
      } else {
        PackedRows<Isa>(g.a + b0 * g.lda + d, g.lda, b1 - b0, panel, depth, c, g.ldc, cols, d > 0);
      }
      if (g.ep != nullptr && d + kPackedDepth >= g.k) {  // the block's sums are final (and still in cache)
        ApplyEpilogue(*g.ep, g.c, g.ldc, b0, b1 - b0, j * kPackPanel, cols);
      }
    };
    for (int64_t d = 0; d < std::max<int64_t>(g.k, 1); d += kPackedDepth) {
      if (g.a16 != nullptr) {  // bfloat16 dot products on each slice of b's panels, paired
        thread_local std::vector<uint16_t> pairs, gathered;
        const int64_t depth = std::min(kPackedDepth, g.k - d);
        for (int64_t j = j0; j < j1; ++j) {
          pairs.resize(static_cast<size_t>((depth + 1) / 2 * 2 * kPackPanel));
          PairRows(Slice16(g, j, d, depth, gathered), depth, pairs.data());
          for (int64_t b0 = r0; b0 < r1; b0 += block) run(b0, std::min(r1, b0 + block), j, pairs.data(), d);
        }
        continue;
      }
      if (g.bp16 != nullptr) {  // a contiguous [depth, 32] slice of 16-bit panel: one vector conversion
        const int64_t depth = std::min(kPackedDepth, g.k - d);
        for (int64_t j = j0; j < j1; ++j) {
          buffer.resize(static_cast<size_t>(depth * kPackPanel));
          if (g.k > 0) Convert(g.bp16 + (j * g.k + d) * kPackPanel, buffer.data(), depth * kPackPanel, g.bf16);
          for (int64_t b0 = r0; b0 < r1; b0 += block) run(b0, std::min(r1, b0 + block), j, buffer.data(), d);
        }
        continue;
      }
      if (g.bp != nullptr) {
        for (int64_t b0 = r0; b0 < r1; b0 += block) {
          for (int64_t j = j0; j < j1; ++j) run(b0, std::min(r1, b0 + block), j, g.bp + (j * g.k + d) * kPackPanel, d);
        }
        continue;
      }
      for (int64_t j = j0; j < j1; ++j) {
        buffer.resize(static_cast<size_t>(std::min(kPackedDepth, g.k - d) * kPackPanel));
        if (g.k > 0) PackPanelF32(g, j, d, std::min(kPackedDepth, g.k - d), buffer.data());
        for (int64_t b0 = r0; b0 < r1; b0 += block) run(b0, std::min(r1, b0 + block), j, buffer.data(), d);
      }
    }
  };
  // a thread per ~1 MFLOP of work at least (a launch costs a few microseconds). Each thread takes as many whole
  // panels as every thread can, and a share (whole row tiles) of the panels left over: 7 panels on 2 threads ran
  // as 4 + 3 (a 14 x 14 map's convolutions kept one core idle a quarter of the time)
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(kernel_threads.load(), g.m * g.n * g.k >> 19));
  const int64_t each = panels / threads, share = ((g.m + 11) / 12 + threads - 1) / threads * 12;
  ParallelRows(threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (each > 0) body(0, g.m, t * each, (t + 1) * each);
      const int64_t r0 = std::min(g.m, t * share), r1 = std::min(g.m, r0 + share);
      if (each * threads < panels && r0 < r1) body(r0, r1, each * threads, panels);
    }
  }, threads);
}

void RunPanelGemm(const PanelGemm& g) {
  switch (PanelIsa()) {
    case PackedIsa::kAvx512: PanelGemmRun<PackedIsa::kAvx512>(g); break;
    case PackedIsa::kAvx2: PanelGemmRun<PackedIsa::kAvx2>(g); break;
    default: PanelGemmRun<PackedIsa::kPlain>(g); break;
  }
}

/*! \brief c = a @ op(b) with the panel kernels when the CPU has AVX2 (else false: the BLAS runs it). */
bool PanelSgemm(bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                float* c, int64_t ldc) {
  if (PanelIsa() == PackedIsa::kPlain) return false;
  RunPanelGemm(PanelGemm{a, lda, nullptr, b, ldb, tb, c, ldc, m, n, k});
  return true;
}

bool PanelConv(int64_t m, int64_t n, int64_t k, const float* a, const float* b, const ConvCols* cols, float* c,
               const Epilogue* ep) {
  if (PanelIsa() == PackedIsa::kPlain || (cols == nullptr && m <= kSkinnyRows)) return false;
  PanelGemm g{a, k, nullptr, b, n, false, c, n, m, n, k, cols};
  g.ep = ep;
  RunPanelGemm(g);
  return true;
}

}  // namespace

/*! \brief dlopen \a path (normally already loaded by numpy: the same handle) and resolve the two GEMMs. */
ffi::String BlasBind(ffi::String path, ffi::String sgemm, ffi::String dgemm, bool int64) {
  std::lock_guard<std::mutex> lock(bind_mutex);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    TVM_FFI_THROW(RuntimeError) << "blas_bind: cannot dlopen " << path << ": " << dlerror();
  }
  auto* blas = new Blas();  // never freed: kernels may run on other threads until the process exits
  blas->sgemm = dlsym(handle, sgemm.c_str());
  blas->dgemm = dlsym(handle, dgemm.c_str());
  blas->int64 = int64;
  blas->path = std::string(path);
  if (blas->sgemm == nullptr || blas->dgemm == nullptr) {
    std::string missing = blas->sgemm == nullptr ? std::string(sgemm) : std::string(dgemm);
    delete blas;
    TVM_FFI_THROW(RuntimeError) << "blas_bind: " << path << " has no symbol " << missing;
  }
  bound.store(blas, std::memory_order_release);
  return ffi::String(blas->path);
}

/*! \brief The bound BLAS library's path, or "" when none is bound yet. */
ffi::String BlasBound() {
  const Blas* blas = bound.load(std::memory_order_acquire);
  return ffi::String(blas == nullptr ? std::string() : blas->path);
}

/*! \brief This thread's float32 buffer \a slot of at least \a n elements, uninitialized; kept for the next call
 *  (a fresh one costs page faults and zeroing: 15% of a bfloat16 model's time) up to kScratchKeep elements. */
float* Scratch(int slot, int64_t n) {
  constexpr int64_t kScratchKeep = int64_t(1) << 22;  // 16 MiB per slot
  thread_local std::unique_ptr<float[]> kept[4];
  thread_local int64_t size[4] = {};
  thread_local std::unique_ptr<float[]> once[4];
  if (n > kScratchKeep) {
    once[slot].reset(new float[n]);
    return once[slot].get();
  }
  once[slot].reset();
  if (size[slot] < n) {
    kept[slot].reset(new float[n]);
    size[slot] = n;
  }
  return kept[slot].get();
}

/*!
 * \brief 16-bit operands when b is one matrix shared by every batch and a is not transposed (a weight): a widened
 *        once; b read in its 16-bit values by the few-row kernels, widened panel by panel as the panel GEMM packs
 *        it, or (CPUs without AVX2) kHalfPanel columns of the product at a time, each one GEMM into its columns of
 *        the result. So no float32 copy of the weight is ever whole. False (nothing done) for other shapes.
 */
bool HalfPanels(const Blas& blas, const ffi::TensorView& a, const ffi::TensorView& b, bool ta, bool tb,
                const ffi::TensorView& out, bool bf16) {
  constexpr int64_t kHalfPanel = 512;
  Operand A = Describe(a, true), B = Describe(b, false);
  if (ta || !B.batch.empty() || b.ndim() < 2) return false;
  int64_t m = Prod(A.batch) * A.rows, k = A.cols, n = tb ? B.rows : B.cols;
  if ((tb ? B.cols : B.rows) != k || out.numel() != m * n || m == 0 || n == 0 || k == 0) return false;
  // (the bfloat16 dot-product tiles read a as it is: no float32 copy of it)
  const bool dot = bf16 && m > kSkinnyRows && Bf16Dot();  // (Bf16Dot implies the AVX-512 panel tiles)
  float* wa = dot ? nullptr : Scratch(0, m * k);
  if (!dot) ConvertAll(Data<uint16_t>(a), wa, m * k, bf16);
  const uint16_t* wb = Data<uint16_t>(b);
  bool narrow = IsHalf(out.dtype());
  if (m <= kSkinnyRows) {  // a decoding step: the few-row kernels read b's 16-bit values themselves
    float* c = narrow ? Scratch(2, m * n) : Data<float>(out);
    bool done = bf16 ? SkinnyGemm(tb, m, n, k, wa, k, reinterpret_cast<const Bf16*>(wb), tb ? k : n, c, n)
                     : SkinnyGemm(tb, m, n, k, wa, k, reinterpret_cast<const F16*>(wb), tb ? k : n, c, n);
    if (done) {
      if (narrow) ConvertAll(c, Data<uint16_t>(out), m * n, bf16);
      return true;
    }
  }
  if (PanelIsa() != PackedIsa::kPlain) {  // the panel GEMM widens b's panels as it packs them (or pairs them)
    float* c = narrow ? Scratch(2, m * n) : Data<float>(out);
    PanelGemm g{wa, k, nullptr, nullptr, tb ? k : n, tb, c, n, m, n, k};
    g.b16 = wb;
    g.bf16 = bf16;
    if (dot) g.a16 = Data<uint16_t>(a);
    RunPanelGemm(g);
    if (narrow) ConvertAll(c, Data<uint16_t>(out), m * n, bf16);
    return true;
  }
  for (int64_t n0 = 0; n0 < n; n0 += kHalfPanel) {
    int64_t np = std::min(kHalfPanel, n - n0);
    float* panel = Scratch(1, k * np);
    if (tb) {  // rows n0.. of b [N, K]: contiguous
      ConvertAll(wb + n0 * k, panel, np * k, bf16);
    } else {  // columns n0.. of b [K, N]: a [K, np] panel
      ParallelRows(k, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) Convert(wb + r * n + n0, panel + r * np, np, bf16);
      }, k * np >= 4 * kConvertChunk ? INT64_MAX : 1);
    }
    float* c = narrow ? Scratch(2, m * np) : Data<float>(out) + n0;
    Gemm<float>(blas, false, tb, m, np, k, wa, k, panel, tb ? k : np, c, narrow ? np : n);
    if (narrow) {
      uint16_t* dst = Data<uint16_t>(out) + n0;
      ParallelRows(m, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) Convert(c + r * np, dst + r * n, np, bf16);
      }, m * np >= 4 * kConvertChunk ? INT64_MAX : 1);
    }
  }
  return true;
}

void CpuMatmul(ffi::TensorView a, ffi::TensorView b, int64_t trans_a, int64_t trans_b, ffi::TensorView out) {
  const Blas& blas = GetBlas();
  DLDataType dt = out.dtype();
  if (IsHalf(a.dtype())) {  // float16/bfloat16 operands: widened to float32 (float32 accumulation)
    DLDataType ht = a.dtype();
    bool bf16 = ht.code == kDLBfloat;
    if (!(IsHalf(dt) && dt.code == ht.code) && !(dt.code == kDLFloat && dt.bits == 32 && dt.lanes == 1)) {
      TVM_FFI_THROW(TypeError) << "cpu_matmul: " << ffi::DLDataTypeToString(ht) << " operands need a float32 or "
                               << ffi::DLDataTypeToString(ht) << " result, got " << ffi::DLDataTypeToString(dt);
    }
    CheckOperand(out, dt, "out");
    CheckOperand(a, ht, "a");
    CheckOperand(b, ht, "b");
    if (HalfPanels(blas, a, b, trans_a != 0, trans_b != 0, out, bf16)) return;
    float* wa = Scratch(0, a.numel());
    float* wb = Scratch(1, b.numel());
    ConvertAll(Data<uint16_t>(a), wa, a.numel(), bf16);
    ConvertAll(Data<uint16_t>(b), wb, b.numel(), bf16);
    float* c = IsHalf(dt) ? Scratch(2, out.numel()) : Data<float>(out);
    MatmulImpl<float>(blas, a, b, trans_a != 0, trans_b != 0, out, wa, wb, c);
    if (IsHalf(dt)) ConvertAll(c, Data<uint16_t>(out), out.numel(), bf16);
    return;
  }
  if (dt.code != kDLFloat || (dt.bits != 32 && dt.bits != 64) || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << "cpu_matmul: only float32/float64, got "
                             << ffi::DLDataTypeToString(dt);
  }
  CheckOperand(out, dt, "out");
  CheckOperand(a, dt, "a");
  CheckOperand(b, dt, "b");
  if (dt.bits == 32) {
    MatmulImpl<float>(blas, a, b, trans_a != 0, trans_b != 0, out, Data<float>(a), Data<float>(b), Data<float>(out));
  } else {
    MatmulImpl<double>(blas, a, b, trans_a != 0, trans_b != 0, out, Data<double>(a), Data<double>(b),
                       Data<double>(out));
  }
}

/*! \brief out[s] = x[s] @ w[idx[s]] (w[idx[s]].T with \a trans) of x [S, K], w [E, K, N] ([E, N, K]) and int32/int64
 *  idx [S] (a mixture of experts' expert layer): the rows routed to each expert gathered into one block (a counting
 *  sort), one GEMM per expert with its weight where it lies, the results put back in their rows; a row whose index
 *  lies outside [0, E) is zero (rows routed to another device's experts). float32, or float16/bfloat16 x, w and
 *  out: the rows widened, float32 accumulation, each result rounded once; an expert's 16-bit weight read as it is
 *  by the few-row kernels, widened for more rows. */
void CpuGatherMatmul(ffi::TensorView x, ffi::TensorView w, ffi::TensorView idx, int64_t trans, ffi::TensorView out) {
  const DLDataType f32{kDLFloat, 32, 1};
  const bool half = IsHalf(x.dtype()), bf16 = x.dtype().code == kDLBfloat;
  const DLDataType dt = half ? x.dtype() : f32;
  CheckOperand(x, dt, "x");
  CheckOperand(w, dt, "w");
  CheckOperand(out, dt, "out");
  const DLDataType it = idx.dtype();
  if (it.code != kDLInt || (it.bits != 32 && it.bits != 64) || it.lanes != 1 ||
      idx.device().device_type != kDLCPU || !idx.IsContiguous()) {
    TVM_FFI_THROW(TypeError) << "cpu_gather_matmul: the indices must be int32 or int64 on the CPU";
  }
  if (x.ndim() != 2 || w.ndim() != 3 || idx.ndim() != 1 || out.ndim() != 2) {
    TVM_FFI_THROW(ValueError) << "cpu_gather_matmul: x must be [S, K], w [E, K, N] or [E, N, K], idx [S]";
  }
  const int64_t s = Dim(x, 0), k = Dim(x, 1), e = Dim(w, 0), n = trans ? Dim(w, 1) : Dim(w, 2);
  if ((trans ? Dim(w, 2) : Dim(w, 1)) != k || Dim(idx, 0) != s || Dim(out, 0) != s || Dim(out, 1) != n) {
    TVM_FFI_THROW(ValueError) << "cpu_gather_matmul: shapes do not fit x [" << s << ", " << k << "] and out ["
                              << s << ", " << n << "]";
  }
  std::vector<int64_t> expert(s), start(e + 1, 0), order(s);
  for (int64_t r = 0; r < s; ++r) {
    const int64_t v = it.bits == 64 ? Data<int64_t>(idx)[r] : Data<int32_t>(idx)[r];
    expert[r] = v >= 0 && v < e ? v : -1;
    if (expert[r] >= 0) ++start[expert[r] + 1];
  }
  for (int64_t j = 0; j < e; ++j) start[j + 1] += start[j];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  const int64_t size = half ? 2 : 4;  // bytes a value (+0.0 is all zero bits in every type here)
  char* C = static_cast<char*>(out.data_ptr());
  for (int64_t r = 0; r < s; ++r) {
    if (expert[r] >= 0) {
      order[next[expert[r]]++] = r;
    } else {
      std::memset(C + r * n * size, 0, n * size);
    }
  }
  const int64_t routed = start[e];
  if (routed == 0 || n == 0) return;
  float* xs = Scratch(0, routed * k);
  float* cs = Scratch(2, routed * n);
  for (int64_t i = 0; i < routed; ++i) {
    if (half) {
      Convert(Data<uint16_t>(x) + order[i] * k, xs + i * k, k, bf16);
    } else {
      std::copy(Data<float>(x) + order[i] * k, Data<float>(x) + (order[i] + 1) * k, xs + i * k);
    }
  }
  const Blas& blas = GetBlas();
  const int64_t ldb = trans ? k : n;
  for (int64_t j = 0; j < e; ++j) {
    const int64_t rows = start[j + 1] - start[j];
    float* c = cs + start[j] * n;
    if (rows == 0) continue;
    if (k == 0) {
      std::fill(c, c + rows * n, 0.0f);
      continue;
    }
    const float* a = xs + start[j] * k;
    if (!half) {
      Gemm<float>(blas, false, trans != 0, rows, n, k, a, k, Data<float>(w) + j * k * n, ldb, c, n);
      continue;
    }
    const uint16_t* wj = Data<uint16_t>(w) + j * k * n;
    const bool done = bf16 ? SkinnyGemm(trans != 0, rows, n, k, a, k, reinterpret_cast<const Bf16*>(wj), ldb, c, n)
                           : SkinnyGemm(trans != 0, rows, n, k, a, k, reinterpret_cast<const F16*>(wj), ldb, c, n);
    if (!done) {
      float* wide = Scratch(1, k * n);
      ConvertAll(wj, wide, k * n, bf16);
      Gemm<float>(blas, false, trans != 0, rows, n, k, a, k, wide, ldb, c, n);
    }
  }
  for (int64_t i = 0; i < routed; ++i) {
    if (half) {
      Convert(cs + i * n, reinterpret_cast<uint16_t*>(C) + order[i] * n, n, bf16);
    } else {
      std::copy(cs + i * n, cs + (i + 1) * n, reinterpret_cast<float*>(C) + order[i] * n);
    }
  }
}

/*! \brief \a out [ceil(N / 32), K, 32] = the weight \a w [K, N] (or, with \a trans, [N, K]) in panels: float32,
 *  or float16/bfloat16 kept 16-bit (the panel GEMM widens a slice of a panel as it uses it). */
void CpuPackWeight(ffi::TensorView w, int64_t trans, ffi::TensorView out) {
  const DLDataType f32{kDLFloat, 32, 1};
  const bool half = IsHalf(w.dtype());
  CheckOperand(w, half ? w.dtype() : f32, "w");
  CheckOperand(out, half ? w.dtype() : f32, "out");
  if (w.ndim() != 2) TVM_FFI_THROW(ValueError) << "cpu_pack_weight: the weight must be 2-D";
  const int64_t k = trans ? Dim(w, 1) : Dim(w, 0), n = trans ? Dim(w, 0) : Dim(w, 1);
  const int64_t panels = (n + kPackPanel - 1) / kPackPanel;
  if (out.ndim() != 3 || Dim(out, 0) != panels || Dim(out, 1) != k || Dim(out, 2) != kPackPanel) {
    TVM_FFI_THROW(ValueError) << "cpu_pack_weight: out must be [" << panels << ", " << k << ", " << kPackPanel << "]";
  }
  if (half) {
    const uint16_t* src = Data<uint16_t>(w);
    uint16_t* dst = Data<uint16_t>(out);
    ParallelRows(panels, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t c0 = j * kPackPanel, cols = std::min(kPackPanel, n - c0);
        uint16_t* panel = dst + j * k * kPackPanel;
        for (int64_t p = 0; p < k; ++p) {
          uint16_t* row = panel + p * kPackPanel;
          for (int64_t q = 0; q < cols; ++q) row[q] = trans ? src[(c0 + q) * k + p] : src[p * n + c0 + q];
          std::fill(row + cols, row + kPackPanel, uint16_t(0));
        }
      }
    });
    return;
  }
  const PanelGemm g{nullptr, 0, nullptr, Data<float>(w), trans ? k : n, trans != 0, nullptr, 0, 0, n, k};
  float* dst = Data<float>(out);
  ParallelRows(panels, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) PackPanelF32(g, j, 0, k, dst + j * k * kPackPanel);
  });
}

/*! \brief \a out [..., M, N] = \a a [..., M, K] @ the weight packed by cpu_pack_weight (\a wp, N = \a n columns):
 *  float32, or 16-bit a and panels (float32 accumulation) with a float32 or 16-bit result. */
void CpuMatmulPacked(ffi::TensorView a, ffi::TensorView wp, int64_t n, ffi::TensorView out) {
  const DLDataType f32{kDLFloat, 32, 1};
  const bool half = IsHalf(wp.dtype());
  CheckOperand(a, half ? wp.dtype() : f32, "a");
  CheckOperand(wp, half ? wp.dtype() : f32, "the packed weight");
  const bool narrow = half && IsHalf(out.dtype());
  CheckOperand(out, narrow ? wp.dtype() : f32, "out");
  bool fits = a.ndim() >= 1 && out.ndim() == a.ndim() && wp.ndim() == 3 && Dim(out, -1) == n &&
              Dim(wp, 0) == (n + kPackPanel - 1) / kPackPanel && Dim(wp, 1) == Dim(a, -1) && Dim(wp, 2) == kPackPanel;
  int64_t m = 1;
  for (int i = 0; fits && i + 1 < a.ndim(); ++i) {
    fits = Dim(a, i) == Dim(out, i);
    m *= Dim(a, i);
  }
  if (!fits) {
    TVM_FFI_THROW(ValueError) << "cpu_matmul_packed: a [..., M, K], a weight packed as [ceil(N/32), K, 32] and out "
                                 "[..., M, N] do not fit (N = " << n << ")";
  }
  const int64_t k = Dim(a, -1);
  if (!half) {
    RunPanelGemm(PanelGemm{Data<float>(a), k, Data<float>(wp), nullptr, 0, false, Data<float>(out), n, m, n, k});
    return;
  }
  const bool bf16 = wp.dtype().code == kDLBfloat, dot = bf16 && k > 0 && Bf16Dot();
  float* wa = dot ? nullptr : Scratch(0, m * k);
  if (!dot) ConvertAll(Data<uint16_t>(a), wa, m * k, bf16);
  float* c = narrow ? Scratch(2, m * n) : Data<float>(out);
  PanelGemm g{wa, k, nullptr, nullptr, 0, false, c, n, m, n, k};
  g.bp16 = Data<uint16_t>(wp);
  g.bf16 = bf16;
  if (dot) g.a16 = Data<uint16_t>(a);
  RunPanelGemm(g);
  if (narrow) ConvertAll(c, Data<uint16_t>(out), m * n, bf16);
}

void CpuConv2d(ffi::TensorView x, ffi::TensorView w, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb,
               int64_t pr, int64_t dh, int64_t dw, int64_t groups, ffi::TensorView out) {
  const Blas& blas = GetBlas();
  DLDataType dt = out.dtype();
  if (IsHalf(x.dtype())) {  // float16/bfloat16 input and weight, float32 result: both widened to float32
    DLDataType f32{kDLFloat, 32, 1};
    CheckOperand(out, f32, "out");
    CheckOperand(x, x.dtype(), "x");
    CheckOperand(w, x.dtype(), "w");
    bool bf16 = x.dtype().code == kDLBfloat;
    float* wx = Scratch(0, x.numel());
    float* ww = Scratch(1, w.numel());
    ConvertAll(Data<uint16_t>(x), wx, x.numel(), bf16);
    ConvertAll(Data<uint16_t>(w), ww, w.numel(), bf16);
    Conv2dImpl<float>(blas, x, w, sh, sw, pt, pl, pb, pr, dh, dw, groups, out, wx, ww, Data<float>(out));
    return;
  }
  if (dt.code != kDLFloat || (dt.bits != 32 && dt.bits != 64) || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << "cpu_conv2d: only float32/float64, got " << ffi::DLDataTypeToString(dt);
  }
  CheckOperand(out, dt, "out");
  CheckOperand(x, dt, "x");
  CheckOperand(w, dt, "w");
  if (dt.bits == 32) {
    Conv2dImpl<float>(blas, x, w, sh, sw, pt, pl, pb, pr, dh, dw, groups, out, Data<float>(x), Data<float>(w),
                      Data<float>(out));
  } else {
    Conv2dImpl<double>(blas, x, w, sh, sw, pt, pl, pb, pr, dh, dw, groups, out, Data<double>(x), Data<double>(w),
                       Data<double>(out));
  }
}

/*! \brief NCDHW x OIDHW float32 cross-correlation (\a st, \a dil: depth, height, width; \a pads: front, top, left,
 *  back, bottom, right): per image, the volume zero-padded once, then each group's column matrix (a ConvCols with a
 *  depth) on the panel GEMM, as a 2-D convolution's; a 1x1x1 stride-1 unpadded one multiplies the image itself.
 *  Without AVX2 (or for a pointwise one of at most 8 output channels a group), im2col + the BLAS. */
void Conv3dImpl(const ffi::TensorView& tx, const ffi::TensorView& tw, const int64_t (&st)[3],
                const int64_t (&pads)[6], const int64_t (&dil)[3], int64_t g, const ffi::TensorView& tout,
                const float* x, const float* w, float* out) {
  if (tx.ndim() != 5 || tw.ndim() != 5 || tout.ndim() != 5) {
    TVM_FFI_THROW(ValueError) << "cpu_conv3d: x, w and out must be 5-D (NCDHW, OIDHW)";
  }
  const int64_t n = Dim(tx, 0), c = Dim(tx, 1), m = Dim(tw, 0), cg = Dim(tw, 1);
  int64_t in[3], k3[3], o3[3], p3[3];
  for (int i = 0; i < 3; ++i) {
    in[i] = Dim(tx, 2 + i);
    k3[i] = Dim(tw, 2 + i);
    p3[i] = in[i] + pads[i] + pads[3 + i];
    if (st[i] < 1 || dil[i] < 1 || pads[i] < 0 || pads[3 + i] < 0) {
      TVM_FFI_THROW(ValueError) << "cpu_conv3d: a stride or dilation < 1, or a negative pad";
    }
    o3[i] = (p3[i] - dil[i] * (k3[i] - 1) - 1) / st[i] + 1;
  }
  if (g < 1 || c != cg * g || m % g != 0) {
    TVM_FFI_THROW(ValueError) << "cpu_conv3d: channels " << c << " and " << m << " do not fit groups " << g;
  }
  if (Dim(tout, 0) != n || Dim(tout, 1) != m || Dim(tout, 2) != o3[0] || Dim(tout, 3) != o3[1] ||
      Dim(tout, 4) != o3[2]) {
    TVM_FFI_THROW(ValueError) << "cpu_conv3d: out must be [" << n << ", " << m << ", " << o3[0] << ", " << o3[1]
                              << ", " << o3[2] << "]";
  }
  const int64_t mg = m / g, taps = k3[0] * k3[1] * k3[2], k = cg * taps, pixels = o3[0] * o3[1] * o3[2];
  const int64_t volume = in[0] * in[1] * in[2], padded_volume = p3[0] * p3[1] * p3[2];
  const bool direct = taps == 1 && st[0] == 1 && st[1] == 1 && st[2] == 1 &&
                      std::all_of(pads, pads + 6, [](int64_t v) { return v == 0; });
  thread_local std::vector<float> padded, scratch;
  for (int64_t b = 0; b < n; ++b) {
    const float* xb = x + b * c * volume;
    if (!direct) {  // the zero-padded volume [c, dp, hp, wp]: every tap's rows are plain copies
      padded.resize(static_cast<size_t>(c * padded_volume));
      float* dst = padded.data();
      ParallelRows(c * p3[0], [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t ch = q / p3[0], z = q % p3[0] - pads[0];
          float* plane = dst + q * p3[1] * p3[2];
          if (z < 0 || z >= in[0]) {
            std::fill(plane, plane + p3[1] * p3[2], 0.0f);
          } else {
            PadPlane(xb + (ch * in[0] + z) * in[1] * in[2], in[1], in[2], pads[1], pads[2], p3[1], p3[2], plane);
          }
        }
      }, c * padded_volume / (int64_t{1} << 16) + 1);
      xb = padded.data();
    }
    const auto group = [&, xb, b](int64_t gi) {
      ConvCols cols{xb + gi * cg * padded_volume, cg, p3[1], p3[2], k3[1], k3[2], st[1], st[2], dil[1], dil[2],
                    o3[1], o3[2]};
      cols.d = p3[0], cols.kd = k3[0], cols.sd = st[0], cols.dd = dil[0], cols.od = o3[0];
      return PanelConv(mg, pixels, k, w + gi * mg * k, direct ? xb + gi * cg * volume : nullptr,
                       direct ? nullptr : &cols, out + (b * m + gi * mg) * pixels, nullptr);
    };
    if (ConvGroups(g, mg * pixels * k, group)) continue;
    const float* col = xb;  // im2col of each group into scratch, then the BLAS
    if (!direct) scratch.resize(static_cast<size_t>(k * pixels));
    for (int64_t gi = 0; gi < g; ++gi) {
      if (!direct) {
        for (int64_t row = 0; row < k; ++row) {
          const int64_t ch = gi * cg + row / taps, kz = row % taps / (k3[1] * k3[2]);
          const int64_t i = row % (k3[1] * k3[2]) / k3[2], j = row % k3[2];
          float* dst = scratch.data() + row * pixels;
          for (int64_t z = 0; z < o3[0]; ++z) {
            for (int64_t r = 0; r < o3[1]; ++r) {
              const float* src = xb + ((ch * p3[0] + z * st[0] + kz * dil[0]) * p3[1] + r * st[1] + i * dil[1]) *
                                 p3[2] + j * dil[2];
              for (int64_t q = 0; q < o3[2]; ++q) *dst++ = src[q * st[2]];
            }
          }
        }
        col = scratch.data();
      } else {
        col = xb + gi * cg * volume;
      }
      Gemm<float>(GetBlas(), false, false, mg, pixels, k, w + gi * mg * k, k, col, pixels,
                  out + (b * m + gi * mg) * pixels, pixels);
    }
  }
}

void CpuConv3d(ffi::TensorView x, ffi::TensorView w, int64_t sd, int64_t sh, int64_t sw, int64_t pf, int64_t pt,
               int64_t pl, int64_t pk, int64_t pb, int64_t pr, int64_t dd, int64_t dh, int64_t dw, int64_t groups,
               ffi::TensorView out) {
  const DLDataType f32{kDLFloat, 32, 1};
  CheckOperand(out, f32, "out");
  CheckOperand(x, x.dtype(), "x");
  CheckOperand(w, x.dtype(), "w");
  const int64_t st[3] = {sd, sh, sw}, pads[6] = {pf, pt, pl, pk, pb, pr}, dil[3] = {dd, dh, dw};
  if (IsHalf(x.dtype())) {  // float16/bfloat16 input and weight, float32 result: both widened to float32
    const bool bf16 = x.dtype().code == kDLBfloat;
    float* wx = Scratch(0, x.numel());
    float* ww = Scratch(1, w.numel());
    ConvertAll(Data<uint16_t>(x), wx, x.numel(), bf16);
    ConvertAll(Data<uint16_t>(w), ww, w.numel(), bf16);
    Conv3dImpl(x, w, st, pads, dil, groups, out, wx, ww, Data<float>(out));
    return;
  }
  CheckOperand(x, f32, "x");
  Conv3dImpl(x, w, st, pads, dil, groups, out, Data<float>(x), Data<float>(w), Data<float>(out));
}

/*! \brief cpu_conv2d_fused and cpu_conv2d_fused_act: the operands checked, \a ep completed with them, the conv. */
void Conv2dFused(const char* what, ffi::TensorView x, ffi::TensorView w, ffi::TensorView scale,
                 ffi::TensorView shift, ffi::TensorView residual, Epilogue ep, int64_t sh, int64_t sw, int64_t pt,
                 int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw, int64_t groups, ffi::TensorView out) {
  const DLDataType f32{kDLFloat, 32, 1};
  for (const auto& [t, name] : {std::pair{&x, "x"}, {&w, "w"}, {&scale, "scale"}, {&shift, "shift"},
                                {&residual, "residual"}, {&out, "out"}}) {
    CheckOperand(*t, f32, name);
  }
  const int64_t m = out.ndim() == 4 ? Dim(out, 1) : 0;
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, {&shift, "shift"}}) {
    if (t->numel() != 0 && (t->ndim() != 1 || t->numel() != m)) {
      TVM_FFI_THROW(ValueError) << what << ": " << name << " must be [" << m << "] (one per output channel) or empty";
    }
  }
  if (residual.numel() != 0 && residual.numel() != out.numel()) {
    TVM_FFI_THROW(ValueError) << what << ": residual must have out's shape or be empty";
  }
  ep.scale = scale.numel() ? Data<float>(scale) : nullptr;
  ep.shift = shift.numel() ? Data<float>(shift) : nullptr;
  ep.residual = residual.numel() ? Data<float>(residual) : nullptr;
  ep.ldr = out.ndim() == 4 ? Dim(out, 2) * Dim(out, 3) : 0;
  Conv2dImpl<float>(GetBlas(), x, w, sh, sw, pt, pl, pb, pr, dh, dw, groups, out, Data<float>(x), Data<float>(w),
                    Data<float>(out), ep);
}

void CpuConv2dFused(ffi::TensorView x, ffi::TensorView w, ffi::TensorView scale, ffi::TensorView shift,
                    ffi::TensorView residual, bool relu, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb,
                    int64_t pr, int64_t dh, int64_t dw, int64_t groups, ffi::TensorView out) {
  Epilogue ep;
  if (relu) {
    ep.act = Activation::kClamp;
    ep.lo = 0.0f;
  }
  Conv2dFused("cpu_conv2d_fused", x, w, scale, shift, residual, ep, sh, sw, pt, pl, pb, pr, dh, dw, groups, out);
}

void CpuConv2dFusedAct(ffi::TensorView x, ffi::TensorView w, ffi::TensorView scale, ffi::TensorView shift,
                       ffi::TensorView residual, int64_t act, double lo, double hi, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw, int64_t groups,
                       ffi::TensorView out) {
  if (act < 0 || act > static_cast<int64_t>(Activation::kHardSwish)) {
    TVM_FFI_THROW(ValueError) << "cpu_conv2d_fused_act: unknown activation " << act
                              << " (0 none, 1 clamp, 2 silu, 3 hardswish)";
  }
  Epilogue ep;
  ep.act = static_cast<Activation>(act);
  ep.lo = static_cast<float>(lo);
  ep.hi = static_cast<float>(hi);
  Conv2dFused("cpu_conv2d_fused_act", x, w, scale, shift, residual, ep, sh, sw, pt, pl, pb, pr, dh, dw, groups,
              out);
}

void CpuMatmulNBits(ffi::TensorView a, ffi::TensorView codes, ffi::TensorView scales, ffi::TensorView out) {
  MatmulNBitsImpl(a, codes, scales, nullptr, out);
}

void CpuMatmulNBitsZp(ffi::TensorView a, ffi::TensorView codes, ffi::TensorView scales, ffi::TensorView zp,
                      ffi::TensorView out) {
  MatmulNBitsImpl(a, codes, scales, &zp, out);
}

void CpuMatmulInteger(ffi::TensorView a, ffi::TensorView bt, ffi::TensorView a_zp, ffi::TensorView b_zp,
                      ffi::TensorView out) {
  MatmulIntegerImpl(a, bt, a_zp, b_zp, out);
}

void CpuPackInt8Weight(ffi::TensorView bt, ffi::TensorView out) { PackInt8Weight(bt, out); }

void CpuMatmulIntegerPacked(ffi::TensorView a, ffi::TensorView bp, ffi::TensorView a_zp, ffi::TensorView b_zp,
                            int64_t n, ffi::TensorView out) {
  MatmulIntegerPackedImpl(a, bp, a_zp, b_zp, n, out);
}

void CpuAttention(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, double scale, int64_t transpose_k,
                  ffi::TensorView out) {
  AttentionImpl(q, k, v, nullptr, scale, transpose_k != 0, out);
}

void CpuAttentionBias(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, ffi::TensorView bias, double scale,
                      int64_t transpose_k, ffi::TensorView out) {
  AttentionImpl(q, k, v, &bias, scale, transpose_k != 0, out);
}

void CpuAttentionLse(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, double scale, int64_t transpose_k,
                     ffi::TensorView out, ffi::TensorView lse) {
  AttentionImpl(q, k, v, nullptr, scale, transpose_k != 0, out, &lse);
}

void CpuAttentionBiasLse(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, ffi::TensorView bias,
                         double scale, int64_t transpose_k, ffi::TensorView out, ffi::TensorView lse) {
  AttentionImpl(q, k, v, &bias, scale, transpose_k != 0, out, &lse);
}

void CpuAttentionSoftcap(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, ffi::TensorView bias, double scale,
                         double softcap, int64_t transpose_k, ffi::TensorView out) {
  AttentionImpl(q, k, v, &bias, scale, transpose_k != 0, out, nullptr, softcap);
}

void CpuAttentionSoftcapLse(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, ffi::TensorView bias,
                            double scale, double softcap, int64_t transpose_k, ffi::TensorView out,
                            ffi::TensorView lse) {
  AttentionImpl(q, k, v, &bias, scale, transpose_k != 0, out, &lse, softcap);
}

/*! \brief min, max and whether a NaN is among \a x[0:n]: 16 lanes at a time (AVX-512), else plain loops. */
struct Extremes {
  float lo = INFINITY, hi = -INFINITY;
  bool nan = false;
};

__attribute__((target("avx512f"))) Extremes ExtremesAvx512(const float* x, int64_t n) {
  __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY), lo2 = lo, hi2 = hi;
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // two chains each (the min/max latency)
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    lo = _mm512_min_ps(lo, a), hi = _mm512_max_ps(hi, a), lo2 = _mm512_min_ps(lo2, b), hi2 = _mm512_max_ps(hi2, b);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(m, x + i);
    lo = _mm512_mask_min_ps(lo, m, lo, a), hi = _mm512_mask_max_ps(hi, m, hi, a);
    nan |= _mm512_mask_cmp_ps_mask(m, a, a, _CMP_UNORD_Q);
  }
  return {_mm512_reduce_min_ps(_mm512_min_ps(lo, lo2)), _mm512_reduce_max_ps(_mm512_max_ps(hi, hi2)), nan != 0};
}

Extremes ExtremesPlain(const float* x, int64_t n) {
  Extremes e;
  for (int64_t i = 0; i < n; ++i) {
    e.lo = std::min(e.lo, x[i]), e.hi = std::max(e.hi, x[i]);
    e.nan |= std::isnan(x[i]);
  }
  return e;
}

/*! \brief ``out = [min(x), max(x)]`` of a float32 tensor in one pass over it, on the kernel threads (a NaN in x
 *  makes both NaN, as numpy's; an empty x gives +inf and -inf): DynamicQuantizeLinear's range, which TVM reduced
 *  twice, each a serial chain of scalar max/min (16-18% of an int8 MLP at 128 rows). */
void CpuMinMax(ffi::TensorView x, ffi::TensorView out) {
  const DLDataType f32{kDLFloat, 32, 1};
  CheckOperand(x, f32, "x");
  CheckOperand(out, f32, "out");
  if (out.numel() != 2) TVM_FFI_THROW(ValueError) << "cpu_minmax: out must have 2 elements";
  static const bool have = __builtin_cpu_supports("avx512f");
  const bool avx512 = have && std::getenv("BMC_CPU_NO_AVX512") == nullptr;
  const int64_t n = x.numel(), chunks = std::max<int64_t>(1, std::min<int64_t>(64, n >> 15));
  std::vector<Extremes> parts(static_cast<size_t>(chunks));
  const float* data = Data<float>(x);
  ParallelRows(chunks, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
      parts[c] = avx512 ? ExtremesAvx512(data + lo, hi - lo) : ExtremesPlain(data + lo, hi - lo);
    }
  });
  Extremes e;
  for (const Extremes& p : parts) e.lo = std::min(e.lo, p.lo), e.hi = std::max(e.hi, p.hi), e.nan |= p.nan;
  float* o = Data<float>(out);
  o[0] = e.nan ? NAN : e.lo;
  o[1] = e.nan ? NAN : e.hi;
}

/*! \brief Threads of the 4-bit and integer matmuls (BLAS sizes its own pool). */
void SetKernelThreads(int64_t n) { kernel_threads.store(static_cast<int>(std::max<int64_t>(1, n))); }

}  // namespace native
}  // namespace bmc

// Module functions, not globals: several copies of this library (a cached build, a test's fresh build) can be
// loaded into one process without clashing; Python registers the one it uses as the global ``bmc.cpu.matmul``.
TVM_FFI_DLL_EXPORT_TYPED_FUNC(blas_bind, bmc::native::BlasBind);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(blas_bound, bmc::native::BlasBound);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul, bmc::native::CpuMatmul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_conv2d, bmc::native::CpuConv2d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_conv3d, bmc::native::CpuConv3d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_minmax, bmc::native::CpuMinMax);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_conv2d_fused, bmc::native::CpuConv2dFused);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_conv2d_fused_act, bmc::native::CpuConv2dFusedAct);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_pack_weight, bmc::native::CpuPackWeight);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul_packed, bmc::native::CpuMatmulPacked);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul_nbits, bmc::native::CpuMatmulNBits);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul_nbits_zp, bmc::native::CpuMatmulNBitsZp);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul_float8, bmc::native::CpuMatmulFloat8);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_gather_matmul, bmc::native::CpuGatherMatmul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul_integer, bmc::native::CpuMatmulInteger);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_pack_int8_weight, bmc::native::CpuPackInt8Weight);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_matmul_integer_packed, bmc::native::CpuMatmulIntegerPacked);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_attention, bmc::native::CpuAttention);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_attention_bias, bmc::native::CpuAttentionBias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_attention_lse, bmc::native::CpuAttentionLse);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_attention_bias_lse, bmc::native::CpuAttentionBiasLse);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_attention_softcap, bmc::native::CpuAttentionSoftcap);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cpu_attention_softcap_lse, bmc::native::CpuAttentionSoftcapLse);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_kernel_threads, bmc::native::SetKernelThreads);
