"""Snake activation, per channel, as HiFT's resblocks use it: the Triton launcher ``snake_triton`` and
the plain-torch ``snake_ref`` (the dispatched op is ``chatterbox_rt.kernels.snake``).

    y = x + 1 / (alpha + eps) * sin(alpha * x)^2          x: [B, C, T], alpha: [C]

Snake is from Liu et al., "Neural Networks Fail to Learn Periodic Functions and How to Fix It"
(arXiv 2006.08195); HiFi-GAN/BigVGAN-style resblocks use it with a learned alpha per channel.
The model's form is ``runtime/models/s3gen/hift.py`` ``Snake.forward`` (the reference
chatterbox-tts 0.1.7 ``hifigan.Snake``), and ``snake_ref`` copies that expression term for term.

With ``mask: [B, 1, T]`` the op computes ``snake(x * mask)``: when requests of different lengths
are batched, ``ResBlock.forward`` multiplies every conv output by the time mask (``_mask``) before
it reaches the next Snake, so the multiply can ride along here instead of costing its own pass.

The kernel runs on a 2-D grid (B*C rows, blocks of T): each program loads its channel's alpha
once, computes in fp32 and stores in x's dtype. A conv fusion (the activation feeding HiFT's
resblock convs) is deliberately not built: it needs GPU measurements first.

NOTE: the low-precision reference (``upcast=False`` on bf16/fp16) rounds after every op as the
model does; the kernel rounds once. Compare them with the per-dtype tolerance, not bitwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import check_triton_device

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the op is optional: models fall back to snake_ref
    triton = None
    tl = None
    HAS_TRITON = False

SNAKE_EPS = 1e-9  # HiFTConfig.snake_eps
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK = 2048


def snake_ref(x: torch.Tensor, alpha: torch.Tensor, eps: float = SNAKE_EPS, upcast: bool = False,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch Snake, the model's exact expression (``hift.Snake.forward``).

    ``mask [B, 1, T]`` multiplies x first, as ``hift._mask`` does before each Snake of a ResBlock.
    ``upcast``: compute in fp32 and cast back to x's dtype (what the kernel does)."""
    dtype = x.dtype
    if mask is not None:
        x = x * mask
    if upcast:
        x, alpha = x.float(), alpha.float()
    alpha = alpha[None, :, None]
    y = x + (1.0 / (alpha + eps)) * torch.sin(x * alpha).pow(2)
    return y.to(dtype)


if HAS_TRITON:

    @triton.jit
    def _snake_kernel(
        # pointers
        x_ptr, alpha_ptr, mask_ptr, y_ptr,
        # sizes and mask strides (the mask may broadcast over B through a 0 stride)
        C, T, stride_mb, stride_mt,
        eps,
        # meta-parameters
        HAS_MASK: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0)  # b * C + c
        pid_t = tl.program_id(1)
        c = row % C
        t = pid_t * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = t < T
        offs = row.to(tl.int64) * T + t

        alpha = tl.load(alpha_ptr + c).to(tl.float32)
        inv = 1.0 / (alpha + eps)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0)
        xf = x.to(tl.float32)
        if HAS_MASK:
            b = row // C
            m = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + t.to(tl.int64) * stride_mt, mask=valid, other=0)
            # Round the product to x's dtype, as the model's separate ``x * mask`` does.
            xf = (xf * m.to(tl.float32)).to(x.dtype).to(tl.float32)
        s = tl.sin(xf * alpha)
        y = xf + inv * (s * s)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)


def _check_device(*tensors: torch.Tensor) -> None:
    check_triton_device("snake", *tensors)


def _launch_config(T: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(T, 1)), _MAX_BLOCK)
    block = max(block, 128)
    num_warps = 8 if block >= 2048 else 4
    return block, num_warps


def snake_triton(x: torch.Tensor, alpha: torch.Tensor, eps: float = SNAKE_EPS, out: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton launcher: Snake of ``x [B, C, T]`` with per-channel ``alpha [C]`` (fp32 math, stored
    in x's dtype). ``chatterbox_rt.kernels.snake`` is the dispatched op that runs anywhere.

    ``mask [B, 1, T]`` (optional, any dtype, may be expanded over B): computes ``snake(x * mask)``.
    ``out``: a preallocated contiguous ``[B, C, T]`` output in x's dtype on x's device."""
    if not HAS_TRITON:
        raise RuntimeError("snake: the Triton kernel needs triton (pip install triton); use snake_ref or "
                           "the dispatched chatterbox_rt.kernels.snake instead")
    if x.dim() != 3:
        raise ValueError(f"snake: x must be [B, C, T], got shape {tuple(x.shape)}")
    B, C, T = x.shape
    if x.dtype not in _DTYPES:
        raise ValueError(f"snake: x must be float32/float16/bfloat16, got {x.dtype}")
    if alpha.dim() != 1 or alpha.shape[0] != C:
        raise ValueError(f"snake: alpha must be [C] = [{C}] to match x {tuple(x.shape)}, got {tuple(alpha.shape)}")
    if alpha.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"snake: alpha must be x's dtype ({x.dtype}) or float32, got {alpha.dtype}")
    tensors = [x, alpha]
    if mask is not None:
        if mask.dim() != 3 or mask.shape[1] != 1 or mask.shape[2] != T or mask.shape[0] not in (1, B):
            raise ValueError(f"snake: mask must be [B, 1, T] = [{B}, 1, {T}], got {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            mask = mask.to(torch.uint8)  # Triton loads bool pointers as int1; bytes are simpler
        tensors.append(mask)
    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"snake: out must be {tuple(x.shape)} {x.dtype} on {x.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("snake: out must be contiguous")
        tensors.append(out)
    _check_device(*tensors)

    x = x.contiguous()
    alpha = alpha.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if x.numel() == 0:
        return y
    stride_mb = stride_mt = 0
    if mask is not None:
        stride_mb = mask.stride(0) if mask.shape[0] == B else 0
        stride_mt = mask.stride(2)
    block, num_warps = _launch_config(T)
    grid = (B * C, triton.cdiv(T, block))
    _snake_kernel[grid](
        x, alpha, mask if mask is not None else x, y,
        C, T, stride_mb, stride_mt,
        float(eps),
        HAS_MASK=mask is not None,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    return y


__all__ = ["snake_triton", "snake_ref", "HAS_TRITON", "SNAKE_EPS"]
