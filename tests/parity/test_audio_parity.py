"""Parity of chatterbox_rt.audio and chatterbox_rt.models.s3gen.mel with what the reference uses:
``librosa.load`` / ``librosa.resample`` (soxr_hq), ``torchaudio`` sinc resampling, and the
reference's ``chatterbox.models.s3gen.utils.mel.mel_spectrogram``, on real speech (eSpeak clips in
tests/data, see scripts/make_test_clips.py).

All of these are bit-exact on CPU (measured max abs difference 0.0); the tolerances below only
leave room for other BLAS / FFT builds.
"""
import math
import pathlib

import numpy as np
import pytest
import torch

from _assert import assert_close
from chatterbox_rt.audio import load_audio, resample, sinc_resample
from chatterbox_rt.models.s3gen import mel_spectrogram, prompt_mel

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
CLIPS = ["speech_en_6s.wav", "speech_en_3s.wav", "speech_stereo_44k.wav"]
LOAD_RATES = [None, 16000, 24000]
SINC_RATES = [(24000, 16000), (16000, 24000), (44100, 16000), (22050, 24000)]
# 44100 -> 16000 on 200101 samples: 160 * 200101 / 441 = 72599.0023, which torchaudio rounds to
# float32 (72599.0) before its ceil, so it returns 72599 samples, not 72600.
SINC_FLOAT32_LENGTH_CASE = (44100, 16000, 200101)
ATOL_RESAMPLE = 1e-6
ATOL_LOG_MEL = 1e-4


@pytest.fixture(scope="module")
def librosa(ref):
    import librosa

    return librosa


@pytest.fixture(scope="module")
def torchaudio(ref):
    import torchaudio

    return torchaudio


@pytest.fixture(scope="module")
def speech_24k(librosa):
    wav, _ = librosa.load(DATA / "speech_en_6s.wav", sr=24000)
    return torch.from_numpy(wav)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("sr", LOAD_RATES)
def test_load_audio_matches_librosa_load(librosa, clip, sr):
    want, want_sr = librosa.load(DATA / clip, sr=sr)
    got, got_sr = load_audio(DATA / clip, target_sr=sr)
    assert got_sr == want_sr and got.dtype == want.dtype
    assert_close(f"load {clip} sr={sr}", got, want, rtol=0, atol=0)


@pytest.mark.parametrize("orig,target", [(24000, 16000), (16000, 24000), (22050, 24000)])
def test_resample_matches_librosa_resample(librosa, speech_24k, orig, target):
    x = speech_24k.numpy()
    want = librosa.resample(x, orig_sr=orig, target_sr=target)
    assert_close(f"resample {orig}->{target}", resample(x, orig, target), want, rtol=0, atol=0)


@pytest.mark.parametrize("orig,new", SINC_RATES)
def test_sinc_resample_matches_torchaudio(torchaudio, speech_24k, orig, new):
    x = speech_24k[:48013]  # not a multiple of any period
    batch = torch.stack([x, -0.5 * x.flip(0)])  # [2, N]
    # transforms.Resample (the reference's S3Gen) builds its kernel in float64 -> the default mode.
    want = torchaudio.transforms.Resample(orig, new)(batch)
    assert_close(f"transform {orig}->{new} batch", sinc_resample(batch, orig, new), want, 0, ATOL_RESAMPLE)
    assert_close(f"transform {orig}->{new} 1-D", sinc_resample(x, orig, new), want[0], 0, ATOL_RESAMPLE)
    # functional.resample builds it in the waveform's dtype -> as_functional=True.
    want_f = torchaudio.functional.resample(batch, orig, new)
    assert_close(f"functional {orig}->{new}", sinc_resample(batch, orig, new, as_functional=True), want_f,
                 0, ATOL_RESAMPLE)
    want_f64 = torchaudio.functional.resample(x.double(), orig, new)
    got_f64 = sinc_resample(x.double(), orig, new, as_functional=True)
    assert got_f64.dtype == torch.float64
    assert_close(f"functional f64 {orig}->{new}", got_f64, want_f64, 0, 1e-12)


def test_sinc_resample_length_rounds_like_torchaudio(torchaudio):
    orig, new, n = SINC_FLOAT32_LENGTH_CASE
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    want = torchaudio.functional.resample(x, orig, new)
    got = sinc_resample(x, orig, new, as_functional=True)
    assert got.shape == want.shape == (math.ceil(new * n / orig) - 1,)
    assert_close("long 44100->16000", got, want, 0, ATOL_RESAMPLE)


def test_mel_matches_reference(ref, speech_24k):
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram as ref_mel

    want = ref_mel(speech_24k)
    got = mel_spectrogram(speech_24k)
    assert got.shape == want.shape == (1, 80, len(speech_24k) // 480)
    assert_close("log-mel 6 s", got, want, rtol=0, atol=ATOL_LOG_MEL)
    assert_close("prompt mel", prompt_mel(speech_24k), want.transpose(1, 2), rtol=0, atol=ATOL_LOG_MEL)


def test_mel_batch_matches_reference(ref, speech_24k):
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram as ref_mel

    wav3, _ = load_audio(DATA / "speech_en_3s.wav", target_sr=24000)
    n = 24000 * 3 + 317  # not a multiple of the hop
    batch = torch.stack([speech_24k[:n], torch.from_numpy(wav3[:n])])
    want = ref_mel(batch)
    assert_close("log-mel batch of 2", mel_spectrogram(batch), want, rtol=0, atol=ATOL_LOG_MEL)


def test_mel_basis_matches_librosa(librosa):
    from chatterbox_rt.models.s3gen import slaney_mel_basis

    want = librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000)
    np.testing.assert_array_equal(slaney_mel_basis(24000, 1920, 80, 0, 8000), want)
