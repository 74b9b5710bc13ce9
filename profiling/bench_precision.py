"""Speed per precision mode: T3 decode against our fp32 and the reference, S3Gen and end-to-end RTF.

    .venv/bin/python profiling/bench_precision.py --variants chatterbox,turbo,nano \\
        [--modes fp32,int8,bf16] [--tokens 64] [--s3-tokens 100] [--runs 3] [--threads 2] [--json out.json]

Per variant, in one process and one run: the reference T3 (chatterbox-tts 0.1.7, fp32) and ours in
each mode, all with the same seeded random weights (the reference's state dict loaded into ours,
then ``chatterbox_rt.precision.apply_t3``); T3 is timed as in ``bench_t3`` (1 token and N tokens,
EOS disabled, decode rate ``(N - 1) / (t_N - t_1)``, runs alternating, median). S3Gen (flow
encoder + CFM, HiFT) is timed per mode on ``--s3-tokens`` tokens with the variant's default CFM
steps and a 4 s voice prompt. The RTF is (first token + (S - 1) x decode + flow + HiFT) / audio
seconds for S = ``--s3-tokens`` (the watermark excluded; voice preparation is once per voice).
Needs the test extra (the reference).
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

from chatterbox_rt.profiling.bench_t3 import _ours_runner, _ref_runner, _time

VARIANTS = ("chatterbox", "multilingual", "turbo", "nano")


def _t3_modes(ref, variant, modes, reduced):
    from chatterbox_rt.checkpoint import load_into
    from chatterbox_rt.models.t3 import T3
    from chatterbox_rt.precision import PrecisionConfig, apply_t3
    from chatterbox_rt.profiling.upstream import build_t3_pair, our_t3_config

    ref_model, fp32 = build_t3_pair(ref, variant, reduced=reduced, seed=0)
    out = {}
    for m in modes:
        cfg = PrecisionConfig.resolve(m, device="cpu")
        if cfg == PrecisionConfig():
            out[m] = fp32
            continue
        model = T3(our_t3_config(variant, reduced, None))
        load_into(model, ref_model.state_dict(), f"reference {variant} T3")
        out[m] = apply_t3(model.eval(), cfg)
    return ref_model, out


def bench_t3(ref, variant, modes, tokens, runs, reduced, text_len) -> dict:
    from chatterbox_rt.profiling.upstream import cond_tensors, our_cond, ref_cond, text_tokens

    ref_model, ours = _t3_modes(ref, variant, modes, reduced)
    cfg = next(iter(ours.values())).config
    tensors = cond_tensors(cfg, seed=0)
    text = text_tokens(cfg, n=text_len, seed=0)
    sides = {"reference": (_ref_runner(ref_model, lambda: ref_cond(ref, tensors), text, 1),
                           _ref_runner(ref_model, lambda: ref_cond(ref, tensors), text, tokens))}
    for m, model in ours.items():
        sides[m] = (_ours_runner(model, lambda: our_cond(tensors), text, 1),
                    _ours_runner(model, lambda: our_cond(tensors), text, tokens))
    times = {s: {"first": [], "all": []} for s in sides}
    with torch.inference_mode():
        for one, _ in sides.values():
            one()
        for _ in range(runs):
            for s, (one, many) in sides.items():
                times[s]["first"].append(_time(one))
                times[s]["all"].append(_time(many))
    res = {}
    for s, t in times.items():
        first = statistics.median(t["first"])
        dec = statistics.median([(a - f) / (tokens - 1) for a, f in zip(t["all"], t["first"], strict=True)])
        res[s] = {"first_token_ms": 1000 * first, "decode_ms_per_token": 1000 * dec}
    return res


def bench_s3gen(variant, modes, s3_tokens, runs) -> dict:
    from chatterbox_rt.precision import PrecisionConfig
    from chatterbox_rt.models.s3gen.s3gen import S3Gen
    from chatterbox_rt.tts import dummy_voice

    meanflow = variant in ("turbo", "nano")
    voice = dummy_voice(150, seed=3)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 6561, (1, s3_tokens), generator=g)
    res = {}
    for m in modes:
        cfg = PrecisionConfig.resolve(m, device="cpu")
        s3 = S3Gen.from_dummy(meanflow=meanflow, seed=1).to_precision("cpu", config=cfg)
        with torch.inference_mode():
            def flow():
                return s3.flow_mel(tokens, None, voice.gen, generator=torch.Generator().manual_seed(0))[0]
            mel = flow()
            s3.hift(mel, generator=torch.Generator().manual_seed(0))
            tf, th = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                mel = flow()
                t1 = time.perf_counter()
                s3.hift(mel, generator=torch.Generator().manual_seed(0))
                th.append(time.perf_counter() - t1)
                tf.append(t1 - t0)
        res[m] = {"flow_s": statistics.median(tf), "hift_s": statistics.median(th), "frames": int(mel.shape[-1])}
        del s3
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="fp32,int8,bf16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--s3-tokens", type=int, default=100)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-s3gen", action="store_true")
    p.add_argument("--reduced", action="store_true", help="reduced depth (smoke test), not for reporting")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    modes = [m.strip() for m in a.modes.split(",")]
    if "fp32" not in modes:
        modes.insert(0, "fp32")

    import logging

    from chatterbox_rt.profiling.upstream import load_reference

    logging.getLogger("chatterbox").setLevel(logging.ERROR)
    ref = load_reference()
    import chatterbox.models.t3.t3 as ref_t3

    ref_t3.tqdm = lambda it, *a, **k: it
    env = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    print(f"# precision modes, CPU, {env['threads']} threads, torch {env['torch']}, T3 {a.tokens} tokens, "
          f"S3Gen {a.s3_tokens} tokens, median of {a.runs}")
    print(f"{'variant':<13} {'mode':<6} {'T3 ms/tok':>9} {'vs fp32':>8} {'vs ref':>7} {'flow s':>7} {'hift s':>7} "
          f"{'RTF':>6}")
    out = []
    for v in a.variants.split(","):
        v = v.strip()
        t3 = bench_t3(ref, v, modes, a.tokens, a.runs, a.reduced, a.text_tokens)
        s3 = {} if a.skip_s3gen else bench_s3gen(v, modes, a.s3_tokens, a.runs)
        ref_dec = t3["reference"]["decode_ms_per_token"]
        print(f"{v:<13} {'ref':<6} {ref_dec:>9.1f}", flush=True)
        for m in modes:
            dec = t3[m]["decode_ms_per_token"]
            row = {"variant": v, "mode": m, **t3[m], "reference_decode_ms_per_token": ref_dec,
                   "decode_vs_fp32": t3["fp32"]["decode_ms_per_token"] / dec, "decode_vs_reference": ref_dec / dec}
            line = f"{v:<13} {m:<6} {dec:>9.1f} {row['decode_vs_fp32']:>7.2f}x {row['decode_vs_reference']:>6.2f}x"
            if m in s3:
                audio_s = s3[m]["frames"] / 50.0
                t3_s = (t3[m]["first_token_ms"] + (a.s3_tokens - 1) * dec) / 1000
                row.update(s3[m], audio_s=audio_s, rtf=(t3_s + s3[m]["flow_s"] + s3[m]["hift_s"]) / audio_s)
                line += f" {s3[m]['flow_s']:>7.2f} {s3[m]['hift_s']:>7.2f} {row['rtf']:>6.3f}"
            print(line, flush=True)
            out.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "config": vars(a), "results": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
