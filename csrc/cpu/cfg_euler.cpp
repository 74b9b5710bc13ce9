// The flow-matching Euler steps on CPU (runtime/models/s3gen/cfm.py):
//   cfg_euler:          out = x + dt ((1 + w) v[:B] - w v[B:])      (_solve_euler_cfg's update)
//   cfg_euler_refresh:  the same in place on x, also written to both halves of x_in [2B, ...],
//                       the estimator input of the next step (saves two copies per step)
//   euler:              out = x + dt v                              (_basic_euler, meanflow)
// fp32 math in the reference's operation order; memory-bound, so plain loops that -O3 vectorises.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops.h"

namespace chatterbox_rt {
namespace {

constexpr int64_t kGrain = 32768;

float dt_value(const at::Tensor& dt) { return dt.to(at::kFloat).item<float>(); }  // a CPU tensor: no sync

template <typename scalar_t>
void cfg_step(const scalar_t* x, const scalar_t* v, scalar_t* out, scalar_t* x_in, int64_t n, float dt, float c1,
              float c2) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    const scalar_t* vc = v;
    const scalar_t* vu = v + n;
    for (int64_t i = b; i < e; ++i) {
      const float y = static_cast<float>(x[i]) +
                      dt * (c1 * static_cast<float>(vc[i]) - c2 * static_cast<float>(vu[i]));
      out[i] = static_cast<scalar_t>(y);
    }
    if (x_in != nullptr) {
      for (int64_t i = b; i < e; ++i) {
        x_in[i] = out[i];
        x_in[n + i] = out[i];
      }
    }
  });
}

}  // namespace

void cfg_euler_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt, double cfg_rate) {
  check_cfg_euler(out, x, v, dt);
  TORCH_CHECK(x.device().is_cpu(), "cfg_euler: the CPU kernel got a tensor on ", x.device());
  const float d = dt_value(dt), c1 = static_cast<float>(1.0 + cfg_rate), c2 = static_cast<float>(cfg_rate);
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "cfg_euler_cpu", [&] {
    cfg_step<scalar_t>(x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), nullptr,
                       x.numel(), d, c1, c2);
  });
}

void cfg_euler_refresh_cpu(at::Tensor& x, at::Tensor& x_in, const at::Tensor& v, const at::Tensor& dt,
                           double cfg_rate) {
  check_cfg_euler_refresh(x, x_in, v, dt);
  TORCH_CHECK(x.device().is_cpu(), "cfg_euler_refresh: the CPU kernel got a tensor on ", x.device());
  const float d = dt_value(dt), c1 = static_cast<float>(1.0 + cfg_rate), c2 = static_cast<float>(cfg_rate);
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "cfg_euler_refresh_cpu", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    cfg_step<scalar_t>(xp, v.const_data_ptr<scalar_t>(), xp, x_in.data_ptr<scalar_t>(), x.numel(), d, c1, c2);
  });
}

void euler_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& v, const at::Tensor& dt) {
  check_euler(out, x, v, dt);
  TORCH_CHECK(x.device().is_cpu(), "euler: the CPU kernel got a tensor on ", x.device());
  const float d = dt_value(dt);
  CBRT_DISPATCH_FLOAT(x.scalar_type(), "euler_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        op[i] = static_cast<scalar_t>(static_cast<float>(xp[i]) + d * static_cast<float>(vp[i]));
    });
  });
}

TORCH_LIBRARY_IMPL(chatterbox_rt, CPU, m) {
  m.impl("cfg_euler", &cfg_euler_cpu);
  m.impl("cfg_euler_refresh", &cfg_euler_refresh_cpu);
  m.impl("euler", &euler_cpu);
}

}  // namespace chatterbox_rt
