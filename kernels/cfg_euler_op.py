"""One Euler step of the S3Gen flow-matching ODE, with classifier-free guidance fused in: the Triton
launchers ``cfg_euler_triton``, ``cfg_euler_triton_`` (in place) and ``euler_triton``, and the plain-torch
``cfg_euler_ref`` / ``euler_ref`` (the dispatched ops are ``chatterbox_rt.kernels.cfg_euler`` etc.).

The math (CosyVoice ``flow_matching.py::ConditionalCFM.solve_euler``, as kept by the reference
chatterbox-tts 0.1.7 and by ``runtime/models/s3gen/cfm.py``)::

    v_cfg = (1 + w) * v[:B] - w * v[B:]        # rows [:B] conditional, rows [B:] unconditional
    x_new = x + dt * v_cfg                      # dt = t_{k+1} - t_k, w = cfg_rate

and the meanflow form without guidance (``CausalCFM._basic_euler``): ``x_new = x + dt * v``.

Torch spends four elementwise kernels (two scales, a subtraction, the axpy) plus two copies into
the batch-2B estimator input per step; here it is one pass: read x, v_cond, v_uncond, write x_new
(and, for ``cfg_euler_triton_``, the two halves of the next step's estimator input ``x_in``).

``dt`` may be a Python float or a one-element tensor on the device: the CFM loop keeps ``t_span``
on the device, so the kernel loads dt itself and the host never waits for the GPU. Precompute the
steps once (``dts = t_span.diff()``) and pass ``dts[i]``: a view, so no launch and no copy per step.

Math is fp32 inside whatever the storage dtype; the result is rounded once to ``x.dtype``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._common import interpreting

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the models fall back to plain torch
    triton = tl = None
    HAS_TRITON = False

Dt = Union[float, Tensor]


def euler_ref(x: Tensor, v: Tensor, dt: Dt, upcast: bool = True) -> Tensor:
    """Plain torch: ``x + dt * v`` (meanflow, no guidance).

    ``upcast=True`` computes in fp32 and rounds once to ``x.dtype`` (what the kernel does);
    ``upcast=False`` computes in ``x.dtype``, which is what the model's own expression does."""
    dtype = x.dtype
    if upcast:
        x, v = x.float(), v.float()
        dt = dt.float() if isinstance(dt, Tensor) else dt
    if isinstance(dt, Tensor):
        dt = dt.reshape(())
    return (x + dt * v).to(dtype)


def cfg_euler_ref(x: Tensor, v: Tensor, dt: Dt, cfg_rate: float, upcast: bool = True) -> Tensor:
    """Plain torch: ``x + dt * ((1 + w) * v[:B] - w * v[B:])``: the guided velocity, then ``euler_ref``."""
    B = x.shape[0]
    if upcast:
        v = v.float()
    return euler_ref(x, (1.0 + cfg_rate) * v[:B] - cfg_rate * v[B:], dt, upcast)


if HAS_TRITON:

    @triton.jit
    def _cfg_euler_kernel(
        # pointers
        x_ptr,  # [B, C, T] contiguous, read
        v_ptr,  # [2B, C, T] with CFG (cond rows first), else [B, C, T]
        out_ptr,  # [B, C, T]; may alias x_ptr (in place)
        x_in_ptr,  # [2B, C, T] estimator input, written only when WRITE_X_IN
        dt_ptr,  # one-element tensor, read only when DT_IS_PTR
        # scalars
        dt_val,  # fp32, used when not DT_IS_PTR
        cfg_rate,  # fp32 guidance weight w
        n_elem,  # B * C * T
        # meta-parameters
        CFG: tl.constexpr,
        WRITE_X_IN: tl.constexpr,
        DT_IS_PTR: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elem
        if DT_IS_PTR:
            dt = tl.load(dt_ptr).to(tl.float32)
        else:
            dt = dt_val
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            v_uncond = tl.load(v_ptr + n_elem + offs, mask=mask, other=0.0).to(tl.float32)
            v = (1.0 + cfg_rate) * v - cfg_rate * v_uncond
        y = (x + dt * v).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, y, mask=mask)
        if WRITE_X_IN:
            tl.store(x_in_ptr + offs, y, mask=mask)
            tl.store(x_in_ptr + n_elem + offs, y, mask=mask)


_interpreting = interpreting


def _check_tensor(name: str, t: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("cfg_euler needs Triton, which failed to import: `pip install triton` "
                           "(or use the dispatched chatterbox_rt.kernels.cfg_euler / cfg_euler_ref)")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and _interpreting()):
        raise ValueError(f"{name} is on {t.device}: the Triton kernel takes CUDA tensors, or CPU tensors "
                         "only under the interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())}); call .contiguous() first")


def _launch(x: Tensor, v: Tensor, dt: Dt, cfg_rate: Optional[float], out: Tensor,
            x_in: Optional[Tensor]) -> Tensor:
    cfg = cfg_rate is not None
    if x.dim() != 3:
        raise ValueError(f"x must be [B, C, T], got shape {tuple(x.shape)}")
    B, C, T = x.shape
    want_v = (2 * B, C, T) if cfg else (B, C, T)
    if tuple(v.shape) != want_v:
        what = "[2B, C, T] (conditional rows first, then unconditional)" if cfg else "[B, C, T]"
        raise ValueError(f"v must be {what} = {want_v} for x of shape {tuple(x.shape)}, got {tuple(v.shape)}")
    if tuple(out.shape) != (B, C, T) or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if x_in is not None and (tuple(x_in.shape) != (2 * B, C, T) or x_in.dtype != x.dtype):
        raise ValueError(f"x_in must be [2B, C, T] = {(2 * B, C, T)} {x.dtype}, got {tuple(x_in.shape)} {x_in.dtype}")
    named = [("x", x), ("v", v), ("out", out)] + ([("x_in", x_in)] if x_in is not None else [])
    for name, t in named:
        _check_tensor(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not v.dtype.is_floating_point:
        raise ValueError(f"v must be floating point, got {v.dtype}")

    if isinstance(dt, Tensor):
        if dt.numel() != 1 or dt.device != x.device:
            raise ValueError(f"dt as a tensor must have one element on {x.device} (read inside the kernel so "
                             f"the host never syncs), got shape {tuple(dt.shape)} on {dt.device}")
        dt_ptr, dt_val, dt_is_ptr = dt, 0.0, True
    else:
        dt_ptr, dt_val, dt_is_ptr = x, float(dt), False  # dt_ptr unused

    n = x.numel()
    if n == 0:
        return out
    # The interpreter pays per program, a GPU per register: big blocks there, small ones here.
    block = min(65536, triton.next_power_of_2(n)) if _interpreting() else 1024
    grid = (triton.cdiv(n, block),)
    _cfg_euler_kernel[grid](
        x, v, out, x_in if x_in is not None else out, dt_ptr,
        dt_val, float(cfg_rate) if cfg else 0.0, n,
        CFG=cfg, WRITE_X_IN=x_in is not None, DT_IS_PTR=dt_is_ptr, BLOCK_SIZE=block, num_warps=4,
    )
    return out


def cfg_euler_triton(x: Tensor, v: Tensor, dt: Dt, cfg_rate: float, out: Optional[Tensor] = None) -> Tensor:
    """The Triton launcher of ``chatterbox_rt.kernels.cfg_euler``:
    ``x + dt * ((1 + cfg_rate) * v[:B] - cfg_rate * v[B:])`` -> ``[B, C, T]`` in ``x.dtype``.

    x: ``[B, C, T]``; v: ``[2B, C, T]`` (conditional rows first); dt: float or one-element device
    tensor (no host sync). ``out`` may be ``x`` itself."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _launch(x, v, dt, float(cfg_rate), out, None)


def cfg_euler_triton_(x: Tensor, v: Tensor, dt: Dt, cfg_rate: float, x_in: Tensor) -> Tensor:
    """The Triton launcher of ``chatterbox_rt.kernels.cfg_euler_``, in place: ``x <- x + dt * v_cfg``
    and ``x_in[:B] = x_in[B:] = x`` (the next step's estimator input, so the CFM loop makes no
    copies). Returns ``x``.

    ``x`` may itself be the view ``x_in[:B]``: every element is read before the same program
    writes it.

    NOTE: ``v`` must not alias ``x_in`` (the estimator returns a fresh tensor; a preallocated
    output buffer shared with its input would be overwritten while still being read)."""
    return _launch(x, v, dt, float(cfg_rate), x, x_in)


def euler_triton(x: Tensor, v: Tensor, dt: Dt, out: Optional[Tensor] = None) -> Tensor:
    """The Triton launcher of ``chatterbox_rt.kernels.euler``: meanflow step ``x + dt * v`` ->
    ``[B, C, T]`` in ``x.dtype``; v: ``[B, C, T]``."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _launch(x, v, dt, None, out, None)


__all__ = ["HAS_TRITON", "cfg_euler_ref", "cfg_euler_triton", "cfg_euler_triton_", "euler_ref", "euler_triton"]
