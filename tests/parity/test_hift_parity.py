"""HiFT vocoder parity with the reference (chatterbox-tts 0.1.7 ``HiFTGenerator.inference``).

The reference is built exactly as ``S3Token2Wav`` builds ``mel2wav``, its weight-normed
parameters re-randomised from a seed at magnitudes that keep the waveform unclipped and F0
on both sides of the voiced threshold, then loaded into ours with ``strict=True``. The
reference's random draws (initial phases, additive noise) are patched to zeros, which is what
``noise_free=True`` means; a second test seeds both sides identically instead.
"""
import pytest
import torch

from _s3gen_pairs import rerandomise_hift_ as rerandomise_
from chatterbox_rt.models.s3gen import HiFTGenerator, trim_fade

MEL_LENGTHS = [37, 64]
WAV_RTOL = 1e-3  # max abs error relative to the reference's peak
SEED = 1234


def report(a, b, what):
    diff = (a - b).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return (f"{what}: max abs error {diff.max().item():.3g} at {idx} (ours {a[idx].item():.6g}, "
            f"ref {b[idx].item():.6g}; ref peak {b.abs().max().item():.4g})")


def assert_close_rel(ours, ref, what, rtol=WAV_RTOL):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), report(ours, ref, what)


def build_reference(ref):
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.hifigan import HiFTGenerator as RefHiFT

    return RefHiFT(sampling_rate=24000, upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
                   source_resblock_kernel_sizes=[7, 7, 11],
                   source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                   f0_predictor=ConvRNNF0Predictor())


@pytest.fixture(scope="module")
def pair(ref):
    torch.manual_seed(0)
    ref_model = rerandomise_(build_reference(ref), SEED).eval()
    ours = HiFTGenerator().eval()
    ours.load_state_dict(ref_model.state_dict(), strict=True)
    return ref_model, ours


@pytest.fixture
def zero_noise(monkeypatch):
    """Make the reference's SineGen/SourceModuleHnNSF draws zeros (the phases come from a
    torch Uniform, the noise from torch.randn_like)."""
    from torch.distributions.uniform import Uniform

    monkeypatch.setattr(torch, "randn_like", lambda x, *a, **k: torch.zeros_like(x))
    monkeypatch.setattr(Uniform, "sample",
                        lambda self, sample_shape=(): torch.zeros(torch.Size(sample_shape) + self.low.shape))


def mel_input(T, seed):
    return torch.randn(1, 80, T, generator=torch.Generator().manual_seed(seed)) * 2 - 5


@pytest.mark.parametrize("T", MEL_LENGTHS)
def test_waveform_parity_noise_free(pair, zero_noise, T):
    ref_model, ours = pair
    mel = mel_input(T, T)
    ref_wav, ref_src = ref_model.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))
    with torch.no_grad():
        wav = ours(mel, noise_free=True)
        f0 = ours.f0_predictor(mel)
        src = ours.excitation(f0, noise_free=True)
    # the random weights must give a non-degenerate signal for the comparison to mean anything
    assert 0.01 < ref_wav.abs().max() < 0.9 and ref_wav.std() > 1e-3
    assert wav.shape == (1, T * 480)
    assert_close_rel(src, ref_src, f"source T={T}")
    assert_close_rel(wav, ref_wav, f"waveform T={T}")


@pytest.mark.parametrize("T", MEL_LENGTHS)
def test_f0_predictor_parity(pair, T):
    ref_model, ours = pair
    mel = mel_input(T, 100 + T)
    with torch.no_grad():
        ref_f0 = ref_model.f0_predictor(mel)
        f0 = ours.f0_predictor(mel)
    # both voiced (> 10 Hz) and unvoiced frames are exercised
    assert (ref_f0 > 10).any() and (ref_f0 < 150).any()
    assert_close_rel(f0, ref_f0, f"f0 T={T}", rtol=1e-5)


def test_noisy_parity_same_seed(pair):
    """With noise on, our draws follow the reference's order: a generator seeded like its global RNG
    gives the same phases and noise."""
    ref_model, ours = pair
    mel = mel_input(29, 7)
    torch.manual_seed(SEED)
    ref_wav, _ = ref_model.inference(speech_feat=mel)
    with torch.no_grad():
        wav = ours(mel, generator=torch.Generator().manual_seed(SEED))
        quiet = ours(mel, noise_free=True)
    assert (wav - quiet).abs().max() > 1e-3  # the noise is really on
    assert_close_rel(wav, ref_wav, "noisy waveform")


def _to_old_weight_norm(sd):
    out = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        out[k] = v
    return out


def test_load_old_and_folded_weight_norm_styles(pair, zero_noise):
    ref_model, ours = pair
    sd = ref_model.state_dict()
    old = _to_old_weight_norm(sd)
    assert any(k.endswith("ups.0.weight_g") for k in old)
    from_old = HiFTGenerator().eval()
    from_old.load_state_dict(old, strict=True)
    from_folded = HiFTGenerator().eval()
    from_folded.load_state_dict(ours.state_dict(), strict=True)
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(from_old.state_dict()[name], p, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(from_folded.state_dict()[name], p, rtol=0, atol=0, msg=name)
    # the folded weights are the reference's own effective weights (ConvTranspose1d included,
    # whose weight norm is per *input* channel, dim 0)
    torch.testing.assert_close(ours.ups[0].weight, ref_model.ups[0].weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.f0_predictor.condnet[2].weight, ref_model.f0_predictor.condnet[2].weight.detach(),
                               rtol=1e-6, atol=1e-7)
    # the user's dict is not modified by loading
    assert "ups.0.weight_g" in old and "ups.0.weight" not in old


@pytest.fixture(scope="module")
def s3token2wav(ref):
    from chatterbox.models.s3gen.s3gen import S3Token2Wav

    return S3Token2Wav().eval()


def test_keys_match_s3token2wav_mel2wav(s3token2wav):
    ours = HiFTGenerator()
    ref_sd = ours.state_dict()
    folded = {k.replace("parametrizations.weight.original1", "weight"): tuple(v.shape)
              for k, v in s3token2wav.mel2wav.state_dict().items() if "original0" not in k}
    assert folded == {k: tuple(v.shape) for k, v in ref_sd.items()}
    ours.load_state_dict(s3token2wav.mel2wav.state_dict(), strict=True)


def test_trim_fade_matches_reference_buffer(s3token2wav):
    wav = torch.randn(2, 3000, generator=torch.Generator().manual_seed(3))
    expected = wav.clone()
    expected[:, :len(s3token2wav.trim_fade)] *= s3token2wav.trim_fade
    torch.testing.assert_close(trim_fade(wav), expected, rtol=0, atol=0)
