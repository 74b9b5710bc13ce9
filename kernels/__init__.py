"""Fused ops: each runs on any device and dtype, through the dispatch layer (kernels/dispatch.py).

The public ops (CUDA -> Triton -> plain torch on a GPU, C++ -> plain torch on a CPU; float64 always
plain torch; ``CHATTERBOX_RT_KERNELS=native|triton|cuda|cpp`` forces a backend, and raises
``KernelUnavailable`` when it cannot run on the tensors' device):

* ``snake(x, alpha, eps=1e-9, mask=None)`` — HiFT's Snake activation of ``x [B, C, T]`` with
  ``alpha [C]`` (``mask [B, 1, T]``: ``snake(x * mask)``), in x's dtype
* ``istft(spec, window, n_fft=16, hop=4, audio_limit=0.99, n_frames=None)`` — HiFT's head from
  conv_post's output ``[B, n_fft + 2, F]`` to clamped fp32 samples ``[B, hop (F - 1)]`` (``[B, 0]``
  for F <= 1)
* ``cfg_euler(x, v, dt, cfg_rate)`` — the CFM's Euler step with CFG, ``x + dt ((1 + w) v[:B] - w v[B:])``,
  a new tensor (x untouched); ``cfg_euler_(x, v, dt, cfg_rate, x_in)`` the same in place, also writing
  x into both halves of the next estimator input ``x_in``; ``euler(x, v, dt)`` — ``x + dt v``
* ``sample(logits, seen, *, order, temperature=1.0, top_p=1.0, min_p=0.0, top_k=0,
  repetition_penalty=1.0, cfg_weight=None, seed=0, offset=0)`` — T3's per-step sampling, one int64
  token per row (-1 for a row with nothing left): the Triton kernel without a host sync where it can
  run, else ``sample_ref`` (plain torch, the same distribution, not the same random stream)

Their forms, one module per op (kernels/snake_op.py, istft_op.py, cfg_euler_op.py, sample_op.py):
the Triton launchers ``snake_triton``, ``istft_triton``, ``cfg_euler_triton``, ``cfg_euler_triton_``
(in place), ``euler_triton``, ``sample_triton`` (CUDA tensors, or CPU ones under
``TRITON_INTERPRET=1``), and the plain-torch references ``snake_ref``, ``istft_ref``,
``cfg_euler_ref``, ``euler_ref``, ``sample_ref``, ``processed_probs_ref``. No submodule is named
after a public op, so importing one never rebinds an op's name on this package.

Importing the package does not import triton: the public ops load a backend on their first call,
and the launchers and references resolve lazily.
"""
from importlib import import_module
from typing import Optional, Union

import torch

from . import dispatch
from .dispatch import KernelUnavailable

Dt = Union[float, torch.Tensor]
IntOrTensor = Union[int, torch.Tensor]

# Lazily resolved forms: name -> submodule.
_EXPORTS = {
    "snake_triton": "snake_op", "snake_ref": "snake_op",
    "istft_triton": "istft_op", "istft_ref": "istft_op",
    "cfg_euler_triton": "cfg_euler_op", "cfg_euler_triton_": "cfg_euler_op", "euler_triton": "cfg_euler_op",
    "cfg_euler_ref": "cfg_euler_op", "euler_ref": "cfg_euler_op",
    "sample_triton": "sample_op", "sample_ref": "sample_op", "processed_probs_ref": "sample_op",
}
OPS = ("snake", "istft", "cfg_euler", "cfg_euler_", "euler", "sample")
__all__ = sorted(OPS + tuple(_EXPORTS)) + ["KernelUnavailable", "dispatch"]


def snake(x: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-9,
          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + sin(alpha x)^2 / (alpha + eps)`` for ``x [B, C, T]``, ``alpha [C]``; with ``mask [B, 1, T]``
    the Snake of ``x * mask``. Output in x's dtype, on x's device."""
    return dispatch.choose("snake", x.device).fn(x, alpha, eps, mask=mask)


def istft(spec: torch.Tensor, window: torch.Tensor, n_fft: int = 16, hop: int = 4, audio_limit: float = 0.99,
          n_frames: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HiFT's head: ``spec [B, n_fft + 2, F]`` (log-magnitudes, then phase logits), ``window [n_fft]``
    -> the clamped waveform, fp32 ``[B, hop (F - 1)]`` (``[B, 0]`` for F <= 1). ``n_frames [B]``
    (integer, on spec's device): valid frames per row of a padded batch."""
    return dispatch.choose("istft", spec.device).fn(spec, window, n_fft, hop, audio_limit, n_frames=n_frames)


def cfg_euler(x: torch.Tensor, v: torch.Tensor, dt: Dt, cfg_rate: float) -> torch.Tensor:
    """One CFG Euler step, ``x + dt ((1 + cfg_rate) v[:B] - cfg_rate v[B:])``, as a new tensor in x's
    dtype (x is not modified). x ``[B, ...]``, v ``[2B, ...]`` (conditional rows first); dt a float or
    a one-element tensor on x's device (no host sync)."""
    return dispatch.choose("cfg_euler", x.device).fn(x, v, dt, cfg_rate)


def cfg_euler_(x: torch.Tensor, v: torch.Tensor, dt: Dt, cfg_rate: float, x_in: torch.Tensor) -> torch.Tensor:
    """``cfg_euler`` in place on x, and x copied into both halves of ``x_in [2B, ...]`` (the next
    step's estimator input). Returns x."""
    return dispatch.choose("cfg_euler_", x.device).fn(x, v, dt, cfg_rate, x_in)


def euler(x: torch.Tensor, v: torch.Tensor, dt: Dt) -> torch.Tensor:
    """One Euler step without guidance (meanflow), ``x + dt v``, as a new tensor in x's dtype."""
    return dispatch.choose("euler", x.device).fn(x, v, dt)


def sample(logits: torch.Tensor, seen: torch.Tensor, *, order: str, temperature: float = 1.0, top_p: float = 1.0,
           min_p: float = 0.0, top_k: int = 0, repetition_penalty: float = 1.0, cfg_weight: Optional[float] = None,
           seed: IntOrTensor = 0, offset: IntOrTensor = 0) -> torch.Tensor:
    """One token per request -> int64 ``[R]`` (-1 for a row whose tokens were all filtered out).

    logits ``[2R, V]`` (conditional rows, then unconditional; combined with ``cfg_weight``) or
    ``[R, V]``; seen: bool ``[R, V]`` (tokens drawn so far, for the repetition penalty); order:
    "llama" (penalty, temperature, min-p, top-p, top-k) or "gpt" (temperature, top-k, top-p,
    penalty; min_p unused). The defaults are the no-op values of each stage. seed, offset: ints or
    int64 tensors on logits' device (1 or R elements); the Triton kernel draws from Philox keyed by
    them without a host sync, the plain-torch form from a torch generator seeded by them (reads them
    on the host)."""
    kw = {"order": order, "temperature": temperature, "top_p": top_p, "min_p": min_p, "top_k": top_k,
          "repetition_penalty": repetition_penalty, "cfg_weight": cfg_weight, "seed": seed, "offset": offset}
    fn = dispatch.choose("sample", logits.device).fn
    if fn is None:  # native: dispatch leaves T3 its own torch chain; here the same chain as one call
        from .sample_op import check_inputs, sample_ref

        check_inputs(logits, seen, order, cfg_weight)
        return sample_ref(logits, seen, **kw)
    return fn(logits, seen, **kw)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
