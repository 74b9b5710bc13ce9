"""T3 decode speed: chatterbox-rt against the reference, same weights, same inputs, same run.

    .venv/bin/python profiling/bench_t3.py [--variants chatterbox,turbo] [--tokens 64] [--threads 2]

For each variant both models are built at full size with identical seeded random weights (the
reference's module loaded into ours, as in the parity tests). Each run times generating 1 token
(prefill + first draw) and N tokens; the decode rate is ``(N - 1) / (t_N - t_1)``. EOS is
disabled on both sides so both always draw exactly N tokens. Runs alternate between the two
implementations; the median is reported. Needs the test extra (``make test``'s set-up), because
the reference is the comparison.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


VARIANTS = ("chatterbox", "multilingual", "turbo", "nano")


def _ref_runner(ref_model, ref_cond_fn, text, n):
    """One reference generation of exactly n tokens (EOS disabled)."""
    from chatterbox_rt.profiling.upstream import ref_t3_fixed_tokens

    return lambda: ref_t3_fixed_tokens(ref_model, ref_cond_fn(), text, n)


def _ours_runner(model, cond_fn, text, n):
    return lambda: model.generate(cond_fn(), text, max_new_tokens=n, stop_on_eos=False,
                                  generator=torch.Generator().manual_seed(0))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_variant(ref, variant: str, tokens: int, runs: int, reduced: bool, text_len: int) -> dict:
    from chatterbox_rt.profiling.upstream import build_t3_pair as build_pair, cond_tensors, our_cond, ref_cond, text_tokens

    ref_model, ours = build_pair(ref, variant, reduced=reduced, seed=0)
    tensors = cond_tensors(ours.config, seed=0)
    text = text_tokens(ours.config, n=text_len, seed=0)
    sides = {
        "reference": (_ref_runner(ref_model, lambda: ref_cond(ref, tensors), text, 1),
                      _ref_runner(ref_model, lambda: ref_cond(ref, tensors), text, tokens)),
        "ours": (_ours_runner(ours, lambda: our_cond(tensors), text, 1),
                 _ours_runner(ours, lambda: our_cond(tensors), text, tokens)),
    }
    times = {side: {"first": [], "all": []} for side in sides}
    with torch.inference_mode():
        for one, _ in sides.values():  # warm-up
            one()
        for _ in range(runs):
            for side, (one, many) in sides.items():
                times[side]["first"].append(_time(one))
                times[side]["all"].append(_time(many))
    result = {"variant": variant, "tokens": tokens, "text_tokens": len(text)}
    for side, t in times.items():
        first = statistics.median(t["first"])
        decode = statistics.median([(a - f) / (tokens - 1) for a, f in zip(t["all"], t["first"], strict=True)])
        result[side] = {"first_token_ms": 1000 * first, "decode_ms_per_token": 1000 * decode,
                        "decode_tokens_per_s": 1.0 / decode}
    result["decode_speedup"] = result["reference"]["decode_ms_per_token"] / result["ours"]["decode_ms_per_token"]
    result["first_token_speedup"] = result["reference"]["first_token_ms"] / result["ours"]["first_token_ms"]
    del ref_model, ours
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reduced", action="store_true", help="reduced depth (smoke test), not for reporting")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error("--tokens must be >= 2")
    torch.set_num_threads(args.threads)

    import logging

    from chatterbox_rt.profiling.upstream import load_reference

    logging.getLogger("chatterbox").setLevel(logging.ERROR)
    ref = load_reference()
    # tqdm progress bars of the reference would interleave with the report
    import chatterbox.models.t3.t3 as ref_t3

    ref_t3.tqdm = lambda it, *a, **k: it

    env = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu", "dtype": "fp32",
           "date": time.strftime("%Y-%m-%d")}
    print(f"# T3 decode, CPU fp32, {env['threads']} threads, torch {env['torch']}, {args.tokens} tokens, "
          f"median of {args.runs}{' (REDUCED depth)' if args.reduced else ''}")
    print(f"{'variant':<13} {'ref ms/tok':>10} {'ours ms/tok':>11} {'ref tok/s':>9} {'ours tok/s':>10} "
          f"{'speedup':>8} {'1st-token speedup':>18}")
    results = []
    for v in args.variants.split(","):
        r = bench_variant(ref, v.strip(), args.tokens, args.runs, args.reduced, args.text_tokens)
        results.append(r)
        print(f"{v:<13} {r['reference']['decode_ms_per_token']:>10.1f} {r['ours']['decode_ms_per_token']:>11.1f} "
              f"{r['reference']['decode_tokens_per_s']:>9.2f} {r['ours']['decode_tokens_per_s']:>10.2f} "
              f"{r['decode_speedup']:>7.2f}x {r['first_token_speedup']:>17.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "config": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
