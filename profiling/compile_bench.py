"""torch.compile against eager (and, on CUDA, the CFM loop's CUDA graphs) for the CFM estimator
and HiFT, same weights, same inputs, same run: what decides whether compile is a default.

    python -m chatterbox_rt.profiling.compile_bench [--device cpu|cuda] [--seconds 10] [--reps 5]

Prints one JSON line per configuration: compile time (the first call), median and p90 of the
following calls, and the largest relative difference from eager.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _timed(fn, reps: int, sync):
    out = fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return out, statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main(argv=None) -> int:
    from ..models.s3gen.s3gen import S3Gen

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length of the inputs")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--parts", default="estimator,hift")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    frames = int(args.seconds * 50)
    g = torch.Generator().manual_seed(0)
    mel = (torch.randn(1, 80, frames, generator=g) - 5).to(dev, dtype)
    L = frames + 200  # a 4 s prompt
    mu, cond, noise = (torch.randn(1, 80, L, generator=g).to(dev, dtype) for _ in range(3))
    spks = torch.randn(1, 80, generator=g).to(dev, dtype)
    results = []
    for part in [x for x in args.parts.split(",") if x]:
        eager = S3Gen.from_dummy(seed=1, device=dev, dtype=dtype)
        comp = S3Gen.from_dummy(seed=1, device=dev, dtype=dtype)
        if part == "estimator":
            def run(m):
                with torch.inference_mode():
                    return m.flow.decoder(mu, None, spks, cond, n_steps=10, noise=noise)
        else:
            def run(m):
                with torch.inference_mode():
                    return m.hift(mel, generator=torch.Generator(device=dev).manual_seed(0))
        want, med_e, p90_e = _timed(lambda: run(eager), args.reps, sync)
        t0 = time.perf_counter()
        comp.compile(parts=(part,))
        run(comp)
        sync()
        compile_s = time.perf_counter() - t0
        got, med_c, p90_c = _timed(lambda: run(comp), args.reps, sync)
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        row = dict(part=part, device=str(dev), dtype=args.dtype, seconds=args.seconds,
                   eager_ms=round(med_e * 1e3, 1), eager_p90_ms=round(p90_e * 1e3, 1),
                   compiled_ms=round(med_c * 1e3, 1), compiled_p90_ms=round(p90_c * 1e3, 1),
                   speedup=round(med_e / med_c, 3), compile_s=round(compile_s, 1), max_rel_diff=err,
                   threads=torch.get_num_threads(), torch=torch.__version__)
        if dev.type == "cuda" and part == "estimator":
            from ..engine.cfm_graphs import CFMGraphs

            pool = CFMGraphs(eager.flow.decoder)
            _, med_g, _ = _timed(lambda: pool(mu, None, spks, cond, n_steps=10, noise=noise), args.reps, sync)
            row["cuda_graph_ms"] = round(med_g * 1e3, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
