"""Each fused op against the model's own eager torch expression, at HiFT / CFM / T3 scale.

    .venv/bin/python profiling/bench_kernels.py [--device cpu|cuda] [--ops snake,istft,cfg_euler,sample]
        [--dtype fp32,bf16] [--reps N] [--threads N] [--json PATH] [--trace DIR] [--peak-gbps X] [--quick]

``eager`` is the plain-torch expression each op replaces, as the model computed it before the fused
ops (``snake_ref``/``istft_ref``, which copy it term for term, and the CFM/T3 lines copied below), so it
stays the baseline whichever backend the model itself dispatches to.

Ops and shapes (``--mel-frames`` T = 500, i.e. 10 s of 24 kHz audio):

* ``snake``: the Snake activations of HiFT's three upsampling stages, ``[1, 512 / 2^i, T prod(rates[:i])]``
  (``HiFTConfig``: [1, 256, 8T], [1, 128, 40T], [1, 64, 120T + 1]). Eager: ``hift.Snake.forward``.
* ``istft``: the head, ``spec [1, n_fft + 2, 120T + 1]`` -> ``[1, 480T]``. Eager: ``decode``'s exp/sin,
  then ``_istft`` (clip, complex, ``torch.istft``) and the clamp.
* ``cfg_euler``: one CFM Euler step with CFG, x ``[B, 80, 2T]`` (prompt + generated mel), v ``[2B, 80, 2T]``,
  B = 1 and 4. Eager: ``cfm._solve_euler_cfg``'s update ``x + (r - t) ((1 + w) v_c - w v_u)`` and the two
  copies into the next step's estimator input ``x_in``; fused: ``cfg_euler_triton_`` / ``_native.cfg_euler_``
  (in place, writes x_in).
* ``sample``: one T3 draw, chatterbox (CFG, logits ``[2R, 8194]``, llama chain) and turbo (``[R, 6563]``,
  gpt chain) at R = 1 and 8, the variants' default sampling parameters. Eager: ``t3.py``'s per-step lines
  (cfg_combine, process_*, softmax, ``sample_no_sync``, the dead-row where). fp32 only: T3 upcasts logits.

Backends: ``eager`` always; on CPU ``cpp`` (``chatterbox_rt._C``, when built); on CUDA ``triton``
(``chatterbox_rt.kernels``) and ``cuda`` (``chatterbox_rt._C``, when built). Unavailable ones are listed
with the reason.

Timing. CPU: ``time.perf_counter`` around each call after a warm-up, backends interleaved call by call
(alternating which goes first), the median reported. CUDA: CUDA events around batches of back-to-back
calls (so an eager chain's launch overhead counts, as it does in the model), batches interleaved across
backends, the median batch reported. Inputs rotate over enough copies to exceed the last-level cache
(L2 on CUDA, L3 on CPU), so GB/s is DRAM traffic, not cache hits.

Bandwidth: ``bytes`` is the op's minimal traffic (each input read once, each output written once);
GB/s = bytes / time, where on CUDA the time is the GPU busy time per call (``kern us``: the kernels,
memcpys and memsets of a call, summed from a ``torch.profiler`` trace), not the launch-bound wall time.
% of peak: against ``--peak-gbps``, else on CUDA the spec-sheet value by GPU name (the table below) or
``2 x memory clock x bus width`` from the device properties, on CPU a measured ``copy_`` bandwidth (a
STREAM-like figure, not a spec; printed as such: an op that streams as well as ``copy_`` shows ~100 %,
and can show more). ``floor`` = bytes / peak: at >= 50 % of peak an op is within 2x of it.

NOTE: on a shared CPU, more threads than idle cores makes every parallel region wait for a descheduled
thread; an eager chain of N ops pays that N times per call. Compare ``--threads 1`` with the default.

Host syncs (``sample``, CUDA): a decode-like loop of N steps (seen-mask update; the fused op's offset a
device tensor advanced on the device) under ``torch.profiler``, counting the CUDA runtime's
synchronising calls inside the loop, and under ``torch.cuda.set_sync_debug_mode("warn")``, counting its
warnings. Measured and printed, not asserted. ``--trace DIR`` exports those loops' Chrome traces.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from chatterbox_rt.kernels import _native
from chatterbox_rt.kernels.cfg_euler_op import HAS_TRITON
from chatterbox_rt.models.s3gen.cfm import FlowConfig, time_span
from chatterbox_rt.models.s3gen.hift import HiFTConfig, hann_window
from chatterbox_rt.models.t3.config import T3Config

OPS = ("snake", "istft", "cfg_euler", "sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEL_FRAMES = 500  # 10 s at 24 kHz / 480 samples per mel frame
QUICK_MEL_FRAMES = 8
CFM_BATCHES = (1, 4)
SAMPLE_ROWS = (1, 8)
SAMPLE_VARIANTS = ("chatterbox", "turbo")
SYNC_LOOP_STEPS = 50
SEEN_FRACTION = 0.05  # tokens already drawn, for the repetition penalty
LOGIT_SCALE = 3.0
# Spec-sheet DRAM bandwidth (GB/s), matched on the device name, most specific first.
PEAK_TABLE = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
              ("A100-SXM4-80GB", 2039.0), ("A100 80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0), ("L40", 864.0),
              ("L4", 300.0), ("RTX 4090", 1008.0), ("A10G", 600.0), ("T4", 320.0))
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpy2D", "cuStreamSynchronize", "cuCtxSynchronize", "cuMemcpyDtoH_v2")
CPU_TIME_BUDGET_S = 1.0  # per case, all backends together, when --reps is not given
CUDA_BATCH_S = 2e-3  # one timed batch of back-to-back calls
CUDA_ROUNDS = 30
MAX_COPIES = 32
LOOP_RANGE = "bench_kernels.decode_loop"


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[int], dict]  # seed -> one input set on the device
    backends: dict  # name -> fn(inputs) -> comparable output (or None)
    nbytes: int
    exact: bool = True  # deterministic output: compare each backend with eager


# --------------------------------------------------------------------------------------------
# Backends and their availability
# --------------------------------------------------------------------------------------------

def backend_status(device: torch.device) -> tuple[dict, dict]:
    """-> ({backend: module-ish handle}, {backend: reason it is unavailable})."""
    have, missing = {}, {}
    native_kind = "cpp" if device.type == "cpu" else "cuda"
    if _native.load() is None:
        try:
            importlib.import_module("chatterbox_rt._C")
            reason = "chatterbox_rt._C failed to load"
        except Exception as e:  # noqa: BLE001 - the reason is what we print
            reason = f"chatterbox_rt._C not built/importable ({type(e).__name__}: {e})"
        missing[native_kind] = reason
    elif not _native.available(device.type):
        missing[native_kind] = f"chatterbox_rt._C has no {device.type.upper()} kernels (built without them)"
    else:
        have[native_kind] = _native
    if device.type == "cpu":
        missing["triton"] = "Triton kernels need CUDA (CPU tensors only under TRITON_INTERPRET=1, not for timing)"
    elif not HAS_TRITON:
        missing["triton"] = "triton is not importable"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        missing["triton"] = "TRITON_INTERPRET=1 is set: the interpreter is not for timing"
    else:
        have["triton"] = True
    return have, missing


def _rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def snake_cases(T: int, dtypes, device, have) -> list:
    from chatterbox_rt.kernels.snake_op import SNAKE_EPS, snake_ref

    hc = HiFTConfig()
    cases, length = [], T
    for i, rate in enumerate(hc.upsample_rates):
        C = hc.base_channels // 2 ** (i + 1)
        length *= rate
        L = length + (1 if i == len(hc.upsample_rates) - 1 else 0)  # the reflect pad of the last stage
        for dt in dtypes:
            def make(seed, C=C, L=L, dt=dt):
                g = torch.Generator().manual_seed(seed)
                alpha = (torch.rand(C, generator=g) * 2 + 0.1).to(device=device, dtype=dt)
                return {"x": _rand((1, C, L), dt, device, g), "alpha": alpha}

            backends = {"eager": lambda d: snake_ref(d["x"], d["alpha"], SNAKE_EPS)}
            if "cpp" in have or "cuda" in have:
                backends["cpp" if device.type == "cpu" else "cuda"] = \
                    lambda d: _native.snake(d["x"], d["alpha"], SNAKE_EPS)
            if "triton" in have:
                from chatterbox_rt.kernels.snake_op import snake_triton
                backends["triton"] = lambda d: snake_triton(d["x"], d["alpha"], SNAKE_EPS)
            n = C * L
            cases.append(Case("snake", f"[1, {C}, {L}]", dt, make, backends, 2 * n * _esize(dt)))
    return cases


def istft_cases(T: int, dtypes, device, have) -> list:
    from chatterbox_rt.kernels.istft_op import istft_ref

    hc = HiFTConfig()
    F = hc.upsample_factor * T + 1
    C = hc.n_fft + 2
    kw = dict(n_fft=hc.n_fft, hop=hc.hop, audio_limit=hc.audio_limit)
    cases = []
    for dt in dtypes:
        def make(seed, dt=dt):
            g = torch.Generator().manual_seed(seed)
            return {"spec": _rand((1, C, F), dt, device, g),
                    "window": hann_window(hc.n_fft, device=device)}

        backends = {"eager": lambda d: istft_ref(d["spec"], d["window"], **kw)}
        if "cpp" in have or "cuda" in have:
            backends["cpp" if device.type == "cpu" else "cuda"] = lambda d: _native.istft(d["spec"], d["window"], **kw)
        if "triton" in have:
            from chatterbox_rt.kernels.istft_op import istft_triton
            backends["triton"] = lambda d: istft_triton(d["spec"], d["window"], **kw)
        nbytes = C * F * _esize(dt) + hc.hop * (F - 1) * 4  # spec in, fp32 waveform out
        cases.append(Case("istft", f"[1, {C}, {F}]", dt, make, backends, nbytes))
    return cases


def cfg_euler_cases(T: int, dtypes, device, have) -> list:
    fc = FlowConfig()
    w = fc.cfg_rate
    L = 2 * T  # prompt + generated mel frames
    step = 3  # any interior step of the grid
    cases = []
    for B in CFM_BATCHES:
        for dt in dtypes:
            def make(seed, B=B, dt=dt):
                g = torch.Generator().manual_seed(seed)
                t_span = time_span(fc.n_steps, fc.t_scheduler, device=device, dtype=dt)
                return {"x": _rand((B, fc.mel_bins, L), dt, device, g),
                        "v": _rand((2 * B, fc.mel_bins, L), dt, device, g),
                        "x_in": torch.empty(2 * B, fc.mel_bins, L, dtype=dt, device=device),
                        "t": t_span[step], "r": t_span[step + 1], "dts": t_span.diff()}

            def eager(d, B=B):
                # cfm._solve_euler_cfg: this step's update, then the next step's two copies into x_in.
                v = d["v"]
                x = d["x"] + (d["r"] - d["t"]) * ((1.0 + w) * v[:B] - w * v[B:])
                d["x_in"][:B] = x
                d["x_in"][B:] = x
                return d["x_in"]

            backends = {"eager": eager}
            if "cpp" in have or "cuda" in have:
                def native(d):
                    _native.cfg_euler_(d["x"], d["v"], d["dts"][step], w, d["x_in"])
                    return d["x_in"]
                backends["cpp" if device.type == "cpu" else "cuda"] = native
            if "triton" in have:
                from chatterbox_rt.kernels.cfg_euler_op import cfg_euler_triton_

                def fused(d):
                    cfg_euler_triton_(d["x"], d["v"], d["dts"][step], w, d["x_in"])
                    return d["x_in"]
                backends["triton"] = fused
            n = B * fc.mel_bins * L
            # x and v (both halves) read, x and both halves of x_in written
            cases.append(Case("cfg_euler", f"x [{B}, {fc.mel_bins}, {L}], v [{2 * B}, {fc.mel_bins}, {L}]", dt,
                              make, backends, 6 * n * _esize(dt)))
    return cases


def sample_cases(dtypes, device, have) -> list:
    from chatterbox_rt.models.t3.sampling import cfg_combine, process_gpt, process_llama, sample_no_sync

    if torch.float32 not in dtypes:
        return []
    cases = []
    for variant in SAMPLE_VARIANTS:
        cfg = T3Config.for_variant(variant)
        p = cfg.sampling
        V, eos = cfg.speech_vocab_size, cfg.stop_speech_token
        use_cfg = cfg.uses_cfg and p.cfg_weight > 0
        sp = dict(order="gpt" if cfg.is_gpt else "llama", temperature=p.temperature, top_p=p.top_p, min_p=p.min_p,
                  top_k=p.top_k, repetition_penalty=p.repetition_penalty,
                  cfg_weight=p.cfg_weight if use_cfg else None)
        params = _sampling_params(p)
        for R in SAMPLE_ROWS:
            rows = 2 * R if use_cfg else R

            def make(seed, rows=rows, R=R, V=V):
                g = torch.Generator().manual_seed(seed)
                seen = (torch.rand(R, V, generator=g) < SEEN_FRACTION).to(device)
                return {"logits": _rand((rows, V), torch.float32, device, g, LOGIT_SCALE), "seen": seen,
                        "gen": torch.Generator(device=device).manual_seed(seed),
                        "offset": torch.zeros(1, dtype=torch.int64, device=device)}

            def eager(d, is_gpt=cfg.is_gpt, use_cfg=use_cfg, eos=eos, params=params):
                # t3.py T3.generate, one step: the processed chain and the no-sync draw.
                logits = d["logits"]
                if is_gpt:
                    processed = process_gpt(logits, d["seen"], params)
                else:
                    logits = cfg_combine(logits, params.cfg_weight) if use_cfg else logits
                    processed = process_llama(logits, d["seen"], params)
                dead = torch.isneginf(processed).all(dim=-1)
                tok = sample_no_sync(torch.softmax(processed, dim=-1), d["gen"])
                return torch.where(dead, torch.full_like(tok, eos), tok)

            backends = {"eager": eager}
            if "triton" in have:
                from chatterbox_rt.kernels.sample_op import sample_triton

                backends["triton"] = lambda d, sp=sp: sample_triton(d["logits"], d["seen"], seed=0, offset=d["offset"],
                                                                    **sp)
            nbytes = rows * V * 4 + R * V + R * 8  # fp32 logits and the bool history in, tokens out
            cases.append(Case("sample", f"{variant} [{rows}, {V}] R={R}", torch.float32, make, backends, nbytes,
                              exact=False))
    return cases


def _sampling_params(d):
    from chatterbox_rt.models.t3.sampling import SamplingParams

    return SamplingParams(temperature=d.temperature, top_p=d.top_p, min_p=d.min_p, top_k=d.top_k,
                          repetition_penalty=d.repetition_penalty, cfg_weight=d.cfg_weight).validate()


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# Peak bandwidth
# --------------------------------------------------------------------------------------------

def cuda_peak(device: torch.device) -> tuple[Optional[float], str]:
    props = torch.cuda.get_device_properties(device)
    computed = None
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        computed = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for key, gbps in PEAK_TABLE:
        if key.lower() in props.name.lower():
            extra = f"; 2 x memory clock x bus width gives {computed:.0f}" if computed else ""
            return gbps, f"spec sheet, {key}{extra}"
    if computed:
        return computed, f"2 x memory clock ({clock_khz / 1e3:.0f} MHz) x bus width ({bus_bits} bit)"
    return None, f"unknown for {props.name!r}: pass --peak-gbps"


def cpu_copy_gbps(nbytes: int, reps: int = 10) -> float:
    """A STREAM-like copy: 2 x bytes per ``copy_`` of a tensor much larger than the caches; best of reps."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]] if s[-1] in "KM" else int(s)
    except (OSError, ValueError):
        return 32 << 20


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def time_cpu(fns: dict, sets: list, reps: Optional[int], warmup: int, budget_s: float) -> dict:
    names = list(fns)
    est = {}
    for name in names:
        ts = []
        for i in range(max(warmup, 1)):
            t0 = time.perf_counter()
            fns[name](sets[i % len(sets)])
            ts.append(time.perf_counter() - t0)
        est[name] = min(ts)
    if reps is None:
        reps = int(min(max(budget_s / max(sum(est.values()), 1e-9), 5), 500))
    times = {name: [] for name in names}
    turn = itertools.count()  # every call takes the next input set: none is still in cache from the last
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            d = sets[next(turn) % len(sets)]
            t0 = time.perf_counter()
            fns[name](d)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def time_cuda(fns: dict, sets: list, reps: Optional[int], warmup: int) -> dict:
    names = list(fns)
    for name in names:
        for i in range(max(warmup, 1)):
            fns[name](sets[i % len(sets)])
    torch.cuda.synchronize()
    inner = {}
    for name in names:  # calls per batch: enough for ~CUDA_BATCH_S of work
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(10):
            fns[name](sets[i % len(sets)])
        e.record()
        e.synchronize()
        per = s.elapsed_time(e) / 1e3 / 10
        inner[name] = int(min(max(CUDA_BATCH_S / max(per, 1e-7), 1), 1000))
    rounds = reps if reps is not None else CUDA_ROUNDS
    events = {name: [] for name in names}
    turn = itertools.count()
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(inner[name]):
                fns[name](sets[next(turn) % len(sets)])
            e.record()
            events[name].append((s, e))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) * 1e3 / inner[name] for s, e in evs)
            for name, evs in events.items()}


def cuda_kernel_us(fns: dict, sets: list, calls: int) -> dict:
    """GPU busy time per call (every kernel, memcpy and memset of it, summed from a profiler trace):
    the launch-free figure that the bandwidth floor is about. {} when the profiler cannot see the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, fn in fns.items():
        try:
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(calls):
                    fn(sets[i % len(sets)])
                torch.cuda.synchronize()
            busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        except Exception as e:  # noqa: BLE001 - CUPTI missing or busy: fall back to the event timing
            warnings.warn(f"kernel time from the profiler failed ({type(e).__name__}: {e}); GB/s from wall time",
                          stacklevel=2)
            return {}
        if busy > 0:
            out[name] = busy / calls
    return out


def max_err(a, b) -> Optional[float]:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def run_case(case: Case, device, args, copies_target: int) -> list:
    set_bytes = max(case.nbytes, 1)
    k = 1 if args.quick else int(min(max(math.ceil(copies_target / set_bytes), 1), MAX_COPIES))
    sets = [case.make(seed) for seed in range(k)]
    fns, notes = {}, {}
    ref_out = None
    for name, fn in case.backends.items():
        try:
            d = {key: (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in sets[0].items()}
            out = fn(d)
        except Exception as e:  # noqa: BLE001 - a backend that cannot run this case is reported, not fatal
            notes[name] = f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        fns[name] = fn
        if name == "eager":
            ref_out = out.clone() if isinstance(out, torch.Tensor) else out
        elif case.exact:
            notes.setdefault("_err", {})[name] = max_err(out, ref_out)
    kernel_us = {}
    if device.type == "cuda":
        us = time_cuda(fns, sets, args.reps, args.warmup)
        kernel_us = cuda_kernel_us(fns, sets, calls=max(len(sets), 10))
    else:
        us = time_cpu(fns, sets, args.reps, args.warmup, 0.05 if args.quick else CPU_TIME_BUDGET_S)
    rows = []
    errs = notes.pop("_err", {})
    base = us.get("eager")
    for name in case.backends:
        t = us.get(name)
        t_bw = kernel_us.get(name, t)  # bandwidth from GPU busy time where measured
        gbps = case.nbytes / (t_bw * 1e-6) / 1e9 if (t and t_bw) else None
        rows.append({"op": case.op, "shape": case.shape, "dtype": _dtype_name(case.dtype), "backend": name,
                     "us": t, "kernel_us": kernel_us.get(name) if t else None,
                     "speedup": (base / t) if (t and base) else None, "bytes": case.nbytes,
                     "gbps": gbps, "pct_peak": (100 * gbps / args.peak) if (gbps and args.peak) else None,
                     "floor_us": (case.nbytes / (args.peak * 1e9) * 1e6) if args.peak else None,
                     "max_err": errs.get(name), "copies": k, "note": notes.get(name)})
    return rows


def _dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


# --------------------------------------------------------------------------------------------
# Host syncs of a decode-like sampling loop
# --------------------------------------------------------------------------------------------

def host_syncs(case: Case, backend: str, device, steps: int, trace_dir: Optional[str]) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    d = case.make(0)
    fn = case.backends[backend]

    def step():
        tok = fn(d)
        if backend != "eager":
            d["offset"].add_(1)  # the next step's Philox offset, advanced on the device
        d["seen"].scatter_(1, tok.clamp_min(0)[:, None], True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with profile(activities=activities) as prof:
            with record_function(LOOP_RANGE):
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(steps):
                        step()
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
    result = {"op": case.op, "shape": case.shape, "backend": backend, "steps": steps, "syncs_per_step": None,
              "sync_debug_warnings_per_step": None}
    if device.type == "cuda":
        events = prof.events()
        loop = [e for e in events if e.name == LOOP_RANGE]
        lo, hi = (loop[0].time_range.start, loop[0].time_range.end) if loop else (-math.inf, math.inf)
        n_sync = sum(1 for e in events if e.name in SYNC_CALLS and lo <= e.time_range.start <= hi)
        n_warn = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
        result.update(syncs_per_step=n_sync / steps, sync_debug_warnings_per_step=n_warn / steps)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        name = f"sample_{case.shape.split()[0]}_R{case.shape.rsplit('=', 1)[-1]}_{backend}.json"
        path = os.path.join(trace_dir, name)
        prof.export_chrome_trace(path)
        result["trace"] = path
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def print_table(rows: list, env: dict) -> None:
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads; "
          f"peak {_fmt(env['peak_gbps'], '.1f')} "
          f"GB/s ({env['peak_source']})")
    kern = any(r.get("kernel_us") is not None for r in rows)  # CUDA: GPU busy time per call
    hdr = (f"{'op':<10} {'shape':<34} {'dtype':<5} {'backend':<7} {'us':>10} " + (f"{'kern us':>9} " if kern else "")
           + f"{'x eager':>8} {'MB':>8} {'GB/s':>8} {'% peak':>7} {'floor us':>9} {'max err':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["us"] is None:
            print(f"{r['op']:<10} {r['shape']:<34} {r['dtype']:<5} {r['backend']:<7} {'n/a':>10}  {r['note'] or ''}")
            continue
        print(f"{r['op']:<10} {r['shape']:<34} {r['dtype']:<5} {r['backend']:<7} {r['us']:>10.1f} "
              + (f"{_fmt(r.get('kernel_us'), '.1f'):>9} " if kern else "")
              + f"{_fmt(r['speedup'], '.2f'):>8} {r['bytes'] / 1e6:>8.2f} {_fmt(r['gbps'], '.1f'):>8} "
              f"{_fmt(r['pct_peak'], '.1f'):>7} {_fmt(r['floor_us'], '.1f'):>9} {_fmt(r['max_err'], '.1e'):>9}")


def print_targets(rows: list, device: torch.device, missing: dict) -> list:
    """The issue's targets, measured (printed, never asserted) -> lines."""
    lines = []

    def speedups(op, backend):
        return [r for r in rows if r["op"] == op and r["backend"] == backend and r["speedup"] is not None]

    if device.type == "cpu":
        for op, need, what in (("snake", 2.0, ">= 2x eager"), ("istft", 1.0, "no slower than eager")):
            rs = speedups(op, "cpp")
            if not any(r["op"] == op for r in rows):
                continue  # not run (--ops)
            if not rs:
                lines.append(f"cpp {op} {what}: not measured ({missing.get('cpp', 'no rows')})")
                continue
            for dt in dict.fromkeys(r["dtype"] for r in rs):
                rd = [r for r in rs if r["dtype"] == dt]
                worst = min(rd, key=lambda r: r["speedup"])
                ok = all(r["speedup"] >= need for r in rd)
                lines.append(f"cpp {op} {what} ({dt}): {'MET' if ok else 'NOT MET'} (worst {worst['speedup']:.2f}x "
                             f"at {worst['shape']})")
    else:
        for backend in ("triton", "cuda"):
            rs = [r for r in rows if r["backend"] == backend and r["us"] is not None]
            if not rs:
                lines.append(f"{backend}: not measured ({missing.get(backend, 'no rows')})")
                continue
            slow = [r for r in rs if (r["speedup"] or 0) < 2.0]
            far = [r for r in rs if r["pct_peak"] is not None and r["pct_peak"] < 50.0]
            lines.append(f"{backend} >= 2x eager: {'MET' if not slow else 'NOT MET'}"
                         + "".join(f"\n    {r['op']} {r['shape']} {r['dtype']}: {r['speedup']:.2f}x" for r in slow))
            lines.append(f"{backend} within 2x of the bandwidth floor (>= 50% of peak): "
                         f"{'MET' if not far else 'NOT MET'}"
                         + "".join(f"\n    {r['op']} {r['shape']} {r['dtype']}: {r['pct_peak']:.1f}%" for r in far))
    print("# targets (measured, not asserted)")
    for line in lines:
        print("  " + line)
    return lines


# --------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--reps", type=int, default=None,
                   help="timed calls per backend (CPU) or timed batches (CUDA); default: adaptive / "
                        f"{CUDA_ROUNDS}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--mel-frames", type=int, default=None, help=f"T, mel frames (default {MEL_FRAMES}: 10 s)")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak DRAM bandwidth to compare with")
    p.add_argument("--sync-steps", type=int, default=SYNC_LOOP_STEPS, help="steps of the host-sync loop")
    p.add_argument("--json", default=None, help="write {env, rows, host_syncs, targets} here")
    p.add_argument("--trace", default=None, help="directory for Chrome traces of the sampling loops")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (smoke test)")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {OPS}")
    try:
        args.dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    except KeyError as e:
        p.error(f"unknown dtype {e}; choose from {list(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.quick:
        args.reps = args.reps or 3
        args.warmup = 1
        args.sync_steps = min(args.sync_steps, 4)
    if args.mel_frames is None:
        args.mel_frames = QUICK_MEL_FRAMES if args.quick else MEL_FRAMES
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    have, missing = backend_status(device)
    if device.type == "cuda":
        peak, source = cuda_peak(device)
        device_name = torch.cuda.get_device_name(device)
    else:
        size = (16 << 20) if args.quick else max(4 * llc_bytes(device), 256 << 20)
        peak = cpu_copy_gbps(size)
        source = f"measured: copy_ of {size >> 20} MiB, {torch.get_num_threads()} threads (STREAM-like, not a spec)"
        device_name = f"CPU {_cpu_model()}"
    if args.peak_gbps:
        peak, source = args.peak_gbps, "--peak-gbps"
    args.peak = peak

    builders = {"snake": lambda: snake_cases(args.mel_frames, args.dtypes, device, have),
                "istft": lambda: istft_cases(args.mel_frames, args.dtypes, device, have),
                "cfg_euler": lambda: cfg_euler_cases(args.mel_frames, args.dtypes, device, have),
                "sample": lambda: sample_cases(args.dtypes, device, have)}
    copies_target = 2 * llc_bytes(device)
    rows, sample_case_list = [], []
    with torch.inference_mode():
        for op in args.ops:
            for case in builders[op]():
                rows.extend(run_case(case, device, args, copies_target))
                if case.op == "sample":
                    sample_case_list.append(case)
        syncs = []
        if device.type == "cuda" or args.trace:
            for case in sample_case_list:
                for backend in case.backends:
                    try:
                        syncs.append(host_syncs(case, backend, device, args.sync_steps, args.trace))
                    except Exception as e:  # noqa: BLE001 - reported, the table still prints
                        syncs.append({"op": case.op, "shape": case.shape, "backend": backend,
                                      "error": f"{type(e).__name__}: {e}"})

    env = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
           "triton": _version("triton"), "python": sys.version.split()[0], "threads": torch.get_num_threads(),
           "peak_gbps": peak, "peak_source": source, "mel_frames": args.mel_frames, "quick": args.quick,
           "backends": sorted(set(have) | {"eager"}), "unavailable": missing}
    print_table(rows, env)
    print("# unavailable backends: " + ("none" if not missing else ""))
    for name, why in missing.items():
        print(f"  {name}: {why}")
    if "sample" in args.ops:
        print("  sample has no native op (csrc/ has none): eager and triton only")
    if "sample" in args.ops:
        if torch.float32 not in args.dtypes:
            print("# sample: skipped (fp32 only: T3 runs its sampling chain on fp32 logits)")
        print("# host syncs per step (decode-like loop of sample + seen update; measured, not asserted)")
        if device.type != "cuda":
            print("  n/a on CPU (host and device are the same); run with --device cuda")
        for s in syncs:
            if "error" in s:
                print(f"  {s['shape']:<34} {s['backend']:<7} failed: {s['error']}")
            elif s["syncs_per_step"] is not None:
                print(f"  {s['shape']:<34} {s['backend']:<7} host syncs per step: {s['syncs_per_step']:g} "
                      f"(profiler: synchronising CUDA API calls in {s['steps']} steps); sync-debug warnings per "
                      f"step: {s['sync_debug_warnings_per_step']:g}"
                      + (f"; trace {s['trace']}" if "trace" in s else ""))
            elif "trace" in s:
                print(f"  {s['shape']:<34} {s['backend']:<7} trace {s['trace']}")
    targets = print_targets(rows, device, missing)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "host_syncs": syncs, "targets": targets}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


def _cpu_model() -> str:
    from chatterbox_rt.profiling.bench import cpu_model

    return cpu_model()


def _version(mod: str) -> Optional[str]:
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    raise SystemExit(main())
