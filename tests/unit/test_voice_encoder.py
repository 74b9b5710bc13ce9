"""Unit tests of chatterbox_rt.models.voice_encoder (no reference needed)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from chatterbox_rt.models.voice_encoder import (
    VoiceEncoder,
    VoiceEncoderConfig,
    get_frame_step,
    get_num_wins,
    melspectrogram,
    resample,
    stride_as_partials,
    trim_silence,
)

SR = 16000
CFG = VoiceEncoderConfig()

# (n_frames, step, min_coverage) -> (n_wins, target_len), by hand with 160-frame windows:
# n_wins, rem = divmod(max(n - 160 + step, 0), step); +1 if n_wins == 0 or (rem + 160 - step) / 160 >= cov.
NUM_WINS_CASES = [
    (1, 77, 0.8, (1, 160)),
    (100, 77, 0.8, (1, 160)),
    (160, 77, 0.8, (1, 160)),  # divmod(77, 77) = (1, 0); 83/160 < 0.8
    (237, 77, 0.8, (2, 237)),  # (2, 0)
    (280, 77, 0.8, (2, 237)),  # (2, 43): 126/160 = 0.7875 < 0.8 -> last window dropped, mel trimmed
    (290, 77, 0.8, (3, 314)),  # (2, 53): 136/160 = 0.85 -> extra window, mel zero-padded
    (300, 80, 0.8, (3, 320)),  # (2, 60): 140/160 = 0.875
    (300, 80, 0.9, (2, 240)),
    (161, 160, 0.8, (1, 160)),  # step == window: (1, 1): 1/160
]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VoiceEncoder(CFG).eval()


def tone(seconds, sr=SR, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1750 * t)
            + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def test_frame_step():
    assert get_frame_step(0.5, None, CFG) == 80
    assert get_frame_step(0.5, 1.3, CFG) == 77  # round((16000 / 1.3) / 160): the reference's formula
    with pytest.raises(AssertionError):
        get_frame_step(1.0, None, CFG)


@pytest.mark.parametrize("n_frames, step, cov, expected", NUM_WINS_CASES)
def test_num_wins(n_frames, step, cov, expected):
    assert get_num_wins(n_frames, step, cov, CFG) == expected


def test_stride_as_partials_layout():
    mel = np.arange(290 * CFG.num_mels, dtype=np.float32).reshape(290, CFG.num_mels)
    parts = stride_as_partials(mel, CFG, rate=1.3)
    assert parts.shape == (3, CFG.ve_partial_frames, CFG.num_mels)
    np.testing.assert_array_equal(parts[1, 0], mel[77])
    np.testing.assert_array_equal(parts[2, 160 - 77 - 1], mel[2 * 77 + 82])
    assert (parts[2, -(314 - 290):] == 0).all()  # zero padding


@pytest.mark.parametrize("n_samples", [201, 16000, 16001, 16159, 33333])
def test_melspectrogram_shape(n_samples):
    mel = melspectrogram(tone(n_samples / SR)[:n_samples], CFG)
    assert mel.shape == (CFG.num_mels, 1 + n_samples // CFG.hop_size)
    assert mel.dtype == torch.float32 and (mel >= 0).all()


def test_trim_silence():
    x = np.concatenate([np.zeros(5000, np.float32), tone(1.0), np.zeros(7000, np.float32)])
    y, (start, end) = trim_silence(x, 20)
    assert start % CFG.trim_hop_length == 0 and 0 < start <= 5000 and 5000 + SR <= end < len(x)
    np.testing.assert_array_equal(y, x[start:end])
    assert trim_silence(np.zeros(4000, np.float32), 20)[1] == (0, 4000)  # constant: nothing is below max


def test_forward_and_inference_shapes_and_norms(encoder):
    wavs = [tone(2.0, seed=1), tone(7.0, seed=2), tone(0.3, seed=3)]
    embeds = encoder.embeds_from_wavs(wavs, SR)
    assert embeds.shape == (3, CFG.speaker_embed_size) and embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)
    spk = encoder.embeds_from_wavs(wavs, SR, as_spk=True)
    assert spk.shape == (CFG.speaker_embed_size,)
    np.testing.assert_allclose(np.linalg.norm(spk), 1.0, atol=1e-5)
    np.testing.assert_allclose(spk, VoiceEncoder.utt_to_spk_embed(embeds), atol=1e-6)
    partials = torch.rand(5, CFG.ve_partial_frames, CFG.num_mels)
    with torch.inference_mode():
        out = encoder(partials)
    assert out.shape == (5, CFG.speaker_embed_size)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    # Tensor / float64 input is accepted (taken as float32).
    np.testing.assert_allclose(encoder.embeds_from_wavs([torch.from_numpy(wavs[0]).double()], SR), embeds[:1],
                               atol=1e-6)


def test_state_dict_keys_and_strict_load():
    ve = VoiceEncoder(CFG)
    sd = ve.state_dict()
    assert set(sd) == {*(f"lstm.{k}_l{i}" for i in range(3) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
                       "proj.weight", "proj.bias", "similarity_weight", "similarity_bias"}
    assert sd["lstm.weight_ih_l0"].shape == (4 * 256, 40) and sd["lstm.weight_ih_l1"].shape == (4 * 256, 256)
    del sd["proj.bias"]
    with pytest.raises(RuntimeError, match="proj.bias"):
        VoiceEncoder(CFG).load_state_dict(sd, strict=True)


def test_resample_without_soxr_raises(monkeypatch, encoder):
    monkeypatch.setitem(sys.modules, "soxr", None)  # makes `import soxr` raise ImportError
    with pytest.raises(ImportError, match="soxr"):
        encoder.embeds_from_wavs([tone(1.0, sr=24000)], 24000)


def test_resample_with_soxr(encoder):
    pytest.importorskip("soxr")
    x = tone(2.0, sr=24000)
    y = resample(x, 24000, SR)
    assert y.dtype == np.float32 and abs(len(y) - 2 * SR) <= 1
    np.testing.assert_allclose(encoder.embeds_from_wavs([x], 24000), encoder.embeds_from_wavs([y], SR), atol=1e-6)


def test_no_heavy_runtime_imports():
    code = ("import sys, chatterbox_rt.models.voice_encoder; "
            "print(sorted(m for m in ('librosa', 'scipy', 'torchaudio', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
