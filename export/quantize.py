"""Weight-only quantisation of exported graphs (``--precision int8`` / ``int4``).

T3's weight matrices become onnxruntime ``MatMulNBits`` (blockwise, symmetric, 8 or 4 bits,
``accuracy_level`` 4: int8 activations inside the kernel on CPUs that have the instructions);
norms, embeddings and everything else stay fp32. The quantiser is onnxruntime's own
(``onnxruntime.quantization.matmul_nbits_quantizer``). The error is measured right after, against
the fp32 graph on the same inputs (which matches torch to ~1e-6), and written to the manifest.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

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


def _import_quantizer():
    """onnxruntime's quantizer, imported without its side effect on the caller's logging (its
    import runs ``logging.basicConfig(level=INFO)`` on the root logger)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
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
