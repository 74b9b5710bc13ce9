"""torchaudio's windowed-sinc resampler without torchaudio.

The reference's S3Gen turns the 24 kHz reference clip into 16 kHz for the speech tokenizer and the
x-vector with ``torchaudio.transforms.Resample``; this is that resampler, bit-equal, batched, on
the waveform's device. (``chatterbox_rt.audio`` re-exports it next to the librosa-equal
``resample``.)
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# torchaudio.functional.resample defaults
SINC_LOWPASS_FILTER_WIDTH = 6
SINC_ROLLOFF = 0.99


def _check_rate(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"sinc_resample: {what} must be a positive integer sample rate, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# torchaudio's windowed-sinc resampler
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, exact_dtype: Optional[torch.dtype]) -> tuple[Tensor, int]:
    """torchaudio's ``_get_sinc_resample_kernel`` (sinc_interp_hann) for gcd-reduced rates, on CPU.

    ``exact_dtype=None`` follows ``transforms.Resample()`` (float64 math, rounded to float32);
    a dtype follows ``functional.resample`` on a waveform of that dtype (math in that dtype).
    Returns (kernel ``[new, 1, 2 * width + orig]``, width)."""
    lpw = SINC_LOWPASS_FILTER_WIDTH
    base_freq = min(orig, new) * SINC_ROLLOFF  # anti-aliasing cutoff, also when upsampling
    width = math.ceil(lpw * orig / base_freq)  # taps either side, in input samples
    idx = torch.arange(-width, width + orig, dtype=exact_dtype or torch.float64)[None, None] / orig
    # NOTE: with dtype None torchaudio's output-phase term is an int64 arange divided in the default
    # float dtype (float32), then promoted to float64; kept for bit equality.
    t = torch.arange(0, -new, -1, dtype=exact_dtype)[:, None, None] / new + idx  # [new, 1, taps]
    t *= base_freq
    t = t.clamp_(-lpw, lpw)
    window = torch.cos(t * math.pi / lpw / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (base_freq / orig)
    if exact_dtype is None:
        kernels = kernels.to(torch.float32)
    return kernels, width


@lru_cache(maxsize=16)
def _sinc_kernel_on(orig: int, new: int, device: torch.device, dtype: torch.dtype,
                    as_functional: bool) -> tuple[Tensor, int]:
    kernel, width = _sinc_kernel(orig, new, dtype if as_functional else None)
    return kernel.to(device=device, dtype=dtype), width


def sinc_resample(wav: Tensor, orig_sr: int, new_sr: int, *, as_functional: bool = False) -> Tensor:
    """``[..., N]`` -> ``[..., ceil(N * new_sr / orig_sr)]`` with torchaudio's Hann-windowed sinc
    interpolation (lowpass_filter_width 6, rolloff 0.99), on ``wav``'s device and dtype.

    By default the kernel is built as ``torchaudio.transforms.Resample(orig_sr, new_sr)`` builds it
    (float64, rounded to float32; what the reference's S3Gen uses), then cast to ``wav``'s dtype.
    ``as_functional=True`` builds it as ``torchaudio.functional.resample`` does, in ``wav``'s dtype;
    the kernels differ by float32 rounding, the outputs by up to ~1e-5 on full-scale float32 input
    (6e-6 measured on speech, 22050 -> 24000). Kernels are cached per rates/device/dtype.
    """
    orig_sr = _check_rate(orig_sr, "orig_sr")
    new_sr = _check_rate(new_sr, "new_sr")
    if not wav.is_floating_point():
        raise TypeError(f"sinc_resample expects a floating point waveform, got {wav.dtype}")
    if orig_sr == new_sr:
        return wav
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    kernel, width = _sinc_kernel_on(orig, new, wav.device, wav.dtype, as_functional)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1])  # [B, N]
    length = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    # One output phase per kernel row; stride orig: y[j + new] reuses y[j]'s filter shifted by orig.
    y = F.conv1d(x[:, None], kernel, stride=orig)  # [B, new, L]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    # NOTE: torchaudio takes the ceiling of the length rounded to float32 (torch.as_tensor of a
    # Python float); for long inputs that can drop the last sample, and so does this.
    target_length = math.ceil(np.float32(new * length / orig))
    return y[..., :target_length].reshape(shape[:-1] + (-1,))
