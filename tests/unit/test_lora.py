"""Merging PEFT LoRA adapters into T3 state dicts (chatterbox_rt.lora.merge_lora).

Against PEFT itself (test-only dependency, skipped without it): the reference T3 at reduced
depth with random weights, wrapped with ``get_peft_model`` (whole T3 or its backbone), random LoRA
factors (PEFT's zero-initialised lora_B would make the comparison vacuous), ``save_pretrained``,
then ``merge_and_unload()``: ``merge_lora`` of the weights before must give the merged weights,
and our T3 loaded with them the merged reference's prefill logits. Without PEFT: hand-computed
merges on tiny state dicts and the errors a user sees.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from chatterbox_rt.checkpoint import CheckpointError, load_into
from chatterbox_rt.lora import merge_lora
from chatterbox_rt.models.t3 import T3

from _t3_pairs import (build_pair, cond_tensors, our_config, our_prefill_logits, ref_cond, ref_prefill_logits,
                       text_tokens)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
PREFILL_ATOL = 1e-4
BIG = 16_000_000  # elements


# ------------------------------------------------------------------------------ PEFT side

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_pair(ref, one_thread):
    return build_pair(ref, "chatterbox", seed=3)


@pytest.fixture(scope="module")
def gpt2_pair(ref, one_thread):
    return build_pair(ref, "turbo", seed=4)


def randomise_(model, seed, *, extra=()):
    """Trained-looking LoRA factors (and whatever else ``extra`` names: biases, modules_to_save)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or any(s in name for s in extra):
                p.copy_(0.03 * torch.randn(p.shape, generator=g))
                n += 1
    assert n > 0


def peft_adapter(peft, ref_model, tmp_path, config, *, wrap="t3", seed=0, extra=(), safe=True):
    """-> (T3 state dict before, merged reference T3, adapter dir): the reference T3 (a copy)
    adapted with PEFT, saved, merged with merge_and_unload()."""
    import warnings

    # The big vocabulary tables (Turbo's text tables, 50276 x 1024) no adapter here touches are
    # shared with ref_model rather than copied, to keep the tests fast.
    big = [p for p in ref_model.parameters() if p.numel() > BIG]
    model = copy.deepcopy(ref_model, memo={id(p): p for p in big})
    shared = {p.data_ptr() for p in big}
    before = {k: v if v.data_ptr() in shared else v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrections, custom-model notes
        pm = peft.get_peft_model(model if wrap == "t3" else model.tfmr, config)
        randomise_(pm, seed, extra=extra)
        pm.save_pretrained(str(tmp_path), safe_serialization=safe)
        merged = pm.merge_and_unload()
    if wrap == "tfmr":  # the backbone was adapted in place inside the T3
        assert merged is model.tfmr
    return before, model.eval(), tmp_path


def assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    bad = [(k, (got[k].float() - want[k].float()).abs().max().item()) for k in want
           if got[k] is not want[k] and not torch.equal(got[k], want[k])
           and (got[k].shape != want[k].shape or not torch.allclose(got[k], want[k], atol=1e-6, rtol=0))]
    assert not bad, f"merged tensors differ from PEFT's: {bad}"


def changed(before, after):
    return sorted(k for k in before if before[k] is not after[k] and not torch.equal(before[k], after[k]))


@pytest.mark.parity
def test_llama_t3_attention_mlp_and_heads_match_peft(ref, peft, llama_pair, tmp_path):
    ref_model, _ = llama_pair
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                          target_modules=LLAMA_TARGETS + ["speech_head", "speech_emb"])
    before, merged, adapter = peft_adapter(peft, ref_model, tmp_path, cfg, seed=1)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["fan_in_fan_out"] is False
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # PEFT's saved names: adapter name stripped, embeddings as lora_embedding_A/B parameters.
    assert "base_model.model.tfmr.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.speech_emb.lora_embedding_A" in keys

    got = merge_lora(before, adapter, source="reference chatterbox T3")
    want = merged.state_dict()
    assert_same_state(got, want)
    assert len(changed(before, want)) == 2 * 7 + 2
    # the input is left alone
    assert all(torch.equal(before[k], ref_model.state_dict()[k]) for k in before)


@pytest.mark.parity
def test_llama_backbone_wrapped_bin_file_and_modules_to_save_match_peft(ref, peft, llama_pair, tmp_path):
    ref_model, _ = llama_pair
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                          modules_to_save=["norm"])
    before, merged, adapter = peft_adapter(peft, ref_model, tmp_path, cfg, wrap="tfmr", seed=2,
                                           extra=("modules_to_save.default.",), safe=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    keys = torch.load(adapter / "adapter_model.bin", weights_only=True).keys()
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys  # no "tfmr." when wrapping it
    assert "base_model.model.norm.weight" in keys  # modules_to_save: under the module's own names

    got = merge_lora(before, adapter)
    want = merged.state_dict()
    assert_same_state(got, want)
    # PEFT picks modules_to_save by a plain name.endswith(...): "norm" is every RMSNorm here.
    assert changed(before, want) == sorted(
        [f"tfmr.layers.{i}.{m}.weight" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
        + ["tfmr.norm.weight"])


@pytest.mark.parity
@pytest.mark.parametrize("use_rslora", [False, True])
def test_rslora_rank_and_alpha_patterns_match_peft(ref, peft, llama_pair, tmp_path, use_rslora):
    ref_model, _ = llama_pair
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=LLAMA_TARGETS,
                          rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
                          alpha_pattern={"v_proj": 32, "tfmr.layers.0.mlp.up_proj": 3})
    before, merged, adapter = peft_adapter(peft, ref_model, tmp_path, cfg, seed=5)
    assert_same_state(merge_lora(before, adapter), merged.state_dict())


@pytest.mark.parity
@pytest.mark.parametrize("wrap, bias, lora_bias", [
    ("t3", "none", False),
    ("t3", "lora_only", False),
    ("tfmr", "all", True),
])
def test_gpt2_conv1d_and_biases_match_peft(ref, peft, gpt2_pair, tmp_path, wrap, bias, lora_bias):
    ref_model, _ = gpt2_pair
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=GPT2_TARGETS, bias=bias, lora_bias=lora_bias)
    # "Training" the biases PEFT saves for this setting: those of the adapted layers, or all of them.
    extra = {"none": (), "lora_only": ("base_layer.bias",), "all": (".bias",)}[bias]
    before, merged, adapter = peft_adapter(peft, ref_model, tmp_path, cfg, wrap=wrap, seed=6, extra=extra)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True  # set by PEFT for Conv1D

    got = merge_lora(before, adapter, source="reference turbo T3")
    want = merged.state_dict()
    assert_same_state(got, want)
    moved = changed(before, want)
    assert {k for k in moved if k.endswith(".weight")} == {
        f"tfmr.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    if bias == "all":
        assert "tfmr.h.0.ln_1.bias" in moved and "speech_head.bias" not in moved  # backbone only was wrapped
    elif bias == "lora_only" or lora_bias:
        assert "tfmr.h.1.mlp.c_fc.bias" in moved


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["chatterbox", "turbo"])
def test_prefill_logits_of_merged_t3_match_peft_merged_reference(ref, peft, llama_pair, gpt2_pair, tmp_path,
                                                                 variant):
    ref_model, plain = llama_pair if variant == "chatterbox" else gpt2_pair  # plain: ours, without the adapter
    targets = (LLAMA_TARGETS if variant == "chatterbox" else GPT2_TARGETS) + ["speech_head"]
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    before, merged, adapter = peft_adapter(peft, ref_model, tmp_path, cfg, seed=7)
    ours = T3(our_config(variant, True))
    load_into(ours, merge_lora(before, adapter), f"{variant} T3 + LoRA")
    ours.eval()

    cfg3 = ours.config
    tensors = cond_tensors(cfg3, seed=2)
    text = text_tokens(cfg3, n=20, seed=2)
    with torch.inference_mode():
        want = ref_prefill_logits(merged, ref_cond(ref, tensors), text)
        got = our_prefill_logits(ours, tensors, text)
        base = our_prefill_logits(plain, tensors, text)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= PREFILL_ATOL, f"{variant}: prefill logits differ from PEFT-merged reference by {err:.3g}"
    assert (base - want).abs().max().item() > 100 * PREFILL_ATOL  # the adapter does change the logits


# ------------------------------------------------------------------------------ without PEFT

def write_adapter(d, tensors, *, fmt="safetensors", **config):
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(peft_type="LORA", r=2, lora_alpha=4, target_modules=None, bias="none", lora_dropout=0.0,
               fan_in_fan_out=False, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={})
    cfg.update(config)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    else:
        torch.save(tensors, d / "adapter_model.bin")
    return d


def lora(path, r, n_in, n_out, g, *, name=None, prefix="base_model.model."):
    mid = f".{name}" if name else ""
    return {f"{prefix}{path}.lora_A{mid}.weight": torch.randn(r, n_in, generator=g),
            f"{prefix}{path}.lora_B{mid}.weight": torch.randn(n_out, r, generator=g)}


def meta_state_dict(variant):
    with torch.device("meta"):
        return T3(our_config(variant, True)).state_dict()


def test_hand_computed_linear_conv1d_embedding_and_lora_bias(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "tfmr.layers.0.self_attn.q_proj.weight": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "tfmr.h.0.attn.c_attn.weight": torch.randn(5, 9, generator=g),  # Conv1D: [in, out]
        "tfmr.h.0.attn.c_attn.bias": torch.randn(9, generator=g),
        "speech_emb.weight": torch.randn(7, 5, generator=g),
        "speech_head.weight": torch.randn(7, 5, generator=g),
    }
    original = {k: v.clone() for k, v in sd.items()}
    t = {}
    t.update(lora("layers.0.self_attn.q_proj", 2, 5, 6, g, name="default", prefix=""))  # backbone path, named
    t.update(lora("tfmr.h.0.attn.c_attn", 2, 5, 9, g, name="default"))
    t["base_model.model.tfmr.h.0.attn.c_attn.lora_B.default.bias"] = torch.randn(9, generator=g)
    t["base_model.model.speech_emb.lora_embedding_A.default"] = torch.randn(2, 7, generator=g)
    t["base_model.model.speech_emb.lora_embedding_B.default"] = torch.randn(5, 2, generator=g)
    t["base_model.model.speech_head.weight"] = torch.randn(7, 5, generator=g)  # modules_to_save
    adapter = write_adapter(tmp_path / "a", t, lora_bias=True, lora_alpha=3,
                            target_modules=["q_proj", "c_attn", "speech_emb"], modules_to_save=["speech_head"])
    got = merge_lora(sd, adapter)

    s = 3 / 2
    A, B = t["layers.0.self_attn.q_proj.lora_A.default.weight"], t["layers.0.self_attn.q_proj.lora_B.default.weight"]
    q = (original["tfmr.layers.0.self_attn.q_proj.weight"].float() + s * (B @ A)).to(torch.bfloat16)
    assert got["tfmr.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(got["tfmr.layers.0.self_attn.q_proj.weight"], q)
    p = "base_model.model.tfmr.h.0.attn.c_attn."
    A, B = t[p + "lora_A.default.weight"], t[p + "lora_B.default.weight"]
    torch.testing.assert_close(got["tfmr.h.0.attn.c_attn.weight"], original["tfmr.h.0.attn.c_attn.weight"]
                               + s * (B @ A).T, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["tfmr.h.0.attn.c_attn.bias"], original["tfmr.h.0.attn.c_attn.bias"]
                               + s * t[p + "lora_B.default.bias"], atol=1e-6, rtol=0)
    p = "base_model.model.speech_emb."
    A, B = t[p + "lora_embedding_A.default"], t[p + "lora_embedding_B.default"]
    torch.testing.assert_close(got["speech_emb.weight"], original["speech_emb.weight"] + s * (B @ A).T,
                               atol=1e-6, rtol=0)
    assert torch.equal(got["speech_head.weight"], t["base_model.model.speech_head.weight"])
    assert all(torch.equal(sd[k], original[k]) for k in sd)  # input untouched


def test_bin_weights_load_only_as_weights(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"tfmr.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)}
    t = lora("tfmr.layers.0.mlp.up_proj", 2, 3, 4, g)
    got = merge_lora(sd, write_adapter(tmp_path / "ok", t, fmt="bin", use_rslora=True, lora_alpha=2))
    p = "base_model.model.tfmr.layers.0.mlp.up_proj."
    A, B = t[p + "lora_A.weight"], t[p + "lora_B.weight"]
    torch.testing.assert_close(got["tfmr.layers.0.mlp.up_proj.weight"], (2 / 2 ** 0.5) * (B @ A), atol=1e-6, rtol=0)

    bad = write_adapter(tmp_path / "bad", t, fmt="bin")
    torch.save({"x": torch.nn.Linear(2, 2)}, bad / "adapter_model.bin")  # a pickled module, not tensors
    with pytest.raises(CheckpointError, match="cannot read LoRA adapter weights"):
        merge_lora(sd, bad)


def test_missing_directory_config_and_weights(tmp_path):
    sd = {"tfmr.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)}
    with pytest.raises(CheckpointError, match="LoRA adapter directory not found"):
        merge_lora(sd, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        merge_lora(sd, tmp_path / "empty")
    d = write_adapter(tmp_path / "noweights", {})
    (d / "adapter_model.safetensors").unlink()
    expected = "no weights file: expected adapter_model.safetensors or adapter_model.bin"
    with pytest.raises(CheckpointError, match=expected):
        merge_lora(sd, d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read LoRA adapter config"):
        merge_lora(sd, d)


@pytest.mark.parametrize("config, match", [
    (dict(peft_type="IA3"), "is a IA3 adapter; only LoRA"),
    (dict(peft_type=None), "no peft_type"),
    (dict(use_dora=True), "DoRA adapters are not supported"),
    (dict(init_lora_weights="pissa_niter_4"), "residual"),
    (dict(trainable_token_indices=[1, 2]), "trainable tokens"),
    (dict(bias="sometimes"), "unknown bias setting"),
])
def test_refused_configs(tmp_path, config, match):
    g = torch.Generator().manual_seed(2)
    sd = {"tfmr.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)}
    with pytest.raises(CheckpointError, match=match):
        merge_lora(sd, write_adapter(tmp_path, lora("tfmr.layers.0.mlp.up_proj", 2, 3, 4, g), **config))


def test_dora_magnitudes_without_use_dora_refused(tmp_path):
    g = torch.Generator().manual_seed(2)
    t = lora("tfmr.layers.0.mlp.up_proj", 2, 3, 4, g)
    t["base_model.model.tfmr.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.ones(4)
    with pytest.raises(CheckpointError, match="no plain LoRA factors.*lora_magnitude_vector"):
        merge_lora({"tfmr.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)}, write_adapter(tmp_path, t))


def test_unknown_modules_listed(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = meta_state_dict("chatterbox")
    t = lora("tfmr.layers.0.self_attn.q_proj", 2, 1024, 1024, g)
    t.update(lora("tfmr.layers.0.self_attn.qkv_proj", 2, 1024, 3072, g))
    t.update(lora("h.0.attn.c_attn", 2, 1024, 3072, g))  # a Turbo adapter's module on English
    t["base_model.model.lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        merge_lora(sd, write_adapter(tmp_path, t), source="t3_cfg.safetensors")
    msg = str(e.value)
    assert "match no weight of t3_cfg.safetensors (3)" in msg
    assert "tfmr.layers.0.self_attn.qkv_proj" in msg and "h.0.attn.c_attn" in msg
    assert "base_model.model.lm_head.weight" in msg
    assert "self_attn.q_proj," not in msg  # the one that fits is not listed


def test_turbo_adapter_on_nano_is_a_shape_error_naming_modules(tmp_path):
    g = torch.Generator().manual_seed(4)
    t = {}
    for i in range(2):
        t.update(lora(f"h.{i}.attn.c_attn", 4, 1024, 3072, g))  # Turbo's widths (GPT-2 medium)
        t.update(lora(f"h.{i}.mlp.c_fc", 4, 1024, 1024, g))
    adapter = write_adapter(tmp_path, t, r=4, target_modules=["c_attn", "c_fc"])
    with pytest.raises(CheckpointError) as e:
        merge_lora(meta_state_dict("nano"), adapter, source="t3_nano_v1.safetensors")
    msg = str(e.value)
    assert "shape mismatches (4; was the adapter trained for another Chatterbox variant?)" in msg
    assert ("h.0.attn.c_attn: lora_A [4, 1024], lora_B [3072, 4] give a [1024, 3072] update, "
            "but tfmr.h.0.attn.c_attn.weight is [768, 2304]") in msg
    # the same adapter fits Turbo's shapes (checked before any arithmetic, so meta tensors do)
    turbo = meta_state_dict("turbo")
    assert merge_lora(turbo, adapter)["tfmr.h.0.attn.c_attn.weight"].shape == (1024, 3072)


def test_a_without_b_rank_disagreement_and_untargeted_modules(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {f"tfmr.layers.0.self_attn.{m}_proj.weight": torch.zeros(4, 4) for m in "qkvo"}
    t = lora("tfmr.layers.0.self_attn.q_proj", 2, 4, 4, g)
    t.update(lora("tfmr.layers.0.self_attn.k_proj", 3, 4, 4, g))  # rank 3, config says 2
    t.update(lora("tfmr.layers.0.self_attn.o_proj", 2, 4, 4, g))  # not a target
    t["base_model.model.tfmr.layers.0.self_attn.v_proj.lora_A.weight"] = torch.zeros(2, 4)
    with pytest.raises(CheckpointError) as e:
        merge_lora(sd, write_adapter(tmp_path, t, target_modules=["q_proj", "k_proj", "v_proj"]))
    msg = str(e.value)
    assert "tfmr.layers.0.self_attn.v_proj: lora_A without lora_B" in msg
    assert "tfmr.layers.0.self_attn.k_proj: rank in the weights (lora_A [3, 4], lora_B [4, 3]) disagrees " \
           "with the config's r=2" in msg
    assert "not in the config's target_modules ['q_proj', 'k_proj', 'v_proj'] (1): " \
           "tfmr.layers.0.self_attn.o_proj" in msg


def test_rank_pattern_and_regex_targets_follow_peft_rules(tmp_path):
    g = torch.Generator().manual_seed(6)
    sd = {f"tfmr.layers.{i}.self_attn.q_proj.weight": torch.zeros(4, 4) for i in range(2)}
    t = lora("tfmr.layers.0.self_attn.q_proj", 3, 4, 4, g)
    t.update(lora("tfmr.layers.1.self_attn.q_proj", 2, 4, 4, g))
    adapter = write_adapter(tmp_path, t, r=2, lora_alpha=6, rank_pattern={r"layers\.0\.self_attn\.q_proj": 3},
                            alpha_pattern={"q_proj": 1, "layers.1.self_attn.q_proj": 100},  # first match wins
                            target_modules=r".*\.q_proj")
    got = merge_lora(sd, adapter)
    for i, (r, alpha) in enumerate([(3, 1), (2, 1)]):
        p = f"base_model.model.tfmr.layers.{i}.self_attn.q_proj."
        want = alpha / r * (t[p + "lora_B.weight"] @ t[p + "lora_A.weight"])
        torch.testing.assert_close(got[f"tfmr.layers.{i}.self_attn.q_proj.weight"], want, atol=1e-6, rtol=0)


def test_several_adapters_in_one_file_refused(tmp_path):
    g = torch.Generator().manual_seed(7)
    t = lora("tfmr.layers.0.mlp.up_proj", 2, 3, 4, g, name="speaker_a")
    t.update(lora("tfmr.layers.0.mlp.gate_proj", 2, 3, 4, g, name="speaker_b"))
    sd = {f"tfmr.layers.0.mlp.{m}_proj.weight": torch.zeros(4, 3) for m in ("up", "gate")}
    with pytest.raises(CheckpointError, match="several adapters"):
        merge_lora(sd, write_adapter(tmp_path, t))


def test_module_imports_without_peft_or_transformers():
    code = ("import sys, chatterbox_rt.lora; "
            "bad = [m for m in ('peft', 'transformers', 'chatterbox') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
