"""Throughput of ``chatterbox_rt.tokens.analyze`` (exact n-gram statistics, n = 1..7) on synthetic tokens.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python profiling/bench_tokens_analyze.py [--tokens 10000000]
        [--repeat 3] [--paths cpp,numpy] [--json PATH]

The tokens imitate a speech-token stream: run values drawn from a Zipf law over the codebook
(p(rank r) ~ 1 / r^ZIPF_S, ranks shuffled over the code ids) and run lengths from a geometric law
(mean MEAN_RUN), cut into ``--sequences`` rows of random length. For each path (``cpp``: the C++
kernels csrc/cpu/ngram_counts.cpp + token_stats.cpp; ``numpy``: the vectorised numpy code they
replace) prints tokens/s of the n-gram counting (what analyze calls, ``_ngram_summary``) and of
the whole ``analyze`` call (loading excluded), best of ``--repeat`` with the paths interleaved, and
checks that both paths give the same analysis.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from chatterbox_rt.kernels import _native
from chatterbox_rt.tokens.analyze import _flatten, _ngram_summary, analyze

ZIPF_S = 1.1
MEAN_RUN = 1.6
PATH_NAMES = {"cpp": "cpp (csrc/cpu/ngram_counts.cpp, token_stats.cpp)", "numpy": "numpy"}


def synth_tokens(n_tokens: int, n_sequences: int, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size + 1) ** ZIPF_S
    codes = rng.permutation(vocab_size)
    n_runs = int(n_tokens / MEAN_RUN) + 16
    values = codes[rng.choice(vocab_size, size=n_runs, p=p / p.sum())]
    run_len = rng.geometric(1.0 / MEAN_RUN, size=n_runs)
    tok = np.repeat(values, run_len)[:n_tokens].astype(np.int16)
    cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=n_sequences - 1, replace=False))
    return np.split(tok, cuts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--sequences", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=6561)
    ap.add_argument("--max-n", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--paths", default="cpp,numpy", help="comma-separated, of cpp and numpy")
    ap.add_argument("--json", default=None, help="write the figures (and the analysis) here")
    args = ap.parse_args()

    paths = [p for p in args.paths.split(",") if p]
    if "cpp" in paths and not _native.ngram_counts_available():
        print("note: the native extension is not built; timing numpy only")
        paths = [p for p in paths if p != "cpp"]
    seqs = synth_tokens(args.tokens, args.sequences, args.vocab)
    best = {p: {"ngram_s": float("inf"), "analyze_s": float("inf")} for p in paths}
    results = {}
    for _ in range(args.repeat):
        for path in paths:  # interleaved, so a slow spell of the machine hits both
            tok, lengths = _flatten(seqs, args.vocab)
            t0 = time.perf_counter()
            _ngram_summary(tok, lengths, args.vocab, args.max_n, path)
            best[path]["ngram_s"] = min(best[path]["ngram_s"], time.perf_counter() - t0)
            del tok, lengths
            t0 = time.perf_counter()
            results[path] = analyze({"s3": seqs}, vocab_size=args.vocab, codec="s3", max_n=args.max_n, ngram_path=path)
            best[path]["analyze_s"] = min(best[path]["analyze_s"], time.perf_counter() - t0)
    n = args.tokens
    print(results[paths[0]].format_table())
    print(f"\n{n:,} tokens in {args.sequences} rows, vocab {args.vocab}, n = 1..{args.max_n}, one thread, "
          f"best of {args.repeat}")
    print("| path | n-gram counting | analyze (all statistics) |\n|---|---|---|")
    for path in paths:
        b = best[path]
        print(f"| {PATH_NAMES[path]} | {b['ngram_s']:.3f} s = {n / b['ngram_s'] / 1e6:.2f} M tokens/s "
              f"| {b['analyze_s']:.3f} s = {n / b['analyze_s'] / 1e6:.2f} M tokens/s |")
    identical = None
    if len(paths) > 1:
        dicts = [results[p].to_dict(arrays=True) for p in paths]
        identical = all(d == dicts[0] for d in dicts[1:])
        ref = best[paths[-1]]
        print(f"identical analyses: {'yes' if identical else 'NO'}; {paths[0]} vs {paths[-1]}: counting "
              f"{ref['ngram_s'] / best[paths[0]]['ngram_s']:.1f}x, analyze {ref['analyze_s'] / best[paths[0]]['analyze_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": n, "sequences": args.sequences, "vocab_size": args.vocab, "max_n": args.max_n,
                       "repeat": args.repeat, "identical": identical,
                       "paths": {p: {**best[p], "ngram_tokens_per_s": n / best[p]["ngram_s"],
                                     "analyze_tokens_per_s": n / best[p]["analyze_s"]} for p in paths},
                       "analysis": results[paths[0]].to_dict()}, f, indent=2)


if __name__ == "__main__":
    main()
