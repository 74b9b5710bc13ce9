"""A TensorRT engine behind the part of ``onnxruntime.InferenceSession`` the onnxruntime-backed
classes use, so ``OrtT3``, ``OrtS3Gen`` and the front ends run on TensorRT unchanged.

``TrtSession(runner, spec_inputs, spec_outputs)`` wraps anything with ``TensorRTRunner``'s call
contract (``runner(feeds: {name: tensor}) -> {name: tensor}``, the outputs views of buffers the
runner reuses on its next call) and offers:

* ``get_inputs()`` / ``get_outputs()``: ``.name``, ``.shape`` (ints and symbolic axis names, as
  onnxruntime gives them) and ``.type`` (``"tensor(float)"``...), from the manifest's graph entry;
* ``run(output_names, feeds)``: numpy arrays, torch tensors or OrtValue-like values (anything with
  ``.numpy()``) in, numpy arrays out (copied off the runner's buffers, after the stream is
  synchronised);
* ``run_with_ort_values(output_names, feeds)``: the outputs as :class:`TrtValue`, each a device
  tensor of its own (a device-to-device copy, no host round trip) with ``.numpy()`` (synchronise,
  copy to the host), ``.shape()`` and ``.data_type()`` as on an OrtValue. ``OrtT3`` keeps T3's
  ``present`` keys/values as these and feeds them back as ``past_key_values``: they never leave
  the GPU; only the logits (and the alignment attention) go to the host.

Inputs are converted to the dtype the engine binds (TensorRT may bind an ONNX int64 input as
int32: the runner's ``_torch_dtype`` says which) on the runner's device; outputs come back in the
dtype the ONNX graph declares. Input shapes are checked against the engine's optimisation profile
(the manifest's min/max shapes) with an error that names the graph, rather than TensorRT's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .spec import torch_dtype

# ONNX-facing dtype names (the manifest's) -> onnxruntime's type strings.
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "int64": "tensor(int64)", "int32": "tensor(int32)", "bool": "tensor(bool)"}
_TORCH_TO_ORT = {torch.float32: "tensor(float)", torch.float16: "tensor(float16)", torch.bfloat16: "tensor(bfloat16)",
                 torch.int64: "tensor(int64)", torch.int32: "tensor(int32)", torch.bool: "tensor(bool)",
                 torch.int8: "tensor(int8)"}


@dataclass(frozen=True)
class NodeArg:
    """``onnxruntime.NodeArg``'s fields: the tensor's name, shape (ints, axis names) and type."""

    name: str
    shape: list
    type: str


def _spec(t) -> tuple:
    """A manifest tensor entry (dict: name, dtype, axes) or a ``TensorSpec`` -> (name, dtype, axes)."""
    if isinstance(t, Mapping):
        return t["name"], t["dtype"], list(t["axes"])
    return t.name, t.dtype, list(t.axes)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _host(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A copy of ``t`` on the host in ``dtype`` (never a view of the runner's buffer)."""
    if dtype == torch.bfloat16:  # numpy has no bfloat16
        dtype = torch.float32
    return t.detach().to("cpu", dtype=dtype, copy=True).numpy()


class TrtValue:
    """A tensor a ``TrtSession`` returned, kept on the engine's device: what an ``OrtValue`` is to an
    onnxruntime session (``numpy()``, ``shape()``, ``data_type()``, ``device_name()``). Fed back to
    a ``TrtSession`` it is bound as it is (no copy). ``tensor`` is the torch tensor itself."""

    __slots__ = ("tensor",)
    is_device_value = True  # ort_t3._ort_value passes it through untouched

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def numpy(self) -> np.ndarray:
        _synchronize(self.tensor.device)
        return _host(self.tensor, self.tensor.dtype)

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def shape(self) -> list:
        return list(self.tensor.shape)

    def data_type(self) -> str:
        return _TORCH_TO_ORT.get(self.tensor.dtype, str(self.tensor.dtype))

    def device_name(self) -> str:
        return self.tensor.device.type

    def is_tensor(self) -> bool:
        return True

    def has_value(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"TrtValue({self.data_type()}, {self.shape()}, {self.tensor.device})"


class TrtSession:
    """``onnxruntime.InferenceSession``'s ``run`` / ``run_with_ort_values`` / ``get_inputs`` /
    ``get_outputs`` over a TensorRT engine runner (see the module docstring).

    ``spec_inputs`` / ``spec_outputs``: the graph's tensors as the manifest records them (dicts
    with ``name``, ``dtype``, ``axes``) or ``TensorSpec``s. ``profile``: input name -> ``{"min":
    shape, "max": shape}`` (``tensorrt.profile_of``), checked before each run; ``name``: the
    graph's, for messages."""

    def __init__(self, engine_runner, spec_inputs: Sequence, spec_outputs: Sequence, *, name: str = "",
                 profile: Optional[Mapping] = None):
        self.runner = engine_runner
        self.name = name or "graph"
        ins, outs = [_spec(t) for t in spec_inputs], [_spec(t) for t in spec_outputs]
        self._inputs = [NodeArg(n, axes, ORT_TYPES[dt]) for n, dt, axes in ins]
        self._outputs = [NodeArg(n, axes, ORT_TYPES[dt]) for n, dt, axes in outs]
        self._in_dtype = {n: torch_dtype(dt) for n, dt, _ in ins}
        self._out_dtype = {n: torch_dtype(dt) for n, dt, _ in outs}
        self._profile = dict(profile or {})
        self.device = torch.device(getattr(engine_runner, "device", None) or "cuda")
        engine_dtype = getattr(engine_runner, "_torch_dtype", None)
        # the dtype the engine binds each input as (TensorRT may narrow int64 to int32)
        self._bind_dtype = {n: (engine_dtype(n) if engine_dtype is not None else d) for n, d in self._in_dtype.items()}

    # ------------------------------------------------------------------ InferenceSession's API

    def get_inputs(self) -> list:
        return list(self._inputs)

    def get_outputs(self) -> list:
        return list(self._outputs)

    def get_providers(self) -> list:
        return ["TensorRT"]

    def run(self, output_names: Optional[Sequence[str]], input_feed: Mapping, run_options=None) -> list:
        """-> numpy arrays of ``output_names`` (None: every output), copies of the engine's."""
        names = self._names(output_names)
        out, _keep = self._execute(input_feed)
        _synchronize(self.device)
        return [_host(out[n], self._out_dtype[n]) for n in names]

    def run_with_ort_values(self, output_names: Optional[Sequence[str]], input_dict_ort_values: Mapping,
                            run_options=None) -> list:
        """-> :class:`TrtValue` s of ``output_names``: device tensors of their own (copied on the device
        off the runner's reused buffers, so they outlive the next call)."""
        names = self._names(output_names)
        out, _keep = self._execute(input_dict_ort_values)
        return [TrtValue(out[n].to(dtype=self._out_dtype[n], copy=True)) for n in names]

    # ------------------------------------------------------------------ mechanics

    def _names(self, output_names) -> list:
        if not output_names:
            return [o.name for o in self._outputs]
        unknown = [n for n in output_names if n not in self._out_dtype]
        if unknown:
            raise ValueError(f"{self.name}: no output(s) {unknown}; it has {[o.name for o in self._outputs]}")
        return list(output_names)

    def _tensor(self, name: str, value) -> torch.Tensor:
        if isinstance(value, TrtValue):
            t = value.tensor
        elif torch.is_tensor(value):
            t = value.detach()
        elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # an OrtValue
            t = torch.from_numpy(np.ascontiguousarray(value.numpy()))
        else:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(value)))
        self._check_shape(name, tuple(t.shape))
        want = self._bind_dtype[name]
        if t.device != self.device or t.dtype != want or not t.is_contiguous():
            t = t.to(self.device, want).contiguous()
        return t

    def _check_shape(self, name: str, shape: tuple) -> None:
        p = self._profile.get(name)
        if p is None:
            return
        lo, hi = p["min"], p["max"]
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ValueError(f"{self.name}: input {name} of shape {list(shape)} is outside the TensorRT engine's "
                             f"profile (min {list(lo)}, max {list(hi)}, from the bundle's manifest); run this graph "
                             f"on onnxruntime (trt_components without it) or export with larger limits")

    def _execute(self, feeds: Mapping) -> tuple:
        missing = [n for n in self._in_dtype if n not in feeds]
        unknown = [n for n in feeds if n not in self._in_dtype]
        if missing or unknown:
            raise ValueError(f"{self.name}: inputs missing {missing}, unknown {unknown}; it takes "
                             f"{list(self._in_dtype)}")
        tensors = {n: self._tensor(n, feeds[n]) for n in self._in_dtype}
        out = self.runner(tensors)
        # ``tensors`` is returned so the inputs stay alive until the caller has read the outputs
        return out, tensors

    def __repr__(self) -> str:
        return f"TrtSession({self.name}, {type(self.runner).__name__}, {self.device})"


__all__ = ["NodeArg", "TrtSession", "TrtValue", "ORT_TYPES"]
