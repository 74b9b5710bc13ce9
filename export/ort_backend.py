"""The onnxruntime backend: a ``TTS`` whose heavy stages run as onnxruntime sessions over an
exported bundle, with the same Python API, sampling, alignment control and Engine
as the torch backend (only the component runners differ).

``load_exported(dir)`` reads and checks the manifest, then builds ``OrtT3`` (T3's prefill/decode
graphs; the small embedding tables from ``extras.safetensors``), ``OrtS3Gen`` (flow encoder, CFM
loop or estimator, HiFT) and the front ends (voice encoder, CAMPPlus, S3 tokenizer, prompt mel)
when the bundle has them. ``cached_export(tts)`` is what ``TTS.from_local(..., backend=
"onnxruntime")`` uses: the bundle of these exact weights in the export cache, exported once.

``load_exported(dir, backend="tensorrt")`` runs the same classes with TensorRT engines behind
onnxruntime-shaped sessions (``TrtSessionFactory``, ``trt_session.TrtSession``): T3 and S3Gen's
flow by default, each graph that fails to build falling back to onnxruntime.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)

DEFAULT_EXPORT_CACHE = Path("~/.cache/chatterbox-rt/onnx")
BACKENDS = ("torch", "onnxruntime", "tensorrt")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def export_cache_root(root=None) -> Path:
    return Path(root or os.environ.get("CHATTERBOX_RT_EXPORTS") or DEFAULT_EXPORT_CACHE).expanduser()


def _extras(bundle: Path, manifest) -> dict:
    from safetensors.torch import load_file

    from .manifest import EXTRAS

    p = bundle / EXTRAS
    return load_file(str(p)) if p.is_file() else {}


def _prefixed(extras: dict, prefix: str) -> dict:
    return {k: v for k, v in extras.items() if k.startswith(prefix)}


# What the TensorRT backend builds engines for by default: T3 and S3Gen's flow (flow encoder, CFM
# loop and estimator). HiFT stays on onnxruntime unless asked for ("hift" or "s3gen"): its sine
# source sums the phase in int64 fixed point (scale 2^40), which is exact only where int64 is kept
# (an engine that narrowed it to int32 would overflow, not fail to build). The rest, and any graph
# whose engine fails to build, run on onnxruntime.
DEFAULT_TRT_COMPONENTS = ("t3", "flow")
# Graphs that hand state to each other and so run on one backend or the other together (T3's
# keys/values: the prefill's presents are the decode's past).
TRT_GROUPS = (("t3_prefill", "t3_decode"),)


class TrtSessionFactory:
    """``open_session``'s stand-in for the TensorRT backend (the ``session_factory`` the Ort*
    classes' ``load`` takes): a graph of the bundle that ``trt_components`` selects opens as a
    ``TrtSession`` over its engine (``make_runner(graph_name) -> runner``, built or found in the
    engine cache on first use); any other graph, and one whose engine cannot be built (logged once,
    naming the graph), opens on onnxruntime. ``strict=True`` raises instead of falling back.
    ``placement`` records graph name -> "tensorrt" / "onnxruntime" for every graph opened."""

    def __init__(self, bundle: Path, manifest, make_runner, *, components=DEFAULT_TRT_COMPONENTS,
                 ort_device: str = "cpu", strict: bool = False):
        self.bundle, self.manifest, self.make_runner = Path(bundle), manifest, make_runner
        self.ort_device, self.strict = ort_device, strict
        self._by_file = {g["file"]: name for name, g in manifest.graphs.items()}
        self.selected = self._select(components)
        self._runners: dict = {}  # graph -> runner, or None once it fell back
        self.failures: dict = {}  # graph -> the error its build (or load) raised
        self.placement: dict = {}

    def _select(self, components) -> set:
        """Bundle components ("t3", "s3gen", "frontends"), graph kinds ("flow", "hift", "frontend":
        the manifest's per-graph ``component``) or graph names -> graph names."""
        comps = self.manifest.data.get("components", {})
        graphs = self.manifest.graphs
        kinds = {g.get("component") for g in graphs.values()}
        out = set()
        for c in ([components] if isinstance(components, str) else list(components or ())):
            if c in comps:
                out.update(comps[c].get("graphs", []))
            elif c in graphs:
                out.add(c)
            elif c in kinds:
                out.update(n for n, g in graphs.items() if g.get("component") == c)
            else:
                raise ValueError(f"trt_components: {c!r} is neither a component ({sorted(comps)}), a kind of graph "
                                 f"({sorted(k for k in kinds if k)}) nor a graph ({sorted(graphs)}) of {self.bundle}")
        return out

    def _group(self, name: str) -> tuple:
        for g in TRT_GROUPS:
            if name in g:
                return tuple(n for n in g if n in self.manifest.graphs)
        return (name,)

    def runner(self, name: str):
        """The engine runner of graph ``name`` (None: it runs on onnxruntime)."""
        if name not in self.selected:
            return None
        if name not in self._runners:
            from .tensorrt import TensorRTUnavailable

            group = self._group(name)
            if any(g not in self.selected for g in group):
                raise ValueError(f"trt_components: graphs {list(group)} share state and run on one backend; "
                                 f"select all of them or none")
            got = {}
            for g in group:
                try:
                    got[g] = self.make_runner(g)
                except TensorRTUnavailable:
                    raise
                except Exception as e:  # a parse, build or load failure: this graph (group) falls back
                    self.failures[g] = e
                    comp = self.manifest.graphs[g].get("component", "?")
                    msg = (f"TensorRT could not build graph {g} ({self.manifest.graphs[g]['file']}, {comp}): "
                           f"{type(e).__name__}: {e}")
                    if self.strict:
                        from .tensorrt import EngineError

                        raise EngineError(f"{msg}. Run it on onnxruntime: leave it out of trt_components "
                                          f"(or strict=False to fall back per graph), or use "
                                          f"backend='onnxruntime'") from e
                    log.warning("%s; running %s on onnxruntime instead", msg,
                                " and ".join(group) if len(group) > 1 else "it")
                    break
            ok = all(g in got for g in group)
            for g in group:
                self._runners[g] = got[g] if ok else None
        return self._runners[name]

    def __call__(self, path: Path, *, device: str = "cpu", threads: Optional[int] = None):
        from ._onnx import open_session

        name = self._by_file.get(Path(path).name)
        runner = self.runner(name) if name is not None else None
        if runner is None:
            if name is not None:
                self.placement[name] = "onnxruntime"
            return open_session(path, device=self.ort_device, threads=threads)
        from .tensorrt import profile_of
        from .trt_session import TrtSession

        entry = self.manifest.graphs[name]
        self.placement[name] = "tensorrt"
        return TrtSession(runner, entry["inputs"], entry["outputs"], name=name, profile=profile_of(entry))


def tensorrt_runners(bundle: Path, *, device: str = "cuda", precision: Optional[str] = None, cache=None,
                     builder=None, rebuild: bool = False, cuda_graphs: bool = False):
    """``make_runner`` for ``TrtSessionFactory`` on the real TensorRT: the graph's engine from the
    engine cache (``build_bundle_engines``: built once per key), loaded as a ``TensorRTRunner``.
    Raises ``TensorRTUnavailable`` (with the install advice) without TensorRT and ``EngineError``
    without a CUDA GPU, before anything is built. ``cuda_graphs``: each runner captures a CUDA
    graph per input-shape set it sees repeated (``TensorRTRunner(cuda_graph=True)``)."""
    import torch

    from .tensorrt import DeviceInfo, EngineCache, EngineError, TensorRTRunner, build_bundle_engines

    dev = torch.device(device)
    if dev.type != "cuda":
        raise EngineError(f"backend='tensorrt' runs TensorRT engines on a CUDA GPU; device={device!r} is not one "
                          f"(pass device='cuda', or use backend='onnxruntime' for the CPU)")
    info = DeviceInfo.current(dev.index or 0)  # TensorRTUnavailable, or EngineError without a GPU
    cache = cache if isinstance(cache, EngineCache) else EngineCache(cache)

    def make_runner(name: str):
        plan = build_bundle_engines(bundle, graphs=[name], precision=precision, cache=cache, builder=builder,
                                    device=info, rebuild=rebuild)[name]
        return TensorRTRunner(plan, device_index=dev.index or 0, cuda_graph=cuda_graphs)

    return make_runner


def _ort_device_beside_tensorrt(device: str) -> str:
    """Where the graphs that stay on onnxruntime run: its CUDA provider when present, else the CPU."""
    from ._onnx import require_onnxruntime

    if str(device).startswith("cuda") and "CUDAExecutionProvider" in require_onnxruntime().get_available_providers():
        return str(device)
    return "cpu"


def load_exported(bundle_dir: Union[str, Path], *, device: Optional[str] = None, threads: Optional[int] = None,
                  backend: str = "onnxruntime", verify: bool = False, trt_components=DEFAULT_TRT_COMPONENTS,
                  trt_precision: Optional[str] = None, engine_cache=None, trt_strict: bool = False,
                  trt_runner=None, trt_cuda_graphs: bool = False):
    """An exported bundle -> ``TTS``.

    ``backend="onnxruntime"``: every graph an onnxruntime session (CPU execution provider; CUDA
    where onnxruntime-gpu is installed and ``device`` is cuda; ``device`` default "cpu").

    ``backend="tensorrt"`` (``device`` default "cuda"): the graphs of ``trt_components``
    (components "t3", "s3gen", "frontends"; kinds "flow", "hift"; or graph names; default T3 and
    the flow: see ``DEFAULT_TRT_COMPONENTS`` for why HiFT is not) run as TensorRT engines, built
    on first use into the engine cache (``engine_cache``: an ``EngineCache`` or its root;
    ``trt_precision``: the engines' precision, default the graph's) and found there after; the
    other graphs, and any whose engine cannot be built, run on onnxruntime (logged once per
    graph; ``trt_strict=True`` raises instead). ``trt_cuda_graphs=True``: the engines replay a
    CUDA graph for each input-shape set they see repeated (``TensorRTRunner``). The same
    classes run either way: the TensorRT engines sit behind an onnxruntime-shaped session
    (``trt_session.TrtSession``). ``trt_runner``: ``graph name -> runner`` with
    ``TensorRTRunner``'s call contract, replacing the real engines (tests). ``tts.graph_backends``
    says where each graph runs (for TensorRT: each graph opened so far)."""
    from ..text import dummy_text_frontend, load_text_frontend
    from ..tts import TTS
    from ..voice import Voice
    from ._onnx import require_onnxruntime
    from .manifest import VOICE, BundleError, Manifest

    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"load_exported runs the onnxruntime or tensorrt backend; {backend!r} is neither")
    if trt_cuda_graphs and backend != "tensorrt":
        raise ValueError("trt_cuda_graphs=True is an option of backend='tensorrt'")
    require_onnxruntime()
    bundle = Path(bundle_dir)
    device = str(device or ("cuda" if backend == "tensorrt" else "cpu"))
    factory = None
    if backend == "tensorrt" and trt_runner is None:
        trt_runner = tensorrt_runners(bundle, device=device, precision=trt_precision, cache=engine_cache,
                                      cuda_graphs=trt_cuda_graphs)
    m = Manifest.read(bundle, verify=verify)
    if m.layout != "native":
        raise BundleError(f"{bundle} is an {m.layout} bundle (for other ONNX clients); the {backend} backend "
                          f"reads the native layout: export with --layout native")
    for comp in ("t3", "s3gen"):
        m.component(comp)  # both are needed for text -> speech; names what is missing
    if backend == "tensorrt":
        factory = TrtSessionFactory(bundle, m, trt_runner, components=trt_components,
                                    ort_device=_ort_device_beside_tensorrt(device), strict=trt_strict)
        device = "cpu"  # the torch side (embeddings, sampling, draws) stays on the CPU, as for onnxruntime
    extras = _extras(bundle, m)
    from .ort_s3gen import OrtS3Gen
    from .ort_t3 import OrtT3

    kw = dict(device=device, threads=threads, session_factory=factory)
    t3 = OrtT3.load(bundle, m.component("t3")["config"], _prefixed(extras, "t3."), **kw)
    s3gen = OrtS3Gen.load(bundle, m.component("s3gen")["config"], _prefixed(extras, "s3gen."), **kw)
    ve = None
    if m.has("frontends"):
        from .ort_frontends import OrtFrontEnds, OrtVoiceEncoder

        fe = OrtFrontEnds.load(bundle, m.component("frontends")["config"], **kw)
        s3gen.attach_frontends(fe)
        ve = OrtVoiceEncoder.load(bundle, m.component("frontends")["config"], **kw)
    text = m.data.get("text_frontend", "dummy")
    frontend = dummy_text_frontend(m.variant) if text == "dummy" else load_text_frontend(bundle / text, m.variant)
    voice = Voice.load(bundle / VOICE) if (bundle / VOICE).is_file() else None
    where = ""
    if factory is not None:
        on = {b: [g for g, p in factory.placement.items() if p == b] for b in ("tensorrt", "onnxruntime")}
        where = "".join(f"; {label}: {', '.join(on[b]) or 'none'}"
                        for b, label in (("tensorrt", "TensorRT"), ("onnxruntime", "onnxruntime")))
    tts = TTS(m.variant, t3, s3gen, ve, frontend, voice, source=f"exported bundle {bundle} ({m.precision}, "
              f"opset {m.opset}, weights {m.model_hash}{where})")
    tts.backend = backend
    tts.bundle = m
    tts.graph_backends = factory.placement if factory is not None else {g: "onnxruntime" for g in m.graphs}
    tts.session_factory = factory  # the TensorRT backend's: .placement, .failures
    return tts


def cached_export(tts, *, precision: str = "fp32", opset: Optional[int] = None, root=None) -> Path:
    """The bundle of ``tts``'s exact weights in the export cache (``$CHATTERBOX_RT_EXPORTS`` or
    ``~/.cache/chatterbox-rt/onnx``), exported on first use."""
    from ._onnx import DEFAULT_OPSET
    from .exporter import export, model_hashes
    from .manifest import BundleError, Manifest, combined_hash

    opset = opset or DEFAULT_OPSET
    h = combined_hash(model_hashes(tts))
    d = export_cache_root(root) / f"{tts.variant}-{h}-{precision}-opset{opset}"
    try:
        Manifest.read(d).expect(model_hash=h, opset=opset, precision=precision)
        return d
    except BundleError:
        pass
    log.info("exporting %s to %s (once for these weights)", tts.variant, d)
    export(tts, d, precision=precision, opset=opset, force=True)
    return d
