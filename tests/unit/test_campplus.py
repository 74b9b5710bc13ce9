"""Unit tests of chatterbox_rt.models.campplus (no reference needed)."""
import subprocess
import sys

import pytest
import torch
from chatterbox_rt.models.campplus import (
    CAMPPlus,
    CAMPPlusConfig,
    extract_features,
    frame_geometry,
    kaldi_fbank,
    kaldi_mel_banks,
    num_frames,
)

SR = 16000
CFG = CAMPPlusConfig()
# (samples, frames) by hand with snip_edges: 1 + (N - 400) // 160, 0 below one window.
FRAME_CASES = [(399, 0), (400, 1), (401, 1), (559, 1), (560, 2), (16000, 98), (16001, 98), (52800, 328)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """Moderate-scale random weights and BatchNorm statistics: torch's default init with unit BN
    statistics shrinks activations through the 52 dense layers to ~1e-5 (and into slow denormals)."""
    g = torch.Generator().manual_seed(0)
    m = CAMPPlus(CFG)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return m.eval()


def noise(n, seed=0):
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_config():
    assert CFG.fcm_out_channels == 320 and CFG.bn_channels == 128
    assert frame_geometry(SR) == (400, 160, 512)


@pytest.mark.parametrize("n, frames", FRAME_CASES)
def test_frame_count(n, frames):
    assert num_frames(n) == frames
    if frames == 0:
        with pytest.raises(ValueError, match="shorter than one 400-sample frame"):
            kaldi_fbank(noise(n))
    else:
        assert kaldi_fbank(noise(n)).shape == (frames, 80)


def test_mel_banks():
    banks = kaldi_mel_banks()
    assert banks.shape == (257, 80)
    assert (banks >= 0).all() and (banks <= 1).all()
    assert (banks[-1] == 0).all()  # Nyquist bin has no weight
    assert (banks[0] == 0).all()  # DC is below low_freq = 20 Hz; bin 1 (31.25 Hz) is already in band 0
    assert (banks.sum(0) > 0).all()  # no empty band


def test_fbank_batched_equals_single():
    wavs = torch.stack([noise(5003, 1), noise(5003, 2)])
    batch = kaldi_fbank(wavs)
    assert batch.shape == (2, num_frames(5003), 80)
    for i in range(2):
        torch.testing.assert_close(batch[i], kaldi_fbank(wavs[i]), atol=1e-5, rtol=0)


def test_features_mean_normalised_and_padded():
    feats, lens = extract_features([noise(4000, 1), noise(9000, 2)])
    assert lens == [num_frames(4000), num_frames(9000)]
    assert feats.shape == (2, lens[1], 80)
    assert feats[0, : lens[0]].mean(0).abs().max() < 1e-4
    assert (feats[0, lens[0]:] == 0).all()  # zero padding, as the reference's pad_list


def test_state_dict_layout(model):
    sd = model.state_dict()
    assert len(sd) == 937
    assert sd["head.layer1.0.shortcut.0.weight"].shape == (32, 32, 1, 1)
    assert sd["xvector.tdnn.linear.weight"].shape == (128, 320, 5)
    assert sd["xvector.block3.tdnnd16.cam_layer.linear_local.weight"].shape == (32, 128, 3)
    assert sd["xvector.transit3.linear.weight"].shape == (512, 1024, 1)
    assert sd["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.running_var" in sd
    assert "xvector.dense.nonlinear.batchnorm.weight" not in sd  # affine-free BatchNorm
    assert sum(p.numel() for p in model.parameters()) == 6848544


def test_strict_load_names_missing_key(model):
    sd = dict(model.state_dict())
    del sd["xvector.block2.tdnnd7.cam_layer.linear1.bias"]
    with pytest.raises(RuntimeError, match=r"xvector\.block2\.tdnnd7\.cam_layer\.linear1\.bias"):
        CAMPPlus(CFG).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("n", [8000, 16000 + 123])
def test_inference_shape(model, n):
    out = model.inference(noise(n).unsqueeze(0))
    assert out.shape == (1, 192) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.std() > 1e-2


def test_batch_equal_lengths_equals_single(model):
    wavs = torch.stack([noise(12345, 1), noise(12345, 2), noise(12345, 3)])
    batch = model.inference(wavs)
    single = torch.cat([model.inference(w[None]) for w in wavs])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.inference(list(wavs)), batch, atol=1e-5, rtol=1e-4)


def test_batch_unequal_lengths_is_padded_without_mask(model):
    """Reference quirk: a short utterance batched with a longer one is embedded over zero padding."""
    short, long = noise(8000, 1), noise(20000, 2)
    batch = model.inference([short, long])
    torch.testing.assert_close(batch[1], model.inference([long])[0], atol=1e-5, rtol=1e-4)
    alone = model.inference([short])[0]
    assert (batch[0] - alone).norm() > 1e-2 * alone.norm()
    feats, _ = extract_features([short, long])
    torch.testing.assert_close(batch, model(feats), atol=1e-5, rtol=1e-4)


def test_no_heavy_imports():
    code = ("import sys, chatterbox_rt.models.campplus; "
            "bad = [m for m in ('torchaudio', 'librosa', 'scipy', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
