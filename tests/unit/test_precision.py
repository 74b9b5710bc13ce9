"""chatterbox_rt.PrecisionConfig and ``precision=``: every mode runs, the dtypes land where the
configuration says, bad input is refused before anything loads, the quality bounds of the table
hold (full-size Nano), and the engine keeps batch invariance with 8-bit weights."""
import subprocess
import sys

import pytest
import torch

import chatterbox_rt
from chatterbox_rt import TTS, PrecisionConfig
from chatterbox_rt.engine import Engine
from chatterbox_rt.models.t3.config import smaller_backbone
from chatterbox_rt.models.t3.quant import Int8Linear, fp8_supported
from chatterbox_rt.precision import AUTO, QUALITY_BOUNDS
from chatterbox_rt.profiling import precision_quality as pq

SMALL = smaller_backbone("nano", num_layers=2)
SMALL_EN = smaller_backbone("chatterbox", num_layers=2)


# ------------------------------------------------------------------------------ the config


def test_public_name_and_fields():
    assert chatterbox_rt.PrecisionConfig is PrecisionConfig
    c = PrecisionConfig(t3_weights="INT8", t3_activations=torch.bfloat16, kv_cache="float32", cfm="half")
    assert (c.t3_weights, c.t3_activations, c.kv_cache, c.cfm, c.hift) == ("int8", "bf16", "fp32", "fp16", "fp32")
    assert c.dtype("kv_cache") == torch.float32 and c.dtype("t3_activations") == torch.bfloat16
    assert PrecisionConfig().dtype("kv_cache") == torch.float32  # None: the activations'
    # Dense weights in the activation dtype are the default form, spelt out or not.
    assert PrecisionConfig(t3_weights="bf16", t3_activations="bf16") == PrecisionConfig(t3_activations="bf16")


@pytest.mark.parametrize("kw, match", [
    (dict(t3_activations="fp64"), "t3_activations"),
    (dict(hift="int8"), "hift"),
    (dict(t3_weights="int4"), "t3_weights"),
    (dict(t3_weights="fp16", t3_activations="fp32"), "activation dtype"),
])
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        PrecisionConfig(**kw)


def test_resolve_modes():
    r = PrecisionConfig.resolve
    assert r(None, None) == PrecisionConfig()
    assert r(None, torch.bfloat16) == PrecisionConfig.uniform("bf16")  # the legacy dtype=
    assert r("bf16") == PrecisionConfig(t3_activations="bf16", flow_encoder="bf16", cfm="bf16", hift="bf16")
    assert r("bf16").frontends == "fp32"
    assert r("int8", device="cpu") == AUTO["cpu"].with_(t3_weights="int8")
    assert r("int8", device="cuda").t3_weights == "int8"
    assert r("auto", device="cpu") == AUTO["cpu"]
    assert r("auto", device="cuda") == AUTO["cuda"]
    cfg = PrecisionConfig(cfm="bf16")
    assert r(cfg, torch.float32) is cfg
    with pytest.raises(ValueError, match="not both"):
        r("bf16", torch.float16)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        r("int4")
    with pytest.raises(TypeError, match="PrecisionConfig"):
        r(8)


def test_fp8_refused_where_it_cannot_run():
    why = fp8_supported("cpu")
    assert why and "CUDA" in why
    with pytest.raises(ValueError, match="fp8"):
        PrecisionConfig.resolve("fp8", device="cpu")


def test_every_default_has_a_documented_bound():
    """A default is a mode with a bound that the quality tests below check."""
    for kind, config in AUTO.items():
        assert pq.MODES[f"auto ({kind})"] == config and f"auto ({kind})" in QUALITY_BOUNDS


# ------------------------------------------------------------------------------ the models


@pytest.fixture(scope="module")
def base():
    return TTS.from_dummy("nano", seed=0, device="cpu", **SMALL)


def _dtypes(tts):
    s = tts.s3gen
    return dict(t3=tts.t3.dtype, kv=tts.t3.kv_dtype, flow=s.flow.encoder_proj.weight.dtype,
                cfm=s.flow.decoder.estimator.dtype, hift=s.mel2wav.conv_pre.weight.dtype,
                f0=s.mel2wav.f0_predictor.classifier.weight.dtype,
                tok=next(s.tokenizer.encoder.parameters()).dtype,
                ve=next(tts.ve.lstm.parameters()).dtype)


@pytest.mark.parametrize("precision", ["fp32", "bf16", pytest.param("fp16", marks=pytest.mark.slow), "int8", "auto",
                                       pytest.param(PrecisionConfig(t3_activations="bf16", kv_cache="fp32", flow_encoder="fp16",
                                                                    cfm="bf16", hift="fp32", frontends="bf16"),
                                                    marks=pytest.mark.slow, id="mixed")])
def test_every_mode_runs_end_to_end(base, precision):
    tts = TTS.from_dummy("nano", seed=0, device="cpu", precision=precision, **SMALL)
    cfg = PrecisionConfig.resolve(precision, device="cpu")
    assert tts.precision == cfg
    d = _dtypes(tts)
    assert d["t3"] == cfg.dtype("t3_activations") and d["kv"] == cfg.dtype("kv_cache")
    assert d["flow"] == cfg.dtype("flow_encoder") and d["cfm"] == cfg.dtype("cfm") and d["hift"] == cfg.dtype("hift")
    assert d["f0"] == torch.float32  # HiFT's fp32 island
    assert d["ve"] == cfg.dtype("frontends") and d["tok"] == cfg.dtype("frontends")
    n_quant = sum(isinstance(m, Int8Linear) for m in tts.t3.modules())
    assert (n_quant > 0) == (cfg.t3_weights == "int8")
    voice = tts.prepare_conditionals(0.1 * torch.randn(6 * 24000).numpy(), sr=24000)
    wav = tts.generate("Hello there.", voice=voice, seed=0, max_new_tokens=12, n_steps=1, watermark=False)
    assert wav.dtype == torch.float32 and wav.shape[-1] > 0 and bool(torch.isfinite(wav).all())
    if tts.t3._cache is not None:
        assert tts.t3._cache.kv.dtype == cfg.dtype("kv_cache")


def test_legacy_dtype_is_the_uniform_config():
    tts = TTS.from_dummy("nano", seed=0, device="cpu", dtype=torch.bfloat16, **SMALL)
    assert tts.precision == PrecisionConfig.uniform("bf16") and tts.dtype == torch.bfloat16


def test_int8_state_dict_keeps_the_checkpoint_view(base):
    tts = TTS.from_dummy("nano", seed=0, device="cpu", precision="int8", **SMALL)
    ref, got = base.t3.state_dict(), tts.t3.state_dict()
    assert set(ref) == set(got)
    quantised = 0
    for k, v in ref.items():
        assert got[k].shape == v.shape, k
        err = (got[k].float() - v.float()).abs()
        if v.dim() != 2 or torch.equal(got[k], v):
            assert torch.equal(got[k], v), k  # embeddings, heads, norms, biases: untouched
            continue
        # int8 per output channel: each weight within half a step (max |w| / 127 / 2) of the fp32
        # value, the channel being a row ([out, in]) or, for GPT-2's Conv1D ([in, out]), a column
        ok = [bool(torch.all(err <= v.abs().amax(dim=d, keepdim=True) / 254 + 1e-7)) for d in (1, 0)]
        assert any(ok), k
        quantised += 1
    assert quantised == sum(isinstance(m, Int8Linear) for m in tts.t3.modules())


def test_other_backends_refuse_a_precision():
    with pytest.raises(ValueError, match="exported graphs' precision"):
        TTS.from_dummy("nano", backend="onnxruntime", precision="int8", **SMALL)


# ------------------------------------------------------------------------------ quality


QUALITY_MODES = ("bf16", "fp16", "int8", "auto (cpu)", "auto (cuda)")
# make test measures the CPU's modes; the half-precision ones (emulated, slow on a CPU) under make test-all.
QUALITY_SLOW = ("bf16", "fp16", "auto (cuda)")
_quality: dict = {}


def _measure(modes) -> dict:
    """The table's measurement at full size (Nano: its 12-layer GPT-2 T3 and the real S3Gen), shorter;
    once per group of modes per module run."""
    key = tuple(modes)
    if key not in _quality:
        _quality[key] = pq.measure("nano", {k: pq.MODES[k] for k in modes}, steps=60, s3_tokens=30)
    return _quality[key]


@pytest.fixture(scope="module", autouse=True)
def _forget_quality():
    yield
    _quality.clear()


@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow) if m in QUALITY_SLOW else m
                                  for m in QUALITY_MODES])
def test_quality_within_documented_bounds(mode):
    group = QUALITY_SLOW if mode in QUALITY_SLOW else tuple(m for m in QUALITY_MODES if m not in QUALITY_SLOW)
    row, bound = _measure(group)[mode], QUALITY_BOUNDS[mode]
    for metric, limit in bound.items():
        if metric not in row:
            continue
        if metric in pq.HIGHER_IS_BETTER:
            assert row[metric] >= limit, f"{mode}: {metric} {row[metric]:.4g} < bound {limit}"
        else:
            assert row[metric] <= limit, f"{mode}: {metric} {row[metric]:.4g} > bound {limit}"


def test_quality_metrics_see_a_difference():
    """The metrics are not blind: a perturbed model measures worse than the mode bounds allow."""
    ref = torch.randn(40, 100)
    worse = pq.t3_metrics(ref, ref + 0.5 * torch.randn_like(ref))
    assert worse["kl"] > QUALITY_BOUNDS["int8"]["kl"] and worse["top1_agree"] < 1.0
    assert pq.t3_metrics(ref, ref)["kl"] == 0.0
    w = torch.randn(24000)
    assert pq.lsd_db(w, w) == 0.0 and pq.lsd_db(w, w + 0.3 * torch.randn_like(w)) > 1.0


# ------------------------------------------------------------------------------ engine, CLI


def test_engine_batch_invariance_with_int8_weights():
    tts = TTS.from_dummy("chatterbox", seed=0, device="cpu", precision="int8", **SMALL_EN)
    texts = ["Hello there.", "A second sentence, a bit longer.", "Third one."]
    settings = [(t, dict(seed=40 + i, max_new_tokens=10 + 4 * i)) for i, t in enumerate(texts)]
    with Engine(tts, max_batch=6, max_len=512) as eng:
        assert eng.mode == "invariant" and eng._runner.group_rows >= 2
        reqs = [eng.submit(t, watermark=False, n_steps=1, **kw) for t, kw in settings]
        for r in reqs:
            r.result(timeout=600)
    for r, (text, kw) in zip(reqs, settings, strict=True):
        assert torch.equal(r.tokens, tts.t3_tokens(text, **kw)), text


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chatterbox_rt.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_precision(tmp_path):
    out = tmp_path / "a.wav"
    r = _cli("synth", "Hi there.", "-o", str(out), "--dummy-weights", "--variant", "nano", "--t3-layers", "2",
             "--precision", "int8", "--tokens", "8", "--seed", "0", "--no-watermark")
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 44
    for bad, msg in ((["--precision", "int4"], "unknown precision 'int4'"),
                     (["--precision", "bf16", "--dtype", "fp16"], "not both"),
                     (["--precision", "fp8"], "fp8")):
        r = _cli("synth", "Hi.", "-o", str(tmp_path / "b.wav"), "--dummy-weights", "--variant", "nano", *bad)
        assert r.returncode != 0 and msg in r.stderr, r.stderr
        assert not (tmp_path / "b.wav").exists()  # refused before anything was written


# ------------------------------------------------------------------------------ GPU (skips without one)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16/int8 Triton/fp8 paths)")


@CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8", "auto", "fp8"])
def test_modes_on_cuda(precision):
    if precision == "fp8" and fp8_supported("cuda"):
        pytest.skip(fp8_supported("cuda"))
    tts = TTS.from_dummy("nano", seed=0, device="cuda", precision=precision, **SMALL)
    wav = tts.generate("Hello there.", seed=0, max_new_tokens=12, n_steps=1, watermark=False)
    assert bool(torch.isfinite(wav).all()) and wav.shape[-1] > 0


@CUDA
def test_quality_bounds_on_cuda():
    modes = {k: pq.MODES[k] for k in ("bf16", "int8")}
    table = pq.measure("nano", modes, steps=40, s3_tokens=30, device="cuda", **SMALL)
    for mode, row in table.items():
        if mode not in QUALITY_BOUNDS:
            continue
        for metric, limit in QUALITY_BOUNDS[mode].items():
            if metric in row:
                ok = row[metric] >= limit if metric in pq.HIGHER_IS_BETTER else row[metric] <= limit
                assert ok, f"{mode} on CUDA: {metric} {row[metric]:.4g} vs bound {limit}"
