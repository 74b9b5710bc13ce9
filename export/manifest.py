"""``manifest.json``: what an exported bundle holds, and the checks made before it is used.

A bundle directory holds the ONNX graphs, their weight data files, ``extras.safetensors`` (the
small tensors the runtime uses beside the graphs), the text front end's files, the built-in voice
and this manifest, written last: a bundle without one is incomplete (an export that stopped
half-way) and is refused. Per graph it records the component, precision, opset, input/output
names, dtypes and min/opt/max shapes, the weights' content hash, the file sizes and digests, and
the error measured against torch right after export.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

FORMAT = "chatterbox-rt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXTRAS = "extras.safetensors"
VOICE = "voice.pt"
LAYOUTS = ("native", "onnx-community")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete, corrupt, or not the one asked for."""


def state_hash(obj: Union[torch.nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """Content hash of a module's state dict (names, dtypes, shapes, bytes), 16 hex digits: the
    same weights give the same hash whatever file they came from."""
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu()
        if t.stride() and 0 in t.stride():  # zero-strided stand-ins (GPT-2's unused wte)
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|broadcast".encode())
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    from .. import __version__ as ours

    out["chatterbox_rt"] = ours
    return out


def combined_hash(parts: Mapping[str, str]) -> str:
    h = hashlib.sha256(json.dumps(dict(sorted(parts.items()))).encode())
    return h.hexdigest()[:16]


class Manifest:
    """The parsed ``manifest.json`` of a bundle directory."""

    def __init__(self, data: dict, root: Optional[Path] = None):
        self.data = data
        self.root = Path(root) if root is not None else None

    # ------------------------------------------------------------------ fields

    @property
    def variant(self) -> str:
        return self.data["variant"]

    @property
    def layout(self) -> str:
        return self.data.get("layout", "native")

    @property
    def model_hash(self) -> str:
        return self.data["model_hash"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def opset(self) -> int:
        return int(self.data["opset"])

    @property
    def graphs(self) -> dict:
        return self.data.get("graphs", {})

    def component(self, name: str) -> dict:
        comps = self.data.get("components", {})
        if name not in comps:
            raise BundleError(f"bundle {self.root} has no {name!r} component (it has {sorted(comps)}); export it "
                              f"with --components including {name}")
        return comps[name]

    def has(self, component: str) -> bool:
        return component in self.data.get("components", {})

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"bundle {self.root} has no graph {name!r} (it has {sorted(self.graphs)})")
        return self.root / self.graphs[name]["file"]

    # ------------------------------------------------------------------ files

    def write(self, root: Path) -> Path:
        root = Path(root)
        path = root / MANIFEST
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        self.root = root
        return path

    @classmethod
    def read(cls, root: Union[str, Path], *, verify: bool = False) -> "Manifest":
        """Read and check a bundle: format, version, and every recorded file present with its
        recorded size (``verify=True`` also compares digests: reads every byte)."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"exported bundle not found: {root} is not a directory")
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root} has no {MANIFEST}: not an exported bundle, or an export that did not finish "
                              f"(export again with `chatterbox-rt export ... --out {root} --force`)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path} is not valid JSON ({e}); export the bundle again") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{path} is not a chatterbox-rt bundle manifest (format {data.get('format')!r})"
                              if isinstance(data, dict) else f"{path} is not a manifest")
        if int(data.get("format_version", -1)) > FORMAT_VERSION:
            raise BundleError(f"{path} is format version {data.get('format_version')}, newer than this chatterbox-rt "
                              f"reads ({FORMAT_VERSION}); upgrade chatterbox-rt or export again")
        m = cls(data, root)
        m.check_files(verify=verify)
        return m

    def check_files(self, verify: bool = False) -> None:
        for name, rec in self.data.get("files", {}).items():
            p = self.root / name
            if not p.is_file():
                raise BundleError(f"bundle {self.root}: {name} is missing (recorded in {MANIFEST}); export again")
            size = p.stat().st_size
            if size != rec["bytes"]:
                raise BundleError(f"bundle {self.root}: {name} is {size} bytes, {MANIFEST} records {rec['bytes']}: "
                                  f"the file is truncated or was replaced; export again")
            if verify and file_digest(p) != rec["sha256"]:
                raise BundleError(f"bundle {self.root}: {name} does not match its recorded sha256 (corrupt or "
                                  f"replaced); export again")

    def expect(self, *, model_hash: Optional[str] = None, opset: Optional[int] = None,
               precision: Optional[str] = None) -> "Manifest":
        """Refuse a bundle of other weights, opset or precision than the caller's."""
        for what, want, got in (("weights hash", model_hash, self.model_hash), ("opset", opset, self.opset),
                                ("precision", precision, self.precision)):
            if want is not None and want != got:
                raise BundleError(f"bundle {self.root} was exported with {what} {got}, not {want}: it belongs to "
                                  f"another model or export; export again (or point at the right bundle)")
        return self


def new_manifest(*, variant: str, layout: str, precision: str, opset: int, model_hash: str, source: str,
                 behaviour: Optional[str] = None) -> Manifest:
    return Manifest({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "variant": variant,
        "behaviour": behaviour,
        "model_hash": model_hash,
        "precision": precision,
        "opset": opset,
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "components": {},
        "graphs": {},
        "files": {},
    })


def move_into_place(staging: Path, out: Path) -> list:
    """Every file under ``staging`` moved to the same relative path under ``out`` (rename, same
    file system); -> their relative names, for ``record_files``."""
    names = []
    for p in sorted(Path(staging).rglob("*")):
        if p.is_file():
            rel = p.relative_to(staging)
            dest = Path(out) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            p.replace(dest)
            names.append(str(rel))
    return names


def record_files(manifest: Manifest, root: Path, names) -> None:
    for name in names:
        p = Path(root) / name
        manifest.data["files"][name] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}


def describe(manifest: Manifest) -> str:
    """Markdown tables of a bundle's graphs: inputs and outputs with dtypes and axes, the shape
    profile, the error measured (what export/README.md shows)."""
    lines = []
    for name, g in manifest.graphs.items():
        chk = g.get("check") or {}
        err = chk.get("max_rel_error")
        lines.append(f"**`{g['file']}`** ({g['component']}, {g.get('precision')}) — {g.get('doc', '')}".rstrip(" —"))
        lines.append("")
        lines.append("| | name | dtype | axes |")
        lines.append("|---|---|---|---|")
        for kind in ("inputs", "outputs"):
            for t in g[kind]:
                axes = ", ".join(str(a) for a in t["axes"])
                lines.append(f"| {kind[:-1]} | `{t['name']}` | {t['dtype']} | [{axes}] |")
        prof = ", ".join(f"{k} {d['min']}/{d['opt']}/{d['max']}" for k, d in g.get("profile", {}).items())
        lines.append("")
        lines.append(f"min/opt/max: {prof or 'static'}; error vs torch: "
                     f"{'%.1e' % err if err is not None else 'n/a'} (relative, {chk.get('cases', 0)} size sets)")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m chatterbox_rt.export.manifest BUNDLE
    import sys

    print(describe(Manifest.read(sys.argv[1])))
