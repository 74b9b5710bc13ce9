"""The onnxruntime backend: a ``TTS`` whose heavy stages run as onnxruntime sessions over an
exported bundle, with the same Python API, sampling, alignment control, streaming and Engine
as the torch backend (only the component runners differ).

``load_exported(dir)`` reads and checks the manifest, then builds ``OrtT3`` (T3's prefill/decode
graphs; the small embedding tables from ``extras.safetensors``), ``OrtS3Gen`` (flow encoder, CFM
loop or estimator, HiFT) and the front ends (voice encoder, CAMPPlus, S3 tokenizer, prompt mel)
when the bundle has them. ``cached_export(tts)`` is what ``TTS.from_local(..., backend=
"onnxruntime")`` uses: the bundle of these exact weights in the export cache, exported once.
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


def load_exported(bundle_dir: Union[str, Path], *, device: str = "cpu", threads: Optional[int] = None,
                  backend: str = "onnxruntime", verify: bool = False):
    """An exported bundle -> ``TTS`` on onnxruntime (CPU execution provider; CUDA where
    onnxruntime-gpu is installed and ``device`` is cuda)."""
    from ..text import dummy_text_frontend, load_text_frontend
    from ..tts import TTS
    from ..voice import Voice
    from ._onnx import require_onnxruntime
    from .manifest import VOICE, BundleError, Manifest

    if backend != "onnxruntime":
        raise ValueError(f"load_exported runs the onnxruntime backend; {backend!r} is not it")
    require_onnxruntime()
    bundle = Path(bundle_dir)
    m = Manifest.read(bundle, verify=verify)
    if m.layout != "native":
        raise BundleError(f"{bundle} is an {m.layout} bundle (for other ONNX clients); the onnxruntime backend "
                          f"reads the native layout: export with --layout native")
    for comp in ("t3", "s3gen"):
        m.component(comp)  # both are needed for text -> speech; names what is missing
    extras = _extras(bundle, m)
    from .ort_s3gen import OrtS3Gen
    from .ort_t3 import OrtT3

    t3 = OrtT3.load(bundle, m.component("t3")["config"], _prefixed(extras, "t3."), device=device, threads=threads)
    s3gen = OrtS3Gen.load(bundle, m.component("s3gen")["config"], _prefixed(extras, "s3gen."), device=device,
                          threads=threads)
    ve = None
    if m.has("frontends"):
        from .ort_frontends import OrtFrontEnds, OrtVoiceEncoder

        fe = OrtFrontEnds.load(bundle, m.component("frontends")["config"], device=device, threads=threads)
        s3gen.attach_frontends(fe)
        ve = OrtVoiceEncoder.load(bundle, m.component("frontends")["config"], device=device, threads=threads)
    text = m.data.get("text_frontend", "dummy")
    frontend = dummy_text_frontend(m.variant) if text == "dummy" else load_text_frontend(bundle / text, m.variant)
    voice = Voice.load(bundle / VOICE) if (bundle / VOICE).is_file() else None
    tts = TTS(m.variant, t3, s3gen, ve, frontend, voice, source=f"exported bundle {bundle} ({m.precision}, "
              f"opset {m.opset}, weights {m.model_hash})")
    tts.backend = backend
    tts.bundle = m
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
