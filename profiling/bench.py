"""``chatterbox-rt bench``: per-stage speed of chatterbox-rt, optionally against the reference
implementation with identical weights and inputs in the same process.

    chatterbox-rt bench --dummy-weights --device cpu --compare-upstream --json out.json

What one request is, and how each figure is measured (medians and p90 over ``--runs``):

* ``voice_ms``: voice preparation from a reference clip (``prepare_conditionals``), once per
  voice and therefore not part of the RTF. The clip is ``--voice`` or a synthetic 6.5 s voiced
  signal written to a temporary WAV (both sides read the same file).
* ``t3_prefill_ms``: T3 asked for 1 token (the prefill and the first draw).
  ``t3_ms``: T3 asked for ``--tokens`` N tokens with EOS disabled on both sides, so random weights
  cannot stop early and both sides do the same work. ``t3_ms_per_token`` =
  (t3_ms - t3_prefill_ms) / (N - 1) and ``t3_tokens_per_s`` its inverse, i.e. the decode rate.
* ``cfm_ms``: N fixed, valid speech tokens -> mel (token embedding, conformer encoder and the CFM
  solver: 10 Euler steps with CFG, or 2 meanflow steps); ``hift_ms``: that mel -> waveform
  (HiFT with the trim-fade); ``watermark_ms``: the waveform to the host and Perth's watermark.
* ``first_audio_ms`` = t3_ms + cfm_ms + hift_ms + watermark_ms: without streaming the first
  sample arrives with the whole request. ``rtf`` = first_audio_ms / audio length (N / 25 s);
  ``s3gen_rtf`` = (cfm_ms + hift_ms) / audio length.
* ``peak_mem_mb``: on CUDA the peak allocated GPU memory of the side's pass (weights included);
  on CPU the side's weights plus the largest resident-set growth of any of its stages
  (``peak_host_rss_mb`` is the whole process's peak RSS, both sides loaded).

With ``--compare-upstream`` the reference (chatterbox-tts 0.1.7, fp32, as it ships) runs the same
stages on the same device with the same weights (dummy weights: built as the reference's loaders
build its modules, re-randomised from the seed, and loaded into ours; ``--ckpt``: both sides load
the directory) and the same inputs; each run alternates which side goes first. ``speedup`` holds
reference / ours per time (ours / reference for tokens/s): > 1 means chatterbox-rt is faster.

``--concurrency 1,8,32`` measures serving through ``chatterbox_rt.Engine`` (continuous batching):
per level ``c`` a fresh ``Engine(tts, max_batch=c)`` whose KV slots hold the prompt plus ``--tokens``,
warmed up with ``c`` short requests (so each decode batch-size bucket, one CUDA graph on a GPU,
is captured before timing), then ``c`` requests submitted at once, each with its own seed, EOS
disabled (``--tokens`` N drawn each; ids >= 6561 are dropped as usual) and ``stream=--stream``.
Per level:

* ``aggregate_x_realtime``: audio seconds of all c requests / wall seconds from the first submit
  to the last result.
* ``aggregate_tokens_per_s``: T3 speech tokens drawn by all c requests / ``t3_wall_s``, the T3
  phase: from the first request's admission into a KV slot to the last request's last token
  (``max(t_admit + t3_ms) - min(t_admit)``). S3Gen of requests that finished early (all of them,
  streaming) overlaps it. ``decode_tokens_per_s``: tokens drawn by the engine's decode steps /
  the time spent in them (``Engine.stats()``'s ``decode_tokens`` / ``decode_s`` over the level's
  timed requests): the decode rate, prefills excluded.
* ``latency_ms_median`` / ``_p90``: per-request submit -> done (``metrics.total_ms``);
  ``first_audio_ms_median`` / ``_p90``: submit -> first audio ready (the first streamed chunk
  with ``--stream``, the whole waveform otherwise); ``queue_ms_median``: submit -> admitted.
* ``peak_mem_mb``: as for the stages, over the level (engine build, warm-up, timed requests): on
  CUDA the peak allocated memory (weights and KV cache included); on CPU the weights plus the RSS
  growth (``rss_growth_mb``).
* ``speedup``: ``tokens_per_s`` and ``x_realtime`` of the level / those of the lowest level
  (``vs_concurrency``, 1 when it is among the levels).

The reference has no batching: with ``--compare-upstream`` it runs the per-stage comparison only,
never the concurrency levels.

``--stream`` also times streaming alone (``stream`` in the JSON): one request at a time, ``--runs``
times, through an ``Engine(max_batch=1)`` with the default chunk sizes (a first chunk of 20 tokens,
then 25): ``first_chunk_ms`` (submit -> first chunk, median and p90), ``total_ms`` (the whole
request) and ``first_chunk_fraction`` = first_chunk_ms / total_ms. With ``--backend onnxruntime``
the same runs on each bundle (``stream_backends``, keyed as ``backends``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

SCHEMA_PATH = Path(__file__).with_name("bench_schema.json")
TOKENS_PER_SECOND = 25  # S3 speech tokens: 25 per second of audio
SPEECH_CODEBOOK = 6561
CLIP_SR, CLIP_SECONDS = 24000, 6.5
DEFAULT_TEXT = ("Chatterbox-rt turns text into speech on this machine, and this sentence is long enough "
                "to give the text encoder realistic work.")
# Stages in execution order: name -> what it does.
STAGES = {
    "voice": "voice preparation (once per voice)",
    "t3_prefill": "T3 prefill + first token",
    "t3": "T3, all tokens",
    "cfm": "CFM (encoder + solver)",
    "hift": "HiFT vocoder",
    "watermark": "to host + watermark",
}
TIME_KEYS = ("voice_ms", "t3_prefill_ms", "t3_ms", "t3_ms_per_token", "cfm_ms", "hift_ms", "watermark_ms",
             "first_audio_ms")
LOWER_IS_BETTER = TIME_KEYS + ("rtf", "s3gen_rtf", "peak_mem_mb")
HIGHER_IS_BETTER = ("t3_tokens_per_s",)
# Prompt entries beside the voice's conditioning and the text: the start-of-speech token (and the
# Llama variants' extra one), as in T3Request.P.
PROMPT_EXTRA_TOKENS = 2
# Seeds of the warm-up requests: away from the timed requests' seed .. seed + c - 1.
WARMUP_SEED_OFFSET = 1 << 20


# ------------------------------------------------------------------------------ measurement helpers

def rss_mb() -> float:
    """Current resident set size (VmRSS) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:  # no /proc (not Linux): unknown
        return float("nan")
    return float("nan")


def peak_rss_mb() -> float:
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def rss_growth_mb(fn: Callable) -> float:
    """Run fn once; the peak VmRSS above the value before the call (MiB), sampled every 2 ms."""
    gc.collect()
    base = rss_mb()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(0.0, max(peak[0], rss_mb()) - base)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc/cpuinfo: fall through to what platform knows
        return platform.processor() or platform.machine()
    return platform.processor() or platform.machine()


def p90(xs: list) -> float:
    """The 90th percentile (linear interpolation; the maximum for fewer than 10 samples)."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), 90))


def module_mb(*modules) -> float:
    seen, total = set(), 0
    for m in modules:
        if m is None or not isinstance(m, torch.nn.Module):  # another backend's stage holds no torch weights
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type == "meta":
                continue
            key = ("id", id(t)) if t.is_mkldnn else t.data_ptr()  # a oneDNN-packed weight has no storage
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total / 2**20


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _kernel_backends(device: torch.device) -> Optional[dict]:
    """{op: backend} the dispatch layer picks for this device (cpp/cuda/triton/native)."""
    try:
        from ..kernels import dispatch

        return dispatch.summary(device)
    except Exception as e:  # noqa: BLE001 - an explicit CHATTERBOX_RT_KERNELS that cannot run: say so
        return {"error": str(e)}


def environment(device: torch.device, dtype_name: str) -> dict:
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "chatterbox_rt": __version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device": str(device),
        "precision": dtype_name,
        "backend": "torch eager",
        "kernels": _kernel_backends(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "gpu_name": None, "gpu_sm_count": None, "gpu_memory_gb": None, "gpu_capability": None, "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), gpu_capability=f"{props.major}.{props.minor}",
                   driver=_nvidia_driver())
    return env


def synthetic_clip(path: Path, seconds: float = CLIP_SECONDS, sr: int = CLIP_SR) -> Path:
    """A deterministic voiced signal (gliding 90-180 Hz harmonics under a syllable-rate envelope,
    a little noise) as a stand-in reference clip: voice preparation costs the same on any audio."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    f0 = 130 + 45 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 12))
    wav *= 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    wav += 0.01 * np.random.default_rng(0).standard_normal(t.size)
    wav = (0.3 * wav / np.abs(wav).max()).astype(np.float32)
    sf.write(str(path), wav, sr, subtype="FLOAT")
    return path


# ------------------------------------------------------------------------------ the two sides

class Side:
    """One implementation's stages as callables; each returns what the next stage needs."""

    def __init__(self, name: str, device: torch.device, modules: tuple):
        self.name, self.device, self.modules = name, device, modules
        self.fns: dict[str, Callable] = {}
        self.state: dict = {"run": 0}  # the run index (picks the text) and stage outputs
        self.voice = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, stage: str) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.fns[stage]()
        self.sync()
        return time.perf_counter() - t0


def speech_tokens(n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SPEECH_CODEBOOK, (1, n), generator=g).to(device)


def our_side(tts, clip: Path, text_ids: Callable[[int], torch.Tensor], n_tokens: int, seed: int,
             watermark: bool) -> Side:
    side = Side("ours", tts.device, (tts.t3, tts.s3gen, tts.ve))
    voice = tts.prepare_conditionals(clip)
    tokens = speech_tokens(n_tokens, seed, tts.device)
    state = side.state

    def t3(n):
        g = torch.Generator(device=tts.device).manual_seed(seed)
        with tts._lock:  # the TTS's own rule: one request at a time on T3's KV cache
            return tts.t3.generate(voice.t3, text_ids(state["run"]), max_new_tokens=n, stop_on_eos=False,
                                   generator=g)

    def cfm():
        g = torch.Generator(device=tts.device).manual_seed(seed)
        state["mel"] = tts.s3gen.flow_mel(tokens, None, voice.gen, generator=g)[0]

    def hift():
        g = torch.Generator(device=tts.device).manual_seed(seed)
        state["wav"] = tts.s3gen.hift(state["mel"], generator=g)

    side.fns = {
        "voice": lambda: tts.prepare_conditionals(clip),
        "t3_prefill": lambda: t3(1),
        "t3": lambda: t3(n_tokens),
        "cfm": cfm,
        "hift": hift,
        "watermark": lambda: tts._finish(state["wav"], watermark),
    }
    side.voice = voice
    return side


def reference_side(ref_tts, clip: Path, text_ids: Callable[[int], torch.Tensor], n_tokens: int, seed: int,
                   watermark: bool, device: torch.device) -> Side:
    import chatterbox.models.s3gen.flow_matching as ref_fm
    import chatterbox.models.t3.t3 as ref_t3_mod
    from chatterbox.models.s3gen.s3gen import S3GEN_SR

    # The reference's progress bars (and meanflow's print per call) would interleave with the report.
    ref_t3_mod.tqdm = ref_fm.tqdm = lambda it, *a, **k: it
    ref_fm.print = lambda *a, **k: None
    from .upstream import ref_t3_fixed_tokens

    side = Side("reference", device, (ref_tts.t3, ref_tts.s3gen, ref_tts.ve))
    ref_tts.prepare_conditionals(str(clip))
    tokens = speech_tokens(n_tokens, seed, device)
    state = side.state

    def run_t3(n):
        torch.manual_seed(seed)
        return ref_t3_fixed_tokens(ref_tts.t3, ref_tts.conds.t3, text_ids(state["run"]).to(device), n)

    def cfm():
        torch.manual_seed(seed)
        state["mel"] = ref_tts.s3gen.flow_inference(tokens, ref_dict=dict(ref_tts.conds.gen), finalize=True)

    def hift():
        s3 = ref_tts.s3gen
        wav, _ = s3.hift_inference(state["mel"])
        wav[:, : len(s3.trim_fade)] *= s3.trim_fade
        state["wav"] = wav

    def finish():
        wav = state["wav"].squeeze(0).detach().cpu().numpy()
        if watermark:
            wav = ref_tts.watermarker.apply_watermark(wav, sample_rate=S3GEN_SR)
        return wav

    side.fns = {
        "voice": lambda: ref_tts.prepare_conditionals(str(clip)),
        "t3_prefill": lambda: run_t3(1),
        "t3": lambda: run_t3(n_tokens),
        "cfm": cfm,
        "hift": hift,
        "watermark": finish,
    }
    return side


def build_models(args, device: torch.device, dtype: torch.dtype):
    """-> (our TTS, the reference's TTS object or None)."""
    from ..precision import PrecisionConfig, apply_t3, cast_frontend
    from ..tts import TTS

    precision = getattr(args, "load_precision", None)

    if not args.compare_upstream:
        if args.ckpt:
            return TTS.from_local(args.ckpt, variant=args.variant, device=device, dtype=dtype, precision=precision), None
        from ..models.t3.config import smaller_backbone
        from .upstream import REDUCED

        overrides = smaller_backbone(args.variant, **REDUCED[args.variant]) if args.reduced_t3 else {}
        return TTS.from_dummy(args.variant, seed=args.seed, device=device, dtype=dtype, precision=precision,
                              **overrides), None

    from .upstream import (build_s3gen_pair, build_t3_pair, build_voice_encoders, load_reference, ref_tts_class)

    ref = load_reference()
    import logging

    for name in ("chatterbox", "root", ""):
        logging.getLogger(name).setLevel(logging.ERROR)
    cls = ref_tts_class(args.variant)
    if args.ckpt:
        ours = TTS.from_local(args.ckpt, variant=args.variant, device=device, dtype=dtype, precision=precision)
        return ours, cls.from_local(args.ckpt, str(device))

    from ..text import dummy_text_frontend
    from ..tts import dummy_voice

    ref_t3, t3 = build_t3_pair(ref, args.variant, reduced=args.reduced_t3, seed=args.seed)
    ref_s3gen, s3gen = build_s3gen_pair(ref, meanflow=args.variant in ("turbo", "nano"), seed=args.seed + 1)
    ref_ve, ve = build_voice_encoders(ref, seed=args.seed + 2)
    ref_tts = cls(ref_t3.to(device), ref_s3gen.to(device), ref_ve.to(device), None, str(device))
    if hasattr(ref_tts, "norm_loudness"):
        # NOTE: under NumPy 2 the reference's float32 clip times a float64 gain becomes float64, which
        # its S3 tokenizer rejects; NumPy 1 (its pin) kept float32. Cast back, as it behaves there.
        norm = ref_tts.norm_loudness
        ref_tts.norm_loudness = lambda wav, sr, *a, **k: norm(wav, sr, *a, **k).astype("float32")
    config = PrecisionConfig.resolve(precision, dtype, device)
    t3 = apply_t3(t3.to(device=device), config)
    s3gen = s3gen.to_precision(device, config=config)
    voice = dummy_voice(t3.config.speech_cond_prompt_len, seed=args.seed + 3)
    ours = TTS(args.variant, t3, s3gen, cast_frontend(ve.to(device), config.dtype("frontends")),
               dummy_text_frontend(args.variant), voice, source=f"the reference's random weights (seed {args.seed})")
    return ours, ref_tts


# ------------------------------------------------------------------------------ running

def _summary(times: dict, n_tokens: int, audio_s: float, peak_mem_mb: float, extra: dict) -> dict:
    """Stage run times (s) -> the JSON block of one side: medians, p90 and every run."""
    runs = {f"{st}_ms": [1000.0 * t for t in ts] for st, ts in times.items()}
    per_run = {k: list(v) for k, v in runs.items()}
    if "t3_ms" in runs:
        per_run["t3_ms_per_token"] = [(a - b) / max(n_tokens - 1, 1)
                                      for a, b in zip(runs["t3_ms"], runs["t3_prefill_ms"], strict=True)]
    parts = [k for k in ("t3_ms", "cfm_ms", "hift_ms", "watermark_ms") if k in runs]
    per_run["first_audio_ms"] = [sum(vals) for vals in zip(*(runs[k] for k in parts), strict=True)]
    per_run["rtf"] = [x / 1000.0 / audio_s for x in per_run["first_audio_ms"]]
    per_run["s3gen_rtf"] = [(a + b) / 1000.0 / audio_s for a, b in zip(runs["cfm_ms"], runs["hift_ms"], strict=True)]
    out = {k: statistics.median(v) for k, v in per_run.items()}
    q90 = {k: p90(v) for k, v in per_run.items()}
    if "t3_ms_per_token" in out:
        # The decode rate of the median step time (and of the p90 one: the slow end). A step time at
        # or below zero can only come from timer noise with very few tokens: no rate then.
        def rate(ms):
            return 1000.0 / ms if ms > 0 else None

        out["t3_tokens_per_s"], q90["t3_tokens_per_s"] = rate(out["t3_ms_per_token"]), rate(q90["t3_ms_per_token"])
    out["peak_mem_mb"] = peak_mem_mb
    out.update(extra)
    out["p90"] = q90
    out["runs"] = per_run
    return out


def _speedup(ours: dict, ref: dict) -> dict:
    out = {}
    # A ratio only of two positive figures: a decode time per token at or below zero is timer
    # noise with very few tokens (the schema lets t3_ms_per_token be absent then).
    for k in LOWER_IS_BETTER + HIGHER_IS_BETTER:
        a, b = ours.get(k), ref.get(k)
        if a is not None and b is not None and a > 0 and b > 0:
            out[k] = b / a if k in LOWER_IS_BETTER else a / b
    return out


def _warm_and_measure(side: Side, stages: list) -> tuple[float, dict]:
    """One untimed pass over the stages (warm-up) that also measures memory: -> (peak_mem_mb, extra)."""
    gc.collect()
    if side.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(side.device)
        for st in stages:
            side.fns[st]()
        side.sync()
        peak = torch.cuda.max_memory_allocated(side.device) / 2**20
        return peak, {"peak_gpu_mem_mb": peak}
    growth = {st: rss_growth_mb(side.fns[st]) for st in stages}
    weights = module_mb(*side.modules)
    return weights + max(growth.values()), {"weights_mb": weights, "rss_growth_mb": growth}


def run_stages(sides: list, stages: list, runs: int, warmup: int, set_run: Callable[[int], None]) -> dict:
    """Warm up, then time every stage of every side ``runs`` times, alternating which side goes first."""
    mem = {}
    for side in sides:
        mem[side.name] = _warm_and_measure(side, stages)
        for _ in range(warmup - 1):
            for st in stages:
                side.fns[st]()
    times = {side.name: {st: [] for st in stages} for side in sides}
    from . import nvtx

    nvtx.profiler_start()  # under profiling/nsys.sh the capture covers the timed runs only
    try:
        for i in range(runs):
            set_run(i)
            order = sides if i % 2 == 0 else sides[::-1]
            for st in stages:
                for side in order:
                    with nvtx.range(f"bench_{st}", st if st in nvtx.STAGE_COLORS else None):
                        times[side.name][st].append(side.timed(st))
            print(f"  run {i + 1}/{runs} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        nvtx.profiler_stop()
    return {"times": times, "mem": mem}


def _engine_max_len(tts, voice, text_tokens: int, n_tokens: int) -> int:
    """KV entries per slot for a request of ``text_tokens`` text tokens drawing ``n_tokens``: the
    voice's conditioning prefix, the text, the start/stop tokens and the speech (``T3Request.cache_len``)."""
    return tts.t3.cond_len(voice.t3) + text_tokens + PROMPT_EXTRA_TOKENS + n_tokens


def _warmup_tokens(n_tokens: int) -> int:
    """Speech tokens of a warm-up request: enough for the first stream cut and one more chunk."""
    from ..engine import DEFAULT_CHUNK_TOKENS, DEFAULT_FIRST_CHUNK_TOKENS

    return min(n_tokens, DEFAULT_FIRST_CHUNK_TOKENS + DEFAULT_CHUNK_TOKENS)


def _submit_all(eng, voice, text_for: Callable[[int], str], count: int, n_tokens: int, seed: int, watermark: bool,
                language_id: Optional[str], stream: bool) -> list:
    """``count`` requests at once (EOS disabled, seeds seed .. seed + count - 1) -> their finished Requests."""
    reqs = [eng.submit(text_for(i), voice, seed=seed + i, language_id=language_id, stream=stream,
                       max_new_tokens=n_tokens, stop_on_eos=False, watermark=watermark) for i in range(count)]
    for r in reqs:
        r.result()  # raises RequestFailed if the engine could not finish it
    return reqs


def _peak_mem(tts, fn: Callable) -> tuple:
    """Run fn once -> (its result, peak memory MiB, CPU RSS growth MiB or None), as the stages
    measure it: on CUDA the peak allocated GPU memory (weights included), on CPU the weights plus
    the resident-set growth during the call (a lower bound: memory the allocator kept from earlier
    work is reused without growing the RSS)."""
    gc.collect()
    if tts.device.type == "cuda":
        torch.cuda.synchronize(tts.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(tts.device)
        out = fn()
        torch.cuda.synchronize(tts.device)
        return out, torch.cuda.max_memory_allocated(tts.device) / 2**20, None
    box = []
    growth = rss_growth_mb(lambda: box.append(fn()))
    return box[0], module_mb(tts.t3, tts.s3gen, tts.ve) + growth, growth


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    # None where a figure is missing, or the base level produced nothing (every token dropped)
    return a / b if a is not None and b is not None and b > 0 else None


def _quantiles(xs: list) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), p90(xs)) if xs else (None, None)


def run_concurrency(tts, voice, text_for: Callable[[int], str], levels: list, n_tokens: int, text_tokens: int,
                    seed: int, watermark: bool, language_id: Optional[str], stream: bool) -> list:
    """Per level ``c``: a fresh ``Engine(max_batch=c)``, warmed up, then ``c`` requests submitted at
    once (EOS disabled, so each draws ``n_tokens``) -> [{concurrency, ...}] (see the module docstring)."""
    from ..engine import Engine

    max_len = _engine_max_len(tts, voice, text_tokens, n_tokens)
    warm = _warmup_tokens(n_tokens)
    out = []
    for c in levels:
        def level(c=c):
            with Engine(tts, max_batch=c, max_len=max_len) as eng:
                # Warm-up: c short requests at once, so the decode step's batch-size buckets (one CUDA
                # graph each, captured on first use) and S3Gen's batched shapes exist before timing.
                _submit_all(eng, voice, text_for, c, warm, seed + WARMUP_SEED_OFFSET, watermark, language_id,
                            stream)
                before = eng.stats()
                t0 = time.perf_counter()
                reqs = _submit_all(eng, voice, text_for, c, n_tokens, seed, watermark, language_id, stream)
                wall = time.perf_counter() - t0
                after = eng.stats()
                info = {k: v for k, v in after.items() if k in ("max_len", "mode", "slots_total", "group_rows")}
                decode = (after["decode_tokens"] - before["decode_tokens"], after["decode_s"] - before["decode_s"])
            return reqs, wall, info, decode

        (reqs, wall, info, (dec_tokens, dec_s)), peak, growth = _peak_mem(tts, level)
        ms = [r.metrics for r in reqs]
        seconds = [r.result().shape[-1] / tts.sr for r in reqs]
        audio = sum(seconds)
        tokens = sum(m.n_tokens for m in ms)
        # The T3 phase: from the first admission into a KV slot to the last request's last token.
        t3_start = min(r.t_admit for r in reqs)
        t3_end = max(r.t_admit + m.t3_ms / 1000.0 for r, m in zip(reqs, ms, strict=True))
        t3_wall = max(t3_end - t3_start, 1e-9)
        lat50, lat90 = _quantiles([m.total_ms for m in ms])
        first50, first90 = _quantiles([m.first_audio_ms for m in ms])
        rtfs = [m.total_ms / 1000.0 / s for m, s in zip(ms, seconds, strict=True) if s > 0]
        entry = {"concurrency": c, "requests": c, "stream": stream, "wall_s": wall, "audio_s": audio,
                 "aggregate_x_realtime": audio / max(wall, 1e-9), "tokens": tokens, "t3_wall_s": t3_wall,
                 "aggregate_tokens_per_s": tokens / t3_wall,
                 "decode_tokens_per_s": dec_tokens / dec_s if dec_s > 0 else None,
                 "latency_ms_median": lat50, "latency_ms_p90": lat90,
                 "first_audio_ms_median": first50, "first_audio_ms_p90": first90,
                 "queue_ms_median": _quantiles([m.queue_ms for m in ms])[0],
                 "rtf_median": statistics.median(rtfs) if rtfs else None,
                 "peak_mem_mb": peak, "engine": dict(info, max_batch=c)}
        if growth is not None:
            entry["rss_growth_mb"] = growth
        base = out[0] if out else entry
        entry["speedup"] = {"vs_concurrency": base["concurrency"],
                            "tokens_per_s": _ratio(entry["aggregate_tokens_per_s"], base["aggregate_tokens_per_s"]),
                            "decode_tokens_per_s": _ratio(entry["decode_tokens_per_s"], base["decode_tokens_per_s"]),
                            "x_realtime": _ratio(entry["aggregate_x_realtime"], base["aggregate_x_realtime"])}
        out.append(entry)
        print(f"  concurrency {c}: {entry['aggregate_x_realtime']:.2f}x real time, "
              f"{entry['aggregate_tokens_per_s']:.1f} T3 tokens/s ({_fmt(entry['decode_tokens_per_s'])} in decode "
              f"steps), median latency {lat50:.0f} ms, "
              f"first audio {_fmt(first50)} ms", flush=True)
    return out


def run_stream(tts, voice, text_for: Callable[[int], str], runs: int, n_tokens: int, text_tokens: int, seed: int,
               watermark: bool, language_id: Optional[str]) -> dict:
    """One streamed request at a time, ``runs`` times, through an ``Engine(max_batch=1)``: the time
    to its first audio chunk against the whole request's latency."""
    from ..engine import DEFAULT_CHUNK_TOKENS, DEFAULT_FIRST_CHUNK_TOKENS, Engine

    first, total = [], []
    with Engine(tts, max_batch=1, max_len=_engine_max_len(tts, voice, text_tokens, n_tokens)) as eng:
        _submit_all(eng, voice, text_for, 1, _warmup_tokens(n_tokens), seed + WARMUP_SEED_OFFSET, watermark,
                    language_id, True)
        for i in range(runs):
            (req,) = _submit_all(eng, voice, lambda _, i=i: text_for(i), 1, n_tokens, seed + i, watermark,
                                 language_id, True)
            first.append(req.metrics.first_audio_ms)
            total.append(req.metrics.total_ms)
    f50, f90 = _quantiles(first)
    t50, t90 = _quantiles(total)
    return {"runs": runs, "chunk_tokens": DEFAULT_CHUNK_TOKENS, "first_chunk_tokens": DEFAULT_FIRST_CHUNK_TOKENS,
            "first_chunk_ms": f50, "first_chunk_ms_p90": f90, "total_ms": t50, "total_ms_p90": t90,
            "first_chunk_fraction": f50 / t50 if t50 else None,
            "runs_ms": {"first_chunk_ms": first, "total_ms": total}}


def profile_request(side: Side, stages: list, path: Path) -> None:
    """A torch.profiler Chrome trace of one pass over our stages (each a record_function range)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for st in stages:
            with record_function(f"chatterbox_rt.{st}"):
                side.fns[st]()
        side.sync()
    prof.export_chrome_trace(str(path))  # its directory was checked by validate()


# ------------------------------------------------------------------------------ report

ROWS = (
    ("voice preparation", "voice_ms", "ms"),
    ("T3 prefill + 1st token", "t3_prefill_ms", "ms"),
    ("T3 decode", "t3_ms_per_token", "ms/tok"),
    ("T3 decode rate", "t3_tokens_per_s", "tok/s"),
    ("T3, all tokens", "t3_ms", "ms"),
    ("CFM (encoder + solver)", "cfm_ms", "ms"),
    ("HiFT", "hift_ms", "ms"),
    ("to host + watermark", "watermark_ms", "ms"),
    ("first audio (no streaming)", "first_audio_ms", "ms"),
    ("RTF", "rtf", ""),
    ("S3Gen RTF", "s3gen_rtf", ""),
    ("peak memory", "peak_mem_mb", "MiB"),
)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def format_report(result: dict) -> str:
    env, cfg, ours, ref = result["env"], result["config"], result["ours"], result["reference"]
    dev = env["gpu_name"] or env["cpu"]
    lines = [f"# chatterbox-rt bench: {cfg['variant']}, {env['device']} {env['precision']} ({env['backend']}), "
             f"{env['threads']} threads, {dev}, torch {env['torch']}, {env['date']}",
             f"# {cfg['tokens']} speech tokens = {cfg['audio_s']:.2f} s of audio; median (p90) of {cfg['runs']} runs; "
             f"weights: {cfg['weights']}; load average {env['loadavg_start']} -> {env.get('loadavg_end')}"]
    head = f"{'stage':<28} {'unit':<6} {'ours':>18}"
    if ref is not None:
        head += f" {'reference':>18} {'speed-up':>9}"
    lines.append(head)
    for label, key, unit in ROWS:
        if key not in ours:
            continue

        def cell(side, key=key):
            q = side.get("p90", {}).get(key)
            return f"{_fmt(side[key])} ({_fmt(q)})" if q is not None else _fmt(side[key])

        row = f"{label:<28} {unit:<6} {cell(ours):>18}"
        if ref is not None and key in ref:
            sp = result["speedup"].get(key)
            row += f" {cell(ref):>18} {('%.2fx' % sp) if sp is not None else '-':>9}"
        lines.append(row)
    lines.append(f"# peak host RSS of the process: {result['peak_host_rss_mb']:.0f} MiB"
                 + (" (both sides loaded)" if ref is not None else ""))
    for name, side in (result.get("backends") or {}).items():
        sp = result["backend_speedup"].get(name, {})
        lines.append(f"# {name} (same weights, same inputs; speed-up over our torch backend):")
        for label, key, unit in ROWS:
            if key in side:
                q = side.get("p90", {}).get(key)
                cell = f"{_fmt(side[key])} ({_fmt(q)})" if q is not None else _fmt(side[key])
                s_ = sp.get(key)
                lines.append(f"{label:<28} {unit:<6} {cell:>18} {('%.2fx' % s_) if s_ is not None else '-':>9}")
    lines += _concurrency_table(result)
    streams = [("", result.get("stream"))] + [(f" on {k}", v) for k, v in (result.get("stream_backends") or {}).items()]
    for where, st in streams:
        if st is None:
            continue
        lines.append(f"# streaming{where}, one request alone ({st['first_chunk_tokens']}-token first chunk, then "
                     f"{st['chunk_tokens']}): first chunk {_fmt(st['first_chunk_ms'])} ms "
                     f"(p90 {_fmt(st['first_chunk_ms_p90'])}), whole request {_fmt(st['total_ms'])} ms "
                     f"(p90 {_fmt(st['total_ms_p90'])}): first chunk at {_fmt(st['first_chunk_fraction'])} "
                     "of the request")
    return "\n".join(lines)


CONCURRENCY_COLUMNS = (  # header, key, width
    ("requests", "concurrency", 8), ("x real time", "aggregate_x_realtime", 11),
    ("T3 tok/s", "aggregate_tokens_per_s", 9), ("decode tok/s", "decode_tokens_per_s", 12),
    ("latency p50", "latency_ms_median", 11),
    ("p90", "latency_ms_p90", 7), ("1st audio p50", "first_audio_ms_median", 13), ("p90", "first_audio_ms_p90", 7),
    ("peak MiB", "peak_mem_mb", 8),
)


def _concurrency_table(result: dict) -> list:
    conc = result.get("concurrency") or []
    if not conc:
        return []
    stream = conc[0].get("stream")
    base = conc[0].get("speedup", {}).get("vs_concurrency", conc[0]["concurrency"])
    title = (f"# concurrency through the engine{' (streaming: 1st audio = first chunk)' if stream else ''}; "
             f"latencies in ms; speed-ups against {base} request{'s' if base > 1 else ''} at once")
    if result.get("reference") is not None:
        title += "; the reference has no batching and is not run here"
    head = " ".join(f"{h:>{w}}" for h, _, w in CONCURRENCY_COLUMNS) + f" {'speed-up tok/s':>14} {'x RT':>6}"
    lines = [title, head]
    for c in conc:
        sp = c.get("speedup", {})
        cells = [f"{c['concurrency']:>{w}}" if k == "concurrency" else f"{_fmt(c.get(k)):>{w}}"
                 for _, k, w in CONCURRENCY_COLUMNS]
        tok, xrt = (f"{_fmt(sp[k])}x" if sp.get(k) is not None else "-" for k in ("tokens_per_s", "x_realtime"))
        ratios = f"{tok:>14} {xrt:>6}"
        lines.append(" ".join(cells) + " " + ratios)
    return lines


def write_plot(result: dict, path: Path) -> None:
    """PNG: aggregate throughput (T3 tokens/s, x real time) and per-request latency (p50/p90 of the
    whole request and of the first audio) against concurrency; with the reference, the per-stage
    speed-ups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = result.get("concurrency") or []
    with_ref = result["reference"] is not None
    fig, axes = plt.subplots(1, 3 if with_ref else 2, figsize=(15 if with_ref else 11, 4.2))
    xs = [c["concurrency"] for c in conc]

    ax = axes[0]
    ax.plot(xs, [c["aggregate_tokens_per_s"] for c in conc], "o-", color="tab:blue", label="T3 tokens/s")
    ax.set(xlabel="concurrent requests", ylabel="T3 tokens/s (aggregate)", title="throughput")
    ax.set_ylim(bottom=0)
    rt = ax.twinx()
    rt.plot(xs, [c["aggregate_x_realtime"] for c in conc], "s--", color="tab:green", label="x real time")
    rt.set(ylabel="x real time (aggregate)")
    rt.set_ylim(bottom=0)
    ax.legend(handles=ax.get_lines() + rt.get_lines(), loc="lower right", fontsize=8)

    ax = axes[1]
    first = "first chunk" if conc and conc[0].get("stream") else "first audio"
    for key, label, style in (("latency_ms_median", "request p50", "o-"), ("latency_ms_p90", "request p90", "o--"),
                              ("first_audio_ms_median", f"{first} p50", "s-"),
                              ("first_audio_ms_p90", f"{first} p90", "s--")):
        pts = [(x, c[key]) for x, c in zip(xs, conc, strict=True) if c.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set(xlabel="concurrent requests", ylabel="ms", title="latency per request")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)
    for ax in axes[:2]:
        if len(set(xs)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
    if with_ref:
        keys = [k for k in ("t3_ms_per_token", "cfm_ms", "hift_ms", "watermark_ms", "voice_ms")
                if k in result["speedup"]]
        axes[2].bar(keys, [result["speedup"][k] for k in keys])
        axes[2].axhline(1.0, color="grey", lw=1)
        axes[2].set(ylabel="reference / ours", title="speed-up per stage (one request)")
        axes[2].tick_params(axis="x", rotation=30)
    env, cfg = result["env"], result["config"]
    fig.suptitle(f"{cfg['variant']} {env['device']} {env['precision']}, {env['gpu_name'] or env['cpu']}, "
                 f"{cfg['tokens']} tokens per request{', streamed' if cfg.get('stream') else ''}, {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)  # its directory was checked by validate()
    plt.close(fig)


# ------------------------------------------------------------------------------ entry point

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import VARIANTS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="DIR", help="checkpoint directory (official file names)")
    src.add_argument("--dummy-weights", action="store_true", help="seeded random weights at the real shapes")
    p.add_argument("--variant", default="chatterbox", choices=VARIANTS)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="fp32", help="our precision: fp32, bf16 or fp16 (the reference runs fp32)")
    p.add_argument("--precision", dest="load_precision", default=None, metavar="MODE",
                   help="our precision per module instead of --dtype: auto, fp32, bf16, fp16, int8 or fp8 "
                        "(chatterbox_rt.PrecisionConfig)")
    p.add_argument("--tokens", type=int, default=250, help="speech tokens per request (default 250 = 10 s)")
    p.add_argument("--texts", metavar="FILE", help="UTF-8 file, one text per line; run i uses line i (cycling)")
    p.add_argument("--language", default=None, help="language id for the multilingual model (default en)")
    p.add_argument("--voice", metavar="CLIP", help="reference clip for voice preparation (default: synthetic 6.5 s)")
    p.add_argument("--concurrency", default="1", metavar="N[,N...]",
                   help="requests submitted at once to the engine per level, e.g. 1,8,32 (default 1): aggregate "
                        "tokens/s and x real time, latency and first-audio percentiles, peak memory")
    p.add_argument("--stream", action="store_true",
                   help="stream the requests (first audio = the first chunk) and time one streamed request alone")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                   help="onnxruntime: also export our model (to a temporary bundle) and time every stage on "
                        "onnxruntime beside the torch backend, same weights and inputs, same run")
    p.add_argument("--onnx-precision", default="fp32", metavar="P[,P...]",
                   help="with --backend onnxruntime: the bundles to time, some of fp32, int8, int4 (T3's weights "
                        "as MatMulNBits); default fp32")
    p.add_argument("--compare-upstream", action="store_true",
                   help="also run the reference (chatterbox-tts 0.1.7) with identical weights and inputs")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before timing (default 1)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; median and p90 reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="weights (dummy) and sampling seed: 0 .. 2^63-1 (default 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    p.add_argument("--no-watermark", action="store_true", help="leave the watermark stage out")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (its directory must exist)")
    p.add_argument("--plot", metavar="PATH",
                   help="PNG: throughput and latency against concurrency (+ speed-ups per stage)")
    p.add_argument("--profile", metavar="PATH", help="torch profiler Chrome trace of one of our requests")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (as CHATTERBOX_RT_NVTX=1)")
    # Testing aid, deliberately undocumented: T3 with the reduced backbones of the parity tests.
    p.add_argument("--reduced-t3", action="store_true", help=argparse.SUPPRESS)


def _parse_levels(text: str) -> list:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers, e.g. 1,4,16; got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--concurrency levels must be >= 1; got {text!r}")
    return sorted(set(levels))


def _read_texts(path: Optional[str]) -> list:
    if path is None:
        return [DEFAULT_TEXT]
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--texts {path}: no such file")
    try:
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--texts {path} is not UTF-8 text ({e})") from e
    if not texts:
        raise ValueError(f"--texts {path} has no non-empty lines")
    return texts


def _tokens_limit_error(n: int, variant: str, limit: int, why: str) -> ValueError:
    return ValueError(f"--tokens {n}: one {variant} request can generate at most {limit} speech tokens{why}; "
                      f"ask for fewer (the default, 250, is 10 s of audio)")


def validate(args) -> None:
    """Every option, before anything loads (the output paths included: a missing directory is an
    error, as for ``synth -o``, not created)."""
    from ..cli import check_runtime_options, max_new_tokens_limit
    from ..models.t3.config import canonical_variant

    if not args.ckpt and not args.dummy_weights:
        raise ValueError("no model: give --ckpt DIR or --dummy-weights (seeded random weights)")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2 (the decode rate needs two timings); got {args.tokens}")
    variant = canonical_variant(args.variant)
    limit = max_new_tokens_limit(variant)
    if args.tokens > limit:
        raise _tokens_limit_error(args.tokens, variant, limit, " (Turbo/Nano: with a full-length voice prompt)"
                                  if variant in ("turbo", "nano") else "")
    check_runtime_options(args)  # --threads, --seed, --device, --dtype, CHATTERBOX_RT_KERNELS
    if args.runs < 1 or args.warmup < 1:
        raise ValueError("--runs and --warmup must be >= 1 (the warm-up pass also measures memory)")
    if args.reduced_t3 and not args.dummy_weights:
        raise ValueError("--reduced-t3 (a testing aid) only applies with --dummy-weights")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    if args.compare_upstream:
        from .upstream import REFERENCE_VERSION, reference_available

        if not reference_available():
            raise ImportError(f"--compare-upstream needs the reference: pip install --no-deps "
                              f"chatterbox-tts=={REFERENCE_VERSION} and its imports (make test's set-up installs "
                              "them: pip install -e '.[test]' && pip install --no-deps -r "
                              "tests/requirements-reference.txt)")
    if getattr(args, "backend", "torch") == "onnxruntime":
        bad = [p for p in _onnx_precisions(args) if p not in ("fp32", "int8", "int4")]
        if bad:
            raise ValueError(f"--onnx-precision: unknown {bad}; choose from fp32, int8, int4")
        if args.dtype not in ("fp32", "float32"):
            raise ValueError("--backend onnxruntime exports from the fp32 model: use --dtype fp32")
        if getattr(args, "load_precision", None) not in (None, "fp32"):
            raise ValueError(f"--backend onnxruntime exports from the fp32 model: leave out --precision "
                             f"{args.load_precision} (the bundles' precision is --onnx-precision)")
        from ..export._onnx import require_onnxruntime

        require_onnxruntime()
    if args.voice and not Path(args.voice).is_file():
        raise ValueError(f"--voice {args.voice}: no such file")
    if args.voice:
        from ..audio import check_voice_clip, load_audio
        from ..tts import MIN_VOICE_SECONDS

        wav, sr = load_audio(args.voice, target_sr=CLIP_SR)
        check_voice_clip(wav, sr, min_seconds=MIN_VOICE_SECONDS[variant], name=str(args.voice))
    from ..audio_out import check_output_path

    for option in ("json", "plot", "profile"):
        path = getattr(args, option)
        if path is not None:
            try:
                check_output_path(path)
            except OSError as e:
                raise OSError(f"--{option}: {e}") from None


def _onnx_precisions(args) -> list:
    return [p for p in str(getattr(args, "onnx_precision", "fp32")).replace(" ", "").split(",") if p]


def onnx_sides(ours, args, tmp: Path, clip: Path, text_ids, n: int, watermark: bool) -> list:
    """The onnxruntime backend of the same model, one side per bundle precision (exported here)."""
    from ..export import export
    from ..tts import TTS

    sides = []
    for prec in _onnx_precisions(args):
        out = tmp / f"bundle-{prec}"
        t0 = time.perf_counter()
        print(f"bench: exporting to onnxruntime ({prec}) ...", flush=True)
        export(ours, out, precision=prec)
        print(f"bench: exported in {time.perf_counter() - t0:.0f} s", flush=True)
        ort = TTS.from_exported(out, threads=args.threads or None)
        side = our_side(ort, clip, text_ids, n, args.seed, watermark)
        side.name = f"onnxruntime-{prec}"
        side.tts = ort  # (--stream: also streamed alone)
        sides.append(side)
    return sides


def run(args) -> dict:
    from ..cli import _device, _dtype
    from ..models.t3.config import canonical_variant

    validate(args)
    args.variant = canonical_variant(args.variant)
    levels = _parse_levels(args.concurrency)
    texts = _read_texts(args.texts)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nvtx:
        from . import nvtx

        nvtx.enable()
    device, dtype = torch.device(_device(args.device)), _dtype(args.dtype)
    env = environment(device, args.dtype)
    language = args.language or ("en" if args.variant == "multilingual" else None)
    n, audio_s = args.tokens, args.tokens / TOKENS_PER_SECOND
    print(f"bench: building {args.variant} ({'checkpoint ' + args.ckpt if args.ckpt else 'dummy weights'})"
          f"{' and the reference' if args.compare_upstream else ''} on {device} ...", flush=True)
    ours, ref_tts = build_models(args, device, dtype)
    if ours.precision is not None:
        env["precision_modules"] = ours.precision.describe()  # per module (env["precision"]: --dtype)

    with tempfile.TemporaryDirectory(prefix="chatterbox_rt_bench_") as tmp:
        clip = Path(args.voice) if args.voice else synthetic_clip(Path(tmp) / "voice.wav")
        ids = [ours.text_tokens(t, language) for t in texts]
        text_ids = (lambda i: ids[i % len(ids)])
        watermark = not args.no_watermark
        stages = [s for s in STAGES if watermark or s != "watermark"]
        with torch.inference_mode():
            sides = [our_side(ours, clip, text_ids, n, args.seed, watermark)]
            room = ours.t3.max_text_tokens(sides[0].voice.t3, n)
            longest = max(int(x.numel()) for x in ids)
            if longest > room:  # Turbo/Nano: the voice's prompt, the text and the speech share positions
                raise _tokens_limit_error(n, args.variant, n - (longest - room),
                                          f" with this voice and a text of {longest} tokens")
            if ref_tts is not None:
                sides.append(reference_side(ref_tts, clip, text_ids, n, args.seed, watermark, device))
            if getattr(args, "backend", "torch") == "onnxruntime":
                if device.type != "cpu":
                    raise ValueError("--backend onnxruntime is measured on the CPU execution provider: --device cpu")
                sides += onnx_sides(ours, args, Path(tmp), clip, text_ids, n, watermark)

            def set_run(i):
                for s in sides:
                    s.state["run"] = i

            print(f"bench: {n} tokens per request, {args.warmup} warm-up + {args.runs} timed runs ...", flush=True)
            measured = run_stages(sides, stages, args.runs, args.warmup, set_run)
            if args.profile:
                profile_request(sides[0], stages, Path(args.profile))
        text_for = (lambda i: texts[i % len(texts)])
        stream, stream_backends = None, {}
        if args.stream:
            print(f"bench: streaming, one request at a time, {args.runs} runs ...", flush=True)
            stream = run_stream(ours, sides[0].voice, text_for, args.runs, n, longest, args.seed, watermark, language)
            for s in sides:
                if getattr(s, "tts", None) is not None:  # another backend of our model (--backend onnxruntime)
                    print(f"bench: streaming on {s.name} ...", flush=True)
                    stream_backends[s.name] = run_stream(s.tts, s.voice, text_for, args.runs, n, longest, args.seed,
                                                         watermark, language)
        print(f"bench: concurrency {','.join(map(str, levels))} through the engine"
              f"{' (streaming)' if args.stream else ''} ...", flush=True)
        concurrency = run_concurrency(ours, sides[0].voice, text_for, levels, n, longest, args.seed, watermark,
                                      language, args.stream)

    summaries = {s.name: _summary(measured["times"][s.name], n, audio_s, *measured["mem"][s.name]) for s in sides}
    result = {
        "env": env,
        "config": {"variant": args.variant, "device": str(device), "dtype": args.dtype, "tokens": n,
                   "audio_s": audio_s, "runs": args.runs, "warmup": args.warmup, "concurrency": levels,
                   "texts": len(texts), "text_tokens": [int(x.numel()) for x in ids], "watermark": watermark,
                   "weights": f"checkpoint {args.ckpt}" if args.ckpt else f"dummy (seed {args.seed})"
                   + (", reduced T3" if args.reduced_t3 else ""),
                   "voice": str(args.voice) if args.voice else "synthetic", "stream": bool(args.stream),
                   "compare_upstream": bool(args.compare_upstream),
                   "backend": getattr(args, "backend", "torch"),
                   "onnx_precision": _onnx_precisions(args) if getattr(args, "backend", "torch") != "torch" else []},
        "ours": summaries["ours"],
        "reference": summaries.get("reference"),
        "speedup": _speedup(summaries["ours"], summaries["reference"]) if "reference" in summaries else {},
        # other backends of our model: their figures, and speed-ups over our torch backend (> 1: faster)
        "backends": {k: v for k, v in summaries.items() if k not in ("ours", "reference")},
        # (memory is left out: another backend's weights live outside torch, where peak_mem_mb looks)
        "backend_speedup": {k: {m: x for m, x in _speedup(v, summaries["ours"]).items() if m != "peak_mem_mb"}
                            for k, v in summaries.items() if k not in ("ours", "reference")},
        "concurrency": concurrency,
        "stream": stream,
        "stream_backends": stream_backends,  # --stream with --backend onnxruntime: the same, per bundle
        "peak_host_rss_mb": peak_rss_mb(),
    }
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(args) -> int:
    result = run(args)
    print(format_report(result), flush=True)
    if args.json:
        from ..audio_out import write_bytes

        write_bytes(args.json, json.dumps(result, indent=2, allow_nan=False).encode())  # atomically
        print(f"bench: wrote {args.json}")
    if args.plot:
        write_plot(result, Path(args.plot))
        print(f"bench: wrote {args.plot}")
    if args.profile:
        print(f"bench: wrote {args.profile} (open in chrome://tracing or https://ui.perfetto.dev)")
    return 0


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


__all__ = ["add_arguments", "run", "main", "format_report", "load_schema", "STAGES"]
