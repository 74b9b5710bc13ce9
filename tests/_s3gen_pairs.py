"""S3Gen parity helpers: the reference/ours pair builders (``chatterbox_rt.profiling.upstream``,
shared with ``chatterbox-rt bench --compare-upstream``), zeroed reference noise, and relative-error checks.

Our model loads the reference's state dict as a checkpoint: weight norm in the ``parametrizations``
style and the tokenizer's recomputed buffers included.
"""
from __future__ import annotations

from pathlib import Path

import torch

from chatterbox_rt.profiling.upstream import (  # noqa: F401
    build_reference_s3gen,
    build_s3gen_pair,
    rerandomise_flow_,
    rerandomise_hift_,
)

DATA = Path(__file__).parent / "data"


def zero_noise(monkeypatch):
    """Make every random draw of the reference's S3Gen zeros: the CFM's ``randn_like`` (and
    meanflow's ``randn``) and HiFT's source phases (a torch ``Uniform``) and noise (``randn_like``)."""
    from torch.distributions.uniform import Uniform

    monkeypatch.setattr(torch, "randn_like", lambda x, *a, **k: torch.zeros_like(x))
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros_like(real_randn(*a, **k)))
    monkeypatch.setattr(Uniform, "sample",
                        lambda self, sample_shape=(): torch.zeros(torch.Size(sample_shape) + self.low.shape))


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def report(a, b, what):
    diff = (a - b).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return (f"{what}: max abs error {diff.max().item():.3g} at {idx} (ours {a[idx].item():.6g}, "
            f"ref {b[idx].item():.6g}; ref peak {b.abs().max().item():.4g})")


def assert_close_rel(ours, ref, what, rtol=1e-3):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert rel_err(ours, ref) <= rtol, report(ours, ref, what)
