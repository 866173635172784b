/*!
 * \file attention_emulated.cc
 * \brief Runs the fused CUDA attention kernel (cpp/cuda_attention.cuh) in the CPU emulator (cuda_emulator.h):
 *        ``attention_emulated <dir>`` reads ``case.txt`` and the raw 16-bit ``q.bin k.bin v.bin [bias.bin]`` there
 *        and writes ``out.bin``; tests/codegen/test_cuda_attention.py compares it with numpy.
 *
 * case.txt: ``<bf16|f16> <reverse 0|1> <transpose_k 0|1> <scale> <softcap>`` then, for q, k, v and bias, ``<rank> <dims...>``
 * (bias rank -1: none). Exit 2 with the reason on stderr when the shapes do not fit the kernel.
 */
#include "cuda_emulator.h"
#include "cuda_attention.cuh"

#include <fstream>
#include <iostream>
#include <sstream>

namespace {

std::vector<uint16_t> Read(const std::string& path, size_t n) {
  std::vector<uint16_t> data(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(n * 2));
  if (!f) throw std::runtime_error("cannot read " + std::to_string(n) + " values from " + path);
  return data;
}

std::vector<int64_t> Shape(std::istream& in, int* rank) {
  in >> *rank;
  std::vector<int64_t> dims(*rank > 0 ? *rank : 0);
  for (auto& d : dims) in >> d;
  return dims;
}

size_t Count(const std::vector<int64_t>& dims) {
  size_t n = 1;
  for (auto d : dims) n *= static_cast<size_t>(d);
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace bmc::attention;
  if (argc != 2) {
    std::cerr << "usage: attention_emulated <dir>\n";
    return 1;
  }
  std::string dir = argv[1];
  try {
    std::ifstream spec(dir + "/case.txt");
    std::string dtype;
    int reverse = 0, transpose_k = 0, qr, kr, vr, br;
    float scale = 1.0f, softcap = 0.0f;
    spec >> dtype >> reverse >> transpose_k >> scale >> softcap;
    auto qs = Shape(spec, &qr), ks = Shape(spec, &kr), vs = Shape(spec, &vr), bs = Shape(spec, &br);
    if (!spec) throw std::runtime_error("bad case.txt");
    Params p{};
    std::string why = MakeParams(qs.data(), qr, ks.data(), kr, vs.data(), vr, bs.data(), br, transpose_k, &p);
    if (!why.empty()) {
      std::cerr << why << "\n";
      return 2;
    }
    auto q = Read(dir + "/q.bin", Count(qs)), k = Read(dir + "/k.bin", Count(ks)), v = Read(dir + "/v.bin", Count(vs));
    std::vector<uint16_t> bias = br >= 0 ? Read(dir + "/bias.bin", Count(bs)) : std::vector<uint16_t>();
    std::vector<uint16_t> out(Count(qs), 0xffff);
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.bias = br >= 0 ? bias.data() : nullptr;
    p.out = out.data();
    p.scale = scale;
    p.softcap = softcap;
    int64_t d = qs.back();
    unsigned grid = static_cast<unsigned>(p.m_tiles * static_cast<int64_t>(Count(qs) / (p.m * d)));
    bool bf16 = dtype == "bf16";
    std::function<void()> body = [&] {
      unsigned char* smem = emu::g_block->smem;
      switch (d) {
        case 16: return bf16 ? Attention<__nv_bfloat16, 16>(p, smem) : Attention<__half, 16>(p, smem);
        case 32: return bf16 ? Attention<__nv_bfloat16, 32>(p, smem) : Attention<__half, 32>(p, smem);
        case 64: return bf16 ? Attention<__nv_bfloat16, 64>(p, smem) : Attention<__half, 64>(p, smem);
        default: return bf16 ? Attention<__nv_bfloat16, 128>(p, smem) : Attention<__half, 128>(p, smem);
      }
    };
    emu::Launch(grid, kThreads, SharedBytes(d), body, reverse != 0);
    std::ofstream f(dir + "/out.bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * 2));
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 3;
  }
  return 0;
}
