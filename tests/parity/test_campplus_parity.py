"""Parity of chatterbox_rt.models.campplus with the reference's CAMPPlus and torchaudio's Kaldi fbank."""
import pytest
import torch
from chatterbox_rt.models.campplus import CAMPPlus, CAMPPlusConfig, kaldi_fbank

SR = 16000
# Odd lengths: exactly one frame, one frame plus a sample, one short of two frames, off-hop lengths.
FBANK_LENGTHS = [400, 401, 559, 560, 4097, 16001, 52817]
FBANK_ATOL = 1e-4
XVEC_RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def signal(n, seed):
    """Seeded speech-like test signal: two tones, noise and a DC offset (remove_dc_offset matters)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SR
    return (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 1750 * t)
            + 0.05 * torch.randn(n, generator=g) + 0.02)


def assert_close_verbose(ours, theirs, atol=0.0, rtol=0.0, what=""):
    err = (ours - theirs).abs()
    bound = atol + rtol * theirs.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        pytest.fail(f"{what}: {int(bad.sum())}/{err.numel()} mismatches; max err {err.max().item():.3e}; "
                    f"first at {idx}: ours {ours[idx].item():.6f} vs ref {theirs[idx].item():.6f}")


@pytest.fixture(scope="module")
def kaldi(ref):
    from torchaudio.compliance import kaldi  # imported (patched) by the `ref` fixture
    return kaldi


@pytest.mark.parametrize("n", FBANK_LENGTHS)
def test_fbank_matches_torchaudio(kaldi, n):
    wav = signal(n, seed=n)
    expected = kaldi.fbank(wav.unsqueeze(0), num_mel_bins=80)  # the reference's call in extract_feature
    ours = kaldi_fbank(wav)
    assert ours.shape == expected.shape
    err = (ours - expected).abs().max().item()
    print(f"fbank n={n}: frames={ours.shape[0]} max abs err={err:.3e}")
    assert_close_verbose(ours, expected, atol=FBANK_ATOL, what=f"fbank n={n}")
    # Batched (equal lengths) must equal the per-row result.
    batch = kaldi_fbank(torch.stack([wav, 0.5 * wav]))
    assert_close_verbose(batch[0], expected, atol=FBANK_ATOL, what=f"batched fbank n={n}")


def randomise_(model, seed):
    """Moderate-scale random weights and plausible BatchNorm running statistics, so that every
    parameter and buffer matters and activations stay O(1) through the 52 dense layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:  # conv weights
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):  # BN gamma, PReLU-free model
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def models(ref):
    from chatterbox.models.s3gen.xvector import CAMPPlus as RefCAMPPlus

    theirs = randomise_(RefCAMPPlus(memory_efficient=False), seed=1234)  # as S3Token2Mel builds it
    ours = CAMPPlus(CAMPPlusConfig()).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seconds", [1.0, 3.3])
def test_xvector_matches_reference(models, seconds):
    theirs, ours = models
    wav = signal(int(seconds * SR), seed=7).unsqueeze(0)  # [1, N], as S3Gen.embed_ref passes it
    with torch.no_grad():
        expected = theirs.inference(wav)
    got = ours.inference(wav)
    assert got.shape == expected.shape == (1, 192)
    assert expected.std() > 1e-2, "degenerate reference output: the randomisation is too weak"
    err = rel_err(got, expected)
    print(f"x-vector {seconds}s: rel err {err:.3e}")
    assert err <= XVEC_RTOL


def test_padded_batch_matches_reference(models):
    """Unequal lengths: the reference zero-pads the features without a mask; we keep that."""
    theirs, ours = models
    wavs = [signal(int(1.0 * SR), seed=3), signal(int(3.3 * SR) + 77, seed=4)]
    with torch.no_grad():
        expected = theirs.inference(wavs)
    got = ours.inference(wavs)
    err = rel_err(got, expected)
    print(f"padded batch: rel err {err:.3e}")
    assert err <= XVEC_RTOL
