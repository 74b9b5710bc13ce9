"""A voice: everything a reference clip contributes to synthesis, computed once and reused.

``Voice.t3`` conditions T3 (``speaker_emb [1, 256]``, ``cond_prompt_speech_tokens [1, P]``,
``emotion_adv [1, 1, 1]``); ``Voice.gen`` conditions S3Gen (``prompt_token [1, P']``,
``prompt_token_len [1]``, ``prompt_feat [1, 2P', 80]``, ``prompt_feat_len`` (None),
``embedding [1, 192]``). Field names and the file layout are the reference's ``Conditionals``
(``conds.pt``: ``{"t3": {...}, "gen": {...}}``), so a checkpoint's built-in voice loads and a
voice saved here loads in the reference.

The T3 part is specific to a model family: the Llama models (chatterbox, multilingual) read at
most 150 prompt tokens from the first 6 s of the clip plus the emotion value; the GPT-2 models
(turbo, nano) at most 375 from the first 15 s of the loudness-normalised clip. The S3Gen part is
the same for every variant (voice conversion reads only it). ``Voice.prepared_for`` records the
variant that prepared a voice when it is known (``TTS.prepare_conditionals``, the voice library's
records); it is kept in memory only, never in the ``.pt``, so the files stay the reference's.
``Voice.check_fits`` refuses a voice of the other family (see there).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import secrets
from pathlib import Path
from typing import Optional, Union

import torch

from .models.t3.cond_enc import T3Cond

# The reference's T3Cond fields, in its order (conds.pt stores T3Cond.__dict__).
T3_FIELDS = ("speaker_emb", "clap_emb", "cond_prompt_speech_tokens", "cond_prompt_speech_emb", "emotion_adv")
GEN_FIELDS = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")
SPEAKER_EMB_DIM = 256
XVECTOR_DIM = 192
MEL_BINS = 80
# The median F0 (Hz) of a voice conversion target, kept next to the S3Gen reference dict's fields
# in memory (``VC.prepare_target``); never written into a .pt (``Voice.to_dict`` drops it).
MEDIAN_F0_KEY = "median_f0"

# Voices made for one variant fit the others of its family: the same speech-prompt length
# (T3Config.speech_cond_prompt_len) and the same clip preprocessing.
VOICE_FAMILY = {"chatterbox": "llama", "multilingual": "llama", "turbo": "gpt2", "nano": "gpt2"}
FAMILY_PROMPT_TOKENS = {"llama": 150, "gpt2": 375}  # at most
FAMILY_PROMPT_SECONDS = {"llama": 6, "gpt2": 15}
FAMILY_LABEL = {"llama": "Llama-family", "gpt2": "GPT-2-family"}

# Emotion exaggeration: see check_exaggeration.
EXAGGERATION_MIN, EXAGGERATION_MAX = 0.0, 10.0

# torch.save archives: the zip format (torch >= 1.6) or a legacy pickle (protocol 2+).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


class VoiceError(ValueError):
    """A voice file or dict is unreadable or does not have the expected fields and shapes, or a
    voice does not fit the model it is used with, or a voice setting is out of range."""


def check_exaggeration(value, what: str = "exaggeration") -> float:
    """``value`` as a float if it is a usable emotion exaggeration, else a :class:`VoiceError`.

    Accepted: a real number (Python or NumPy scalar, or a one-element tensor; not a bool) that is
    finite and within ``0 <= x <= 10``. Why this range: the reference's own values all lie in it
    (0.0 is Turbo's default and what its parity runs use, 0.5 the Llama default, its demo UI's
    slider spans 0.25-2). The value is multiplied into a learned projection (``emotion_adv_fc``),
    so the conditioning grows linearly with it: far beyond 2 the model is well outside anything
    it was trained on, and 10 leaves ample room to experiment while still catching mistakes such
    as ``50`` for ``0.5``. A negative value is never produced by the reference's UI and has no
    meaning as an intensity. NaN or inf would reach the model and silently yield all-zero tokens.
    The same rule applies wherever an exaggeration enters: ``TTS.prepare_conditionals``,
    ``Voice.with_exaggeration`` (and so ``generate(exaggeration=...)``), ``VoiceLibrary.add``, the
    CLI, and a voice file's stored ``emotion_adv`` (``Voice.validate``)."""
    shown = value
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise VoiceError(f"{what} must be one real number, got a {value.dtype} tensor of shape "
                             f"{list(value.shape)}")
        shown = value = value.detach().reshape(-1)[0].item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise VoiceError(f"{what} must be a number, got {type(value).__name__} {shown!r}")
    x = float(value)
    if not math.isfinite(x):
        raise VoiceError(f"{what} must be a finite number, got {x}")
    if not EXAGGERATION_MIN <= x <= EXAGGERATION_MAX:
        raise VoiceError(f"{what} must be between {EXAGGERATION_MIN:g} and {EXAGGERATION_MAX:g} (0.5 is the "
                         f"default; the reference's demo offers 0.25-2), got {x:g}")
    return x


def variant_family(variant: str) -> str:
    """``"llama"`` or ``"gpt2"`` for a variant name (aliases such as ``multilingual-v3`` included)."""
    from .models.t3.config import canonical_variant

    key = canonical_variant(variant) if isinstance(variant, str) else variant
    if key not in VOICE_FAMILY:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VOICE_FAMILY)}")
    return VOICE_FAMILY[key]


def _family_variants(family: str) -> str:
    return " or ".join(v for v, f in VOICE_FAMILY.items() if f == family)


def create_temp_file(directory: Union[str, Path], prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new file in ``directory`` opened for writing -> ``(fd, path)``.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file gets the usual mode of a file the
    user writes, ``0666 & ~umask``, so that a voice prepared by one user can be read by another
    (a service account) as the umask allows."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {directory}")


@dataclasses.dataclass
class Voice:
    t3: T3Cond
    gen: dict
    # The canonical variant whose model prepared this voice, when known (None for a voice read
    # from a plain conds.pt). In memory only: the .pt keeps the reference's layout.
    prepared_for: Optional[str] = dataclasses.field(default=None, compare=False)
    # The median F0 (Hz) of the clip(s) the voice was made from, when it was measured
    # (``chatterbox_rt.pitch``; voice conversion's ``pitch_match``). Like ``prepared_for`` it is
    # not in the .pt (the reference's S3Gen would take an extra ``gen`` key as an argument); the
    # voice library keeps it in the voice's record.
    median_f0: Optional[float] = dataclasses.field(default=None, compare=False)

    # ------------------------------------------------------------------ views

    @property
    def exaggeration(self) -> Optional[float]:
        e = self.t3.emotion_adv
        if e is None:
            return None
        return float(e.reshape(-1)[0]) if torch.is_tensor(e) else float(e)

    @property
    def device(self) -> torch.device:
        return self.t3.speaker_emb.device

    @property
    def prompt_tokens(self) -> int:
        """How many T3 prompt speech tokens the voice holds (0 when it has none)."""
        t = self.t3.cond_prompt_speech_tokens
        return int(t.shape[-1]) if torch.is_tensor(t) else 0

    @property
    def family(self) -> Optional[str]:
        """``"llama"`` or ``"gpt2"``: recorded (``prepared_for``), or inferred where the prompt
        length is conclusive (more than 150 tokens cannot be a Llama-family voice); else None."""
        if self.prepared_for is not None:
            return variant_family(self.prepared_for)
        if self.prompt_tokens > FAMILY_PROMPT_TOKENS["llama"]:
            return "gpt2"
        return None

    def with_exaggeration(self, exaggeration: float) -> "Voice":
        """A copy with another emotion exaggeration (tensors shared, not copied)."""
        exaggeration = check_exaggeration(exaggeration)
        if exaggeration == self.exaggeration:
            return self
        t3 = dataclasses.replace(self.t3, emotion_adv=torch.full((1, 1, 1), exaggeration,
                                                                  device=self.device))
        return Voice(t3, dict(self.gen), prepared_for=self.prepared_for, median_f0=self.median_f0)

    def to(self, device=None) -> "Voice":
        """A copy on ``device`` (the reference's ``Conditionals.to`` moves in place; a voice here may be
        shared by concurrent requests, so it is never mutated)."""
        t3 = dataclasses.replace(self.t3)
        t3.to(device=device)
        gen = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.gen.items()}
        return Voice(t3, gen, prepared_for=self.prepared_for, median_f0=self.median_f0)

    def nbytes(self) -> int:
        tensors = [v for v in vars(self.t3).values() if torch.is_tensor(v)]
        tensors += [v for v in self.gen.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_fits(self, variant: str, name: Optional[str] = None) -> "Voice":
        """Refuse (VoiceError) to condition ``variant``'s T3 with a voice of the other family.

        Such a voice runs without a shape error, but it is not what the reference computes for that
        model (another prompt length and clip preprocessing, and the GPT-2 models ignore the emotion
        value), so it is refused rather than silently degrading the speech. The family is the
        recorded one (``prepared_for``), else inferred from the prompt length where that is
        conclusive; a voice of unknown family (e.g. a plain conds.pt with at most 150 prompt
        tokens) is accepted. Voice conversion reads only the S3Gen part and accepts any voice."""
        want = variant_family(variant)
        have = self.family
        if have is None or have == want:
            return self
        from .models.t3.config import canonical_variant

        model = canonical_variant(variant)
        who = f"voice {name!r}" if name else "this voice"
        n = self.prompt_tokens
        if self.prepared_for is not None:
            made = (f"{who} was prepared for {self.prepared_for} (a {FAMILY_LABEL[have]} voice: {n} prompt tokens "
                    f"from the first {FAMILY_PROMPT_SECONDS[have]} s of its clip)")
        else:
            made = (f"{who} has {n} prompt tokens, more than the {FAMILY_PROMPT_TOKENS['llama']} a Llama-family "
                    f"voice can have, so it was prepared for a {FAMILY_LABEL[have]} model ({_family_variants(have)})")
        raise VoiceError(
            f"{made}, but the {model} model needs a {FAMILY_LABEL[want]} voice (up to {FAMILY_PROMPT_TOKENS[want]} "
            f"prompt tokens from the first {FAMILY_PROMPT_SECONDS[want]} s of the clip"
            f"{', loudness-normalised' if want == 'gpt2' else ', plus the emotion exaggeration'}); it would run but "
            f"not as the reference computes it. Prepare the clip again with this model: "
            f"tts.prepare_conditionals(clip) in Python, or `chatterbox-rt voices add NAME CLIP --variant {model}` "
            f"for the voice library")

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        """The reference's ``conds.pt`` layout (CPU tensors)."""
        t3 = {k: getattr(self.t3, k) for k in T3_FIELDS}
        t3 = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in t3.items()}
        if t3["emotion_adv"] is not None and not torch.is_tensor(t3["emotion_adv"]):
            t3["emotion_adv"] = torch.full((1, 1, 1), float(t3["emotion_adv"]))
        gen = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in self.gen.items() if k != MEDIAN_F0_KEY}
        return {"t3": t3, "gen": gen}

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``conds.pt``-style; atomic (a crash never leaves a half-written file). The file's
        mode follows the umask (``0666 & ~umask``), as for any file the user writes."""
        path = Path(path)
        if path.is_dir():
            raise VoiceError(f"cannot save the voice to {path}: it is a directory; give a file name such as "
                             f"{path / 'voice.pt'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise VoiceError(f"cannot save the voice to {path}: {path.parent} is not a directory "
                             f"(a file is in the way: {e.filename or path.parent})") from e
        fd, tmp = create_temp_file(path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.to_dict(), f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, Path], map_location="cpu") -> "Voice":
        """Read a ``conds.pt`` (the reference's or ours) with ``weights_only=True``."""
        path = Path(path)
        if path.is_dir():
            raise VoiceError(f"cannot read voice file {path}: it is a directory, not a voice file "
                             f"(a .pt in the reference's conds.pt layout)")
        if not path.is_file():
            raise VoiceError(f"voice file not found: {path}")
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise VoiceError(f"cannot read voice file {path}: {e}") from e
        if not head.startswith(_TORCH_MAGIC):
            if not head:
                kind = "an empty file"
            elif b"\x00" not in head and _is_text(head):
                kind = "a text file"
            else:
                kind = "not a PyTorch file"
            raise VoiceError(f"cannot read voice file {path}: it is {kind}, not a voice (a voice file is a "
                             f"torch.save archive in the reference's conds.pt layout, {{'t3': ..., 'gen': ...}})")
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise VoiceError(f"cannot read voice file {path}: {e} (truncated or corrupt?)") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "voice dict") -> "Voice":
        if not isinstance(data, dict) or not isinstance(data.get("t3"), dict) or not isinstance(data.get("gen"), dict):
            raise VoiceError(f"{source} is not a voice: expected {{'t3': {{...}}, 'gen': {{...}}}} "
                             f"(the reference's conds.pt layout)")
        t3, gen = data["t3"], data["gen"]
        unknown = sorted(set(t3) - set(T3_FIELDS))
        if unknown:
            raise VoiceError(f"{source}: unknown T3 conditioning fields {unknown}")
        voice = cls(T3Cond(**t3), dict(gen))
        voice.validate(source)
        return voice

    def validate(self, source: str = "voice") -> "Voice":
        """Check the fields the runtime reads; the message names the field and both shapes."""
        problems = []

        def need(obj, name, ndim, last=None, integer=False):
            v = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
            if not torch.is_tensor(v):
                problems.append(f"{name} is missing")
                return
            if v.dim() != ndim or (last is not None and v.shape[-1] != last) or v.shape[0] != 1:
                want = f"[1, ..., {last}]" if last else f"{ndim}-D with batch 1"
                problems.append(f"{name} has shape {list(v.shape)}, expected {want}")
            elif integer and v.is_floating_point():
                problems.append(f"{name} must hold integer token ids, got {v.dtype}")
            elif v.is_floating_point() and not bool(torch.isfinite(v).all()):
                problems.append(f"{name} holds NaN or inf")

        need(self.t3, "speaker_emb", 2, SPEAKER_EMB_DIM)
        if self.t3.cond_prompt_speech_tokens is not None:
            need(self.t3, "cond_prompt_speech_tokens", 2, integer=True)
        if self.t3.emotion_adv is not None:  # the GPT-2 models do not read it
            try:
                check_exaggeration(self.t3.emotion_adv, "emotion_adv (the exaggeration)")
            except VoiceError as e:
                problems.append(str(e))
        need(self.gen, "prompt_token", 2, integer=True)
        need(self.gen, "prompt_feat", 3, MEL_BINS)
        need(self.gen, "embedding", 2, XVECTOR_DIM)
        if self.median_f0 is not None and not (isinstance(self.median_f0, numbers.Real)
                                               and math.isfinite(self.median_f0) and self.median_f0 > 0):
            problems.append(f"median_f0 must be a positive number of Hz, got {self.median_f0!r}")
        if self.prepared_for is not None and self.prepared_for not in VOICE_FAMILY:
            problems.append(f"prepared_for {self.prepared_for!r} is not a variant ({', '.join(VOICE_FAMILY)})")
        if problems:
            raise VoiceError(f"{source} is not a usable voice: " + "; ".join(problems))
        return self


def merge_voices(voices, durations) -> Voice:
    """Several clips' voices (prepared alike, one per clip) -> one voice of the speaker.

    The speaker embeddings are averaged: T3's voice-encoder embedding as the reference's
    ``VoiceEncoder.utt_to_spk_embed`` does (mean, then L2-normalised), S3Gen's CAMPPlus x-vector
    as a plain mean (the flow normalises it). The prompts (T3's prompt tokens, S3Gen's prompt
    tokens and mel) and the exaggeration come from the longest clip (``durations``, seconds);
    ``median_f0`` is left to the caller (the median over all clips' frames, not of the medians).
    One voice is returned as it is."""
    voices = list(voices)
    if not voices:
        raise ValueError("no clips: a voice needs at least one clip")
    if len(durations) != len(voices):
        raise ValueError(f"{len(durations)} durations for {len(voices)} voices")
    if len(voices) == 1:
        return voices[0]
    longest = voices[max(range(len(voices)), key=lambda i: durations[i])]
    spk = torch.stack([v.t3.speaker_emb.reshape(-1).float().cpu() for v in voices]).mean(dim=0)
    spk = (spk / spk.norm()).reshape(1, -1).to(longest.t3.speaker_emb)
    xvec = torch.stack([v.gen["embedding"].reshape(-1).float().cpu() for v in voices]).mean(dim=0)
    t3 = dataclasses.replace(longest.t3, speaker_emb=spk)
    gen = dict(longest.gen, embedding=xvec.reshape(1, -1).to(longest.gen["embedding"]))
    return Voice(t3, gen, prepared_for=longest.prepared_for).validate("merged voice")


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(data) - 3  # a multi-byte character cut by the 512-byte read
    return True


def builtin_voice(ckpt_dir: Union[str, Path], device=None) -> Optional[Voice]:
    """The checkpoint's ``conds.pt`` voice, or None when the directory has none."""
    path = Path(ckpt_dir) / "conds.pt"
    if not path.is_file():
        return None
    voice = Voice.load(path)
    return voice.to(device) if device is not None else voice


__all__ = ["Voice", "VoiceError", "builtin_voice", "merge_voices", "MEDIAN_F0_KEY", "check_exaggeration", "variant_family", "T3_FIELDS",
           "GEN_FIELDS", "VOICE_FAMILY", "FAMILY_PROMPT_TOKENS", "EXAGGERATION_MIN", "EXAGGERATION_MAX"]
