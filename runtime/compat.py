"""Drop-in replacements for the reference package's public classes (chatterbox-tts 0.1.7).

Code written against the reference switches by changing its imports::

    from chatterbox.tts import ChatterboxTTS                 -> from chatterbox_rt.compat import ChatterboxTTS
    from chatterbox.mtl_tts import ChatterboxMultilingualTTS -> from chatterbox_rt.compat import ChatterboxMultilingualTTS
    from chatterbox.tts_turbo import ChatterboxTurboTTS      -> from chatterbox_rt.compat import ChatterboxTurboTTS
    from chatterbox.vc import ChatterboxVC                   -> from chatterbox_rt.compat import ChatterboxVC

Each class keeps the reference's constructor attributes (``sr``, ``device``, ``conds`` /
``ref_dict``, ``t3``, ``s3gen``, ``ve``, ``tokenizer``, ``watermarker``), loaders
(``from_local(ckpt_dir, device)``, ``from_pretrained(device)``), ``prepare_conditionals`` /
``set_target_voice`` (which set ``self.conds`` / ``self.ref_dict``) and ``generate`` with the
reference's arguments, order and defaults. The work is done by :class:`chatterbox_rt.TTS` /
:class:`chatterbox_rt.VC`, so the model attributes are this runtime's modules, not the
reference's: ``t3`` is ``chatterbox_rt.models.t3.T3`` (its hyper-parameters are ``t3.config``,
not ``t3.hp``), ``s3gen`` ``chatterbox_rt.models.s3gen.S3Gen``, ``ve``
``chatterbox_rt.models.voice_encoder.VoiceEncoder``, ``tokenizer`` the text tokenizer of
``chatterbox_rt.text`` (``encode``/``decode``; Turbo's is not a ``transformers`` tokenizer).
They load the same official checkpoint files.

Kept on purpose, because users rely on them: ``generate``'s ``exaggeration`` replaces the one in
``self.conds`` (Llama variants; Turbo ignores it with the reference's warning), an
``audio_prompt_path`` re-prepares ``self.conds``, the output is a watermarked CPU
``torch.Tensor [1, N]`` at ``sr`` = 24 kHz. Where the reference asserts, a
:class:`MissingConditionalsError` (a RuntimeError that is also an AssertionError, so old
``except AssertionError`` handlers still work) or a ValueError is raised instead.

Sampling draws from torch's global RNG as the reference does (``torch.manual_seed`` before
``generate`` makes a call repeatable, though the numbers differ from the reference's).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .checkpoint import MULTILINGUAL_T3_MODELS, T3_FILES, CheckpointError
from .models.s3gen.hift import S3GEN_SR
from .models.s3gen.s3gen import PROMPT_MAX_SECONDS, S3_SR
from .models.t3 import T3Cond
from .text import SUPPORTED_LANGUAGES, TextFrontEnd, _check_language_id
from .text import punc_norm as _punc_norm
from .tts import T3_PROMPT_SECONDS, TTS, TURBO_TARGET_LUFS, normalize_loudness
from .vc import VC
from .voice import Voice

log = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"  # English, multilingual and VC (tts.py, mtl_tts.py, vc.py)
TURBO_REPO_ID = "ResembleAI/chatterbox-turbo"  # tts_turbo.py
# Not in the reference 0.1.7: Resemble AI publishes Nano as its own repository with Turbo's file
# layout except the T3 file (t3_nano_v1.safetensors).
NANO_REPO_ID = "ResembleAI/chatterbox-nano"

ENGLISH_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
MULTILINGUAL_FILES = ("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json",
                      "conds.pt", "Cangjie5_TC.json")
TURBO_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.pt", "*.model")
VC_FILES = ("s3gen.safetensors", "conds.pt")

# The reference hard-codes generate()'s token budget (1000 new speech tokens; Turbo's
# inference_turbo draws one more). None keeps that. A testing knob: random weights rarely emit
# EOS, so tests set this to a few dozen tokens to keep each generate() call short.
MAX_NEW_TOKENS: Optional[int] = None
# Likewise the flow's ODE steps (the reference's 10; 2 for Turbo's meanflow decoder). None keeps
# them; tests lower it because the flow also runs over the voice's whole prompt on every call.
N_STEPS: Optional[int] = None

NO_CONDS_MESSAGE = "Please `prepare_conditionals` first or specify `audio_prompt_path`"
NO_TARGET_MESSAGE = "Please `set_target_voice` first or specify `target_voice_path`"
TURBO_IGNORED_MESSAGE = "CFG, min_p and exaggeration are not supported by Turbo version and will be ignored."


class MissingConditionalsError(RuntimeError, AssertionError):
    """``generate`` was called with no voice: neither ``self.conds`` nor an audio prompt.

    The reference asserts here; this is also an AssertionError so handlers written for it still
    catch it (and, unlike an assert, it survives ``python -O``)."""


def punc_norm(text: str, variant: str = "chatterbox") -> str:
    """The reference's ``punc_norm`` (``tts.py``; ``variant="multilingual"`` / ``"turbo"`` for
    ``mtl_tts.py`` / ``tts_turbo.py``, whose rules differ slightly)."""
    return _punc_norm(text, variant)


# ---------------------------------------------------------------------------------------- voices


class Conditionals(Voice):
    """The reference's ``Conditionals``: ``t3`` (a ``T3Cond``) and ``gen`` (S3Gen's dict), with
    ``to(device)``, ``save(fpath)`` and ``Conditionals.load(fpath, map_location)``; files are
    interchangeable with the reference's (``conds.pt`` layout).

    Unlike :class:`chatterbox_rt.Voice`, whose ``to`` returns a copy, ``to`` moves the tensors in
    place and returns ``self``, as the reference's does."""

    def to(self, device=None) -> "Conditionals":
        moved = Voice.to(self, device)
        self.t3, self.gen = moved.t3, moved.gen
        return self

    @classmethod
    def wrap(cls, conds) -> "Conditionals":
        """A ``Conditionals`` from ours, a ``Voice``, or the reference's ``Conditionals`` (any
        object with ``.t3`` holding the T3Cond fields and a ``.gen`` dict)."""
        if isinstance(conds, cls):
            return conds
        if isinstance(conds, Voice):
            return cls(conds.t3, conds.gen)
        t3, gen = getattr(conds, "t3", None), getattr(conds, "gen", None)
        if t3 is None or not isinstance(gen, Mapping):
            raise TypeError(f"conds must be a Conditionals (with .t3 and .gen), got {type(conds).__name__}")
        fields = {f.name for f in dataclasses.fields(T3Cond)}
        return cls(T3Cond(**{k: v for k, v in vars(t3).items() if k in fields}), dict(gen)).validate("conds")


class _Watermarker:
    """``perth.PerthImplicitWatermarker``'s two methods over this runtime's re-implementation
    (the reference exposes its watermarker as ``model.watermarker``)."""

    def apply_watermark(self, wav, sample_rate: int, **_):
        from .watermark import get_watermarker

        return get_watermarker("cpu").apply(wav, sample_rate)

    def get_watermark(self, watermarked_wav, sample_rate: int, round: bool = True, **_) -> float:
        from .watermark import get_watermarker

        confidence = get_watermarker("cpu").detect(watermarked_wav, sample_rate)
        return float(np.round(confidence)) if round else confidence


# ---------------------------------------------------------------------------------------- loading


def map_device(device) -> str:
    """The reference's device handling: "mps" falls back to "cpu" when MPS is unavailable."""
    if str(device) == "mps" and not torch.backends.mps.is_available():
        if not torch.backends.mps.is_built():
            log.warning("MPS not available because the current PyTorch install was not built with MPS enabled.")
        else:
            log.warning("MPS not available because the current MacOS version is not 12.3+ and/or you do not have "
                        "an MPS-enabled device on this machine.")
        return "cpu"
    return device


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> Optional[str]:
    # Read at call time: huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at its import.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _network_errors() -> tuple:
    errors = []
    for module, names in (("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors) or (ConnectionError,)


def hub_snapshot(repo_id: str, *, files: Sequence[str] = (), allow_patterns: Sequence[str] = (),
                 revision: Optional[str] = None) -> Path:
    """Directory of ``repo_id``'s files from the Hugging Face Hub: downloaded (or refreshed) when
    online, read from the local cache when ``HF_HUB_OFFLINE`` is set or the Hub is unreachable.

    ``files``: exact names, fetched one by one as the reference's ``hf_hub_download`` loops do;
    otherwise a ``snapshot_download`` filtered by ``allow_patterns``. ``HF_TOKEN`` is used when set."""
    try:
        import huggingface_hub
        # A submodule: ``import huggingface_hub`` alone does not bind it (its __init__ is lazy).
        import huggingface_hub.constants as hf_constants
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ImportError("from_pretrained needs huggingface_hub (pip install huggingface_hub); or download "
                          f"{repo_id} yourself and load it with from_local(ckpt_dir, device)") from e
    offline = _env_flag("HF_HUB_OFFLINE") or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))
    cache_dir = _hub_cache_dir()
    token = os.getenv("HF_TOKEN") or None

    def fetch(local_only: bool) -> Path:
        if files:
            paths = [huggingface_hub.hf_hub_download(repo_id=repo_id, filename=f, revision=revision,
                                                     cache_dir=cache_dir, token=token, local_files_only=local_only)
                     for f in files]
            return Path(paths[-1]).parent
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                                      allow_patterns=list(allow_patterns) or None, token=token,
                                                      local_files_only=local_only))

    def not_cached(e: Exception, why: str) -> CheckpointError:
        where = cache_dir or hf_constants.HF_HUB_CACHE
        return CheckpointError(f"cannot load {repo_id}: {why} and it is not in the local Hugging Face cache "
                               f"({where}). Download it once while online (unset HF_HUB_OFFLINE), or point "
                               f"from_local(ckpt_dir, device) at a directory holding its files. ({e})")

    try:
        return fetch(offline)
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached"
        raise not_cached(e, why) from e
    except _network_errors() as e:
        if offline:
            raise
        log.warning("cannot reach the Hugging Face Hub (%s); trying the local cache", e)
        try:
            return fetch(True)
        except LocalEntryNotFoundError as e2:
            raise not_cached(e2, "the Hugging Face Hub could not be reached") from e


# ---------------------------------------------------------------------------------------- TTS


class _CompatTTS:
    """What the three reference TTS classes share."""

    VARIANT = "chatterbox"
    ENC_COND_LEN = T3_PROMPT_SECONDS["chatterbox"] * S3_SR
    DEC_COND_LEN = PROMPT_MAX_SECONDS * S3GEN_SR

    def __init__(self, t3, s3gen, ve, tokenizer, device, conds: Optional[Conditionals] = None):
        """Our modules (see the module docstring); ``tokenizer`` is a ``chatterbox_rt.text``
        tokenizer or a ``TextFrontEnd``."""
        frontend = tokenizer if isinstance(tokenizer, TextFrontEnd) else TextFrontEnd(t3.config.variant, tokenizer)
        self._tts = TTS(t3.config.variant, t3, s3gen, ve, frontend, None, source="compat")
        self.sr = S3GEN_SR  # sample rate of synthesized audio
        self.t3, self.s3gen, self.ve = t3, s3gen, ve
        self.tokenizer = frontend.tokenizer
        self.device = device
        self.conds = Conditionals.wrap(conds).to(t3.device) if conds is not None else None
        self.watermarker = _Watermarker()

    @classmethod
    def _from_tts(cls, tts: TTS, device) -> "_CompatTTS":
        return cls(tts.t3, tts.s3gen, tts.ve, tts.frontend, device, conds=tts.builtin_voice)

    @classmethod
    def _load(cls, ckpt_dir, device, variant: str, **kw) -> "_CompatTTS":
        device = map_device(device)
        return cls._from_tts(TTS.from_local(ckpt_dir, variant=variant, device=device, **kw), device)

    @classmethod
    def from_local(cls, ckpt_dir, device) -> "_CompatTTS":
        return cls._load(ckpt_dir, device, cls.VARIANT)

    def prepare_conditionals(self, wav_fpath, exaggeration=0.5):
        self.conds = Conditionals.wrap(self._tts.prepare_conditionals(wav_fpath, exaggeration=exaggeration))

    def _require_conds(self) -> Conditionals:
        if self.conds is None:
            raise MissingConditionalsError(NO_CONDS_MESSAGE)
        self.conds = Conditionals.wrap(self.conds)
        return self.conds

    def _llama_generate(self, text, language_id, audio_prompt_path, exaggeration, cfg_weight, temperature,
                        repetition_penalty, min_p, top_p) -> torch.Tensor:
        if audio_prompt_path:
            self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
        conds = self._require_conds()
        if float(exaggeration) != conds.exaggeration:  # the reference replaces self.conds.t3 too
            self.conds = Conditionals.wrap(conds.with_exaggeration(exaggeration))
        return self._tts.generate(text, self.conds, language_id=language_id, max_new_tokens=MAX_NEW_TOKENS,
                                  n_steps=N_STEPS, temperature=temperature, cfg_weight=cfg_weight,
                                  repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p)


class ChatterboxTTS(_CompatTTS):
    """``chatterbox.tts.ChatterboxTTS``: the original English model."""

    VARIANT = "chatterbox"

    @classmethod
    def from_pretrained(cls, device) -> "ChatterboxTTS":
        device = map_device(device)
        return cls.from_local(hub_snapshot(REPO_ID, files=ENGLISH_FILES), device)

    def generate(
        self,
        text,
        repetition_penalty=1.2,
        min_p=0.05,
        top_p=1.0,
        audio_prompt_path=None,
        exaggeration=0.5,
        cfg_weight=0.5,
        temperature=0.8,
    ) -> torch.Tensor:
        return self._llama_generate(text, None, audio_prompt_path, exaggeration, cfg_weight, temperature,
                                    repetition_penalty, min_p, top_p)


def resolve_multilingual_t3_model(t3_model: Optional[str]) -> str:
    """Upstream's ``_resolve_multilingual_t3_model``: None -> the V2 file; "v2"/"v3" (or their file
    stems) -> the official files; any ``*.safetensors`` name as it is; otherwise a ValueError."""
    if t3_model is None:
        return MULTILINGUAL_T3_MODELS["v2"]
    if t3_model in MULTILINGUAL_T3_MODELS:
        return MULTILINGUAL_T3_MODELS[t3_model]
    if str(t3_model).endswith(".safetensors"):
        return str(t3_model)
    raise ValueError(f"Unknown multilingual T3 model '{t3_model}'. "
                     f"Expected one of {sorted(MULTILINGUAL_T3_MODELS)} or a .safetensors filename.")


class ChatterboxMultilingualTTS(_CompatTTS):
    """``chatterbox.mtl_tts.ChatterboxMultilingualTTS``: 23 languages."""

    VARIANT = "multilingual"

    @classmethod
    def get_supported_languages(cls) -> dict:
        """Return dictionary of supported language codes and names."""
        return SUPPORTED_LANGUAGES.copy()

    @classmethod
    def from_local(cls, ckpt_dir, device, t3_model: Optional[str] = None,
                   behaviour: Optional[str] = None) -> "ChatterboxMultilingualTTS":
        """Upstream's signature (resemble-ai/chatterbox 5de7a54): ``t3_model`` is "v2" (the
        default, PyPI 0.1.7's only file), "v3", or any ``.safetensors`` file name in ``ckpt_dir``
        (the Single Language Pack). V2 runs 0.1.7's behaviour, everything else upstream's (no
        alignment control, repetition penalty 1.2, the last token's audio dropped);
        ``behaviour="upstream"`` / ``"0.1.7"`` chooses explicitly (not in the reference)."""
        return cls._load(ckpt_dir, device, "multilingual", t3_file=resolve_multilingual_t3_model(t3_model),
                         behaviour=behaviour)

    @classmethod
    def from_pretrained(cls, device, t3_model: Optional[str] = None,
                        behaviour: Optional[str] = None) -> "ChatterboxMultilingualTTS":
        device = map_device(device)
        t3_name = resolve_multilingual_t3_model(t3_model)
        files = tuple(t3_name if f == MULTILINGUAL_FILES[1] else f for f in MULTILINGUAL_FILES)
        return cls.from_local(hub_snapshot(REPO_ID, allow_patterns=files, revision="main"), device,
                              t3_model=t3_name, behaviour=behaviour)

    def generate(
        self,
        text,
        language_id,
        audio_prompt_path=None,
        exaggeration=0.5,
        cfg_weight=0.5,
        temperature=0.8,
        repetition_penalty=None,
        min_p=0.05,
        top_p=1.0,
    ) -> torch.Tensor:
        """As the reference, except that ``language_id`` may not be empty: the reference then
        feeds the text with no language tag, which this runtime refuses (ValueError).

        ``repetition_penalty=None`` is the loaded model's default: 2.0 with 0.1.7's behaviour (the
        V2 file; PyPI 0.1.7's default), 1.2 with upstream's (V3, the Single Language Pack;
        upstream's default since it dropped the alignment analyzer)."""
        if language_id:
            _check_language_id(language_id)  # the reference's message, before the voice is touched
        return self._llama_generate(text, language_id.lower() if language_id else None, audio_prompt_path,
                                    exaggeration, cfg_weight, temperature, repetition_penalty, min_p, top_p)


class ChatterboxTurboTTS(_CompatTTS):
    """``chatterbox.tts_turbo.ChatterboxTurboTTS``; ``nano=True`` loads Chatterbox Nano
    (``t3_nano_v1.safetensors``, repository ``ResembleAI/chatterbox-nano``) with the same API."""

    VARIANT = "turbo"
    ENC_COND_LEN = T3_PROMPT_SECONDS["turbo"] * S3_SR

    def __init__(self, t3, s3gen, ve, tokenizer, device, conds: Optional[Conditionals] = None,
                 model_label: str = "Turbo"):
        """``model_label``: "Turbo" or "Nano", upstream HEAD's name for the model in its warning
        (a Nano T3 is labelled "Nano" when the default is left)."""
        super().__init__(t3, s3gen, ve, tokenizer, device, conds)
        self.model_label = "Nano" if model_label == "Turbo" and t3.config.variant == "nano" else model_label

    @classmethod
    def from_local(cls, ckpt_dir, device, nano: bool = False) -> "ChatterboxTurboTTS":
        variant = "nano" if nano else "turbo"
        ckpt_dir = Path(ckpt_dir)
        if not nano and not (ckpt_dir / T3_FILES["turbo"][0]).is_file() and (ckpt_dir / T3_FILES["nano"][0]).is_file():
            raise CheckpointError(f"{ckpt_dir} holds a Nano checkpoint ({T3_FILES['nano'][0]}), not Turbo: "
                                  "pass nano=True")
        return cls._load(ckpt_dir, device, variant)

    @classmethod
    def from_pretrained(cls, device, nano: bool = False) -> "ChatterboxTurboTTS":
        device = map_device(device)
        local_path = hub_snapshot(NANO_REPO_ID if nano else TURBO_REPO_ID, allow_patterns=TURBO_PATTERNS)
        return cls.from_local(local_path, device, nano=nano)

    def norm_loudness(self, wav, sr, target_lufs=TURBO_TARGET_LUFS):
        return normalize_loudness(np.asarray(wav, dtype=np.float32), sr, target_lufs)

    def prepare_conditionals(self, wav_fpath, exaggeration=0.5, norm_loudness=True):
        """The reference asserts "Audio prompt must be longer than 5 seconds!"; here a shorter
        clip raises ``chatterbox_rt.AudioError`` (a ValueError) that says so."""
        self.conds = Conditionals.wrap(self._tts.prepare_conditionals(wav_fpath, exaggeration=exaggeration,
                                                                      norm_loudness=norm_loudness))

    def generate(
        self,
        text,
        repetition_penalty=1.2,
        min_p=0.00,
        top_p=0.95,
        audio_prompt_path=None,
        exaggeration=0.0,
        cfg_weight=0.0,
        temperature=0.8,
        top_k=1000,
        norm_loudness=True,
    ) -> torch.Tensor:
        if audio_prompt_path:
            self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration, norm_loudness=norm_loudness)
        conds = self._require_conds()
        if cfg_weight > 0.0 or exaggeration > 0.0 or min_p > 0.0:
            log.warning(TURBO_IGNORED_MESSAGE.replace("Turbo", self.model_label))
        return self._tts.generate(text, conds, max_new_tokens=MAX_NEW_TOKENS, n_steps=N_STEPS,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, min_p=0.0, cfg_weight=0.0)


# ---------------------------------------------------------------------------------------- VC


class ChatterboxVC:
    """``chatterbox.vc.ChatterboxVC``: the source's speech in the target's voice."""

    ENC_COND_LEN = T3_PROMPT_SECONDS["chatterbox"] * S3_SR
    DEC_COND_LEN = PROMPT_MAX_SECONDS * S3GEN_SR

    def __init__(self, s3gen, device, ref_dict: Optional[dict] = None):
        self._vc = VC(s3gen, ref_dict, source="compat")
        self.sr = S3GEN_SR
        self.s3gen = s3gen
        self.device = device
        self.ref_dict = self._vc.target
        self.watermarker = _Watermarker()

    @classmethod
    def from_local(cls, ckpt_dir, device) -> "ChatterboxVC":
        device = map_device(device)
        vc = VC.from_local(ckpt_dir, device=device)
        return cls(vc.s3gen, device, ref_dict=vc.target)

    @classmethod
    def from_pretrained(cls, device) -> "ChatterboxVC":
        device = map_device(device)
        return cls.from_local(hub_snapshot(REPO_ID, files=VC_FILES), device)

    def set_target_voice(self, wav_fpath):
        self.ref_dict = self._vc.prepare_target(wav_fpath)

    def generate(self, audio, target_voice_path=None, *, prune_tokens: int = 0, speaker_strength: float = 1.0,
                 flow_cfg_rate: Optional[float] = None, guidance_ramp=None, speaker_ramp=None,
                 pitch_match: bool = False, pitch_tolerance: Optional[float] = None,
                 max_pitch_shift: Optional[float] = None, post: Optional[str] = None) -> torch.Tensor:
        """The reference's ``generate``, plus ``chatterbox_rt.VC``'s voice-conversion controls as
        keyword-only extras (their defaults give the reference's output); ``target_voice_path``
        may also be a list of clips of the target. ``pitch_match`` needs the target's median F0:
        pass ``target_voice_path`` in that call (it is measured then)."""
        from .vc import VCControls

        controls = VCControls(prune_tokens=prune_tokens, speaker_strength=speaker_strength,
                              flow_cfg_rate=flow_cfg_rate, guidance_ramp=guidance_ramp, speaker_ramp=speaker_ramp,
                              pitch_match=pitch_match, pitch_tolerance=pitch_tolerance,
                              max_pitch_shift=max_pitch_shift, post=post)  # bad values: before any work
        controls.check_meanflow(self._vc.s3gen.meanflow)
        if target_voice_path:
            self.ref_dict = self._vc.prepare_target(target_voice_path, f0=controls.pitch_match)
        elif self.ref_dict is None:
            raise MissingConditionalsError(NO_TARGET_MESSAGE)
        return self._vc._convert(audio, self.ref_dict, controls, n_steps=N_STEPS)


__all__ = ["ChatterboxTTS", "ChatterboxMultilingualTTS", "ChatterboxTurboTTS", "ChatterboxVC", "Conditionals",
           "MissingConditionalsError", "SUPPORTED_LANGUAGES", "REPO_ID", "TURBO_REPO_ID", "NANO_REPO_ID",
           "MAX_NEW_TOKENS", "N_STEPS", "punc_norm", "map_device", "hub_snapshot", "resolve_multilingual_t3_model"]
