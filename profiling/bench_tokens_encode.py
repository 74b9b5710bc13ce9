"""``chatterbox-rt tokens encode`` throughput: batched against file by file (CPU, dummy weights).

    OMP_NUM_THREADS=2 .venv/bin/python profiling/bench_tokens_encode.py [--files 16] [--seconds 5] \\
        [--batch-size 16] [--repeats 3] [--threads 0] [--device cpu] [--json PATH]

The corpus: ``--files`` synthetic clips of ``--seconds`` each at 22.05 kHz (so every file is
resampled to 16 kHz, as most corpora are): voiced syllables at 110-220 Hz through two formant
resonances, with noise bursts and pauses, written as 16-bit WAVs to a temporary folder. The S3
tokenizer is ``VC.from_dummy(0)``'s (seeded random weights at the real shapes: the work and its
speed are real, the tokens are not); it is built once (its build time is printed apart) and
handed to every run.

Rows (each the median over ``--repeats`` timed runs after one untimed warm-up of each):

* ``encode, batch N``: ``chatterbox_rt.tokens.encode(..., batch_size=N)`` into a fresh folder:
  reading ahead in a thread, resampling, the tokenizer at batch N, Parquet, metadata;
* ``encode, batch 1``: the same with ``batch_size=1``;
* ``loop, batch 1``: what a script would do file by file: ``load_audio(path, target_sr=16000)``
  then ``tokenizer([wav])`` (``VC.source_tokens`` without its checks), no output written.

``audio s / s``: seconds of audio encoded per second of wall time; ``speed-up``: against the loop.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

FILE_SR = 22050
S3_SR = 16000


def synth_clip(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Speech-like audio: syllables (harmonics of f0 through two resonances), noise, pauses."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    pos = 0
    while pos < n:
        dur = int(rng.uniform(0.12, 0.3) * sr)
        seg = np.arange(min(dur, n - pos)) / sr
        if rng.random() < 0.75:
            f0 = rng.uniform(110, 220)
            x = sum(np.sin(2 * np.pi * f0 * k * seg) / k for k in range(1, 12))
            for formant in (rng.uniform(300, 900), rng.uniform(900, 2500)):
                r, w = 0.97, 2 * np.pi * formant / sr
                x = lfilter([1 - r], [1, -2 * r * np.cos(w), r * r], x)
        else:
            x = rng.standard_normal(len(seg)) * 0.3
        out[pos:pos + len(seg)] = 0.3 * x * np.hanning(len(seg)) / (np.abs(x).max() + 1e-9)
        pos += len(seg) + int(rng.uniform(0.0, 0.1) * sr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from chatterbox_rt.audio import load_audio
    from chatterbox_rt.tokens import encode

    enc = importlib.import_module("chatterbox_rt.tokens.encode")  # the package's `encode` is the function
    t0 = time.perf_counter()
    tok = enc.dummy_s3_tokenizer(0, args.device)
    build_s = time.perf_counter() - t0
    enc.dummy_s3_tokenizer = lambda seed, device="cpu": tok  # every run gets the tokenizer built above

    work = Path(tempfile.mkdtemp(prefix="bench_tokens_encode_"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        for i in range(args.files):
            sf.write(corpus / f"clip_{i:03d}.wav", synth_clip(args.seconds, FILE_SR, i), FILE_SR, subtype="PCM_16")
        paths = sorted(corpus.glob("*.wav"))
        audio_s = sum(sf.info(str(f)).duration for f in paths)

        def run_encode(batch_size: int) -> float:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            result = encode(corpus, out, dummy_weights=True, batch_size=batch_size, device=args.device,
                            progress=False)
            dt = time.perf_counter() - t
            assert result.files_encoded == args.files, result.summary()
            return dt

        def run_loop() -> float:
            t = time.perf_counter()
            for f in paths:
                wav, _ = load_audio(f, target_sr=S3_SR)
                tok([torch.from_numpy(wav).to(tok.device)])
            return time.perf_counter() - t

        cases = [(f"encode, batch {args.batch_size}", lambda: run_encode(args.batch_size)),
                 ("encode, batch 1", lambda: run_encode(1)), ("loop, batch 1", run_loop)]
        for _, fn in cases:  # warm-up
            fn()
        times = {name: [] for name, _ in cases}
        for _ in range(args.repeats):
            for name, fn in cases:
                times[name].append(fn())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    loop = statistics.median(times["loop, batch 1"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": name, "median_s": med, "min_s": min(ts), "audio_s_per_s": audio_s / med,
                     "speedup_vs_loop": loop / med})
    print(f"{args.files} files x {args.seconds:g} s at {FILE_SR} Hz ({audio_s:.0f} s of audio), device {args.device}, "
          f"{torch.get_num_threads()} torch threads; tokenizer built in {build_s:.1f} s (not in the times)")
    print(f"{'case':<20} {'median s':>9} {'min s':>8} {'audio s / s':>12} {'speed-up':>9}")
    for r in rows:
        print(f"{r['case']:<20} {r['median_s']:>9.2f} {r['min_s']:>8.2f} {r['audio_s_per_s']:>12.1f} "
              f"{r['speedup_vs_loop']:>8.2f}x")
    if args.json:
        report = {"files": args.files, "seconds_per_file": args.seconds, "audio_s": audio_s, "device": args.device,
                  "threads": torch.get_num_threads(), "repeats": args.repeats, "tokenizer_build_s": build_s,
                  "rows": rows, "torch": torch.__version__, "python": platform.python_version(),
                  "machine": platform.machine()}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
