"""The kernel dispatch layer: automatic choice and its fallbacks, the CHATTERBOX_RT_KERNELS override,
and the models (HiFT, the CFM loop, T3 sampling) giving the same results through every backend
that can run here (plain torch, C++ when the extension is built, Triton under the interpreter)."""
import pytest
import torch

from chatterbox_rt.kernels import _native, dispatch
from chatterbox_rt.kernels.dispatch import ENV_VAR, KernelUnavailable

HAS_TRITON = dispatch._has_triton()
CPP = _native.available("cpu")


@pytest.fixture
def backend(monkeypatch):
    """Force a backend for the duration of a test: ``backend("triton")``; resets choices after."""
    def force(name):
        if name is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, name)
        if name == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        dispatch.reset()

    yield force
    monkeypatch.delenv(ENV_VAR, raising=False)
    dispatch.reset()


def cpu_backends():
    out = ["native"]
    if CPP:
        out.append("cpp")
    if HAS_TRITON:
        out.append("triton")
    return out


# ------------------------------------------------------------------------------ choice

def test_auto_on_cpu_prefers_cpp_then_native(backend):
    backend(None)
    want = "cpp" if CPP else "native"
    for op in ("snake", "istft", "cfg_euler", "cfg_euler_", "euler"):
        assert dispatch.choose(op, "cpu").backend == want
    assert dispatch.choose("sample", "cpu").backend == "native"  # no C++ form; Triton is GPU-only when automatic
    assert dispatch.choose("sample", "cpu").fn is None


def test_override_native_and_unknown_value(backend):
    backend("native")
    assert set(dispatch.summary("cpu").values()) == {"native"}
    backend("fastest")
    with pytest.raises(ValueError, match="is not a kernel backend"):
        dispatch.choose("snake", "cpu")


def test_explicit_backend_that_cannot_run_raises(backend, monkeypatch):
    backend("cuda")
    with pytest.raises(KernelUnavailable, match="cuda kernels run on cuda tensors"):
        dispatch.choose("snake", "cpu")
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.reset()
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1|triton is not installed"):
        dispatch.choose("istft", "cpu")


def test_explicit_backend_without_that_form_of_the_op_uses_native(backend):
    backend("cpp")
    if not CPP:
        with pytest.raises(KernelUnavailable, match="not built"):
            dispatch.choose("snake", "cpu")
    assert dispatch.choose("sample", "cpu").backend == "native"


def test_model_handles_resolve_once_and_again_after_reset(backend):
    backend("native")
    op = dispatch.DispatchedOp("snake")
    fn = op.get(torch.device("cpu"))
    assert op.get(torch.device("cpu")) is fn
    if HAS_TRITON:
        backend("triton")
        assert op.get(torch.device("cpu")) is dispatch.IMPLS["snake"]["triton"]
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.DispatchedOp("gelu")


# ------------------------------------------------------------------------------ the models through each backend

def _hift():
    from chatterbox_rt.models.s3gen import HiFTGenerator
    from chatterbox_rt.profiling.upstream import rerandomise_hift_

    torch.manual_seed(0)
    return rerandomise_hift_(HiFTGenerator().eval(), 1)


# Triton on the CPU is its interpreter: the whole HiFT through it takes ~1 min, so under make test-all only.
@pytest.mark.parametrize("name", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b
                                  for b in cpu_backends() if b != "native"])
def test_hift_same_waveform_through_each_backend(name, backend, one_thread):
    """Snake (with the fused mask of padded batches) and the fused iSTFT head inside the vocoder."""
    model = _hift()
    g = torch.Generator().manual_seed(2)
    mel = torch.randn(2, 80, 7, generator=g) * 2 - 5
    lengths = torch.tensor([7, 4])
    with torch.no_grad():
        backend("native")
        want = model(mel, lengths, noise_free=True)
        backend(name)
        got = model(mel, lengths, noise_free=True)
    peak = want.abs().max().item()
    assert peak > 1e-3
    err = (got - want).abs().max().item()
    # ~1e-7 differences in Snake's sin (polynomial or libdevice against Sleef) grow through the
    # 20-odd convolutions; 1e-3 of the peak is the fp32 bound tests/unit/test_hift.py uses too.
    assert err <= 1e-3 * peak, f"{name}: max abs error {err:.3g} (peak {peak:.3g})"
    assert (got[1, 4 * 480:] == 0).all()


@pytest.mark.parametrize("meanflow", [False, True])
@pytest.mark.parametrize("name", [b for b in cpu_backends() if b != "native"])
def test_cfm_loop_same_mel_through_each_backend(name, meanflow, backend, one_thread):
    from chatterbox_rt.models.s3gen.cfm import CausalCFM, FlowConfig

    torch.manual_seed(0)
    cfm = CausalCFM(FlowConfig(meanflow=meanflow)).eval()
    g = torch.Generator().manual_seed(3)
    B, T = 2, 9
    mu, cond, noise = (torch.randn(B, 80, T, generator=g) for _ in range(3))
    spks = torch.randn(B, 80, generator=g)
    kw = dict(n_steps=3, noise=noise, meanflow=meanflow)
    backend("native")
    want = cfm(mu, None, spks, cond, **kw)
    backend(name)
    got = cfm(mu, None, spks, cond, **kw)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * max(want.abs().max().item(), 1.0), f"{name}: max abs error {err:.3g}"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("variant", ["chatterbox", "multilingual", "turbo"])
def test_t3_near_greedy_tokens_equal_with_the_fused_sampler(variant, backend, one_thread):
    """With temperature 1e-5 both samplers take the arg-max of the processed logits, so the
    fused Triton sampler (CFG combine, penalty, filters, draw in one kernel) must give the torch
    chain's tokens exactly; multilingual also runs its alignment control between CFG and the kernel."""
    import dataclasses

    from chatterbox_rt.checkpoint import init_dummy_
    from chatterbox_rt.models.t3 import T3, T3Cond, T3Config

    cfg = T3Config.for_variant(variant)
    layers = 14 if variant == "multilingual" else 2
    cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, num_layers=layers, intermediate_size=256))
    m = T3(cfg)
    init_dummy_(m, 0)
    m.eval()
    g = torch.Generator().manual_seed(0)
    cond = T3Cond(torch.randn(1, cfg.speaker_embed_size, generator=g) * 0.1,
                  torch.randint(0, 6561, (1, cfg.speech_cond_prompt_len), generator=g), 0.5)
    body = torch.randint(1, 255, (12,), generator=g)
    text = body if cfg.is_gpt else torch.cat([torch.tensor([cfg.start_text_token]), body,
                                               torch.tensor([cfg.stop_text_token])])
    kw = dict(max_new_tokens=6, temperature=1e-5, stop_on_eos=False)
    backend("native")
    want = m.generate(cond, text, generator=torch.Generator().manual_seed(1), **kw)
    backend("triton")
    assert m._sample_op.backend(torch.device("cpu")) == "triton"
    got = m.generate(cond, text, generator=torch.Generator().manual_seed(1), **kw)
    assert got.tolist() == want.tolist()
