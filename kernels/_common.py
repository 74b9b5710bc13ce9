"""Checks shared by the Triton launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``, read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """All tensors on one device that the Triton kernel can run on: CUDA, or CPU under the interpreter."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cuda" or (dev.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{op}: the Triton kernel needs CUDA tensors, got {dev}; CPU tensors run only under "
                     "Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), "
                     f"otherwise use the dispatched chatterbox_rt.kernels.{op} (any device) or {op}_ref")
