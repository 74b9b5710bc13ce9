"""Parity of chatterbox_rt.models.s3tokenizer with the reference S3Tokenizer (chatterbox-tts 0.1.7).

The reference ``S3Tokenizer("speech_tokenizer_v2_25hz")`` runs with random weights (seeded,
fan-in scaled so that activations stay O(1) and the tokens vary) loaded into ours with strict=True,
minus the two front-end buffers that both sides recompute. Inputs are synthetic 16 kHz signals whose
lengths are not multiples of the hop. The > 30 s windowed path is checked on a small encoder built
from the s3tokenizer package directly (the chatterbox subclass ignores its config argument).
"""
import numpy as np
import pytest
import torch

from _assert import assert_close
from chatterbox_rt.models.s3tokenizer import (
    S3Tokenizer,
    S3TokenizerConfig,
    num_tokens,
    s3_mel_filterbank,
)

SR = 16000
CLIP_SECONDS = [1.3, 2.0, 3.7]
EXTRA_SAMPLES = [37, 0, 101]  # off the 160-sample hop
MAX_LEN = [40]  # tokens: cuts the two longer clips (50, 93 tokens), not the 33-token one
ATOL_MEL = 1e-5
RTOL_HIDDEN = 1e-4


def synth(seconds, seed, extra=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR) + extra) / SR
    f0 = 120 + 50 * np.sin(2 * np.pi * 0.9 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(0.3 / k * np.sin(k * phase) for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.1 * t) ** 2
    x = envelope * voiced + 0.02 * rng.standard_normal(len(t))
    x[: SR // 10] *= 1e-3  # a quiet lead-in exercises the dynamic-range floor
    return x.astype(np.float32)


def randomize_(module, seed):
    """Fan-in scaled normal weights, small biases, LayerNorm gains near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def load_ours(ref_model, config=None):
    ours = S3Tokenizer(config or S3TokenizerConfig()).eval()
    sd = {k: v for k, v in ref_model.state_dict().items() if k not in S3Tokenizer.RECOMPUTED_BUFFERS}
    ours.load_state_dict(sd, strict=True)
    return ours


@pytest.fixture(scope="module")
def tokenizers(ref):
    from chatterbox.models.s3tokenizer import S3Tokenizer as RefS3Tokenizer
    torch.manual_seed(0)
    ref_tok = RefS3Tokenizer("speech_tokenizer_v2_25hz").eval()
    randomize_(ref_tok, seed=1234)
    return ref_tok, load_ours(ref_tok)


@pytest.fixture(scope="module")
def wavs():
    return [synth(s, seed=i, extra=e) for i, (s, e) in enumerate(zip(CLIP_SECONDS, EXTRA_SAMPLES, strict=True))]


def test_mel_filterbank_matches_librosa(tokenizers):
    import librosa
    ref_tok, ours = tokenizers
    expected = librosa.filters.mel(sr=SR, n_fft=400, n_mels=128)
    np.testing.assert_array_equal(s3_mel_filterbank(), expected)
    np.testing.assert_array_equal(ours._mel_filters.numpy(), ref_tok._mel_filters.numpy())
    np.testing.assert_array_equal(ours.window.numpy(), ref_tok.window.numpy())


def test_log_mel_matches_reference(tokenizers, wavs):
    ref_tok, ours = tokenizers
    for i, wav in enumerate(wavs):
        expected = ref_tok.log_mel_spectrogram(torch.from_numpy(wav)[None])[0]
        actual = ours.log_mel_spectrogram(torch.from_numpy(wav))
        assert actual.shape == (128, len(wav) // 160)
        assert_close(f"log-mel clip {i}", actual, expected, rtol=0, atol=ATOL_MEL)


def test_encoder_matches_reference(tokenizers, wavs):
    from s3tokenizer.utils import padding
    ref_tok, ours = tokenizers
    mels, mel_lens = padding([ref_tok.log_mel_spectrogram(torch.from_numpy(w)[None])[0] for w in wavs])
    mels = mels.contiguous()  # a transposed view: same values, but CPU conv1d on it is several times slower
    with torch.inference_mode():
        expected, exp_lens = ref_tok.encoder(mels, mel_lens)
        actual, lens = ours.encode(mels, mel_lens)
    assert lens.tolist() == exp_lens.tolist() == [num_tokens(len(w)) for w in wavs]
    scale = expected.abs().max().item()
    for b, n in enumerate(lens.tolist()):
        assert_close(f"hidden clip {b}", actual[b, :n], expected[b, :n], rtol=RTOL_HIDDEN, atol=RTOL_HIDDEN * scale)


@pytest.mark.parametrize("max_len", [None] + MAX_LEN)
def test_tokens_match_reference(tokenizers, wavs, max_len):
    ref_tok, ours = tokenizers
    exp_tokens, exp_lens = ref_tok([torch.from_numpy(w) for w in wavs], max_len=max_len)
    tokens, lens = ours(wavs, max_len=max_len)
    assert tokens.dtype == lens.dtype == torch.long
    assert lens.tolist() == exp_lens.tolist()
    assert tokens.shape == exp_tokens.shape
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(tokens[b, :n], exp_tokens[b, :n]), f"clip {b}: tokens differ"
    assert len(set(tokens[0, :lens[0]].tolist())) > 5, "degenerate random weights: tokens barely vary"


def test_windowed_long_audio_matches_reference(ref):
    """> 30 s goes through S3TokenizerV2._quantize_mixed_batch (windows of 30 s, stride 26 s)."""
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2
    small = {"n_audio_state": 128, "n_audio_head": 2, "n_audio_layer": 2}
    ref_model = S3TokenizerV2("speech_tokenizer_v2_25hz", ModelConfig(**small)).eval()
    randomize_(ref_model, seed=7)
    ours = load_ours(ref_model, S3TokenizerConfig(n_state=128, n_head=2, n_layer=2))
    seconds = [57.3, 2.1]
    mels = [ours.log_mel_spectrogram(torch.from_numpy(synth(s, seed=10 + i))) for i, s in enumerate(seconds)]
    mel_lens = torch.tensor([m.shape[1] for m in mels], dtype=torch.int32)
    batch = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    with torch.inference_mode():
        exp_tokens, exp_lens = ref_model.quantize(batch, mel_lens)
        tokens, lens = ours.quantize(batch, mel_lens)
    assert lens.tolist() == exp_lens.tolist()
    assert torch.equal(tokens, exp_tokens.long())
