"""Weight-only INT8 linear: ``y = (x @ q.T) * scale + bias`` with ``q [N, K]`` int8 and one fp32
scale per output channel. T3's decode reads every weight once per token, so 8-bit weights read
4x fewer bytes than fp32 (2x fewer than bf16); the activations stay in their float dtype.

Forms (the layer that uses them is ``runtime/models/t3/quant.py`` ``Int8Linear``):

* ``quantize_int8(w) -> (q, scale)``: symmetric per-output-channel quantisation,
  ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in [-127, 127];
* ``int8_linear_ref(x, q, scale, bias)``: plain torch, dequantise then matmul, fp32 accumulation;
* ``int8_linear_triton(x, q, scale, bias)``: the Triton kernel (CUDA tensors, or CPU ones under
  ``TRITON_INTERPRET=1``): each program owns a ``BLOCK_M x BLOCK_N`` output tile and streams the
  int8 weight tile along K, converting it in registers (the dequantisation is fused: no float copy
  of the weights is ever written), fp32 accumulation, the scale and bias applied once at the end;
* ``int8_linear(x, q, scale, bias)``: the one the model calls. CUDA -> the Triton kernel
  (``int8_linear_ref`` without triton); CPU -> our C++ kernel ``int8_linear_native``
  (csrc/cpu/int8_linear.cpp), else torch's ``aten._weight_int8pack_mm`` (``int8_linear_cpu``; it
  read only ~1 GB/s of weights on the 2-core CI VM at 2 rows, against 19-21 GB/s for fp32 oneDNN),
  else ``int8_linear_ref``.

Only the summation order differs between the forms; ``tests/kernels/test_int8_linear.py`` checks
them against the reference over odd shapes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import check_triton_device

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAS_TRITON = False

QMAX = 127
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` (any float dtype) -> (``q [N, K]`` int8, ``scale [N]`` fp32), symmetric per row.
    An all-zero row gets scale 1 (its q is 0). Computed in fp32 on w's device, in row chunks."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8: w must be [N, K], got shape {tuple(w.shape)}")
    N = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(N, dtype=torch.float32, device=w.device)
    step = max(1, (1 << 24) // max(1, w.shape[1]))  # ~64 MB of fp32 at a time
    for i in range(0, N, step):
        rows = w[i: i + step].float()
        s = rows.abs().amax(dim=1) / QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[i: i + step] = torch.round(rows / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        scale[i: i + step] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"int8_linear: q must be a 2-D int8 tensor [N, K], got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    if x.shape[-1] != K:
        raise ValueError(f"int8_linear: x's last dimension {x.shape[-1]} does not match q's K = {K}")
    if scale.shape != (N,):
        raise ValueError(f"int8_linear: scale must be [{N}], got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"int8_linear: bias must be [{N}], got {tuple(bias.shape)}")
    if x.dtype not in _DTYPES and x.dtype != torch.float64:
        raise ValueError(f"int8_linear: x must be a float tensor, got {x.dtype}")


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: ``(x @ (q * scale).T + bias)`` computed in fp32 (fp64 for fp64 x), out in x's dtype."""
    _check(x, q, scale, bias)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ (q.to(acc) * scale.to(acc)[:, None]).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _int8_linear_kernel(
        x_ptr, q_ptr, s_ptr, b_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_qn, stride_ym,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_ok = k < K
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(q_ptr + rn[None, :].to(tl.int64) * stride_qn + k[:, None],
                        mask=n_ok[None, :] & k_ok[:, None], other=0).to(tl.float32)  # [BLOCK_K, BLOCK_N]
            acc += tl.dot(x, w)
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _launch_config(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    # Decode (a few rows): 16-row tiles (tl.dot's smallest), wide N tiles so that each program
    # streams a long contiguous stretch of weight rows; larger M (prefill): square-ish tiles.
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 64 if M <= 32 else 128
    block_k = 128 if K >= 128 else max(16, triton.next_power_of_2(K))
    return block_m, block_n, block_k, 4


def int8_linear_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton launcher: ``x [..., K]`` (fp32/fp16/bf16) with int8 ``q [N, K]`` and fp32
    ``scale [N]`` -> ``[..., N]`` in x's dtype (fp32 accumulation)."""
    if not HAS_TRITON:
        raise RuntimeError("int8_linear: the Triton kernel needs triton (pip install triton); use "
                           "int8_linear_ref or the dispatching int8_linear instead")
    _check(x, q, scale, bias)
    if x.dtype not in _DTYPES:
        raise ValueError(f"int8_linear: the kernel takes float32/float16/bfloat16 x, got {x.dtype}")
    check_triton_device("int8_linear", x, q, scale, *(() if bias is None else (bias,)))
    N, K = q.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M and N:
        bm, bn, bk, warps = _launch_config(M, N, K)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _int8_linear_kernel[grid](
            x2, q, scale.contiguous(), bias if bias is not None else scale, y,
            M, N, K, x2.stride(0), q.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y.reshape(*x.shape[:-1], N)


def _cpu_pack_mm_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_linear_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch's weight-only INT8 kernel on the CPU (``aten._weight_int8pack_mm``), bias added after.
    It takes its scales in x's dtype, so bf16/fp16 x runs through it in fp32 (a bf16 scale alone
    would cost up to 0.4 % per channel; x is a few rows, so the casts are cheap)."""
    _check(x, q, scale, bias)
    N, K = q.shape
    x2 = x.reshape(-1, K).to(torch.float32).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, q, scale.to(torch.float32))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int8_linear_native(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Our C++ kernel (csrc/cpu/int8_linear.cpp): fp32 math, row-count invariant."""
    from . import _native

    _check(x, q, scale, bias)
    N, K = q.shape
    x2 = x.reshape(-1, K).to(torch.float32).contiguous()
    y = _native.int8_linear(x2, q.contiguous(), scale.to(torch.float32).contiguous())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight-only INT8 linear on x's device: CUDA -> Triton, CPU -> ATen's int8 kernel, else (no
    triton, fp64, other devices) ``int8_linear_ref``."""
    if x.dtype in _DTYPES:
        if x.device.type == "cuda" and HAS_TRITON:
            return int8_linear_triton(x, q, scale, bias)
        if x.device.type == "cpu":
            from . import _native

            if _native.int8_linear_available():
                return int8_linear_native(x, q, scale, bias)
            if _cpu_pack_mm_available():
                return int8_linear_cpu(x, q, scale, bias)
    return int8_linear_ref(x, q, scale, bias)
