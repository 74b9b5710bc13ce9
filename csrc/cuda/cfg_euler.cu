// Flow-matching Euler steps on CUDA (cfm.py _solve_euler_cfg / _basic_euler); see
// csrc/cpu/cfg_euler.cpp for the math. dt is read from device memory inside the kernel, so a step
// never syncs with the host.
#include <torch/library.h>

#include "common.cuh"

namespace chatterbox_rt {
namespace {

// out = x + dt ((1 + w) v[:B] - w v[B:]); with x_in, also x_in[:B] = x_in[B:] = out.
template <typename scalar_t>
__global__ void cfg_euler_kernel(scalar_t* out,                    // [B, ...] (may alias x)
                                 scalar_t* __restrict__ x_in,      // [2B, ...] or nullptr
                                 const scalar_t* x,                // [B, ...]
                                 const scalar_t* __restrict__ v,   // [2B, ...]
                                 const float* __restrict__ dt,     // [1]
                                 float c1, float c2, int64_t n) {
  const float d = *dt;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const float y = cuda::to_float(x[i]) + d * (c1 * cuda::to_float(v[i]) - c2 * cuda::to_float(v[n + i]));
    const scalar_t ys = cuda::from_float<scalar_t>(y);
    out[i] = ys;
    if (x_in != nullptr) {
      x_in[i] = ys;
      x_in[n + i] = ys;
    }
  }
}

template <typename scalar_t>
__global__ void euler_kernel(scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ v,
                             const float* __restrict__ dt, int64_t n) {
  const float d = *dt;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    out[i] = cuda::from_float<scalar_t>(cuda::to_float(x[i]) + d * cuda::to_float(v[i]));
  }
}

void launch_cfg(at::Tensor& out, at::Tensor* x_in, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt,
                double cfg_rate) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dt_f = dt.to(at::kFloat).reshape({1});  // stays on the device: no sync
  const int64_t n = x.numel();
  if (n == 0) return;
  const float c1 = static_cast<float>(1.0 + cfg_rate), c2 = static_cast<float>(cfg_rate);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "cfg_euler_cuda", [&] {
    cfg_euler_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), x_in == nullptr ? nullptr : x_in->data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), dt_f.const_data_ptr<float>(), c1, c2, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void cfg_euler_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt, double cfg_rate) {
  CHECK_INPUT(x);
  CHECK_INPUT(v);
  CHECK_CUDA(dt);
  CHECK_INPUT(out);
  check_cfg_euler(out, x, v, dt);
  launch_cfg(out, nullptr, x, v, dt, cfg_rate);
}

void cfg_euler_refresh_cuda(at::Tensor& x, at::Tensor& x_in, const at::Tensor& v, const at::Tensor& dt,
                            double cfg_rate) {
  CHECK_INPUT(x);
  CHECK_INPUT(x_in);
  CHECK_INPUT(v);
  CHECK_CUDA(dt);
  check_cfg_euler_refresh(x, x_in, v, dt);
  launch_cfg(x, &x_in, x, v, dt, cfg_rate);
}

void euler_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt) {
  CHECK_INPUT(x);
  CHECK_INPUT(v);
  CHECK_CUDA(dt);
  CHECK_INPUT(out);
  check_euler(out, x, v, dt);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dt_f = dt.to(at::kFloat).reshape({1});
  const int64_t n = x.numel();
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "euler_cuda", [&] {
    euler_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dt_f.const_data_ptr<float>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CUDA, m) {
  m.impl("cfg_euler", &cfg_euler_cuda);
  m.impl("cfg_euler_refresh", &cfg_euler_refresh_cuda);
  m.impl("euler", &euler_cuda);
}

}  // namespace chatterbox_rt
