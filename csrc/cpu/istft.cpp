// HiFT's inverse STFT on CPU, fused with the ops around it (runtime/models/s3gen/hift.py
// HiFTGenerator.decode/_istft):
//   mag   = min(exp(spec[:, :K]), 1e2),  K = n_fft/2 + 1       (fp32)
//   phase = sin(spec[:, K:])
//   y     = torch.istft(mag e^{i phase}, n_fft, hop, n_fft, window, center=True)
//   out   = clamp(y, -audio_limit, audio_limit)                  [B, hop (F - 1)]
// torch.istft's steps, written out: each frame is an inverse real DFT of size n_fft (the imaginary
// parts of the DC and Nyquist bins ignored, the other bins doubled, 1/n_fft), times the window;
// frames are overlap-added at stride hop; the sum is divided by the overlap-added squared window;
// n_fft/2 samples are trimmed at each end. With n_frames, row b overlap-adds (signal and envelope)
// only its first n_frames[b] frames, and samples with an envelope <= 1e-11 are 0 (the masked path
// of _istft).
//
// Work is split into blocks of kFramesPerBlock frames (per row), recomputing the few frames that
// overlap a neighbouring block. Per block: (1) spectrum, vectorised across frames, (2) the small
// inverse DFT as a dense [n_fft, K] x [K, frames] product with the window folded into its
// coefficients, vectorised across frames, (3) overlap-add and envelope division per sample.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "vec_math.h"

namespace chatterbox_rt {
namespace {

constexpr int64_t kFramesPerBlock = 256;
constexpr float kMagnitudeMax = 1e2f;  // HiFTConfig.magnitude_max
constexpr float kEnvelopeMin = 1e-11f;  // torch.istft's NOLA threshold

// re/im of mag e^{i phase} for n frames of one frequency bin.
CBRT_TARGET_CLONES void spectrum_bin(const float* logmag, const float* phase_in, float* re, float* im, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float mag = vm::exp(logmag[j]);
    mag = vm::clamp(mag, 0.0f, kMagnitudeMax);  // torch.clip(max=1e2); exp >= 0
    float s, c;
    vm::sincos(vm::sin(phase_in[j]), s, c);
    re[j] = mag * c;
    im[j] = mag * s;
  }
}

// fr[n][j] = sum_k cre[n][k] re[k][j] + cim[n][k] im[k][j]   (windowed inverse real DFT)
CBRT_TARGET_CLONES void inverse_dft(const float* re, const float* im, const float* cre, const float* cim, float* fr,
                                    int64_t n_fft, int64_t n_bins, int64_t n, int64_t stride) {
  for (int64_t t = 0; t < n_fft; ++t) {
    float* o = fr + t * stride;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = 0.0f;
    for (int64_t k = 0; k < n_bins; ++k) {
      const float c = cre[t * n_bins + k], s = cim[t * n_bins + k];
      const float* rk = re + k * stride;
      const float* ik = im + k * stride;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] += c * rk[j] + s * ik[j];
    }
  }
}

struct IstftPlan {
  int64_t n_fft, hop, n_bins, n_frames, out_len;
  std::vector<float> cre, cim, wsq;  // [n_fft, n_bins], [n_fft, n_bins], [n_fft]
};

IstftPlan make_plan(const float* window, int64_t n_fft, int64_t hop, int64_t n_frames) {
  IstftPlan p{n_fft, hop, n_fft / 2 + 1, n_frames, istft_out_len(hop, n_frames), {}, {}, {}};
  p.cre.resize(n_fft * p.n_bins);
  p.cim.resize(n_fft * p.n_bins);
  p.wsq.resize(n_fft);
  const double two_pi = 2.0 * M_PI;
  for (int64_t t = 0; t < n_fft; ++t) {
    const double w = window[t];
    p.wsq[t] = static_cast<float>(window[t]) * static_cast<float>(window[t]);
    for (int64_t k = 0; k < p.n_bins; ++k) {
      const bool edge = k == 0 || 2 * k == n_fft;  // DC, Nyquist: counted once, imaginary part ignored
      const double scale = w * (edge ? 1.0 : 2.0) / static_cast<double>(n_fft);
      const double ang = two_pi * static_cast<double>((k * t) % n_fft) / static_cast<double>(n_fft);
      p.cre[t * p.n_bins + k] = static_cast<float>(scale * std::cos(ang));
      p.cim[t * p.n_bins + k] = edge ? 0.0f : static_cast<float>(-scale * std::sin(ang));
    }
  }
  return p;
}

// One block of output samples [t0, t1) of one row; spec_row [n_fft + 2, F], valid frames < nf.
void istft_block(const IstftPlan& p, const float* spec_row, float* out_row, int64_t nf, int64_t t0, int64_t t1,
                 float limit, std::vector<float>& buf) {
  const int64_t N = p.n_fft, hop = p.hop, K = p.n_bins, F = p.n_frames, half = N / 2;
  // Frames f cover padded samples [f hop, f hop + N); sample t is padded sample t + N/2.
  const int64_t first_num = t0 + half - N + 1;
  const int64_t f_first = first_num <= 0 ? 0 : (first_num + hop - 1) / hop;
  const int64_t f_last = std::min(nf - 1, (t1 - 1 + half) / hop);
  const int64_t n = f_last - f_first + 1;
  if (n > 0) {
    const int64_t stride = n;
    buf.resize((2 * K + N) * stride);
    float *re = buf.data(), *im = re + K * stride, *fr = im + K * stride;
    for (int64_t k = 0; k < K; ++k)
      spectrum_bin(spec_row + k * F + f_first, spec_row + (K + k) * F + f_first, re + k * stride, im + k * stride, n);
    inverse_dft(re, im, p.cre.data(), p.cim.data(), fr, N, K, n, stride);
  }
  const float* fr = buf.data() + 2 * K * std::max<int64_t>(n, 0);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t pp = t + half, num = pp - N + 1;
    const int64_t lo = std::max(f_first, num <= 0 ? 0 : (num + hop - 1) / hop);
    const int64_t hi = std::min(f_last, pp / hop);
    float y = 0.0f, env = 0.0f;
    for (int64_t f = lo; f <= hi; ++f) {
      const int64_t i = pp - f * hop;
      y += fr[i * n + (f - f_first)];
      env += p.wsq[i];
    }
    float v = env > kEnvelopeMin ? y / env : 0.0f;
    v = v < -limit ? -limit : (v > limit ? limit : v);
    out_row[t] = v;
  }
}

}  // namespace

void istft_cpu(at::Tensor& out, const at::Tensor& spec, const at::Tensor& window, int64_t n_fft, int64_t hop,
               double audio_limit, const std::optional<at::Tensor>& n_frames) {
  check_istft(out, spec, window, n_fft, hop, n_frames);
  TORCH_CHECK(spec.device().is_cpu(), "istft: the CPU kernel got a tensor on ", spec.device());
  const at::Tensor spec_f = spec.to(at::kFloat).contiguous();
  const at::Tensor window_f = window.to(at::kFloat).contiguous();
  const int64_t B = spec.size(0), F = spec.size(2);
  const IstftPlan plan = make_plan(window_f.const_data_ptr<float>(), n_fft, hop, F);
  const int64_t L = plan.out_len;
  if (B == 0 || L == 0) return;
  std::vector<int64_t> nf(B, F);
  if (n_frames.has_value()) {
    const at::Tensor nft = n_frames->to(at::kLong).contiguous();
    for (int64_t b = 0; b < B; ++b) nf[b] = std::clamp<int64_t>(nft.const_data_ptr<int64_t>()[b], 0, F);
  }
  const int64_t block = kFramesPerBlock * hop;
  const int64_t n_blocks = (L + block - 1) / block;
  const float* sp = spec_f.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float limit = static_cast<float>(audio_limit);
  at::parallel_for(0, B * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_blocks, j = task % n_blocks;
      const int64_t t0 = j * block, t1 = std::min(L, t0 + block);
      istft_block(plan, sp + b * (n_fft + 2) * F, op + b * L, nf[b], t0, t1, limit, buf);
    }
  });
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) { m.impl("istft", &istft_cpu); }

}  // namespace chatterbox_rt
