// CUDA emulator shim: __half with bit-exact IEEE binary16 conversions (round to nearest even, as
// the hardware's cvt.rn.f16.f32), so kernels read exactly the values torch stored.
#pragma once

#include <cstdint>
#include <cstring>

namespace emu {

inline std::uint16_t float_to_half_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;          // NaN: CUDA's canonical half NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax >= 0x38800000u) {                       // normal half: rebias 127 -> 15, round the 13 dropped bits
    std::uint32_t r = ax - 0x38000000u;
    r += 0x0fffu + ((r >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (r >> 13));
  }
  if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25 rounds to (signed) zero
  // Subnormal half: the value in units of 2^-24 is m * 2^(e - 126), rounded to nearest even.
  const std::uint32_t e = ax >> 23;
  const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - e;  // 14 .. 24
  std::uint32_t q = m >> shift;
  const std::uint32_t rem = m & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<std::uint16_t>(sign | q);
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    std::memcpy(&bits, &mag, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace emu

struct __half {
  std::uint16_t __x;
  __half() = default;
  // cuda_fp16.hpp's implicit conversions (absent only with __CUDA_NO_HALF_CONVERSIONS__).
  __half(float f) : __x(emu::float_to_half_bits(f)) {}
  operator float() const { return emu::half_bits_to_float(__x); }
};
typedef __half half;

inline float __half2float(__half h) { return emu::half_bits_to_float(h.__x); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline std::uint16_t __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(std::uint16_t v) {
  __half h;
  h.__x = v;
  return h;
}
