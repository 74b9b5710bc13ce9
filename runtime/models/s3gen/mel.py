"""S3Gen's prompt mel: 24 kHz waveform -> 80-band log-mel at 50 Hz, and the Slaney mel filterbank.

A port of the reference's ``chatterbox/models/s3gen/utils/mel.py::mel_spectrogram`` (Matcha-TTS's
``matcha/utils/audio.py`` with CosyVoice's settings) without librosa. For ``wav`` at 24 kHz:

1. reflect-pad (n_fft - hop) / 2 = 720 samples each side, then an uncentred STFT
   (periodic Hann 1920, hop 480) -> one frame per 480 samples (``T = N // 480`` for ``N >= 1440``);
2. magnitude ``sqrt(re^2 + im^2 + 1e-9)``;
3. project on ``librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000)`` (Slaney
   mel scale, Slaney area norm; reproduced bit-exactly by :func:`slaney_mel_basis`);
4. ``log(clamp(x, 1e-5))``.

The ops mirror the reference one for one, so on the same device and dtype the result is bit-equal.
The reference's S3Gen transposes the result to ``[B, T, 80]`` for its prompt (``embed_ref``);
:func:`prompt_mel` does the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..melbank import hz_to_mel_slaney, mel_to_hz_slaney, slaney_mel_basis  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class MelConfig:
    """The reference's ``mel_spectrogram`` defaults (CosyVoice's ``feat_extractor``)."""

    n_fft: int = 1920
    num_mels: int = 80
    sample_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0
    fmax: float = 8000
    magnitude_eps: float = 1e-9  # added to re^2 + im^2 before the square root
    log_clip: float = 1e-5  # dynamic_range_compression_torch's clip_val


# ----------------------------------------------------------------------------------------------
# Log-mel spectrogram
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _mel_constants(config: MelConfig, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(mel basis ``[num_mels, n_fft // 2 + 1]``, periodic Hann window ``[win_size]``) on device."""
    c = config
    basis = slaney_mel_basis(c.sample_rate, c.n_fft, c.num_mels, c.fmin, c.fmax)
    basis = torch.from_numpy(basis.copy()).to(device=device, dtype=dtype)
    # Built in float32 like the reference (torch.hann_window(win_size)), then moved and cast.
    window = torch.hann_window(c.win_size).to(device=device, dtype=dtype)
    return basis, window


def mel_spectrogram(wav: Tensor, config: MelConfig = MelConfig()) -> Tensor:
    """``[N]`` or ``[B, N]`` waveform at ``config.sample_rate`` -> ``[B, num_mels, T]`` log-mel,
    ``T = (N + 2 * pad - n_fft) // hop + 1`` with ``pad = (n_fft - hop) // 2`` (``N // 480`` here).

    Computed in ``wav``'s dtype on its device. Unlike the reference, it does not sync with the host to
    warn about samples outside [-1, 1]."""
    c = config
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(f"mel_spectrogram expects a [N] or [B, N] waveform, got shape {tuple(wav.shape)}")
    pad = (c.n_fft - c.hop_size) // 2
    if wav.shape[-1] <= pad:
        raise ValueError(f"mel_spectrogram needs more than {pad} samples for its reflect padding, "
                         f"got {wav.shape[-1]}")
    basis, window = _mel_constants(c, wav.device, wav.dtype)
    x = torch.nn.functional.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]  # [B, N + 2 * pad]
    spec = torch.stft(x, c.n_fft, hop_length=c.hop_size, win_length=c.win_size, window=window, center=False,
                      normalized=False, onesided=True, return_complex=True)  # [B, n_fft // 2 + 1, T]
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + c.magnitude_eps)
    mel = torch.matmul(basis, mag)  # [B, num_mels, T]
    return torch.log(torch.clamp(mel, min=c.log_clip))


def prompt_mel(wav_24k: Tensor, config: MelConfig = MelConfig()) -> Tensor:
    """The reference's S3Gen prompt feature (``embed_ref``): :func:`mel_spectrogram` as ``[B, T, num_mels]``."""
    return mel_spectrogram(wav_24k, config).transpose(1, 2)
