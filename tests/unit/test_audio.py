"""chatterbox_rt.audio without the reference: loading, mix-down, validation errors, resampler shapes.

Parity with librosa / torchaudio / the reference's mel is in tests/parity/test_audio_parity.py.
"""
import math
import pathlib
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_rt.audio import AudioError, check_voice_clip, load_audio, resample, sinc_resample
from chatterbox_rt.models.s3gen import mel_spectrogram, prompt_mel

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
MONO_6S = DATA / "speech_en_6s.wav"
MONO_3S = DATA / "speech_en_3s.wav"
STEREO_44K = DATA / "speech_stereo_44k.wav"
ESPEAK_SR = 22050

# (orig, new) pairs with gcd-reduced periods 3/2, 2/3, 441/160, 147/160, and a plain ratio 2.
SINC_RATES = [(24000, 16000), (16000, 24000), (44100, 16000), (22050, 24000), (8000, 16000)]
SINC_LENGTHS = [1, 7, 479, 1000, 24001]


def test_load_mono_clips():
    for path, lo, hi in [(MONO_6S, 6.0, 7.5), (MONO_3S, 2.5, 3.6)]:
        wav, sr = load_audio(path)
        assert sr == ESPEAK_SR and wav.dtype == np.float32 and wav.ndim == 1
        assert lo <= len(wav) / sr <= hi
        raw, _ = sf.read(path, dtype="int16")
        np.testing.assert_array_equal(wav, raw.astype(np.float32) / 32768)


def test_load_accepts_str_path_and_matching_sr():
    a, _ = load_audio(str(MONO_3S), ESPEAK_SR)
    b, _ = load_audio(MONO_3S)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(AudioError, match="sr=16000 was given but the file is at 22050 Hz"):
        load_audio(MONO_3S, 16000)


def test_stereo_mixdown_is_mean_of_channels():
    wav, sr = load_audio(STEREO_44K)
    data, _ = sf.read(STEREO_44K, dtype="float32")  # [N, 2]
    assert sr == 44100 and wav.shape == (data.shape[0],)
    assert not np.array_equal(data[:, 0], data[:, 1])
    np.testing.assert_array_equal(wav, np.mean(data.T, axis=0))


@pytest.mark.parametrize("target_sr", [16000, 24000, 44100])
def test_target_sr_length(target_sr):
    for path in (MONO_6S, STEREO_44K):
        n = sf.info(path).frames
        orig = sf.info(path).samplerate
        wav, sr = load_audio(path, target_sr=target_sr)
        assert sr == target_sr and wav.dtype == np.float32
        assert len(wav) == (n if orig == target_sr else math.ceil(n * target_sr / orig))


def test_arrays_1d_and_2d_orientations():
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(2, 1001)).astype(np.float32)
    want = np.mean(stereo, axis=0)
    for arr in (stereo, stereo.T, torch.from_numpy(stereo), torch.from_numpy(stereo.T.copy())):
        wav, sr = load_audio(arr, 16000)
        assert sr == 16000
        np.testing.assert_array_equal(wav, want)
    mono, _ = load_audio(stereo[0].astype(np.float64), 16000)
    assert mono.dtype == np.float32
    np.testing.assert_array_equal(mono, stereo[0])
    one_row, _ = load_audio(stereo[:1], 16000)  # [1, N] and [N, 1] are mono
    np.testing.assert_array_equal(one_row, stereo[0])
    one_col, _ = load_audio(stereo[:1].T, 16000)
    np.testing.assert_array_equal(one_col, stereo[0])
    square, _ = load_audio(stereo[:, :2], 16000)  # a tie is [channels, samples]
    np.testing.assert_array_equal(square, want[:2])


def test_integer_arrays_are_scaled_like_soundfile():
    raw, _ = sf.read(MONO_3S, dtype="int16")
    want, _ = sf.read(MONO_3S, dtype="float32")
    for arr in (raw, torch.from_numpy(raw)):
        wav, _ = load_audio(arr, ESPEAK_SR)
        np.testing.assert_array_equal(wav, want)
    wav32, _ = load_audio(raw.astype(np.int32) << 16, ESPEAK_SR)
    np.testing.assert_array_equal(wav32, want)


def test_bfloat16_tensor():
    x = torch.linspace(-1, 1, 100, dtype=torch.bfloat16)
    wav, _ = load_audio(x, 8000)
    np.testing.assert_array_equal(wav, x.float().numpy())


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match=re.escape(str(path)) + ": file not found"):
        load_audio(path)
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match=re.escape(str(path)) + r": cannot read as audio \(.+\)"):
        load_audio(path)


def test_truncated_wav_header(tmp_path):
    path = tmp_path / "cut.wav"
    path.write_bytes(MONO_3S.read_bytes()[:30])  # inside the 44-byte RIFF/fmt header
    with pytest.raises(AudioError, match=re.escape(str(path)) + ": cannot read as audio"):
        load_audio(path)


def test_empty_file_and_empty_array(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=re.escape(str(path)) + ": contains no samples"):
        load_audio(path)
    with pytest.raises(AudioError, match="array: contains no samples"):
        load_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: contains no samples"):
        load_audio(np.zeros((2, 0), np.float32), 16000, name="empty.wav")


def test_nan_and_inf(tmp_path):
    x = np.zeros(1000, np.float32)
    x[[10, 500]] = np.nan
    x[20] = np.inf
    with pytest.raises(AudioError, match=r"array: 2 NaN and 1 inf sample\(s\).*first is at sample 10 of 1000"):
        load_audio(x, 16000)
    path = tmp_path / "inf.wav"
    y = np.zeros(100, np.float32)
    y[42] = -np.inf
    sf.write(path, y, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=re.escape(str(path)) + r": 0 NaN and 1 inf .* sample 42 of 100"):
        load_audio(path)


def test_bad_sample_rates_and_shapes():
    x = np.zeros(100, np.float32)
    with pytest.raises(AudioError, match="array: the sample rate"):
        load_audio(x)
    for bad in (0, -16000, 16000.0, "16000", True):
        with pytest.raises(AudioError, match="sr must be a positive int"):
            load_audio(x, bad)
    with pytest.raises(AudioError, match="target_sr must be a positive int"):
        load_audio(x, 16000, target_sr=0)
    with pytest.raises(AudioError, match="cannot tell channels from samples"):
        load_audio(np.zeros((10, 20), np.float32), 16000)
    with pytest.raises(AudioError, match="got shape"):
        load_audio(np.zeros((1, 2, 100), np.float32), 16000)
    with pytest.raises(AudioError, match="unsupported sample dtype"):
        load_audio(np.zeros(100, np.complex64), 16000)


def test_silence_is_loaded_but_rejected_by_check_voice_clip():
    wav, _ = load_audio(np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match=r"array: the clip is silent .* below -80 dBFS"):
        check_voice_clip(wav, 16000, min_seconds=0.5)
    with pytest.raises(AudioError, match="silent"):
        check_voice_clip(torch.full((16000,), 5e-5), 16000, min_seconds=0.5, name="quiet.wav")
    check_voice_clip(np.full(16000, 2e-4, np.float32), 16000, min_seconds=0.5)


def test_check_voice_clip_duration():
    wav, sr = load_audio(MONO_3S)
    check_voice_clip(wav, sr, min_seconds=3.0, name="ref.wav")
    with pytest.raises(AudioError, match=r"ref.wav: the clip is 3\.\d\d s long .* at least 5 s is needed"):
        check_voice_clip(wav, sr, min_seconds=5.0, name="ref.wav")


# ----------------------------------------------------------------------------------------------
# Resamplers and mel: shapes and length rules
# ----------------------------------------------------------------------------------------------
def test_resample_lengths_and_identity():
    x = np.random.default_rng(1).standard_normal(1001).astype(np.float32)
    assert resample(x, 16000, 16000) is x
    assert resample(x, 24000, 16000).shape == (math.ceil(1001 * 16000 / 24000),)
    batch = np.stack([x, -x])
    out = resample(batch, 22050, 24000)
    assert out.shape == (2, math.ceil(1001 * 24000 / 22050)) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], resample(x, 22050, 24000))


@pytest.mark.parametrize("orig,new", SINC_RATES)
def test_sinc_resample_lengths_and_batching(orig, new):
    for n in SINC_LENGTHS:
        x = torch.randn(n)
        y = sinc_resample(x, orig, new)
        assert y.shape == (math.ceil(n * new / orig),) and y.dtype == x.dtype
    x = torch.randn(2, 3, 2401)
    y = sinc_resample(x, orig, new)
    assert y.shape == (2, 3, math.ceil(2401 * new / orig))
    torch.testing.assert_close(y[1, 2], sinc_resample(x[1, 2], orig, new), rtol=0, atol=1e-6)


def test_sinc_resample_identity_dtype_and_lowpass():
    x = torch.randn(100)
    assert sinc_resample(x, 16000, 16000) is x
    assert sinc_resample(x.double(), 24000, 16000).dtype == torch.float64
    with pytest.raises(TypeError):
        sinc_resample(torch.zeros(10, dtype=torch.int16), 24000, 16000)
    # A 1 kHz tone survives 24 kHz -> 16 kHz; a 10 kHz tone (above the new Nyquist) is removed.
    t = torch.arange(24000, dtype=torch.float64) / 24000
    for f, passes in [(1000, True), (10000, False)]:
        y = sinc_resample(torch.sin(2 * math.pi * f * t), 24000, 16000)[1000:-1000]
        assert (y.abs().max() > 0.9) == passes


def test_mel_shapes():
    wav, _ = load_audio(MONO_3S, target_sr=24000)
    x = torch.from_numpy(wav)
    mel = mel_spectrogram(x)
    assert mel.shape == (1, 80, len(wav) // 480) and mel.dtype == torch.float32
    batch = mel_spectrogram(torch.stack([x[:24000], x[-24000:]]))
    assert batch.shape == (2, 80, 50)
    torch.testing.assert_close(batch[0], mel_spectrogram(x[:24000])[0], rtol=0, atol=1e-5)
    assert prompt_mel(x[:24001]).shape == (1, 50, 80)
    with pytest.raises(ValueError, match="reflect padding"):
        mel_spectrogram(torch.zeros(720))
