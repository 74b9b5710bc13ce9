"""HiFT vocoder unit tests: batching with lengths, shapes, clamp, window, trim-fade, strict loading."""
import math

import pytest
import torch

from chatterbox_rt.models.s3gen import HiFTConfig, HiFTGenerator, fold_weight_norm, hann_window, trim_fade

CFG = HiFTConfig()
# Mel lengths of one batch: odd sizes, the longest first and last-but-one, one very short.
BATCH_LENGTHS = [23, 9, 17]
# float32 CPU conv/GEMM kernels round differently with batch size and length (the same
# request three times in one batch already differs by ~1e-5 of the peak, and the NSF phase
# accumulator turns tiny F0 differences into growing phase offsets), so fp32 batching is
# checked to this fraction of the peak; float64 checks that nothing leaks across the padding.
FP32_BATCH_RTOL = 1e-3
FP64_BATCH_ATOL = 1e-7  # the NSF phase is always accumulated in float32, as in the reference


def random_model(seed=1, dtype=torch.float32):
    """Seeded weights at magnitudes that give an unclipped waveform with voiced and unvoiced F0."""
    model = HiFTGenerator().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.8 / p[0].numel() ** 0.5)
        model.f0_predictor.classifier.weight.mul_(400.0)
        model.conv_post.bias[: CFG.n_freq] -= 2.0
    return model.to(dtype)


@pytest.fixture(scope="module")
def model():
    return random_model()


def padded_batch(lengths, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mels = [(torch.randn(1, CFG.in_channels, n, generator=g) * 2 - 5).to(dtype) for n in lengths]
    batch = torch.zeros(len(lengths), CFG.in_channels, max(lengths), dtype=dtype)
    for b, m in enumerate(mels):
        batch[b, :, : m.shape[-1]] = m
    return mels, batch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_lengths_equal_single_runs(dtype):
    model = random_model(dtype=dtype)
    mels, batch = padded_batch(BATCH_LENGTHS, dtype=dtype)
    with torch.no_grad():
        wav = model(batch, torch.tensor(BATCH_LENGTHS), noise_free=True)
        assert wav.shape == (len(BATCH_LENGTHS), max(BATCH_LENGTHS) * CFG.samples_per_frame)
        for b, mel in enumerate(mels):
            single = model(mel, noise_free=True)[0]
            n = BATCH_LENGTHS[b] * CFG.samples_per_frame
            err = (wav[b, :n] - single).abs().max().item()
            bound = FP64_BATCH_ATOL if dtype == torch.float64 else FP32_BATCH_RTOL * single.abs().max().item()
            assert err <= bound, f"request {b} (T={BATCH_LENGTHS[b]}): max abs error {err:.3g} > {bound:.3g}"
            assert (wav[b, n:] == 0).all(), f"request {b}: samples past its length are not zero"


def test_lengths_path_equals_plain_path(model):
    """The masked path (per-request reflect padding, hand-written iSTFT) at full length equals
    the plain torch.stft/torch.istft path."""
    mel = padded_batch([31])[1]
    with torch.no_grad():
        plain = model(mel, noise_free=True)
        masked = model(mel, torch.tensor([31]), noise_free=True)
    assert (plain - masked).abs().max().item() <= 1e-6


@pytest.mark.parametrize("T", [1, 5, 12])
def test_output_length(model, T):
    with torch.no_grad():
        wav = model(padded_batch([T])[1], noise_free=True)
    assert wav.shape == (1, T * CFG.samples_per_frame)


def test_clamp_bound():
    model = random_model()
    with torch.no_grad():
        model.conv_post.bias[: CFG.n_freq] += 8.0  # huge magnitudes: the output must saturate
        wav = model(padded_batch([6])[1], noise_free=True)
    limit = torch.tensor(CFG.audio_limit, dtype=wav.dtype)  # 0.99 rounded to float32
    assert wav.abs().max() <= limit
    assert wav.abs().max() == limit


def test_noise_is_seeded_and_optional(model):
    mel = padded_batch([4])[1]
    with torch.no_grad():
        a = model(mel, generator=torch.Generator().manual_seed(5))
        b = model(mel, generator=torch.Generator().manual_seed(5))
        quiet = model(mel, noise_free=True)
    assert torch.equal(a, b) and not torch.equal(a, quiet)


def test_per_row_generators_draw_what_each_row_draws_alone(model):
    """An engine's batch: each row's source noise from its own generator, as its solo run draws it."""
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    mels, batch = padded_batch(BATCH_LENGTHS)
    with torch.no_grad():
        one = model(mels[0], generator=gens(11)[0])
        assert torch.equal(model(mels[0], generator=gens(11)), one)  # a list of one: the same draws
        seeds = list(range(20, 20 + len(mels)))
        wav = model(batch, torch.tensor(BATCH_LENGTHS), generator=gens(*seeds))
        for b, (mel, seed) in enumerate(zip(mels, seeds, strict=True)):
            single = model(mel, generator=gens(seed)[0])[0]
            n = BATCH_LENGTHS[b] * CFG.samples_per_frame
            err = (wav[b, :n] - single).abs().max().item()
            assert err <= FP32_BATCH_RTOL * single.abs().max().item(), (b, err)
        with pytest.raises(ValueError, match="generators for a batch"):
            model(batch, torch.tensor(BATCH_LENGTHS), generator=gens(1))


def test_hann_window_matches_float64_formula():
    n = torch.arange(CFG.n_fft, dtype=torch.float64)
    formula = 0.5 - 0.5 * torch.cos(2 * math.pi * n / CFG.n_fft)  # periodic Hann (scipy fftbins=True)
    assert torch.equal(hann_window(CFG.n_fft), formula.float())
    assert torch.allclose(hann_window(CFG.n_fft, torch.float64), formula, rtol=0, atol=1e-15)
    try:
        from scipy.signal import get_window
    except ImportError:
        return
    scipy_win = torch.from_numpy(get_window("hann", CFG.n_fft, fftbins=True))
    assert torch.equal(hann_window(CFG.n_fft), scipy_win.float())


def test_trim_fade_shape():
    wav = torch.ones(2, 2000)
    out = trim_fade(wav)
    n_trim = CFG.sampling_rate // 50
    assert (out[:, :n_trim] == 0).all() and (out[:, 2 * n_trim:] == 1).all()
    assert (out[:, n_trim:2 * n_trim].diff(dim=-1) >= 0).all()
    assert torch.equal(trim_fade(torch.ones(1, 100)), torch.zeros(1, 100))  # shorter than 20 ms


def _as_weight_norm(sd, style):
    """Split every conv weight into a weight-norm pair (g = row norms over all dims but 0)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 3:
            g = v.norm(dim=(1, 2), keepdim=True)
            base = k[: -len("weight")]
            names = ("weight_g", "weight_v") if style == "old" else (
                "parametrizations.weight.original0", "parametrizations.weight.original1")
            out[base + names[0]], out[base + names[1]] = g, v * 3.0  # v's scale must not matter
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("style", ["old", "new"])
def test_load_weight_norm_styles(model, style):
    sd = _as_weight_norm(model.state_dict(), style)
    fresh = HiFTGenerator()
    fresh.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_fold_weight_norm_transposed_conv_is_per_input_channel():
    v = torch.randn(4, 3, 5)  # ConvTranspose1d weight [in, out, k]
    g = torch.rand(4, 1, 1)
    w = fold_weight_norm({"x.weight_g": g, "x.weight_v": v})["x.weight"]
    torch.testing.assert_close(w.norm(dim=(1, 2)), g.flatten())


def test_strict_load_errors(model):
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "conv_post.bias"}
    with pytest.raises(RuntimeError, match="conv_post.bias"):
        HiFTGenerator().load_state_dict(missing, strict=True)
    # half a weight-norm pair is neither folded nor silently accepted
    half = _as_weight_norm(sd, "old")
    del half["conv_pre.weight_v"]
    with pytest.raises(RuntimeError, match="conv_pre"):
        HiFTGenerator().load_state_dict(half, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected"):
        HiFTGenerator().load_state_dict(dict(sd, **{"ups.9.weight": torch.zeros(1)}), strict=True)
