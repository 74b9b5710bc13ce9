"""Unit tests of chatterbox_rt.watermark (no perth import; the weights come from its installed files)."""
import importlib.util
import types

import numpy as np
import pytest
import torch

from chatterbox_rt import watermark
from chatterbox_rt.watermark import (
    PerthConfig,
    Watermarker,
    WatermarkUnavailable,
    find_pretrained_dir,
    parse_hparams,
)

SR = 24000
N = 2 * SR + 17  # not a multiple of the hop at either rate

# resemble-perth 1.0.1's perth_net/pretrained/implicit/hparams.yaml, verbatim
PERTH_HPARAMS = """\
batch_size: 16
hidden_size: 256
hop_size: 320
loss_type: psychoacoustic
max_lr: 0.0001
max_wmark_freq: 2000
min_lr: 1.0e-05
n_fft: 2048
sample_rate: 32000
stft_magnitude_min: 1.0e-09
use_lr_scheduler: false
use_wandb: true
window_fn: hann
window_size: 2048
"""


@pytest.fixture(scope="module")
def wm():
    try:
        return watermark.get_watermarker("cpu")
    except WatermarkUnavailable as e:
        pytest.skip(str(e))


def speech_like(n, sr, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    phase = 2 * np.pi * np.cumsum(130 + 25 * np.sin(2 * np.pi * 0.9 * t)) / sr
    x = sum(0.5 / k * np.sin(k * phase) for k in range(1, 10))
    envelope = np.clip(np.sin(2 * np.pi * 1.7 * t), 0, None)
    return (0.3 * x * envelope + 0.003 * rng.standard_normal(n)).astype(np.float32)


# ---- hparams ------------------------------------------------------------------------------------
def test_parse_hparams_perth_file():
    hp = parse_hparams(PERTH_HPARAMS)
    assert hp["sample_rate"] == 32000 and type(hp["sample_rate"]) is int
    assert hp["stft_magnitude_min"] == 1e-9 and type(hp["stft_magnitude_min"]) is float
    assert hp["min_lr"] == 1e-5 and hp["max_lr"] == 1e-4
    assert hp["use_wandb"] is True and hp["use_lr_scheduler"] is False
    assert hp["window_fn"] == "hann" and hp["loss_type"] == "psychoacoustic"
    assert len(hp) == 14
    cfg = PerthConfig.from_hparams(hp)
    assert (cfg.n_fft, cfg.hop_size, cfg.window_size, cfg.hidden_size) == (2048, 320, 2048, 256)
    assert cfg.subband == 128  # round(1025 * 2000 / 16000)


def test_parse_hparams_scalars_and_comments():
    hp = parse_hparams("# comment\n\na: 'x: y'\nb: \"q\"\nc: null\nd: -3\ne: 2.5  # trailing\nf: True\n")
    assert hp == {"a": "x: y", "b": "q", "c": None, "d": -3, "e": 2.5, "f": True}


@pytest.mark.parametrize("text", ["a:\n  b: 1\n", "- 1\n", "a: [1, 2]\n", "a: {b: 1}\n", "just text\n", "a: |\n"])
def test_parse_hparams_rejects_non_flat(text):
    with pytest.raises(ValueError):
        parse_hparams(text)


def test_config_from_hparams_missing_key():
    hp = parse_hparams(PERTH_HPARAMS)
    del hp["hop_size"]
    with pytest.raises(ValueError, match="hop_size"):
        PerthConfig.from_hparams(hp)


# ---- locating the weights -----------------------------------------------------------------------
def test_missing_package_raises(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WatermarkUnavailable) as e:
        Watermarker.from_package()
    msg = str(e.value)
    assert "pip install resemble-perth" in msg and "--no-watermark" in msg and "watermark=False" in msg
    assert isinstance(e.value, RuntimeError)


def test_unknown_package_name_raises():
    with pytest.raises(WatermarkUnavailable, match="not installed"):
        find_pretrained_dir("no_such_package_chatterbox_rt_test")


def test_package_without_weights_raises(monkeypatch, tmp_path):
    (tmp_path / "perth_net" / "pretrained" / "implicit").mkdir(parents=True)
    (tmp_path / "perth_net" / "pretrained" / "implicit" / "hparams.yaml").write_text(PERTH_HPARAMS)
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(WatermarkUnavailable, match="perth_net_<step>.pth.tar"):
        find_pretrained_dir()


def test_corrupt_checkpoint_raises(tmp_path):
    (tmp_path / "hparams.yaml").write_text(PERTH_HPARAMS)
    (tmp_path / "perth_net_250000.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(WatermarkUnavailable, match="cannot read"):
        Watermarker.from_dir(tmp_path)


def test_finds_installed_weights_without_importing_perth():
    import sys

    try:
        d = find_pretrained_dir()
    except WatermarkUnavailable as e:
        pytest.skip(str(e))
    assert (d / "hparams.yaml").is_file() and any(d.glob("perth_net_*.pth.tar"))
    if "perth" not in sys.modules:  # another test module may have imported it already
        watermark.get_watermarker("cpu")
        assert "perth" not in sys.modules


# ---- apply / detect -----------------------------------------------------------------------------
def test_numpy_round_trip(wm):
    x = speech_like(N, SR)
    y = wm.apply(x, SR)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.ndim == 1
    # 32 kHz length truncated to a multiple of the 320-sample hop, then resampled back
    n32 = int(np.ceil(N * 32000 / SR)) // 320 * 320
    assert y.shape == (int(np.ceil(n32 * SR / 32000)),)
    y64 = wm.apply(x.astype(np.float64), SR)
    assert y64.dtype == np.float64 and np.array_equal(y64.astype(np.float32), y)


def test_tensor_round_trip(wm):
    x = speech_like(N, SR)
    y = wm.apply(torch.from_numpy(x)[None], SR)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.ndim == 2 and y.shape[0] == 1
    assert torch.equal(y[0], torch.from_numpy(wm.apply(x, SR)))
    y1 = wm.apply(torch.from_numpy(x), SR)
    assert y1.ndim == 1 and torch.equal(y1, y[0])


def test_apply_twice_keeps_length(wm):
    y1 = wm.apply(speech_like(N, SR), SR)
    y2 = wm.apply(y1, SR)
    assert y2.shape == y1.shape


def test_watermark_is_small_and_detected(wm):
    x = speech_like(N, SR)
    y = wm.apply(x, SR)
    snr_db = 10 * np.log10(np.sum(x[:len(y)] ** 2) / np.sum((x[:len(y)] - y) ** 2))
    assert snr_db > 10, snr_db  # observed 13.8 dB, identical to perth
    marked, clean = wm.detect(y, SR), wm.detect(x, SR)
    print(f"confidence: watermarked {marked:.4f}, clean {clean:.4f}, SNR {snr_db:.1f} dB")
    assert marked > 0.9 and clean < 0.5
    assert wm.detect(torch.from_numpy(y)[None], SR) == marked


def test_rejects_multichannel(wm):
    with pytest.raises(ValueError, match="mono"):
        wm.apply(np.zeros((2, SR), np.float32), SR)
    with pytest.raises(ValueError, match="mono"):
        wm.detect(np.zeros((2, SR), np.float32), SR)


def test_rejects_too_short(wm):
    with pytest.raises(ValueError, match="more than 1024 samples"):
        wm.apply(np.zeros(700, np.float32), SR)  # 934 samples at 32 kHz


def test_get_watermarker_is_cached(wm):
    assert watermark.get_watermarker("cpu") is wm
    assert watermark.get_watermarker(torch.device("cpu")) is wm


def test_output_too_short_to_watermark_is_returned_unchanged(wm, caplog):
    """PerthNet needs more than n_fft/2 = 1024 samples at 32 kHz: 768 at 24 kHz is the last too-short length."""
    assert not wm.can_apply(768, 24000) and wm.can_apply(769, 24000) and not wm.can_apply(0, 24000)
    short = torch.randn(1, 768, generator=torch.Generator().manual_seed(0)) * 0.1
    with caplog.at_level("WARNING"):
        assert watermark.watermark_output(short, 24000) is short
    assert "too short to watermark" in caplog.text
    longer = torch.randn(1, 769, generator=torch.Generator().manual_seed(0)) * 0.1
    out = watermark.watermark_output(longer, 24000)  # the shortest that works goes through PerthNet
    assert out.shape[0] == 1 and not torch.equal(out[..., : out.shape[-1]], longer[..., : out.shape[-1]])
