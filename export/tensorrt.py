"""TensorRT engines from an exported bundle: builder, engine cache, runner.

Written against TensorRT's documented Python API, 10.x and 11.x:

* 10.x: a graph exported in fp32 can be built with reduced precision by builder flag (weak
  typing, ``BuilderFlag.FP16``/``BF16``); a graph exported in fp16/bf16 is built strongly typed.
* 11.x removed the precision flags and is always strongly typed: the precision is the ONNX
  graph's own (export with ``--precision fp16``/``bf16``, or convert with ModelOpt AutoCast).
  Asking 11.x for fp16 from an fp32 graph is refused with that advice, never silently ignored.

An engine is only valid for the exact weights, graph, precision, shape profile, GPU model and
compute capability, TensorRT and CUDA versions it was built with, so the cache key holds all of
them (``EngineKey``); an entry whose recorded key differs from the one asked for is stale or
foreign and is rebuilt, never used. Two processes building one key do not corrupt it: the build
holds an exclusive lock on the key and the engine is written to a temporary file and renamed
into place, with its metadata written last.

TensorRT cannot be installed on the machines this project is developed on (pip's ``tensorrt``
packages fetch their libraries from NVIDIA's index), so the build and run paths here are tested
only where TensorRT is present; the keying, cache and profile logic is tested with a stand-in
builder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/chatterbox-rt/engines")
ENGINE_FILE = "engine.plan"
META_FILE = "meta.json"
BUILD_LOG = "build.log"
TIMING_CACHE = "timing.cache"
TRT_INSTALL_HINT = (
    "TensorRT is not installed (or not importable). Install it where NVIDIA's package index is reachable: "
    "`pip install tensorrt-cu12` (CUDA 12) or `pip install tensorrt-cu13` (CUDA 13), which fetch the libraries "
    "from https://pypi.nvidia.com; or use NVIDIA's TensorRT container (nvcr.io/nvidia/tensorrt). Then check "
    "`python -c 'import tensorrt; print(tensorrt.__version__)'`. The onnxruntime backend "
    "(backend='onnxruntime') needs no TensorRT.")


class TensorRTUnavailable(ImportError):
    """TensorRT is not importable here (the message says how to install it)."""


class EngineError(RuntimeError):
    """An engine that cannot be built, loaded or run (the message names the graph or file)."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as e:  # ImportError, or the stub package's own failure to find its libraries
        raise TensorRTUnavailable(f"{TRT_INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        return True
    except TensorRTUnavailable:
        return False


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


def cache_root(root=None) -> Path:
    return Path(root or os.environ.get("CHATTERBOX_RT_ENGINES") or DEFAULT_CACHE).expanduser()


# --------------------------------------------------------------------------------- keys


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str
    compute_capability: str  # "9.0"
    cuda: str
    tensorrt: str

    @classmethod
    def current(cls, device_index: int = 0) -> "DeviceInfo":
        import torch

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineError("TensorRT engines need a CUDA GPU; none is visible to torch")
        major, minor = torch.cuda.get_device_capability(device_index)
        return cls(torch.cuda.get_device_name(device_index), f"{major}.{minor}", str(torch.version.cuda),
                   trt.__version__)


def profile_of(graph_entry: Mapping) -> dict:
    """The optimisation profile (input -> min/opt/max shapes) recorded for a graph in the manifest."""
    shapes = graph_entry["shapes"]
    return {name: {w: list(shapes[w][name]) for w in ("min", "opt", "max")} for name in shapes["min"]}


@dataclasses.dataclass(frozen=True)
class EngineKey:
    weights_hash: str
    graph: str  # the graph's name (component part), e.g. "t3_decode"
    graph_digest: str  # the ONNX file's sha256 (a re-export with other code is another engine)
    precision: str
    profile: str  # digest of the min/opt/max shapes
    gpu_name: str
    compute_capability: str
    tensorrt: str
    cuda: str

    @classmethod
    def make(cls, manifest, graph: str, device: DeviceInfo, precision: Optional[str] = None,
             profile: Optional[Mapping] = None) -> "EngineKey":
        entry = manifest.graphs[graph]
        prof = profile if profile is not None else profile_of(entry)
        digest = manifest.data["files"][entry["file"]]["sha256"]
        return cls(weights_hash=entry.get("weights_hash") or manifest.model_hash, graph=graph, graph_digest=digest,
                   precision=precision or entry.get("precision", manifest.precision),
                   profile=hashlib.sha256(json.dumps(prof, sort_keys=True).encode()).hexdigest()[:12],
                   gpu_name=device.gpu_name, compute_capability=device.compute_capability,
                   tensorrt=device.tensorrt, cuda=device.cuda)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def dirname(self) -> str:
        gpu = "".join(c if c.isalnum() else "-" for c in self.gpu_name).strip("-").lower()
        return f"{self.graph}-{self.precision}-{gpu}-sm{self.compute_capability.replace('.', '')}-{self.digest}"

    def mismatches(self, other: Mapping) -> list:
        """Fields of a recorded key (a dict) that differ from this one."""
        mine = dataclasses.asdict(self)
        return [f"{k}: cached {other.get(k)!r}, wanted {v!r}" for k, v in mine.items() if other.get(k) != v]


# -------------------------------------------------------------------------------- builder


class Builder(Protocol):
    """Builds one engine: ``build(onnx_path, profile, precision, timing_cache, log_path) -> bytes``."""

    def build(self, onnx_path: Path, profile: Mapping, precision: str, graph_precision: str,
              timing_cache: Path, log_path: Path) -> bytes: ...


class TensorRTBuilder:
    """The real builder (TensorRT Python API, 10.x or 11.x)."""

    def __init__(self, workspace_gb: float = 8.0, opt_level: int = 3):
        self.trt = import_tensorrt()
        self.workspace_gb, self.opt_level = workspace_gb, opt_level

    def _logger(self, log_path: Path):
        trt = self.trt

        class FileLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.f = open(log_path, "a")

            def log(self, severity, msg):
                self.f.write(f"[{severity}] {msg}\n")
                self.f.flush()

        return FileLogger()

    def build(self, onnx_path: Path, profile: Mapping, precision: str, graph_precision: str,
              timing_cache: Path, log_path: Path) -> bytes:
        trt = self.trt
        major = trt_major(trt.__version__)
        logger = self._logger(log_path)
        builder = trt.Builder(logger)
        weak = precision != graph_precision
        if weak and major >= 11:
            raise EngineError(
                f"TensorRT {trt.__version__} is strongly typed only: it builds a graph in the precision it was "
                f"exported in ({graph_precision}), so {precision} needs an export in {precision} "
                f"(`chatterbox-rt export --precision {precision}`) or a ModelOpt AutoCast conversion")
        if major >= 11:
            network = builder.create_network(0)
        else:
            flags = 0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file resolves the external weight data next to the graph
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        config.builder_optimization_level = self.opt_level
        if weak:  # TensorRT 10.x only (checked above)
            flag = {"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16}.get(precision)
            if flag is None:
                raise EngineError(f"TensorRT {trt.__version__} cannot build {precision} from an {graph_precision} "
                                  f"graph; export the graph in {precision}")
            config.set_flag(flag)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        prof = builder.create_optimization_profile()
        for name, s in profile.items():
            prof.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        config.add_optimization_profile(prof)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build {onnx_path.name}; see {log_path}")
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
        return bytes(plan)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------- cache


class EngineCache:
    """Engines under ``root/<key.dirname>/`` with ``engine.plan``, ``meta.json`` (the full key, the
    build time and log) and ``build.log``; one ``timing.cache`` per GPU and TensorRT version."""

    def __init__(self, root=None):
        self.root = cache_root(root)

    def entry_dir(self, key: EngineKey) -> Path:
        return self.root / key.dirname

    def lookup(self, key: EngineKey) -> Optional[Path]:
        """The engine for ``key`` if the cache holds a valid one, else None (a stale or foreign
        entry is reported and left to be rebuilt)."""
        d = self.entry_dir(key)
        plan, meta = d / ENGINE_FILE, d / META_FILE
        if not plan.is_file() or not meta.is_file():
            return None
        try:
            rec = json.loads(meta.read_text())
        except ValueError:
            log.warning("engine cache entry %s has unreadable metadata; rebuilding", d)
            return None
        bad = key.mismatches(rec.get("key", {}))
        if bad:
            log.warning("engine %s does not match what is asked (%s); rebuilding", d, "; ".join(bad))
            return None
        if plan.stat().st_size != rec.get("bytes"):
            log.warning("engine %s is %d bytes, its metadata records %s; rebuilding", plan, plan.stat().st_size,
                        rec.get("bytes"))
            return None
        return plan

    def get_or_build(self, key: EngineKey, onnx_path: Path, profile: Mapping, builder: Builder,
                     graph_precision: str = "fp32", rebuild: bool = False) -> Path:
        """The engine for ``key``, built (once, under a lock) when missing, stale or asked to rebuild."""
        if not rebuild:
            hit = self.lookup(key)
            if hit is not None:
                return hit
        d = self.entry_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        with _locked(d / ".lock"):
            if not rebuild:
                hit = self.lookup(key)  # another builder may have finished while we waited
                if hit is not None:
                    return hit
            (d / META_FILE).unlink(missing_ok=True)  # the entry reads as absent until rebuilt
            timing = self.root / f"{TIMING_CACHE}.{key.tensorrt}.sm{key.compute_capability.replace('.', '')}"
            t0 = time.perf_counter()
            plan = builder.build(Path(onnx_path), profile, key.precision, graph_precision, timing, d / BUILD_LOG)
            _atomic_write(d / ENGINE_FILE, plan)
            meta = {"key": dataclasses.asdict(key), "bytes": len(plan), "profile": profile,
                    "onnx": str(onnx_path), "build_s": round(time.perf_counter() - t0, 2),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _atomic_write(d / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            return d / ENGINE_FILE

    def entries(self) -> list:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            meta = d / META_FILE
            if d.is_dir() and meta.is_file():
                try:
                    rec = json.loads(meta.read_text())
                except ValueError:
                    rec = {"key": {}, "broken": True}
                rec["dir"] = str(d)
                out.append(rec)
            elif d.is_dir():
                out.append({"dir": str(d), "key": {}, "incomplete": True})
        return out

    def clean(self, *, keep: Optional[Callable[[dict], bool]] = None) -> list:
        """Remove entries (all, or those ``keep`` rejects); -> the directories removed."""
        import shutil

        removed = []
        for rec in self.entries():
            if keep is not None and keep(rec):
                continue
            d = Path(rec["dir"])
            with _locked(d / ".lock"):
                shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
        return removed


def build_bundle_engines(bundle_dir, *, graphs=None, precision: Optional[str] = None, cache=None,
                         builder: Optional[Builder] = None, device: Optional[DeviceInfo] = None,
                         rebuild: bool = False) -> dict:
    """Engines for a bundle's graphs (default: every graph); -> graph name -> engine path."""
    from .manifest import Manifest

    m = Manifest.read(bundle_dir)
    cache = cache if isinstance(cache, EngineCache) else EngineCache(cache)
    device = device or DeviceInfo.current()
    builder = builder or TensorRTBuilder()
    names = list(graphs) if graphs else list(m.graphs)
    out = {}
    for name in names:
        entry = m.graphs.get(name)
        if entry is None:
            raise EngineError(f"bundle {bundle_dir} has no graph {name!r} (it has {sorted(m.graphs)})")
        key = EngineKey.make(m, name, device, precision)
        out[name] = cache.get_or_build(key, m.graph_path(name), profile_of(entry), builder,
                                       graph_precision=entry.get("precision", m.precision), rebuild=rebuild)
    return out


# --------------------------------------------------------------------------------- runner


class _CudaApi:
    """The CUDA calls ``TensorRTRunner`` makes (torch's), in one place so a test can stand in for
    them on the CPU."""

    def __init__(self):
        import torch

        self.torch = torch

    def current_stream(self, device):
        return self.torch.cuda.current_stream(device)

    def new_stream(self, device):
        return self.torch.cuda.Stream(device=device)

    def stream(self, stream):
        return self.torch.cuda.stream(stream)

    def new_graph(self):
        return self.torch.cuda.CUDAGraph()

    def capture(self, graph, stream):
        return self.torch.cuda.graph(graph, stream=stream)


_MAX_SHAPE_SETS = 4096  # shape sets counted (or refused) before the records start over


@dataclasses.dataclass
class _Captured:
    """One input-shape set's CUDA graph: its own execution context (TensorRT's captured launch
    depends on the context's shapes and addresses), the static input buffers the graph reads and
    the output buffers it writes."""

    context: object
    inputs: dict
    outputs: dict
    graph: object


class TensorRTRunner:
    """One engine: inputs and outputs bound to torch CUDA tensors, run with ``execute_async_v3``
    on a given stream (default: the current one). Output buffers are allocated once, grown when a
    larger shape comes, and reused: the returned outputs are views, valid until the next call.

    ``cuda_graph=True``: an input-shape set seen ``capture_after`` times (default 2, so one-off
    shapes, such as a KV cache one longer each step, are never captured) gets a CUDA graph of
    its own, following TensorRT's rules for stream capture: a dedicated execution context (sharing
    the engine's activation memory with the others where the API allows: they never run at once),
    static input and output buffers (each call copies its inputs in on the stream), one launch
    before capture (TensorRT's deferred work), capture and replay on a non-default stream that
    is ordered after the caller's. An engine whose output shapes depend on the data (a -1 after
    the input shapes are set) is not captured; a capture that fails is logged and that shape set
    runs uncaptured from then on. At most ``max_graphs`` are kept (least recently used dropped)."""

    def __init__(self, engine_path: Path, *, device_index: int = 0, max_shapes: Optional[Mapping] = None,
                 cuda_graph: bool = False, capture_after: int = 2, max_graphs: int = 8,
                 _trt=None, _cuda=None, _device=None):
        import torch

        trt = _trt if _trt is not None else import_tensorrt()
        self.trt, self.torch = trt, torch
        self._cuda = _cuda if _cuda is not None else _CudaApi()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {engine_path} (built for another GPU or TensorRT version?); "
                              f"rebuild it with `chatterbox-rt engines build`")
        self.context = self.engine.create_execution_context()
        self.device = torch.device(_device) if _device is not None else torch.device("cuda", device_index)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._out: dict = {}
        self.max_shapes = dict(max_shapes or {})
        if capture_after < 1 or max_graphs < 1:
            raise ValueError("capture_after and max_graphs must be >= 1")
        self.cuda_graph, self.capture_after, self.max_graphs = bool(cuda_graph), int(capture_after), int(max_graphs)
        import collections

        self._graphs: "collections.OrderedDict[tuple, _Captured]" = collections.OrderedDict()
        self._seen: collections.Counter = collections.Counter()
        self._uncapturable: dict = {}  # shape set -> why
        self._side_stream = None
        self._shared_memory = None
        self.stats = {"captures": 0, "replays": 0, "plain": 0}

    def _torch_dtype(self, name: str):
        trt, torch = self.trt, self.torch
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool,
                trt.int8: torch.int8}[self.engine.get_tensor_dtype(name)]

    def _inputs_on_device(self, feeds: Mapping) -> dict:
        out = {}
        for name in self.inputs:
            x = feeds[name]
            if not x.is_contiguous() or x.device != self.device:
                x = x.to(self.device).contiguous()
            out[name] = x
        return out

    def __call__(self, feeds: Mapping, stream=None) -> dict:
        stream = stream or self._cuda.current_stream(self.device)
        feeds = self._inputs_on_device(feeds)
        if self.cuda_graph:
            key = tuple((name, tuple(feeds[name].shape), feeds[name].dtype) for name in self.inputs)
            captured = self._graphs.get(key)
            if captured is not None:
                self._graphs.move_to_end(key)
                return self._replay(captured, feeds, stream)
            if key not in self._uncapturable:
                if len(self._seen) >= _MAX_SHAPE_SETS:  # a long-running server sees many one-off shapes
                    self._seen.clear()
                self._seen[key] += 1
                if self._seen[key] >= self.capture_after:
                    out = self._capture(key, feeds, stream)
                    if out is not None:
                        return out
        return self._run_plain(feeds, stream)

    def _run_plain(self, feeds: Mapping, stream) -> dict:
        torch = self.torch
        for name in self.inputs:
            x = feeds[name]
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            n = 1
            for s in shape:
                n *= s
            buf = self._out.get(name)
            if buf is None or buf.numel() < n:
                buf = self._out[name] = torch.empty(n, dtype=self._torch_dtype(name), device=self.device)
            view = buf[:n].view(shape)
            self.context.set_tensor_address(name, view.data_ptr())
            out[name] = view
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execute_async_v3 failed")
        self.stats["plain"] += 1
        return out

    # ------------------------------------------------------------------ CUDA graphs

    def _graph_context(self):
        """An execution context for one graph, on the engine's shared activation memory where this
        TensorRT lets contexts share it (10.x: ``create_execution_context_without_device_memory``
        and ``set_device_memory``/``device_memory``), else a context with memory of its own."""
        eng = self.engine
        make = getattr(eng, "create_execution_context_without_device_memory", None)
        size = getattr(eng, "device_memory_size_v2", None)
        if size is None:
            size = getattr(eng, "device_memory_size", None)
        if make is None or size is None:
            return eng.create_execution_context()
        ctx = make()
        if self._shared_memory is None:
            self._shared_memory = self.torch.empty(max(int(size), 1), dtype=self.torch.uint8, device=self.device)
        ptr = self._shared_memory.data_ptr()
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(ptr, int(size))
        else:
            ctx.device_memory = ptr
        return ctx

    def _refuse(self, key: tuple, why: str) -> None:
        if len(self._uncapturable) >= _MAX_SHAPE_SETS:
            self._uncapturable.clear()
        self._uncapturable[key] = why

    def _capture(self, key: tuple, feeds: Mapping, stream) -> Optional[dict]:
        torch, cuda = self.torch, self._cuda
        ctx = self._graph_context()
        inputs = {}
        for name in self.inputs:
            x = feeds[name]
            inputs[name] = torch.empty_like(x)
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, inputs[name].data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(int(d) < 0 for d in shape):
                self._refuse(key, f"output {name} has a data-dependent shape {list(shape)}")
                log.info("TensorRT: not capturing a CUDA graph: %s", self._uncapturable[key])
                return None
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        if self._side_stream is None:
            self._side_stream = cuda.new_stream(self.device)
        side = self._side_stream
        side.wait_stream(stream)
        with cuda.stream(side):
            for name in self.inputs:
                inputs[name].copy_(feeds[name])
            # The launch before capture: TensorRT does its deferred per-shape work here, and it computes
            # this call's outputs (capturing records the launch without running it).
            if not ctx.execute_async_v3(side.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed")
        graph = cuda.new_graph()
        try:
            with cuda.capture(graph, side):
                ok = ctx.execute_async_v3(side.cuda_stream)
            if not ok:
                raise EngineError("execute_async_v3 returned False during capture")
        except Exception as e:  # this engine or shape set cannot be captured: run it without a graph
            self._refuse(key, f"capture failed: {e}")
            log.warning("TensorRT: CUDA graph capture failed for input shapes %s (%s); running them uncaptured",
                        [list(k[1]) for k in key], e)
            stream.wait_stream(side)
            return dict(outputs)
        stream.wait_stream(side)
        self._graphs[key] = _Captured(ctx, inputs, outputs, graph)
        self.stats["captures"] += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return dict(outputs)

    def _replay(self, captured: _Captured, feeds: Mapping, stream) -> dict:
        with self._cuda.stream(stream):
            for name in self.inputs:
                captured.inputs[name].copy_(feeds[name])
            captured.graph.replay()
        self.stats["replays"] += 1
        return dict(captured.outputs)
