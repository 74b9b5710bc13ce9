"""Speaking speed for ``/v1/audio/speech``: change the duration of speech by ``1 / speed`` and keep
its pitch, for a whole waveform or a stream of chunks.

OpenAI's endpoint takes ``speed`` in [0.25, 4.0] (2.0: twice as fast, half the duration).
:func:`check_speed` validates it, :func:`time_stretch` stretches a whole waveform and
:class:`StreamingTimeStretch` does the same chunk by chunk, with bit-identical output.

Algorithm: WSOLA, waveform-similarity overlap-add (W. Verhelst and M. Roelands, "An overlap-add
technique based on waveform similarity (WSOLA) for high quality time-scale modification of speech",
ICASSP 1993):

* The output is a sum of frames of ``FRAME_S`` (20 ms, ``N = 2 * Hs`` samples) under a periodic
  Hann window, one every synthesis hop ``Hs = N / 2``: at 50 % overlap those windows add up to one,
  so a frame that continues its predecessor exactly reproduces the input.
* Frame ``k`` is centred on output sample ``k * Hs`` and cut from the input around the nominal
  position ``round(k * Hs * speed)`` (analysis hop ``Ha = Hs * speed``), moved by an offset in
  ``[-D, D]``, ``D`` = ``SEARCH_S`` (10 ms: the span holds a whole pitch period for any voice
  above 50 Hz, so some offset lines the periods up).
* The offset chosen is the one whose frame best matches the *natural continuation* of the previous
  frame, the input that follows it by ``Hs``, which is what the output would hold there had it not
  been stretched: the largest normalised cross-correlation, computed for all ``2 D + 1`` offsets at
  once with one FFT correlation. Overlapping frames therefore look alike, so the joins neither
  cancel nor click, and whole pitch periods are repeated or skipped instead of being resampled.

The output has exactly ``round(len / speed)`` samples; input before the start and past the end
reads as silence. Each frame depends only on the input around it and on where the previous frame
was cut, so :class:`StreamingTimeStretch` computes a frame as soon as the input it reads has
arrived and keeps only that input (about ``N + 2 D + Ha`` samples): the added latency is about one
frame plus the search span. :func:`time_stretch` is that class fed one chunk, so every chunking
gives the same samples.

Limitations: WSOLA assumes one periodic voice; for noise, a mix of voices or music it repeats or
drops fragments that can be heard, more so far from speed 1. numpy only: no librosa, torchaudio.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

SPEED_MIN, SPEED_MAX = 0.25, 4.0
DEFAULT_SAMPLE_RATE = 24000  # the TTS engine's output rate
FRAME_S = 0.020  # frame length: two periods of a 100 Hz voice, short enough not to smear syllables
SEARCH_S = 0.010  # offset searched each side of a frame's nominal position
# Floor for a candidate frame's energy in the normalisation, so silence scores 0 instead of NaN.
_ENERGY_FLOOR = 1e-12


def check_speed(speed) -> float:
    """``speed`` as a float; ValueError unless it is a real number (not a bool) in
    [``SPEED_MIN``, ``SPEED_MAX``]."""
    if isinstance(speed, bool) or not isinstance(speed, numbers.Real):
        raise ValueError(f"speed must be a number in [{SPEED_MIN}, {SPEED_MAX}], got {speed!r}")
    value = float(speed)
    if math.isnan(value):
        raise ValueError(f"speed must be a number in [{SPEED_MIN}, {SPEED_MAX}], got NaN")
    if not SPEED_MIN <= value <= SPEED_MAX:
        raise ValueError(f"speed must be in [{SPEED_MIN}, {SPEED_MAX}] (1.0 is normal), got {value}")
    return value


def _as_mono(wav) -> np.ndarray:
    """numpy array or torch tensor, ``[n]`` or ``[1, n]`` float -> ``[n]`` float32."""
    if hasattr(wav, "detach"):  # a torch tensor, read without importing torch; numpy has no bfloat16
        wav = wav.detach().cpu().float().numpy()
    x = np.asarray(wav)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"expected mono audio of shape [n] or [1, n], got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected float samples, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def time_stretch(wav, speed: float, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """``wav`` played ``speed`` times as fast at the same pitch: float32 ``[round(n / speed)]``.

    ``wav`` is float, numpy or torch, ``[n]`` or ``[1, n]``. ``speed == 1`` returns a copy of the
    input as float32. ValueError for a bad speed, shape or dtype.
    """
    speed = check_speed(speed)
    x = _as_mono(wav)
    if speed == 1.0:
        return x.copy()
    stretch = StreamingTimeStretch(speed, sample_rate)
    return np.concatenate([stretch.process(x), stretch.flush()])


class StreamingTimeStretch:
    """:func:`time_stretch` chunk by chunk: the outputs of :meth:`process` and :meth:`flush`,
    concatenated, equal ``time_stretch(concatenated input, speed, sample_rate)`` exactly.

    After each :meth:`process` the output covers all the input received but less than its last
    ``FRAME_S + SEARCH_S + FRAME_S / 2 * speed`` (32 ms at speed 0.25, 70 ms at 4): the frame
    still waiting for its input, and the search span around it.
    """

    def __init__(self, speed: float, sample_rate: int = DEFAULT_SAMPLE_RATE):
        self.speed = check_speed(speed)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        self.sample_rate = int(sample_rate)
        self._hop = max(1, round(FRAME_S * sample_rate / 2))  # synthesis hop Hs, half a frame
        self._search = max(1, round(SEARCH_S * sample_rate))  # D
        frame = 2 * self._hop
        # Periodic Hann: w[i] + w[i + N/2] == 1, so overlapped frames keep the level.
        self._window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(frame) / frame)
        self._buf = np.zeros(0)  # input kept for the frames to come (float64) ...
        self._buf_start = 0  # ... from this input sample on
        self._n_in = 0
        self._k = 0  # next frame
        self._prev_centre = None  # input sample the last frame was centred on
        self._tail = None  # second half of the last frame, waiting for the next one's first half
        self._ready: list[np.ndarray] = []  # finished output not yet returned
        self._n_ready = 0  # output samples finished ...
        self._n_out = 0  # ... and returned
        self._flushed = False

    def process(self, chunk) -> np.ndarray:
        """Take the next chunk (float, ``[n]`` or ``[1, n]``); return the output it completes (float32)."""
        if self._flushed:
            raise RuntimeError("StreamingTimeStretch: process() after flush()")
        x = _as_mono(chunk)
        self._n_in += x.size
        if self.speed == 1.0:
            return x.copy()
        self._buf = np.concatenate([self._buf, x])
        while self._frame_end(self._k) <= self._n_in:
            self._next_frame()
        # No later input can make the output shorter than this, so it is safe to return.
        return self._emit(round(self._n_in / self.speed))

    def flush(self) -> np.ndarray:
        """End of input: return the rest of the output (float32), reading silence past the end."""
        if self._flushed:
            raise RuntimeError("StreamingTimeStretch: flush() called twice")
        self._flushed = True
        total = round(self._n_in / self.speed)
        if self.speed == 1.0:
            return np.zeros(0, np.float32)
        while self._n_ready < total:
            self._next_frame()
        return self._emit(total)

    def _nominal(self, k: int) -> int:
        return round(k * self._hop * self.speed)

    def _frame_end(self, k: int) -> int:
        """Input sample (exclusive) up to which frame ``k`` reads: its candidates and the previous
        frame's natural continuation."""
        end = self._nominal(k) + self._search + self._hop
        if self._prev_centre is not None:
            end = max(end, self._prev_centre + 2 * self._hop)
        return end

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Input samples ``[start, stop)``, zeros outside the input. Frames never read before
        ``_buf_start``: it trails the next frame's first read (see :meth:`_next_frame`)."""
        lo, hi = start - self._buf_start, stop - self._buf_start
        if start >= 0 and hi <= self._buf.size:
            return self._buf[lo:hi]
        out = np.zeros(stop - start)
        first, last = max(start, 0), min(stop, self._n_in)
        if first < last:
            out[first - start:last - start] = self._buf[first - self._buf_start:last - self._buf_start]
        return out

    def _next_frame(self) -> None:
        hop, search = self._hop, self._search
        nominal = self._nominal(self._k)
        candidates = self._read(nominal - search - hop, nominal + search + hop)
        if self._prev_centre is None:
            lag = search  # the first frame has nothing to continue: its nominal position
        else:
            lag = self._best_lag(candidates, self._read(self._prev_centre, self._prev_centre + 2 * hop))
        frame = self._window * candidates[lag:lag + 2 * hop]
        if self._prev_centre is not None:  # frame 0's first half lies before the output's start
            self._ready.append(self._tail + frame[:hop])
            self._n_ready += hop
        self._tail = frame[hop:]
        self._prev_centre = nominal - search + lag
        self._k += 1
        # The next frame reads from its first candidate or from this frame's continuation.
        keep_from = min(self._nominal(self._k) - search - hop, self._prev_centre)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start:]
            self._buf_start = keep_from

    def _best_lag(self, candidates: np.ndarray, target: np.ndarray) -> int:
        """Index in ``candidates`` of the frame-long slice most like ``target`` (normalised
        cross-correlation over all ``2 D + 1`` slices)."""
        n = target.size
        lags = candidates.size - n + 1
        # Correlation for every lag with one FFT; an FFT as long as `candidates` does not wrap
        # around for these lags.
        size = candidates.size
        spectrum = np.fft.rfft(candidates) * np.conj(np.fft.rfft(target, size))
        corr = np.fft.irfft(spectrum, size)[:lags]
        # Each slice's energy from a running sum: scoring raw correlation would favour loud slices.
        cum = np.concatenate([[0.0], np.cumsum(candidates * candidates)])
        energy = cum[n:n + lags] - cum[:lags]
        return int(np.argmax(corr / np.sqrt(np.maximum(energy, _ENERGY_FLOOR))))

    def _emit(self, limit: int) -> np.ndarray:
        """Return finished output up to output sample ``limit``; keep the rest."""
        done = np.concatenate(self._ready) if self._ready else np.zeros(0)
        take = max(0, min(limit - self._n_out, done.size))
        self._ready = [done[take:]] if take < done.size else []
        self._n_out += take
        return done[:take].astype(np.float32)
