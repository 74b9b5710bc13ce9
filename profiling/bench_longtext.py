"""Long text: its segments as one batch through the Engine against the same segments one after another.

    .venv/bin/python profiling/bench_longtext.py --variants chatterbox,turbo [--chars 2000] \\
        [--tokens 100] [--batch 8] [--threads 2] [--precision fp32] [--json out.json]

Per variant, one process, one run, full-size seeded random weights: a text of ``--chars``
characters is cut into segments (``TTS.segments``: ~300 characters, about 20 s of speech, each).
Random weights rarely stop on their own, so every segment draws exactly ``--tokens`` speech tokens
(EOS off) in both paths; the work per segment is therefore the same in both and only the way it is
scheduled differs:

* sequential: ``TTS.generate(segment, split=False)`` for each segment in turn, with the seed the
  engine derives for it (``segment_seed``), joined as the engine joins (``Joiner``);
* batched: ``Engine(max_batch=--batch).submit(text)`` (one ``LongRequest``: the segments share T3's
  decode steps and S3Gen's batches).

Printed: seconds for each, the speed-up, and the joins' click check (the largest sample-to-sample
step within 10 ms of a join against the largest anywhere else). The watermark is off in both (it
runs once over the joined audio either way).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

SENTENCES = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk.",
    "He carried a lantern, a notebook, and a thermos of strong black tea.",
    "From the top he could see the harbour, the fishing boats, and the long grey line of the coast.",
    "Some nights the fog rolled in so thickly that the beam seemed to stop a few yards from the glass!",
    "Did the ships still need him, he wondered, now that every captain carried a satellite receiver?",
    "He decided that they did; machines fail, and a light on a rock is a promise kept.",
]


def make_text(n_chars: int) -> str:
    out, i = [], 0
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(SENTENCES[i % len(SENTENCES)])
        i += 1
    return " ".join(out)


def join_clicks(wav: torch.Tensor, seg_lens: list, pause: int, fade: int) -> dict:
    """Largest |x[n+1] - x[n]| within ``fade`` + 2 samples of each join edge, and elsewhere."""
    steps = wav.reshape(-1).diff().abs()
    near = torch.zeros_like(steps, dtype=torch.bool)
    at = 0
    for n in seg_lens[:-1]:
        at += n
        for edge in (at, at + pause):
            near[max(0, edge - fade - 2): edge + fade + 2] = True
        at += pause
    return dict(join_max_step=float(steps[near].max()) if near.any() else 0.0,
                other_max_step=float(steps[~near].max()) if (~near).any() else 0.0)


def bench_variant(variant: str, args) -> dict:
    from chatterbox_rt import TTS
    from chatterbox_rt.longtext import JOIN_FADE_S, JOIN_PAUSE_S, Joiner, segment_seed

    tts = TTS.from_dummy(variant, seed=0, device="cpu", precision=args.precision)
    text = make_text(args.chars)
    segs = tts.segments(text)
    kw = dict(max_new_tokens=args.tokens, stop_on_eos=False, watermark=False)
    tts.generate("Warm up.", seed=0, **dict(kw, max_new_tokens=4))  # first-call costs out of both timings

    t0 = time.perf_counter()
    joiner, pieces, lens = Joiner(tts.sr), [], []
    for i, seg in enumerate(segs):
        wav = tts.generate(seg, seed=segment_seed(args.seed, i), split=False, **kw).reshape(-1)
        lens.append(wav.numel())
        pieces += [joiner.push(wav), joiner.end_segment(last=i == len(segs) - 1)]
    sequential = torch.cat(pieces)
    t_seq = time.perf_counter() - t0

    with tts.engine(max_batch=args.batch) as eng:
        t0 = time.perf_counter()
        req = eng.submit(text, seed=args.seed, **kw)
        batched = req.result()
        t_batch = time.perf_counter() - t0
    batched = batched.reshape(-1)
    err = float((batched - sequential).abs().max() / sequential.abs().max()) if sequential.numel() else 0.0
    row = dict(variant=variant, chars=len(text), segments=len(segs), tokens_per_segment=args.tokens,
               audio_s=batched.numel() / tts.sr, sequential_s=t_seq, batched_s=t_batch, speedup=t_seq / t_batch,
               max_rel_diff=err, t3_ms=req.metrics.t3_ms, s3gen_ms_sum=req.metrics.s3gen_ms,
               **join_clicks(batched, lens, int(JOIN_PAUSE_S * tts.sr), int(JOIN_FADE_S * tts.sr)))
    tts.close()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="chatterbox,turbo")
    p.add_argument("--chars", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=100, help="speech tokens each segment draws (EOS off)")
    p.add_argument("--batch", type=int, default=8, help="the engine's max_batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=None, help="as TTS.from_dummy(precision=...); default fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# long text, batched vs sequential: {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} threads, --chars {args.chars} --tokens {args.tokens} "
          f"--batch {args.batch} --precision {args.precision or 'fp32'}")
    print("| variant | chars | segments | audio s | sequential s | batched s | speed-up | join max step | "
          "elsewhere max step |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for v in args.variants.split(","):
        r = bench_variant(v, args)
        rows.append(r)
        print(f"| {v} | {r['chars']} | {r['segments']} | {r['audio_s']:.1f} | {r['sequential_s']:.1f} | "
              f"{r['batched_s']:.1f} | {r['speedup']:.2f}x | {r['join_max_step']:.3f} | {r['other_max_step']:.3f} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
