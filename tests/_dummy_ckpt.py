"""Write a dummy checkpoint directory in the official file layout, so that ``from_local`` loaders
(``chatterbox_rt.TTS``/``VC`` and ``chatterbox_rt.compat``) can load it without downloading.

The weights are ``TTS.from_dummy``'s (seeded random, real shapes), saved under the official names
and formats: ``.safetensors`` with safetensors, ``.pt`` with ``torch.save``; the tokenizer is the
dummy character-level front end saved as a ``tokenizers`` JSON file; ``conds.pt`` is the dummy
built-in voice in the reference's ``Conditionals`` layout.

Full-size T3 files are 0.4-2 GB, too much for tests, so ``reduced=True`` writes a smaller T3:
2 layers, a narrower MLP (``REDUCED_BACKBONE``) and, for Turbo/Nano, a text vocabulary just
large enough for the dummy byte-level tokenizer and a stub of the unused GPT-2 ``wte`` table.
Every width stays real. The loaders build T3 from ``T3Config.for_variant``, so a test that
loads a reduced directory must make that return the same reduced config: wrap the loading in
``with reduced_t3():`` or ``monkeypatch.setattr(T3Config, "for_variant", reduced_for_variant)``.
S3Gen (about 1 GB in fp32) and the voice encoder are written at full size.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from chatterbox_rt import TTS
from chatterbox_rt.checkpoint import S3GEN_FILES, T3_FILES, VE_FILES
from chatterbox_rt.models.t3.config import T3Config, canonical_variant
from chatterbox_rt.text import CANGJIE_FILE, ENGLISH_TOKENIZER_FILE, GPT2_TOKENIZER_FILE, MULTILINGUAL_TOKENIZER_FILE
from chatterbox_rt.tts import dummy_voice

from _t3_pairs import REDUCED

# Two layers everywhere; the multilingual model's alignment heads (layers 9, 12, 13 in the real
# model) move into those two layers (_t3_pairs keeps 14 layers instead, for numerical parity).
REDUCED_BACKBONE = {**REDUCED, "multilingual": dict(num_layers=2, intermediate_size=256)}
GPT2_DUMMY_TEXT_VOCAB = 512  # > the dummy byte-level tokenizer's 258 ids
REDUCED_T3 = {
    "chatterbox": {},
    "multilingual": dict(alignment_heads=((0, 15), (1, 11), (1, 2))),
    "turbo": dict(text_vocab_size=GPT2_DUMMY_TEXT_VOCAB),
    "nano": dict(text_vocab_size=GPT2_DUMMY_TEXT_VOCAB),
}
GPT2_WTE_STUB = 8  # rows of the unused ``tfmr.wte`` table (50276 in the real files)

# A few glyphs of the reference README's Chinese example with made-up Cangjie codes: enough for
# the multilingual front end's Chinese path to run on the dummy directory.
DUMMY_CANGJIE = ["你\tonf", "好\tvnd", "今\toin", "天\tmk", "气\tomn", "真\tjbmc", "不\tmf", "错\tcta",
                 "希\tkkb", "望\tyvbg", "有\tkb", "一\tm", "个\toll", "愉\tpomn", "快\tpdk", "的\thapi",
                 "周\tbgr", "末\tdj"]

DUMMY_VOICE_SECONDS = 0.4

_ORIGINAL_FOR_VARIANT = T3Config.for_variant


def reduce_config(cfg: T3Config) -> T3Config:
    key = canonical_variant(cfg.variant)
    backbone = dict(REDUCED_BACKBONE[key])
    if cfg.backbone.kind == "gpt2":
        backbone["gpt2_vocab_size"] = GPT2_WTE_STUB
    changes = dict(REDUCED_T3[key])
    if not cfg.alignment_heads:  # upstream's multilingual behaviour has no alignment control
        changes.pop("alignment_heads", None)
    return cfg.replace(backbone=dataclasses.replace(cfg.backbone, **backbone), **changes)


def reduced_for_variant(name: str, **overrides) -> T3Config:
    """``T3Config.for_variant`` returning the reduced config (install it as a staticmethod or with
    ``monkeypatch.setattr(T3Config, "for_variant", reduced_for_variant)``)."""
    return reduce_config(_ORIGINAL_FOR_VARIANT(name, **overrides))


@contextlib.contextmanager
def reduced_t3():
    """Within the block, every T3 built from a variant name (dummy or loaded) is the reduced one."""
    saved = T3Config.__dict__["for_variant"]
    T3Config.for_variant = staticmethod(reduced_for_variant)
    try:
        yield
    finally:
        T3Config.for_variant = saved


def _save_state_dict(module: torch.nn.Module, path: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)


def write_t3(ckpt_dir, variant: str, seed: int = 0, reduced: bool = True, name: str = None) -> Path:
    """Only the T3 file of ``variant`` (e.g. Nano's T3 next to a Turbo directory's other files,
    which are Nano's too), under its official name or ``name`` (a V3 or Single Language Pack file)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    from chatterbox_rt.models.t3 import T3

    with reduced_t3() if reduced else contextlib.nullcontext():
        t3 = T3.from_dummy(variant, seed=seed, device="cpu")
    path = ckpt_dir / (name or T3_FILES[variant][0])
    _save_state_dict(t3, path)
    return path


def write_checkpoint(ckpt_dir, variant: str, seed: int = 0, reduced: bool = True,
                     voice_seconds: float = DUMMY_VOICE_SECONDS) -> Path:
    """Write ``TTS.from_dummy(variant, seed)`` as an official checkpoint directory -> ``ckpt_dir``.

    chatterbox: t3_cfg.safetensors, s3gen.safetensors, ve.safetensors, tokenizer.json, conds.pt
    (also a VC directory); multilingual: t3_mtl23ls_v2.safetensors, s3gen.pt, ve.pt,
    grapheme_mtl_merged_expanded_v1.json, Cangjie5_TC.json, conds.pt; turbo / nano:
    t3_turbo_v1.safetensors / t3_nano_v1.safetensors, s3gen_meanflow.safetensors,
    ve.safetensors, tokenizer.json (GPT-2 style BPE), conds.pt.

    ``voice_seconds``: length of the built-in voice's S3Gen prompt; short by default because
    the flow runs over the prompt as well as the new speech on every call."""
    key = canonical_variant(variant)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with reduced_t3() if reduced else contextlib.nullcontext():
        tts = TTS.from_dummy(key, seed=seed, device="cpu")
    _save_state_dict(tts.t3, ckpt_dir / T3_FILES[key][0])
    _save_state_dict(tts.s3gen, ckpt_dir / S3GEN_FILES[key][0])
    _save_state_dict(tts.ve, ckpt_dir / VE_FILES[key][0])
    tokenizer_file = {"chatterbox": ENGLISH_TOKENIZER_FILE, "multilingual": MULTILINGUAL_TOKENIZER_FILE}
    tts.frontend.tokenizer.tokenizer.save(str(ckpt_dir / tokenizer_file.get(key, GPT2_TOKENIZER_FILE)))
    if key == "multilingual":
        import json

        (ckpt_dir / CANGJIE_FILE).write_text(json.dumps(DUMMY_CANGJIE, ensure_ascii=False), encoding="utf-8")
    dummy_voice(tts.t3.config.speech_cond_prompt_len, seed=seed + 3, prompt_seconds=voice_seconds).save(
        ckpt_dir / "conds.pt")
    return ckpt_dir
