"""Parity of chatterbox_rt.watermark with resemble-perth 1.0.1's PerthImplicitWatermarker.

Both load the same pretrained PerthNet weights (shipped in the perth package). ``apply`` must match
``apply_watermark`` bit for bit on CPU (same soxr resampler, same STFT/iSTFT, same op order and
memory layout); ``detect`` must match ``get_watermark`` up to float rounding, because our polyphase
resampler is numpy's convolution rather than scipy's upfirdn.

perth imports torchaudio and librosa; torchaudio is made importable on CPU as for the reference.
"""
import numpy as np
import pytest
import torch

from _assert import assert_close

# (sample_rate, n_samples): odd lengths, a length that is a multiple of the hop, and 32 kHz input
# (no resampling).
CASES = [(24000, 60001), (24000, 72000), (32000, 80123), (44100, 100003)]
DETECT_CASES = [CASES[0], CASES[2], CASES[3]]
RESAMPLE_CASES = [(24000, 32000), (32000, 24000), (44100, 32000), (22050, 32000), (16000, 32000)]
RESAMPLE_LENGTHS = [95, 1000, 48001]
ATOL_APPLY = 1e-5  # observed: 0 (bit-exact)
ATOL_CONFIDENCE = 1e-5
ATOL_POLYPHASE = 1e-6


@pytest.fixture(scope="module")
def perth():
    from _reference import _import_torchaudio_without_native_libs

    try:
        _import_torchaudio_without_native_libs()
    except ImportError as e:
        pytest.skip(f"torchaudio not importable: {e}")
    return pytest.importorskip("perth", reason="resemble-perth (reference watermarker) not installed")


@pytest.fixture(scope="module")
def ref_wm(perth):
    return perth.PerthImplicitWatermarker()


@pytest.fixture(scope="module")
def ours():
    from chatterbox_rt.watermark import Watermarker

    return Watermarker.from_package("cpu")


def speech_like(n, sr, seed=0):
    """A gliding-f0 harmonic tone with syllable-like envelope and a little noise, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(rng.uniform(0.2, 1.0) / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.1 * t), 0, None) ** 1.5 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    return (0.3 * x * envelope + 0.003 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("sr,n", CASES)
def test_apply_matches_perth(ref_wm, ours, sr, n):
    x = speech_like(n, sr, seed=n)
    want = ref_wm.apply_watermark(x, sample_rate=sr)
    got = ours.apply(x, sr)
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype
    assert_close(f"apply sr={sr} n={n}", got, want, rtol=0, atol=ATOL_APPLY)
    # the same through the tensor / [1, N] path
    got_t = ours.apply(torch.from_numpy(x)[None], sr)
    assert_close(f"apply tensor sr={sr} n={n}", got_t[0].numpy(), want, rtol=0, atol=ATOL_APPLY)


@pytest.mark.parity
@pytest.mark.parametrize("sr,n", DETECT_CASES)
def test_detect_matches_perth(ref_wm, ours, sr, n):
    clean = speech_like(n, sr, seed=n + 1)
    marked = ref_wm.apply_watermark(clean, sample_rate=sr)
    got = {}
    for name, wav in (("marked", marked), ("clean", clean)):
        want = float(ref_wm.get_watermark(wav, sr, round=False))  # round=True is np.round of this
        got[name] = ours.detect(wav, sr)
        print(f"{name} sr={sr}: confidence ours {got[name]:.7f} perth {want:.7f}")
        assert abs(got[name] - want) <= ATOL_CONFIDENCE, f"{name}: {got[name]} vs {want}"
        assert np.round(got[name]) == np.round(want)
    assert got["marked"] > 0.9 and got["clean"] < 0.5


@pytest.mark.parity
@pytest.mark.parametrize("orig_sr,target_sr", RESAMPLE_CASES)
@pytest.mark.parametrize("n", RESAMPLE_LENGTHS)
def test_resamplers_match_librosa(perth, orig_sr, target_sr, n):
    librosa = pytest.importorskip("librosa")
    from chatterbox_rt.watermark import resample_hq, resample_poly

    x = speech_like(n, orig_sr, seed=n)
    want = librosa.resample(x, orig_sr=orig_sr, target_sr=target_sr)
    got = resample_hq(x, orig_sr, target_sr)
    assert got.dtype == want.dtype and np.array_equal(got, want), "soxr HQ + fix_length must equal librosa"

    want = librosa.resample(x, orig_sr=orig_sr, target_sr=target_sr, res_type="polyphase")
    got = resample_poly(x, orig_sr, target_sr)
    assert got.dtype == want.dtype
    assert_close(f"polyphase {orig_sr}->{target_sr} n={n}", got, want, rtol=0, atol=ATOL_POLYPHASE)
