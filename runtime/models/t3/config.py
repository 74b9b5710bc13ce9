"""T3 configuration: backbone shapes, token ids and sampling defaults per Chatterbox variant.

Values come from the reference (chatterbox-tts 0.1.7): ``models/t3/llama_configs.py``,
``models/t3/modules/t3_config.py``, the ``from_local`` loaders of ``tts.py``, ``mtl_tts.py``
and ``tts_turbo.py`` (Turbo's overrides), and each ``generate``'s keyword defaults.
Nano is Turbo with a GPT-2 small backbone (the Nano release's ``GPT2_small`` config).

The multilingual model has two published behaviours (``MULTILINGUAL_BEHAVIOURS``), one
architecture:

* ``"0.1.7"`` (PyPI chatterbox-tts 0.1.7, what most users run with the V2 file): EOS steered by
  attention alignment (``AlignmentStreamAnalyzer``), repetition penalty 2.0, the whole waveform.
* ``"upstream"`` (resemble-ai/chatterbox at 5de7a54, commits "Add opt-in v3 multilingual
  checkpoint, skip analyzer for v3" and "v3 multilingual and single language pack release"): no
  alignment control, repetition penalty 1.2, and the final speech token's audio dropped (it is
  "emitted just before EOS with degraded attention and decodes to ~40 ms of noise"). Upstream runs
  every multilingual file this way; here it is the default for V3 and any other multilingual T3
  file (the Single Language Pack), and an option for V2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

# Token ids shared by every variant.
START_TEXT_TOKEN = 255
STOP_TEXT_TOKEN = 0
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
# Speech tokens below this id are S3 codes (3^8 FSQ levels); the rest are special.
SPEECH_CODEBOOK_SIZE = 6561

ENGLISH_TEXT_VOCAB = 704
MULTILINGUAL_TEXT_VOCAB = 2454
GPT2_TEXT_VOCAB = 50276
LLAMA_SPEECH_VOCAB = 8194
GPT2_SPEECH_VOCAB = 6563

MAX_TEXT_TOKENS = 2048
MAX_SPEECH_TOKENS = 4096
SPEAKER_EMBED_SIZE = 256
# The multilingual model's alignment heads (layer, head) used to steer EOS; reference
# ``alignment_stream_analyzer.LLAMA_ALIGNED_HEADS``.
ALIGNMENT_HEADS = ((12, 15), (13, 11), (9, 2))

# Names accepted for a variant -> the model config they use ("multilingual-v2"/"-v3" name
# checkpoint files of one architecture).
VARIANT_ALIASES = {"english": "chatterbox", "multilingual-v2": "multilingual", "multilingual-v3": "multilingual"}

BEHAVIOUR_PYPI = "0.1.7"
BEHAVIOUR_UPSTREAM = "upstream"
MULTILINGUAL_BEHAVIOURS = (BEHAVIOUR_PYPI, BEHAVIOUR_UPSTREAM)
# The behaviour a multilingual variant name runs by default (see the module docstring).
DEFAULT_BEHAVIOUR = {"multilingual": BEHAVIOUR_PYPI, "multilingual-v2": BEHAVIOUR_PYPI,
                     "multilingual-v3": BEHAVIOUR_UPSTREAM}


def variant_key(name: str) -> str:
    """A variant name as written by a user, normalised ("Multilingual_V3" -> "multilingual-v3")."""
    return name.lower().replace("_", "-")


def canonical_variant(name: str) -> str:
    """The model config a variant name uses ("multilingual-v3" -> "multilingual")."""
    key = variant_key(name)
    return VARIANT_ALIASES.get(key, key)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (``rope_type="llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class BackboneConfig:
    kind: str  # "llama" | "gpt2"
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    norm_eps: float = 1e-5
    # llama only
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = RopeScaling()
    llama_vocab_size: int = 8  # the unused ``tfmr.embed_tokens`` table in the checkpoints
    # gpt2 only
    n_positions: int = 8196
    gpt2_vocab_size: int = GPT2_TEXT_VOCAB  # the unused ``tfmr.wte`` table in the checkpoints
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.kind not in ("llama", "gpt2"):
            raise ValueError(f"unknown backbone kind {self.kind!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BackboneConfig":
        return dataclasses.replace(BACKBONES[name], **overrides) if overrides else BACKBONES[name]


BACKBONES = {
    "Llama_520M": BackboneConfig("llama", hidden_size=1024, num_layers=30, num_heads=16, intermediate_size=4096),
    "GPT2_medium": BackboneConfig("gpt2", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                                  rope_scaling=None),
    "GPT2_small": BackboneConfig("gpt2", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                                 rope_scaling=None),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """The reference ``generate`` defaults for one variant."""

    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.2
    cfg_weight: float = 0.5
    max_new_tokens: int = 1000


@dataclass(frozen=True)
class T3Config:
    variant: str
    backbone: BackboneConfig
    text_vocab_size: int
    speech_vocab_size: int
    speech_cond_prompt_len: int
    learned_pos_emb: bool
    use_perceiver: bool
    emotion_adv: bool
    sampling: SamplingDefaults
    start_text_token: int = START_TEXT_TOKEN
    stop_text_token: int = STOP_TEXT_TOKEN
    start_speech_token: int = START_SPEECH_TOKEN
    stop_speech_token: int = STOP_SPEECH_TOKEN
    max_text_tokens: int = MAX_TEXT_TOKENS
    max_speech_tokens: int = MAX_SPEECH_TOKENS
    speaker_embed_size: int = SPEAKER_EMBED_SIZE
    # Perceiver resampler shape (reference ``Perceiver()`` defaults).
    perceiver_queries: int = 32
    perceiver_heads: int = 4
    # The multilingual model steers EOS with attention alignment (reference
    # ``AlignmentStreamAnalyzer``); the alignment needs these (layer, head) pairs.
    alignment_heads: tuple = ()
    # Multilingual only: "0.1.7" or "upstream" (module docstring); None for the other variants.
    behaviour: Optional[str] = None
    # Upstream's multilingual generate drops the audio of the final speech token.
    drop_last_token_audio: bool = False

    @property
    def is_gpt(self) -> bool:
        return self.backbone.kind == "gpt2"

    @property
    def uses_cfg(self) -> bool:
        """Llama variants run classifier-free guidance as a batch of two."""
        return not self.is_gpt

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def text_pos_len(self) -> int:
        return self.max_text_tokens + 2

    @property
    def speech_pos_len(self) -> int:
        return self.max_speech_tokens + 2 + 2

    def replace(self, **changes) -> "T3Config":
        return dataclasses.replace(self, **changes)

    def with_behaviour(self, behaviour: str) -> "T3Config":
        """This multilingual config running ``behaviour`` ("0.1.7" or "upstream"): the alignment
        control, the repetition-penalty default and the last token's audio change together."""
        if self.variant != "multilingual":
            raise ValueError(f"behaviour={behaviour!r} only applies to the multilingual model, not {self.variant}")
        if behaviour not in MULTILINGUAL_BEHAVIOURS:
            raise ValueError(f"unknown multilingual behaviour {behaviour!r}; expected one of "
                             f"{', '.join(MULTILINGUAL_BEHAVIOURS)}")
        upstream = behaviour == BEHAVIOUR_UPSTREAM
        return dataclasses.replace(
            self, behaviour=behaviour, drop_last_token_audio=upstream,
            alignment_heads=() if upstream else ALIGNMENT_HEADS,
            sampling=dataclasses.replace(self.sampling, repetition_penalty=1.2 if upstream else 2.0))

    @classmethod
    def for_variant(cls, name: str, behaviour: Optional[str] = None, **overrides) -> "T3Config":
        """Config of a Chatterbox variant: "chatterbox" | "multilingual" (= "multilingual-v2") |
        "multilingual-v3" | "turbo" | "nano" (or an alias of ``VARIANT_ALIASES``).

        ``behaviour`` (multilingual only) overrides the name's default behaviour
        (``DEFAULT_BEHAVIOUR``: V2 runs 0.1.7's, V3 upstream's)."""
        key = canonical_variant(name)
        if key not in _VARIANTS:
            raise ValueError(f"unknown Chatterbox variant {name!r}; expected one of "
                             f"{sorted(set(_VARIANTS) | set(VARIANT_ALIASES))}")
        cfg = _VARIANTS[key]
        if key == "multilingual":
            chosen = behaviour or DEFAULT_BEHAVIOUR.get(variant_key(name), BEHAVIOUR_PYPI)
            if chosen != cfg.behaviour:
                cfg = cfg.with_behaviour(chosen)
        elif behaviour is not None:
            raise ValueError(f"behaviour={behaviour!r} only applies to the multilingual model, not {name!r}")
        return dataclasses.replace(cfg, **overrides) if overrides else cfg


def smaller_backbone(variant: str, behaviour: Optional[str] = None, **backbone_changes) -> dict:
    """``T3Config.for_variant`` overrides for a cut-down backbone (tests, benchmarks, the CLI's
    testing aid): the backbone fields replaced, and alignment heads in dropped layers removed
    (``behaviour``: the multilingual behaviour, kept in the overrides)."""
    cfg = T3Config.for_variant(variant, behaviour=behaviour)
    backbone = dataclasses.replace(cfg.backbone, **backbone_changes)
    out = dict(backbone=backbone, alignment_heads=tuple(h for h in cfg.alignment_heads if h[0] < backbone.num_layers))
    if behaviour is not None:
        out["behaviour"] = behaviour
    return out


_LLAMA_COMMON = dict(
    backbone=BACKBONES["Llama_520M"],
    speech_vocab_size=LLAMA_SPEECH_VOCAB,
    speech_cond_prompt_len=150,
    learned_pos_emb=True,
    use_perceiver=True,
    emotion_adv=True,
)
_GPT_COMMON = dict(
    text_vocab_size=GPT2_TEXT_VOCAB,
    speech_vocab_size=GPT2_SPEECH_VOCAB,
    speech_cond_prompt_len=375,
    learned_pos_emb=False,
    use_perceiver=False,
    emotion_adv=False,
    # tts_turbo.generate defaults; inference_turbo(max_gen_len=1000) samples one token from
    # the prefill and then up to 1000 more.
    sampling=SamplingDefaults(temperature=0.8, top_p=0.95, min_p=0.0, top_k=1000, repetition_penalty=1.2,
                              cfg_weight=0.0, max_new_tokens=1001),
)

_VARIANTS = {
    "chatterbox": T3Config(variant="chatterbox", text_vocab_size=ENGLISH_TEXT_VOCAB,
                           sampling=SamplingDefaults(repetition_penalty=1.2), **_LLAMA_COMMON),
    "multilingual": T3Config(variant="multilingual", text_vocab_size=MULTILINGUAL_TEXT_VOCAB,
                             sampling=SamplingDefaults(repetition_penalty=2.0),
                             alignment_heads=ALIGNMENT_HEADS, behaviour=BEHAVIOUR_PYPI, **_LLAMA_COMMON),
    "turbo": T3Config(variant="turbo", backbone=BACKBONES["GPT2_medium"], **_GPT_COMMON),
    "nano": T3Config(variant="nano", backbone=BACKBONES["GPT2_small"], **_GPT_COMMON),
}
