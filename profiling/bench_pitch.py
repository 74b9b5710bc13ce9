"""F0 estimators and pitch shifters for ``chatterbox_rt.pitch``, measured on synthetic speech.

    OMP_NUM_THREADS=1 .venv/bin/python profiling/bench_pitch.py [--seconds 3] [--sr 16000,24000] [--json PATH]

The signal (``synth_voice``) has a known F0 track: "syllables" of a band-limited glottal source
(harmonics at 1/h, i.e. a sawtooth) with declination (+1 -> -1 semitone over each syllable) and a
5.5 Hz, +-0.3 semitone vibrato, through a cascade of four formant resonators (/a/, /i/, /u/),
separated by silences and high-passed noise bursts (unvoiced fricatives). Male 110 Hz and female
220 Hz, at each ``--sr``.

F0 table, per estimator: ``cents``: |median F0 over voiced frames - true median| in cents (worst
case over the conditions: male/female x sr x clean / white noise at 20 dB SNR); ``gpe %``: gross
pitch errors (frames the truth calls voiced whose estimate is off by > 20 %, octave errors
included), worst case; ``vuv %``: frames whose voicing disagrees with the truth; ``x RT``: audio
seconds per second of one core.

Shift table, per shifter and requested shift k (+-2, +-5, +-12 semitones): ``cents``: worst
|12 log2(F0_out / F0_in) - k| over the conditions, both medians measured by the same judge
(Praat's autocorrelation pitch, floor 40 Hz, ceiling 1000 Hz); ``env dB``: mean RMS difference
(300 Hz - 5 kHz, level removed) between the cepstrally smoothed log spectrum of the output and that
of the ideal output, i.e. the same synthetic voice generated at F0 x 2^(k/12) with unchanged
formants: near 0 when the spectral envelope (formants) is preserved, several dB when the
formants move with the pitch (the baseline row, the input returned unshifted, shows what the
metric reads for an envelope that is right but whose harmonics are not); ``len``: output length - input length; ``x RT``: as above.

Candidates that need something other than a manylinux wheel, or pull in a banned library, are
listed and not run: torchcrepe (requires librosa, resampy and torchaudio), pyrubberband (needs
the ``rubberband`` command-line binary).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

# (frequency Hz, bandwidth Hz) of F1..F4 (Peterson & Barney averages, rounded).
VOWELS = {
    "a": ((730, 90), (1090, 110), (2440, 170), (3400, 250)),
    "i": ((270, 60), (2290, 100), (3010, 150), (3400, 250)),
    "u": ((300, 60), (870, 90), (2240, 150), (3400, 250)),
}
# One "sentence": (kind, seconds, vowel). Repeated to fill the requested duration.
PATTERN = (("sil", 0.15, None), ("voiced", 0.35, "a"), ("noise", 0.08, None), ("voiced", 0.30, "i"),
           ("sil", 0.10, None), ("voiced", 0.40, "u"), ("noise", 0.10, None), ("voiced", 0.30, "a"))
VIBRATO_HZ, VIBRATO_ST, DECLINATION_ST = 5.5, 0.3, 1.0
FADE_S = 0.01
FRICATIVE_HP_HZ = 3000
PEAK = 0.5

SHIFTS = (-12, -5, -2, 2, 5, 12)
JUDGE_FLOOR, JUDGE_CEILING = 40.0, 1000.0
FRAME_S, HOP_S = 0.04, 0.01
LIFTER_S = 0.0015  # below the shortest period in the table (220 Hz + 12 st = 440 Hz: 2.27 ms)
ENV_BAND = (300.0, 5000.0)
GROSS = 0.2


def _resonators(x, sr, formants):
    for f, bw in formants:
        r = math.exp(-math.pi * bw / sr)
        a = [1.0, -2 * r * math.cos(2 * math.pi * f / sr), r * r]
        x = lfilter([sum(a)], a, x)  # unit gain at DC
    return x


def synth_voice(sr: int, f0: float, seconds: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like test signal: (wav float32, per-sample true F0 in Hz, 0 where unvoiced)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    wav, track = np.zeros(n), np.zeros(n)
    hp = butter(4, FRICATIVE_HP_HZ, "highpass", fs=sr, output="sos")
    pos, i = 0, 0
    while pos < n:
        kind, dur, vowel = PATTERN[i % len(PATTERN)]
        i += 1
        m = min(int(round(dur * sr)), n - pos)
        t = np.arange(m) / sr
        fade = np.minimum(1.0, np.minimum(t, t[::-1]) / FADE_S)
        if kind == "voiced":
            st = DECLINATION_ST * (1 - 2 * t / dur) + VIBRATO_ST * np.sin(2 * np.pi * VIBRATO_HZ * t)
            f = f0 * 2.0 ** (st / 12)
            phase = 2 * np.pi * np.cumsum(f) / sr
            n_harm = int(0.45 * sr / f.max())
            h = np.arange(1, n_harm + 1)[:, None]
            src = (np.sin(h * phase[None, :]) / h).sum(axis=0)
            seg = _resonators(src, sr, VOWELS[vowel])
            wav[pos:pos + m] = seg / np.abs(seg).max() * fade
            track[pos:pos + m] = f
        elif kind == "noise":
            wav[pos:pos + m] = 0.3 * sosfilt(hp, rng.standard_normal(m)) * fade
        pos += m
    if wav.any():
        wav *= PEAK / np.abs(wav).max()
    return wav.astype(np.float32), track


def add_noise(wav: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.mean(wav.astype(np.float64) ** 2)
    return (wav + rng.standard_normal(len(wav)) * math.sqrt(p / 10 ** (snr_db / 10))).astype(np.float32)


# ---- F0 estimators: (wav, sr) -> (frame times s, f0 Hz with 0 = unvoiced) ----

def _praat(method, floor=50.0, ceiling=800.0):
    def est(wav, sr):
        import parselmouth

        snd = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=sr)
        p = getattr(snd, method)(time_step=HOP_S, pitch_floor=floor, pitch_ceiling=ceiling)
        return p.xs(), p.selected_array["frequency"]
    return est


def _world(method, floor=50.0, ceiling=800.0):
    def est(wav, sr):
        import pyworld as pw

        x = wav.astype(np.float64)
        if method == "dio":
            f0, t = pw.dio(x, sr, f0_floor=floor, f0_ceil=ceiling, frame_period=HOP_S * 1000)
            f0 = pw.stonemask(x, f0, t, sr)
        else:
            f0, t = pw.harvest(x, sr, f0_floor=floor, f0_ceil=ceiling, frame_period=HOP_S * 1000)
        return t, f0
    return est


ESTIMATORS = {
    "praat ac (parselmouth)": _praat("to_pitch_ac"),
    "praat cc (parselmouth)": _praat("to_pitch_cc"),
    "world dio+stonemask (pyworld)": _world("dio"),
    "world harvest (pyworld)": _world("harvest"),
}
JUDGE = _praat("to_pitch_ac", JUDGE_FLOOR, JUDGE_CEILING)


def median_voiced(times_f0) -> float:
    f0 = times_f0[1]
    v = f0[f0 > 0]
    return float(np.median(v)) if len(v) else float("nan")


def cents(a: float, b: float) -> float:
    return 1200 * math.log2(a / b)


# ---- shifters: (wav, sr, semitones) -> wav ----

def _rb_plugin(wav, sr, k):
    from pedalboard import Pedalboard, PitchShift

    return Pedalboard([PitchShift(semitones=k)])(wav[None, :], sr)[0]


def _rb_offline(preserve_formants):
    def shift(wav, sr, k):
        from pedalboard import time_stretch

        return time_stretch(wav[None, :], sr, 1.0, pitch_shift_in_semitones=k,
                            preserve_formants=preserve_formants)[0]
    return shift


def _psola(wav, sr, k):
    import parselmouth
    from parselmouth.praat import call

    snd = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=sr)
    manip = call(snd, "To Manipulation", HOP_S, 50.0, 800.0)
    tier = call(manip, "Extract pitch tier")
    call(tier, "Multiply frequencies", snd.xmin, snd.xmax, 2.0 ** (k / 12))
    call([tier, manip], "Replace pitch tier")
    return call(manip, "Get resynthesis (overlap-add)").values[0]


def _world_resynth(method):
    def shift(wav, sr, k):
        import pyworld as pw

        x = wav.astype(np.float64)
        t, f0 = _world(method)(wav, sr)
        sp, ap = pw.cheaptrick(x, f0, t, sr), pw.d4c(x, f0, t, sr)
        return pw.synthesize(f0 * 2.0 ** (k / 12), sp, ap, sr, frame_period=HOP_S * 1000)
    return shift


SHIFTERS = {
    "baseline: input unchanged (calibrates env dB)": lambda wav, sr, k: wav.copy(),
    "rubberband offline, formants kept (pedalboard.time_stretch)": _rb_offline(True),
    "rubberband offline, formants move (pedalboard.time_stretch)": _rb_offline(False),
    "rubberband realtime plugin (pedalboard.PitchShift)": _rb_plugin,
    "praat PSOLA overlap-add (parselmouth)": _psola,
    "world dio resynthesis (pyworld)": _world_resynth("dio"),
    "world harvest resynthesis (pyworld)": _world_resynth("harvest"),
}


def log_envelope(wav: np.ndarray, sr: int, track: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean cepstrally smoothed log spectrum (dB) over frames that are voiced throughout."""
    n, hop = int(FRAME_S * sr), int(HOP_S * sr)
    nfft = 1 << (n - 1).bit_length()
    win = np.hanning(n)
    lift = int(LIFTER_S * sr)
    env = []
    for s in range(0, len(wav) - n, hop):
        if track[s:s + n].min() <= 0:
            continue
        spec = np.abs(np.fft.rfft(wav[s:s + n] * win, nfft)) + 1e-9
        cep = np.fft.irfft(np.log(spec))
        cep[lift:-lift] = 0
        env.append(np.fft.rfft(cep).real * (20 / math.log(10)))
    return np.fft.rfftfreq(nfft, 1 / sr), np.mean(env, axis=0)


def envelope_distance(out, ideal, sr, track) -> float:
    f, a = log_envelope(out, sr, track)
    _, b = log_envelope(ideal, sr, track)
    band = (f >= ENV_BAND[0]) & (f <= min(ENV_BAND[1], 0.45 * sr))
    d = a[band] - b[band]
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


def timed(fn, *args, reps=2):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


@dataclass
class Cond:
    gender: str
    f0: float
    sr: int
    noisy: bool


def conditions(srs, noisy=(False, True)):
    return [Cond(g, f0, sr, nz) for g, f0 in (("male", 110.0), ("female", 220.0)) for sr in srs for nz in noisy]


def bench_f0(srs, seconds):
    rows = []
    for name, est in ESTIMATORS.items():
        errs, gpes, vuvs, speed = [], [], [], []
        try:
            for c in conditions(srs):
                wav, track = synth_voice(c.sr, c.f0, seconds)
                if c.noisy:
                    wav = add_noise(wav, 20.0)
                (t, f0), dt = timed(est, wav, c.sr)
                truth = np.median(track[track > 0])
                errs.append(abs(cents(median_voiced((t, f0)), truth)))
                idx = np.clip(np.round(np.asarray(t) * c.sr).astype(int), 0, len(track) - 1)
                ref = track[idx]
                voiced = ref > 0
                ok = voiced & (f0 > 0)
                gpes.append(100 * np.mean(~ok[voiced] | (np.abs(f0[voiced] / np.where(ok, ref, 1)[voiced] - 1) > GROSS)))
                vuvs.append(100 * np.mean(voiced != (f0 > 0)))
                speed.append(seconds / dt)
        except ImportError as e:
            rows.append({"estimator": name, "error": str(e)})
            continue
        rows.append({"estimator": name, "cents": max(errs), "gpe_pct": max(gpes), "vuv_pct": max(vuvs),
                     "x_rt": min(speed)})
    return rows


def bench_shift(srs, seconds):
    rows = []
    conds = conditions(srs, noisy=(False,))
    inputs = {(c.gender, c.sr): synth_voice(c.sr, c.f0, seconds) for c in conds}
    in_f0 = {key: median_voiced(JUDGE(w, key[1])) for key, (w, _) in inputs.items()}
    for name, shift in SHIFTERS.items():
        for k in SHIFTS:
            errs, envs, lens, speed = [], [], [], []
            try:
                for c in conds:
                    wav, track = inputs[(c.gender, c.sr)]
                    out, dt = timed(shift, wav, c.sr, float(k))
                    out = np.asarray(out, dtype=np.float32)
                    lens.append(len(out) - len(wav))
                    if not np.all(np.isfinite(out)):
                        errs.append(float("inf"))
                        continue
                    m = min(len(out), len(wav))
                    out = out[:m]
                    errs.append(abs(cents(median_voiced(JUDGE(out, c.sr)), in_f0[(c.gender, c.sr)]) - 100 * k))
                    ideal, _ = synth_voice(c.sr, c.f0 * 2.0 ** (k / 12), seconds)
                    envs.append(envelope_distance(out, ideal[:m], c.sr, track[:m]))
                    speed.append(seconds / dt)
            except ImportError as e:
                rows.append({"shifter": name, "k": k, "error": str(e)})
                continue
            rows.append({"shifter": name, "k": k, "cents": max(errs), "env_db": float(np.mean(envs)),
                         "len": [min(lens), max(lens)], "x_rt": min(speed)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--sr", default="16000,24000")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    srs = [int(s) for s in args.sr.split(",")]

    f0_rows = bench_f0(srs, args.seconds)
    print(f"F0 estimators ({args.seconds:g} s signals; worst case over male/female x {srs} Hz x clean/20 dB SNR)")
    print(f"{'estimator':34s} {'cents':>7s} {'gpe %':>6s} {'vuv %':>6s} {'x RT':>7s}")
    for r in f0_rows:
        if "error" in r:
            print(f"{r['estimator']:34s} unavailable: {r['error']}")
        else:
            print(f"{r['estimator']:34s} {r['cents']:7.1f} {r['gpe_pct']:6.1f} {r['vuv_pct']:6.1f} {r['x_rt']:7.0f}")

    sh_rows = bench_shift(srs, args.seconds)
    print(f"\nPitch shifters (worst |cents| over male/female x {srs} Hz; env dB: mean vs ideal; x RT: slowest)")
    print(f"{'shifter':62s} {'k':>4s} {'cents':>7s} {'env dB':>7s} {'len':>9s} {'x RT':>6s}")
    for r in sh_rows:
        if "error" in r:
            print(f"{r['shifter']:62s} {r['k']:+4d} unavailable: {r['error']}")
        else:
            ln = f"{r['len'][0]:+d}" if r["len"][0] == r["len"][1] else f"{r['len'][0]:+d}..{r['len'][1]:+d}"
            print(f"{r['shifter']:62s} {r['k']:+4d} {r['cents']:7.1f} {r['env_db']:7.2f} {ln:>9s} {r['x_rt']:6.0f}")
    print("\nnot run: torchcrepe (requires librosa, resampy, torchaudio), pyrubberband (needs the rubberband CLI)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"f0": f0_rows, "shift": sh_rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
