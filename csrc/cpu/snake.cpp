// Snake activation on CPU (HiFT/BigVGAN, Liu et al. arXiv 2006.08195):
//   out = x + (1 / (alpha + eps)) * sin(alpha * x)^2        x [B, C, T], alpha [C]
// in fp32 with the reference's operation order (runtime/models/s3gen/hift.py Snake.forward), one
// pass instead of eager torch's five. Rows (b, c) are split across threads; each row is one
// auto-vectorised loop (vec_math.h; ISA picked at load time by target_clones).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../ops.h"
#include "vec_math.h"

namespace chatterbox_rt {
namespace {

constexpr int64_t kBlock = 1024;  // low-precision rows are widened to fp32 in blocks of this size

// Returns max |alpha x| over the row so the caller can redo rows whose arguments leave the
// polynomial's range (vm::kTrigFastMax) with std::sin.
CBRT_TARGET_CLONES float snake_row_f32(const float* x, float* out, int64_t n, float alpha, float inv) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float arg = xi * alpha;
    const float a = std::fabs(arg);
    amax = a > amax ? a : amax;  // not std::fmax: that stays a libm call and the loop scalar
    out[i] = xi + inv * vm::sin_square(arg);
  }
  return amax;
}

void snake_row_exact(const float* x, float* out, int64_t n, float alpha, float inv) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = std::sin(x[i] * alpha);
    out[i] = x[i] + inv * (s * s);
  }
}

// An inf argument also lands here; NaN propagates through the polynomial (NaN out, as torch).
inline void snake_row(const float* x, float* out, int64_t n, float alpha, float inv) {
  const float amax = snake_row_f32(x, out, n, alpha, inv);
  if (!(amax <= vm::kTrigFastMax)) snake_row_exact(x, out, n, alpha, inv);
}

template <typename scalar_t>
void snake_rows(const scalar_t* x, scalar_t* out, const float* alpha, float eps, int64_t C, int64_t T,
                int64_t row_begin, int64_t row_end) {
  float xb[kBlock], ob[kBlock];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float a = alpha[row % C];
    const float inv = 1.0f / (a + eps);  // the reference's 1.0 / (alpha + eps), in fp32
    const scalar_t* xr = x + row * T;
    scalar_t* outr = out + row * T;
    if (std::is_same_v<scalar_t, float> && static_cast<const void*>(xr) != static_cast<const void*>(outr)) {
      snake_row(reinterpret_cast<const float*>(xr), reinterpret_cast<float*>(outr), T, a, inv);
    } else {
      // Low precision, or in place (the std::sin redo must still see x): through fp32 buffers.
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int64_t n = std::min(kBlock, T - t0);
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          vm::bf16_to_f32(reinterpret_cast<const uint16_t*>(xr + t0), xb, n);
        } else {
          for (int64_t i = 0; i < n; ++i) xb[i] = static_cast<float>(xr[t0 + i]);
        }
        snake_row(xb, ob, n, a, inv);
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          vm::f32_to_bf16(ob, reinterpret_cast<uint16_t*>(outr + t0), n);
        } else {
          for (int64_t i = 0; i < n; ++i) outr[t0 + i] = static_cast<scalar_t>(ob[i]);
        }
      }
    }
  }
}

}  // namespace

void snake_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& alpha, double eps) {
  check_snake(out, x, alpha);
  TORCH_CHECK(x.device().is_cpu(), "snake: the CPU kernel got a tensor on ", x.device());
  const at::Tensor alpha_f = alpha.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0) * x.size(1), C = x.size(1), T = x.size(2);
  if (rows == 0 || T == 0) return;
  // ~32k elements per task: enough work per thread, and a [1, 128, 40000] call still splits.
  const int64_t grain = std::max<int64_t>(1, 32768 / T);
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "snake_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* ap = alpha_f.const_data_ptr<float>();
    const float e = static_cast<float>(eps);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t en) { snake_rows<scalar_t>(xp, op, ap, e, C, T, b, en); });
  });
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) { m.impl("snake", &snake_cpu); }

}  // namespace chatterbox_rt
