"""T3 behaviour without the reference: cache consistency, no host sync, sampling, EOS handling."""
import dataclasses

import pytest
import torch

from chatterbox_rt.checkpoint import init_dummy_
from chatterbox_rt.models.t3 import T3, KVCache, T3Cond, T3Config
from chatterbox_rt.models.t3.alignment import AlignmentController
from chatterbox_rt.models.t3.linear import BlockedLinear, Conv1D, Linear, linear
from chatterbox_rt.models.t3.sampling import SamplingParams, process_gpt, process_llama, sample_no_sync

VARIANTS = ["chatterbox", "multilingual", "turbo", "nano"]
SMALL = {
    "chatterbox": dict(num_layers=2, intermediate_size=2048),
    "multilingual": dict(num_layers=14, intermediate_size=256),
    "turbo": dict(num_layers=2, intermediate_size=2048, gpt2_vocab_size=64),
    "nano": dict(num_layers=2, intermediate_size=1536, gpt2_vocab_size=64),
}


def small_config(variant):
    cfg = T3Config.for_variant(variant)
    return cfg.replace(backbone=dataclasses.replace(cfg.backbone, **SMALL[variant]))


def small_model(variant, seed=0, device="cpu"):
    with torch.device(device):
        m = T3(small_config(variant))
    if device != "meta":
        init_dummy_(m, seed)
    return m.eval()


def make_cond(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return T3Cond(torch.randn(1, cfg.speaker_embed_size, generator=g) * 0.1,
                  torch.randint(0, 6561, (1, cfg.speech_cond_prompt_len), generator=g), 0.5)


def make_text(cfg, n=10, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    body = torch.randint(1, 255, (n,), generator=g)
    if cfg.is_gpt:
        return body
    return torch.cat([torch.tensor([cfg.start_text_token]), body, torch.tensor([cfg.stop_text_token])])


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_presets(variant):
    cfg = T3Config.for_variant(variant)
    assert cfg.variant == variant
    assert cfg.uses_cfg == (variant in ("chatterbox", "multilingual"))
    assert bool(cfg.alignment_heads) == (variant == "multilingual")
    if variant == "nano":
        b = cfg.backbone
        assert (b.hidden_size, b.num_heads, b.num_layers) == (768, 12, 12)
    with pytest.raises(ValueError, match="unknown Chatterbox variant"):
        T3Config.for_variant("klingon")


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_steps_match_full_prefill(variant):
    """Prefill + cached decode steps give the logits a prefill of the whole sequence gives."""
    m = small_model(variant)
    cfg = m.config
    with torch.inference_mode():
        embeds, _ = m.prompt_embeds(make_cond(cfg), make_text(cfg), cfg=cfg.uses_cfg)
        B, P, _ = embeds.shape
        tokens = torch.randint(0, 6561, (5,))
        m.prefill(embeds, max_len=P + 8)
        pos = torch.full((B,), P)
        speech_pos = torch.ones(B, dtype=torch.long) if cfg.learned_pos_emb else None
        for i, t in enumerate(tokens):
            step_logits = m.decode_step(t.expand(B), pos, speech_pos, kv_len=P + i + 1)
            # the graph-capture form (whole cache, masked) gives the same result
            full_cache = m.decode_step(t.expand(B), pos, speech_pos, kv_len=None)
            torch.testing.assert_close(full_cache, step_logits, rtol=1e-5, atol=1e-5)
            pos += 1
            if speech_pos is not None:
                speech_pos += 1
        seq = torch.cat([embeds, torch.cat([m.embed_speech(t.expand(B), None if speech_pos is None else
                                                           torch.full((B,), i + 1)) for i, t in enumerate(tokens)],
                                           dim=1)], dim=1)
        m._cache = None
        whole = m.prefill(seq)
    torch.testing.assert_close(step_logits, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_has_static_shapes_and_no_host_sync(variant):
    """On the meta device every data-dependent operation (.item(), nonzero, boolean
    indexing, a Python branch on a value) raises, so this proves the decode step and the
    sampling step never need the host to look at device data."""
    m = small_model(variant, device="meta")
    cfg, b = m.config, m.config.backbone
    B = 2 if cfg.uses_cfg else 1
    m._cache = KVCache(b.num_layers, b.num_heads, b.head_dim, B, 64, torch.float32, torch.device("meta"))
    tok = torch.zeros(B, dtype=torch.long, device="meta")
    pos = torch.full((B,), 10, dtype=torch.long, device="meta")
    speech_pos = torch.ones(B, dtype=torch.long, device="meta") if cfg.learned_pos_emb else None
    with torch.inference_mode():
        logits = m.decode_step(tok, pos, speech_pos, kv_len=None)
        assert logits.shape == (B, cfg.speech_vocab_size)
        seen = torch.zeros(1, cfg.speech_vocab_size, dtype=torch.bool, device="meta")
        p = SamplingParams(0.8, 0.9, 0.05, 50, 1.2, 0.5).validate()
        processed = process_gpt(logits, seen, p) if cfg.is_gpt else process_llama(logits[:1], seen, p)
        nxt = sample_no_sync(torch.softmax(processed, -1))
        assert nxt.shape == (1,)


def test_alignment_controller_has_no_host_sync():
    ctl = AlignmentController(3, 15, 20, 6562, torch.device("meta"))
    logits = torch.zeros(1, 8194, device="meta")
    out = ctl.step(torch.zeros(3, 2, 19, device="meta"), logits, None)
    out = ctl.step(torch.zeros(3, 1, 20, device="meta"), out, torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (1, 8194)


def test_generate_is_seeded_and_reuses_the_cache():
    m = small_model("chatterbox")
    cfg = m.config
    cond, text = make_cond(cfg), make_text(cfg, n=20)
    a = m.generate(cond, text, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    cache = m._cache
    b = m.generate(cond, text, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    c = m.generate(cond, text, max_new_tokens=12, generator=torch.Generator().manual_seed(2))
    assert m._cache is cache, "a request that fits must reuse the allocated cache"
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # a shorter prompt after a longer one: stale cache entries must not leak into attention
    short = make_text(cfg, n=5)
    fresh = small_model("chatterbox")
    want = fresh.generate(cond, short, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    got = m.generate(cond, short, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    assert got.tolist() == want.tolist()


def _force_eos(m):
    """Make EOS certain: a head with a huge EOS bias."""
    head = Linear(m.config.hidden_size, m.config.speech_vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.speech_head.weight)
        head.bias.zero_()
        head.bias[m.config.stop_speech_token] = 1e4
    m.speech_head = head


def test_llama_stops_at_eos_and_excludes_it():
    m = small_model("chatterbox")
    _force_eos(m)
    cfg = m.config
    out = m.generate(make_cond(cfg), make_text(cfg), max_new_tokens=30, temperature=1e-5)
    assert out.numel() == 0


def test_turbo_ignores_an_eos_drawn_first_like_the_reference():
    """The reference's Turbo loop checks EOS only from the second draw on."""
    m = small_model("turbo")
    _force_eos(m)
    cfg = m.config
    calls = []
    original = m.decode_step
    m.decode_step = lambda *a, **k: calls.append(1) or original(*a, **k)
    out = m.generate(make_cond(cfg), make_text(cfg), max_new_tokens=30, temperature=1e-5)
    assert out.numel() == 0
    assert len(calls) == 1, "Turbo must draw a second token after a first EOS, then stop"


def test_stop_on_eos_false_draws_exactly_max_new_tokens():
    m = small_model("nano")
    _force_eos(m)
    out = m.generate(make_cond(m.config), make_text(m.config), max_new_tokens=9, stop_on_eos=False)
    assert out.shape == (9,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(cfg_weight=-1.0), "cfg_weight"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10_000), "max_new_tokens"),
])
def test_bad_sampling_arguments_are_rejected(kwargs, match):
    m = small_model("chatterbox")
    with pytest.raises(ValueError, match=match):
        m.generate(make_cond(m.config), make_text(m.config), **kwargs)


def test_bad_text_tokens_are_rejected():
    m = small_model("chatterbox")
    cond = make_cond(m.config)
    with pytest.raises(ValueError, match="1-D"):
        m.generate(cond, torch.tensor([[255, 3, 0]]))
    with pytest.raises(ValueError, match="start"):
        m.generate(cond, torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="empty"):
        m.generate(cond, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="text token ids"):
        m.generate(cond, torch.tensor([255, 9999, 0]))


def test_defaults_follow_the_reference_per_variant():
    assert T3Config.for_variant("chatterbox").sampling.repetition_penalty == 1.2
    assert T3Config.for_variant("multilingual").sampling.repetition_penalty == 2.0
    turbo = T3Config.for_variant("turbo").sampling
    assert (turbo.top_k, turbo.top_p, turbo.temperature) == (1000, 0.95, 0.8)


def test_sample_no_sync_frequencies_match_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample_no_sync(probs, g) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[4] == 0, "a zero-probability token was drawn"
    # 5 standard deviations of a binomial proportion
    tol = 5 * torch.sqrt(probs[0].double() * (1 - probs[0].double()) / n) + 1e-12
    assert torch.all((freq - probs[0].double()).abs() <= tol), f"frequencies {freq.tolist()}"


# ------------------------------------------------------------------------------ linear layers


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 40])
@pytest.mark.parametrize("n_in, n_out", [(64, 48), (1024, 96), (1536, 80), (3072, 33)])
def test_linear_layouts_match_f_linear(rows, n_in, n_out):
    torch.manual_seed(0)
    x = torch.randn(rows, n_in)
    w = torch.randn(n_out, n_in) / n_in ** 0.5
    b = torch.randn(n_out)
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    if n_in % 512 == 0 and n_in > 1024:
        for conv1d in (False, True):
            layer = BlockedLinear(n_in, n_out, conv1d=conv1d)
            layer.load_state_dict({"weight": w.t() if conv1d else w, "bias": b})
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
            sd = layer.state_dict()
            assert torch.equal(sd["weight"], w.t() if conv1d else w)
    conv = Conv1D(n_in, n_out)
    conv.load_state_dict({"weight": w.t(), "bias": b})
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    assert conv.weight.t().is_contiguous()


def test_blocked_linear_rejects_wrong_shapes():
    layer = BlockedLinear(2048, 16, bias=False)
    with pytest.raises(RuntimeError, match=r"shape in current model is \[16, 2048\]"):
        layer.load_state_dict({"weight": torch.zeros(2048, 16)})


def test_layouts_survive_dtype_moves():
    layer = Conv1D(64, 32)
    assert layer.to(torch.float64).weight.t().is_contiguous()
    lin = Linear(8, 4)
    assert lin(torch.randn(1, 8)).shape == (1, 4)


# ------------------------------------------------------------------------------ CPU decode kernels

@pytest.mark.parametrize("kernel", ["onednn", "wxt", "mkl"])
@pytest.mark.parametrize("conv1d", [False, True])
def test_decode_kernels_keep_the_checkpoint_layout(monkeypatch, kernel, conv1d):
    """Both CPU decode kernels give F.linear's result (within rounding) for decode and prefill
    row counts; with oneDNN the weight is packed on first use and still saved, loaded and moved
    in the checkpoint layout."""
    import chatterbox_rt.models.t3.linear as lin_mod

    if kernel == "onednn" and not lin_mod._onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(lin_mod, "_decode_kernel", kernel)
    torch.manual_seed(0)
    n_in, n_out = 96, 40
    w = torch.randn(n_out, n_in) / n_in ** 0.5
    b = torch.randn(n_out)
    ckpt_w = w.t().contiguous() if conv1d else w
    layer = Conv1D(n_in, n_out) if conv1d else Linear(n_in, n_out)
    layer.load_state_dict({"weight": ckpt_w, "bias": b})
    with torch.inference_mode():
        for rows in (1, 2, 7, 40):
            x = torch.randn(rows, n_in)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert layer.packed == (kernel == "onednn")
    sd = layer.state_dict()
    assert sd.keys() == {"weight", "bias"} and torch.equal(sd["weight"], ckpt_w)
    assert torch.equal(layer.dense_weight(), ckpt_w)
    # loading into a packed layer, then moving it, goes back through the dense parameter
    w2 = torch.randn(n_out, n_in)
    layer.load_state_dict({"weight": w2.t().contiguous() if conv1d else w2, "bias": b})
    assert not layer.packed
    with torch.inference_mode():
        layer(torch.randn(2, n_in))
    layer64 = layer.to(torch.float64)
    assert not layer64.packed and layer64.weight.dtype == torch.float64
    x = torch.randn(3, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer64(x), torch.nn.functional.linear(x, w2.double(), b.double()))
    if conv1d:
        assert layer64.weight.shape == (n_in, n_out) and layer64.weight.t().is_contiguous()


def test_decode_kernel_is_not_packed_under_autograd(monkeypatch):
    import chatterbox_rt.models.t3.linear as lin_mod

    monkeypatch.setattr(lin_mod, "_decode_kernel", "onednn")
    layer = Linear(16, 8)
    layer(torch.randn(2, 16)).sum().backward()
    assert not layer.packed and layer.weight.grad is not None


def test_decode_kernel_env_is_checked(monkeypatch):
    import chatterbox_rt.models.t3.linear as lin_mod

    monkeypatch.setattr(lin_mod, "_decode_kernel", None)
    monkeypatch.setenv(lin_mod.DECODE_KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="CHATTERBOX_RT_CPU_DECODE='fastest'"):
        lin_mod.decode_kernel()
    monkeypatch.setenv(lin_mod.DECODE_KERNEL_ENV, "wxt")
    assert lin_mod.decode_kernel() == "wxt"


def test_decode_kernel_probe_runs_when_the_first_t3_is_built_on_the_meta_device():
    """A fresh process whose first T3 is built under ``torch.device("meta")`` (the onnxruntime
    backend's OrtT3 does) still measures the kernel on real CPU tensors."""
    import subprocess
    import sys

    code = ("import torch\n"
            "with torch.device('meta'):\n"
            "    from chatterbox_rt.models.t3.linear import make_linear, decode_kernel\n"
            "    m = make_linear(4096, 1024)\n"
            "print(m.weight.device, decode_kernel())\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "CHATTERBOX_RT_CPU_DECODE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    dev, kernel = out.stdout.split()
    assert dev == "meta" and kernel in ("onednn", "wxt")
