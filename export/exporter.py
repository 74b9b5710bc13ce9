"""``chatterbox_rt.export.export``: a loaded model -> a checked bundle directory.

Native layout (``export/README.md`` documents the names, which are a contract)::

    manifest.json          what is here, shapes, hashes, measured errors (written last)
    t3_prefill.onnx        T3 prompt -> last logits, present keys/values
    t3_decode.onnx         one T3 step: embeds + past keys/values -> logits, presents
    t3.onnx.data           their weights, stored once for both
    s3gen_flow_encoder.onnx      speech tokens -> mu (conformer, upsample, projection)
    s3gen_cfm_estimator.onnx     the CFM estimator (dynamic batch, length); weights in its .data file
    s3gen_cfm_loop{N}.onnx       all N Euler steps with CFG, the noise an input (shares the estimator's data)
    s3gen_hift.onnx              mel + source phase/noise -> 24 kHz waveform (exportable iSTFT)
    s3gen_hift_f0.onnx, s3gen_hift_decode.onnx   HiFT's F0 and filter apart, for streaming (HiFT's .data file)
    voice_encoder.onnx, campplus.onnx, s3_tokenizer.onnx, prompt_mel.onnx   the voice front ends
    extras.safetensors     small tensors used beside the graphs (T3's embeddings, cond encoder)
    voice.pt               the built-in voice (conds.pt layout), when the model has one
    text/                  the text front end's files (tokenizer), when exported from a checkpoint

Every graph is run against torch right after export at several dynamic sizes; a graph that
differs by more than its tolerance fails the export (nothing is left that looks complete).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..audio_out import _umask
from ._onnx import DEFAULT_OPSET, check_opset
from .manifest import (EXTRAS, LAYOUTS, MANIFEST, PRECISIONS, VOICE, BundleError, Manifest, combined_hash,
                       move_into_place, new_manifest, record_files, state_hash)
from .spec import ComponentExport

log = logging.getLogger(__name__)

COMPONENTS = ("t3", "s3gen", "frontends")
# Names users may give for parts of the S3Gen component.
COMPONENT_ALIASES = {"flow": "s3gen", "cfm": "s3gen", "hift": "s3gen", "voice": "frontends", "front-ends": "frontends"}
TEXT_DIR = "text"


def parse_components(components: Optional[Union[str, Sequence[str]]]) -> list:
    if components is None:
        return list(COMPONENTS)
    if isinstance(components, str):
        components = [c for c in components.replace(",", " ").split() if c]
    out = []
    for c in components:
        key = COMPONENT_ALIASES.get(c, c)
        if key not in COMPONENTS:
            raise ValueError(f"unknown component {c!r}; expected some of {', '.join(COMPONENTS)} "
                             f"(or {', '.join(COMPONENT_ALIASES)})")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("no components to export")
    return out


def model_hashes(tts) -> dict:
    """Content hashes of the model's parts (what a bundle or engine is keyed by)."""
    return {"t3": state_hash(tts.t3), "s3gen": state_hash(tts.s3gen), "ve": state_hash(tts.ve)}


def _check_out_dir(out: Path, model_hash: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"cannot export to {out}: it is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if force:
        return
    mpath = out / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{out} is not empty and holds no bundle: refusing to write into it (give an empty or new "
                          f"directory, or --force / force=True to write anyway)")
    try:
        old = Manifest.read(out)
    except BundleError as e:
        raise BundleError(f"{out} holds an unreadable bundle ({e}); pass --force / force=True to replace it") from e
    if old.model_hash != model_hash:
        raise BundleError(f"{out} holds the bundle of another model ({old.variant}, weights {old.model_hash}; this "
                          f"one is {model_hash}): refusing to overwrite it without --force / force=True")


def _text_files(tts) -> list:
    ckpt = getattr(tts, "ckpt_dir", None)
    if ckpt is None:
        return []
    from .. import text as T

    names = {
        "chatterbox": [T.ENGLISH_TOKENIZER_FILE],
        "multilingual": [T.MULTILINGUAL_TOKENIZER_FILE, T.CANGJIE_FILE],
        "turbo": [T.GPT2_TOKENIZER_FILE, T.GPT2_VOCAB_FILE, T.GPT2_MERGES_FILE, T.GPT2_ADDED_TOKENS_FILE,
                  T.GPT2_TOKENIZER_CONFIG_FILE, T.GPT2_SPECIAL_TOKENS_MAP_FILE],
    }
    names["nano"] = names["turbo"]
    return [Path(ckpt) / n for n in names[tts.variant] if (Path(ckpt) / n).is_file()]


def _data_files(graph: Path) -> list:
    """The external weight files a graph reads (shared ones included), by name."""
    import onnx

    m = onnx.load(str(graph), load_external_data=False)
    return sorted({e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"})


def _run_component(name: str, tts, staging: Path, opset: int, n_steps: Optional[int]) -> ComponentExport:
    if name == "t3":
        from .t3_onnx import export_t3

        return export_t3(tts.t3, staging, opset=opset)
    if name == "s3gen":
        from .s3gen_onnx import export_s3gen

        return export_s3gen(tts.s3gen, staging, opset=opset, n_steps=n_steps)
    from .frontend_onnx import export_frontends

    return export_frontends(tts.ve, tts.s3gen, staging, opset=opset)


def export(tts, out_dir: Union[str, Path], *, components=None, precision: str = "fp32", opset: int = DEFAULT_OPSET,
           layout: str = "native", force: bool = False, n_steps: Optional[int] = None,
           default_voice=None, cfm_int8: str = "auto") -> Manifest:
    """Export ``tts`` (a torch-backend ``TTS``) to ``out_dir`` and check every graph against torch.

    ``components``: some of "t3", "s3gen", "frontends" (default all). ``precision``: "fp32"
    (the graphs' float type; "int8"/"int4" quantise T3's weight matrices, and try dynamic INT8 on
    the CFM estimator, see ``quantize``). ``cfm_int8`` (int8/int4 only): "auto" keeps the int8
    estimator where it holds the mel within its bound and is faster on this machine, "on" wherever
    it holds the bound, "off" never; the measurement is in the manifest either way.
    ``layout``: "native" or "onnx-community" (the four-graph bundle existing ONNX clients read).
    ``force``: write into a directory holding another model's bundle. ``n_steps``: the CFM steps
    of the whole-loop graph (default: the decoder's). ``default_voice`` (onnx-community layout): a
    clip written as the bundle's ``default_voice.wav``, which its clients use when given no voice.
    Returns the written ``Manifest``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from .quantize import CFM_INT8_MODES

    if cfm_int8 not in CFM_INT8_MODES:
        raise ValueError(f"cfm_int8 must be one of {', '.join(CFM_INT8_MODES)}, got {cfm_int8!r}")
    if cfm_int8 != "auto" and (precision not in ("int8", "int4") or layout != "native"):
        raise ValueError(f"cfm_int8={cfm_int8!r} applies to the native layout at precision int8 or int4 (here: "
                         f"{layout}, {precision})")
    check_opset(opset)
    if getattr(tts, "backend", "torch") != "torch":
        raise ValueError(f"export needs the torch backend's model; this TTS runs on {tts.backend}")
    if layout == "onnx-community":
        from .onnx_community import export_onnx_community

        return export_onnx_community(tts, out_dir, precision=precision, opset=opset, force=force, n_steps=n_steps,
                                     default_voice=default_voice)
    comps = parse_components(components)
    prec = getattr(tts, "precision", None)
    if "t3" in comps and (tts.t3.dtype != torch.float32 or getattr(prec, "t3_weights", None) is not None):
        raise ValueError(f"export needs T3's fp32 weights; this model runs {prec.describe() if prec else tts.t3.dtype}: "
                         f"load it with precision='fp32' (the bundle's own precision is export(precision=...): int8 "
                         f"and int4 quantise T3 in the graphs)")
    hashes = model_hashes(tts)
    model_hash = combined_hash(hashes)
    out = Path(out_dir)
    _check_out_dir(out, model_hash, force)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is written
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    manifest = new_manifest(variant=tts.variant, layout=layout, precision=precision, opset=opset,
                            model_hash=model_hash, source=getattr(tts, "source", ""),
                            behaviour=tts.behaviour)
    manifest.data["hashes"] = hashes
    extras: dict = {}
    try:
        for name in comps:
            t0 = time.perf_counter()
            log.info("exporting %s", name)
            with torch.inference_mode(False):
                res = _run_component(name, tts, staging, opset, n_steps)
            if precision in ("int8", "int4") and name == "t3":
                from .quantize import quantize_t3

                res = quantize_t3(res, staging, bits=8 if precision == "int8" else 4)
            if precision in ("int8", "int4") and name == "s3gen":
                from .quantize import quantize_cfm

                res = quantize_cfm(res, staging, mode=cfm_int8)
            extras.update(res.extras)
            manifest.data["components"][name] = {"config": res.config, "weights_hash": hashes.get(
                "ve" if name == "frontends" else name), "graphs": [g.spec.name for g in res.graphs],
                "export_s": round(time.perf_counter() - t0, 1)}
            for g in res.graphs:
                entry = g.spec.to_json()
                entry.update(precision=g.precision, opset=opset, check=g.check,
                             weights_hash=manifest.data["components"][name]["weights_hash"])
                manifest.data["graphs"][g.spec.name] = entry
        if extras:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in extras.items()}, str(staging / EXTRAS))
            # safetensors creates its file 0600; a bundle's files get the mode the umask gives the rest,
            # so a bundle one user exports can be read by another (a service account)
            os.chmod(staging / EXTRAS, 0o666 & ~_umask())
        if tts.builtin_voice is not None:
            tts.builtin_voice.save(staging / VOICE)
        text_files = _text_files(tts)
        if text_files:
            (staging / TEXT_DIR).mkdir()
            for f in text_files:
                shutil.copy2(f, staging / TEXT_DIR / f.name)
        manifest.data["text_frontend"] = TEXT_DIR if text_files else "dummy"
        # Move everything into place, then write the manifest: until then the bundle reads as incomplete.
        record_files(manifest, out, move_into_place(staging, out))
        for entry in manifest.data["graphs"].values():
            entry["data_files"] = _data_files(out / entry["file"])
            entry["bytes"] = sum(manifest.data["files"][n]["bytes"] for n in [entry["file"], *entry["data_files"]]
                                 if n in manifest.data["files"])
        manifest.write(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
