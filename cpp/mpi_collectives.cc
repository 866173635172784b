/*!
 * \file mpi_collectives.cc
 * \brief bmc's native MPI collectives on DLPack tensors: ``libbmc_mpi_collectives.so``.
 *
 * The compiled SPMD program calls ``bmc.all_reduce | all_gather | reduce_scatter | all_to_all`` with the fixed
 * signature ``(x: Tensor, attrs: str, out: Tensor)``; ``attrs`` is the JSON object the codegen writes
 * (``{"axes": [1], "dim": 0, "group_size": 2, "reduce": "sum", ...}``, sorted keys, ints, int lists and strings
 * only), parsed here by a tiny parser and cached by its text. Semantics are those of
 * ``bmc.ops.collective.GROUP_REFERENCE`` and of the Python implementation in ``bmc/runtime/mpi.py`` (the reference
 * in tests: both give bit-identical outputs because both issue the same MPI operations on the same communicators).
 * float16/bfloat16, which MPI has no type for, are reduced here in float32 and rounded once (the Python side
 * gathers them and adds in the dtype: the same for two members, at most an ulp apart for more).
 *
 * Exported as tvm-ffi *module* functions (no globals, so loading the library twice is harmless);
 * ``bmc.runtime.mpi.load_native`` registers the ``bmc.<kind>`` globals to them:
 *
 * | function | signature | what |
 * |---|---|---|
 * | ``reset`` | ``(world_rank: int, timeout_s: float, check: bool)`` | forget communicators, sequence number 0 |
 * | ``set_comm`` | ``(axes_key: int, fortran_handle: int)`` | the group communicator for a set of mesh axes (from mpi4py ``comm.py2f()``; key: 4 bits per axis, axis+1, in program order) |
 * | ``set_fallback`` | ``(fn)`` | kept for the Python side (unused: unsupported dtypes raise) |
 * | ``seq`` | ``() -> int`` | collectives issued so far |
 * | ``all_reduce`` ... | ``(x, attrs, out)`` | the collectives |
 *
 * Every collective is non-blocking (``MPI_Iallreduce`` ...) and polled with ``MPI_Test`` against a deadline
 * (the watchdog, FAILURES.md 42): on timeout it throws a RuntimeError naming the collective and its sequence number;
 * the Python side prints it as ``[rank k] ...`` and calls ``MPI_Abort``. With ``check`` on, each collective first
 * all-gathers (world rank, seq, kind, crc32(attrs), dtype, shape) in the group and throws when members disagree
 * (FAILURES.md 47) — the same row layout as the Python implementation.
 *
 * MPI is initialised by Python (mpi4py); this library never calls MPI_Init.
 */
#include <mpi.h>
#include <sched.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "float16.h"

namespace bmc {
namespace native {

namespace ffi = tvm::ffi;

namespace {

enum Kind { kAllReduce = 0, kAllGather = 1, kReduceScatter = 2, kAllToAll = 3 };
const char* kKindNames[] = {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"};
enum Reduce { kSum = 0, kMax = 1, kMin = 2, kMean = 3 };

struct Attrs {
  std::vector<int64_t> axes;
  int64_t group_size = 0, dim = 0, split_dim = 0, concat_dim = 0;
  int reduce = kSum;
  int64_t key = 0;         // axes key (4 bits per axis, axis + 1)
  int64_t crc = 0;         // crc32 of the attrs text (order check)
};

struct State {
  int rank = 0;
  double timeout_s = 300.0;
  bool check = false;
  int64_t seq = 0;
  std::unordered_map<int64_t, MPI_Comm> comms;
  std::unordered_map<std::string, Attrs> attrs_cache;
  std::vector<char> stage_in, stage_out, stage_wide;  // reused staging buffers (grow only)
};

State& S() {
  static State s;
  return s;
}

uint32_t Crc32(const std::string& s) {  // zlib's crc32 (the same value as Python's zlib.crc32)
  static uint32_t table[256];
  static bool init = false;
  if (!init) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    init = true;
  }
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char ch : s) c = table[(c ^ ch) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

/*! \brief Parses the flat JSON object the codegen writes: string keys; int, [int, ...] or "string" values. */
Attrs ParseAttrs(const std::string& text) {
  Attrs a;
  size_t i = 0, n = text.size();
  auto fail = [&](const char* why) {
    TVM_FFI_THROW(ValueError) << "bmc collective: cannot parse attrs " << text << ": " << why << " at " << i;
  };
  auto skip = [&]() {
    while (i < n && (text[i] == ' ' || text[i] == '\n' || text[i] == '\t' || text[i] == ',')) ++i;
  };
  auto str = [&]() {
    if (text[i] != '"') fail("expected a string");
    size_t j = text.find('"', i + 1);
    if (j == std::string::npos) fail("unterminated string");
    std::string s = text.substr(i + 1, j - i - 1);
    i = j + 1;
    return s;
  };
  auto integer = [&]() {
    size_t j = i;
    if (j < n && text[j] == '-') ++j;
    while (j < n && text[j] >= '0' && text[j] <= '9') ++j;
    if (j == i) fail("expected an integer");
    int64_t v = std::stoll(text.substr(i, j - i));
    i = j;
    return v;
  };
  skip();
  if (i >= n || text[i] != '{') fail("expected '{'");
  ++i;
  while (true) {
    skip();
    if (i >= n) fail("unterminated object");
    if (text[i] == '}') break;
    std::string key = str();
    skip();
    if (i >= n || text[i] != ':') fail("expected ':'");
    ++i;
    skip();
    if (text[i] == '[') {
      ++i;
      std::vector<int64_t> v;
      while (true) {
        skip();
        if (i >= n) fail("unterminated list");
        if (text[i] == ']') { ++i; break; }
        v.push_back(integer());
      }
      if (key == "axes") a.axes = v;
    } else if (text[i] == '"') {
      std::string v = str();
      if (key == "reduce") {
        if (v == "sum") a.reduce = kSum;
        else if (v == "max") a.reduce = kMax;
        else if (v == "min") a.reduce = kMin;
        else if (v == "mean") a.reduce = kMean;
        else TVM_FFI_THROW(ValueError) << "bmc.all_reduce: unknown reduce " << v;
      }
    } else {
      int64_t v = integer();
      if (key == "group_size") a.group_size = v;
      else if (key == "dim") a.dim = v;
      else if (key == "split_dim") a.split_dim = v;
      else if (key == "concat_dim") a.concat_dim = v;
    }
  }
  for (int64_t ax : a.axes) a.key = a.key * 16 + (ax + 1);
  a.crc = Crc32(text);
  return a;
}

const Attrs& GetAttrs(const std::string& text) {
  auto& cache = S().attrs_cache;
  auto it = cache.find(text);
  if (it != cache.end()) return it->second;
  return cache.emplace(text, ParseAttrs(text)).first->second;
}

/*! \brief The MPI datatype that reduces elements of \a dt, or MPI_DATATYPE_NULL. */
MPI_Datatype ReduceType(DLDataType dt) {
  if (dt.lanes != 1) return MPI_DATATYPE_NULL;
  if (dt.code == kDLFloat && dt.bits == 32) return MPI_FLOAT;
  if (dt.code == kDLFloat && dt.bits == 64) return MPI_DOUBLE;
  if (dt.code == kDLInt) {
    switch (dt.bits) {
      case 8: return MPI_INT8_T;
      case 16: return MPI_INT16_T;
      case 32: return MPI_INT32_T;
      case 64: return MPI_INT64_T;
    }
  }
  if (dt.code == kDLUInt) {
    switch (dt.bits) {
      case 8: return MPI_UINT8_T;
      case 16: return MPI_UINT16_T;
      case 32: return MPI_UINT32_T;
      case 64: return MPI_UINT64_T;
    }
  }
  return MPI_DATATYPE_NULL;
}

std::string DescribeSeq(int64_t seq, int kind, const Attrs& a) {
  std::ostringstream os;
  os << "collective #" << seq << " (" << kKindNames[kind] << " over mesh axes [";
  for (size_t k = 0; k < a.axes.size(); ++k) os << (k ? ", " : "") << a.axes[k];
  os << "]) on rank " << S().rank;
  return os.str();
}

/*! \brief Polls \a req until done or the deadline (the watchdog); yields the core while waiting long. */
void Wait(MPI_Request* req, const std::function<std::string()>& what) {
  using clock = std::chrono::steady_clock;
  auto start = clock::now();
  auto deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(S().timeout_s));
  int done = 0;
  for (int64_t spins = 0;; ++spins) {
    int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) TVM_FFI_THROW(RuntimeError) << what() << ": MPI error " << rc;
    if (done) return;
    if (spins < 64) continue;
    auto now = clock::now();
    if (now > deadline) {
      double waited = std::chrono::duration<double>(now - start).count();
      TVM_FFI_THROW(RuntimeError) << what() << " did not complete within " << waited
                                  << " s: a rank of the group died, is stuck, or issued another collective";
    }
    if (now - start > std::chrono::milliseconds(50)) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    } else {
      sched_yield();
    }
  }
}

MPI_Comm Comm(const Attrs& a, int kind) {
  auto it = S().comms.find(a.key);
  if (it == S().comms.end()) {
    TVM_FFI_THROW(RuntimeError) << "bmc." << kKindNames[kind] << ": no communicator registered for mesh axes key "
                                << a.key << " (set_comm)";
  }
  return it->second;
}

char* Data(const ffi::TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

int64_t Bytes(const ffi::TensorView& t) { return t.numel() * ((t.dtype().bits * t.dtype().lanes + 7) / 8); }

void CheckTensor(const ffi::TensorView& t, int kind, const char* what) {
  if (t.device().device_type != kDLCPU) {
    TVM_FFI_THROW(ValueError) << "bmc." << kKindNames[kind] << ": " << what << " must be on the CPU";
  }
  if (!t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "bmc." << kKindNames[kind] << ": " << what << " must be contiguous";
  }
}

/*! \brief The order check (FAILURES.md 47): all members at the same (seq, kind, attrs, dtype, shape)? */
void CheckOrder(MPI_Comm comm, int64_t seq, int kind, const Attrs& a, const ffi::TensorView& x) {
  int n = 0;
  MPI_Comm_size(comm, &n);
  const int W = 14;
  int64_t row[W] = {0};
  row[0] = S().rank;
  row[1] = seq;
  row[2] = kind;
  row[3] = a.crc;
  row[4] = int64_t(x.dtype().code) * 256 + x.dtype().bits;
  row[5] = std::min<int64_t>(x.ndim(), 8);
  for (int k = 0; k < row[5]; ++k) row[6 + k] = x.shape()[k];
  std::vector<int64_t> rows(static_cast<size_t>(n) * W);
  MPI_Request req;
  MPI_Iallgather(row, W, MPI_INT64_T, rows.data(), W, MPI_INT64_T, comm, &req);
  Wait(&req, [&] { return DescribeSeq(seq, kind, a) + " order check"; });
  bool same = true;
  for (int r = 0; r < n; ++r) {
    for (int k = 1; k < W; ++k) same = same && rows[r * W + k] == row[k];
  }
  if (same) return;
  std::ostringstream os;
  os << "collectives issued in different orders on different ranks (a bug in the program or the runtime): group "
        "over axes [";
  for (size_t k = 0; k < a.axes.size(); ++k) os << (k ? ", " : "") << a.axes[k];
  os << "]: ";
  for (int r = 0; r < n; ++r) {
    const int64_t* q = &rows[r * W];
    os << (r ? "; " : "") << "rank " << q[0] << " at collective #" << q[1] << " "
       << (q[2] >= 0 && q[2] < 4 ? kKindNames[q[2]] : "?") << " shape [";
    for (int k = 0; k < q[5]; ++k) os << (k ? ", " : "") << q[6 + k];
    os << "]";
  }
  TVM_FFI_THROW(RuntimeError) << os.str();
}

struct Call {
  int kind;
  const Attrs& a;
  MPI_Comm comm;
  int n;
  int64_t seq;
  std::function<std::string()> what;
};

Call Begin(int kind, const ffi::TensorView& x, const ffi::String& attrs, const ffi::TensorView& out) {
  CheckTensor(x, kind, "x");
  CheckTensor(out, kind, "out");
  const Attrs& a = GetAttrs(std::string(attrs));
  MPI_Comm comm = Comm(a, kind);
  int n = 0;
  MPI_Comm_size(comm, &n);
  int64_t seq = S().seq++;
  if (S().check) CheckOrder(comm, seq, kind, a, x);
  return Call{kind, a, comm, n, seq, [seq, kind, &a] { return DescribeSeq(seq, kind, a); }};
}

int64_t Norm(int64_t d, int64_t ndim) { return ((d % ndim) + ndim) % ndim; }

int64_t Prod(const ffi::TensorView& t, int64_t from, int64_t to) {
  int64_t p = 1;
  for (int64_t k = from; k < to; ++k) p *= t.shape()[k];
  return p;
}

char* Stage(std::vector<char>& v, int64_t bytes) {
  if (static_cast<int64_t>(v.size()) < bytes) v.resize(bytes);
  return v.data();
}

// Moves blocks: src is [outer][n][chunk] (chunk bytes) -> dst [n][outer][chunk], or the inverse when !forward.
void Transpose(const char* src, char* dst, int64_t outer, int64_t n, int64_t chunk, bool forward) {
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t j = 0; j < n; ++j) {
      const char* s = forward ? src + (o * n + j) * chunk : src + (j * outer + o) * chunk;
      char* d = forward ? dst + (j * outer + o) * chunk : dst + (o * n + j) * chunk;
      std::memcpy(d, s, chunk);
    }
  }
}

/*! \brief A float32 copy of a float16/bfloat16 buffer of \a n elements, in \a stage. */
float* Widened(const char* src, int64_t n, bool bf16, std::vector<char>& stage) {
  float* dst = reinterpret_cast<float*>(Stage(stage, n * 4));
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(h[i], bf16);
  return dst;
}

void Narrowed(const float* src, int64_t n, bool bf16, char* dst) {
  uint16_t* h = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) h[i] = FloatToHalf(src[i], bf16);
}

}  // namespace

void AllReduce(ffi::TensorView x, ffi::String attrs, ffi::TensorView out) {
  Call c = Begin(kAllReduce, x, attrs, out);
  MPI_Op op = c.a.reduce == kMax ? MPI_MAX : c.a.reduce == kMin ? MPI_MIN : MPI_SUM;
  if (IsHalf(x.dtype())) {  // MPI has no 16-bit float: reduced in float32 (one rounding at the end)
    bool bf16 = x.dtype().code == kDLBfloat;
    int64_t m = x.numel();
    float* wide = Widened(Data(x), m, bf16, S().stage_in);
    MPI_Request req;
    MPI_Iallreduce(MPI_IN_PLACE, wide, static_cast<int>(m), MPI_FLOAT, op, c.comm, &req);
    Wait(&req, c.what);
    if (c.a.reduce == kMean) {
      for (int64_t i = 0; i < m; ++i) wide[i] /= static_cast<float>(c.n);
    }
    Narrowed(wide, m, bf16, Data(out));
    return;
  }
  MPI_Datatype dt = ReduceType(x.dtype());
  if (dt == MPI_DATATYPE_NULL) {
    TVM_FFI_THROW(TypeError) << "bmc.all_reduce: dtype " << ffi::DLDataTypeToString(x.dtype())
                             << " is not reduced by the native collectives; use --collectives python";
  }
  const void* send = Data(x) == Data(out) ? MPI_IN_PLACE : Data(x);
  MPI_Request req;
  MPI_Iallreduce(send, Data(out), static_cast<int>(x.numel()), dt, op, c.comm, &req);
  Wait(&req, c.what);
  if (c.a.reduce == kMean) {  // the reference divides the sum by n in the dtype (float) / float64 then truncates (int)
    int64_t m = out.numel();
    DLDataType t = out.dtype();
    if (t.code == kDLFloat && t.bits == 32) {
      float* p = reinterpret_cast<float*>(Data(out));
      float d = static_cast<float>(c.n);
      for (int64_t i = 0; i < m; ++i) p[i] = p[i] / d;
    } else if (t.code == kDLFloat && t.bits == 64) {
      double* p = reinterpret_cast<double*>(Data(out));
      for (int64_t i = 0; i < m; ++i) p[i] = p[i] / static_cast<double>(c.n);
    } else {
      TVM_FFI_THROW(TypeError) << "bmc.all_reduce: mean of " << ffi::DLDataTypeToString(t)
                               << " is not native; use --collectives python";
    }
  }
}

void AllGather(ffi::TensorView x, ffi::String attrs, ffi::TensorView out) {
  Call c = Begin(kAllGather, x, attrs, out);
  int64_t dim = Norm(c.a.dim, x.ndim());
  int64_t bytes = Bytes(x);
  int64_t outer = Prod(x, 0, dim);
  MPI_Request req;
  if (outer == 1) {  // blocks are contiguous in the output
    MPI_Iallgather(Data(x), static_cast<int>(bytes), MPI_BYTE, Data(out), static_cast<int>(bytes), MPI_BYTE, c.comm,
                   &req);
    Wait(&req, c.what);
    return;
  }
  char* stage = Stage(S().stage_out, bytes * c.n);  // [n][outer][chunk] -> out [outer][n][chunk]
  MPI_Iallgather(Data(x), static_cast<int>(bytes), MPI_BYTE, stage, static_cast<int>(bytes), MPI_BYTE, c.comm, &req);
  Wait(&req, c.what);
  Transpose(stage, Data(out), outer, c.n, bytes / outer, /*forward=*/false);
}

void ReduceScatter(ffi::TensorView x, ffi::String attrs, ffi::TensorView out) {
  Call c = Begin(kReduceScatter, x, attrs, out);
  const bool half = IsHalf(x.dtype()), bf16 = x.dtype().code == kDLBfloat;
  MPI_Datatype dt = half ? MPI_FLOAT : ReduceType(x.dtype());  // 16-bit floats: reduced in float32
  if (dt == MPI_DATATYPE_NULL) {
    TVM_FFI_THROW(TypeError) << "bmc.reduce_scatter: dtype " << ffi::DLDataTypeToString(x.dtype())
                             << " is not reduced by the native collectives; use --collectives python";
  }
  int64_t dim = Norm(c.a.dim, x.ndim());
  int64_t outer = Prod(x, 0, dim);
  const char* send = Data(x);
  if (outer != 1) {  // x [outer][n][chunk] -> stage [n][outer][chunk]
    int64_t bytes = Bytes(x);
    char* stage = Stage(S().stage_in, bytes);
    Transpose(Data(x), stage, outer, c.n, bytes / outer / c.n, /*forward=*/true);
    send = stage;
  }
  char* recv = Data(out);
  if (half) {
    send = reinterpret_cast<const char*>(Widened(send, x.numel(), bf16, S().stage_wide));
    recv = Stage(S().stage_out, out.numel() * 4);
  }
  MPI_Request req;
  MPI_Ireduce_scatter_block(send, recv, static_cast<int>(out.numel()), dt, MPI_SUM, c.comm, &req);
  Wait(&req, c.what);
  if (half) Narrowed(reinterpret_cast<const float*>(recv), out.numel(), bf16, Data(out));
}

void AllToAll(ffi::TensorView x, ffi::String attrs, ffi::TensorView out) {
  Call c = Begin(kAllToAll, x, attrs, out);
  int64_t split = Norm(c.a.split_dim, x.ndim()), concat = Norm(c.a.concat_dim, x.ndim());
  int64_t bytes = Bytes(x);
  int64_t block = bytes / c.n;
  int64_t outer_s = Prod(x, 0, split);
  const char* send = Data(x);
  if (outer_s != 1) {  // x [outer][n][chunk] -> [n][outer][chunk]
    char* stage = Stage(S().stage_in, bytes);
    Transpose(Data(x), stage, outer_s, c.n, bytes / outer_s / c.n, /*forward=*/true);
    send = stage;
  }
  int64_t outer_c = Prod(out, 0, concat);
  char* recv = outer_c == 1 ? Data(out) : Stage(S().stage_out, bytes);
  MPI_Request req;
  MPI_Ialltoall(send, static_cast<int>(block), MPI_BYTE, recv, static_cast<int>(block), MPI_BYTE, c.comm, &req);
  Wait(&req, c.what);
  if (outer_c != 1) {  // recv [n][outer_c][chunk] -> out [outer_c][n][chunk]
    Transpose(recv, Data(out), outer_c, c.n, block / outer_c, /*forward=*/false);
  }
}

void Reset(int64_t rank, double timeout_s, bool check) {
  State& s = S();
  s.rank = static_cast<int>(rank);
  s.timeout_s = timeout_s;
  s.check = check;
  s.seq = 0;
  s.comms.clear();
}

void SetComm(int64_t key, int64_t fortran_handle) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) TVM_FFI_THROW(RuntimeError) << "set_comm: MPI is not initialised (import mpi4py.MPI first)";
  S().comms[key] = MPI_Comm_f2c(static_cast<MPI_Fint>(fortran_handle));
}

void SetFallback(ffi::Function) {}

int64_t Seq() { return S().seq; }

}  // namespace native
}  // namespace bmc

TVM_FFI_DLL_EXPORT_TYPED_FUNC(all_reduce, bmc::native::AllReduce);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(all_gather, bmc::native::AllGather);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(reduce_scatter, bmc::native::ReduceScatter);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(all_to_all, bmc::native::AllToAll);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(reset, bmc::native::Reset);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_comm, bmc::native::SetComm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_fallback, bmc::native::SetFallback);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(seq, bmc::native::Seq);
