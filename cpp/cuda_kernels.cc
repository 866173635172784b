/*!
 * \file cuda_kernels.cc
 * \brief GPU library kernels that bmc's compiled CUDA programs call (``R.call_dps_packed``):
 *        ``libbmc_cuda_kernels``.
 *
 * ``cuda_matmul(a, b, trans_a, trans_b, out)``: numpy ``matmul`` semantics (batched, broadcast batch dims, 1-D
 * operands promoted) on contiguous row-major float32/float16/bfloat16 CUDA tensors (float16/bfloat16 operands may
 * have a float32 result); ``trans_a``/``trans_b`` say the operand is stored with its last two axes swapped. Computed by cuBLAS (``cublasGemmEx`` /
 * ``cublasGemmStridedBatchedEx``, float32 accumulation) on the stream TVM launches its kernels on
 * (``TVMFFIEnvGetStream``), so it is ordered with them without synchronization.
 *
 * Neither cuBLAS nor the CUDA runtime is linked, and no CUDA header is needed to build this file: Python finds
 * ``libcublas.so`` (the ``nvidia-cublas`` wheel that PyTorch/CuPy install, a CUDA toolkit, or ``BMC_CUBLAS``) and
 * the ``libcudart.so`` already loaded by TVM's CUDA runtime, and calls ``cublas_bind(cublas, cudart)``. The few
 * entry points and enum values used below are part of cuBLAS' and CUDA's stable C ABI.
 *
 * ``cuda_attention[_bias](q, k, v, [bias,] scale, transpose_k, out)``: fused float16/bfloat16 attention
 * (``cuda_attention.cuh``, head dim 16, 32, 64 or 128) without the score matrix;
 * ``cuda_attention_softcap(q, k, v, bias, scale, softcap, transpose_k, out)`` with the scaled scores soft-capped
 * before the bias (the bias may be a scalar 0). Its kernels are compiled by nvcc when this
 * library is built (CMakeLists.txt) and embedded here as a fatbin; they are loaded into each device's context with
 * the driver API (``libcuda.so.1``, which TVM's CUDA runtime has loaded already) on first use.
 * ``cuda_attention_image_bytes()`` is 0 when the library was built without nvcc.
 *
 * Module functions only (no tvm-ffi globals), like ``cpu_kernels.cc``: ``bmc.runtime.cuda`` registers the globals
 * ``bmc.cuda.matmul`` and ``bmc.cuda.attention[_bias]``.
 */
#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include "cuda_attention.h"
#include "matmul_shapes.h"

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace bmc {
namespace native {

namespace ffi = tvm::ffi;

namespace {

// cuBLAS / CUDA runtime ABI (cublas_api.h, library_types.h, driver_types.h)
using Handle = void*;
using Stream = void*;
enum { kOpN = 0, kOpT = 1 };                               // cublasOperation_t
enum { kR32F = 0, kR16F = 2, kR16BF = 14 };                 // cudaDataType_t
enum { kCompute32F = 68 };                                  // cublasComputeType_t (CUBLAS_COMPUTE_32F)
enum { kGemmDefault = -1 };                                 // cublasGemmAlgo_t
using CublasCreate = int (*)(Handle*);
using CublasSetStream = int (*)(Handle, Stream);
using CublasGemmEx = int (*)(Handle, int, int, int, int, int, const void*, const void*, int, int, const void*, int,
                             int, const void*, void*, int, int, int, int);
// (handle, op_a, op_b, m, n, k, alpha, A, A type, lda, stride A, B, B type, ldb, stride B, beta, C, C type, ldc,
//  stride C, batch count, compute type, algo)
using CublasGemmStridedBatchedEx = int (*)(Handle, int, int, int, int, int, const void*, const void*, int, int,
                                           int64_t, const void*, int, int, int64_t, const void*, void*, int, int,
                                           int64_t, int, int, int);
using CudaGetDevice = int (*)(int*);
using CudaSetDevice = int (*)(int);
using CudaMemsetAsync = int (*)(void*, int, size_t, Stream);

constexpr int kMaxDevices = 64;

struct Cublas {
  CublasCreate create = nullptr;
  CublasSetStream set_stream = nullptr;
  CublasGemmEx gemm = nullptr;
  CublasGemmStridedBatchedEx gemm_batched = nullptr;
  CudaGetDevice get_device = nullptr;
  CudaSetDevice set_device = nullptr;
  CudaMemsetAsync memset_async = nullptr;
  std::string path;
  Handle handles[kMaxDevices] = {};
  std::mutex mutex;  // guards handle creation
};

std::mutex bind_mutex;
std::atomic<Cublas*> bound{nullptr};

void* Sym(void* lib, const char* name, const std::string& path) {
  void* f = dlsym(lib, name);
  if (f == nullptr) TVM_FFI_THROW(RuntimeError) << "cublas_bind: " << path << " has no symbol " << name;
  return f;
}

/*! \brief The cuBLAS handle of \a device (created on first use, with that device current), bound to \a stream. */
Handle HandleFor(Cublas& c, int device, Stream stream) {
  if (device < 0 || device >= kMaxDevices) TVM_FFI_THROW(ValueError) << "cuda_matmul: device " << device;
  Handle h = c.handles[device];
  if (h == nullptr) {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.handles[device] == nullptr) {
      int previous = 0;
      c.get_device(&previous);
      c.set_device(device);
      int rc = c.create(&c.handles[device]);
      c.set_device(previous);
      if (rc != 0) TVM_FFI_THROW(RuntimeError) << "cublasCreate failed on device " << device << " (status " << rc << ")";
    }
    h = c.handles[device];
  }
  c.set_stream(h, stream);
  return h;
}

void Check(const ffi::TensorView& t, DLDataType want, int device, const char* what) {
  DLDataType dt = t.dtype();
  if (dt.code != want.code || dt.bits != want.bits || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << "cuda_matmul: " << what << " is " << ffi::DLDataTypeToString(dt) << ", expected "
                             << ffi::DLDataTypeToString(want);
  }
  if (t.device().device_type != kDLCUDA || t.device().device_id != device) {
    TVM_FFI_THROW(ValueError) << "cuda_matmul: " << what << " must be on the output's CUDA device";
  }
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << "cuda_matmul: " << what << " must be contiguous";
}

char* Data(const ffi::TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

void CheckStatus(int rc, const char* call) {
  if (rc != 0) TVM_FFI_THROW(RuntimeError) << "cuda_matmul: " << call << " failed (cuBLAS status " << rc << ")";
}

void CheckInt(int64_t v, const char* what) {
  if (v > INT32_MAX) TVM_FFI_THROW(ValueError) << "cuda_matmul: " << what << " " << v << " exceeds cuBLAS' int range";
}

}  // namespace

/*! \brief dlopen cuBLAS and the CUDA runtime (normally already loaded by TVM) and resolve the entry points. */
ffi::String CublasBind(ffi::String cublas_path, ffi::String cudart_path) {
  std::lock_guard<std::mutex> lock(bind_mutex);
  if (Cublas* c = bound.load(std::memory_order_acquire)) return ffi::String(c->path);
  void* lib = dlopen(cublas_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) TVM_FFI_THROW(RuntimeError) << "cublas_bind: cannot dlopen " << cublas_path << ": " << dlerror();
  void* rt = dlopen(cudart_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (rt == nullptr) TVM_FFI_THROW(RuntimeError) << "cublas_bind: cannot dlopen " << cudart_path << ": " << dlerror();
  auto* c = new Cublas();  // never freed: kernels may run until the process exits
  std::string path(cublas_path);
  c->create = reinterpret_cast<CublasCreate>(Sym(lib, "cublasCreate_v2", path));
  c->set_stream = reinterpret_cast<CublasSetStream>(Sym(lib, "cublasSetStream_v2", path));
  c->gemm = reinterpret_cast<CublasGemmEx>(Sym(lib, "cublasGemmEx", path));
  c->gemm_batched = reinterpret_cast<CublasGemmStridedBatchedEx>(Sym(lib, "cublasGemmStridedBatchedEx", path));
  std::string rt_path(cudart_path);
  c->get_device = reinterpret_cast<CudaGetDevice>(Sym(rt, "cudaGetDevice", rt_path));
  c->set_device = reinterpret_cast<CudaSetDevice>(Sym(rt, "cudaSetDevice", rt_path));
  c->memset_async = reinterpret_cast<CudaMemsetAsync>(Sym(rt, "cudaMemsetAsync", rt_path));
  c->path = path;
  bound.store(c, std::memory_order_release);
  return ffi::String(c->path);
}

/*! \brief The bound cuBLAS library's path, or "" when none is bound yet. */
ffi::String CublasBound() {
  Cublas* c = bound.load(std::memory_order_acquire);
  return ffi::String(c == nullptr ? std::string() : c->path);
}

void CudaMatmul(ffi::TensorView a, ffi::TensorView b, int64_t trans_a, int64_t trans_b, ffi::TensorView out) {
  Cublas* c = bound.load(std::memory_order_acquire);
  if (c == nullptr) {
    TVM_FFI_THROW(RuntimeError) << "cuda_matmul: no cuBLAS bound; call cublas_bind first "
                                << "(bmc.runtime.cuda.register_kernels() does)";
  }
  auto type_of = [](DLDataType dt) {
    return dt.lanes != 1                               ? -1
           : dt.code == kDLFloat && dt.bits == 32      ? kR32F
           : dt.code == kDLFloat && dt.bits == 16      ? kR16F
           : dt.code == kDLBfloat && dt.bits == 16     ? kR16BF
                                                       : -1;
  };
  // operands and result of one type, or float16/bfloat16 operands with a float32 result
  DLDataType dt = out.dtype(), in_dt = a.dtype();
  int type = type_of(in_dt), out_type = type_of(dt);
  if (type < 0 || out_type < 0 || (type != out_type && out_type != kR32F)) {
    TVM_FFI_THROW(TypeError) << "cuda_matmul: only float32/float16/bfloat16 (or float16/bfloat16 operands with a "
                             << "float32 result), got " << ffi::DLDataTypeToString(in_dt) << " -> "
                             << ffi::DLDataTypeToString(dt);
  }
  int device = out.device().device_id;
  Check(out, dt, device, "out");
  Check(a, in_dt, device, "a");
  Check(b, in_dt, device, "b");
  bool ta = trans_a != 0, tb = trans_b != 0;
  if ((ta && a.ndim() < 2) || (tb && b.ndim() < 2)) {
    TVM_FFI_THROW(ValueError) << "cuda_matmul: a transposed operand must have rank >= 2";
  }
  Operand A = Describe(a, true), B = Describe(b, false);
  int64_t m = ta ? A.cols : A.rows, k = ta ? A.rows : A.cols;
  int64_t kb = tb ? B.cols : B.rows, n = tb ? B.rows : B.cols;
  if (k != kb) TVM_FFI_THROW(ValueError) << "cuda_matmul: contraction dims differ (" << k << " vs " << kb << ")";
  Batch bt = BroadcastBatch(A, B, "cuda_matmul");
  const std::vector<int64_t>&batch = bt.dims, &sa = bt.sa, &sb = bt.sb;
  size_t nb = batch.size();
  int64_t count = Prod(batch);
  if (out.numel() != count * m * n) {
    TVM_FFI_THROW(ValueError) << "cuda_matmul: out has " << out.numel() << " elements, expected " << count * m * n;
  }
  if (count == 0 || m == 0 || n == 0) return;
  Stream stream = TVMFFIEnvGetStream(kDLCUDA, device);
  size_t elem = in_dt.bits / 8, out_elem = dt.bits / 8;
  if (k == 0) {
    CheckStatus(c->memset_async(Data(out), 0, count * m * n * out_elem, stream), "cudaMemsetAsync");
    return;
  }
  Handle h = HandleFor(*c, device, stream);
  float one = 1.0f, zero = 0.0f;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets (B, A) with m and n swapped; a
  // stored row-major matrix read column-major is its transpose, so the ops stay as given and ld = stored columns.
  int op_b = tb ? kOpT : kOpN, op_a = ta ? kOpT : kOpN;
  int64_t a_mat = A.rows * A.cols, b_mat = B.rows * B.cols;
  int64_t pa = Prod(A.batch), pb = Prod(B.batch);
  if (pb == 1 && !ta && pa == count) {  // one shared b, a not transposed: one GEMM with the batches stacked into M
    CheckInt(count * m, "M");
    CheckInt(n, "N");
    CheckInt(k, "K");
    CheckStatus(c->gemm(h, op_b, op_a, n, count * m, k, &one, Data(b), type, B.cols, Data(a), type, A.cols, &zero,
                        Data(out), out_type, n, kCompute32F, kGemmDefault),
                "cublasGemmEx");
    return;
  }
  CheckInt(m, "M");
  CheckInt(n, "N");
  CheckInt(k, "K");
  CheckInt(count, "batch");
  if ((pa == count || pa == 1) && (pb == count || pb == 1)) {  // uniform strides: one strided-batched call
    CheckStatus(c->gemm_batched(h, op_b, op_a, n, m, k, &one, Data(b), type, B.cols, pb == 1 ? 0 : b_mat, Data(a),
                                type, A.cols, pa == 1 ? 0 : a_mat, &zero, Data(out), out_type, n, m * n, count,
                                kCompute32F, kGemmDefault),
                "cublasGemmStridedBatchedEx");
    return;
  }
  std::vector<int64_t> idx(nb, 0);  // mixed broadcasting ([2,1] x [1,3]): one GEMM per output matrix
  for (int64_t i = 0; i < count; ++i) {
    int64_t oa = 0, ob = 0;
    for (size_t d = 0; d < nb; ++d) {
      oa += idx[d] * sa[d];
      ob += idx[d] * sb[d];
    }
    CheckStatus(c->gemm(h, op_b, op_a, n, m, k, &one, Data(b) + ob * b_mat * elem, type, B.cols,
                        Data(a) + oa * a_mat * elem, type, A.cols, &zero, Data(out) + i * m * n * out_elem,
                        out_type, n, kCompute32F, kGemmDefault),
                "cublasGemmEx");
    for (size_t d = nb; d-- > 0;) {  // odometer increment
      if (++idx[d] < batch[d]) break;
      idx[d] = 0;
    }
  }
}

// ------------------------------------------------------------------------------------------ fused attention

#ifdef BMC_ATTENTION_FATBIN
// the nvcc image of cuda_attention.cu, linked in as read-only data
asm(".section .rodata\n.balign 64\n.global bmc_attention_image_begin\n.hidden bmc_attention_image_begin\n"
    "bmc_attention_image_begin:\n.incbin \"" BMC_ATTENTION_FATBIN "\"\n.global bmc_attention_image_end\n"
    ".hidden bmc_attention_image_end\nbmc_attention_image_end:\n.byte 0\n.previous\n");
extern "C" const char bmc_attention_image_begin[], bmc_attention_image_end[];
#endif

namespace {

// CUDA driver API (cuda.h), a stable C ABI
using CuModuleLoadData = int (*)(void**, const void*);
using CuModuleGetFunction = int (*)(void**, void*, const char*);
using CuFuncSetAttribute = int (*)(void*, int, int);
using CuLaunchKernel = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, Stream,
                               void**, void**);
enum { kMaxDynamicSharedBytes = 8 };  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

constexpr int kAttentionKernelCount = 8;  // [bf16, f16] x attention::kHeadDims
constexpr const char* kAttentionKernels[kAttentionKernelCount] = {
    "bmc_attention_bf16_d16", "bmc_attention_bf16_d32", "bmc_attention_bf16_d64", "bmc_attention_bf16_d128",
    "bmc_attention_f16_d16",  "bmc_attention_f16_d32",  "bmc_attention_f16_d64",  "bmc_attention_f16_d128"};

struct Driver {
  CuModuleLoadData load = nullptr;
  CuModuleGetFunction get_function = nullptr;
  CuFuncSetAttribute set_attribute = nullptr;
  CuLaunchKernel launch = nullptr;
  void* functions[kMaxDevices][kAttentionKernelCount] = {};
  std::mutex mutex;  // guards module loading
};

Driver* GetDriver() {
  static Driver* driver = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) TVM_FFI_THROW(RuntimeError) << "cuda_attention: cannot dlopen libcuda.so.1: " << dlerror();
    auto* d = new Driver();  // never freed, like the cuBLAS binding
    std::string path = "libcuda.so.1";
    d->load = reinterpret_cast<CuModuleLoadData>(Sym(lib, "cuModuleLoadData", path));
    d->get_function = reinterpret_cast<CuModuleGetFunction>(Sym(lib, "cuModuleGetFunction", path));
    d->set_attribute = reinterpret_cast<CuFuncSetAttribute>(Sym(lib, "cuFuncSetAttribute", path));
    d->launch = reinterpret_cast<CuLaunchKernel>(Sym(lib, "cuLaunchKernel", path));
    return d;
  }();
  return driver;
}

size_t AttentionImageBytes() {
#ifdef BMC_ATTENTION_FATBIN
  return static_cast<size_t>(bmc_attention_image_end - bmc_attention_image_begin);
#else
  return 0;
#endif
}

/*! rief Kernel  which of the fatbin in  device's context (the module is loaded there on first use). */
void* AttentionFunction(Cublas& c, int device, int which) {
  Driver* d = GetDriver();
  void* f = d->functions[device][which];
  if (f != nullptr) return f;
  std::lock_guard<std::mutex> lock(d->mutex);
  if (d->functions[device][which] == nullptr) {
#ifdef BMC_ATTENTION_FATBIN
    int previous = 0;
    c.get_device(&previous);
    c.set_device(device);  // makes the device's primary context current
    void* module = nullptr;
    int rc = d->load(&module, bmc_attention_image_begin);
    c.set_device(previous);
    if (rc != 0) {
      TVM_FFI_THROW(RuntimeError) << "cuda_attention: cuModuleLoadData failed (CUDA error " << rc
                                  << "): the embedded kernels have no image for this GPU (built for sm_80/sm_90)";
    }
    for (int i = 0; i < kAttentionKernelCount; ++i) {
      void* fn = nullptr;
      if (d->get_function(&fn, module, kAttentionKernels[i]) != 0) {
        TVM_FFI_THROW(RuntimeError) << "cuda_attention: the fatbin lacks " << kAttentionKernels[i];
      }
      int bytes = static_cast<int>(attention::SharedBytes(attention::kHeadDims[i % 4]));
      rc = d->set_attribute(fn, kMaxDynamicSharedBytes, bytes);
      if (rc != 0) TVM_FFI_THROW(RuntimeError) << "cuda_attention: cannot allow " << bytes << " B of shared memory";
      d->functions[device][i] = fn;
    }
#else
    (void)c;
    TVM_FFI_THROW(RuntimeError) << "cuda_attention: this libbmc_cuda_kernels was built without nvcc, so it has no "
                                << "attention kernels (reinstall bmc with the CUDA toolkit on PATH)";
#endif
  }
  return d->functions[device][which];
}

std::vector<int64_t> Dims(const ffi::TensorView& t) { return std::vector<int64_t>(t.shape().begin(), t.shape().end()); }

void Attention(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, const ffi::TensorView* bias, double scale,
               int64_t transpose_k, ffi::TensorView out, double softcap = 0.0) {
  Cublas* c = bound.load(std::memory_order_acquire);
  if (c == nullptr) TVM_FFI_THROW(RuntimeError) << "cuda_attention: call cublas_bind first";
  DLDataType dt = q.dtype();
  bool bf16 = dt.code == kDLBfloat && dt.bits == 16 && dt.lanes == 1;
  if (!bf16 && !(dt.code == kDLFloat && dt.bits == 16 && dt.lanes == 1)) {
    TVM_FFI_THROW(TypeError) << "cuda_attention: float16 or bfloat16 only, got " << ffi::DLDataTypeToString(dt);
  }
  int device = out.device().device_id;
  Check(out, dt, device, "out");
  Check(q, dt, device, "q");
  Check(k, dt, device, "k");
  Check(v, dt, device, "v");
  if (bias != nullptr) Check(*bias, dt, device, "bias");
  std::vector<int64_t> qs = Dims(q), ks = Dims(k), vs = Dims(v), bs = bias ? Dims(*bias) : std::vector<int64_t>();
  attention::Params p{};
  std::string why = attention::MakeParams(qs.data(), q.ndim(), ks.data(), k.ndim(), vs.data(), v.ndim(), bs.data(),
                                          bias ? bias->ndim() : -1, transpose_k != 0, &p);
  if (!why.empty()) TVM_FFI_THROW(ValueError) << "cuda_attention: " << why;
  if (out.numel() != q.numel()) TVM_FFI_THROW(ValueError) << "cuda_attention: out must have q's shape";
  int64_t d = qs.back(), blocks = p.m_tiles * (q.numel() / (p.m * d));
  if (blocks > INT32_MAX) TVM_FFI_THROW(ValueError) << "cuda_attention: " << blocks << " thread blocks";
  p.q = Data(q);
  p.k = Data(k);
  p.v = Data(v);
  p.bias = bias ? Data(*bias) : nullptr;
  p.out = Data(out);
  p.scale = static_cast<float>(scale);
  if (!(softcap >= 0.0)) TVM_FFI_THROW(ValueError) << "cuda_attention: softcap must be >= 0, got " << softcap;
  p.softcap = static_cast<float>(softcap);
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.out)}) {  // the kernel's 16-byte accesses
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      TVM_FFI_THROW(ValueError) << "cuda_attention: q, k, v and out must be 16-byte aligned";
    }
  }
  void* f = AttentionFunction(*c, device, (bf16 ? 0 : 4) + attention::HeadDimIndex(d));
  c->set_device(device);  // the device's primary context current in this thread, for the driver API launch
  void* args[] = {&p};
  int rc = GetDriver()->launch(f, static_cast<unsigned>(blocks), 1, 1, attention::kThreads, 1, 1,
                               static_cast<unsigned>(attention::SharedBytes(d)),
                               TVMFFIEnvGetStream(kDLCUDA, device), args, nullptr);
  if (rc != 0) TVM_FFI_THROW(RuntimeError) << "cuda_attention: cuLaunchKernel failed (CUDA error " << rc << ")";
}

}  // namespace

int64_t CudaAttentionImageBytes() { return static_cast<int64_t>(AttentionImageBytes()); }

void CudaAttention(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, double scale, int64_t transpose_k,
                   ffi::TensorView out) {
  Attention(q, k, v, nullptr, scale, transpose_k, out);
}

void CudaAttentionBias(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, ffi::TensorView bias, double scale,
                       int64_t transpose_k, ffi::TensorView out) {
  Attention(q, k, v, &bias, scale, transpose_k, out);
}

void CudaAttentionSoftcap(ffi::TensorView q, ffi::TensorView k, ffi::TensorView v, ffi::TensorView bias,
                          double scale, double softcap, int64_t transpose_k, ffi::TensorView out) {
  Attention(q, k, v, &bias, scale, transpose_k, out, softcap);
}

}  // namespace native
}  // namespace bmc

TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_attention, bmc::native::CudaAttention);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_attention_bias, bmc::native::CudaAttentionBias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_attention_softcap, bmc::native::CudaAttentionSoftcap);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_attention_image_bytes, bmc::native::CudaAttentionImageBytes);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cublas_bind, bmc::native::CublasBind);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cublas_bound, bmc::native::CublasBound);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_matmul, bmc::native::CudaMatmul);
