"""S3Gen token-encoder unit tests: x2 upsampling shapes, strict loading, padded batches vs singles."""
import pytest
import torch

from chatterbox_rt.models.s3gen.encoder import (EncoderConfig, FlowFront, UpsampleConformerEncoder,
                                                concat_prompt_tokens, length_mask)

# A small config keeps these fast; the real sizes are exercised by the parity tests.
SMALL = EncoderConfig(input_size=64, output_size=64, attention_heads=4, linear_units=96, num_blocks=2,
                      num_up_blocks=2, pos_max_len=40, vocab_size=50)
BATCH_LENGTHS = [13, 30, 1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def front():
    torch.manual_seed(0)
    f = FlowFront(SMALL).eval()
    with torch.no_grad():  # pos biases start at zero; give them something to do
        for name, p in f.named_parameters():
            if "pos_bias" in name:
                p.normal_(0, 0.1)
    return f


def test_default_config_shapes():
    c = EncoderConfig()
    assert (c.head_dim, c.token_mel_ratio, c.num_blocks, c.num_up_blocks) == (64, 2, 6, 4)
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(output_size=100, attention_heads=8)


def test_upsamples_by_two(front):
    T = 17
    with torch.inference_mode():
        out, mask = front.encoder(torch.randn(2, T, 64), torch.tensor([T, 9]))
        mu, mu_mask = front.encode_tokens(torch.randint(0, 50, (2, T)), torch.tensor([T, 9]))
    assert out.shape == (2, 2 * T, 64) and mask.shape == (2, 1, 2 * T) and mask.dtype == torch.bool
    assert mask.sum(-1).flatten().tolist() == [2 * T, 18]
    assert mu.shape == (2, SMALL.mel_bins, 2 * T) and mu_mask.shape == (2, 1, 2 * T)
    assert mu_mask.dtype == mu.dtype


def test_longer_than_position_table(front):
    T = SMALL.pos_max_len + 7  # the relative table is rebuilt on the fly, as in the reference
    with torch.inference_mode():
        out, _ = front.encoder(torch.randn(1, T, 64), torch.tensor([T]))
    assert out.shape == (1, 2 * T, 64) and torch.isfinite(out).all()


def test_not_finalized_drops_lookahead_frames(front):
    tokens, lens = torch.randint(0, 50, (2, 20)), torch.tensor([20, 12])
    with torch.inference_mode():
        full, _ = front.encode_tokens(tokens, lens)
        part, mask = front.encode_tokens(tokens, lens, finalize=False)
    trim = SMALL.pre_lookahead_len * SMALL.token_mel_ratio
    assert part.shape[-1] == 40 - trim and mask.sum(-1).flatten().tolist() == [40 - trim, 24 - trim]
    torch.testing.assert_close(part, full[..., :40 - trim])


def test_strict_load(front):
    sd = front.encoder.state_dict()
    fresh = UpsampleConformerEncoder(SMALL)
    fresh.load_state_dict(sd, strict=True)
    missing = {k: v for k, v in sd.items() if k != "up_encoders.1.self_attn.pos_bias_v"}
    with pytest.raises(RuntimeError, match=r"up_encoders\.1\.self_attn\.pos_bias_v"):
        UpsampleConformerEncoder(SMALL).load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected"):
        UpsampleConformerEncoder(SMALL).load_state_dict(dict(sd, **{"embed.out.2.weight": torch.zeros(1)}))
    assert not any("pe" == k.split(".")[-1] for k in sd)  # the position table is not a checkpoint entry
    flow_keys = set(front.state_dict())
    assert {"input_embedding.weight", "encoder_proj.weight", "spk_embed_affine_layer.bias",
            "encoder.after_norm.weight", "encoder.up_layer.conv.weight"} <= flow_keys


def test_batch_matches_singles(front):
    T = max(BATCH_LENGTHS)
    xs = torch.randn(len(BATCH_LENGTHS), T, 64)
    tokens = torch.randint(0, 50, (len(BATCH_LENGTHS), T))
    lens = torch.tensor(BATCH_LENGTHS)
    for b, L in enumerate(BATCH_LENGTHS):  # garbage in the padding must not matter
        xs[b, L:] = 1e3
        tokens[b, L:] = -1
    with torch.inference_mode():
        out, _ = front.encoder(xs, lens)
        mu, mask = front.encode_tokens(tokens, lens)
        for b, L in enumerate(BATCH_LENGTHS):
            one, _ = front.encoder(xs[b:b + 1, :L], lens[b:b + 1])
            torch.testing.assert_close(out[b:b + 1, :2 * L], one, rtol=1e-5, atol=1e-5)
            mu1, mask1 = front.encode_tokens(tokens[b:b + 1, :L], lens[b:b + 1])
            torch.testing.assert_close(mu[b:b + 1, :, :2 * L], mu1, rtol=1e-5, atol=1e-5)
            assert torch.equal(mask[b:b + 1, :, :2 * L], mask1)


def test_concat_prompt_tokens():
    prompt, plens = torch.tensor([[7, 8, 9], [5, 0, 0]]), torch.tensor([3, 1])
    toks, tlens = torch.tensor([[1, 2], [3, 4]]), torch.tensor([1, 2])
    out, lens = concat_prompt_tokens(prompt, plens, toks, tlens)
    assert lens.tolist() == [4, 3]
    assert out.tolist() == [[7, 8, 9, 1], [5, 3, 4, 0]]
    shared, lens = concat_prompt_tokens(prompt[:1], plens[:1], toks, tlens)
    assert shared.tolist() == [[7, 8, 9, 1, 0], [7, 8, 9, 3, 4]] and lens.tolist() == [4, 5]
    assert length_mask(lens, 5).tolist() == [[True] * 4 + [False], [True] * 5]
