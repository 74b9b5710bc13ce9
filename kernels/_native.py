"""Loader and Python wrappers of the native operators (csrc/ -> ``chatterbox_rt._C``).

Importing ``chatterbox_rt._C`` registers ``torch.ops.chatterbox_rt.*`` (TORCH_LIBRARY schemas with
out-params, CPU/CUDA kernels, Meta kernels for fake tensors; csrc/bindings.cpp). The extension is
optional (setup.py skips or gives up on it quietly): ``load()`` tries once and logs one warning
when it is missing, ``available(device_type)`` says whether an op set can run on a device, and the
wrappers below allocate outputs and call the ops.

Math (references in runtime/models/s3gen): ``snake`` = hift.py Snake.forward; ``istft`` =
decode's exp/sin head + ``_istft`` + clamp; ``cfg_euler``/``euler`` = cfm.py's Euler updates.
``ngram_counts`` (CPU only, its own availability check) = the exact n-gram counting of
chatterbox_rt.tokens.analyze (``_ngram_counts_fast``, numpy).
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional, Union

import torch

logger = logging.getLogger("chatterbox_rt")

_NAMESPACE = "chatterbox_rt"
OPS = ("snake", "istft", "cfg_euler", "cfg_euler_refresh", "euler")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_state: dict = {"tried": False, "module": None}


def load():
    """Import ``chatterbox_rt._C`` once; the module, or None (one warning) when it is not built."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = importlib.import_module("chatterbox_rt._C")
        except Exception as e:  # noqa: BLE001 - ImportError, or an ABI mismatch (OSError/undefined symbol)
            logger.warning("chatterbox_rt native ops unavailable (%s: %s); using the plain-torch paths. "
                           "Rebuild with `pip install -e . --no-build-isolation` to get them.", type(e).__name__, e)
    return _state["module"]


def available(device_type: str = "cpu") -> bool:
    """True when the extension is loaded and every op has a kernel for ``device_type`` ("cpu"/"cuda")."""
    key = _DISPATCH_KEYS.get(device_type)
    if key is None or load() is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{op}", key) for op in OPS)


def _ops():
    if load() is None:
        raise RuntimeError("chatterbox_rt native extension (chatterbox_rt._C) is not built; check "
                           "kernels._native.available() first, or reinstall with `pip install -e . --no-build-isolation`")
    return torch.ops.chatterbox_rt


def int8_linear_available() -> bool:
    """True when the extension is loaded with its CPU weight-only INT8 kernel (CPU only: on a GPU the
    Triton kernel runs)."""
    return load() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::int8_linear", "CPU")


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x [M, K] @ q [N, K].T) * scale [N]``: contiguous fp32 x, int8 q, fp32 scale -> fp32 ``[M, N]``."""
    if out is None:
        out = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32, device=x.device)
    _ops().int8_linear(out, x, q, scale)
    return out


def ngram_counts_available() -> bool:
    """True when the extension is loaded with its CPU token-statistics kernels (``ngram_counts`` and
    ``token_stats``, for chatterbox_rt.tokens.analyze)."""
    return load() is not None and all(torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{op}", "CPU")
                                      for op in ("ngram_counts", "token_stats"))


def ngram_counts(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int,
                 max_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact n-gram counts, n = 1..max_n, of ``tokens [N]`` (uint8/int16/int32/int64 in
    [0, vocab_size)) cut into rows of ``lengths [R]`` (int64, summing to N); no n-gram crosses a row.

    Returns ``(sizes [max_n, N // 2] int32, n_sizes [max_n], ones [max_n])``: the n-grams that occur
    at least twice have the counts ``sizes[n - 1, :n_sizes[n - 1]]`` (lexicographic order of the
    n-grams), ``ones[n - 1]`` n-grams occur once. Only the rows' used prefixes of ``sizes`` are
    written (a level has at most N / 2 such groups; the rest of the buffer is never touched).
    Needs ``(max_n - 1) * vocab_size.bit_length() <= 95``."""
    n = tokens.numel()
    sizes = torch.empty(max_n, n // 2, dtype=torch.int32)
    n_sizes = torch.empty(max_n, dtype=torch.int64)
    ones = torch.empty(max_n, dtype=torch.int64)
    _ops().ngram_counts(sizes, n_sizes, ones, tokens, lengths, vocab_size)
    return sizes, n_sizes, ones


def token_stats(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int,
                longest: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(code_counts [vocab_size], run_hist [longest + 1])`` (int64) of the same token stream as
    ``ngram_counts``: occurrences of each token, and how many runs of L equal tokens there are
    (``run_hist[L]``; runs end at row boundaries). ``longest``: the longest row (computed if None)."""
    if longest is None:
        longest = int(lengths.max()) if lengths.numel() else 0
    code_counts = torch.empty(vocab_size, dtype=torch.int64)
    run_hist = torch.empty(longest + 1, dtype=torch.int64)
    _ops().token_stats(code_counts, run_hist, tokens, lengths)
    return code_counts, run_hist


def _dt_tensor(dt: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """dt as a 1-element tensor on x's device (a float becomes a device tensor without a host sync)."""
    if isinstance(dt, torch.Tensor):
        return dt  # the op checks it has one element
    return torch.full((1,), float(dt), dtype=torch.float32, device=x.device)


def snake(x: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-9, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + sin(alpha x)^2 / (alpha + eps)``, x ``[B, C, T]``, alpha ``[C]``; fp32 math, output in x's dtype."""
    if out is None:
        out = torch.empty_like(x)
    _ops().snake(out, x, alpha, eps)
    return out


def istft(spec: torch.Tensor, window: torch.Tensor, n_fft: int = 16, hop: int = 4, audio_limit: float = 0.99,
          n_frames: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HiFT head: spec ``[B, n_fft + 2, F]`` (log-magnitudes, then phase logits) -> fp32 ``[B, hop (F - 1)]``.

    ``n_frames [B]`` (valid frames per row, on spec's device) gives hift.py's masked ``_istft``."""
    B, F = spec.shape[0], spec.shape[-1]
    if out is None:
        out = torch.empty(B, hop * (F - 1) if F > 0 else 0, dtype=torch.float32, device=spec.device)
    _ops().istft(out, spec, window, n_fft, hop, audio_limit, n_frames)
    return out


def cfg_euler(x: torch.Tensor, v: torch.Tensor, dt: Union[float, torch.Tensor], cfg_rate: float,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + dt ((1 + cfg_rate) v[:B] - cfg_rate v[B:])``, v ``[2B, ...]`` conditional rows first."""
    if out is None:
        out = torch.empty_like(x)
    _ops().cfg_euler(out, x, v, _dt_tensor(dt, x), cfg_rate)
    return out


def cfg_euler_(x: torch.Tensor, v: torch.Tensor, dt: Union[float, torch.Tensor], cfg_rate: float,
               x_in: torch.Tensor) -> torch.Tensor:
    """In place: the CFG Euler step on x, and x copied into both halves of ``x_in [2B, ...]``. Returns x."""
    _ops().cfg_euler_refresh(x, x_in, v, _dt_tensor(dt, x), cfg_rate)
    return x


def euler(x: torch.Tensor, v: torch.Tensor, dt: Union[float, torch.Tensor],
          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + dt v`` (meanflow, no CFG)."""
    if out is None:
        out = torch.empty_like(x)
    _ops().euler(out, x, v, _dt_tensor(dt, x))
    return out


__all__ = ["load", "available", "snake", "istft", "cfg_euler", "cfg_euler_", "euler", "OPS", "ngram_counts",
           "ngram_counts_available", "token_stats"]
