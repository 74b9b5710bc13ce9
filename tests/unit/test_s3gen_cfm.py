"""Unit tests of the S3Gen CFM (no reference needed): shapes, strict loading, batching over
requests of different lengths, and that the CFG solver reuses its 2B input buffers."""
import pytest
import torch
from chatterbox_rt.models.s3gen.cfm import (
    CausalCFM,
    ConditionalDecoder,
    FlowConfig,
    time_span,
)

SMALL = FlowConfig(num_mid_blocks=1, n_blocks=1)
LENGTHS = [23, 40, 31]  # batch of 3, none a multiple of anything in particular
BATCH_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfm():
    torch.manual_seed(0)
    return CausalCFM(SMALL).eval()


def inputs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float().unsqueeze(1)  # [B, 1, T]
    mu = torch.randn(B, 80, T, generator=g) * mask
    spks = torch.randn(B, 80, generator=g)
    cond = torch.randn(B, 80, T, generator=g) * mask
    noise = torch.randn(B, 80, T, generator=g)
    return mu, mask, spks, cond, noise


def test_config_derived_sizes():
    cfg = FlowConfig()
    assert cfg.in_channels == 320 and cfg.time_embed_dim == 1024
    assert (cfg.n_steps, cfg.meanflow_n_steps, cfg.cfg_rate, cfg.t_scheduler) == (10, 2, 0.7, "cosine")
    with pytest.raises(ValueError, match="t_scheduler"):
        FlowConfig(t_scheduler="sigmoid")


def test_time_span():
    t = time_span(10, "cosine")
    assert t.shape == (11,) and t[0] == 0 and abs(t[-1].item() - 1) < 1e-6
    assert torch.all(t[1:] > t[:-1])
    assert torch.allclose(time_span(2, "linear"), torch.tensor([0.0, 0.5, 1.0]))


def test_shapes(cfm):
    mu, mask, spks, cond, noise = inputs([17, 29])
    v = cfm.estimator(noise, mask, mu, torch.tensor([0.5]), spks, cond)
    assert v.shape == (2, 80, 29)
    assert torch.all(v[0, :, 17:] == 0), "padded frames of the velocity are masked"
    mel = cfm(mu, mask, spks, cond, n_steps=3, noise=noise)
    assert mel.shape == (2, 80, 29) and mel.dtype == torch.float32 and torch.isfinite(mel).all()


def test_noise_is_required(cfm):
    mu, mask, spks, cond, _ = inputs([9])
    with pytest.raises(ValueError, match="noise"):
        cfm(mu, mask, spks, cond)


def test_strict_load_names_missing_key():
    sd = ConditionalDecoder(SMALL).state_dict()
    missing = "mid_blocks.0.1.0.attn1.to_q.weight"
    del sd[missing]
    with pytest.raises(RuntimeError, match=missing.replace(".", r"\.")):
        ConditionalDecoder(SMALL).load_state_dict(sd, strict=True)


def test_meanflow_keys_and_needs_r():
    est = ConditionalDecoder(FlowConfig(num_mid_blocks=1, n_blocks=1, meanflow=True))
    assert est.state_dict()["time_embed_mixer.weight"].shape == (1024, 2048)
    assert "time_embed_mixer.weight" not in ConditionalDecoder(SMALL).state_dict()
    mu, mask, spks, cond, x = inputs([8])
    with pytest.raises(ValueError, match="end time"):
        est(x, mask, mu, torch.tensor([0.0]), spks, cond)


@pytest.mark.parametrize("meanflow", [False, True])
def test_batch_equals_singles(meanflow):
    torch.manual_seed(0)
    cfm = CausalCFM(FlowConfig(num_mid_blocks=1, n_blocks=1, meanflow=meanflow)).eval()
    mu, mask, spks, cond, noise = inputs(LENGTHS)
    n_steps = 2 if meanflow else 4
    batched = cfm(mu, mask, spks, cond, n_steps=n_steps, noise=noise, meanflow=meanflow)
    for i, L in enumerate(LENGTHS):
        single = cfm(mu[i:i + 1, :, :L], mask[i:i + 1, :, :L], spks[i:i + 1], cond[i:i + 1, :, :L],
                     n_steps=n_steps, noise=noise[i:i + 1, :, :L], meanflow=meanflow)
        err = (batched[i, :, :L] - single[0]).abs().max().item()
        assert err <= BATCH_ATOL, f"request {i} (length {L}): batched vs single max abs err {err:.3g}"


def test_cfg_buffers_reused_across_steps(cfm):
    """Every step feeds the estimator the same 2B tensors (same storage), rewritten in place."""
    mu, mask, spks, cond, noise = inputs([12, 20])
    seen = []

    def hook(module, args):
        seen.append(tuple(a.data_ptr() for a in args))
        assert args[0].shape[0] == 2 * mu.shape[0]

    handle = cfm.estimator.register_forward_pre_hook(hook)
    try:
        cfm(mu, mask, spks, cond, n_steps=4, noise=noise)
    finally:
        handle.remove()
    assert len(seen) == 4
    assert len(set(seen)) == 1, f"estimator inputs moved between steps: {seen}"


def test_cfg_combination_matches_formula(cfm):
    """One step of the solver equals x0 + dt ((1 + w) v_cond - w v_uncond) with the uncond half
    seeing zeroed mu, spks and cond."""
    mu, mask, spks, cond, noise = inputs([15])
    w, est = cfm.config.cfg_rate, cfm.estimator
    t0, t1 = time_span(1, "cosine")
    with torch.inference_mode():
        v_c = est(noise, mask, mu, t0[None], spks, cond)
        v_u = est(noise, mask, torch.zeros_like(mu), t0[None], torch.zeros_like(spks), torch.zeros_like(cond))
        want = noise + (t1 - t0) * ((1 + w) * v_c - w * v_u)
    got = cfm(mu, mask, spks, cond, n_steps=1, noise=noise)
    assert (got - want).abs().max().item() <= 1e-5


def test_unpadded_fast_path_equals_all_ones_mask():
    """mask=None (nothing padded) skips the mask passes and the attention bias; same velocity."""
    from chatterbox_rt.checkpoint import init_dummy_conv_
    from chatterbox_rt.models.s3gen.cfm import ConditionalDecoder

    est = init_dummy_conv_(ConditionalDecoder(FlowConfig(n_blocks=1, num_mid_blocks=2)), 0).eval()
    g = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(2, 80, 37, generator=g) for _ in range(3))
    spks, t = torch.randn(2, 80, generator=g), torch.tensor([0.4])
    with torch.inference_mode():
        masked = est(x, torch.ones(2, 1, 37), mu, t, spks, cond)
        fast = est(x, None, mu, t, spks, cond)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)
