// Weight-only INT8 linear on CPU: out[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
// (x fp32 [M, K], q int8 [N, K], scale fp32 [N], out fp32 [M, N]; the bias is added in Python).
//
// T3's decode multiplies a few rows by every weight, so it is bound by reading the weights; int8
// weights are a quarter of fp32's bytes. ATen's own _weight_int8pack_mm reads ~1 GB/s on the
// 2-core CI VM (a scalar loop per output), so this kernel streams them itself:
//   - parallel over tiles of 4 output channels (at::parallel_for);
//   - per tile and K block of kKB, the 4 weight rows are converted int8 -> fp32 once into an
//     L1-resident buffer, then every x row is multiplied against it (AVX-512 or AVX2 FMA, chosen at
//     run time; a scalar loop elsewhere);
//   - each row's partial sums are reduced per K block in a fixed order that does not depend on M,
//     so a row's result is bit-identical whatever the number of rows (the engine's batch
//     invariance).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../ops.h"

namespace chatterbox_rt {
namespace {

constexpr int64_t kTile = 4;    // output channels per tile
constexpr int64_t kKB = 512;    // K block: 4 x 512 fp32 = 8 KB of converted weights

#if defined(__x86_64__) || defined(_M_X64)
#define CBRT_X86 1
#endif

// dot products of one x block against the 4 converted rows in buf ([4][kb]); n16 = kb rounded down
// to 16. Scalar tail in the same order for every ISA's caller.
inline void tail_dot(const float* x, const float* buf, int64_t from, int64_t kb, float* s) {
  for (int64_t k = from; k < kb; ++k) {
    for (int j = 0; j < kTile; ++j) s[j] += x[k] * buf[j * kKB + k];
  }
}

#ifdef CBRT_X86
__attribute__((target("avx512f"))) void convert_avx512(const int8_t* q, float* out, int64_t kb) {
  int64_t k = 0;
  for (; k + 16 <= kb; k += 16) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    _mm512_storeu_ps(out + k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
  }
  for (; k < kb; ++k) out[k] = static_cast<float>(q[k]);
}

__attribute__((target("avx512f"))) void dot4_avx512(const float* x, const float* buf, int64_t kb, float* s) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= kb; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(buf + k), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(buf + kKB + k), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(buf + 2 * kKB + k), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(buf + 3 * kKB + k), a3);
  }
  s[0] += _mm512_reduce_add_ps(a0);
  s[1] += _mm512_reduce_add_ps(a1);
  s[2] += _mm512_reduce_add_ps(a2);
  s[3] += _mm512_reduce_add_ps(a3);
  tail_dot(x, buf, k, kb, s);
}

__attribute__((target("avx2"))) void convert_avx2(const int8_t* q, float* out, int64_t kb) {
  int64_t k = 0;
  for (; k + 8 <= kb; k += 8) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
    _mm256_storeu_ps(out + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
  }
  for (; k < kb; ++k) out[k] = static_cast<float>(q[k]);
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Two 8-wide accumulators per row, summed as (a + b): 16 lanes per step like the AVX-512 path
// (the two ISAs need not agree bit for bit; one machine always takes the same one).
__attribute__((target("avx2,fma"))) void dot4_avx2(const float* x, const float* buf, int64_t kb, float* s) {
  __m256 a[kTile][2];
  for (int j = 0; j < kTile; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= kb; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int j = 0; j < kTile; ++j) {
      a[j][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(buf + j * kKB + k), a[j][0]);
      a[j][1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(buf + j * kKB + k + 8), a[j][1]);
    }
  }
  for (int j = 0; j < kTile; ++j) s[j] += hsum256(_mm256_add_ps(a[j][0], a[j][1]));
  tail_dot(x, buf, k, kb, s);
}
#endif

void convert_scalar(const int8_t* q, float* out, int64_t kb) {
  for (int64_t k = 0; k < kb; ++k) out[k] = static_cast<float>(q[k]);
}

void dot4_scalar(const float* x, const float* buf, int64_t kb, float* s) { tail_dot(x, buf, 0, kb, s); }

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa pick_isa() {
#ifdef CBRT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

}  // namespace

void int8_linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_int8_linear(out, x, q, scale);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  if (M == 0 || N == 0) return;
  static const Isa isa = pick_isa();
  auto convert = convert_scalar;
  auto dot4 = dot4_scalar;
#ifdef CBRT_X86
  if (isa == Isa::kAvx512) {
    convert = convert_avx512;
    dot4 = dot4_avx512;
  } else if (isa == Isa::kAvx2) {
    convert = convert_avx2;
    dot4 = dot4_avx2;
  }
#endif
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tiles = (N + kTile - 1) / kTile;
  // ~64 KB of weights per task: small enough to spread 1024-row matrices over the cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kTile * K));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(kTile * kKB);
    std::vector<float> acc(static_cast<size_t>(M) * kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      const int64_t rows = std::min(kTile, N - n0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kKB) {
        const int64_t kb = std::min(kKB, K - k0);
        for (int64_t j = 0; j < kTile; ++j) {
          if (j < rows) {
            convert(qp + (n0 + j) * K + k0, buf.data() + j * kKB, kb);
          } else {
            std::memset(buf.data() + j * kKB, 0, sizeof(float) * kb);  // past N: zero rows
          }
        }
        for (int64_t m = 0; m < M; ++m) {
          float s[kTile] = {0.f, 0.f, 0.f, 0.f};
          dot4(xp + m * K + k0, buf.data(), kb, s);
          for (int64_t j = 0; j < kTile; ++j) acc[m * kTile + j] += s[j];
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < rows; ++j) op[m * N + n0 + j] = acc[m * kTile + j] * sp[n0 + j];
      }
    }
  });
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) { m.impl("int8_linear", &int8_linear_cpu); }

}  // namespace chatterbox_rt
