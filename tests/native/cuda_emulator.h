/*!
 * \file cuda_emulator.h
 * \brief Runs bmc's hand-written CUDA kernels on the CPU, for tests on machines without a GPU: the subset of CUDA
 *        they use (1-D blocks, dynamic shared memory, __syncthreads/__syncwarp, __shfl_xor_sync, atomicMax/Min, WMMA
 *        16x16x16, 16-bit floats), with every CUDA thread a fiber (ucontext) of one OS thread. Include it before the kernel.
 *
 * It is an extra check beside the real GPU run (scripts/gpu_check.sh), built to expose the bugs a GPU shows only
 * sometimes:
 *
 * * **Races.** A fiber runs until its next synchronization point, then the next fiber runs (in thread order, or
 *   reversed: ``Launch(..., reverse)``). So a thread reading shared memory that another thread writes without a
 *   barrier in between reads it before that write (or, reversed, after the next one). Shared memory starts as NaN.
 * * **WMMA layouts.** A fragment holds all 256 elements in every thread (the layout is the identity), but
 *   ``store_matrix_sync`` writes from each lane only the elements ``i % 32 == lane``: a lane reading the stored tile
 *   before a ``__syncwarp`` misses the others' part. Pointers must be 32-byte aligned and ``ldm`` a multiple of 16
 *   bytes, as the CUDA programming guide requires; 16-byte vector accesses must be 16-byte aligned.
 * * **Barriers.** A ``__syncthreads`` or ``__syncwarp`` that not every thread (lane) reaches is an error, not a hang.
 */
#ifndef BMC_TESTS_CUDA_EMULATOR_H_
#define BMC_TESTS_CUDA_EMULATOR_H_

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, as the CUDA intrinsic
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fff + ((u >> 16) & 1);
  return {static_cast<uint16_t>(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half(float f) { return {static_cast<_Float16>(f)}; }
inline unsigned short __half_as_ushort(__half h) {
  unsigned short u;
  std::memcpy(&u, &h.v, 2);
  return u;
}

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned tid = 0;
  enum State { kRunnable, kBlockBarrier, kWarpBarrier, kDone } state = kRunnable;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  unsigned char* smem = nullptr;
  double shuffle[1024];  // one slot per thread for __shfl_xor_sync
  std::function<void()> body;
};

inline Block* g_block = nullptr;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;

inline void Fail(const std::string& what) { throw std::runtime_error("cuda emulator: " + what); }

inline void Wait(Fiber::State s) {
  Fiber* f = g_block->current;
  f->state = s;
  swapcontext(&f->ctx, &g_block->scheduler);
}

inline dim3 ThreadIdx() {
  dim3 d;
  d.x = g_block->current->tid;
  return d;
}

inline void Entry() {
  g_block->body();
  g_block->current->state = Fiber::kDone;
  swapcontext(&g_block->current->ctx, &g_block->scheduler);
}

/*! \brief Release the barriers every participant has reached; false when nothing could be released. */
inline bool Release(std::vector<Fiber>& fibers) {
  size_t n = fibers.size(), block = 0, done = 0;
  for (auto& f : fibers) {
    block += f.state == Fiber::kBlockBarrier;
    done += f.state == Fiber::kDone;
  }
  if (block > 0 && block + done == n) {
    if (done > 0) Fail("__syncthreads not reached by every thread of the block");
    for (auto& f : fibers) f.state = Fiber::kRunnable;
    return true;
  }
  bool released = false;
  for (size_t w = 0; w < n; w += 32) {
    size_t lanes = std::min<size_t>(32, n - w), waiting = 0, gone = 0;
    for (size_t l = 0; l < lanes; ++l) {
      waiting += fibers[w + l].state == Fiber::kWarpBarrier;
      gone += fibers[w + l].state == Fiber::kDone;
    }
    if (waiting > 0 && waiting + gone == lanes) {
      if (gone > 0) Fail("__syncwarp (or a warp shuffle) not reached by every lane");
      for (size_t l = 0; l < lanes; ++l) fibers[w + l].state = Fiber::kRunnable;
      released = true;
    }
  }
  return released;
}

inline void Start(Fiber& f, unsigned tid, size_t stack) {
  f.tid = tid;
  f.state = Fiber::kRunnable;
  f.stack.resize(stack);
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, Entry, 0);
}

/*!
 * \brief Run \a body as a kernel of \a grid blocks of \a threads threads (1-D) with \a smem_bytes of dynamic
 *        shared memory, blocks one after another; threads in order, or in reverse order when \a reverse.
 */
inline void Launch(unsigned grid, unsigned threads, size_t smem_bytes, std::function<void()> body, bool reverse) {
  if (threads == 0 || threads > 1024) Fail("block size");
  constexpr size_t kStack = 256 << 10;
  std::vector<unsigned char> smem(smem_bytes + 128);
  unsigned char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  Block block;
  block.body = std::move(body);
  block.fibers.resize(threads);
  g_block = &block;
  g_grid_dim.x = grid;
  g_block_dim.x = threads;
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(base, 0xff, smem_bytes);  // NaN as float and as 16-bit floats
    block.smem = base;
    g_block_idx.x = b;
    for (unsigned t = 0; t < threads; ++t) Start(block.fibers[t], t, kStack);
    for (;;) {
      bool ran = false;
      for (unsigned i = 0; i < threads; ++i) {
        Fiber& f = block.fibers[reverse ? threads - 1 - i : i];
        if (f.state != Fiber::kRunnable) continue;
        block.current = &f;
        swapcontext(&block.scheduler, &f.ctx);
        ran = true;
      }
      bool all_done = true;
      for (auto& f : block.fibers) all_done = all_done && f.state == Fiber::kDone;
      if (all_done) break;
      if (!Release(block.fibers) && !ran) Fail("deadlock: threads wait at barriers that cannot complete");
    }
  }
  g_block = nullptr;
}

template <typename V>
V ShuffleXor(V value, int mask) {
  unsigned t = g_block->current->tid, warp = t / 32 * 32, lane = t % 32;
  g_block->shuffle[t] = static_cast<double>(value);
  Wait(Fiber::kWarpBarrier);  // every lane has deposited its value
  V got = static_cast<V>(g_block->shuffle[warp + (lane ^ mask)]);
  Wait(Fiber::kWarpBarrier);  // every lane has read before the slots are reused
  return got;
}

inline void CheckAligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) Fail(std::string(what) + ": misaligned pointer");
}

}  // namespace emu

#define threadIdx (emu::ThreadIdx())
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)
#define BMC_DYNAMIC_SMEM(name) unsigned char* name = emu::g_block->smem
inline void __syncthreads() { emu::Wait(emu::Fiber::kBlockBarrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::Wait(emu::Fiber::kWarpBarrier); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::ShuffleXor(v, mask); }
inline int atomicMax(int* p, int v) {  // fibers never interleave inside a call: atomic as it is
  int old = *p;
  *p = std::max(old, v);
  return old;
}
inline int atomicMin(int* p, int v) {
  int old = *p;
  *p = std::min(old, v);
  return old;
}
inline uint4 BmcLoad16(const void* p) {
  emu::CheckAligned(p, 16, "16-byte load");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void BmcStore16(void* p, uint4 v) {
  emu::CheckAligned(p, 16, "16-byte store");
  std::memcpy(p, &v, 16);
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  enum { num_elements = 256 };
  T x[256];
};

inline float ToFloat(float v) { return v; }
inline float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float ToFloat(__half v) { return __half2float(v); }

template <typename T>
void CheckOperand(const T* p, unsigned ldm) {
  emu::CheckAligned(p, 32, "wmma load/store");
  if (ldm * sizeof(T) % 16 != 0) emu::Fail("wmma ldm must be a multiple of 16 bytes");
}

template <typename Use, typename T, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T>& f, V v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  CheckOperand(p, ldm);
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = row ? p[r * ldm + c] : p[c * ldm + r];
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  CheckOperand(p, ldm);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  CheckOperand(p, ldm);
  unsigned lane = emu::g_block->current->tid % 32;
  for (int i = static_cast<int>(lane); i < 256; i += 32) {
    int r = i / 16, c = i % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
  }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float fa[256], fb[256], out[256];
  for (int i = 0; i < 256; ++i) {
    fa[i] = ToFloat(a.x[i]);
    fb[i] = ToFloat(b.x[i]);
  }
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) acc += fa[r * 16 + k] * fb[k * 16 + n];
      out[r * 16 + n] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // BMC_TESTS_CUDA_EMULATOR_H_
