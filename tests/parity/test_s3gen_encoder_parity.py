"""S3Gen token-encoder parity with the reference (chatterbox-tts 0.1.7 ``UpsampleConformerEncoder``
and the pre-decoder part of ``CausalMaskedDiffWithXvec.inference``).

The reference is built exactly as ``S3Token2Mel`` builds it, its parameters re-randomised from a
seed at moderate magnitudes (so every block changes the residual stream), then loaded into ours
with ``strict=True``. Unpadded inputs must match the reference; a padded batch must match the
reference run on each request alone (the reference's own padded batch leaks padding through its
look-ahead conv; see ``chatterbox_rt.models.s3gen.encoder``).
"""
import pytest
import torch

from chatterbox_rt.models.s3gen.encoder import FlowFront, UpsampleConformerEncoder

LENGTHS = [37, 64]
BATCH_LENGTHS = [37, 64, 1]
RTOL, ATOL = 1e-4, 1e-5
SEED = 1234


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(ours, want, what):
    assert ours.shape == want.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(want.shape)}"
    diff = (ours.double() - want.double()).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    msg = (f"{what}: max abs error {diff.max().item():.3g} at {idx} (ours {ours[idx].item():.6g}, "
           f"ref {want[idx].item():.6g}; ref peak {want.abs().max().item():.4g})")
    print(msg)
    assert torch.allclose(ours, want, rtol=RTOL, atol=ATOL), msg


def randomise_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith(("out.1.weight", "out.1.bias")):  # LayerNorms
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "pos_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:  # weights: ~unit gain for fan-in, a bit below
                fan_in = p[0].numel() if p.dim() > 1 else 1
                scale = 1.0 if "input_embedding" in name else 0.7 / fan_in ** 0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def build_reference_encoder():
    from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder as RefEncoder

    return RefEncoder(output_size=512, attention_heads=8, linear_units=2048, num_blocks=6, dropout_rate=0.1,
                      positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True,
                      input_layer='linear', pos_enc_layer_type='rel_pos_espnet',
                      selfattention_layer_type='rel_selfattn', input_size=512, use_cnn_module=False,
                      macaron_style=False)


class _CaptureDecoder(torch.nn.Module):
    """Stands in for the CFM decoder: records ``mu``/``mask``, returns zeros of the right shape."""

    def forward(self, mu, mask, spks, cond, n_timesteps, noised_mels=None, meanflow=False):
        self.mu, self.mask, self.spks = mu, mask, spks
        return torch.zeros(mu.size(0), 80, mu.size(2)), None


@pytest.fixture(scope="module")
def encoders(ref):
    ref_enc = randomise_(build_reference_encoder(), SEED).eval()
    ours = UpsampleConformerEncoder().eval()
    ours.load_state_dict(ref_enc.state_dict(), strict=True)
    return ref_enc, ours


@pytest.mark.parametrize("T", LENGTHS)
def test_encoder_matches_reference(encoders, T):
    ref_enc, ours = encoders
    g = torch.Generator().manual_seed(T)
    xs, lens = torch.randn(1, T, 512, generator=g), torch.tensor([T])
    with torch.inference_mode():
        want, want_mask = ref_enc(xs, lens)
        got, got_mask = ours(xs, lens)
    assert got.shape == (1, 2 * T, 512)
    assert torch.equal(got_mask, want_mask)
    assert_close(got, want, f"encoder T={T}")


def test_padded_batch_matches_reference_singles(encoders):
    ref_enc, ours = encoders
    g = torch.Generator().manual_seed(SEED)
    T = max(BATCH_LENGTHS)
    xs = torch.randn(len(BATCH_LENGTHS), T, 512, generator=g)
    lens = torch.tensor(BATCH_LENGTHS)
    with torch.inference_mode():
        got, got_mask = ours(xs, lens)
        for b, L in enumerate(BATCH_LENGTHS):
            want, want_mask = ref_enc(xs[b:b + 1, :L], lens[b:b + 1])
            assert torch.equal(got_mask[b, :, :2 * L], want_mask[0])
            assert not got_mask[b, :, 2 * L:].any()
            assert_close(got[b:b + 1, :2 * L], want, f"batched request {b} (T={L})")


def test_flow_front_matches_reference_inference(ref, encoders):
    from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec

    ref_enc, _ = encoders
    flow = CausalMaskedDiffWithXvec(encoder=ref_enc, decoder=_CaptureDecoder())
    randomise_(flow.input_embedding, SEED + 1)
    randomise_(flow.encoder_proj, SEED + 2)
    randomise_(flow.spk_embed_affine_layer, SEED + 3)
    flow.eval()
    front = FlowFront().eval()
    front.load_state_dict({k: v for k, v in flow.state_dict().items() if not k.startswith("decoder.")},
                          strict=True)

    g = torch.Generator().manual_seed(SEED)
    n_prompt, n_new = 11, 26
    prompt = torch.randint(0, 6561, (1, n_prompt), generator=g)
    tokens = torch.randint(0, 6561, (1, n_new), generator=g)
    xvec = torch.randn(1, 192, generator=g)
    with torch.inference_mode():
        flow.inference(tokens, torch.tensor([n_new]), prompt, torch.tensor([n_prompt]),
                       torch.randn(1, 2 * n_prompt, 80, generator=g), torch.tensor([2 * n_prompt]), xvec,
                       finalize=True)
        mu, mask = front.encode_tokens(torch.cat([prompt, tokens], 1), torch.tensor([n_prompt + n_new]))
        spks = front.embed_speaker(xvec)
    cap = flow.decoder
    assert torch.equal(mask, cap.mask)
    assert_close(mu, cap.mu, "mu")
    assert_close(spks, cap.spks, "spks")
