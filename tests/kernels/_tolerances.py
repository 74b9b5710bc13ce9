"""Per-dtype tolerances for kernel tests, in one table (vLLM's allclose_default), and the checks.

Elementwise ops compare against the torch reference run in the same dtype with ``TOL``.
Ops that reduce (the iSTFT's inverse DFT and overlap-add, softmax/cumsum in sampling) follow
flash-attention's rule instead: the kernel's error against an fp32 reference may be at most twice
torch's own error in the same low precision, plus a small atol (``assert_reduction_close``).
"""
from __future__ import annotations

import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _where(err: torch.Tensor) -> tuple:
    flat = int(torch.argmax(err))
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                            name: str = "output") -> None:
    """allclose that, on failure, says how many elements are off, where the worst one is and by how much."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any() or not torch.isfinite(a).all() == torch.isfinite(e).all():
        idx = _where(torch.nan_to_num(err, nan=float("inf")))
        raise AssertionError(f"{name}: {int(bad.sum())} / {bad.numel()} elements off (atol {atol}, rtol {rtol}); "
                             f"worst at {idx}: got {a[idx].item():.6g}, want {e[idx].item():.6g}, "
                             f"abs err {err[idx].item():.3e}")


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """Elementwise comparison with the table's tolerance for ``expected.dtype``."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert_verbose_allclose(actual, expected, name=name, **TOL[expected.dtype])


def assert_reduction_close(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor,
                           atol: float = 1e-5, name: str = "output") -> None:
    """flash-attention's rule: max|out - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + atol."""
    f = ref_fp32.detach().double().cpu()
    ours = (out.detach().double().cpu() - f).abs().max().item()
    torch_err = (ref_lowp.detach().double().cpu() - f).abs().max().item()
    assert ours <= 2 * torch_err + atol, (f"{name}: max error {ours:.3e} against fp32 exceeds 2 x torch's own "
                                          f"{torch_err:.3e} + {atol:g}")


def import_without_triton(monkeypatch, module):
    """A fresh copy of a kernel module imported as if triton were not installed (its launcher must
    then refuse with advice, its ``_ref`` must still work)."""
    import importlib.util
    import sys

    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes ``import triton`` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    pkg = module.__name__.rpartition(".")[0]
    spec = importlib.util.spec_from_file_location(f"{pkg}._{module.__name__.rpartition('.')[2]}_without_triton",
                                                  module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    fresh.__package__ = pkg  # its relative imports resolve inside chatterbox_rt.kernels
    spec.loader.exec_module(fresh)
    return fresh


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # Triton kernels run on CPU tensors under the interpreter


def triton_marks(has_triton: bool) -> list:
    """pytestmark for a Triton kernel's test module: skip without triton, or without both a GPU and
    the interpreter (tests/conftest.py turns it on when there is no GPU)."""
    import os

    import pytest

    return [pytest.mark.skipif(not has_triton, reason="triton is not installed"),
            pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="no GPU and the Triton interpreter is off")]
