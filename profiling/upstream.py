"""The reference implementation (PyPI ``chatterbox-tts==0.1.7``) as a comparison: importing it on
a CPU-only machine, and building its modules and ours with identical seeded random weights.

Used by ``chatterbox-rt bench --compare-upstream`` and by the parity tests; the runtime never
imports it. The reference is installed by ``make test``'s set-up (``pip install --no-deps
chatterbox-tts==0.1.7`` plus its imports, see tests/requirements-reference.txt).

Importing the reference needs two work-arounds that live here and nowhere else:

* torchaudio has no CPU build on PyPI. Its Python modules work, but importing the package loads
  CUDA-linked native libraries (``torchaudio/lib/*.so``) that fail without CUDA. We hide those
  libraries from torchaudio's loader while it is first imported; it then runs in its documented
  "extension not available" mode.
* the 0.1.7 release has no ``GPT2_small`` backbone config, which Chatterbox Nano uses; we add it
  to the reference's config table (values from the Nano release: GPT-2 small with n_embd 768,
  12 heads, 12 layers, the Turbo vocabulary).

Random weights: the reference's modules are built exactly as its loaders build them and
re-randomised at magnitudes a trained model has (so nothing saturates and comparisons mean
something); ours load the reference's state dicts through our strict checkpoint checks.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
import warnings

import torch

from ..checkpoint import init_dummy_, load_into
from ..models.s3gen import S3Gen
from ..models.t3 import T3, T3Cond, T3Config
from ..models.t3.config import canonical_variant

REFERENCE_VERSION = "0.1.7"
# Upstream HEAD, the oracle for what PyPI lacks (Multilingual V3, the Single Language Pack), is
# installed by the test set-up as ``chatterbox_head`` (tests/oracle/install.py).
UPSTREAM_HEAD_PACKAGE = "chatterbox_head"
UPSTREAM_HEAD_COMMIT = "5de7a54aa4e5e2baadb0182dde554908b48b85c2"
_HEAD = None
GPT2_SMALL_CONFIG_OVERRIDES = dict(n_embd=768, hidden_size=768, n_head=12, n_layer=12)
_REF = None


# ------------------------------------------------------------------------------ import

def import_torchaudio_without_native_libs():
    original_glob = pathlib.Path.glob

    def glob(self, pattern, *args, **kwargs):
        if self.name == "lib" and self.parent.name == "torchaudio":
            return iter(())
        return original_glob(self, pattern, *args, **kwargs)

    pathlib.Path.glob = glob
    try:
        importlib.import_module("torchaudio")
    finally:
        pathlib.Path.glob = original_glob


def reference_available() -> bool:
    try:
        return importlib.util.find_spec("chatterbox") is not None
    except (ImportError, ValueError):
        return False


def load_reference():
    """Import and return the reference ``chatterbox`` package (patched as described above)."""
    global _REF
    if _REF is not None:
        return _REF
    if not reference_available():
        raise ImportError(f"the reference implementation is not installed: pip install --no-deps "
                          f"chatterbox-tts=={REFERENCE_VERSION} plus its imports (make test's set-up does this)")
    # The reference reaches for the Hugging Face hub in a few places (Cangjie table); a
    # comparison must never touch the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_torchaudio_without_native_libs()
        import chatterbox  # noqa: F401
        from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    if "GPT2_small" not in LLAMA_CONFIGS:
        LLAMA_CONFIGS["GPT2_small"] = dict(LLAMA_CONFIGS["GPT2_medium"], **GPT2_SMALL_CONFIG_OVERRIDES)
    _REF = chatterbox
    return chatterbox


def upstream_head_available() -> bool:
    try:
        return importlib.util.find_spec(UPSTREAM_HEAD_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def load_upstream_head():
    """Import and return upstream HEAD's package (``chatterbox_head``, patched as the reference)."""
    global _HEAD
    if _HEAD is not None:
        return _HEAD
    if not upstream_head_available():
        raise ImportError("upstream chatterbox HEAD is not installed as chatterbox_head: run "
                          "`python tests/oracle/install.py` (make test's set-up does this)")
    load_reference()  # the same torchaudio work-around; HEAD's own imports are the reference's
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _HEAD = importlib.import_module(UPSTREAM_HEAD_PACKAGE)
        for sub in ("mtl_tts", "tts_turbo", "models.t3", "models.t3.llama_configs", "models.t3.modules.t3_config",
                    "models.t3.modules.cond_enc", "models.tokenizers"):
            importlib.import_module(f"{UPSTREAM_HEAD_PACKAGE}.{sub}")
    return _HEAD


def _sub(ref, name: str):
    """``ref``'s submodule ``name`` (ref: the 0.1.7 package or upstream HEAD's)."""
    return importlib.import_module(f"{ref.__name__}.{name}")


def ref_tts_class(variant: str):
    """The reference's TTS class for a variant (Nano is Turbo's class with a smaller T3)."""
    if variant == "multilingual":
        from chatterbox.mtl_tts import ChatterboxMultilingualTTS as cls
    elif variant in ("turbo", "nano"):
        from chatterbox.tts_turbo import ChatterboxTurboTTS as cls
    else:
        from chatterbox.tts import ChatterboxTTS as cls
    return cls


# ------------------------------------------------------------------------------ T3

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
    LLAMA_CONFIGS = _sub(ref, "models.t3.llama_configs").LLAMA_CONFIGS
    variant = canonical_variant(variant)
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
    RefT3Config = _sub(ref, "models.t3.modules.t3_config").T3Config
    key = canonical_variant(variant)
    if key == "chatterbox":
        hp = RefT3Config.english_only()
    elif key == "multilingual":
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


def our_t3_config(variant: str, reduced: bool, behaviour=None) -> T3Config:
    cfg = T3Config.for_variant(variant, behaviour=behaviour)
    if reduced:
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, **REDUCED[canonical_variant(variant)]))
    return cfg


def build_t3_pair(ref, variant: str, *, reduced: bool = True, seed: int = 0, behaviour=None):
    """-> (reference T3, our T3), both fp32 eval on CPU with the same weights. ``ref``: the 0.1.7
    package or upstream HEAD's; ``variant``/``behaviour``: our config (e.g. "multilingual-v3")."""
    RefT3 = _sub(ref, "models.t3").T3

    torch.manual_seed(seed)
    ref_model = RefT3(ref_hp(ref, variant, reduced)).eval()
    init_dummy_(ref_model, seed)
    ours = T3(our_t3_config(variant, reduced, behaviour))
    load_into(ours, ref_model.state_dict(), f"reference {variant} T3")
    return ref_model, ours.eval()


def ref_t3_fixed_tokens(ref_t3, cond, text: torch.Tensor, n: int):
    """The reference T3 drawing exactly ``n`` tokens: EOS disabled (its stop token set to an id
    that is never drawn), CFG at the reference's default 0.5 for the Llama variants. ``text``: 1-D ids."""
    ref_t3.hp.stop_speech_token = -1
    if ref_t3.is_gpt:
        return ref_t3.inference_turbo(cond, text[None], max_gen_len=n - 1)  # the prefill draws the first
    return ref_t3.inference(t3_cond=cond, text_tokens=torch.stack([text, text]), max_new_tokens=n, cfg_weight=0.5)


def cond_tensors(cfg: T3Config, seed: int = 0, exaggeration: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return dict(
        speaker_emb=torch.randn(1, cfg.speaker_embed_size, generator=g) * 0.1,
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, cfg.speech_cond_prompt_len), generator=g),
        emotion_adv=exaggeration * torch.ones(1, 1, 1),
    )


def ref_cond(ref, tensors: dict):
    RefT3Cond = _sub(ref, "models.t3.modules.cond_enc").T3Cond

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


# ------------------------------------------------------------------------------ S3Gen

def rerandomise_flow_(flow, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return flow


def rerandomise_hift_(model, seed: int):
    """F0 on both sides of the voiced threshold, the waveform inside the clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0"):
                p.copy_(torch.empty(p.shape).uniform_(0.6, 1.0, generator=g))
            elif name.endswith("original1"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("alpha"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        model.f0_predictor.classifier.weight.mul_(400.0)
        model.conv_post.bias[:9] -= 2.0
    return model


def build_reference_s3gen(ref, meanflow: bool = False, seed: int = 0):
    from chatterbox.models.s3gen import S3Gen as RefS3Gen

    torch.manual_seed(seed)
    model = RefS3Gen(meanflow=meanflow).eval()
    rerandomise_flow_(model.flow, seed + 1)
    rerandomise_hift_(model.mel2wav, seed + 2)
    return model


def build_s3gen_pair(ref, meanflow: bool = False, seed: int = 0):
    """-> (reference S3Token2Wav, our S3Gen), fp32 eval on CPU with the same weights. The tokenizer
    and the x-vector keep torch's default initialisation (already random)."""
    ref_model = build_reference_s3gen(ref, meanflow, seed)
    ours = S3Gen(meanflow).eval()
    ours.load_checkpoint(ref_model.state_dict(), f"reference S3Gen (meanflow={meanflow})")
    return ref_model, ours


# ------------------------------------------------------------------------------ voice encoder

def build_voice_encoders(ref, seed: int = 0):
    """-> (reference VoiceEncoder, ours) with the same uniform(-0.15, 0.15) random weights."""
    from chatterbox.models.voice_encoder.voice_encoder import VoiceEncoder as RefVoiceEncoder

    from ..models.voice_encoder import VoiceEncoder

    torch.manual_seed(seed)
    ref_ve = RefVoiceEncoder().eval()
    with torch.no_grad():
        for p in ref_ve.parameters():
            p.uniform_(-0.15, 0.15)
    ours = load_into(VoiceEncoder(), ref_ve.state_dict(), "reference voice encoder").eval()
    return ref_ve, ours
