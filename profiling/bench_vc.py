"""Voice conversion's controls: what each costs against the default conversion (CPU, dummy weights).

    OMP_NUM_THREADS=1 .venv/bin/python profiling/bench_vc.py [--seconds 5] [--repeats 3] [--threads 1] \\
        [--source CLIP] [--target CLIP] [--target-seconds 5] [--n-steps N] [--device cpu] [--json PATH]

The target is "controls cost no more than 5 % of the VC time, pitch matching aside". One
full-size S3Gen with seeded random weights (``VC.from_dummy(seed=0)``; the work and its speed are
real, the audio is noise). The source is ``--seconds`` of synthetic speech at 110 Hz
(``synth_voice`` of ``bench_pitch.py``: voiced syllables through formant filters, pauses,
fricative noise), read at 16 kHz, or ``--source CLIP``; the target is ``--target-seconds`` of the
same synthetic voice at 220 Hz (so pitch matching has an octave to shift), or ``--target CLIP``.

Each conversion is ``vc._convert(source, prepared, VCControls(...), seed=0, watermark=False)``:
everything ``VC.generate`` does (source tokens, pruning, flow with the controls, HiFT, post)
but the target's preparation, which is done once beforehand (``vc.prepare_target(clip, sr,
f0=True)``) and timed on its own. One untimed default conversion warms up first (and post's and
pitch's one-off imports are paid before the timing); then ``--repeats`` rounds, each running every
setting once in turn (each round starting one setting later), so that slow drifts of the machine
fall on all settings alike. The medians are only as steady as the machine: run it on a quiet one,
with more repeats when the differences sought are near the 5 %.

Conversion table, one row per setting: ``median s``/``min s``: over the repeats, seconds per
conversion; ``overhead``: median / the default's median - 1, in %; ``<= 5 %``: whether the
overhead is within the target (``yes`` also when it is faster: ``prune_tokens=8`` drops 0.32 s
of source, so less work is done). ``3 target clips``: the default controls with a target of three
clips (the target, its first and its last two thirds; x-vectors averaged, the prompt from the
longest), prepared once. ``pitch_match=True`` is listed apart and not held to the 5 %.

Target preparation table (one-offs, not in the conversion times): ``prepare_target`` of one clip,
of the three clips, and of one clip with its median F0 (``f0=True``, what pitch matching needs).

Pitch step: ``chatterbox_rt.pitch.match_pitch`` alone on the 16 kHz source toward the target's
median F0 (the semitones it applied are printed), median seconds over the repeats and as a
fraction of the default conversion's median.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SOURCE_F0, TARGET_F0 = 110.0, 220.0  # a male source, a female target: an octave apart
SOURCE_SR = 16000  # S3_SR: what the tokenizer reads (a --source clip is resampled to it once)
BUDGET_PCT = 5.0
# (label, VCControls fields, target: "one" or "three")
SETTINGS = (
    ("default", {}, "one"),
    ("prune_tokens=8", {"prune_tokens": 8}, "one"),
    ("speaker_strength=1.3", {"speaker_strength": 1.3}, "one"),
    ("flow_cfg_rate=0.5", {"flow_cfg_rate": 0.5}, "one"),
    ("guidance_ramp=1.0:0.5", {"guidance_ramp": (1.0, 0.5)}, "one"),
    ("speaker_ramp=1.0:1.5", {"speaker_ramp": (1.0, 1.5)}, "one"),
    ("post=clean", {"post": "clean"}, "one"),
    ("3 target clips", {}, "three"),
)
PITCH_SETTING = ("pitch_match=True", {"pitch_match": True}, "one")


def _load(path, sr=None):
    from chatterbox_rt.audio import load_audio

    return load_audio(str(path), target_sr=sr)


def make_inputs(args):
    """(source at 16 kHz, one target clip, its rate)."""
    from chatterbox_rt.profiling.bench_pitch import synth_voice

    if args.source:
        src, _ = _load(args.source, SOURCE_SR)
    else:
        src, _ = synth_voice(SOURCE_SR, SOURCE_F0, args.seconds, seed=0)
    if args.target:
        tgt, tsr = _load(args.target)
    else:
        tsr = 24000
        tgt, _ = synth_voice(tsr, TARGET_F0, args.target_seconds, seed=1)
    return np.ascontiguousarray(src, dtype=np.float32), np.ascontiguousarray(tgt, dtype=np.float32), tsr


def three_clips(tgt: np.ndarray) -> list:
    """The target, its first two thirds and its last two thirds (each at least 1 s for a 1.5 s clip)."""
    n = len(tgt)
    return [tgt, tgt[: 2 * n // 3].copy(), tgt[n // 3:].copy()]


def timed(fn, sync):
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="synthetic source length (default 5 s)")
    p.add_argument("--source", default=None, metavar="CLIP", help="a source clip instead (e.g. tests/data/*.wav)")
    p.add_argument("--target", default=None, metavar="CLIP", help="a target clip instead of the synthetic one")
    p.add_argument("--target-seconds", type=float, default=5.0, help="synthetic target length (default 5 s)")
    p.add_argument("--repeats", type=int, default=3, help="timed conversions per setting (default 3)")
    p.add_argument("--n-steps", type=int, default=None, help="CFM steps (default: the decoder's, 10)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)

    from chatterbox_rt import pitch
    from chatterbox_rt.post import apply_post
    from chatterbox_rt.vc import VC, VCControls

    src, tgt, tsr = make_inputs(args)
    if len(tgt) < 1.5 * tsr:
        p.error(f"the target must be at least 1.5 s (three clips of >= 1 s are cut from it), "
                f"got {len(tgt) / tsr:.2f} s")
    vc = VC.from_dummy(seed=0, device=args.device)
    dev = vc.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    print(f"# VC controls' cost: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {dev}, source {len(src) / SOURCE_SR:.2f} s"
          f"{'' if args.source else f' (synthetic, {SOURCE_F0:g} Hz)'}, target {len(tgt) / tsr:.2f} s"
          f"{'' if args.target else f' (synthetic, {TARGET_F0:g} Hz)'}, "
          f"{args.n_steps or vc.s3gen.default_steps} CFM steps, {args.repeats} repeats, dummy weights")

    # Target preparation: one-offs, timed apart (the first call of each is the one reported after a warm-up call).
    clips3 = three_clips(tgt)
    prep_jobs = (("1 clip", lambda: vc.prepare_target(tgt, tsr)),
                 ("3 clips", lambda: vc.prepare_target(clips3, tsr)),
                 ("1 clip + median F0", lambda: vc.prepare_target(tgt, tsr, f0=True)))
    prep_jobs[2][1]()  # warms parselmouth and the target path
    prep = []
    for name, job in prep_jobs:
        times = [timed(job, sync)[1] for _ in range(args.repeats)]
        prep.append(dict(target=name, median_s=statistics.median(times), min_s=min(times)))
    targets = {"one": vc.prepare_target(tgt, tsr, f0=True), "three": vc.prepare_target(clips3, tsr, f0=True)}

    def convert(setting):
        _, fields, which = setting
        return vc._convert(src, targets[which], VCControls(**fields), sr=SOURCE_SR, seed=args.seed,
                           watermark=False, n_steps=args.n_steps)

    # Warm-up: one default conversion; post's and the pitch shifter's first-call costs paid here too.
    out, _ = timed(lambda: convert(SETTINGS[0]), sync)
    apply_post(out, vc.sr, "clean")
    target_f0 = targets["one"]["median_f0"]
    pitch.match_pitch(src, SOURCE_SR, target_f0)

    settings = SETTINGS + (PITCH_SETTING,)
    times = {s[0]: [] for s in settings}
    audio = {}
    pitch_times, shift = [], 0.0
    for i in range(args.repeats):
        for s in settings[i % len(settings):] + settings[:i % len(settings)]:  # each round starts one later
            wav, dt = timed(lambda s=s: convert(s), sync)
            times[s[0]].append(dt)
            audio[s[0]] = wav.numel() / vc.sr
        (_, shift), dt = timed(lambda: pitch.match_pitch(src, SOURCE_SR, target_f0), lambda: None)
        pitch_times.append(dt)

    base = statistics.median(times["default"])
    rows = []
    for label, fields, _ in settings:
        med = statistics.median(times[label])
        over = 100.0 * (med / base - 1.0)
        budgeted = label != PITCH_SETTING[0]
        rows.append(dict(setting=label, controls={k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                         median_s=med, min_s=min(times[label]), times_s=times[label], audio_s=audio[label],
                         overhead_pct=over, within_budget=(over <= BUDGET_PCT) if budgeted else None))
    pitch_row = dict(median_s=statistics.median(pitch_times), min_s=min(pitch_times), times_s=pitch_times,
                     semitones=float(shift), source_f0=pitch.median_f0(src, SOURCE_SR), target_f0=target_f0)
    pitch_row["fraction_of_vc"] = pitch_row["median_s"] / base

    print("\n| setting | median s | min s | audio s | overhead | <= 5 % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ok = "(pitch: measured apart)" if r["within_budget"] is None else ("yes" if r["within_budget"] else "NO")
        print(f"| {r['setting']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['audio_s']:.2f} | "
              f"{r['overhead_pct']:+.1f} % | {ok} |")
    held = [r for r in rows if r["within_budget"] is not None and r["setting"] != "default"]
    worst = max(held, key=lambda r: r["overhead_pct"])
    verdict = all(r["within_budget"] for r in held)
    print(f"\ncontrols within {BUDGET_PCT:g} % of the default's {base:.3f} s (pitch matching aside): "
          f"{'yes' if verdict else 'NO'} (largest: {worst['setting']} {worst['overhead_pct']:+.1f} %)")

    print("\n| target preparation (one-off) | median s | min s |")
    print("|---|---|---|")
    for r in prep:
        print(f"| {r['target']} | {r['median_s']:.3f} | {r['min_s']:.3f} |")

    sf0 = pitch_row["source_f0"]
    print(f"\npitch step alone (match_pitch on the {len(src) / SOURCE_SR:.2f} s 16 kHz source, "
          f"{'unvoiced' if sf0 is None else f'{sf0:.0f} Hz'} -> {target_f0:.0f} Hz, {shift:+.2f} semitones): "
          f"median {pitch_row['median_s']:.3f} s, min {pitch_row['min_s']:.3f} s = "
          f"{100 * pitch_row['fraction_of_vc']:.1f} % of the default conversion")

    if args.json:
        env = dict(machine=platform.processor() or platform.machine(), python=sys.version.split()[0],
                   torch=torch.__version__, threads=args.threads, device=str(dev))
        Path(args.json).write_text(json.dumps(dict(args=vars(args), env=env, default_s=base, budget_pct=BUDGET_PCT,
                                                   within_budget=verdict, rows=rows, target_prep=prep,
                                                   pitch_step=pitch_row), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
