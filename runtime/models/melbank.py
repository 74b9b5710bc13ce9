"""The Slaney mel filterbank without librosa (a leaf module: numpy only, so every front end can
import it without import cycles)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# ----------------------------------------------------------------------------------------------
# Slaney mel scale and filterbank: librosa.filters.mel(htk=False, norm="slaney", dtype=float32).
# ----------------------------------------------------------------------------------------------
_SLANEY_F_SP = 200.0 / 3  # Hz per mel in the linear region
_SLANEY_MIN_LOG_HZ = 1000.0  # start of the log region
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel_slaney(freqs) -> np.ndarray:
    freqs = np.asanyarray(freqs, dtype=np.float64)
    mels = freqs / _SLANEY_F_SP
    log_t = freqs >= _SLANEY_MIN_LOG_HZ
    return np.where(log_t, _SLANEY_MIN_LOG_MEL + np.log(np.where(log_t, freqs, 1.0) / _SLANEY_MIN_LOG_HZ)
                    / _SLANEY_LOGSTEP, mels)


def mel_to_hz_slaney(mels) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    freqs = _SLANEY_F_SP * mels
    log_t = mels >= _SLANEY_MIN_LOG_MEL
    return np.where(log_t, _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mels - _SLANEY_MIN_LOG_MEL)), freqs)


@lru_cache(maxsize=8)
def slaney_mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` float32 triangular Slaney filters, bit-equal to
    ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)``. Read-only."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # NOTE: librosa stores the triangles in a float32 array, then scales them in float64 and
    # rounds again; both roundings are kept for bit equality.
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights = (weights.astype(np.float64) * enorm[:, None]).astype(np.float32)
    weights.setflags(write=False)
    return weights
