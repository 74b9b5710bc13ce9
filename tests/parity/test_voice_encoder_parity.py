"""Parity of chatterbox_rt.models.voice_encoder with the reference VoiceEncoder (chatterbox-tts 0.1.7).

The reference runs with random weights (seeded, moderate scale) loaded into ours with strict=True;
inputs are synthetic 16 kHz signals (chirp + harmonics + noise with silent margins, so that the
default 20 dB trim cuts something).
"""
import numpy as np
import pytest
import torch

from _assert import assert_close
from chatterbox_rt.models.voice_encoder import (
    VoiceEncoder,
    VoiceEncoderConfig,
    mel_filterbank,
    melspectrogram,
    stride_as_partials,
    trim_silence,
)

SR = 16000
CLIP_SECONDS = [2.0, 7.0]  # one partial-ish and several partials
TRIM_TOP_DB = [10, 20, 35, 60]
WEIGHT_SCALE = 0.15
ATOL_EMBED = 1e-5
MEL_RTOL, MEL_ATOL = 1e-4, 1e-4


def synth(seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(0.25 / k * np.sin(k * phase) for k in range(1, 6))
    chirp = 0.1 * np.sin(2 * np.pi * (200 * t + 300 * t ** 2 / seconds))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t) ** 2
    x = envelope * (voiced + chirp) + 0.01 * rng.standard_normal(len(t))
    lead, tail = 1e-4 * rng.standard_normal(2400), 1e-4 * rng.standard_normal(4100)  # near-silent margins
    return np.concatenate([lead, x, tail]).astype(np.float32)


@pytest.fixture(scope="module")
def encoders(ref):
    from chatterbox.models.voice_encoder.voice_encoder import (
        VoiceEncoder as RefVoiceEncoder,
    )
    torch.manual_seed(1234)
    ref_ve = RefVoiceEncoder().eval()
    with torch.no_grad():
        for p in ref_ve.parameters():
            p.uniform_(-WEIGHT_SCALE, WEIGHT_SCALE)
    ours = VoiceEncoder(VoiceEncoderConfig()).eval()
    ours.load_state_dict(ref_ve.state_dict(), strict=True)
    return ref_ve, ours


def test_mel_filterbank_matches_librosa(ref):
    import librosa
    c = VoiceEncoderConfig()
    want = librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.num_mels, fmin=c.fmin, fmax=c.fmax)
    got = mel_filterbank(c)
    assert got.dtype == want.dtype
    assert_close("mel filterbank", got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seconds", [0.013, 1.0, 3.37])
def test_melspectrogram_matches_reference(ref, seconds):
    from chatterbox.models.voice_encoder.config import VoiceEncConfig
    from chatterbox.models.voice_encoder.melspec import (
        melspectrogram as ref_melspectrogram,
    )
    wav = synth(seconds, seed=1)
    want = ref_melspectrogram(wav, VoiceEncConfig())
    got = melspectrogram(wav, VoiceEncoderConfig())
    assert got.dtype == torch.float32
    assert_close(f"melspectrogram {seconds}s", got.numpy(), want, rtol=MEL_RTOL, atol=MEL_ATOL)


@pytest.mark.parametrize("top_db", TRIM_TOP_DB)
def test_trim_matches_librosa(ref, top_db):
    import librosa
    wav = synth(1.5, seed=2)
    want, want_idx = librosa.effects.trim(wav, top_db=top_db)
    got, got_idx = trim_silence(wav, top_db)
    assert tuple(int(i) for i in want_idx) == got_idx
    np.testing.assert_array_equal(got, want)


def test_partial_embeddings_match_reference(ref, encoders):
    from chatterbox.models.voice_encoder.config import VoiceEncConfig
    from chatterbox.models.voice_encoder.melspec import (
        melspectrogram as ref_melspectrogram,
    )
    from chatterbox.models.voice_encoder.voice_encoder import (
        stride_as_partials as ref_stride,
    )
    ref_ve, ours = encoders
    mel = ref_melspectrogram(synth(7.0, seed=3), VoiceEncConfig()).T
    want_partials = ref_stride(mel, VoiceEncConfig(), rate=1.3)
    got_partials = stride_as_partials(mel, VoiceEncoderConfig(), rate=1.3)
    np.testing.assert_array_equal(got_partials, want_partials)
    assert len(want_partials) > 3
    x = torch.from_numpy(np.ascontiguousarray(want_partials))
    with torch.inference_mode():
        want, got = ref_ve(x), ours(x)
    assert_close("partial embeddings", got.numpy(), want.numpy(), rtol=0, atol=ATOL_EMBED)


@pytest.mark.parametrize("kwargs", [{}, {"batch_size": 3}, {"rate": None, "overlap": 0.25}, {"trim_top_db": None},
                                    {"as_spk": True}])
def test_embeds_from_wavs_matches_reference(ref, encoders, kwargs):
    ref_ve, ours = encoders
    wavs = [synth(s, seed=10 + i) for i, s in enumerate(CLIP_SECONDS)]
    want = ref_ve.embeds_from_wavs(wavs, SR, **kwargs)
    got = ours.embeds_from_wavs(wavs, SR, **kwargs)
    assert got.dtype == want.dtype
    assert_close(f"embeds_from_wavs {kwargs}", got, want, rtol=0, atol=ATOL_EMBED)
    for w in wavs:  # one at a time too (different padding/batching)
        assert_close("embeds_from_wavs single", ours.embeds_from_wavs([w], SR, **kwargs),
                     ref_ve.embeds_from_wavs([w], SR, **kwargs), rtol=0, atol=ATOL_EMBED)


def test_embeds_from_mels_tensor_input_matches_reference(ref, encoders):
    from chatterbox.models.voice_encoder.voice_encoder import pack
    ref_ve, ours = encoders
    mels = [melspectrogram(synth(s, seed=20 + i)).T.numpy() for i, s in enumerate(CLIP_SECONDS)]
    lens = torch.tensor([len(m) for m in mels])
    packed = pack(mels)
    assert_close("embeds_from_mels", ours.embeds_from_mels(packed, lens),
                 ref_ve.embeds_from_mels(packed, lens), rtol=0, atol=ATOL_EMBED)
