"""Unit tests of chatterbox_rt.models.s3tokenizer on a small random encoder (no reference needed)."""
import numpy as np
import pytest
import torch
from chatterbox_rt.models.s3tokenizer import S3Tokenizer, S3TokenizerConfig, num_tokens

SMALL = S3TokenizerConfig(n_state=128, n_head=2, n_layer=2)
# Sample counts around hop (160) and token (640) boundaries; 201 is the shortest centred STFT input.
N_SAMPLES = [201, 639, 640, 641, 1280, 16000, 16001, 16000 * 3 + 333]


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    model = S3Tokenizer(SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape) / np.sqrt(p[0].numel()))
    return model


def wav(n, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.1)


def test_config_constants():
    c = S3TokenizerConfig()
    assert (c.codebook_size, c.token_hop, c.frames_per_token, c.window_frames, c.seam_tokens) == (6561, 640, 4, 3000, 50)


@pytest.mark.parametrize("n", N_SAMPLES)
def test_token_count_formula(tok, n):
    tokens, lens = tok([wav(n, n)])
    expected = -(-(n // SMALL.hop) // SMALL.frames_per_token)  # ceil(frames / 4): 25 tokens per second
    assert num_tokens(n, SMALL) == expected
    assert lens.tolist() == [expected] and tokens.shape == (1, expected)
    assert tokens.dtype == lens.dtype == torch.long


def test_token_range(tok):
    tokens, _ = tok([wav(16000 * 2, 1)])
    assert tokens.min() >= 0 and tokens.max() < SMALL.codebook_size
    assert len(set(tokens[0].tolist())) > 5


def test_batch_equals_single(tok):
    wavs = [wav(n, i) for i, n in enumerate([20837, 32000, 59301])]
    tokens, lens = tok(wavs)
    assert tokens.shape == (3, max(lens))
    for b, w in enumerate(wavs):
        single, n = tok([w.numpy()])
        assert n.item() == lens[b]
        assert torch.equal(tokens[b, :lens[b]], single[0]), f"clip {b}"


def test_max_len_truncates(tok):
    w = wav(32000, 3)
    cut, lens = tok([w], max_len=17)
    assert lens.tolist() == [17]
    # Truncation is on the mel, before the encoder: attention sees less context, so only lengths are pinned.
    assert cut.shape == (1, 17)
    short, _ = tok([w[: 17 * SMALL.token_hop + SMALL.n_fft]], max_len=17)
    assert torch.equal(cut, short)


def test_windowed_path_for_long_audio(tok):
    n = SMALL.sample_rate * 31 + 5
    tokens, lens = tok([wav(n, 4), wav(16000, 5)])
    # Two windows (0-30 s, 26-31 s): 750 + 128 tokens minus 50 on each side of the seam.
    assert lens.tolist() == [750 - 50 + (num_tokens(n - 26 * 16000, SMALL) - 50), 25]
    assert (tokens[1, 25:] == 0).all()


def test_strict_load_names_missing_key(tok):
    sd = tok.state_dict()
    assert not any(k in sd for k in S3Tokenizer.RECOMPUTED_BUFFERS)
    del sd["encoder.blocks.1.attn.fsmn_block.weight"]
    with pytest.raises(RuntimeError, match=r"encoder\.blocks\.1\.attn\.fsmn_block\.weight"):
        S3Tokenizer(SMALL).load_state_dict(sd, strict=True)
