"""Voice conversion: ``chatterbox_rt.VC``.

The source audio's S3 speech tokens (what is said, how it is timed) are decoded by S3Gen with a
target voice's conditionals (who says it), as the reference's ``ChatterboxVC`` does::

    source clip -> 16 kHz -> [pitch match] -> S3 tokenizer -> tokens -> [prune] ─┐
    target clip(s) -> 24 kHz (first 10 s) -> embed_ref (x-vectors averaged) ─────┴-> flow (mel)
        -> HiFT (wav) -> [post] -> watermark

The tokens still carry some of the source speaker, so ``generate`` takes controls
(:class:`VCControls`; every default reproduces the reference bit for bit):

* ``prune_tokens=N``: drop the first N source tokens (40 ms each), where the source's
  speaker shows most before the prompt takes over; only when more than N remain.
* ``speaker_strength=s``: the target x-vector, after its L2 normalisation, times s before the
  flow's speaker affine (``spk_embed_affine_layer``): s > 1 pushes the decoder harder toward the
  target. ``speaker_ramp=(start, end)``: the same, linear over the Euler steps.
* ``flow_cfg_rate=w``: the CFM's guidance rate for this call (``FlowConfig.cfg_rate``, 0.7, is
  never changed: the engine and its CUDA graphs keep it). ``guidance_ramp=(start, end)``: linear
  over the steps (step 0 start, the last end). The meanflow decoder (Turbo/Nano's
  ``s3gen_meanflow``) is distilled from guided outputs and runs no guidance: these two raise
  there; the speaker controls apply to its 2 steps.
* ``pitch_match=True``: shift the source's pitch toward the target's median F0 (measured from
  the target's clip(s) and kept with it) before tokenising, when it is further away than
  ``pitch_tolerance`` semitones, by at most ``max_pitch_shift`` (``chatterbox_rt.pitch``, the
  ``vc`` extra).
* ``target_voice=[clip, ...]``: x-vectors averaged over the clips, the prompt from the longest.
* ``post="clean"``: ``chatterbox_rt.post`` before the watermark.

``chatterbox_rt.vc_eval`` sweeps these and measures how far the output moves toward the target.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .audio import check_voice_clip, load_audio
from .checkpoint import S3GEN_FILES, BUILTIN_VOICE_FILE, CheckpointError
from .models.s3gen.cfm import FlowConfig, linear_ramp
from .models.s3gen.hift import S3GEN_SR
from .models.s3gen.s3gen import PROMPT_MAX_SECONDS, S3_SR, S3Gen
from .precision import PrecisionConfig
from .profiling import nvtx
from .tts import AudioInput, S3GenPipeline, check_n_steps, default_device, dummy_voice, make_generator
from .voice import MEDIAN_F0_KEY, Voice

MIN_SOURCE_SECONDS = 0.1  # at least a few speech tokens (25 per second)
MIN_TARGET_SECONDS = 1.0
SECONDS_PER_TOKEN = 0.04  # S3 tokens run at 25 Hz
DEFAULT_CFG_RATE = FlowConfig.cfg_rate  # 0.7, the reference's inference_cfg_rate
PITCH_EXTRA = "pip install 'chatterbox-rt[vc]'"


def _number(value, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {x:g}")
    return x


def _ramp(value, name: str) -> Optional[tuple[float, float]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (start, end) pair of numbers, got {value!r}")
    return (_number(value[0], f"{name}[0]"), _number(value[1], f"{name}[1]"))


@dataclasses.dataclass(frozen=True)
class VCControls:
    """``VC.generate``'s controls, checked (``TypeError`` / ``ValueError`` before any work) and
    normalised (floats, tuples). The defaults are the reference's behaviour."""

    prune_tokens: int = 0
    speaker_strength: float = 1.0
    flow_cfg_rate: Optional[float] = None  # None: the decoder's (FlowConfig.cfg_rate, 0.7)
    guidance_ramp: Optional[tuple[float, float]] = None
    speaker_ramp: Optional[tuple[float, float]] = None
    pitch_match: bool = False
    pitch_tolerance: Optional[float] = None  # semitones; None: chatterbox_rt.pitch.DEFAULT_PITCH_TOLERANCE
    max_pitch_shift: Optional[float] = None  # semitones; None: chatterbox_rt.pitch.DEFAULT_MAX_PITCH_SHIFT
    post: Optional[str] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        n = self.prune_tokens
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"prune_tokens must be an integer number of source tokens, got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"prune_tokens must be >= 0 (source tokens to drop, 40 ms each), got {n}")
        set_("prune_tokens", int(n))
        set_("speaker_strength", _number(self.speaker_strength, "speaker_strength"))
        if self.flow_cfg_rate is not None:
            set_("flow_cfg_rate", _number(self.flow_cfg_rate, "flow_cfg_rate"))
        set_("guidance_ramp", _ramp(self.guidance_ramp, "guidance_ramp"))
        set_("speaker_ramp", _ramp(self.speaker_ramp, "speaker_ramp"))
        if self.flow_cfg_rate is not None and self.guidance_ramp is not None:
            raise ValueError("give flow_cfg_rate or guidance_ramp, not both (the ramp sets every step's rate)")
        if self.speaker_strength != 1.0 and self.speaker_ramp is not None:
            raise ValueError("give speaker_strength or speaker_ramp, not both (the ramp sets every step's strength)")
        if self.pitch_match not in (True, False):
            raise TypeError(f"pitch_match must be True or False, got {self.pitch_match!r}")
        set_("pitch_match", bool(self.pitch_match))
        for name in ("pitch_tolerance", "max_pitch_shift"):
            value = getattr(self, name)
            if value is not None:
                if not self.pitch_match:
                    raise ValueError(f"{name} applies only with pitch_match=True")
                set_(name, _number(value, name))
        if self.post is not None:
            from .post import check_post

            set_("post", check_post(self.post))

    def changed(self) -> dict:
        """The fields that differ from the defaults (a setting's name in tables and JSON)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    def check_meanflow(self, meanflow: bool) -> None:
        """A meanflow decoder runs no guidance (distilled from guided outputs, 2 unguided steps):
        a CFG control other than the default is an error there rather than silently nothing."""
        if meanflow and (self.guidance_ramp is not None or
                         (self.flow_cfg_rate is not None and self.flow_cfg_rate != DEFAULT_CFG_RATE)):
            raise ValueError("this S3Gen is a meanflow decoder (Turbo/Nano's s3gen_meanflow: 2 steps distilled from "
                             "guided outputs, no classifier-free guidance), so flow_cfg_rate and guidance_ramp do not "
                             "apply; speaker_strength, speaker_ramp and the other controls do")

    def flow_kwargs(self, n_steps: int, meanflow: bool, default_rate: float = DEFAULT_CFG_RATE) -> dict:
        """``S3Gen.flow_mel``'s ``cfg_rate`` / ``speaker_strength`` for ``n_steps`` Euler steps;
        empty at the defaults (the reference's path, untouched)."""
        kw = {}
        if not meanflow:
            if self.guidance_ramp is not None:
                kw["cfg_rate"] = linear_ramp(*self.guidance_ramp, n_steps)
            elif self.flow_cfg_rate is not None and self.flow_cfg_rate != default_rate:
                kw["cfg_rate"] = self.flow_cfg_rate
        if self.speaker_ramp is not None:
            kw["speaker_strength"] = linear_ramp(*self.speaker_ramp, n_steps)
        elif self.speaker_strength != 1.0:
            kw["speaker_strength"] = self.speaker_strength
        return kw


def pitch_module():
    """``chatterbox_rt.pitch``, or an ImportError that says how to install it."""
    try:
        from . import pitch

        pitch._parselmouth()  # the module imports it lazily: fail here, before any work
    except ImportError as e:
        raise ImportError(f"pitch matching needs the vc extra ({PITCH_EXTRA}): {e}") from e
    return pitch


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
    def prepare_target(self, wav, sr: Optional[int] = None, *, f0: bool = False) -> dict:
        """A target clip -> S3Gen conditionals (the reference's ``set_target_voice``: 24 kHz,
        first 10 s, ``embed_ref``).

        ``wav`` may be a list of clips of the target speaker (``sr`` applies to every array): the
        x-vectors of all clips (each its first 10 s) are averaged and the prompt (tokens + mel)
        is the longest clip's. ``f0=True`` also measures the median F0 over all the clips' frames
        (``chatterbox_rt.pitch``) and keeps it in the dict (``"median_f0"``, Hz; None when no
        frame is voiced) for ``generate(pitch_match=True)``."""
        clips = list(wav) if isinstance(wav, (list, tuple)) else [wav]
        if not clips:
            raise ValueError("target_voice is an empty list: give at least one clip of the target voice")
        pitch = pitch_module() if f0 else None
        wavs = []
        for i, clip in enumerate(clips):
            wav24, _ = load_audio(clip, sr, target_sr=S3GEN_SR)
            name = str(clip) if isinstance(clip, (str, Path)) else "target clip" + (f" {i + 1}" if len(clips) > 1 else "")
            check_voice_clip(wav24, S3GEN_SR, min_seconds=MIN_TARGET_SECONDS, name=name)
            wavs.append(wav24)
        cut = PROMPT_MAX_SECONDS * S3GEN_SR
        longest = max(range(len(wavs)), key=lambda i: wavs[i].shape[-1])
        ref = self.s3gen.embed_ref(wavs[longest][:cut])
        if len(wavs) > 1:
            xvecs = [ref["embedding"] if i == longest else self.s3gen.xvector(w[:cut]) for i, w in enumerate(wavs)]
            ref["embedding"] = torch.cat(xvecs).mean(dim=0, keepdim=True)  # [1, 192]
        if pitch is not None:
            value = pitch.median_f0(np.concatenate(wavs), S3GEN_SR)
            ref[MEDIAN_F0_KEY] = None if value is None else float(value)
        return ref

    set_target_voice = prepare_target

    def _voice(self, voice, f0: bool = False, sr: Optional[int] = None):
        if voice is None:
            if self.target is None:
                raise ValueError("no target voice: pass target_voice=... (a clip or a Voice); this checkpoint has "
                                 "no built-in voice (conds.pt)")
            return self.target
        if isinstance(voice, Voice):
            gen = _gen_to(voice.gen, self.device)
            if voice.median_f0 is not None:
                gen[MEDIAN_F0_KEY] = voice.median_f0
            return gen
        if isinstance(voice, Mapping):
            return _gen_to(voice, self.device)
        return self.prepare_target(voice, sr, f0=f0)

    @torch.inference_mode()
    def source_tokens(self, audio: AudioInput, sr: Optional[int] = None, *, target_f0: Optional[float] = None,
                      pitch_tolerance: Optional[float] = None, max_pitch_shift: Optional[float] = None
                      ) -> torch.Tensor:
        """The source clip read at 16 kHz (as ``librosa.load(audio, sr=16000)``) -> S3 tokens ``[1, T]``.

        ``target_f0`` (Hz): first shift the source's pitch toward it (``chatterbox_rt.pitch.match_pitch``
        with ``pitch_tolerance`` and ``max_pitch_shift`` semitones; None: the module's defaults)."""
        wav16, _ = load_audio(audio, sr, target_sr=S3_SR)
        check_voice_clip(wav16, S3_SR, min_seconds=MIN_SOURCE_SECONDS,
                         name=str(audio) if isinstance(audio, (str, Path)) else "source audio")
        if target_f0 is not None:
            pitch = pitch_module()
            with nvtx.range("pitch_match", "voice"):
                wav16, _ = pitch.match_pitch(
                    wav16, S3_SR, float(target_f0),
                    tolerance=pitch.DEFAULT_PITCH_TOLERANCE if pitch_tolerance is None else pitch_tolerance,
                    max_shift=pitch.DEFAULT_MAX_PITCH_SHIFT if max_pitch_shift is None else max_pitch_shift)
            wav16 = np.ascontiguousarray(wav16, dtype=np.float32)
        tokens, _ = self.s3gen.tokenizer([torch.from_numpy(wav16).to(self.device)])
        return tokens

    def generate(self, audio: AudioInput, target_voice=None, *, sr: Optional[int] = None, seed: Optional[int] = None,
                 watermark: bool = True, n_steps: Optional[int] = None, target_sr: Optional[int] = None,
                 prune_tokens: int = 0, speaker_strength: float = 1.0, flow_cfg_rate: Optional[float] = None,
                 guidance_ramp=None, speaker_ramp=None, pitch_match: bool = False,
                 pitch_tolerance: Optional[float] = None, max_pitch_shift: Optional[float] = None,
                 post: Optional[str] = None) -> torch.Tensor:
        """Source speech (path, or array with ``sr``) -> 24 kHz waveform ``[1, N]`` (CPU float32)
        in the target voice: a clip (path/array with ``target_sr``), a list of clips, a ``Voice``,
        an S3Gen reference dict, or None for the built-in voice.

        The controls (``prune_tokens``, ``speaker_strength``, ``flow_cfg_rate``, ``guidance_ramp``,
        ``speaker_ramp``, ``pitch_match`` with ``pitch_tolerance`` / ``max_pitch_shift``, ``post``)
        are described in the module docstring and :class:`VCControls`; at their defaults the output
        is the reference's. Bad values raise before any work."""
        check_n_steps(n_steps)
        controls = VCControls(prune_tokens=prune_tokens, speaker_strength=speaker_strength,
                              flow_cfg_rate=flow_cfg_rate, guidance_ramp=guidance_ramp, speaker_ramp=speaker_ramp,
                              pitch_match=pitch_match, pitch_tolerance=pitch_tolerance,
                              max_pitch_shift=max_pitch_shift, post=post)
        return self._convert(audio, target_voice, controls, sr=sr, target_sr=target_sr, seed=seed,
                             watermark=watermark, n_steps=n_steps)

    def _convert(self, audio, target_voice, controls: VCControls, *, sr=None, target_sr=None, seed=None,
                 watermark=True, n_steps=None) -> torch.Tensor:
        controls.check_meanflow(self.s3gen.meanflow)
        if controls.pitch_match:
            pitch_module()  # the extra, before any work
        target = self._voice(target_voice, f0=controls.pitch_match, sr=target_sr)
        target_f0 = None
        if controls.pitch_match:
            target_f0 = self._target_f0(target, target_voice)
        with nvtx.range("source_tokens", "voice"):
            tokens = self.source_tokens(audio, sr, target_f0=target_f0, pitch_tolerance=controls.pitch_tolerance,
                                        max_pitch_shift=controls.max_pitch_shift)
        n = controls.prune_tokens
        if n and tokens.size(1) > n:
            tokens = tokens[:, n:]
        generator = make_generator(seed, self.device)
        steps = n_steps or self.s3gen.default_steps
        flow_kw = controls.flow_kwargs(steps, self.s3gen.meanflow, self.s3gen.flow.decoder.config.cfg_rate)
        mel = self.s3gen_mel(tokens, target, n_steps=n_steps, generator=generator, **flow_kw)
        return self._finish(self.s3gen_wav(mel, generator=generator), watermark, post=controls.post)

    @staticmethod
    def _target_f0(target: Mapping, given) -> float:
        if MEDIAN_F0_KEY not in target:
            what = ("the built-in voice (conds.pt)" if given is None else
                    "this target (a Voice or reference dict prepared without it)")
            raise ValueError(f"pitch_match needs the target's median F0, and {what} has none: pass the target as a "
                             f"clip (or a list of clips), or prepare it with vc.prepare_target(clip, f0=True)")
        f0 = target[MEDIAN_F0_KEY]
        if f0 is None:
            raise ValueError("pitch_match: no voiced frame was found in the target clip(s), so it has no median F0 "
                             "to match; use a clip with clear speech")
        return float(f0)


def _gen_to(gen: Mapping, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in gen.items()}


__all__ = ["VC", "VCControls", "DEFAULT_CFG_RATE", "pitch_module"]
