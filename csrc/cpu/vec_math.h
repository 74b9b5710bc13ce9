// Polynomial sin/cos/exp in plain float arithmetic, written so that GCC/Clang auto-vectorise the
// loops that call them (`#pragma omp simd` with -fopenmp-simd, -O3): no libm calls, no branches,
// no integer division. libtorch's own Vectorized<float>::sin calls Sleef, whose symbols are not
// part of libtorch's public ABI, and an extension built with default flags gets only SSE2 from
// at::vec anyway; a scalar std::sin per element is slower than torch's eager Sleef sin.
//
// Accuracy (checked in tests/kernels/test_native_ops.py against torch.sin/torch.exp):
//   sin/cos: Cody-Waite reduction by pi/2 with Sleef's 4-part split of pi (the first parts have
//            few mantissa bits, so q * part is exact without FMA), then Cephes' sinf/cosf minimax
//            polynomials on [-pi/4, pi/4] (~1 ulp). Valid for |x| <= kTrigFastMax; callers route
//            larger arguments to std::sin (see snake.cpp).
//   exp:     n = round(x log2 e), two-part ln 2, degree-6 Taylor/minimax on [-ln2/2, ln2/2]
//            (Cephes expf), 2^n by building the exponent bits. Input clamped to [-87, 88].
// NOTE: -ffast-math must not be used for these files: the round-to-integer trick below
// ((v + 1.5*2^23) - 1.5*2^23) would be folded away.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define CBRT_INLINE inline __attribute__((always_inline))
#else
#define CBRT_INLINE inline
#endif

// Runtime-dispatched clones of the hot loops: GCC/Clang emit one body per ISA and pick at load
// time (ifunc), so a source build is safe on any x86-64 CPU and still uses AVX2/AVX-512 where
// present. Elsewhere (aarch64: NEON is baseline) the plain -O3 build vectorises.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(CHATTERBOX_RT_NO_TARGET_CLONES)
#define CBRT_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CBRT_TARGET_CLONES
#endif

namespace chatterbox_rt {
namespace vm {

constexpr float kTrigFastMax = 8192.0f;  // Cephes' documented bound for this reduction

CBRT_INLINE float round_to_int(float v) {  // |v| < 2^22; round-half-even, vectorisable
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (v + magic) - magic;
}

// x = q pi/2 + r, |r| <= pi/4, with q kept as a float (integer valued). Everything below is
// branch-free arithmetic: the quadrant selects are products with 0/1 flags (exact), because GCC
// does not if-convert a `q & 1 ? cos : sin` select for SSE/AVX2 and then leaves the loop scalar.
CBRT_INLINE float reduce_pio2(float x, float& qf) {
  qf = round_to_int(x * 0.636619772367581343f);  // 2/pi
  // pi/2 = A + B + C + D (Sleef's PI_[ABCD]f halved; exact halvings; q * A, q * B exact)
  float r = x - qf * 1.5703125f;
  r = r - qf * 4.8351287841796875e-4f;
  r = r - qf * 3.1385570764541625976e-7f;
  r = r - qf * 6.0771006282767103812e-11f;
  return r;
}

CBRT_INLINE float sin_poly(float r) {  // |r| <= pi/4 (Cephes sinf)
  const float z = r * r;
  float p = -1.9515295891e-4f;
  p = p * z + 8.3321608736e-3f;
  p = p * z - 1.6666654611e-1f;
  return p * z * r + r;
}

CBRT_INLINE float cos_poly(float r) {  // |r| <= pi/4 (Cephes cosf)
  const float z = r * r;
  float p = 2.443315711809948e-5f;
  p = p * z - 1.388731625493765e-3f;
  p = p * z + 4.166664568298827e-2f;
  return p * z * z - 0.5f * z + 1.0f;
}

// q mod 4 = m in {0, 1, 2, 3} as flags: odd = m & 1, high = m >> 1 (no ties in these roundings).
CBRT_INLINE void quadrant_flags(float qf, float& odd, float& high) {
  const float m = qf - 4.0f * round_to_int(qf * 0.25f - 0.375f);
  high = round_to_int(m * 0.5f - 0.25f);
  odd = m - 2.0f * high;
}

CBRT_INLINE float sin_square(float x) {  // sin(x)^2 from a ~1 ulp sin(x); sin^2 needs no sign
  float qf;
  const float r = reduce_pio2(x, qf);
  const float odd = qf - 2.0f * round_to_int(qf * 0.5f - 0.25f);  // q & 1 (|q| < 2^22)
  const float s = sin_poly(r) * (1.0f - odd) + cos_poly(r) * odd;
  return s * s;
}

CBRT_INLINE void sincos(float x, float& s, float& c) {
  float qf, odd, high;
  const float r = reduce_pio2(x, qf);
  quadrant_flags(qf, odd, high);
  const float sp = sin_poly(r), cp = cos_poly(r);
  // sin/cos(r + q pi/2): quadrants 0..3 -> (s, c), (c, -s), (-s, -c), (-c, s)
  const float c_neg = high + odd - 2.0f * high * odd;  // quadrants 1, 2
  s = (sp * (1.0f - odd) + cp * odd) * (1.0f - 2.0f * high);
  c = (cp * (1.0f - odd) + sp * odd) * (1.0f - 2.0f * c_neg);
}

CBRT_INLINE float sin(float x) {
  float s, c;
  sincos(x, s, c);
  return s;
}

// clamp(x, lo, hi), NaN passes. NOTE: written as a sum of selects against 0 because GCC leaves a
// plain `x < lo ? lo : x` on an inlined argument as control flow, and the whole loop scalar, for
// SSE/AVX2 targets.
CBRT_INLINE float clamp(float x, float lo, float hi) {
  const float inside = (x >= lo && x <= hi) ? x : 0.0f;
  return (x < lo ? lo : 0.0f) + (x > hi ? hi : 0.0f) + inside + (x != x ? x : 0.0f);  // last: NaN
}

CBRT_INLINE float exp(float x) {
  x = clamp(x, -87.0f, 88.0f);
  const float n = round_to_int(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;  // ln 2 = C1 + C2, C1 exact in few bits
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// bfloat16 <-> float on raw bits, vectorisable (c10::BFloat16's conversions are scalar: its
// NaN test is a branch). Same results as c10: widening is exact; narrowing rounds to nearest even,
// NaN becomes the canonical quiet NaN 0x7FC0.
CBRT_TARGET_CLONES inline void bf16_to_f32(const uint16_t* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(in[i]) << 16;
    std::memcpy(&out[i], &u, sizeof(float));
  }
}

CBRT_TARGET_CLONES inline void f32_to_bf16(const float* in, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &in[i], sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t is_nan = static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
    out[i] = static_cast<uint16_t>(rounded + is_nan * (0x7FC0u - rounded));  // select as arithmetic
  }
}

}  // namespace vm
}  // namespace chatterbox_rt
