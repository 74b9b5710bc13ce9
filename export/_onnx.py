"""The mechanics every exporter shares: torch -> ONNX file, weights stored once, onnxruntime
sessions, and the check of an exported graph against torch (../shared/STYLE.md: export checks its
own artifact).

We use the TorchScript-based exporter (``dynamo=False``): it supports opsets 14-20 (``--opset``;
the dynamo exporter starts at 18), exports the models here in seconds rather than minutes, and its
graphs are what TensorRT and onnxruntime's CPU kernels handle best. Graphs over 2 GB (protobuf's
limit; English T3 in fp32) keep their weights in an external data file next to them.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from .spec import GraphSpec, torch_dtype

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20
# Above this many bytes of weights a graph's initializers go to an external data file.
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(RuntimeError):
    """An export that failed, or whose graph does not match torch."""


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    return opset


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as e:  # pragma: no cover - a declared dependency of export
        raise ImportError("export needs the onnx package: pip install onnx onnxruntime") from e


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install onnxruntime "
                          "(onnxruntime-gpu for the CUDA execution provider)") from e
    return onnxruntime


@contextlib.contextmanager
def _quiet_export():
    """The TorchScript exporter warns about its own deprecation and about traced Python
    conditionals we have checked; keep the user's log for what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prev = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(prev)


def export_graph(module: torch.nn.Module, args: tuple, spec: GraphSpec, out_dir: Path, *,
                 opset: int = DEFAULT_OPSET, external_data: Optional[bool] = None):
    """Export ``module(*args)`` as ``out_dir/spec.file`` with the spec's names and dynamic axes.
    Returns the loaded ``onnx.ModelProto`` (weights included) so callers can post-process it
    (``save_model``/``save_shared``) before it is written for good."""
    _require_onnx()
    import onnx

    check_opset(opset)
    module = module.eval()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, _quiet_export(), torch.inference_mode(False), \
            torch.no_grad():
        path = Path(tmp) / spec.file
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
        except Exception as e:
            raise ExportError(f"exporting {spec.name} failed: {type(e).__name__}: {e}") from e
        model = onnx.load(str(path), load_external_data=True)
    return model


def _weights_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model, path: Path, *, external_data: Optional[bool] = None) -> Path:
    """Write ``model`` to ``path`` (weights in ``path.name + '.data'`` when large)."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = _weights_bytes(model) > EXTERNAL_DATA_BYTES
    tmp = path.with_suffix(".onnx.tmp")
    data = path.name + ".data"
    if external_data:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        # the data file was written under its final name next to tmp
    else:
        onnx.save_model(model, str(tmp))
        with contextlib.suppress(FileNotFoundError):
            (path.parent / data).unlink()
    os.replace(tmp, path)
    return path


def save_shared(models: Mapping[str, object], out_dir: Path, data_name: str) -> list:
    """Write several graphs that hold the same weights (T3's prefill and decode) so that every
    distinct initializer is stored once, in ``out_dir/data_name``; returns the paths written.
    Initializers are matched by content (dtype, dims, bytes), not by name: the exporter names
    folded constants differently in each graph."""
    import onnx
    from onnx.external_data_helper import set_external_data

    out_dir = Path(out_dir)
    tmp_data = out_dir / (data_name + ".tmp")
    offsets: dict = {}
    written = []
    with open(tmp_data, "wb") as f:
        for name, model in models.items():
            for t in model.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < 1024:
                    continue
                key = (t.data_type, tuple(t.dims), hashlib.sha1(t.raw_data).hexdigest())
                if key not in offsets:
                    pad = (-f.tell()) % 64  # onnxruntime maps aligned offsets directly
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(t.raw_data))
                    f.write(t.raw_data)
                off, length = offsets[key]
                set_external_data(t, location=data_name, offset=off, length=length)
                t.ClearField("raw_data")
    os.replace(tmp_data, out_dir / data_name)
    for name, model in models.items():
        path = out_dir / f"{name}.onnx"
        tmp = path.with_suffix(".onnx.tmp")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ onnxruntime


# Session config entries every session gets unless the caller sets them. The intra-op threads
# do not spin-wait for work: the Engine runs T3 and S3Gen sessions on two threads at once, and
# spinning workers of one session take the cores the other needs. Measured on the 2-core AMD EPYC
# VM (full-size Nano bundle, 2 threads, engine max_batch=1, 100 tokens, 2 runs each): a streamed
# request's first chunk 4230-4358 ms spinning against 2757-3121 ms not, the whole stream 12.7-13.0
# s against 10.2-10.4 s; a whole (non-streamed) request 5823-5874 ms against 5912-5927 ms.
SESSION_DEFAULTS = {"session.intra_op.allow_spinning": "0"}


def session_options(threads: Optional[int] = None, config: Optional[Mapping[str, str]] = None):
    """onnxruntime session options: all graph optimisations, ``threads`` intra-op threads, and
    ``config`` session config entries (e.g. ``{"session.disable_prepacking": "1"}``) over
    ``SESSION_DEFAULTS``."""
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    config = {**SESSION_DEFAULTS, **dict(config or {})}
    for k, v in config.items():
        so.add_session_config_entry(str(k), str(v))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: shape-inference notes on dynamic outputs are expected
    return so


def providers_for(device: str = "cpu") -> list:
    """Execution providers for ``device``: CUDA where onnxruntime-gpu has it, else CPU."""
    ort = require_onnxruntime()
    have = ort.get_available_providers()
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise RuntimeError("device cuda asked for the onnxruntime backend, but this onnxruntime has no "
                               "CUDAExecutionProvider: pip install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, *, device: str = "cpu", threads: Optional[int] = None,
                 session_factory: Optional[Callable] = None, config: Optional[Mapping[str, str]] = None):
    """An onnxruntime session over ``path``; ``session_factory(path, device=, threads=)``, when
    given, opens it instead (the TensorRT backend: ``ort_backend.TrtSessionFactory``). ``config``:
    onnxruntime session config entries (not passed to a ``session_factory``)."""
    if session_factory is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX graph not found: {path}")
        return session_factory(Path(path), device=device, threads=threads)
    ort = require_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, config),
                                    providers=providers_for(device))
    except Exception as e:
        raise RuntimeError(f"onnxruntime could not load {path}: {e}") from e


def to_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            raise TypeError("bfloat16 inputs are bound through IOBinding, not numpy")
        return x.cpu().numpy()
    return np.asarray(x)


def run(sess, feeds: Mapping[str, object], outputs: Optional[Sequence[str]] = None) -> list:
    """Run a session on CPU tensors/arrays -> list of numpy arrays."""
    return sess.run(list(outputs) if outputs else None, {k: to_numpy(v) for k, v in feeds.items()})


# ---------------------------------------------------------------------------- the check


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 for two empty or all-zero arrays)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise ExportError(f"shape mismatch: onnxruntime {list(got.shape)}, torch {list(want.shape)}")
    if want.size == 0:
        return 0.0
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    return diff / scale if scale > 0 else diff


def check_graph(path: Path, spec: GraphSpec, reference: Callable[..., Sequence[torch.Tensor]],
                cases: Iterable[Mapping[str, torch.Tensor]], *, tol: float, threads: Optional[int] = None,
                compare: Optional[Sequence[str]] = None) -> dict:
    """Run the exported graph and ``reference(**inputs)`` (torch, returning the spec's outputs in
    order) on each case; -> {"max_rel_error": e, "per_output": {...}, "cases": n}. Raises
    ExportError naming the output and case when an error exceeds ``tol``."""
    sess = open_session(path, threads=threads)
    names = spec.output_names
    compare = list(compare or names)
    worst: dict = {n: 0.0 for n in compare}
    n_cases = 0
    for case in cases:
        with torch.inference_mode():
            want = reference(**case)
        want = [want] if torch.is_tensor(want) else list(want)
        got = run(sess, case)
        shapes = {k: list(v.shape) for k, v in case.items()}
        for n, g, w in zip(names, got, want):
            if n not in compare:
                continue
            e = rel_error(g, w.float().cpu().numpy() if w.is_floating_point() else w.cpu().numpy())
            if not np.isfinite(e) or e > tol:
                raise ExportError(f"{spec.file}: output {n} differs from torch by {e:.3g} (relative, tolerance "
                                  f"{tol:g}) at input shapes {shapes}")
            worst[n] = max(worst[n], e)
        n_cases += 1
    return {"max_rel_error": max(worst.values()) if worst else 0.0, "per_output": worst, "cases": n_cases,
            "tolerance": tol}


def random_inputs(spec: GraphSpec, sizes: Mapping[str, int], *, seed: int = 0,
                  ranges: Optional[Mapping[str, tuple]] = None) -> dict:
    """Random inputs for ``spec`` at ``sizes``: floats ~ N(0, 1), integers uniform in
    ``ranges[name]`` (default [0, 2))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in spec.inputs:
        shape = t.shape(sizes)
        dt = torch_dtype(t.dtype)
        if dt.is_floating_point:
            out[t.name] = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            out[t.name] = torch.ones(shape, dtype=torch.bool)
        else:
            lo, hi = (ranges or {}).get(t.name, (0, 2))
            out[t.name] = torch.randint(lo, hi, shape, generator=g, dtype=dt)
    return out
