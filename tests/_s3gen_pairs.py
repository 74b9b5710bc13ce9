"""A reference S3Gen (``S3Token2Wav``) with seeded random weights, and ours loaded from its state dict.

Weights are re-randomised at magnitudes a trained model has (so nothing saturates and the
comparison means something): the flow like tests/parity/test_s3gen_cfm_parity.py, the vocoder like
tests/parity/test_hift_parity.py (F0 on both sides of the voiced threshold, waveform inside the
clamp). The tokenizer and the x-vector keep torch's default initialisation (already random).
Our model loads the reference's state dict as a checkpoint: weight norm in the
``parametrizations`` style and the tokenizer's recomputed buffers included.
"""
from __future__ import annotations

from pathlib import Path

import torch

from chatterbox_rt.models.s3gen import S3Gen

DATA = Path(__file__).parent / "data"


def rerandomise_flow_(flow, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return flow


def rerandomise_hift_(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0"):
                p.copy_(torch.empty(p.shape).uniform_(0.6, 1.0, generator=g))
            elif name.endswith("original1"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("alpha"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        model.f0_predictor.classifier.weight.mul_(400.0)
        model.conv_post.bias[:9] -= 2.0
    return model


def build_reference_s3gen(ref, meanflow: bool = False, seed: int = 0):
    from chatterbox.models.s3gen import S3Gen as RefS3Gen

    torch.manual_seed(seed)
    model = RefS3Gen(meanflow=meanflow).eval()
    rerandomise_flow_(model.flow, seed + 1)
    rerandomise_hift_(model.mel2wav, seed + 2)
    return model


def build_s3gen_pair(ref, meanflow: bool = False, seed: int = 0):
    """-> (reference S3Token2Wav, our S3Gen), fp32 eval on CPU with the same weights."""
    ref_model = build_reference_s3gen(ref, meanflow, seed)
    ours = S3Gen(meanflow).eval()
    ours.load_checkpoint(ref_model.state_dict(), f"reference S3Gen (meanflow={meanflow})")
    return ref_model, ours


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
