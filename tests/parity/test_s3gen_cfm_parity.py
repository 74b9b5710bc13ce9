"""S3Gen CFM parity with the reference (chatterbox-tts 0.1.7 ``ConditionalDecoder`` +
``CausalConditionalCFM``), built as ``S3Token2Mel`` builds ``flow.decoder``.

Most checks use a reduced U-Net (fewer mid blocks and transformer blocks per stage, which the
reference constructor allows); one estimator call runs at full size. Weights are re-randomised
from a seed at moderate scale and loaded into ours with ``strict=True``. The reference draws its
initial noise with ``torch.randn_like(mu)`` and then overwrites ``z[..., prompt_len:]`` with
``noised_mels``; passing ``noised_mels`` of full length injects our noise on both sides.
"""
import pytest
import torch
from _s3gen_pairs import rerandomise_flow_ as rerandomise_
from chatterbox_rt.models.s3gen.cfm import CausalCFM, FlowConfig

SEED = 1234
LENGTHS = [37, 50]  # T per request; batch of 2 with padding
ESTIMATOR_RTOL = 1e-4  # max abs error relative to the reference's peak
CFM_RTOL = 1e-3
REDUCED = dict(num_mid_blocks=2, n_blocks=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def report(a, b, what):
    diff = (a - b).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return (f"{what}: max abs error {diff.max().item():.3g} at {idx} (ours {a[idx].item():.6g}, "
            f"ref {b[idx].item():.6g}; ref peak {b.abs().max().item():.4g})")


def assert_close_rel(ours, ref, what, rtol):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), report(ours, ref, what)


def build_reference(ref, meanflow=False, **sizes):
    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.decoder import ConditionalDecoder as RefDecoder
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM

    kw = dict(in_channels=320, out_channels=80, causal=True, channels=[256], dropout=0.0,
              attention_head_dim=64, n_blocks=4, num_mid_blocks=12, num_heads=8, act_fn="gelu",
              meanflow=meanflow)
    kw.update(sizes)
    estimator = RefDecoder(**kw)
    return CausalConditionalCFM(spk_emb_dim=80, cfm_params=CFM_PARAMS, estimator=estimator)


def make_pair(ref, meanflow=False, **sizes):
    torch.manual_seed(0)
    ref_cfm = build_reference(ref, meanflow, **sizes)
    rerandomise_(ref_cfm, SEED).eval()
    cfg = FlowConfig(meanflow=meanflow, **sizes)
    ours = CausalCFM(cfg).eval()
    ours.load_state_dict(ref_cfm.state_dict(), strict=True)
    return ref_cfm, ours


def inputs(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float().unsqueeze(1)  # [B, 1, T]
    mu = torch.randn(B, 80, T, generator=g) * mask
    spks = torch.randn(B, 80, generator=g)
    cond = torch.zeros(B, 80, T)
    cond[:, :, :T // 3] = torch.randn(B, 80, T // 3, generator=g)
    noise = torch.randn(B, 80, T, generator=g)
    return mu, mask, spks, cond, noise


@pytest.fixture(scope="module")
def pair(ref):
    return make_pair(ref, **REDUCED)


@pytest.fixture(scope="module")
def meanflow_pair(ref):
    return make_pair(ref, meanflow=True, **REDUCED)


def test_estimator_full_size(ref):
    ref_cfm, ours = make_pair(ref)
    mu, mask, spks, cond, x = inputs()
    t = torch.full((2,), 0.3)
    with torch.inference_mode():
        want = ref_cfm.estimator(x, mask, mu, t, spks, cond)
        got = ours.estimator(x, mask, mu, t, spks, cond)
    assert_close_rel(got, want, "full-size estimator", ESTIMATOR_RTOL)


def test_estimator_meanflow(meanflow_pair):
    ref_cfm, ours = meanflow_pair
    mu, mask, spks, cond, x = inputs()
    t, r = torch.tensor([0.25]), torch.tensor([0.75])
    with torch.inference_mode():
        want = ref_cfm.estimator(x, mask, mu, t, spks, cond, r=r)
        got = ours.estimator(x, mask, mu, t, spks, cond, r=r)
    assert_close_rel(got, want, "meanflow estimator", ESTIMATOR_RTOL)


def test_cfm_10_steps_cfg(pair):
    ref_cfm, ours = pair
    mu, mask, spks, cond, noise = inputs()
    want, _ = ref_cfm(mu, mask, n_timesteps=10, spks=spks, cond=cond, noised_mels=noise)
    got = ours(mu, mask, spks, cond, n_steps=10, noise=noise)
    for i, L in enumerate(LENGTHS):
        assert_close_rel(got[i, :, :L], want[i, :, :L], f"CFM 10 steps, request {i}", CFM_RTOL)


def test_cfm_meanflow_2_steps(meanflow_pair):
    ref_cfm, ours = meanflow_pair
    mu, mask, spks, cond, noise = inputs()
    want, _ = ref_cfm(mu, mask, n_timesteps=2, spks=spks, cond=cond, noised_mels=noise, meanflow=True)
    got = ours(mu, mask, spks, cond, noise=noise, meanflow=True)  # default: 2 steps
    for i, L in enumerate(LENGTHS):
        assert_close_rel(got[i, :, :L], want[i, :, :L], f"meanflow 2 steps, request {i}", CFM_RTOL)
