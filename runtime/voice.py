"""A voice: everything a reference clip contributes to synthesis, computed once and reused.

``Voice.t3`` conditions T3 (``speaker_emb [1, 256]``, ``cond_prompt_speech_tokens [1, P]``,
``emotion_adv [1, 1, 1]``); ``Voice.gen`` conditions S3Gen (``prompt_token [1, P']``,
``prompt_token_len [1]``, ``prompt_feat [1, 2P', 80]``, ``prompt_feat_len`` (None),
``embedding [1, 192]``). Field names and the file layout are the reference's ``Conditionals``
(``conds.pt``: ``{"t3": {...}, "gen": {...}}``), so a checkpoint's built-in voice loads and a
voice saved here loads in the reference.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
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


class VoiceError(ValueError):
    """A voice file or dict is unreadable or does not have the expected fields and shapes."""


@dataclasses.dataclass
class Voice:
    t3: T3Cond
    gen: dict

    # ------------------------------------------------------------------ views

    @property
    def exaggeration(self) -> float:
        e = self.t3.emotion_adv
        return float(e.reshape(-1)[0]) if torch.is_tensor(e) else float(e)

    @property
    def device(self) -> torch.device:
        return self.t3.speaker_emb.device

    def with_exaggeration(self, exaggeration: float) -> "Voice":
        """A copy with another emotion exaggeration (tensors shared, not copied)."""
        exaggeration = float(exaggeration)
        if not math.isfinite(exaggeration):
            raise ValueError(f"exaggeration must be a finite number, got {exaggeration}")
        if exaggeration == self.exaggeration:
            return self
        t3 = dataclasses.replace(self.t3, emotion_adv=torch.full((1, 1, 1), exaggeration,
                                                                  device=self.device))
        return Voice(t3, dict(self.gen))

    def to(self, device=None) -> "Voice":
        """A copy on ``device`` (the reference's ``Conditionals.to`` moves in place; a voice here may be
        shared by concurrent requests, so it is never mutated)."""
        t3 = dataclasses.replace(self.t3)
        t3.to(device=device)
        gen = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.gen.items()}
        return Voice(t3, gen)

    def nbytes(self) -> int:
        tensors = [v for v in vars(self.t3).values() if torch.is_tensor(v)]
        tensors += [v for v in self.gen.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        """The reference's ``conds.pt`` layout (CPU tensors)."""
        t3 = {k: getattr(self.t3, k) for k in T3_FIELDS}
        t3 = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in t3.items()}
        if not torch.is_tensor(t3["emotion_adv"]):
            t3["emotion_adv"] = torch.full((1, 1, 1), float(t3["emotion_adv"]))
        gen = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in self.gen.items()}
        return {"t3": t3, "gen": gen}

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``conds.pt``-style; atomic (a crash never leaves a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
        if not path.is_file():
            raise VoiceError(f"voice file not found: {path}")
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise VoiceError(f"cannot read voice file {path}: {e}") from e
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
        need(self.gen, "prompt_token", 2, integer=True)
        need(self.gen, "prompt_feat", 3, MEL_BINS)
        need(self.gen, "embedding", 2, XVECTOR_DIM)
        if problems:
            raise VoiceError(f"{source} is not a usable voice: " + "; ".join(problems))
        return self


def builtin_voice(ckpt_dir: Union[str, Path], device=None) -> Optional[Voice]:
    """The checkpoint's ``conds.pt`` voice, or None when the directory has none."""
    path = Path(ckpt_dir) / "conds.pt"
    if not path.is_file():
        return None
    voice = Voice.load(path)
    return voice.to(device) if device is not None else voice


__all__ = ["Voice", "VoiceError", "builtin_voice", "T3_FIELDS", "GEN_FIELDS"]
