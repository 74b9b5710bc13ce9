// Snake on CUDA: out = x + (1 / (alpha + eps)) * sin(alpha x)^2, x [B, C, T], alpha [C] (fp32
// math, hift.py Snake.forward). Grid-stride elementwise kernel; sinf (not __sinf: arguments reach
// |alpha x| ~ 1e3, where the fast intrinsic loses accuracy).
#include <torch/library.h>

#include "common.cuh"

namespace chatterbox_rt {
namespace {

template <typename scalar_t>
__global__ void snake_kernel(scalar_t* __restrict__ out,         // [B, C, T]
                             const scalar_t* __restrict__ x,     // [B, C, T]
                             const float* __restrict__ alpha,    // [C], fp32
                             float eps, int64_t C, int64_t T, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const float a = alpha[(i / T) % C];
    const float xi = cuda::to_float(x[i]);
    const float s = sinf(xi * a);
    out[i] = cuda::from_float<scalar_t>(xi + (1.0f / (a + eps)) * (s * s));
  }
}

}  // namespace

void snake_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& alpha, double eps) {
  CHECK_INPUT(x);
  CHECK_CUDA(alpha);
  CHECK_INPUT(out);
  check_snake(out, x, alpha);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor alpha_f = alpha.to(at::kFloat).contiguous();
  const int64_t n = x.numel();
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "snake_cuda", [&] {
    snake_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), alpha_f.const_data_ptr<float>(),
        static_cast<float>(eps), x.size(1), x.size(2), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CUDA, m) { m.impl("snake", &snake_cuda); }

}  // namespace chatterbox_rt
