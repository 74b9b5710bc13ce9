"""End-to-end stage times on CPU: chatterbox-rt against the reference, same weights, same inputs, same run.

    .venv/bin/python profiling/bench_e2e.py --variant chatterbox [--tokens 100] [--t3-tokens 32] [--runs 3]

Stages (full-size models, seeded random weights, fp32):

* voice: ``TTS.prepare_conditionals(clip)`` against the reference's ``ChatterboxTTS`` (or
  ``ChatterboxTurboTTS``, ``ChatterboxMultilingualTTS``) ``prepare_conditionals(path)`` on
  ``tests/data/speech_en_6s.wav``: S3Gen prompt (mel, tokens, x-vector), T3 prompt tokens and the
  voice-encoder embedding. Both use the same S3Gen and voice-encoder weights; T3 only contributes
  its prompt length, so a stand-in carries it.
* T3: ``bench_t3.bench_variant`` (EOS disabled on both sides, decode rate excluding the prefill).
* flow: speech tokens -> mel (conformer encoder + CFM: 10 Euler steps with CFG, or 2 meanflow
  steps); the reference's ``flow_inference(tokens, ref_dict=..., finalize=True)`` against our
  ``flow_mel(tokens, None, ref_dict)``, with one ref dict (the reference's ``embed_ref``).
* hift: mel -> waveform with the trim-fade; both sides get the same mel.
* watermark: ``perth.PerthImplicitWatermarker().apply_watermark`` against our
  ``watermark.get_watermarker().apply`` on the same waveform.

The S3Gen RTF is (flow + hift) / audio seconds, the overall RTF is (T3 for ``--tokens`` tokens,
extrapolated as first token + (N - 1) x decode, + flow + hift + watermark) / audio seconds; voice
preparation is once per voice and not in the RTF. Runs alternate between the two implementations
(and which goes first); the median is reported. Memory: ``resource.getrusage`` peak RSS of the
process (both implementations loaded), and per stage the peak RSS growth over the call, sampled
every 2 ms from ``/proc/self/status`` during the untimed warm-up pass.

``--profile`` adds torch.profiler tables (top ops by self CPU time) for one CFM estimator call and
one HiFT call on each side. Needs the test extra (``make test``'s set-up): the reference is the
comparison.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from chatterbox_rt.profiling.bench import cpu_model, speech_tokens, peak_rss_mb, rss_growth_mb, rss_mb
from chatterbox_rt.profiling.upstream import build_voice_encoders, ref_tts_class

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "profiling"))

VARIANTS = ("chatterbox", "multilingual", "turbo", "nano")
MEANFLOW = {"chatterbox": False, "multilingual": False, "turbo": True, "nano": True}
CLIP = ROOT / "tests" / "data" / "speech_en_6s.wav"
TOKENS_PER_SECOND = 25  # S3 speech tokens: 25 Hz (2 mel frames of 480 samples at 24 kHz each)
STAGES = ("voice", "flow", "hift", "watermark")
PROFILE_ROWS = 15


# ------------------------------------------------------------------------------ measurement

def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ the two sides

def build_tts_pair(ref, variant: str, ref_s3gen, ours_s3gen, ref_ve, ours_ve):
    """The reference's TTS object and ours around the given S3Gen / voice-encoder pair.

    T3 is only asked for its prompt length by ``prepare_conditionals``: a stand-in carries it, so
    this stage does not need the 0.5 GB T3 in memory."""
    from chatterbox_rt.models.t3 import T3Config
    from chatterbox_rt.tts import TTS

    plen = T3Config.for_variant(variant).speech_cond_prompt_len
    ref_t3 = types.SimpleNamespace(hp=types.SimpleNamespace(speech_cond_prompt_len=plen))
    ref_tts = ref_tts_class(variant)(ref_t3, ref_s3gen, ref_ve, None, "cpu")
    if hasattr(ref_tts, "norm_loudness"):
        # NOTE: under NumPy 2 the reference's float32 clip times a float64 gain becomes float64,
        # which its S3 tokenizer rejects (Double vs Float); NumPy 1 kept float32. Cast back, as
        # the reference behaves under the NumPy it was written for.
        norm = ref_tts.norm_loudness
        ref_tts.norm_loudness = lambda wav, sr, *a, **k: norm(wav, sr, *a, **k).astype("float32")
    our_t3 = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                                   config=types.SimpleNamespace(speech_cond_prompt_len=plen))
    ours = TTS(variant, our_t3, ours_s3gen, ours_ve, None, source="bench_e2e")
    return ref_tts, ours


def stage_fns(ref_tts, ours_tts, ref_dict, tokens, mel, wav, skip_watermark: bool) -> dict:
    """{stage: {"reference": fn, "ours": fn}}; every fn does the whole stage once."""
    from chatterbox.models.s3gen.s3gen import S3GEN_SR as REF_SR

    ref_s3gen, ours_s3gen = ref_tts.s3gen, ours_tts.s3gen
    n = tokens.shape[1]
    mel_lens = torch.tensor([mel.shape[-1]])

    def ref_flow():
        torch.manual_seed(0)
        return ref_s3gen.flow_inference(tokens, ref_dict=dict(ref_dict), finalize=True)

    def ours_flow():
        torch.manual_seed(0)
        return ours_s3gen.flow_mel(tokens, None, ref_dict)

    def ref_hift():
        w, _ = ref_s3gen.hift_inference(mel)
        w[:, : len(ref_s3gen.trim_fade)] *= ref_s3gen.trim_fade
        return w

    fns = {
        "voice": {"reference": lambda: ref_tts.prepare_conditionals(str(CLIP)),
                  "ours": lambda: ours_tts.prepare_conditionals(CLIP)},
        "flow": {"reference": ref_flow, "ours": ours_flow},
        "hift": {"reference": ref_hift, "ours": lambda: ours_s3gen.hift(mel, mel_lens)},
    }
    assert mel.shape[-1] in (2 * n, 2 * n - 1)
    if not skip_watermark:
        from chatterbox_rt.watermark import get_watermarker

        ref_wm, ours_wm = ref_tts.watermarker, get_watermarker("cpu")
        wav_np = wav[0].numpy()
        fns["watermark"] = {"reference": lambda: ref_wm.apply_watermark(wav_np, sample_rate=REF_SR),
                            "ours": lambda: ours_wm.apply(wav[0], REF_SR)}
    return fns


# ------------------------------------------------------------------------------ profiler

def _capture_first_call(module, fn):
    """Run fn; return (args, kwargs) of module's first forward call in it. The forward method is
    wrapped rather than hooked: the reference calls ``estimator.forward(...)`` directly."""
    seen, forward = [], module.forward

    def spy(*args, **kwargs):
        if not seen:
            seen.append((args, kwargs))
        return forward(*args, **kwargs)

    module.forward = spy
    try:
        fn()
    finally:
        del module.forward
    return seen[0]


def _profile_table(fn, rows: int, repeat: int = 2) -> tuple[str, list[dict]]:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeat):
            fn()
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs) / repeat
    top = [{"op": e.key, "self_ms": e.self_cpu_time_total / repeat / 1000.0, "calls": e.count // repeat}
           for e in avgs[:rows]]
    lines = [f"  total self CPU {total / 1000.0:.1f} ms per call",
             f"  {'op':<44} {'self ms':>9} {'%':>6} {'calls':>6}"]
    lines += [f"  {r['op'][:44]:<44} {r['self_ms']:>9.2f} {100 * r['self_ms'] * 1000 / max(total, 1):>5.1f}% "
              f"{r['calls']:>6}" for r in top]
    return "\n".join(lines), top


def profile_calls(fns, ref_tts, ours_tts, rows: int) -> dict:
    """torch.profiler on one CFM estimator call and one HiFT call per side."""
    est = {"reference": ref_tts.s3gen.flow.decoder.estimator, "ours": ours_tts.s3gen.flow.decoder.estimator}
    out = {}
    with torch.inference_mode():
        for side in ("reference", "ours"):
            args, kwargs = _capture_first_call(est[side], fns["flow"][side])
            x = args[0] if args else kwargs["x"]
            one_call = (lambda e=est[side], a=args, k=kwargs: e(*a, **k))
            for what, fn in (("cfm_estimator", one_call), ("hift", fns["hift"][side])):
                table, top = _profile_table(fn, rows)
                label = f"{what} ({side})" + (f", x {list(x.shape)}" if what == "cfm_estimator" else "")
                print(f"\n# profile: {label}\n{table}", flush=True)
                out[f"{what}/{side}"] = top
    return out


# ------------------------------------------------------------------------------ main

def run(args, env: dict) -> dict:
    import logging

    from chatterbox_rt.profiling.upstream import build_s3gen_pair, load_reference

    logging.getLogger("chatterbox").setLevel(logging.ERROR)
    logging.getLogger("root").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    ref = load_reference()
    import chatterbox.models.s3gen.flow_matching as ref_fm
    import chatterbox.models.t3.t3 as ref_t3

    # the reference's progress bars (and meanflow's print per call) would interleave with the report
    ref_t3.tqdm = ref_fm.tqdm = lambda it, *a, **k: it
    ref_fm.print = lambda *a, **k: None
    variant = args.variant
    result = {"variant": variant, "tokens": args.tokens, "audio_s": args.tokens / TOKENS_PER_SECOND}

    if not args.skip_t3:  # first, and freed before S3Gen is built: the two never share memory
        from bench_t3 import bench_variant

        print(f"T3 ({variant}, {args.t3_tokens} tokens, median of {args.runs}) ...", flush=True)
        result["t3"] = bench_variant(ref, variant, args.t3_tokens, args.runs, False, args.text_tokens)
        gc.collect()

    rss0 = rss_mb()
    ref_s3gen, ours_s3gen = build_s3gen_pair(ref, meanflow=MEANFLOW[variant], seed=0)
    ref_ve, ours_ve = build_voice_encoders(ref, seed=0)
    ref_tts, ours_tts = build_tts_pair(ref, variant, ref_s3gen, ours_s3gen, ref_ve, ours_ve)
    result["models_rss_mb"] = rss_mb() - rss0  # both sides' S3Gen + voice encoder

    from chatterbox_rt.audio import load_audio

    wav24, _ = load_audio(CLIP, target_sr=24000)
    with torch.inference_mode():
        ref_dict = ref_s3gen.embed_ref(wav24[: 10 * 24000], 24000)
        tokens = speech_tokens(args.tokens)
        torch.manual_seed(0)
        mel = ref_s3gen.flow_inference(tokens, ref_dict=dict(ref_dict), finalize=True)
        wav, _ = ref_s3gen.hift_inference(mel)
    fns = stage_fns(ref_tts, ours_tts, ref_dict, tokens, mel, wav, args.skip_watermark)
    result["mel_frames"], result["wav_samples"] = int(mel.shape[-1]), int(wav.shape[-1])

    times = {st: {side: [] for side in fns[st]} for st in fns}
    rss_growth = {st: {} for st in fns}
    with torch.inference_mode():
        for st, sides in fns.items():  # warm-up; the first pass also measures memory growth
            for side, fn in sides.items():
                rss_growth[st][side] = rss_growth_mb(fn)
                for _ in range(args.warmup - 1):
                    fn()
        from chatterbox_rt.profiling import nvtx

        nvtx.profiler_start()  # under profiling/nsys.sh the capture covers the timed runs only
        for i in range(args.runs):
            order = ("reference", "ours") if i % 2 == 0 else ("ours", "reference")
            for st, sides in fns.items():
                for side in order:
                    times[st][side].append(_time(sides[side]))
            print(f"  run {i + 1}/{args.runs} done (load {os.getloadavg()[0]:.2f})", flush=True)
        nvtx.profiler_stop()

    stages = {}
    for st, sides in times.items():
        stages[st] = {side: {"ms": 1000 * statistics.median(t), "runs_ms": [1000 * x for x in t],
                             "rss_growth_mb": rss_growth[st][side]} for side, t in sides.items()}
    audio_s = result["audio_s"]
    for side in ("reference", "ours"):
        s3 = stages["flow"][side]["ms"] + stages["hift"][side]["ms"]
        stages.setdefault("s3gen", {})[side] = {"ms": s3, "rtf": s3 / 1000 / audio_s}
        total = s3 + (stages["watermark"][side]["ms"] if "watermark" in stages else 0.0)
        if "t3" in result:
            t3 = result["t3"][side]
            t3_ms = t3["first_token_ms"] + (args.tokens - 1) * t3["decode_ms_per_token"]
            stages.setdefault("t3_for_tokens", {})[side] = {"ms": t3_ms}
            total += t3_ms
        stages.setdefault("overall", {})[side] = {"ms": total, "rtf": total / 1000 / audio_s}
    for st in stages.values():
        st["speedup"] = st["reference"]["ms"] / st["ours"]["ms"]
    result["stages"] = stages
    result["peak_rss_mb"] = peak_rss_mb()

    env["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_report(result, env, args)
    if args.profile:
        result["profile"] = profile_calls(fns, ref_tts, ours_tts, PROFILE_ROWS)
    return result


def print_report(r: dict, env: dict, args) -> None:
    print(f"\n# {r['variant']}: CPU fp32, {env['threads']} threads, torch {env['torch']}, {env['cpu']}, {env['date']}")
    print(f"# {r['tokens']} speech tokens = {r['audio_s']:.2f} s of audio ({r['mel_frames']} mel frames), "
          f"median of {args.runs}; load average {env['loadavg_start']} -> {env['loadavg_end']}")
    print(f"{'stage':<28} {'reference ms':>12} {'ours ms':>10} {'speed-up':>9} {'ref RTF':>8} {'ours RTF':>8}")
    s = r["stages"]

    def row(name, key):
        if key not in s:
            return
        a, b = s[key]["reference"], s[key]["ours"]
        rtf = (f"{a['rtf']:>8.3f} {b['rtf']:>8.3f}" if "rtf" in a else "")
        print(f"{name:<28} {a['ms']:>12.1f} {b['ms']:>10.1f} {s[key]['speedup']:>8.2f}x {rtf}")

    if "t3" in r:
        t = r["t3"]
        print(f"{'T3 decode (ms/token)':<28} {t['reference']['decode_ms_per_token']:>12.1f} "
              f"{t['ours']['decode_ms_per_token']:>10.1f} {t['decode_speedup']:>8.2f}x")
        print(f"{'T3 first token':<28} {t['reference']['first_token_ms']:>12.1f} "
              f"{t['ours']['first_token_ms']:>10.1f} {t['first_token_speedup']:>8.2f}x")
    row("voice preparation", "voice")
    row("S3Gen flow (encoder + CFM)", "flow")
    row("S3Gen HiFT", "hift")
    row("S3Gen total", "s3gen")
    row("watermark", "watermark")
    row(f"T3, {r['tokens']} tokens (extrap.)", "t3_for_tokens")
    row("overall (T3 + S3Gen + wm)" if "t3" in r else "overall (S3Gen + wm)", "overall")
    growth = "  ".join(f"{st} {s[st]['reference']['rss_growth_mb']:.0f}/{s[st]['ours']['rss_growth_mb']:.0f}"
                       for st in STAGES if st in s)
    print(f"# memory: peak RSS of the process {r['peak_rss_mb']:.0f} MiB (resource.getrusage ru_maxrss, both "
          f"sides loaded); S3Gen + voice encoder of both sides {r['models_rss_mb']:.0f} MiB; "
          f"per-stage peak RSS growth ref/ours MiB: {growth}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="chatterbox", choices=VARIANTS)
    p.add_argument("--tokens", type=int, default=100, help="speech tokens through S3Gen (25 per second of audio)")
    p.add_argument("--t3-tokens", type=int, default=32, help="tokens per T3 decode timing")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-t3", action="store_true")
    p.add_argument("--skip-watermark", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one CFM estimator and one HiFT call")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.t3_tokens < 2 or args.tokens < 1 or args.warmup < 1:
        p.error("--t3-tokens must be >= 2, --tokens and --warmup >= 1")
    torch.set_num_threads(args.threads)
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu", "dtype": "fp32",
           "date": time.strftime("%Y-%m-%d"), "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    r = run(args, env)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "config": vars(args), "result": r}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
