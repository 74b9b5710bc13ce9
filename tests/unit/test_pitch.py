"""chatterbox_rt.pitch on synthetic speech with a known F0 track (``profiling/bench_pitch.synth_voice``:
a glottal source with declination and vibrato through formant resonators, with silences and
fricative noise bursts). Bounds are stated once below; the measured worst cases (bench_pitch.py,
3 s signals) are ~1 cent for the median and ~1.5 cents for a shift, so each bound has a margin
but is far below the error of a wrong result (a semitone is 100 cents)."""
import math
import sys

import numpy as np
import pytest

pytest.importorskip("parselmouth")

from chatterbox_rt import pitch
from chatterbox_rt.profiling.bench_pitch import add_noise, envelope_distance, synth_voice

MEDIAN_CENTS = 5.0  # median_f0 against the true median
SHIFT_CENTS = 10.0  # measured shift against the requested one
ENVELOPE_DB = 3.0  # spectral envelope against the ideal shift (formants unchanged)
ACTIVITY_AGREE = 0.95  # frames active (within 30 dB of the peak frame) in both or neither: timing kept
ACTIVITY_DB = -30.0
FRAME_S = 0.025  # longer than the longest period in the tests (55 Hz: 18 ms)
SECONDS = 1.5
VOICES = {"male": 110.0, "female": 220.0}
SRS = (16000, 24000)
SHIFTS = (-12, -5, -2, 2, 5, 12)


def cents(a, b):
    return 1200 * math.log2(a / b)


def true_median(track):
    return float(np.median(track[track > 0]))


def activity(wav, sr):
    hop = int(FRAME_S * sr)
    n = len(wav) // hop
    e = np.mean(wav[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1)
    return 10 * np.log10(e / e.max() + 1e-12) > ACTIVITY_DB


@pytest.mark.parametrize("sr", SRS)
@pytest.mark.parametrize("voice", VOICES)
@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "snr20"])
def test_median_f0_known_voice(voice, sr, noisy):
    wav, track = synth_voice(sr, VOICES[voice], SECONDS)
    if noisy:
        wav = add_noise(wav, 20.0)
    f0 = pitch.median_f0(wav, sr)
    err = cents(f0, true_median(track))
    assert abs(err) < MEDIAN_CENTS, f"{voice} @ {sr} Hz: median F0 {f0:.2f} Hz, {err:+.1f} cents off"


def test_median_f0_none_when_unvoiced():
    sr = 16000
    rng = np.random.default_rng(0)
    assert pitch.median_f0(np.zeros(sr, np.float32), sr) is None
    assert pitch.median_f0((0.3 * rng.standard_normal(2 * sr)).astype(np.float32), sr) is None
    assert pitch.median_f0(np.zeros(0, np.float32), sr) is None
    # shorter than Praat's analysis window (3 periods of the 50 Hz floor)
    wav, _ = synth_voice(sr, 150.0, 0.5)
    assert pitch.median_f0(wav[int(0.2 * sr):int(0.25 * sr)], sr) is None
    # a 50 ms voiced blip in 2 s of noise: fewer voiced frames than MIN_VOICED_FRAMES
    noise = (0.05 * rng.standard_normal(2 * sr)).astype(np.float32)
    blip, _ = synth_voice(sr, 150.0, 0.5)
    noise[sr:sr + 800] += blip[int(0.15 * sr):int(0.15 * sr) + 800]
    assert pitch.median_f0(noise, sr) is None


@pytest.mark.parametrize("sr", SRS)
@pytest.mark.parametrize("voice", VOICES)
@pytest.mark.parametrize("k", SHIFTS)
def test_shift_pitch_moves_median(voice, sr, k):
    wav, track = synth_voice(sr, VOICES[voice], SECONDS)
    wav = wav[:-7]  # a length that is no multiple of any hop
    out = pitch.shift_pitch(wav, sr, float(k))
    assert out.dtype == np.float32 and out.shape == wav.shape
    assert np.all(np.isfinite(out))
    before, after = pitch.median_f0(wav, sr), pitch.median_f0(out, sr)
    err = cents(after, before) - 100 * k
    assert abs(err) < SHIFT_CENTS, f"{voice} @ {sr} Hz, {k:+d} st: {before:.2f} -> {after:.2f} Hz, {err:+.1f} cents off"
    # PSOLA keeps each period's energy, so a downward shift is quieter (fewer periods a second):
    # compare where there is sound, not how loud
    agree = np.mean(activity(wav, sr) == activity(out, sr))
    assert agree > ACTIVITY_AGREE, f"timing moved: {100 * agree:.1f} % of frames agree on activity"


@pytest.mark.parametrize("k", [-5, 5])
def test_shift_pitch_keeps_formants(k):
    sr, f0 = 16000, 165.0
    wav, track = synth_voice(sr, f0, SECONDS)
    ideal, _ = synth_voice(sr, f0 * 2 ** (k / 12), SECONDS)
    d = envelope_distance(pitch.shift_pitch(wav, sr, float(k)), ideal, sr, track)
    assert d < ENVELOPE_DB, f"{k:+d} st: envelope {d:.2f} dB from the ideal shift"
    # the check fails a shift that moves the formants with the pitch: resampling, kept to length
    ratio = 2 ** (k / 12)
    src = np.arange(len(wav)) * ratio
    moved = np.interp(src, np.arange(len(wav)), wav, right=0.0).astype(np.float32)
    assert envelope_distance(moved, ideal, sr, track) > ENVELOPE_DB


def test_shift_checks_can_fail():
    """The shift test's F0 criterion fails an identity 'shifter' and a shift by the wrong amount."""
    sr = 16000
    wav, _ = synth_voice(sr, 110.0, SECONDS)
    before = pitch.median_f0(wav, sr)
    assert abs(cents(pitch.median_f0(wav.copy(), sr), before) - 500) > SHIFT_CENTS
    assert abs(cents(pitch.median_f0(pitch.shift_pitch(wav, sr, 4.8), sr), before) - 500) > SHIFT_CENTS


def test_shift_pitch_zero_and_short():
    sr = 24000
    wav, _ = synth_voice(sr, 220.0, 0.5)
    wav64 = wav.astype(np.float64)
    out = pitch.shift_pitch(wav64, sr, 0.0)
    assert out.dtype == np.float32 and np.array_equal(out, wav)
    short = wav[: int(0.03 * sr)]  # too short for pitch analysis: unchanged
    assert np.array_equal(pitch.shift_pitch(short, sr, 3.0), short)
    assert pitch.shift_pitch(np.zeros(0, np.float32), sr, 3.0).shape == (0,)


def test_semitones_between():
    assert pitch.semitones_between(110.0, 220.0) == pytest.approx(12.0)
    assert pitch.semitones_between(220.0, 110.0) == pytest.approx(-12.0)
    assert pitch.semitones_between(200.0, 200.0 * 2 ** (3 / 12)) == pytest.approx(3.0)
    for bad in [(0.0, 100.0), (100.0, -1.0), (float("nan"), 100.0), (100.0, float("inf")), (None, 100.0)]:
        with pytest.raises(ValueError):
            pitch.semitones_between(*bad)


@pytest.mark.parametrize("src,tgt,kw,expected", [
    (110.0, 115.0, {}, 0.0),  # 0.77 st: within the default tolerance
    (110.0, 220.0, {}, 12.0),
    (110.0, 440.0, {}, 12.0),  # 24 st, capped
    (440.0, 110.0, {}, -12.0),
    (200.0, 200.0 * 2 ** (1 / 12), {"tolerance": 1.0}, 1.0),  # at the tolerance: shifted
    (110.0, 115.0, {"tolerance": 0.0}, 12 * math.log2(115 / 110)),
    (110.0, 220.0, {"max_shift": 5.0}, 5.0),
    (220.0, 110.0, {"max_shift": 5.0}, -5.0),
    (110.0, 220.0, {"max_shift": 0.0}, 0.0),
    (110.0, 220.0, {"tolerance": 13.0}, 0.0),
    (None, 220.0, {}, 0.0),
    (110.0, None, {}, 0.0),
])
def test_planned_shift(src, tgt, kw, expected):
    assert pitch.planned_shift(src, tgt, **kw) == pytest.approx(expected, abs=1e-9)


def test_defaults():
    assert 0 <= pitch.DEFAULT_PITCH_TOLERANCE < pitch.DEFAULT_MAX_PITCH_SHIFT <= 12.0


def test_match_pitch_unchanged():
    sr = 16000
    wav, _ = synth_voice(sr, 110.0, SECONDS)
    out, k = pitch.match_pitch(wav, sr, None)
    assert out is wav and k == 0.0
    noise = (0.3 * np.random.default_rng(0).standard_normal(sr)).astype(np.float32)
    out, k = pitch.match_pitch(noise, sr, 220.0)
    assert out is noise and k == 0.0
    out, k = pitch.match_pitch(wav, sr, 112.0)  # 0.3 st away
    assert out is wav and k == 0.0


def test_match_pitch_shifts_and_caps():
    sr = 16000
    wav, track = synth_voice(sr, 110.0, SECONDS)
    src_f0 = pitch.median_f0(wav, sr)
    out, k = pitch.match_pitch(wav, sr, 196.0)
    assert k == pytest.approx(pitch.semitones_between(src_f0, 196.0))
    assert out.shape == wav.shape and out.dtype == np.float32
    assert abs(cents(pitch.median_f0(out, sr), 196.0)) < SHIFT_CENTS
    _, k = pitch.match_pitch(wav, sr, 700.0)
    assert k == pitch.DEFAULT_MAX_PITCH_SHIFT
    out, k = pitch.match_pitch(wav, sr, 700.0, max_shift=3.0, tolerance=0.5)
    assert k == 3.0
    assert abs(cents(pitch.median_f0(out, sr), src_f0) - 300) < SHIFT_CENTS


@pytest.mark.parametrize("call,match", [
    (lambda w: pitch.median_f0(w, 0), "sr"),
    (lambda w: pitch.median_f0(w, -16000), "sr"),
    (lambda w: pitch.median_f0(w, 16000.5), "sr"),
    (lambda w: pitch.shift_pitch(w, 16000, float("nan")), "semitones"),
    (lambda w: pitch.shift_pitch(w, 16000, float("inf")), "semitones"),
    (lambda w: pitch.shift_pitch(np.stack([w, w]), 16000, 2.0), "1-D"),
    (lambda w: pitch.shift_pitch((w * 32767).astype(np.int16), 16000, 2.0), "floating"),
    (lambda w: pitch.median_f0(np.where(np.arange(len(w)) == 5, np.nan, w), 16000), "NaN"),
    (lambda w: pitch.planned_shift(110.0, 220.0, tolerance=-1.0), "tolerance"),
    (lambda w: pitch.planned_shift(110.0, 220.0, max_shift=-1.0), "max_shift"),
    (lambda w: pitch.planned_shift(110.0, 220.0, max_shift=float("nan")), "max_shift"),
    (lambda w: pitch.planned_shift(-110.0, 220.0), "source_f0"),
    (lambda w: pitch.match_pitch(w, 16000, 220.0, tolerance=-0.5), "tolerance"),
    (lambda w: pitch.match_pitch(w, 16000, None, max_shift=float("inf")), "max_shift"),
    (lambda w: pitch.match_pitch(w, 16000, float("nan")), "target_f0"),
    (lambda w: pitch.match_pitch(w, 16000, 0.0), "target_f0"),
])
def test_bad_arguments(call, match):
    wav, _ = synth_voice(16000, 110.0, 0.3)
    with pytest.raises(ValueError, match=match):
        call(wav)


def test_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "parselmouth", None)  # makes `import parselmouth` raise ImportError
    wav, _ = synth_voice(16000, 110.0, 0.3)
    with pytest.raises(ImportError, match=r"chatterbox-rt\[vc\]"):
        pitch.median_f0(wav, 16000)
