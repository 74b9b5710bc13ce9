// Shared helpers for the CUDA kernels: CHECK_* macros (flash-attn flash_api.cpp style), the
// float <-> storage conversions and the launch configuration of grid-stride loops.
#pragma once

// c10 headers only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ops.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor (got ", (x).device(), ")")
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")
#define CHECK_INPUT(x) \
  CHECK_CUDA(x);       \
  CHECK_CONTIGUOUS(x)

namespace chatterbox_rt {
namespace cuda {

constexpr int kThreads = 256;

inline int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));  // a cheap query, no sync
  return sms;
}

inline int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; a few waves of blocks per SM is plenty for elementwise work.
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

// at::Half / at::BFloat16 convert to and from float on the device.
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

}  // namespace cuda
}  // namespace chatterbox_rt
