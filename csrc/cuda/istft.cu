// HiFT's inverse STFT on CUDA, fused with exp/clip/sin/cos/clamp; see csrc/cpu/istft.cpp for the
// math (torch.istft, center=True, written out). One thread per output sample: it sums the
// n_fft/hop frames that cover it, evaluating each frame's inverse real DFT at its own offset only.
// With n_fft = 16 that is 4 frames x 9 bins per sample; frames are recomputed by the threads that
// share them, which costs less than a second pass through global memory at these sizes.
#include <torch/library.h>

#include "common.cuh"

namespace chatterbox_rt {
namespace {

constexpr float kMagnitudeMax = 1e2f;   // HiFTConfig.magnitude_max
constexpr float kEnvelopeMin = 1e-11f;  // torch.istft's NOLA threshold

template <typename scalar_t>
__global__ void istft_kernel(float* __restrict__ out,              // [B, L], L = hop (F - 1)
                             const scalar_t* __restrict__ spec,    // [B, n_fft + 2, F]
                             const float* __restrict__ window,     // [n_fft]
                             const int64_t* __restrict__ n_frames, // [B] or nullptr (all F frames)
                             int n_fft, int hop, int64_t F, int64_t L, int64_t B, float limit) {
  const int K = n_fft / 2 + 1, half = n_fft / 2;
  const float inv_n = 1.0f / static_cast<float>(n_fft);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < B * L;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / L, t = i % L;
    int64_t nf = n_frames == nullptr ? F : n_frames[b];
    nf = nf < 0 ? 0 : (nf > F ? F : nf);
    const int64_t p = t + half;  // padded sample index; frame f covers [f hop, f hop + n_fft)
    const int64_t num = p - n_fft + 1;
    const int64_t lo = num <= 0 ? 0 : (num + hop - 1) / hop;
    const int64_t hi = min(nf - 1, p / hop);
    const scalar_t* row = spec + b * static_cast<int64_t>(n_fft + 2) * F;
    float y = 0.0f, env = 0.0f;
    for (int64_t f = lo; f <= hi; ++f) {
      const int n = static_cast<int>(p - f * hop);
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) {
        float mag = expf(cuda::to_float(row[k * F + f]));
        mag = fminf(mag, kMagnitudeMax);
        float s, c;
        sincosf(sinf(cuda::to_float(row[(K + k) * F + f])), &s, &c);
        float cs, sn;  // e^{i 2 pi k n / N}, angle reduced exactly in integers first
        sincospif(2.0f * static_cast<float>((k * n) % n_fft) * inv_n, &sn, &cs);
        const bool edge = k == 0 || 2 * k == n_fft;  // DC and Nyquist: once, imaginary part ignored
        const float term = mag * c * cs - (edge ? 0.0f : mag * s * sn);
        acc += edge ? term : 2.0f * term;
      }
      const float w = window[n];
      y += acc * inv_n * w;
      env += w * w;
    }
    float v = env > kEnvelopeMin ? y / env : 0.0f;
    out[i] = fminf(fmaxf(v, -limit), limit);
  }
}

}  // namespace

void istft_cuda(at::Tensor& out, const at::Tensor& spec, const at::Tensor& window, int64_t n_fft, int64_t hop,
                double audio_limit, const std::optional<at::Tensor>& n_frames) {
  CHECK_INPUT(spec);
  CHECK_CUDA(window);
  CHECK_INPUT(out);
  if (n_frames.has_value()) CHECK_CUDA(*n_frames);
  check_istft(out, spec, window, n_fft, hop, n_frames);
  const c10::cuda::CUDAGuard guard(spec.device());
  const at::Tensor window_f = window.to(at::kFloat).contiguous();
  at::Tensor nf;
  if (n_frames.has_value()) nf = n_frames->to(at::kLong).contiguous();  // device-side: no sync
  const int64_t B = spec.size(0), F = spec.size(2), L = istft_out_len(hop, F);
  if (B * L == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  CBRT_DISPATCH_FLOAT(spec.scalar_type(), "istft_cuda", [&] {
    istft_kernel<scalar_t><<<cuda::grid_for(B * L), cuda::kThreads, 0, stream>>>(
        out.data_ptr<float>(), spec.const_data_ptr<scalar_t>(), window_f.const_data_ptr<float>(),
        nf.defined() ? nf.const_data_ptr<int64_t>() : nullptr, static_cast<int>(n_fft), static_cast<int>(hop), F, L,
        B, static_cast<float>(audio_limit));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CUDA, m) { m.impl("istft", &istft_cuda); }

}  // namespace chatterbox_rt
