"""What ``TTS`` hands on from T3, checked against the reference's own rules with forced draws:
a start-of-speech token drawn mid-sequence (``drop_invalid_tokens``), the Turbo/Nano token budget
(one draw from the prefill plus 1000), the text limit of the GPT-2 variants, the multilingual
variant's upstream behaviour (the final token's audio dropped), and the missing-files check."""
import pytest
import torch

import chatterbox_rt.models.t3.request as t3_request
from chatterbox_rt import TTS
from chatterbox_rt.checkpoint import CheckpointError
from chatterbox_rt.models.t3.config import smaller_backbone
from chatterbox_rt.tts import SAMPLES_PER_TOKEN

SOS, EOS = 6561, 6562


def small(variant: str) -> TTS:
    return TTS.from_dummy(variant, seed=0, device="cpu", **smaller_backbone(variant, num_layers=1))


@pytest.fixture(scope="module")
def english():
    return small("chatterbox")


@pytest.fixture(scope="module")
def nano():
    return small("nano")


def force_draws(monkeypatch, draws):
    """T3's torch sampling path returns ``draws`` in order (then EOS-free filler 7)."""
    it = iter(draws)
    monkeypatch.setattr(t3_request, "sample_no_sync", lambda probs, gen=None: torch.tensor([next(it, 7)]))


def reference_valid_tokens(ref, draws):
    """The reference English generate's token cut: ``drop_invalid_tokens`` then ``< 6561``."""
    from chatterbox.models.s3tokenizer import drop_invalid_tokens

    x = drop_invalid_tokens(torch.tensor(draws))
    return x[x < 6561].tolist()


@pytest.mark.parametrize("draws", [[10, 20, SOS, 30, EOS], [SOS, 5, 6, EOS], [10, 20, 30, EOS], [1, SOS, EOS],
                                   [SOS, EOS], [EOS]])
def test_start_of_speech_mid_sequence_as_reference(ref, english, monkeypatch, draws):
    force_draws(monkeypatch, draws)
    got = english.t3_tokens("Hello.", max_new_tokens=len(draws))
    assert got.tolist() == reference_valid_tokens(ref, draws)


def test_several_start_tokens_keep_what_follows_the_last(english, monkeypatch):
    # The reference fails on two start tokens (a two-element index); we keep what follows the last.
    force_draws(monkeypatch, [1, SOS, 2, SOS, 3, 4, EOS])
    assert english.t3_tokens("Hello.", max_new_tokens=7).tolist() == [3, 4]


def test_turbo_family_draws_1001_tokens_by_default(nano, monkeypatch):
    """The reference's inference_turbo samples one token from the prefill and then up to 1000."""
    force_draws(monkeypatch, [])
    assert nano.t3.config.sampling.max_new_tokens == 1001
    assert nano.t3_tokens("Hello there.").numel() == 1001


def test_gpt2_text_too_long_says_so(nano):
    voice = nano.builtin_voice
    limit = nano.max_text_tokens()
    assert limit == 8196 - (1 + voice.t3.cond_prompt_speech_tokens.shape[1]) - 1 - 1001
    assert nano.max_text_tokens(max_new_tokens=10) == limit + 991
    ids = torch.full((limit + 1,), 5, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"text is too long: {limit + 1} tokens, this model takes at most {limit} "
                                         r"with this voice's prompt and up to 1001 new speech tokens; split it"):
        nano.t3.generate(voice.t3, ids)
    with pytest.raises(ValueError, match="max_new_tokens=9000 leaves no room for text"):
        nano.t3.generate(voice.t3, ids[:3], max_new_tokens=9000)


def test_llama_limits(english):
    assert english.max_text_tokens() == english.t3.config.text_pos_len
    with pytest.raises(ValueError, match="max_new_tokens=5000 exceeds this model's speech positions"):
        english.t3_tokens("Hello.", max_new_tokens=5000)


def test_multilingual_v3_drops_the_last_tokens_audio(monkeypatch):
    v3, v2 = small("multilingual-v3"), small("multilingual")
    assert v3.behaviour == "upstream" and v2.behaviour == "0.1.7"
    lengths = {}
    for tts in (v3, v2):
        force_draws(monkeypatch, [11, 12, 13, 14, 15, EOS])
        lengths[tts.behaviour] = tts.generate("Hola.", language_id="es", watermark=False, seed=0, n_steps=1).shape[1]
    assert lengths == {"0.1.7": 5 * SAMPLES_PER_TOKEN, "upstream": 4 * SAMPLES_PER_TOKEN}


def test_missing_files_named_at_once(tmp_path):
    from _dummy_ckpt import write_t3

    write_t3(tmp_path, "chatterbox")
    with pytest.raises(CheckpointError) as e:
        TTS.from_local(tmp_path, device="cpu")
    msg = str(e.value)
    assert "s3gen.safetensors" in msg and "ve.safetensors" in msg and "tokenizer.json" in msg
    with pytest.raises(CheckpointError) as e:  # an English directory asked for as Nano
        TTS.from_local(tmp_path, variant="nano", device="cpu")
    msg = str(e.value)
    for name in ("t3_nano_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors", "tokenizer.json"):
        assert name in msg
    with pytest.raises(CheckpointError, match="T3: .*pack.safetensors; S3Gen"):
        TTS.from_local(tmp_path, t3_file="pack.safetensors", device="cpu")
    with pytest.raises(CheckpointError, match="LoRA adapter directory not found"):
        TTS.from_local(tmp_path, lora=tmp_path / "nope", device="cpu")


def test_lora_adapter_merged_at_load(tmp_path):
    """``T3.from_local(..., lora=DIR)`` (what ``TTS.from_local(lora=)`` and the CLI's ``--lora`` use)
    loads the checkpoint with the adapter's ``W + alpha/r * B @ A`` merged in."""
    import json

    from safetensors.torch import save_file

    from _dummy_ckpt import reduced_t3, write_t3
    from chatterbox_rt.models.t3 import T3

    write_t3(tmp_path, "chatterbox", seed=1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    r, alpha, key = 4, 8, "tfmr.layers.1.self_attn.v_proj"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r, 1024, generator=g), torch.randn(1024, r, generator=g)
    save_file({f"base_model.model.{key}.lora_A.weight": a, f"base_model.model.{key}.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], bias="none")))
    with reduced_t3():
        base = T3.from_local(tmp_path, device="cpu")
        tuned = T3.from_local(tmp_path, device="cpu", lora=adapter)
    want = base.state_dict()[f"{key}.weight"] + alpha / r * b @ a
    torch.testing.assert_close(tuned.state_dict()[f"{key}.weight"], want, rtol=0, atol=1e-6)
    same = [k for k, v in base.state_dict().items() if torch.equal(v, tuned.state_dict()[k])]
    assert len(same) == len(base.state_dict()) - 1


def test_s3gen_mel_length_rule(nano):
    """M = 2 (P + T) - F mel frames (README), also when the prompt mel is not exactly 2P frames."""
    from chatterbox_rt.voice import Voice

    base = nano.builtin_voice
    P = base.gen["prompt_token"].shape[1]
    tokens = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(0))
    for extra in (0, 1, -1):
        gen = dict(base.gen)
        feat = base.gen["prompt_feat"]
        gen["prompt_feat"] = torch.cat([feat, feat[:, -1:]], dim=1) if extra > 0 else feat[:, : feat.shape[1] + extra]
        F = gen["prompt_feat"].shape[1]
        assert F == 2 * P + extra
        mel = nano.s3gen_mel(tokens, Voice(base.t3, gen), n_steps=1)
        assert mel.shape[-1] == 2 * (P + 20) - F == 40 - extra
