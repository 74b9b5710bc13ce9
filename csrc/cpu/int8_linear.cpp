// Weight-only INT8 linear on CPU: out[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
// (x fp32 [M, K], q int8 [N, K], scale fp32 [N], out fp32 [M, N]; the bias is added in Python).
//
// T3's decode multiplies a few rows by every weight, so it is bound by reading the weights; int8
// weights are a quarter of fp32's bytes. ATen's own _weight_int8pack_mm reads ~1 GB/s on the
// 2-core CI VM (a scalar loop per output), so this kernel streams them itself:
//   - parallel over tiles of C output channels (at::parallel_for); a tile's C weight rows are
//     C * K contiguous bytes of q;
//   - per tile and group of R rows, an R x C register tile of fp32 accumulators runs over the whole
//     K: each step loads 16 (AVX-512) or 8 (AVX2) int8 weights per channel, widens them in
//     registers (vpmovsxbd + vcvtdq2ps) and FMAs them into every row of the group. Nothing goes
//     through memory but x (L1/L2) and the weights (streamed once per token when M <= R);
//     (The previous kernel widened 4 x 512 weights into an L1 buffer and reloaded them: ~8 GB/s,
//     bound by the stores and reloads. At 16 rows this one is at the FMA roofline, like fp32.)
//   - while a tile runs, the next tile's rows are prefetched into L2, one line per row per 64 k:
//     each weight row is a short stream (K bytes) that the hardware prefetchers barely train on
//     (measured single-thread, 4096 x 1024 at 2 rows: 7 GB/s without, 18 GB/s with);
//   - the K tail (K % lanes) is zero-padded in registers;
//   - each (row, channel) accumulator sees the same FMA sequence (one vector lane per k mod lanes,
//     k ascending, then a fixed horizontal sum) whatever R, C or M are, so a row's result is
//     bit-identical whatever the number of rows and whichever rows share a group (the engine's
//     batch invariance). R and C only change speed; the ISA (AVX-512, AVX2+FMA or scalar, picked
//     at run time) changes the order, and one machine always takes the same one.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "../ops.h"

namespace chatterbox_rt {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
#define CBRT_X86 1
#endif

// One register tile: rows x[0..R) (row stride K), channels q[0..C) (row stride K), the whole K;
// out[r * ldo + c] = scale[c] * dot(x_r, q_c).
using TileFn = void (*)(const float* x, const int8_t* q, const float* scale, float* out, int64_t K, int64_t ldo,
                       const int8_t* pfq);

constexpr int kMaxR = 4;
constexpr int kMaxC = 8;


#ifdef CBRT_X86
template <int R, int C>
__attribute__((target("avx512f"))) void tile_avx512(const float* x, const int8_t* q, const float* scale, float* out,
                                                    int64_t K, int64_t ldo, const int8_t* pfq) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if ((k & 63) == 0) {  // the next tile's rows, one line each per 64 k: into L2 a tile ahead
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(pfq + c * K + k), _MM_HINT_T1);
    }
    __m512 w[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      w[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * K + k))));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  if (k < K) {  // zero-padded tail: the padded lanes add x = 0 times q = 0
    const int rem = static_cast<int>(K - k);
    const __mmask16 mk = static_cast<__mmask16>((1u << rem) - 1);
    alignas(16) int8_t pad[16];
    __m512 w[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      std::memset(pad, 0, sizeof(pad));
      std::memcpy(pad, q + c * K + k, rem);
      w[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(pad))));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + r * K + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) out[r * ldo + c] = _mm512_reduce_add_ps(acc[r][c]) * scale[c];
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

template <int R, int C>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, const int8_t* q, const float* scale, float* out,
                                                   int64_t K, int64_t ldo, const int8_t* pfq) {
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(pfq + c * K + k), _MM_HINT_T1);
    }
    __m256 w[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      w[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c * K + k))));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  if (k < K) {  // zero-padded tail
    const int rem = static_cast<int>(K - k);
    alignas(16) int8_t qpad[16];
    alignas(32) float xpad[8];
    __m256 w[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      std::memset(qpad, 0, sizeof(qpad));
      std::memcpy(qpad, q + c * K + k, rem);
      w[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qpad))));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      std::memset(xpad, 0, sizeof(xpad));
      std::memcpy(xpad, x + r * K + k, sizeof(float) * rem);
      const __m256 xv = _mm256_load_ps(xpad);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) out[r * ldo + c] = hsum256(acc[r][c]) * scale[c];
}

#endif

// Scalar: one (row, channel) dot at a time, k ascending.
void tile_scalar(const float* x, const int8_t* q, const float* scale, float* out, int64_t K, int64_t ldo, int R,
                 int C) {
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * static_cast<float>(q[c * K + k]);
      out[r * ldo + c] = s * scale[c];
    }
  }
}

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa pick_isa() {
#ifdef CBRT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// One ISA's register tiles, tile[R - 1][C - 1].
struct Kernels {
  TileFn tile[kMaxR][kMaxC] = {};
};

#ifdef CBRT_X86
template <int R, int C>
struct Avx512Fns {
  static constexpr TileFn tile = &tile_avx512<R, C>;
};
template <int R, int C>
struct Avx2Fns {
  static constexpr TileFn tile = &tile_avx2<R, C>;
};
template <template <int, int> class F, int R, int... Cs>
void fill_row(Kernels& t, std::integer_sequence<int, Cs...>) {
  ((t.tile[R - 1][Cs] = F<R, Cs + 1>::tile), ...);
}
template <template <int, int> class F, int... Rs>
Kernels make_kernels(std::integer_sequence<int, Rs...>) {
  Kernels t;
  (fill_row<F, Rs + 1>(t, std::make_integer_sequence<int, kMaxC>{}), ...);
  return t;
}
#endif

// ks == nullptr: scalar. Channels in tiles of C (parallel), rows in groups of maxR per tile: the
// tile's C x K weights (C KB or so) stay in L1/L2 across the row groups.
void run(const float* xp, const int8_t* qp, const float* sp, float* op, int64_t M, int64_t K, int64_t N,
         const Kernels* ks, int maxR, int C) {
  const int64_t ntiles = (N + C - 1) / C;
  // ~32 KB of weights per task at least.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, C * K));
  at::parallel_for(0, ntiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * C;
      const int c = static_cast<int>(std::min<int64_t>(C, N - n0));
      if (ks == nullptr) {
        tile_scalar(xp, qp + n0 * K, sp + n0, op + n0, K, N, static_cast<int>(M), c);
        continue;
      }
      // The next tile (or the last c rows again), prefetched into L2 while this one runs: the
      // hardware prefetchers alone leave the short per-row streams (K bytes each) half-trained.
      const int8_t* pfq = qp + std::min(n0 + C, N - c) * K;
      for (int64_t m0 = 0; m0 < M; m0 += maxR) {
        const int r = static_cast<int>(std::min<int64_t>(maxR, M - m0));
        ks->tile[r - 1][c - 1](xp + m0 * K, qp + n0 * K, sp + n0, op + m0 * N + n0, K, N, pfq);
      }
    }
  });
}

const Kernels* kernels_for(Isa isa) {
#ifdef CBRT_X86
  static const Kernels avx512 =
      make_kernels<Avx512Fns>(std::make_integer_sequence<int, kMaxR>{});
  static const Kernels avx2 = make_kernels<Avx2Fns>(std::make_integer_sequence<int, kMaxR>{});
  if (isa == Isa::kAvx512) return &avx512;
  if (isa == Isa::kAvx2) return &avx2;
#endif
  (void)isa;
  return nullptr;
}

}  // namespace

void int8_linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_int8_linear(out, x, q, scale);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  if (M == 0 || N == 0) return;
  static const Isa isa = pick_isa();
  const Kernels* ks = kernels_for(isa);
  // Register tile per ISA (R rows x C channels of accumulators plus C widened weights fit the 32 zmm /
  // 16 ymm registers), picked by measurement on the 2-core Zen 4 VM. Any choice gives the same bits.
  int maxR = 1, C = 4;
  if (isa == Isa::kAvx512) {
    maxR = M == 1 ? 1 : M == 2 ? 2 : 4;
    C = M <= 2 ? 8 : 6;
  } else if (isa == Isa::kAvx2) {
    maxR = M == 1 ? 1 : M == 2 ? 2 : 4;
    C = M == 1 ? 6 : M == 2 ? 5 : 3;
  }
  run(x.data_ptr<float>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), out.data_ptr<float>(), M, K, N, ks, maxR, C);
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) { m.impl("int8_linear", &int8_linear_cpu); }

}  // namespace chatterbox_rt
