"""Weight-only quantisation of exported graphs (``--precision int8`` / ``int4``).

T3's weight matrices become onnxruntime ``MatMulNBits`` (blockwise, symmetric, 8 or 4 bits,
``accuracy_level`` 4: int8 activations inside the kernel on CPUs that have the instructions);
norms, embeddings and everything else stay fp32. The quantiser is onnxruntime's own
(``onnxruntime.quantization.matmul_nbits_quantizer``). The error is measured right after, against
the fp32 graph on the same inputs (which matches torch to ~1e-6), and written to the manifest.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._onnx import open_session, rel_error, run, save_shared
from .spec import ComponentExport, GraphCheck
from .t3_onnx import _check_cases as t3_check_cases

log = logging.getLogger(__name__)

# Weights per scale. int8 at 128: the T3 decode step 10-12 % faster than at 32 (Turbo's graph, 150
# cached positions, Intel Xeon VM, 2 threads: 22.7 against 25.3 ms for 1 row, 31.7 against 36.2
# for 2; fp32 56.2 and 64.3; English, 2 rows: 48.6 against 55.1, fp32 98.3) for a logits error of
# 2.6e-2 against 2.1e-2 (random weights); int4 keeps 32, where its error is already 1e-1.
BLOCK_SIZE = {8: 128, 4: 32}
ACCURACY_LEVEL = 4  # int8 compute inside MatMulNBits where the CPU supports it


@contextlib.contextmanager
def _root_logger_kept(level: Optional[int] = None):
    """The root logger's handlers and level restored afterwards (onnxruntime.quantization's import
    runs ``logging.basicConfig(level=INFO)``); ``level``: the root's level meanwhile."""
    root = logging.getLogger()
    handlers, old = list(root.handlers), root.level
    try:
        if level is not None:
            root.setLevel(level)
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(old)


def _import_quantizer():
    """onnxruntime's quantizer, imported without its side effect on the caller's logging."""
    with _root_logger_kept():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _quantize_model(model, bits: int):
    MatMulNBitsQuantizer = _import_quantizer()

    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE[bits], is_symmetric=True,
                             accuracy_level=ACCURACY_LEVEL)
    q.process()
    return q.model.model


def quantize_t3(res: ComponentExport, staging: Path, *, bits: int = 8) -> ComponentExport:
    """Quantise the T3 graphs ``res`` wrote into ``staging`` (in place; weights shared again)."""
    import onnx

    if bits not in BLOCK_SIZE:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    staging = Path(staging)
    originals = {g.spec.name: staging / g.spec.file for g in res.graphs}
    fp32_dir = staging / ".fp32"
    fp32_dir.mkdir(exist_ok=True)
    import shutil

    models = {}
    data_files = set()
    for name, path in originals.items():
        head = onnx.load(str(path), load_external_data=False)
        for t in head.graph.initializer:
            data_files.update(e.value for e in t.external_data if e.key == "location")
        shutil.copy2(path, fp32_dir / path.name)  # the fp32 graphs, to measure against
    for f in data_files:
        shutil.copy2(staging / f, fp32_dir / f)
    for name, path in originals.items():
        models[name] = _quantize_model(onnx.load(str(path), load_external_data=True), bits)
    for f in data_files:  # T3's own weight files only: other components share the staging directory
        (staging / f).unlink(missing_ok=True)
    save_shared(models, staging, "t3.onnx.data")
    precision = f"int{bits}"
    checks = []
    for g in res.graphs:
        ref = open_session(fp32_dir / g.spec.file)
        got = open_session(staging / g.spec.file)
        worst = {}
        n = 0
        for feeds in t3_check_cases(g.spec, limit=3):  # the export check's inputs (padded rows included)
            a, b = run(got, feeds), run(ref, feeds)
            for name, x, y in zip(g.spec.output_names, a, b):
                if np.issubdtype(np.asarray(y).dtype, np.floating):
                    worst[name] = max(worst.get(name, 0.0), rel_error(x, y))
            n += 1
        check = {"max_rel_error": max(worst.values()) if worst else 0.0, "per_output": worst, "cases": n,
                 "against": "the fp32 graph (onnxruntime)", "bits": bits, "block_size": BLOCK_SIZE[bits]}
        checks.append(GraphCheck(g.spec, check, precision=precision))
    shutil.rmtree(fp32_dir, ignore_errors=True)
    return ComponentExport(res.component, checks, res.extras, {**res.config, "weight_bits": bits})


# ------------------------------------------------------------------ the CFM estimator: dynamic INT8

# Dynamic INT8 (onnxruntime's ``quantize_dynamic``: int8 weights per output channel, activations
# quantised per call) on the estimator's MatMuls only; its Convs in INT8 cost 3.6 % of the mel on
# the full-size random-weight English CFM (over the bound) and ran slower (ConvInteger), so they
# stay fp32. Kept only where it holds quality: the whole CFM (every Euler step with CFG) with the
# int8 estimator against the fp32 one, ``mel_rel`` = ||mel - mel_fp32|| / ||mel_fp32||, within
# the bound the CPU default's bf16 CFM is held to (runtime/precision.py), and, in mode "auto",
# only where it is faster on the exporting machine.
CFM_INT8_OPS = ("MatMul",)
CFM_INT8_MIN_SPEEDUP = 1.1
CFM_INT8_MODES = ("auto", "on", "off")


def cfm_int8_bound() -> float:
    from ..precision import QUALITY_BOUNDS

    return float(QUALITY_BOUNDS["bf16"]["mel_rel"])


def cfm_int8_decision(mel_rel: float, speedup: float, *, mode: str, bound: float) -> tuple:
    """-> (keep, why) for the measured int8 CFM."""
    if mode not in CFM_INT8_MODES:
        raise ValueError(f"cfm_int8 must be one of {', '.join(CFM_INT8_MODES)}, got {mode!r}")
    if mode == "off":
        return False, "cfm_int8='off'"
    if not np.isfinite(mel_rel) or mel_rel > bound:
        return False, f"mel_rel {mel_rel:.3g} is over the bound {bound:g}"
    if mode == "auto" and not speedup >= CFM_INT8_MIN_SPEEDUP:
        return False, f"{speedup:.2f}x the fp32 estimator on this machine, under {CFM_INT8_MIN_SPEEDUP}x"
    return True, f"mel_rel {mel_rel:.3g} within {bound:g}" + (f", {speedup:.2f}x faster" if mode == "auto" else "")


def _quantize_dynamic(src: Path, dst: Path) -> None:
    """``src`` -> ``dst`` (external data beside it) with onnxruntime's dynamic quantiser, quietly
    (it warns about pre-processing through the root logger)."""
    with _root_logger_kept(logging.ERROR):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(CFM_INT8_OPS), per_channel=True,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=True)


def _cfm_cases(flow_encoder, config: dict, sizes, seed: int = 0) -> list:
    """CFM inputs as a request builds them: mu from the flow encoder graph on random tokens, a
    prompt mel over the first third of ``cond``, a speaker vector, the noise."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for L in sizes:
        tokens = torch.randint(0, int(config["vocab_size"]), (1, L), generator=g)
        mu, mask = run(flow_encoder, {"tokens": tokens, "token_lens": torch.tensor([L])})
        mu, mask = torch.from_numpy(mu), torch.from_numpy(mask).float()
        T = mu.shape[-1]
        cond = torch.zeros(1, mu.shape[1], T)
        cond[:, :, : T // 3] = torch.randn(1, mu.shape[1], T // 3, generator=g) * 2 - 5
        cases.append(dict(noise=torch.randn(mu.shape, generator=g), mask=mask, mu=mu,
                          spks=torch.randn(1, mu.shape[1], generator=g) * 0.3, cond=cond * mask))
    return cases


def quantize_cfm(res: ComponentExport, staging: Path, *, mode: str = "auto", threads=None,
                 tokens: tuple = (40, 150), repeats: int = 3) -> ComponentExport:
    """Try dynamic INT8 on the S3Gen estimator ``res`` wrote into ``staging``: measure the whole CFM
    (the bundle's step count) with it against the fp32 estimator at ``tokens`` speech tokens, and its
    speed at the longest, median of ``repeats``. Kept (``cfm_int8_decision``): the estimator graph is
    rewritten int8 and the loop graph dropped (the runtime then runs the estimator per step, which
    the int8 MatMuls make faster than the fp32 loop). Either way the measurement is recorded in the
    component config's ``cfm_int8``."""
    import shutil
    import time

    import onnx

    from .ort_s3gen import euler_cfm

    staging = Path(staging)
    cfg = dict(res.config)
    files = dict(cfg["graphs"])
    bound = cfm_int8_bound()
    if mode == "off":
        cfg["cfm_int8"] = {"mode": mode, "kept": False, "why": "cfm_int8='off'"}
        return ComponentExport(res.component, res.graphs, res.extras, cfg)
    if mode not in CFM_INT8_MODES:
        raise ValueError(f"cfm_int8 must be one of {', '.join(CFM_INT8_MODES)}, got {mode!r}")
    work = staging / ".cfm_int8"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        est_path = staging / files["cfm_estimator"]
        q_path = work / est_path.name
        t0 = time.perf_counter()
        _quantize_dynamic(est_path, q_path)
        quant_s = time.perf_counter() - t0
        fp32, q = open_session(est_path, threads=threads), open_session(q_path, threads=threads)
        encoder = open_session(staging / files["flow_encoder"], threads=threads)
        max_tokens = int(cfg.get("max_tokens", max(tokens)))
        sizes = sorted({max(2, min(int(L), max_tokens)) for L in tokens})
        steps = int(cfg["n_steps"])
        kw = dict(n_steps=steps, meanflow=bool(cfg["meanflow"]), t_scheduler=cfg["t_scheduler"],
                  cfg_rate=float(cfg["cfg_rate"]))

        def cfm(sess, c):
            return euler_cfm(lambda feeds: torch.from_numpy(run(sess, feeds)[0]), c["noise"], c["mask"], c["mu"],
                             c["spks"], c["cond"], **kw)

        per_case = []
        cases = _cfm_cases(encoder, cfg, sizes)
        for L, c in zip(sizes, cases):
            want, got = cfm(fp32, c).double(), cfm(q, c).double()
            per_case.append({"tokens": L, "mel_rel": float((got - want).norm() / want.norm())})
        c = cases[-1]
        est_feeds = {"x": c["noise"] * c["mask"], "mask": c["mask"], "mu": c["mu"], "t": torch.full((1,), 0.37),
                     "spks": c["spks"], "cond": c["cond"]}
        if kw["meanflow"]:
            est_feeds["r"] = torch.full((1,), 0.81)
        step_err = rel_error(run(q, est_feeds)[0], run(fp32, est_feeds)[0])
        times = {"fp32": [], "int8": []}
        for _ in range(repeats):  # interleaved, after the warm-up the quality runs gave
            for name, sess in (("fp32", fp32), ("int8", q)):
                t1 = time.perf_counter()
                cfm(sess, c)
                times[name].append(time.perf_counter() - t1)
        ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
        mel_rel = max(r["mel_rel"] for r in per_case)
        speedup = ms["fp32"] / ms["int8"]
        keep, why = cfm_int8_decision(mel_rel, speedup, mode=mode, bound=bound)
        record = {"mode": mode, "kept": keep, "why": why, "ops": list(CFM_INT8_OPS), "weights": "int8 per channel",
                  "activations": "uint8, dynamic per tensor", "mel_rel": mel_rel, "bound": bound,
                  "per_case": per_case, "estimator_step_max_rel_error": step_err, "n_steps": steps,
                  "fp32_ms": round(ms["fp32"], 1), "int8_ms": round(ms["int8"], 1), "speedup": round(speedup, 3),
                  "timed_tokens": sizes[-1], "threads": int(threads or torch.get_num_threads()),
                  "quantize_s": round(quant_s, 1)}
        log.info("CFM int8: %s (mel_rel %.3g, %.2fx)", "kept" if keep else "not kept", mel_rel, speedup)
        del fp32, q, encoder
        graphs = list(res.graphs)
        if keep:
            est_name = next(g.spec.name for g in graphs if g.spec.file == files["cfm_estimator"])
            loop = next(g for g in graphs if g.spec.file == files["cfm_loop"])
            model = onnx.load(str(q_path), load_external_data=True)
            (staging / files["cfm_loop"]).unlink()
            (staging / (est_path.name + ".data")).unlink(missing_ok=True)
            save_shared({est_name: model}, staging, est_path.name + ".data")
            graphs = [g for g in graphs if g is not loop]
            check = {"max_rel_error": step_err, "per_output": {"v": step_err}, "cases": 1,
                     "against": "the fp32 estimator graph (onnxruntime), one step", "cfm_int8": record,
                     "fp32_check": dict(next(g.check for g in graphs if g.spec.name == est_name))}
            graphs = [GraphCheck(g.spec, check, precision="int8") if g.spec.name == est_name else g for g in graphs]
            files.pop("cfm_loop")
            cfg["graphs"] = files
        cfg["cfm_int8"] = record
        return ComponentExport(res.component, graphs, res.extras, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
