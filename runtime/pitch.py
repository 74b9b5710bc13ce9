"""Pitch matching for voice conversion: move the source's F0 toward the target voice's before tokenising.

Voice conversion keeps the source clip's prosody, and with it the source speaker's pitch register,
which leaks into the output. ``match_pitch`` shifts the source by the semitones between its median F0
and the target's (``planned_shift``: nothing below ``tolerance``, at most ``max_shift``).

Both halves are Praat's, through ``praat-parselmouth`` (the ``vc`` extra), chosen by measurement
(``profiling/bench_pitch.py``, synthetic speech with a known F0 track, 16 and 24 kHz):

* F0: Praat's autocorrelation pitch (Boersma 1993, "Accurate short-term analysis of the fundamental
  frequency and the harmonics-to-noise ratio of a sampled sound"), 10 ms hop, 50-800 Hz. Median
  within 1 cent of the truth, clean or at 20 dB SNR, ~240x real time on one core; WORLD's
  dio+stonemask was as accurate and 3x slower, harvest 10 cents off and 50x slower.
* Shift: TD-PSOLA (Moulines & Charpentier 1990) as Praat's Manipulation "overlap-add" resynthesis:
  the pitch tier multiplied by 2^(k/12), the periods re-spaced, each kept whole, so the spectral
  envelope (the formants) stays where it was. Within 1.5 cents of the requested shift up to +-12
  semitones, 0.5-2.4 dB from the envelope of an ideal shift, the input's exact length, ~140x real
  time. Rubber Band (pedalboard) was as accurate but moved the envelope by 3-19 dB even with its
  formant preservation; WORLD resynthesis was 2-4 dB off, not length-exact, 20x real time.

Unvoiced frames (fricatives, silence) are copied through unchanged by PSOLA.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

# Within one semitone a shift is not worth its processing: a speaker's median F0 varies by about
# that much from one utterance to the next, and PSOLA, though good, is not a no-op.
DEFAULT_PITCH_TOLERANCE = 1.0
# One octave: the typical gap between male (~110 Hz) and female (~220 Hz) medians, so cross-gender
# conversion is matched fully; beyond it PSOLA's repeated or dropped periods become audible
# (a hoarse, doubled voice) and the measured envelope error keeps growing (2.4 dB at +12).
DEFAULT_MAX_PITCH_SHIFT = 12.0

PITCH_FLOOR_HZ = 50.0  # below the lowest male speaking F0 (~60-70 Hz)
PITCH_CEILING_HZ = 800.0  # above a child's or a raised female voice
TIME_STEP_S = 0.01
# Praat's autocorrelation window spans 3 periods of the floor: shorter clips cannot be analysed.
MIN_ANALYSIS_S = 3.0 / PITCH_FLOOR_HZ
# Fewer voiced frames than this (0.1 s) and a median F0 means nothing.
MIN_VOICED_FRAMES = 10

_INSTALL = "pip install 'chatterbox-rt[vc]'"


def _parselmouth():
    try:
        import parselmouth
    except ImportError as e:
        raise ImportError(f"chatterbox_rt.pitch needs praat-parselmouth: {_INSTALL}") from e
    return parselmouth


def _check_sr(sr) -> None:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sr must be a positive integer sample rate in Hz, got {sr!r}")


def _check_wav(wav) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"wav must be a mono 1-D array of samples, got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"wav must hold floating-point samples in [-1, 1], got dtype {wav.dtype}")
    if not np.all(np.isfinite(wav)):
        raise ValueError("wav contains NaN or infinite samples")
    return wav


def _check_finite(name: str, value, *, nonnegative: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0 semitones, got {value}")
    return value


def _check_f0(name: str, f0) -> Optional[float]:
    if f0 is None:
        return None
    f0 = _check_finite(name, f0)
    if f0 <= 0:
        raise ValueError(f"{name} must be a positive frequency in Hz or None, got {f0}")
    return f0


def _sound(wav: np.ndarray, sr: int):
    return _parselmouth().Sound(wav.astype(np.float64), sampling_frequency=float(sr))


def median_f0(wav: np.ndarray, sr: int) -> Optional[float]:
    """Median F0 in Hz over the voiced frames of a mono clip; None when (almost) nothing is voiced
    (fewer than ``MIN_VOICED_FRAMES`` 10 ms frames, or a clip shorter than ``MIN_ANALYSIS_S``)."""
    wav = _check_wav(wav)
    _check_sr(sr)
    if len(wav) < MIN_ANALYSIS_S * sr:
        return None
    pitch = _sound(wav, sr).to_pitch_ac(time_step=TIME_STEP_S, pitch_floor=PITCH_FLOOR_HZ,
                                        pitch_ceiling=PITCH_CEILING_HZ)
    f0 = pitch.selected_array["frequency"]
    voiced = f0[f0 > 0]  # Praat marks unvoiced frames with 0
    if len(voiced) < MIN_VOICED_FRAMES:
        return None
    return float(np.median(voiced))


def semitones_between(f0_from: float, f0_to: float) -> float:
    """12 log2(f0_to / f0_from): the shift that takes ``f0_from`` to ``f0_to``."""
    f0_from, f0_to = _check_f0("f0_from", f0_from), _check_f0("f0_to", f0_to)
    if f0_from is None or f0_to is None:
        raise ValueError("semitones_between needs two frequencies, got None")
    return 12.0 * math.log2(f0_to / f0_from)


def planned_shift(source_f0: Optional[float], target_f0: Optional[float],
                  tolerance: float = DEFAULT_PITCH_TOLERANCE, max_shift: float = DEFAULT_MAX_PITCH_SHIFT) -> float:
    """Semitones to shift the source by: 0.0 when either F0 is None or they are less than
    ``tolerance`` apart, else the difference clipped to +-``max_shift``."""
    tolerance = _check_finite("tolerance", tolerance, nonnegative=True)
    max_shift = _check_finite("max_shift", max_shift, nonnegative=True)
    source_f0, target_f0 = _check_f0("source_f0", source_f0), _check_f0("target_f0", target_f0)
    if source_f0 is None or target_f0 is None:
        return 0.0
    d = semitones_between(source_f0, target_f0)
    if abs(d) < tolerance:
        return 0.0
    return float(min(max(d, -max_shift), max_shift))


def shift_pitch(wav: np.ndarray, sr: int, semitones: float) -> np.ndarray:
    """The clip with its F0 multiplied by 2^(semitones/12) by PSOLA: same length, same timing, same
    formants; float32. A 0 shift, or a clip too short for pitch analysis, comes back unchanged."""
    wav = _check_wav(wav)
    _check_sr(sr)
    semitones = _check_finite("semitones", semitones)
    if semitones == 0.0 or len(wav) < MIN_ANALYSIS_S * sr:
        return wav.astype(np.float32)
    from parselmouth.praat import call

    snd = _sound(wav, sr)
    manip = call(snd, "To Manipulation", TIME_STEP_S, PITCH_FLOOR_HZ, PITCH_CEILING_HZ)
    tier = call(manip, "Extract pitch tier")
    call(tier, "Multiply frequencies", snd.xmin, snd.xmax, 2.0 ** (semitones / 12.0))
    call([tier, manip], "Replace pitch tier")
    out = call(manip, "Get resynthesis (overlap-add)").values[0]
    # NOTE: Praat resynthesises over the input's time domain, so this holds; a changed Praat would
    # break the length contract silently without the check.
    if len(out) != len(wav):
        raise RuntimeError(f"PSOLA returned {len(out)} samples for {len(wav)}")
    return out.astype(np.float32)


def match_pitch(source: np.ndarray, sr: int, target_f0: Optional[float], *,
                tolerance: float = DEFAULT_PITCH_TOLERANCE,
                max_shift: float = DEFAULT_MAX_PITCH_SHIFT) -> tuple[np.ndarray, float]:
    """Shift ``source`` toward ``target_f0`` (Hz, e.g. ``median_f0`` of the target clip):
    ``(audio, semitones applied)``. With no shift planned (target None, unvoiced source, within
    ``tolerance``) the input array itself comes back, with 0.0."""
    source = _check_wav(source)
    _check_sr(sr)
    target_f0 = _check_f0("target_f0", target_f0)
    planned_shift(None, None, tolerance, max_shift)  # validates tolerance/max_shift before any analysis
    if target_f0 is None:
        return source, 0.0
    k = planned_shift(median_f0(source, sr), target_f0, tolerance, max_shift)
    if k == 0.0:
        return source, 0.0
    return shift_pitch(source, sr, k), k
