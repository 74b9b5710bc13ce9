"""Build a reference T3 and ours with identical random weights (parity tests and bench_t3).

The reference model is built exactly as its loaders build it (``tts.py``, ``mtl_tts.py``,
``tts_turbo.py``; Nano with the GPT2_small config), re-randomised from a seed so norms and
biases are not at their trivial initial values, and its state dict is loaded into ours with
``strict=True`` through our checkpoint checks.
"""
from __future__ import annotations

import dataclasses

import torch

from chatterbox_rt.checkpoint import init_dummy_, load_into
from chatterbox_rt.models.t3 import T3, T3Cond, T3Config

REF_BACKBONE = {"chatterbox": "Llama_520M", "multilingual": "Llama_520M", "turbo": "GPT2_medium",
                "nano": "GPT2_small"}
# Reduced backbones keep every real width (the perceiver is fixed at 1024) and cut depth and
# MLP size; multilingual keeps 14 layers because its alignment heads sit in layers 9, 12 and 13.
REDUCED = {
    "chatterbox": dict(num_layers=2, intermediate_size=512),
    "multilingual": dict(num_layers=14, intermediate_size=256),
    "turbo": dict(num_layers=2, intermediate_size=1024),
    "nano": dict(num_layers=2, intermediate_size=768),
}


def _ref_backbone_name(ref, variant: str, reduced: bool) -> str:
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    base = REF_BACKBONE[variant]
    if not reduced:
        return base
    name = f"{base}_reduced_{variant}"
    r = REDUCED[variant]
    if base.startswith("Llama"):
        LLAMA_CONFIGS[name] = dict(LLAMA_CONFIGS[base], num_hidden_layers=r["num_layers"],
                                   intermediate_size=r["intermediate_size"])
    else:
        LLAMA_CONFIGS[name] = dict(LLAMA_CONFIGS[base], n_layer=r["num_layers"], n_inner=r["intermediate_size"])
    return name


def ref_hp(ref, variant: str, reduced: bool):
    from chatterbox.models.t3.modules.t3_config import T3Config as RefT3Config

    if variant == "chatterbox":
        hp = RefT3Config.english_only()
    elif variant == "multilingual":
        hp = RefT3Config.multilingual()
    else:  # tts_turbo.from_local's overrides (Nano: the same with GPT2_small)
        hp = RefT3Config(text_tokens_dict_size=50276)
        hp.speech_tokens_dict_size = 6563
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
    hp.llama_config_name = _ref_backbone_name(ref, variant, reduced)
    return hp


def our_config(variant: str, reduced: bool) -> T3Config:
    cfg = T3Config.for_variant(variant)
    if reduced:
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, **REDUCED[variant]))
    return cfg


def build_pair(ref, variant: str, *, reduced: bool = True, seed: int = 0):
    """-> (reference T3, our T3), both fp32 eval on CPU with the same weights."""
    from chatterbox.models.t3 import T3 as RefT3

    torch.manual_seed(seed)
    ref_model = RefT3(ref_hp(ref, variant, reduced)).eval()
    init_dummy_(ref_model, seed)
    ours = T3(our_config(variant, reduced))
    load_into(ours, ref_model.state_dict(), f"reference {variant} T3")
    return ref_model, ours.eval()


def cond_tensors(cfg: T3Config, seed: int = 0, exaggeration: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        speaker_emb=torch.randn(1, cfg.speaker_embed_size, generator=g) * 0.1,
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, cfg.speech_cond_prompt_len), generator=g),
        emotion_adv=exaggeration * torch.ones(1, 1, 1),
    )


def ref_cond(ref, tensors: dict):
    from chatterbox.models.t3.modules.cond_enc import T3Cond as RefT3Cond

    return RefT3Cond(**{k: v.clone() for k, v in tensors.items()})


def our_cond(tensors: dict) -> T3Cond:
    return T3Cond(**{k: v.clone() for k, v in tensors.items()})


def text_tokens(cfg: T3Config, n: int = 24, seed: int = 0) -> torch.Tensor:
    """1-D text ids as the text front end produces them (start/stop for Llama variants)."""
    g = torch.Generator().manual_seed(seed + 2000)
    body = torch.randint(1, min(cfg.text_vocab_size, 704) - 1, (n,), generator=g)
    body[body == cfg.start_text_token] = 1
    if cfg.is_gpt:
        return body
    return torch.cat([torch.tensor([cfg.start_text_token]), body, torch.tensor([cfg.stop_text_token])])
