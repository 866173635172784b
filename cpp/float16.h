/*!
 * \file float16.h
 * \brief The 16-bit float dtypes, and scalar float16 / bfloat16 ↔ float32 conversions (round to nearest even), shared by the CPU kernels (their
 *        fallbacks without F16C) and the MPI collectives (16-bit reductions are computed in float32).
 */
#ifndef BMC_CPP_FLOAT16_H_
#define BMC_CPP_FLOAT16_H_

#include <dlpack/dlpack.h>

#include <cstdint>
#include <cstring>

namespace bmc {
namespace native {

/*! \brief A float16 or bfloat16 scalar type. */
inline bool IsHalf(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 16 && (dt.code == kDLFloat || dt.code == kDLBfloat);
}

/*! \brief float16 (\a bf16: bfloat16) bits → float32. */
inline float HalfToFloat(uint16_t h, bool bf16) {
  if (bf16) {  // the top 16 bits of a float32
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

/*! \brief float32 → float16 (\a bf16: bfloat16) bits, round to nearest even; a NaN stays a (quiet) NaN. */
inline uint16_t FloatToHalf(float f, bool bf16) {
  if (bf16) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

}  // namespace native
}  // namespace bmc

#endif  // BMC_CPP_FLOAT16_H_
