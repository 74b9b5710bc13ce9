"""Speed control (WSOLA time stretch): exact output length, pitch and level kept, no clicks at the
frame joins, streaming equal to the whole waveform, bad speeds refused.

The signals are synthetic, so the expected pitch is known exactly: a 220 Hz sine and a 180 + 530 Hz
two-tone, whose spectral peaks must stay where they are while the duration changes.
"""
import math

import numpy as np
import pytest
import torch

from chatterbox_rt.serve.speed import (FRAME_S, SEARCH_S, SPEED_MAX, SPEED_MIN, StreamingTimeStretch,
                                       check_speed, time_stretch)

SR = 24000
SPEEDS = (0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 4.0)
LENGTHS = (0, 1, 100, 24001)
FREQ_TOL = 0.02  # relative error allowed on a spectral peak
RMS_TOL = 0.10  # relative error allowed on the steady part's RMS
# Largest sample-to-sample step of the output over the input's. Measured: at most 1.002 for the
# sine and 1.012 for the two-tone; the same frames joined without the Hann cross-fade (a flat 0.5
# window) step 1.6-8.6 times the input's.
MAX_STEP_RATIO = 1.1
EDGE_S = 0.05  # start and end left out of the level checks: the input fades from and to silence there


def tone(freqs, seconds=2.0, amp=0.5):
    t = np.arange(round(seconds * SR)) / SR
    return (amp * sum(np.sin(2 * np.pi * f * t) for f in freqs) / len(freqs)).astype(np.float32)


def spectral_peaks(x, count):
    """Frequencies (Hz) of the ``count`` strongest peaks of the Hann-windowed spectrum, ascending."""
    mag = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    peaks = []
    for _ in range(count):
        i = int(np.argmax(mag))
        peaks.append(freqs[i])
        mag[np.abs(freqs - freqs[i]) < 30.0] = 0  # drop the peak and its window's leakage
    return sorted(peaks)


def steady(x):
    edge = round(EDGE_S * SR)
    return x[edge:-edge]


def rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# ----------------------------------------------------------------------------------------------
# speed validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speed", [SPEED_MIN, SPEED_MAX, 1, 1.5, np.float32(2.0), np.int64(3)])
def test_check_speed_accepts_numbers_in_range(speed):
    assert check_speed(speed) == float(speed)
    assert type(check_speed(speed)) is float


@pytest.mark.parametrize("speed", [True, False, None, "1.5", [1.0], 1 + 0j, math.nan, math.inf, -math.inf,
                                   0, -1.0, 0.2499, 4.0001, 10])
def test_bad_speeds_raise(speed):
    with pytest.raises(ValueError, match="speed"):
        check_speed(speed)
    with pytest.raises(ValueError, match="speed"):
        time_stretch(np.zeros(100, np.float32), speed)
    with pytest.raises(ValueError, match="speed"):
        StreamingTimeStretch(speed)


def test_bad_audio_raises():
    with pytest.raises(ValueError, match="shape"):
        time_stretch(np.zeros((2, 100), np.float32), 1.5)
    with pytest.raises(ValueError, match="dtype"):
        time_stretch(np.zeros(100, np.int16), 1.5)
    with pytest.raises(ValueError, match="sample_rate"):
        StreamingTimeStretch(1.5, sample_rate=0)


# ----------------------------------------------------------------------------------------------
# length and input forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("n", LENGTHS)
def test_output_length_is_round_n_over_speed(speed, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    y = time_stretch(x, speed)
    assert y.dtype == np.float32 and y.ndim == 1
    assert y.size == round(n / speed)


def test_speed_one_returns_a_copy():
    x = tone([220], seconds=0.5)
    y = time_stretch(x, 1.0)
    assert np.array_equal(y, x) and not np.shares_memory(y, x)


def test_torch_and_batched_inputs_match_numpy():
    x = tone([220, 530], seconds=0.5)
    want = time_stretch(x, 1.5)
    assert np.array_equal(time_stretch(x[None], 1.5), want)
    assert np.array_equal(time_stretch(torch.from_numpy(x), 1.5), want)
    assert np.array_equal(time_stretch(torch.from_numpy(x)[None], 1.5), want)
    assert time_stretch(torch.from_numpy(x).bfloat16(), 1.5).size == want.size


# ----------------------------------------------------------------------------------------------
# pitch, level, joins
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speed", [0.5, 2.0])
@pytest.mark.parametrize("freqs", [(220,), (180, 530)], ids=["sine220", "tones180+530"])
def test_pitch_is_kept(speed, freqs):
    x = tone(freqs)
    y = time_stretch(x, speed)
    assert spectral_peaks(x, len(freqs)) == pytest.approx(freqs, rel=FREQ_TOL)  # the measure itself
    assert spectral_peaks(y, len(freqs)) == pytest.approx(freqs, rel=FREQ_TOL)


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("freqs", [(220,), (180, 530)], ids=["sine220", "tones180+530"])
def test_level_kept_and_no_clicks(speed, freqs):
    x = tone(freqs)
    y = time_stretch(x, speed)
    assert rms(steady(y)) == pytest.approx(rms(steady(x)), rel=RMS_TOL)
    # The whole output, joins and ends included: a join between frames that were not lined up
    # would show as a step larger than the signal's own.
    assert np.abs(np.diff(y)).max() <= MAX_STEP_RATIO * np.abs(np.diff(x)).max()


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------
def random_chunks(x, rng):
    """``x`` cut at random, with empty and one-sample chunks mixed in."""
    chunks, i = [], 0
    while i < x.size:
        n = int(rng.choice([0, 1, rng.integers(2, 200), rng.integers(200, 6000)]))
        chunks.append(x[i:i + n])
        i += n
    return chunks


@pytest.mark.parametrize("speed", SPEEDS)
def test_streaming_equals_whole(speed):
    rng = np.random.default_rng(int(speed * 100))
    x = tone([180, 530], seconds=1.5) + 0.05 * rng.standard_normal(round(1.5 * SR)).astype(np.float32)
    want = time_stretch(x, speed)
    for trial in range(3):
        stretch = StreamingTimeStretch(speed)
        got = np.concatenate([stretch.process(c) for c in random_chunks(x, rng)] + [stretch.flush()])
        assert got.dtype == np.float32
        assert np.array_equal(got, want), f"chunking {trial}"


@pytest.mark.parametrize("speed", [0.25, 1.25, 4.0])
def test_streaming_latency_is_about_one_frame(speed):
    """After every chunk the output covers all the input but the last frame, search span and
    analysis hop (the bound StreamingTimeStretch documents)."""
    max_lag = (FRAME_S + SEARCH_S + FRAME_S / 2 * speed) * SR + 1  # input samples
    x = tone([220], seconds=1.0)
    stretch, n_in, n_out = StreamingTimeStretch(speed), 0, 0
    for chunk in random_chunks(x, np.random.default_rng(0)):
        n_in += chunk.size
        n_out += stretch.process(chunk).size
        assert n_in - n_out * speed <= max_lag


def test_empty_stream_and_use_after_flush():
    stretch = StreamingTimeStretch(2.0)
    assert stretch.process(np.zeros(0, np.float32)).size == 0
    assert stretch.flush().size == 0
    with pytest.raises(RuntimeError):
        stretch.process(np.zeros(10, np.float32))
    with pytest.raises(RuntimeError):
        stretch.flush()
