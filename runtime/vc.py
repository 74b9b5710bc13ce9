"""Voice conversion: ``chatterbox_rt.VC``.

The source audio's S3 speech tokens (what is said, how it is timed) are decoded by S3Gen with a
target voice's conditionals (who says it), as the reference's ``ChatterboxVC`` does::

    source clip -> 16 kHz -> S3 tokenizer -> tokens ─┐
    target clip -> 24 kHz (first 10 s) -> embed_ref ─┴-> flow (mel) -> HiFT (wav) -> watermark
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .audio import check_voice_clip, load_audio
from .checkpoint import S3GEN_FILES, BUILTIN_VOICE_FILE, CheckpointError
from .models.s3gen.hift import S3GEN_SR
from .models.s3gen.s3gen import PROMPT_MAX_SECONDS, S3_SR, S3Gen
from .precision import PrecisionConfig
from .profiling import nvtx
from .tts import AudioInput, S3GenPipeline, default_device, dummy_voice, make_generator
from .voice import Voice

MIN_SOURCE_SECONDS = 0.1  # at least a few speech tokens (25 per second)
MIN_TARGET_SECONDS = 1.0


class VC(S3GenPipeline):
    """Speech in one voice -> the same speech in another."""

    def __init__(self, s3gen: S3Gen, target: Optional[Mapping] = None, *, source: str = ""):
        self.s3gen = s3gen
        self.device = s3gen.device
        self.target = _gen_to(target, self.device) if target is not None else None
        self.source = source

    def __repr__(self) -> str:
        return f"VC(device={self.device}, meanflow={self.s3gen.meanflow}, {self.source})"

    @classmethod
    def from_local(cls, ckpt_dir: Union[str, Path], device=None, dtype=torch.float32, *, precision=None) -> "VC":
        """``s3gen.safetensors`` (or any variant's S3Gen file) and the built-in target voice
        ``conds.pt`` from a checkpoint directory. ``precision``: as ``TTS.from_local`` (its
        S3Gen fields: ``flow_encoder``, ``cfm``, ``hift``, ``frontends``)."""
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
        names = list(dict.fromkeys(n for v in ("chatterbox", "multilingual", "turbo") for n in S3GEN_FILES[v]))
        path = next((ckpt_dir / n for n in names if (ckpt_dir / n).is_file()), None)
        if path is None:
            raise CheckpointError(f"no S3Gen checkpoint in {ckpt_dir}: expected one of {', '.join(names)}")
        device = device or default_device()
        config = PrecisionConfig.resolve(precision, dtype, device)
        s3gen = S3Gen.from_file(path, device=device).to_precision(device, config=config)
        target = None
        if (ckpt_dir / BUILTIN_VOICE_FILE).is_file():
            target = Voice.load(ckpt_dir / BUILTIN_VOICE_FILE).gen
        return cls(s3gen, target, source=f"checkpoint {path}")

    @classmethod
    def from_dummy(cls, seed: int = 0, meanflow: bool = False, device=None, dtype=torch.float32, *,
                   precision=None) -> "VC":
        device = device or default_device()
        config = PrecisionConfig.resolve(precision, dtype, device)
        s3gen = S3Gen.from_dummy(meanflow=meanflow, seed=seed + 1, device=device).to_precision(device, config=config)
        return cls(s3gen, dummy_voice(1, seed=seed + 3).gen, source=f"dummy weights (seed {seed})")

    @torch.inference_mode()
    def prepare_target(self, wav: AudioInput, sr: Optional[int] = None) -> dict:
        """A target clip -> S3Gen conditionals (the reference's ``set_target_voice``: 24 kHz,
        first 10 s, ``embed_ref``)."""
        wav24, _ = load_audio(wav, sr, target_sr=S3GEN_SR)
        check_voice_clip(wav24, S3GEN_SR, min_seconds=MIN_TARGET_SECONDS,
                         name=str(wav) if isinstance(wav, (str, Path)) else "target clip")
        return self.s3gen.embed_ref(wav24[: PROMPT_MAX_SECONDS * S3GEN_SR])

    set_target_voice = prepare_target

    def _voice(self, voice):
        if voice is None:
            if self.target is None:
                raise ValueError("no target voice: pass target_voice=... (a clip or a Voice); this checkpoint has "
                                 "no built-in voice (conds.pt)")
            return self.target
        if isinstance(voice, Voice):
            return _gen_to(voice.gen, self.device)
        if isinstance(voice, Mapping):
            return _gen_to(voice, self.device)
        return self.prepare_target(voice)

    @torch.inference_mode()
    def source_tokens(self, audio: AudioInput, sr: Optional[int] = None) -> torch.Tensor:
        """The source clip read at 16 kHz (as ``librosa.load(audio, sr=16000)``) -> S3 tokens ``[1, T]``."""
        wav16, _ = load_audio(audio, sr, target_sr=S3_SR)
        check_voice_clip(wav16, S3_SR, min_seconds=MIN_SOURCE_SECONDS,
                         name=str(audio) if isinstance(audio, (str, Path)) else "source audio")
        tokens, _ = self.s3gen.tokenizer([torch.from_numpy(wav16).to(self.device)])
        return tokens

    def generate(self, audio: AudioInput, target_voice=None, *, sr: Optional[int] = None, seed: Optional[int] = None,
                 watermark: bool = True, n_steps: Optional[int] = None) -> torch.Tensor:
        """Source speech (path, or array with ``sr``) -> 24 kHz waveform ``[1, N]`` (CPU float32)
        in the target voice: a clip (path/array), a ``Voice``, an S3Gen reference dict, or None
        for the built-in voice."""
        target = self._voice(target_voice)
        with nvtx.range("source_tokens", "voice"):
            tokens = self.source_tokens(audio, sr)
        generator = make_generator(seed, self.device)
        mel = self.s3gen_mel(tokens, target, n_steps=n_steps, generator=generator)
        return self._finish(self.s3gen_wav(mel, generator=generator), watermark)


def _gen_to(gen: Mapping, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in gen.items()}


__all__ = ["VC"]
