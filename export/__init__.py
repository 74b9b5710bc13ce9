"""Export: ONNX graphs per component with a checked manifest, the onnxruntime backend, and
TensorRT engines per GPU (``export/README.md``)."""
from __future__ import annotations

_LAZY = {"export": ".exporter", "Manifest": ".manifest", "BundleError": ".manifest", "ExportError": "._onnx",
         "load_exported": ".ort_backend"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
