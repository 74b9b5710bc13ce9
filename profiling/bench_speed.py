"""The server's ``speed`` (``chatterbox_rt.serve.speed``, WSOLA): runtime, duration error, pitch
(f0) error and the largest sample step at frame joins, on a 10 s synthetic speech-like signal and on
``tests/data/speech_en_6s.wav``.

    OMP_NUM_THREADS=1 .venv/bin/python profiling/bench_speed.py
"""
import sys, time
import numpy as np
import soundfile as sf
from chatterbox_rt.serve import speed as S
from chatterbox_rt.audio import resample

SR = 24000
SPEEDS = (0.5, 0.75, 1.25, 1.5, 2.0)
EXTRA = (0.25, 4.0)
F0_WIN, F0_HOP = 0.04, 0.01
F0_LO, F0_HI = 70.0, 400.0
OCTAVE_TOL = 0.95


def speech_like(seconds=10.0, seed=0):
    t = np.arange(round(seconds * SR)) / SR
    f0 = 175.0 + 75.0 * np.sin(2 * np.pi * 0.3 * t - np.pi / 2)  # glides 100..250 Hz
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = np.zeros_like(t)
    for h in range(1, 40):
        x += np.where(h * f0 < SR / 2 - 500, 1.0 / h, 0.0) * np.sin(h * phase)
    x *= 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)  # 4 Hz syllable-rate envelope
    x = 0.4 * x / np.abs(x).max()
    x += 0.005 * np.random.default_rng(seed).standard_normal(t.size)
    return x.astype(np.float32), f0


def f0_track(x):
    """Per-frame autocorrelation pitch (Hz; NaN where unvoiced/quiet), frames every F0_HOP."""
    n, hop = round(F0_WIN * SR), round(F0_HOP * SR)
    lo, hi = int(SR / F0_HI), int(SR / F0_LO)
    thr = 0.1 * np.sqrt(np.mean(x.astype(np.float64) ** 2))
    out = []
    for s in range(0, x.size - n - hi, hop):
        a = x[s:s + n + hi].astype(np.float64)
        a = a - a[:n].mean()
        ref = a[:n]
        if np.sqrt(np.mean(ref ** 2)) < thr:
            out.append(np.nan); continue
        r = np.correlate(a, ref, "valid")  # lags 0..hi
        e = np.sqrt(np.convolve(a * a, np.ones(n), "valid") * (ref @ ref)) + 1e-12
        r = r / e
        # octave guard: the shortest lag whose local peak is within OCTAVE_TOL of the best one
        seg = r[lo:hi + 1]
        peaks = np.flatnonzero((seg[1:-1] >= seg[:-2]) & (seg[1:-1] >= seg[2:])) + 1
        best = seg.max() if peaks.size == 0 else seg[peaks].max()
        lag = lo + (int(np.argmax(seg)) if peaks.size == 0 else int(peaks[seg[peaks] >= OCTAVE_TOL * best][0]))
        if r[lag] < 0.5:
            out.append(np.nan); continue
        if 0 < lag < hi:  # parabolic interpolation
            y0, y1, y2 = r[lag - 1], r[lag], r[lag + 1]
            lag = lag + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)
        out.append(SR / lag)
    centres = (np.arange(len(out)) * hop + n / 2) / SR
    return centres, np.array(out)


def f0_error(y, speed, f0_in_at):
    """Median and p95 relative error of y's estimated f0 vs the input's f0 at the mapped input time."""
    t_out, est = f0_track(y)
    ref = f0_in_at(t_out * speed)
    ok = np.isfinite(est) & np.isfinite(ref)
    rel = np.abs(est[ok] - ref[ok]) / ref[ok]
    return np.median(rel), np.percentile(rel, 95), ok.mean(), (rel > 0.1).mean()


def steps(x, y, speed):
    hs = S.StreamingTimeStretch(speed)._hop
    d = np.abs(np.diff(y.astype(np.float64)))
    # samples within +-8 of a frame boundary (every output sample k*Hs starts or ends a frame)
    near = np.zeros(d.size, bool)
    for o in range(-8, 9):
        idx = np.arange(0, d.size, hs) + o
        near[idx[(idx >= 0) & (idx < d.size)]] = True
    own = np.abs(np.diff(x.astype(np.float64))).max()
    return d[near].max() / own, d.max() / own


def timed(fn, reps=5):
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t0)
    return out, best


def stream(x, speed, chunk):
    st = S.StreamingTimeStretch(speed)
    return np.concatenate([st.process(x[i:i + chunk]) for i in range(0, x.size, chunk)] + [st.flush()])


def main():
    x, f0 = speech_like()
    t_in = np.arange(x.size) / SR
    f0_true = lambda t: np.interp(t, t_in, f0, left=np.nan, right=np.nan)
    m0, p0, v0, g0 = f0_error(x, 1.0, f0_true)
    print(f"FRAME_S={S.FRAME_S} SEARCH_S={S.SEARCH_S}")
    print(f"estimator on the input itself: median {m0*100:.2f} %  p95 {p0*100:.2f} %  voiced {v0*100:.0f} %  gross (>10 %) {g0*100:.1f} %")
    print("| speed | whole ms | stream ms (0.4 s chunks) | stream == whole | out samples (expected) | duration err | f0 err median | f0 err p95 | gross f0 err (>10 %) | max step near joins / own max | max step anywhere / own max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in SPEEDS + EXTRA:
        y, dt = timed(lambda: S.time_stretch(x, s))
        ys, dts = timed(lambda: stream(x, s, 9600))
        exp = round(x.size / s)
        m, p, v, g = f0_error(y, s, f0_true)
        j, a = steps(x, y, s)
        print(f"| {s} | {dt*1e3:.0f} | {dts*1e3:.0f} | {np.array_equal(y, ys)} | {y.size} ({exp}) | "
              f"{(y.size - exp) / SR * 1e3:.3f} ms | {m*100:.2f} % | {p*100:.2f} % | {g*100:.1f} % | {j:.3f} | {a:.3f} |")
    # real speech: f0 of the output vs the input's own estimated f0 track, stretched in time
    w, sr = sf.read("tests/data/speech_en_6s.wav", dtype="float32")
    w = resample(w if w.ndim == 1 else w.mean(1), sr, SR)
    tc, est_in = f0_track(w)
    f0_est_at = lambda t: np.interp(t, tc, est_in, left=np.nan, right=np.nan)
    print(f"\nreal speech tests/data/speech_en_6s.wav ({w.size / SR:.2f} s, resampled to 24 kHz); reference = its own f0 track")
    print("| speed | whole ms | f0 err median | f0 err p95 | gross f0 err (>10 %) | frames compared | max step near joins / own max | max step anywhere / own max |")
    print("|---|---|---|---|---|---|---|---|")
    for s in SPEEDS + EXTRA:
        y, dt = timed(lambda: S.time_stretch(w, s))
        m, p, v, g = f0_error(y, s, f0_est_at)
        j, a = steps(w, y, s)
        print(f"| {s} | {dt*1e3:.0f} | {m*100:.2f} % | {p*100:.2f} % | {g*100:.1f} % | {v*100:.0f} % | {j:.3f} | {a:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        S.FRAME_S, S.SEARCH_S = float(sys.argv[1]), float(sys.argv[2])
    main()
