"""The public text-to-speech API: ``chatterbox_rt.TTS``.

One object per loaded checkpoint (any variant). A call runs the reference's pipeline::

    text -> normalise -> tokenizer -> T3 (speech tokens) -> S3Gen flow (mel) -> HiFT (wav) -> watermark

and each stage is also callable on its own (``t3_tokens``, ``s3gen_mel``, ``s3gen_wav``) so that
parity checks and custom pipelines can enter or leave anywhere. Voices are prepared once
(``prepare_conditionals``) and passed to every call; ``voice=None`` means the checkpoint's
built-in voice (``conds.pt``), as in the reference.
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .audio import AudioError, check_voice_clip, load_audio, resample
from .checkpoint import (S3GEN_FILES, VE_FILES, CheckpointError, detect_variant, find_file, init_dummy_conv_,
                         load_into, read_state_dict, t3_file_path)
from .models.s3gen.hift import S3GEN_SR
from .models.s3gen.s3gen import PROMPT_MAX_SECONDS, S3_SR, S3GEN_SIL, S3Gen
from .models.t3 import T3, T3Cond
from .models.t3.config import SPEECH_CODEBOOK_SIZE, canonical_variant
from .models.voice_encoder import VoiceEncoder
from .precision import PrecisionConfig, apply_t3, cast_frontend, t3_load_dtype
from .profiling import nvtx
from .text import TextFrontEnd, dummy_text_frontend, load_text_frontend
from .voice import Voice, builtin_voice

log = logging.getLogger(__name__)

AudioInput = Union[str, Path, np.ndarray, Tensor]

# Seconds of the 16 kHz clip that become T3's prompt tokens (the reference's ENC_COND_LEN).
T3_PROMPT_SECONDS = {"chatterbox": 6, "multilingual": 6, "turbo": 15, "nano": 15}
# Shortest usable reference clip. Turbo/Nano: the reference asserts "longer than 5 seconds";
# the others need about a second for the voice encoder's first 1.6 s partial to be mostly speech.
MIN_VOICE_SECONDS = {"chatterbox": 1.0, "multilingual": 1.0, "turbo": 5.0, "nano": 5.0}
TURBO_TARGET_LUFS = -27.0  # ChatterboxTurboTTS.norm_loudness
SAMPLES_PER_TOKEN = S3GEN_SR // 25  # 24 kHz samples per 25 Hz speech token (S3GEN_SR // S3_TOKEN_RATE)
SAMPLING_ARGS = ("temperature", "top_p", "min_p", "top_k", "repetition_penalty", "cfg_weight")


def check_n_steps(n_steps) -> Optional[int]:
    """``n_steps`` (CFM steps; None: the decoder's default) checked: an integer >= 1."""
    if n_steps is not None and (not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1):
        raise ValueError(f"n_steps must be an integer >= 1 (or None for the default), got {n_steps!r}")
    return n_steps


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_generator(seed: Optional[int], device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def normalize_loudness(wav: np.ndarray, sr: int, target_lufs: float = TURBO_TARGET_LUFS) -> np.ndarray:
    """Turbo's reference-clip loudness normalisation (ITU-R BS.1770 via pyloudnorm, as the reference).
    Clips too short or too quiet to measure are left as they are (the reference does the same)."""
    try:
        import pyloudnorm
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("Turbo/Nano voice preparation needs pyloudnorm (pip install pyloudnorm)") from e
    try:
        loudness = pyloudnorm.Meter(sr).integrated_loudness(wav)
    except ValueError as e:
        log.warning("loudness normalisation skipped: %s", e)
        return wav
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    if np.isfinite(gain) and gain > 0.0:
        # float32 arithmetic, as under the reference's pinned numpy < 2 (value-based casting); with
        # numpy 2 the reference's product turns float64 and its tokenizer then fails on it.
        wav = wav.astype(np.float32) * np.float32(gain)
    return wav


def _uniform(dtype) -> Optional[PrecisionConfig]:
    try:
        return PrecisionConfig.uniform(dtype)
    except ValueError:  # e.g. a float64 model built by a test
        return None


class S3GenPipeline(ABC):
    """Shared by TTS and VC: speech tokens + S3Gen conditionals -> mel -> waveform (+ watermark)."""

    s3gen: S3Gen
    device: torch.device
    sr = S3GEN_SR

    def _gen_ref(self, voice) -> Mapping:
        gen = voice.gen if isinstance(voice, Voice) else voice
        if not isinstance(gen, Mapping) or "prompt_feat" not in gen:
            raise TypeError("voice must be a Voice (or an S3Gen reference dict)")
        return gen

    def s3gen_mel(self, tokens: Tensor, voice=None, *, n_steps: Optional[int] = None, noise: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None, **flow_controls) -> Tensor:
        """Speech tokens (1-D or ``[1, T]``, valid ids < 6561) -> mel ``[1, 80, M]``.

        ``M = 2 (P + T) - F`` as in the reference: the flow upsamples the voice's P prompt tokens
        and the T new ones to 50 Hz and drops the voice's F prompt-mel frames; F is usually 2P
        (then M = 2T), but a prompt mel one frame longer or shorter than twice its tokens gives
        2T - 1 or 2T + 1.

        ``noise``: the CFM's initial noise ``[1, 80, L]`` over the full length the estimator sees
        (the voice's prompt frames, then the new frames), as the reference draws it with
        ``randn_like(mu)``; None draws it from ``generator``. ``n_steps`` defaults to 10 (2 for
        the meanflow decoders of Turbo/Nano). ``flow_controls``: ``S3Gen.flow_mel``'s per-call
        ``cfg_rate`` / ``speaker_strength`` (voice conversion's controls)."""
        gen = self._gen_ref(self._voice(voice))
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2 and tokens.size(0) != 1:
            raise ValueError(f"s3gen_mel takes one request ([T] or [1, T]); got {list(tokens.shape)}")
        tokens = tokens.reshape(1, -1).to(self.device).long()
        if tokens.size(1) == 0:
            raise ValueError("no speech tokens to decode")
        mel, _ = self.s3gen.flow_mel(tokens, None, gen, n_steps=n_steps, noise=noise, generator=generator,
                                     **flow_controls)
        return mel

    def s3gen_wav(self, mel: Tensor, *, noise_free: bool = False,
                  generator: Optional[torch.Generator] = None) -> Tensor:
        """Mel ``[1, 80, T]`` -> waveform ``[1, 480 T]`` (HiFT, then the reference's trim-fade).
        ``noise_free=True`` zeroes the sine source's random phases and additive noise."""
        mel = torch.as_tensor(mel)
        if mel.dim() == 2:
            mel = mel[None]
        if mel.dim() != 3 or mel.size(1) != 80:
            raise ValueError(f"mel must be [1, 80, T]; got {list(mel.shape)}")
        return self.s3gen.hift(mel, noise_free=noise_free, generator=generator)

    def _finish(self, wav: Tensor, watermark: bool, post: Optional[str] = None) -> Tensor:
        """Device waveform ``[1, N]`` -> CPU float32 ``[1, N]``, post-processed (``post``:
        ``chatterbox_rt.post``; None leaves it as it is), then watermarked unless asked not to."""
        with nvtx.range("to_host", "io"):
            wav = wav.detach().float().cpu()
        if post is not None:
            from .post import apply_post

            with nvtx.range("post"):
                wav = apply_post(wav, self.sr, post)
        if not watermark:
            return wav
        from .watermark import watermark_output

        with nvtx.range("watermark"):
            return watermark_output(wav, self.sr)

    @abstractmethod
    def _voice(self, voice):
        """The caller's voice argument (None: the built-in one) -> what ``_gen_ref`` reads."""


class TTS(S3GenPipeline):
    """Text to speech with any Chatterbox variant."""

    def __init__(self, variant: str, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, frontend: TextFrontEnd,
                 builtin: Optional[Voice] = None, *, source: str = ""):
        self.variant = canonical_variant(variant)
        self.t3, self.s3gen, self.ve, self.frontend = t3, s3gen, ve, frontend
        self.device = t3.device
        self.dtype = t3.dtype
        self.builtin_voice = builtin.to(self.device) if builtin is not None else None
        self.source = source
        self.backend = "torch"  # "onnxruntime"/"tensorrt" for TTS.from_exported (chatterbox_rt.export.ort_backend)
        self.ckpt_dir: Optional[Path] = None  # the checkpoint directory, when loaded from one
        self.precision: Optional[PrecisionConfig] = getattr(t3, "precision", None) or _uniform(t3.dtype)
        self._lock = threading.RLock()  # T3 owns one KV cache; requests on one TTS run one at a time

    @property
    def can_stream(self) -> bool:
        """Whether ``stream``/``Engine.submit(stream=True)`` run on this model: always on the torch
        backend; on an exported bundle when it has HiFT's streaming graphs (every current export)."""
        from .engine.stream import can_stream

        return can_stream(self.s3gen)

    @property
    def behaviour(self) -> Optional[str]:
        """The multilingual model's behaviour ("0.1.7" or "upstream"); None for other variants."""
        return self.t3.config.behaviour

    def __repr__(self) -> str:
        return f"TTS(variant={self.variant!r}, device={self.device}, dtype={self.dtype}, {self.source})"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_local(cls, ckpt_dir: Union[str, Path], variant: Optional[str] = None, device=None,
                   dtype=torch.float32, *, t3_file: Optional[Union[str, Path]] = None,
                   behaviour: Optional[str] = None, lora: Optional[Union[str, Path]] = None,
                   backend: str = "torch", threads: Optional[int] = None, precision=None) -> "TTS":
        """Load a checkpoint directory by the official file names (variant detected if not given).

        ``t3_file``: the T3 file to load instead of the variant's official one: upstream's
        ``t3_model`` names ("v2", "v3"), any ``.safetensors`` file in ``ckpt_dir`` (the Single
        Language Pack's fine-tunes), or a path. ``behaviour`` (multilingual): "0.1.7" (alignment-
        guided EOS, repetition penalty 2.0; the default for the V2 file) or "upstream" (upstream
        HEAD: none of that, penalty 1.2, the last token's audio dropped; the default for V3 and any
        other file). ``lora``: a PEFT LoRA adapter directory merged into T3 at load.

        ``backend``: "torch" (default), "onnxruntime" or "tensorrt": the checkpoint is exported once
        to the export cache (``$CHATTERBOX_RT_EXPORTS``, default ``~/.cache/chatterbox-rt/onnx``,
        keyed by the weights' content hash) and run from there, as ``TTS.from_exported`` (for
        "tensorrt" the engines are built once into the engine cache, ``$CHATTERBOX_RT_ENGINES``).

        ``precision``: "auto" | "fp32" | "bf16" | "fp16" | "int8" | "fp8" | a
        ``chatterbox_rt.PrecisionConfig`` (each module's precision; ``chatterbox_rt.precision``).
        None (default): ``dtype`` for T3, the flow and HiFT, as before."""
        from .checkpoint import check_files, resolve_t3

        if backend != "torch":
            return cls._other_backend(backend, threads, device, dtype, cls.from_local, ckpt_dir, variant,
                                      t3_file=t3_file, behaviour=behaviour, lora=lora, precision=precision)

        ckpt_dir = Path(ckpt_dir)
        device = device or default_device()
        config = PrecisionConfig.resolve(precision, dtype, device)
        if lora is not None and not Path(lora).is_dir():
            raise CheckpointError(f"LoRA adapter directory not found: {lora}")
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
        if t3_file is None:
            variant = variant or detect_variant(ckpt_dir)
            check_files(ckpt_dir, variant)  # every missing file named at once, before anything slow
            t3_path, variant, behaviour = resolve_t3(ckpt_dir, variant, None, behaviour)
        else:
            t3_path = t3_file_path(ckpt_dir, t3_file)
            if not t3_path.is_file():
                check_files(ckpt_dir, variant or "multilingual", t3_path)
            t3_path, variant, behaviour = resolve_t3(ckpt_dir, variant, t3_path, behaviour)
            check_files(ckpt_dir, variant, t3_path)
        key = canonical_variant(variant)
        t3 = apply_t3(T3.from_local(ckpt_dir, variant=variant, device=device, dtype=t3_load_dtype(config),
                                    t3_file=t3_path, behaviour=behaviour, lora=lora), config)
        s3gen = S3Gen.from_file(find_file(ckpt_dir, key, S3GEN_FILES, "S3Gen"), meanflow=key in ("turbo", "nano"),
                                device=device).to_precision(device, config=config)
        ve_path = find_file(ckpt_dir, key, VE_FILES, "voice encoder")
        ve = load_into(VoiceEncoder(), read_state_dict(ve_path), str(ve_path)).to(device).eval()
        cast_frontend(ve, config.dtype("frontends"))
        frontend = load_text_frontend(ckpt_dir, key)
        extra = f", T3 {t3_path.name}" + (f", {behaviour} behaviour" if behaviour else "") + \
            (f", LoRA {lora}" if lora is not None else "")
        tts = cls(variant, t3, s3gen, ve, frontend, builtin_voice(ckpt_dir), source=f"checkpoint {ckpt_dir}{extra}")
        tts.ckpt_dir = ckpt_dir
        tts.precision = config
        return tts

    @classmethod
    def from_exported(cls, bundle_dir: Union[str, Path], device: Optional[str] = None, *,
                      threads: Optional[int] = None, verify: bool = False, backend: str = "onnxruntime",
                      **trt_options) -> "TTS":
        """A bundle written by ``chatterbox-rt export`` (``chatterbox_rt.export.export``), run on
        onnxruntime (``device`` default "cpu"): the same API, sampling and Engine as the torch
        backend. ``verify=True`` also checks every file's digest (reads every byte).

        ``backend="tensorrt"`` (``device`` default "cuda"): T3 and S3Gen's flow (encoder, CFM) as
        TensorRT engines (built once into the engine cache), the rest (HiFT, the front ends), and
        any graph whose engine fails to build, on onnxruntime; ``trt_options``: ``trt_components``,
        ``trt_precision``, ``engine_cache``, ``trt_strict``, ``trt_cuda_graphs``
        (``chatterbox_rt.export.ort_backend.load_exported``). Without TensorRT:
        ``TensorRTUnavailable`` with the install advice."""
        from .export.ort_backend import load_exported

        if trt_options and backend != "tensorrt":
            raise TypeError(f"{sorted(trt_options)} are options of backend='tensorrt'")
        return load_exported(bundle_dir, device=None if device is None else str(device), threads=threads,
                             verify=verify, backend=backend, **trt_options)

    @classmethod
    def _other_backend(cls, backend: str, threads, device, dtype, loader, *args, precision=None, **kw) -> "TTS":
        """Load with torch on the CPU (the exporter's input), export once, run the bundle."""
        from .export.ort_backend import cached_export, check_backend

        check_backend(backend)
        if precision is not None and PrecisionConfig.resolve(precision, dtype, "cpu") != PrecisionConfig():
            raise ValueError(f"backend={backend!r} runs the exported graphs' precision; drop precision={precision!r} "
                             f"(reduced precision comes from `chatterbox-rt export --precision`)")
        if dtype not in (None, torch.float32):
            raise ValueError(f"backend={backend!r} runs the exported graphs' precision; load with dtype=float32 "
                             f"(reduced precision comes from `chatterbox-rt export --precision`)")
        if backend == "tensorrt":
            from .export.tensorrt import EngineError, import_tensorrt

            import_tensorrt()  # the install advice when it is missing (checked before the export)
            if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
                raise EngineError("backend='tensorrt' runs TensorRT engines on a CUDA GPU, and "
                                  + ("none is visible to torch" if not torch.cuda.is_available()
                                     else f"device={device!r} is not one") + "; use backend='onnxruntime' there")
        tts = loader(*args, device="cpu", dtype=torch.float32, **kw)
        bundle = cached_export(tts)
        del tts
        if backend == "tensorrt":
            return cls.from_exported(bundle, device=str(device or "cuda"), threads=threads, backend="tensorrt")
        return cls.from_exported(bundle, device=str(device or "cpu"), threads=threads)

    @classmethod
    def from_dummy(cls, variant: str, seed: int = 0, device=None, dtype=torch.float32, *, backend: str = "torch",
                   threads: Optional[int] = None, precision=None, **t3_overrides) -> "TTS":
        """Seeded random weights at the real shapes, a character-level stand-in tokenizer and a
        random built-in voice: for tests and benchmarks (the audio is noise, the work is real).
        ``t3_overrides`` replace T3Config fields (e.g. a smaller backbone for fast tests).
        ``backend="onnxruntime"`` / ``"tensorrt"``: exported once to the export cache and run from there.
        ``precision``: as ``from_local``."""
        if backend != "torch":
            return cls._other_backend(backend, threads, device, dtype, cls.from_dummy, variant, seed,
                                      precision=precision, **t3_overrides)
        device = device or default_device()
        config = PrecisionConfig.resolve(precision, dtype, device)
        key = canonical_variant(variant)
        t3 = apply_t3(T3.from_dummy(variant, seed=seed, device=device, dtype=t3_load_dtype(config), **t3_overrides),
                      config)
        s3gen = S3Gen.from_dummy(meanflow=key in ("turbo", "nano"), seed=seed + 1,
                                 device=device).to_precision(device, config=config)
        ve = cast_frontend(init_dummy_conv_(VoiceEncoder(), seed + 2).to(device).eval(), config.dtype("frontends"))
        voice = dummy_voice(t3.config.speech_cond_prompt_len, seed=seed + 3)
        tts = cls(variant, t3, s3gen, ve, dummy_text_frontend(key), voice, source=f"dummy weights (seed {seed})")
        tts.precision = config
        return tts

    # ------------------------------------------------------------------ voices

    @torch.inference_mode()
    @nvtx.annotate("voice")
    def prepare_conditionals(self, wav: AudioInput, sr: Optional[int] = None, exaggeration: float = 0.5, *,
                             norm_loudness: bool = True) -> Voice:
        """A reference clip (file path, or array with ``sr``) -> ``Voice``.

        As the reference: the clip is read at 24 kHz (mixed to mono), Turbo/Nano normalise its
        loudness to -27 LUFS (``norm_loudness``), the first 10 s give the S3Gen prompt (mel,
        tokens, x-vector), the first 6 s (15 s for Turbo/Nano) at 16 kHz give T3's prompt tokens,
        and the whole clip at 16 kHz the speaker embedding.

        ``exaggeration`` must be finite and within 0-10 (``chatterbox_rt.voice.check_exaggeration``).
        The voice records the variant it was prepared for (``Voice.prepared_for``): a model of the
        other family (Llama: chatterbox, multilingual; GPT-2: turbo, nano) refuses it.
        """
        from .voice import check_exaggeration

        exaggeration = check_exaggeration(exaggeration)
        wav24, _ = load_audio(wav, sr, target_sr=S3GEN_SR)
        check_voice_clip(wav24, S3GEN_SR, min_seconds=MIN_VOICE_SECONDS[self.variant],
                         name=str(wav) if isinstance(wav, (str, Path)) else "reference clip")
        if self.variant in ("turbo", "nano") and norm_loudness:
            wav24 = normalize_loudness(wav24, S3GEN_SR)
        wav16 = resample(wav24, S3GEN_SR, S3_SR)

        gen = self.s3gen.embed_ref(wav24[: PROMPT_MAX_SECONDS * S3GEN_SR])
        plen = self.t3.config.speech_cond_prompt_len
        prompt, _ = self.s3gen.tokenizer([torch.from_numpy(wav16[: T3_PROMPT_SECONDS[self.variant] * S3_SR])],
                                         max_len=plen)
        spk = torch.from_numpy(self.ve.embeds_from_wavs([wav16], sample_rate=S3_SR)).mean(dim=0, keepdim=True)
        t3 = T3Cond(speaker_emb=spk.to(self.device), cond_prompt_speech_tokens=prompt.to(self.device),
                    emotion_adv=exaggeration * torch.ones(1, 1, 1, device=self.device))
        return Voice(t3, gen, prepared_for=self.variant).validate("prepared voice")

    def _voice(self, voice) -> Voice:
        if voice is None:
            if self.builtin_voice is None:
                raise ValueError("no voice given and this checkpoint has no built-in voice (conds.pt): "
                                 "pass voice=tts.prepare_conditionals('clip.wav')")
            return self.builtin_voice
        if isinstance(voice, (str, Path, np.ndarray)):
            raise TypeError("voice must be a Voice; make one with tts.prepare_conditionals(clip)")
        if not isinstance(voice, Voice):
            raise TypeError(f"voice must be a Voice, got {type(voice).__name__}")
        voice.check_fits(self.variant)  # a voice of the other model family: VoiceError (as the CLI)
        return voice if voice.device == self.device else voice.to(self.device)

    # ------------------------------------------------------------------ stages

    @nvtx.annotate("text")
    def text_tokens(self, text: str, language_id: Optional[str] = None) -> Tensor:
        """The variant's text normalisation and tokenizer -> 1-D LongTensor on the model's device."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty (or only whitespace): there is nothing to say")
        if self.variant == "multilingual" and language_id is None:
            raise ValueError("the multilingual model needs language_id (e.g. 'en', 'fr')")
        return self.frontend.to_tokens(text, language_id=language_id).to(self.device)

    def max_text_tokens(self, voice: Optional[Voice] = None, max_new_tokens: Optional[int] = None) -> int:
        """How many text tokens (as ``text_tokens`` returns them) one call accepts with ``voice``
        and ``max_new_tokens`` (default: the variant's): the Llama variants' text positions; for
        Turbo/Nano what their shared positions leave after the voice's prompt and the speech."""
        return self.t3.max_text_tokens(self._voice(voice).t3, max_new_tokens)

    def segments(self, text: str, voice: Optional[Voice] = None, *, language_id: Optional[str] = None,
                 max_new_tokens: Optional[int] = None, split: Optional[bool] = None) -> list[str]:
        """The pieces ``generate``/``stream``/``Engine.submit`` run ``text`` as
        (``chatterbox_rt.longtext.segment_text``): the text itself when it fits one segment (about
        20 s of speech, and the model's text-token limit with ``voice`` and ``max_new_tokens``),
        else segments cut at sentence ends, then clause marks and commas, then words. ``split``:
        None (default) as said, True always splits at sentence ends, False never."""
        from .longtext import segment_text

        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty (or only whitespace): there is nothing to say")
        if split not in (None, True, False):
            raise TypeError(f"split must be None, True or False, got {split!r}")
        if split is False:
            return [text]
        limit = self.max_text_tokens(voice, max_new_tokens)
        count = getattr(getattr(self, "frontend", None), "token_ids", None)
        n_tokens = (lambda t: len(count(t, language_id))) if count is not None else \
            (lambda t: int(self.text_tokens(t, language_id).numel()))
        return segment_text(text, n_tokens, max(limit, 1), split=split)

    def t3_tokens(self, text: str, voice: Optional[Voice] = None, *, max_new_tokens: Optional[int] = None,
                  language_id: Optional[str] = None, seed: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, exaggeration: Optional[float] = None,
                  stop_on_eos: bool = True, **sampling) -> Tensor:
        """``generate``'s text path and T3 -> valid speech tokens (1-D LongTensor, ids < 6561).

        Sampling arguments (``temperature``, ``top_p``, ``min_p``, ``top_k``,
        ``repetition_penalty``, ``cfg_weight``) and ``max_new_tokens`` default to the reference's
        for the variant (1000; Turbo/Nano 1001: one from the prefill, then 1000). ``stop_on_eos=False`` always draws ``max_new_tokens`` tokens (benchmarks: a fixed amount of
        work whatever random weights emit)."""
        unknown = sorted(set(sampling) - set(SAMPLING_ARGS))
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {unknown}; expected some of {list(SAMPLING_ARGS)}")
        v = self._voice(voice)
        if exaggeration is not None:
            v = v.with_exaggeration(exaggeration)
        ids = self.text_tokens(text, language_id)
        if generator is None:
            generator = make_generator(seed, self.device)
        with self._lock, nvtx.range("t3"):
            tokens = self.t3.generate(v.t3, ids, max_new_tokens=max_new_tokens, generator=generator,
                                      stop_on_eos=stop_on_eos, **sampling)
        return tokens[tokens < SPEECH_CODEBOOK_SIZE]

    # ------------------------------------------------------------------ all of it

    def generate(self, text: str, voice: Optional[Voice] = None, *, seed: Optional[int] = None,
                 language_id: Optional[str] = None, watermark: bool = True, exaggeration: Optional[float] = None,
                 max_new_tokens: Optional[int] = None, n_steps: Optional[int] = None, stop_on_eos: bool = True,
                 post: Optional[str] = None, split: Optional[bool] = None, **sampling) -> Tensor:
        """Text -> 24 kHz waveform ``[1, N]`` (CPU float32), watermarked unless ``watermark=False``.

        ``seed`` makes the call reproducible (T3 sampling, CFM noise and HiFT's source noise all
        draw from one generator). ``exaggeration`` overrides the voice's (Llama variants).
        With upstream's multilingual behaviour (V3, the Single Language Pack) the audio of the
        final speech token is dropped, as upstream does. ``post="clean"``: DC removal, high-pass
        and peak limiting (``chatterbox_rt.post``) before the watermark.

        Long text (see ``segments``; ``split``) runs through the default engine as one batch of
        segments, each with a seed derived from ``seed``, joined with a short pause;
        ``max_new_tokens`` bounds each segment."""
        from .post import apply_post, check_post

        check_n_steps(n_steps)
        post = check_post(post)
        if len(self.segments(text, voice, language_id=language_id, max_new_tokens=max_new_tokens, split=split)) > 1:
            if exaggeration is not None:
                sampling["exaggeration"] = exaggeration
            if max_new_tokens is not None:
                sampling["max_new_tokens"] = max_new_tokens
            req = self.default_engine().submit(text, voice, seed=seed, language_id=language_id, watermark=watermark,
                                               n_steps=n_steps, stop_on_eos=stop_on_eos, post=post, split=split,
                                               **sampling)
            return req.result()
        generator = make_generator(seed, self.device)
        tokens = self.t3_tokens(text, voice, max_new_tokens=max_new_tokens, language_id=language_id,
                                generator=generator, exaggeration=exaggeration, stop_on_eos=stop_on_eos,
                                **sampling)
        if self.variant in ("turbo", "nano"):  # the reference appends three silence tokens
            tokens = torch.cat([tokens, tokens.new_full((3,), S3GEN_SIL)])
        if tokens.numel() == 0:
            log.warning("T3 produced no speech tokens for %r; returning empty audio", text[:40])
            return torch.zeros(1, 0)
        mel = self.s3gen_mel(tokens, voice, n_steps=n_steps, generator=generator)
        wav = self.s3gen_wav(mel, generator=generator)
        if self.t3.config.drop_last_token_audio:
            # Upstream: the last token is "emitted just before EOS with degraded attention and
            # decodes to ~40 ms of noise" (mtl_tts.generate at 5de7a54).
            wav = wav[:, : max(1, tokens.numel() - 1) * SAMPLES_PER_TOKEN]
        if post is not None:
            wav = apply_post(wav, self.sr, post)
        return self._finish(wav, watermark)

    # ------------------------------------------------------------------ the engine

    def engine(self, **kw):
        """A ``chatterbox_rt.Engine`` over this model (continuous batching, streaming): see its
        docstring for ``max_batch``, ``max_len``, ``cuda_graphs``. Close it (or use ``with``)."""
        from .engine import Engine

        return Engine(self, **kw)

    def default_engine(self):
        """The engine ``stream`` uses, built on first use (4 requests at a time)."""
        with self._lock:
            eng = getattr(self, "_default_engine", None)
            if eng is None or eng._closing:
                eng = self._default_engine = self.engine(max_batch=DEFAULT_ENGINE_BATCH)
            return eng

    def stream(self, text: str, voice: Optional[Voice] = None, **kw):
        """Yield the waveform of ``generate(text, voice, **kw)`` as CPU float32 chunks ``[n_i]``
        while it is produced (every ``chunk_tokens`` speech tokens, default 25, after a first
        chunk of ``first_chunk_tokens``, default 20). Same arguments as ``generate`` plus those
        (``post``, ``split`` included: a long text streams its segments in order).
        Leaving the loop early cancels the request."""
        req = self.default_engine().submit(text, voice, stream=True, **kw)
        try:
            yield from req.chunks()
        finally:
            req.cancel()

    def close(self) -> None:
        """Stop the default engine, if one was started."""
        eng = getattr(self, "_default_engine", None)
        if eng is not None:
            eng.close(wait=False)
            self._default_engine = None


# Requests the default engine (``TTS.stream``) runs at once.
DEFAULT_ENGINE_BATCH = 4


def dummy_voice(prompt_len: int, seed: int = 0, prompt_seconds: float = 4.0) -> Voice:
    """A random voice at the real shapes (for dummy weights)."""
    g = torch.Generator().manual_seed(seed)
    n_tok = int(prompt_seconds * 25)
    spk = torch.randn(1, 256, generator=g)
    t3 = T3Cond(speaker_emb=spk / spk.norm(), emotion_adv=0.5 * torch.ones(1, 1, 1),
                cond_prompt_speech_tokens=torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, prompt_len), generator=g))
    gen = dict(prompt_token=torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, n_tok), generator=g),
               prompt_token_len=torch.tensor([n_tok]),
               prompt_feat=torch.randn(1, 2 * n_tok, 80, generator=g) - 6.0,  # log-mel range
               prompt_feat_len=None,
               embedding=torch.randn(1, 192, generator=g))
    return Voice(t3, gen)


__all__ = ["TTS", "S3GenPipeline", "dummy_voice", "normalize_loudness", "AudioError", "CheckpointError"]
