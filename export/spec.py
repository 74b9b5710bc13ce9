"""The contract of each exported graph, declared once.

A ``GraphSpec`` names a graph's file, its component, its inputs and outputs (name, dtype, axes,
where an axis is either a fixed size or a symbolic name) and the min/opt/max size of every symbolic
axis. The exporter passes it to ``torch.onnx.export`` (names, dynamic axes), the check draws its
test inputs from the profile, the manifest records it, the onnxruntime and TensorRT runners bind by
it (TensorRT optimisation profiles come straight from ``shape_profile``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

Axis = Union[int, str]

# ONNX-facing dtype names -> torch / numpy dtypes.
DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, None),  # numpy has none: bound through torch tensors
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
    "bool": (torch.bool, np.bool_),
}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name][0]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    axes: tuple  # each an int (fixed) or a str (symbolic, sized by the graph's profile)

    def shape(self, sizes: Mapping[str, int]) -> tuple:
        return tuple(a if isinstance(a, int) else int(sizes[a]) for a in self.axes)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes)}


@dataclass(frozen=True)
class Dim:
    """A symbolic axis's sizes: TensorRT's optimisation profile, and the sizes the check runs at."""

    min: int
    opt: int
    max: int

    def check_sizes(self) -> list:
        """The sizes an export check runs the graph at: the ends of the profile and an odd one
        between them."""
        mid = (self.min + self.opt) // 2 | 1
        return sorted({self.min, max(self.min, min(mid, self.max)), self.opt})


def T(name: str, dtype: str, *axes: Axis) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(axes))


@dataclass
class GraphSpec:
    """One exported graph."""

    name: str  # the file is f"{name}.onnx"
    component: str  # t3 | flow | hift | frontend
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    dims: Mapping[str, Dim] = field(default_factory=dict)
    # Output axes whose size follows from the inputs' (named, so dynamic_axes can mark them).
    doc: str = ""

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict:
        out = {}
        for t in list(self.inputs) + list(self.outputs):
            ax = {i: a for i, a in enumerate(t.axes) if isinstance(a, str)}
            if ax:
                out[t.name] = ax
        return out

    def shape_profile(self, which: str) -> dict:
        """Input name -> shape at the profile's ``which`` ("min", "opt", "max") sizes."""
        sizes = {k: getattr(d, which) for k, d in self.dims.items()}
        return {t.name: t.shape({**sizes}) for t in self.inputs if _all_known(t, sizes)}

    def input_spec(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no input {name!r}; it has {self.input_names}")

    def to_json(self) -> dict:
        return {
            "component": self.component,
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "profile": {k: {"min": d.min, "opt": d.opt, "max": d.max} for k, d in self.dims.items()},
            "shapes": {w: self.shape_profile(w) for w in ("min", "opt", "max")},
            "doc": self.doc,
        }


def _all_known(t: TensorSpec, sizes: Mapping[str, int]) -> bool:
    return all(isinstance(a, int) or a in sizes for a in t.axes)


def check_size_sets(spec: GraphSpec, limit: int = 3, tie: Optional[Mapping[str, str]] = None) -> list:
    """Sizes for the symbolic axes at which an export check runs the graph: min, an odd middle
    size, opt (``limit`` sets at most). ``tie``: axes that must take another axis's size."""
    names = list(spec.dims)
    per = [spec.dims[n].check_sizes() for n in names]
    sets = []
    for i in range(max(len(p) for p in per) if per else 1):
        s = {n: p[min(i, len(p) - 1)] for n, p in zip(names, per)}
        for a, b in (tie or {}).items():
            s[a] = s[b]
        if s not in sets:
            sets.append(s)
    return sets[:limit]


@dataclass
class GraphCheck:
    """One written graph and how it compared with torch right after export."""

    spec: GraphSpec
    check: dict  # check_graph's result: max_rel_error, per_output, cases, tolerance
    precision: str = "fp32"


@dataclass
class ComponentExport:
    """What a component's exporter hands the bundle writer (``chatterbox_rt.export.export``)."""

    component: str  # t3 | s3gen | frontends
    graphs: list  # [GraphCheck]
    # Tensors the runtime needs beside the graphs (e.g. T3's embedding tables), keys prefixed by
    # the component ("t3.text_emb.weight"); the bundle keeps them in extras.safetensors.
    extras: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # JSON facts its loader needs
