"""Audio input for the runtime: loading and validating voice clips, and the two resamplers the
reference uses, reproduced without librosa or torchaudio.

* :func:`load_audio` reads a file with ``soundfile`` (or takes an array) and returns float32 mono,
  mixed down as ``librosa.load`` does (mean over channels). With ``target_sr`` it equals
  ``librosa.load(path, sr=target_sr)``, which is how the reference loads reference clips.
* :func:`resample` is ``librosa.resample``'s default (``res_type="soxr_hq"``): soxr's HQ preset, then
  the output is cut or zero-padded to ``ceil(n * target_sr / orig_sr)`` samples (``fix=True``).
* :func:`sinc_resample` is torchaudio's windowed-sinc resampler (``torchaudio.transforms.Resample`` /
  ``torchaudio.functional.resample`` with their defaults), which the reference's S3Gen uses to turn
  the 24 kHz reference clip into 16 kHz for the speech tokenizer and the speaker encoder.

Every bad input raises :class:`AudioError` naming the file (or ``"array"``) and the problem.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Union

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from .models.resample import sinc_resample  # noqa: F401  (re-exported: part of this module's API)

SILENCE_PEAK = 1e-4  # -80 dBFS: a clip whose peak is below this is treated as silent
SOXR_QUALITY = "soxr_hq"  # librosa.resample's default res_type, passed to soxr as librosa does
MAX_CHANNELS = 8  # an axis of a 2-D array is a channel axis only if it is this short
# soundfile's float conversion of integer PCM: divide by 2^(bits - 1); 8-bit WAV is unsigned.
_INT_SCALE = {np.dtype(np.int8): 2.0 ** 7, np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31,
              np.dtype(np.int64): 2.0 ** 63}

PathLike = Union[str, os.PathLike]


class AudioError(ValueError):
    """A voice clip or audio array that cannot be used; the message names the source and the problem."""


def _check_rate(value, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise AudioError(f"{name}: {what} must be a positive int, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _read_file(path: PathLike, name: str) -> tuple[np.ndarray, int]:
    """-> (``[C, N]`` float32, sample rate); soundfile's float conversion of the stored samples."""
    if not os.path.exists(path):
        raise AudioError(f"{name}: file not found")
    if os.path.isdir(path):
        raise AudioError(f"{name}: is a directory, not an audio file")
    try:
        with sf.SoundFile(path) as f:
            sr = f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError, TypeError) as e:
        raise AudioError(f"{name}: cannot read as audio ({e})") from e
    return data.T, sr


def _array_to_channels(wav, name: str) -> np.ndarray:
    """numpy array or torch tensor -> ``[C, N]`` float32 (C = 1 for 1-D input)."""
    if isinstance(wav, Tensor):
        wav = wav.detach().cpu()
        if wav.is_floating_point() and wav.dtype not in (torch.float32, torch.float64):
            wav = wav.float()  # numpy has no bfloat16
        wav = wav.numpy()
    wav = np.asarray(wav)
    if wav.dtype == np.uint8:
        wav = (wav.astype(np.float32) - 128.0) / 128.0
    elif wav.dtype in _INT_SCALE:
        wav = (wav.astype(np.float64) / _INT_SCALE[wav.dtype]).astype(np.float32)
    elif np.issubdtype(wav.dtype, np.floating):
        wav = wav.astype(np.float32, copy=False)
    else:
        raise AudioError(f"{name}: unsupported sample dtype {wav.dtype} (expected float or signed int PCM)")
    if wav.ndim == 1:
        return wav[None]
    if wav.ndim != 2:
        raise AudioError(f"{name}: expected a 1-D [samples] or 2-D [channels, samples] / [samples, channels] "
                         f"array, got shape {wav.shape}")
    if wav.size == 0:
        raise AudioError(f"{name}: contains no samples (shape {wav.shape})")
    # The shorter axis is the channel axis (ties: the first, i.e. [channels, samples]).
    if wav.shape[1] < wav.shape[0]:
        wav = wav.T
    if wav.shape[0] > MAX_CHANNELS:
        raise AudioError(f"{name}: cannot tell channels from samples in shape {wav.shape}: the shorter axis "
                         f"({wav.shape[0]}) is longer than {MAX_CHANNELS} channels")
    return wav


def _mix_down(chans: np.ndarray) -> np.ndarray:
    """``[C, N]`` -> ``[N]``, exactly as librosa.to_mono (float32 mean over channels)."""
    if chans.shape[0] == 1:
        return np.ascontiguousarray(chans[0])
    return np.ascontiguousarray(np.mean(chans, axis=0))


def _check_samples(wav: np.ndarray, name: str) -> None:
    if wav.shape[-1] == 0:
        raise AudioError(f"{name}: contains no samples")
    finite = np.isfinite(wav)
    if not finite.all():
        n_nan = int(np.isnan(wav).sum())
        n_inf = int(np.isinf(wav).sum())
        first = int(np.argmin(finite))
        raise AudioError(f"{name}: {n_nan} NaN and {n_inf} inf sample(s) (after mixing to mono); "
                         f"the first is at sample {first} of {wav.shape[-1]}")


def load_audio(src: Union[PathLike, np.ndarray, Tensor], sr: Optional[int] = None, *,
               target_sr: Optional[int] = None, name: Optional[str] = None) -> tuple[np.ndarray, int]:
    """Load a clip as float32 mono ``[N]`` -> ``(wav, sample_rate)``.

    ``src`` is a file path (read with soundfile; ``sr`` must then be None or match the file) or an
    array / tensor with its sample rate ``sr``. Arrays: 1-D is mono; for 2-D, the shorter axis is the
    channel axis (a tie means ``[channels, samples]``) and it must be at most ``MAX_CHANNELS`` long.
    Integer arrays are scaled like soundfile's float conversion (int16 / 32768, uint8 as unsigned
    8-bit PCM). Channels are averaged (``librosa.to_mono``). If ``target_sr`` is given and differs,
    the clip is resampled with :func:`resample`, so ``load_audio(path, target_sr=sr)`` equals
    ``librosa.load(path, sr=sr)``. Silence is accepted here; see :func:`check_voice_clip`.
    """
    is_path = isinstance(src, (str, os.PathLike))
    if name is None:
        name = os.fspath(src) if is_path else "array"
    if is_path:
        chans, file_sr = _read_file(src, name)
        if sr is not None and _check_rate(sr, "sr", name) != file_sr:
            raise AudioError(f"{name}: sr={sr} was given but the file is at {file_sr} Hz")
        sr = file_sr
    else:
        if sr is None:
            raise AudioError(f"{name}: the sample rate (sr) is required with an array")
        sr = _check_rate(sr, "sr", name)
        chans = _array_to_channels(src, name)
    wav = _mix_down(chans)
    _check_samples(wav, name)
    if target_sr is not None:
        target_sr = _check_rate(target_sr, "target_sr", name)
        if target_sr != sr:
            wav, sr = resample(wav, sr, target_sr), target_sr
    return wav, sr


def check_voice_clip(wav: Union[np.ndarray, Tensor], sr: int, *, min_seconds: float, name: str = "array") -> None:
    """Raise :class:`AudioError` if a mono clip is shorter than ``min_seconds`` or silent (peak below
    ``SILENCE_PEAK``, -80 dBFS)."""
    sr = _check_rate(sr, "sr", name)
    n = int(wav.shape[-1])
    seconds = n / sr
    if seconds < min_seconds:
        raise AudioError(f"{name}: the clip is {seconds:.2f} s long ({n} samples at {sr} Hz); "
                         f"at least {min_seconds:g} s is needed")
    peak = float(wav.abs().max()) if isinstance(wav, Tensor) else float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        db = 20 * math.log10(peak) if peak > 0 else -math.inf
        raise AudioError(f"{name}: the clip is silent (peak {peak:.2e} = {db:.1f} dBFS, below -80 dBFS)")


# ----------------------------------------------------------------------------------------------
# librosa.resample (soxr_hq)
# ----------------------------------------------------------------------------------------------
def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """float32 ``[..., N]`` -> ``[..., ceil(N * target_sr / orig_sr)]``, bit-equal to
    ``librosa.resample(wav, orig_sr=orig_sr, target_sr=target_sr)`` (soxr HQ, then ``fix_length``)."""
    orig_sr = _check_rate(orig_sr, "orig_sr", "resample")
    target_sr = _check_rate(target_sr, "target_sr", "resample")
    wav = np.asarray(wav, dtype=np.float32)
    if orig_sr == target_sr:
        return wav
    n_out = int(np.ceil(wav.shape[-1] * (float(target_sr) / orig_sr)))  # librosa's formula, in float64
    rows = wav.reshape(-1, wav.shape[-1])
    out = np.zeros((rows.shape[0], n_out), dtype=np.float32)
    for row, dst in zip(rows, out, strict=True):
        y = soxr.resample(np.ascontiguousarray(row), orig_sr, target_sr, quality=SOXR_QUALITY)
        m = min(n_out, y.shape[-1])
        dst[:m] = y[:m]  # librosa.util.fix_length: trim, or zero-pad at the end
    return out.reshape(wav.shape[:-1] + (n_out,))
