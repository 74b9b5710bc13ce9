"""Throughput of ``chatterbox_rt.tokens.analyze`` (exact n-gram statistics, n = 1..7) on synthetic tokens.

    OMP_NUM_THREADS=1 .venv/bin/python profiling/bench_tokens_analyze.py [--tokens 10000000] [--json PATH]

The tokens imitate a speech-token stream: run values drawn from a Zipf law over the codebook
(p(rank r) ~ 1 / r^ZIPF_S, ranks shuffled over the code ids) and run lengths from a geometric law
(mean MEAN_RUN), cut into ``--sequences`` rows of random length. Prints tokens/s of the whole
``analyze`` call (loading excluded) and of each stage, best of ``--repeat``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from chatterbox_rt.tokens.analyze import _flatten, _ngram_counts_flat, analyze

ZIPF_S = 1.1
MEAN_RUN = 1.6


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
    ap.add_argument("--json", default=None, help="write the figures (and the analysis) here")
    args = ap.parse_args()

    seqs = synth_tokens(args.tokens, args.sequences, args.vocab)
    best_total = best_ngram = float("inf")
    for _ in range(args.repeat):
        tok, lengths = _flatten(seqs, args.vocab)
        t0 = time.perf_counter()
        _ngram_counts_flat(tok, lengths, args.vocab, args.max_n)
        best_ngram = min(best_ngram, time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = analyze({"s3": seqs}, vocab_size=args.vocab, codec="s3", max_n=args.max_n)
        best_total = min(best_total, time.perf_counter() - t0)
    n = args.tokens
    print(result.format_table())
    print(f"\n{n:,} tokens in {args.sequences} rows, vocab {args.vocab}, n = 1..{args.max_n}")
    print(f"n-gram counting: {best_ngram:.2f} s = {n / best_ngram / 1e6:.2f} M tokens/s")
    print(f"analyze (all statistics): {best_total:.2f} s = {n / best_total / 1e6:.2f} M tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": n, "sequences": args.sequences, "vocab_size": args.vocab, "max_n": args.max_n,
                       "ngram_s": best_ngram, "analyze_s": best_total,
                       "ngram_tokens_per_s": n / best_ngram, "analyze_tokens_per_s": n / best_total,
                       "analysis": result.to_dict()}, f, indent=2)


if __name__ == "__main__":
    main()
