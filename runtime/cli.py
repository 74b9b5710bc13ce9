"""The ``chatterbox-rt`` command.

* ``demo``: T3 (text -> speech tokens) for one or every variant, reporting its decode speed.
* ``synth TEXT -o out.wav``: text to 24 kHz audio, in the format the extension or ``--format``
  names (``chatterbox_rt.audio_out``: WAV, FLAC, MP3, Ogg/Vorbis, Opus, raw PCM), written
  atomically; ``-o -`` is standard output. Long text is split into segments
  (``chatterbox_rt.longtext``: sentences, then the model's text limit) that run as one batch
  through the engine and are joined with a short pause, with a progress bar.
* ``vc SOURCE -o out.wav --target clip.wav``: voice conversion (the same outputs), with its
  controls (``--prune-tokens``, ``--speaker-strength``, ... : ``chatterbox_rt.vc``).
* ``vc-eval SOURCE --target clip.wav --sweep NAME=V1,V2``: sweep those controls and measure the
  speaker shift (``chatterbox_rt.vc_eval``).
* ``voices add|list|remove``: the persistent voice library (``chatterbox_rt.voices``).
* ``tokens encode|analyze|bpe``: an audio corpus -> S3 speech tokens (or SNAC codes) in Parquet,
  their statistics, and weight-free merging of them (``chatterbox_rt.tokens``).
* ``bench``: per-stage speed, optionally against the reference (``chatterbox_rt.profiling.bench``).

Models come from ``--ckpt DIR`` (the official file names) or ``--dummy-weights`` (seeded random
weights at the real shapes: the speed is real, the audio is noise). A user error prints one line
``chatterbox-rt: error: ...`` and exits with status 2; every option, clip and output path that can
be checked without the models is checked before they load.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from . import VARIANTS, __version__
from .longtext import JOIN_PAUSE_S, MAX_SEGMENT_CHARS, fit_tokens, split_text  # noqa: F401 (public here too)

# The top-level --help text (the module docstring above is Sphinx markup, for the API docs).
DESCRIPTION = """\
Chatterbox text-to-speech from the command line.

  demo     T3 (text -> speech tokens) for one or every variant, with its decode speed
  synth    text -> audio file (WAV, FLAC, MP3, Ogg/Vorbis, Opus or raw PCM; '-o -' is stdout)
  vc       voice conversion: SOURCE speech in a target voice -> audio file
  vc-eval  sweep voice-conversion controls; how far each moves the speaker
  voices   the voice library: add, list, remove
  tokens   audio corpus -> speech-token dataset (encode), its statistics (analyze), merging (bpe)
  bench    per-stage speed, optionally against the reference
  export   ONNX graphs of a model, checked against torch (a bundle for onnxruntime, TensorRT)
  engines  TensorRT engines from an exported bundle: build, list, clean

Models come from --ckpt DIR (the official file names), --dummy-weights (seeded random
weights at the real shapes: the speed is real, the audio is noise) or --bundle DIR (an
exported bundle, run on onnxruntime). A user error prints one
line "chatterbox-rt: error: ..." and exits with status 2. 'chatterbox-rt COMMAND --help'
describes each command."""

DEMO_TEXT = "Chatterbox-rt turns text into speech tokens, fast and exactly like the reference."
# Placeholder text length with dummy weights (there are no tokenizer files to read).
DUMMY_TEXT_TOKENS = 48
# --seed: what torch's and NumPy's generators both take (a signed 64-bit integer, not negative).
SEED_MAX = 2**63 - 1
SEED_HELP = f"makes sampling reproducible: an integer 0 .. 2^63-1 ({SEED_MAX})"


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    key = str(name).strip().lower()
    if key not in table:
        raise ValueError(f"unknown --dtype {name!r}; choose from fp32, bf16, fp16")
    return table[key]


def available_devices() -> list:
    """The --device values that work on this machine (``auto`` first)."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for kind, module in (("mps", getattr(torch.backends, "mps", None)), ("xpu", getattr(torch, "xpu", None))):
        try:
            if module is not None and module.is_available():
                names.append(kind)
        except Exception:  # noqa: BLE001 - a half-present backend: not available
            continue
    return names


def _device(name: str) -> str:
    """A --device value -> the torch device string to use; an unknown or absent device is a
    ValueError listing the ones this machine has (checked before any model is loaded)."""
    import torch

    key = str(name).strip().lower()
    if key == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    have = available_devices()
    if key in have:
        return key
    if key.startswith("cuda"):
        why = (f"torch sees {torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else
               "torch sees no CUDA device" + ("" if torch.version.cuda else " (this torch is a CPU-only build)"))
    elif key in ("mps", "xpu"):
        why = f"torch has no usable {key} device here"
    elif key == "meta":
        why = "meta tensors hold no data, so nothing could be computed"
    else:
        why = "not a device torch can run this on"
    raise ValueError(f"--device {name!r}: {why}; this machine has {', '.join(have)}")


def _check_threads(threads) -> None:
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 1 (or 0 for torch's choice), got {threads}")


def _check_seed(seed, option: str = "--seed") -> None:
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{option} must be an integer from 0 to 2^63-1 ({SEED_MAX}), got {seed}")


def _check_kernels(device: str) -> None:
    """``CHATTERBOX_RT_KERNELS`` names a backend that can run on ``device`` (or is unset)."""
    from .kernels import dispatch

    forced = dispatch.requested()  # ValueError for a name that is no backend
    if forced is None:
        return
    try:
        dispatch.summary(device)
    except dispatch.KernelUnavailable as e:
        raise ValueError(f"{e}; unset {dispatch.ENV_VAR} for the automatic choice (or set it to native)") from None


def check_runtime_options(args) -> str:
    """--threads, --seed, --device, --dtype and CHATTERBOX_RT_KERNELS, before anything loads
    (shared by every model command, bench included) -> the torch device string."""
    _check_threads(getattr(args, "threads", None))
    _check_seed(getattr(args, "seed", None))
    device = _device(args.device)
    _dtype(args.dtype)
    precision = getattr(args, "load_precision", None)
    if precision is not None:
        from .precision import PrecisionConfig

        PrecisionConfig.resolve(precision, _dtype(args.dtype), device)  # a bad mode or a conflict, before loading
    _check_kernels(device)
    return device


def max_new_tokens_limit(variant: str) -> int:
    """The most speech tokens one T3 call of ``variant`` can generate, known without loading it:
    the Llama variants' speech positions; for Turbo/Nano the shared positions left after a
    full-length voice prompt, the start-of-speech token and one text token."""
    from .models.t3 import T3Config

    cfg = T3Config.for_variant(variant)
    if cfg.learned_pos_emb:
        return cfg.speech_pos_len - 1
    cond = 1 + cfg.speech_cond_prompt_len  # speaker embedding + prompt tokens (no perceiver, no emotion)
    return cfg.backbone.n_positions - cond - 1 - 1


def _check_tokens(n, variant: Optional[str], option: str) -> None:
    if n is None:
        return
    if n < 1:
        raise ValueError(f"{option} must be >= 1, got {n}")
    if variant is not None:
        limit = max_new_tokens_limit(variant)
        if n > limit:
            gpt = variant in ("turbo", "nano")
            raise ValueError(f"{option} {n} is more than the {variant} model can generate in one call: at most "
                             f"{limit} speech tokens" + (" (its positions are shared with the voice prompt and "
                                                         "the text)" if gpt else ""))


def _builtin_cond(ckpt: Path, device):
    import torch

    from .checkpoint import CheckpointError
    from .models.t3 import T3Cond

    path = ckpt / "conds.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the demo uses the checkpoint's built-in voice")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return T3Cond(**data["t3"]).to(device=device)
    except Exception as e:
        raise CheckpointError(f"cannot read the built-in voice {path}: {e}") from e


def _demo_one(variant: str, args) -> None:
    import torch

    from .models.t3 import T3, T3Cond
    from .models.t3.config import SPEECH_CODEBOOK_SIZE

    device, dtype = _device(args.device), _dtype(args.dtype)
    t0 = time.perf_counter()
    if args.ckpt:
        from .text import load_text_frontend

        model = T3.from_local(args.ckpt, variant=variant, device=device, dtype=dtype, t3_file=args.t3_file,
                              lora=args.lora, behaviour=args.behaviour)
        variant = model.config.variant
        cond = _builtin_cond(Path(args.ckpt), device)
        frontend = load_text_frontend(args.ckpt, model.config.variant)
        language = args.language or ("en" if model.config.variant == "multilingual" else None)
        text = frontend.to_tokens(args.text, language_id=language)
        source = f"checkpoint {args.ckpt}"
    else:
        model = T3.from_dummy(variant, seed=args.seed, device=device, dtype=dtype)
        cfg = model.config
        g = torch.Generator().manual_seed(args.seed)
        cond = T3Cond(torch.randn(1, cfg.speaker_embed_size, generator=g) * 0.1,
                      torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, cfg.speech_cond_prompt_len), generator=g), 0.5)
        body = torch.randint(1, 255, (DUMMY_TEXT_TOKENS,), generator=g)
        text = body if cfg.is_gpt else torch.cat([torch.tensor([cfg.start_text_token]), body,
                                                   torch.tensor([cfg.stop_text_token])])
        source = f"dummy weights (seed {args.seed}), {len(text)} placeholder text tokens"
    load_s = time.perf_counter() - t0

    gen = torch.Generator(device=device).manual_seed(args.seed)
    # Dummy weights draw a fixed number of tokens (random weights may emit EOS anywhere).
    stop = bool(args.ckpt)
    model.generate(cond, text, max_new_tokens=4, generator=gen, stop_on_eos=stop)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = model.generate(cond, text, max_new_tokens=args.tokens, generator=gen, stop_on_eos=stop)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n = len(tokens)
    preview = " ".join(str(t) for t in tokens[:12].tolist())
    print(f"[{variant}] {source}; loaded in {load_s:.1f} s")
    print(f"[{variant}] {n} speech tokens in {dt:.2f} s: {n / dt:.1f} tokens/s, {1000 * dt / max(n, 1):.1f} ms/token "
          f"(prefill included; {device}/{args.dtype}, {torch.get_num_threads()} threads)")
    print(f"[{variant}] first tokens: {preview}{' ...' if n > 12 else ''}")


def cmd_demo(args) -> int:
    import torch

    from .checkpoint import BUILTIN_VOICE_FILE
    from .models.t3.config import canonical_variant

    check_runtime_options(args)
    _check_t3_options(args)
    if args.ckpt:
        from .checkpoint import detect_variant

        if args.variant != "all":
            variants = [args.variant]
        else:  # a named --t3-file decides the variant at load
            variants = [None if args.t3_file else detect_variant(args.ckpt)]
        if not (Path(args.ckpt) / BUILTIN_VOICE_FILE).is_file():
            raise ValueError(f"{Path(args.ckpt) / BUILTIN_VOICE_FILE} not found: the demo uses the checkpoint's "
                             "built-in voice")
    else:
        variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    for v in variants:
        _check_tokens(args.tokens, canonical_variant(v) if v else None, "--tokens")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.ckpt:
        print("chatterbox-rt demo: no checkpoint given (--ckpt DIR), so seeded random weights at real shapes are "
              "used; the tokens are meaningless, the speed is real.")
    for v in variants:
        _demo_one(v, args)
    return 0


# ----------------------------------------------------------------------------------------------
# synth / vc / voices
# ----------------------------------------------------------------------------------------------
MAX_CHUNK_CHARS = MAX_SEGMENT_CHARS  # text per T3 request (chatterbox_rt.longtext)
SENTENCE_GAP_S = JOIN_PAUSE_S  # silence between the segments of a long text
DUMMY_VARIANT = "chatterbox"
POST_CHOICES = ("clean",)  # chatterbox_rt.post.POST_MODES (not imported here: the parser loads no numpy)
MERGE_METHODS = ("rl", "bpe", "rl-bpe", "cross-scale")  # chatterbox_rt.tokens.merge.METHODS (likewise)
PROGRESS_POLL_S = 0.2  # how often the progress bar looks at a long text's segments
# Random weights rarely emit the end-of-speech token, so dummy runs stop here unless told otherwise.
DUMMY_MAX_NEW_TOKENS = 50


def _note(msg: str) -> None:
    print(f"chatterbox-rt: {msg}", file=sys.stderr)


def _wait_with_progress(req, n: int, desc: str):
    """An engine request's result, with a bar over its segments (tqdm when installed, else a
    stderr counter) when there are two or more."""
    if n < 2:
        return req.result()
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=n, desc=desc, unit="segment", file=sys.stderr) if tqdm is not None else None
    shown = 0
    try:
        while not req.done():
            req._done.wait(PROGRESS_POLL_S)
            done = req.progress[0] if hasattr(req, "progress") else 0
            if done != shown:
                if bar is not None:
                    bar.update(done - shown)
                else:
                    print(f"\r{desc}: {done}/{n} segments", end="", file=sys.stderr, flush=True)
                shown = done
        wav = req.result()
        if bar is not None:
            bar.update(n - shown)
        elif shown < n:
            print(f"\r{desc}: {n}/{n} segments", file=sys.stderr, flush=True)
        return wav
    except BaseException:
        req.cancel()
        raise
    finally:
        if bar is not None:
            bar.close()


def _check_post_option(args) -> None:
    from .post import check_post

    try:
        check_post(getattr(args, "post", None))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--post: {e}") from None


def _need_file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    return p


def _output_target(args):
    """-o and --format, checked before anything loads -> (path or "-", format)."""
    from . import audio_out

    fmt = audio_out.check_format(args.format) if args.format else None
    if args.output == audio_out.STDOUT:
        if sys.stdout is None:
            raise ValueError("-o -: there is no standard output to write to")
        _not_a_terminal(args.output)
        return audio_out.STDOUT, fmt or "wav"
    try:
        p = audio_out.check_output_path(args.output)
    except IsADirectoryError:
        p = Path(args.output).expanduser()
        raise ValueError(f"-o {p} is a directory; give a file name such as {p / 'out.wav'}") from None
    if _is_stdout(p):  # -o /dev/stdout (or /proc/self/fd/1): as '-', messages on standard error
        _not_a_terminal(args.output)
        return audio_out.STDOUT, fmt or _format_by_name(p) or "wav"
    try:
        by_name = audio_out.format_for_path(p)
    except ValueError:
        by_name = None
        if fmt is None:
            fmt = audio_out.default_format(p)  # a device or FIFO: WAV; a file without an audio extension: error
    if fmt is not None and by_name is not None and fmt != by_name:
        raise ValueError(f"-o {p} names a {by_name} file but --format {fmt} was given; change the extension or "
                         f"drop --format")
    return p, fmt or by_name


def _not_a_terminal(output) -> None:
    if sys.stdout.isatty():
        raise ValueError(f"-o {output} writes the audio to standard output, which is a terminal here; redirect "
                         "it (> out.wav) or pipe it into a player")


def _is_stdout(path: Path) -> bool:
    """Whether ``path`` is what standard output already writes to (``/dev/stdout``, or the file
    stdout is redirected to): the audio then goes through that stream, not a rename over it."""
    import os

    try:
        st, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):  # no such file, or stdout has no descriptor (captured)
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def _format_by_name(path: Path) -> Optional[str]:
    from . import audio_out

    try:
        return audio_out.format_for_path(path)
    except ValueError:
        return None


@contextlib.contextmanager
def _audio_sink(target):
    """Where the audio goes. For "-": standard output's binary stream, with everything the command
    prints (progress, notes, the final line) sent to standard error meanwhile."""
    if target != "-":
        yield target
        return
    stream = sys.stdout
    sink = getattr(stream, "buffer", stream)
    with contextlib.redirect_stdout(sys.stderr):
        yield sink


def _need_dir(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (it is a file)" if p.is_file() else ""))
    return p


def _check_t3_options(args) -> None:
    """--t3-file and --lora: only with --ckpt, and present."""
    t3_file, lora = getattr(args, "t3_file", None), getattr(args, "lora", None)
    for option, value in (("--t3-file", t3_file), ("--lora", lora)):
        if value is not None and not args.ckpt:
            raise ValueError(f"{option} applies to a checkpoint: give --ckpt DIR (not --dummy-weights)")
    if t3_file is not None:
        from .checkpoint import t3_file_path

        _need_file(t3_file_path(args.ckpt, t3_file), "--t3-file")
    if lora is not None:
        _need_dir(lora, "--lora adapter directory")


def _variant(args) -> Optional[str]:
    """The variant (canonical name) the command will load, known before loading: --variant, else
    the checkpoint's T3 file name, else the dummy default; None when a named --t3-file decides."""
    from .models.t3.config import canonical_variant

    if getattr(args, "variant", None):
        return canonical_variant(args.variant)
    if not args.ckpt:
        return DUMMY_VARIANT
    if getattr(args, "t3_file", None):
        return None
    from .checkpoint import detect_variant

    return canonical_variant(detect_variant(args.ckpt))


def _check_clip(path, what: str, min_seconds: Optional[float], sr: int = 24000) -> Path:
    """Read a clip and refuse it (unreadable, empty, NaN, silent, too short) before any model loads,
    with the checks the models themselves apply. ``min_seconds`` None: the length is checked later."""
    from .audio import check_voice_clip, load_audio

    p = _need_file(path, what)
    wav, rate = load_audio(p, target_sr=sr)
    check_voice_clip(wav, rate, min_seconds=min_seconds or 0.0, name=str(p))
    return p


def _voice_clip_check(args, clip, variant: Optional[str]) -> Path:
    """A reference clip for a TTS voice (synth --voice, voices add CLIP), checked before loading."""
    from .tts import MIN_VOICE_SECONDS

    return _check_clip(clip, "voice clip", MIN_VOICE_SECONDS[variant] if variant else None)


SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "min_p": "--min-p", "top_k": "--top-k",
                  "repetition_penalty": "--repetition-penalty", "cfg_weight": "--cfg-weight"}
GPT_IGNORED = ("min_p", "cfg_weight")  # not supported by Turbo/Nano (as in the reference)


def _check_sampling(args, variant: Optional[str]) -> None:
    """Each sampling option given, against the rules T3 applies (worded with the option's name)."""
    from .models.t3 import T3Config
    from .models.t3.sampling import SamplingParams

    defaults = T3Config.for_variant(variant or DUMMY_VARIANT).sampling
    for name, flag in SAMPLING_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        values = {k: getattr(defaults, k) for k in SAMPLING_FLAGS}
        values[name] = value
        try:
            SamplingParams(**values).validate()
        except ValueError as e:
            raise ValueError(str(e).replace(f"{name}=", f"{flag} ", 1)) from None


def _ignored_for(args, variant: Optional[str]) -> list:
    """Sampling options (dest names) the variant ignores; each gets one line on stderr."""
    if variant not in ("turbo", "nano"):
        return []
    ignored = [k for k in GPT_IGNORED if getattr(args, k) is not None]
    flags = [SAMPLING_FLAGS[k] for k in ignored]
    if getattr(args, "exaggeration", None) is not None:
        flags.append("--exaggeration")
    for flag in flags:
        _note(f"{flag} is not supported by {variant} (as in the reference) and is ignored")
    return ignored


def _check_language(language: Optional[str], variant: Optional[str]) -> None:
    if language is None or variant is None:
        return
    from .text import SUPPORTED_LANGUAGES

    if variant == "multilingual":
        if language.lower() not in SUPPORTED_LANGUAGES:
            raise ValueError(f"--language {language!r} is not one the multilingual model speaks; choose one of "
                             f"{', '.join(SUPPORTED_LANGUAGES)}")
    elif language.lower() != "en":
        raise ValueError(f"--language {language!r}: the {variant} model is English only")


def _check_watermark(args) -> None:
    """Fail before loading any model when the watermark weights are missing."""
    if not args.no_watermark:
        from .watermark import get_watermarker

        get_watermarker("cpu")


def _library(args):
    from .voices import VoiceLibrary

    return VoiceLibrary(args.library)


def _check_model_options(args) -> None:
    """Every option that decides what loads and where, checked before anything loads."""
    bundle = getattr(args, "bundle", None)
    if not args.ckpt and not args.dummy_weights and not bundle:
        raise ValueError("no model: give --ckpt DIR (a checkpoint directory with the official files), "
                         "--dummy-weights (seeded random weights; the audio is noise) or --bundle DIR (an exported "
                         "bundle)")
    if bundle:
        if args.dtype not in ("fp32", "float32"):
            raise ValueError("--bundle runs the precision the bundle was exported in; drop --dtype")
        if getattr(args, "load_precision", None) not in (None, "fp32"):
            raise ValueError("--bundle runs the precision the bundle was exported in; drop --precision "
                             "(export with `chatterbox-rt export --precision` instead)")
        for opt in ("t3_file", "lora", "behaviour"):
            if getattr(args, opt, None):
                raise ValueError(f"--{opt.replace('_', '-')} applies when loading a checkpoint, not a --bundle "
                                 f"(export the checkpoint with it instead)")
    if args.t3_layers and not args.dummy_weights:
        raise ValueError("--t3-layers (a testing aid) only applies with --dummy-weights")
    check_runtime_options(args)
    _check_t3_options(args)


def _model_source(args) -> None:
    _check_model_options(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.dummy_weights:
        _note("--dummy-weights: the model weights are RANDOM, so the audio is noise (the work and its speed are "
              "real); use --ckpt DIR for speech")


def _load_tts(args):
    from .tts import TTS

    device, dtype = _device(args.device), _dtype(args.dtype)
    backend = getattr(args, "backend", "torch") or "torch"
    threads = getattr(args, "threads", None) or None
    if args.device == "auto" and (getattr(args, "bundle", None) or backend == "onnxruntime") and \
            backend != "tensorrt":
        device = _onnxruntime_auto_device()
    if getattr(args, "bundle", None):
        if backend == "tensorrt":
            return TTS.from_exported(args.bundle, device=device, threads=threads, backend="tensorrt")
        return TTS.from_exported(args.bundle, device=device, threads=threads)
    if args.ckpt:
        return TTS.from_local(args.ckpt, variant=args.variant, device=device, dtype=dtype,
                              precision=getattr(args, "load_precision", None),
                              t3_file=getattr(args, "t3_file", None), lora=getattr(args, "lora", None),
                              behaviour=getattr(args, "behaviour", None), backend=backend, threads=threads)
    variant = args.variant or DUMMY_VARIANT
    behaviour = getattr(args, "behaviour", None)
    overrides = {}
    if args.t3_layers:
        # Testing aid: a T3 with fewer layers (S3Gen stays full size).
        from .models.t3.config import smaller_backbone

        overrides = smaller_backbone(variant, behaviour=behaviour, num_layers=args.t3_layers)
    elif behaviour is not None:
        overrides = dict(behaviour=behaviour)
    return TTS.from_dummy(variant, seed=args.seed or 0, device=device, dtype=dtype, backend=backend,
                          precision=getattr(args, "load_precision", None),
                          threads=threads, **overrides)


def _onnxruntime_auto_device() -> str:
    """--device auto for onnxruntime: cuda where its CUDA execution provider is installed."""
    try:
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    except ImportError:
        return "cpu"


def _decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")  # strict; a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e})") from None


def _read_text(args) -> str:
    if args.text_file is not None:
        if args.text is not None:
            raise ValueError("give the text either as TEXT or with --text-file, not both")
        path = _need_file(args.text_file, "text file")
        text = _decode_text(path.read_bytes(), str(args.text_file))
    elif args.text == "-":
        if sys.stdin is None:
            raise ValueError("TEXT is '-' but there is no standard input to read")
        if sys.stdin.isatty():
            _note("reading the text from standard input (end it with Ctrl-D)")
        stream = getattr(sys.stdin, "buffer", None)
        text = _decode_text(stream.read(), "standard input") if stream is not None else sys.stdin.read()
    elif args.text is not None:
        text = args.text
    else:
        raise ValueError("no text: give TEXT, '-' to read standard input, or --text-file PATH")
    if not text.strip():
        raise ValueError("the text is empty: there is nothing to say")
    return text


def _builtin_voice_check(args, given: bool, options: str) -> None:
    """Without a voice option the checkpoint's conds.pt is the voice: it must be there."""
    if given or not args.ckpt:
        return
    from .checkpoint import BUILTIN_VOICE_FILE

    if not (Path(args.ckpt) / BUILTIN_VOICE_FILE).is_file():
        raise ValueError(f"{args.ckpt} has no built-in voice ({BUILTIN_VOICE_FILE}): give {options}")


def _text_limit(tts, voice, max_new: Optional[int]) -> int:
    """Text tokens one call takes with this voice and --max-new-tokens (CLI-worded when none)."""
    limit = tts.max_text_tokens(voice, max_new)
    if limit < 1:
        n = max_new if max_new is not None else tts.t3.config.sampling.max_new_tokens
        raise ValueError(f"--max-new-tokens {n} leaves no room for text with this voice on the {tts.variant} "
                         f"model (its positions are shared with the voice prompt); ask for at most "
                         f"{n + limit - 1}")
    return limit


def cmd_synth(args) -> int:
    from . import audio_out
    from .voice import check_exaggeration

    text = _read_text(args)
    target, fmt = _output_target(args)
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    _check_post_option(args)
    _check_model_options(args)
    variant = _variant(args)  # None: a named --t3-file decides; the checks below then follow the load
    _check_tokens(args.max_new_tokens, variant, "--max-new-tokens/--tokens")
    _check_sampling(args, variant)
    if args.exaggeration is not None:
        check_exaggeration(args.exaggeration, "--exaggeration")
    _check_language(args.language, variant)
    if args.ckpt and not args.t3_file:
        from .checkpoint import check_files

        check_files(args.ckpt, args.variant or variant)  # every missing file named at once
    if args.voice:
        _voice_clip_check(args, args.voice, variant)
    library = None
    if args.voice_id:
        library = _library(args)
        library.info(args.voice_id)  # exists? (before the model loads)
        if variant is not None:
            library.check_variant(args.voice_id, variant)
    _builtin_voice_check(args, bool(args.voice or args.voice_id), "--voice CLIP or --voice-id NAME")
    ignored = _ignored_for(args, variant)
    _model_source(args)
    _check_watermark(args)
    max_new = args.max_new_tokens
    if args.dummy_weights and max_new is None:
        max_new = DUMMY_MAX_NEW_TOKENS
        _note(f"--dummy-weights: random weights rarely emit end-of-speech, so each chunk stops after "
              f"{max_new} speech tokens (~{max_new / 25:.0f} s); --tokens N changes that")

    with _audio_sink(target) as sink:
        tts = _load_tts(args)
        if variant is None:  # known now: the checks that needed it
            _check_tokens(args.max_new_tokens, tts.variant, "--max-new-tokens/--tokens")
            _check_language(args.language, tts.variant)
            ignored = _ignored_for(args, tts.variant)
        if args.voice:
            voice = tts.prepare_conditionals(str(args.voice), exaggeration=0.5 if args.exaggeration is None
                                             else args.exaggeration)
        elif library is not None:
            voice = library.get(args.voice_id, device=tts.device, variant=tts.variant)
        else:
            voice = None  # the checkpoint's built-in voice (conds.pt)
            if tts.builtin_voice is None:
                raise ValueError("this checkpoint has no built-in voice (conds.pt): give --voice CLIP or "
                                 "--voice-id NAME")
        language = args.language or ("en" if tts.variant == "multilingual" else None)
        sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None and k not in ignored}
        if max_new is not None:
            sampling["max_new_tokens"] = max_new
        _text_limit(tts, voice, max_new)  # a --max-new-tokens that leaves no room for text: said in CLI terms
        chunks = tts.segments(text, voice, language_id=language, max_new_tokens=max_new)
        t0 = time.perf_counter()
        # The segments run as one batch through the engine (chatterbox_rt.longtext), joined there.
        engine = tts.default_engine() if args.batch is None else tts.engine(max_batch=args.batch)
        try:
            req = engine.submit(text, voice, seed=args.seed, language_id=language, watermark=not args.no_watermark,
                                post=args.post, exaggeration=args.exaggeration, **sampling)
            wav = _wait_with_progress(req, len(chunks), "synthesising").reshape(-1)
        finally:
            if args.batch is not None:
                engine.close(wait=False)
        dt = time.perf_counter() - t0
        audio_out.write(sink, wav, tts.sr, fmt)
        seconds = wav.numel() / tts.sr
        rtf = f", RTF {dt / seconds:.2f}" if seconds else ""
        where = "standard output" if target == "-" else target
        print(f"wrote {where}: {seconds:.2f} s of {fmt} audio at {tts.sr} Hz from {len(chunks)} chunk(s) in "
              f"{dt:.1f} s{rtf} ({tts.variant}, {tts.source}{'' if args.no_watermark else ', watermarked'})")
    return 0


def _check_vc_checkpoint(ckpt) -> None:
    """The checks VC.from_local makes first (a directory with an S3Gen file), before anything loads."""
    from .checkpoint import S3GEN_FILES, CheckpointError

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    names = list(dict.fromkeys(n for v in ("chatterbox", "multilingual", "turbo") for n in S3GEN_FILES[v]))
    if not any((ckpt / n).is_file() for n in names):
        raise CheckpointError(f"no S3Gen checkpoint in {ckpt}: expected one of {', '.join(names)}")


def _vc_controls(args):
    """The vc command's conversion controls, checked before anything loads (CLI option names in errors)."""
    from .vc import VCControls

    try:
        return VCControls(prune_tokens=args.prune_tokens, speaker_strength=args.speaker_strength,
                          flow_cfg_rate=args.flow_cfg_rate, guidance_ramp=args.guidance_ramp,
                          speaker_ramp=args.speaker_ramp, pitch_match=args.pitch_match,
                          pitch_tolerance=args.pitch_tolerance, max_pitch_shift=args.max_pitch_shift, post=args.post)
    except (TypeError, ValueError) as e:
        msg = str(e)
        for f in dataclasses.fields(VCControls):
            msg = re.sub(rf"\b{f.name}\b", "--" + f.name.replace("_", "-"), msg)
        raise ValueError(msg) from None


def cmd_vc(args) -> int:
    from . import audio_out
    from .models.s3gen.s3gen import S3_SR
    from .vc import MIN_SOURCE_SECONDS, MIN_TARGET_SECONDS, VC

    target_path, fmt = _output_target(args)
    _check_model_options(args)
    controls = _vc_controls(args)
    if args.ckpt:
        _check_vc_checkpoint(args.ckpt)
    source = _check_clip(args.source, "source audio", MIN_SOURCE_SECONDS, sr=S3_SR)
    clips = [str(_check_clip(t, "target clip", MIN_TARGET_SECONDS)) for t in args.target or ()]
    target = None
    if args.target_id:
        target = _library(args).get(args.target_id)  # any variant's voice: VC reads only its S3Gen part
    _builtin_voice_check(args, bool(args.target or args.target_id), "--target CLIP or --target-id NAME")
    _model_source(args)
    _check_watermark(args)
    device, dtype = _device(args.device), _dtype(args.dtype)
    with _audio_sink(target_path) as sink:
        if args.ckpt:
            vc = VC.from_local(args.ckpt, device=device, dtype=dtype, precision=getattr(args, "load_precision", None))
        else:
            vc = VC.from_dummy(seed=args.seed or 0, device=device, dtype=dtype,
                               precision=getattr(args, "load_precision", None))
        if clips:
            target = clips[0] if len(clips) == 1 else clips  # several clips: x-vectors averaged
        elif target is None and vc.target is None:
            raise ValueError("this checkpoint has no built-in voice (conds.pt): give --target CLIP or "
                             "--target-id NAME")
        t0 = time.perf_counter()
        wav = vc.generate(str(source), target_voice=target, seed=args.seed, watermark=not args.no_watermark,
                          **controls.changed())
        dt = time.perf_counter() - t0
        audio_out.write(sink, wav, vc.sr, fmt)
        seconds = wav.numel() / vc.sr
        where = "standard output" if target_path == "-" else target_path
        changed = controls.changed()
        extra = (", " + " ".join(f"{k}={v}" for k, v in changed.items())) if changed else ""
        print(f"wrote {where}: {seconds:.2f} s of {fmt} audio at {vc.sr} Hz in {dt:.1f} s ({vc.source}{extra})")
    return 0


def cmd_vc_eval(args) -> int:
    from .models.s3gen.s3gen import S3_SR
    from .vc import MIN_SOURCE_SECONDS, MIN_TARGET_SECONDS, VC
    from .vc_eval import VE_FILE_NAMES, load_voice_encoder, make_grid, parse_sweep, sweep

    _check_model_options(args)
    grid = make_grid([parse_sweep(s) for s in args.sweep])  # every setting checked before anything loads
    if args.n_steps is not None and args.n_steps < 1:
        raise ValueError(f"--n-steps must be an integer >= 1, got {args.n_steps}")
    if args.ckpt:
        _check_vc_checkpoint(args.ckpt)
        if not any((Path(args.ckpt) / n).is_file() for n in VE_FILE_NAMES):
            raise ValueError(f"{args.ckpt} has no voice encoder ({' or '.join(VE_FILE_NAMES)}): vc-eval measures "
                             f"the output's speaker with it")
    for out in (args.json, args.plot):
        if out is not None and not Path(out).expanduser().parent.is_dir():
            raise ValueError(f"cannot write {out}: {Path(out).expanduser().parent} is not a directory")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib (pip install matplotlib)") from None
    source = _check_clip(args.source, "source audio", MIN_SOURCE_SECONDS, sr=S3_SR)
    targets = [str(_check_clip(t, "target clip", MIN_TARGET_SECONDS)) for t in args.target]
    _model_source(args)
    device, dtype = _device(args.device), _dtype(args.dtype)
    seed = 0 if args.seed is None else args.seed
    precision = getattr(args, "load_precision", None)
    if args.ckpt:
        vc = VC.from_local(args.ckpt, device=device, dtype=dtype, precision=precision)
        ve = load_voice_encoder(args.ckpt, device=device)
    else:
        vc = VC.from_dummy(seed=seed, device=device, dtype=dtype, precision=precision)
        ve = load_voice_encoder(dummy_seed=seed, device=device)
        _note("vc-eval with --dummy-weights: random encoders measure noise, so the cosines are meaningless "
              "(the table's format and the timings are real)")
    result = sweep(vc, str(source), targets, grid, ve=ve, seed=seed, n_steps=args.n_steps,
                   warmup=not args.no_warmup)
    print(result.table())
    if args.json:
        print(f"wrote {result.save_json(Path(args.json).expanduser())}")
    if args.plot:
        print(f"wrote {result.plot(Path(args.plot).expanduser())}")
    return 0


def cmd_voices_add(args) -> int:
    from .voice import check_exaggeration
    from .voices import check_name

    check_name(args.name)
    check_exaggeration(args.exaggeration, "--exaggeration")  # before the model loads
    library = _library(args)
    if args.name in library and not args.overwrite:
        raise ValueError(f"a voice named {args.name!r} already exists in {library.root}; add --overwrite to "
                         f"replace it")
    given = args.clip if isinstance(args.clip, list) else [args.clip]
    clips = [_need_file(c, "voice clip") for c in given]
    for clip in clips:
        _voice_clip_check(args, clip, _variant(args))  # unreadable, silent, too short: before the model loads
    _model_source(args)
    tts = _load_tts(args)
    library.add(args.name, clips[0] if len(clips) == 1 else clips, tts, exaggeration=args.exaggeration,
                overwrite=args.overwrite)
    info = library.info(args.name)
    what = f"{info.duration_s:.1f} s clip" if len(clips) == 1 else \
        f"{len(clips)} clips, the longest {info.duration_s:.1f} s"
    print(f"added voice {info.name!r} to {library.root} ({info.variant}, {what}, "
          f"exaggeration {info.exaggeration:g})")
    return 0


def cmd_voices_list(args) -> int:
    library = _library(args)
    infos = library.list()
    if not infos:
        print(f"no voices in {library.root} (add one with `chatterbox-rt voices add NAME clip.wav ...`)")
        return 0
    header = ("NAME", "VARIANT", "DURATION", "CREATED")
    good = {i.name: (i.name, i.variant, f"{i.duration_s:.1f} s", i.created) for i in infos if not i.broken}
    widths = [max(len(r[c]) for r in [header, *good.values()]) for c in range(len(header))]
    widths[0] = max(widths[0], *(len(i.name) for i in infos))
    broken = [i for i in infos if i.broken]
    print(f"{len(infos)} voice(s) in {library.root}" + (f", {len(broken)} broken" if broken else ""))
    for i in [None, *infos]:  # by name, a broken entry in its place
        if i is not None and i.broken:
            print(f"{i.name.ljust(widths[0])}  (broken: {i.problem})")
            continue
        row = header if i is None else good[i.name]
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if broken:
        print("`chatterbox-rt voices remove NAME` deletes a broken entry")
    return 0


def cmd_voices_remove(args) -> int:
    library = _library(args)
    library.remove(args.name)
    print(f"removed voice {args.name!r} from {library.root}")
    return 0


def _api_key(args) -> Optional[str]:
    if args.api_key and args.api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: {e.strerror or e}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or None


def cmd_serve(args) -> int:
    if not args.ray:
        ray_only = [opt for opt, value, default in (
            ("--replicas", args.replicas, 1), ("--gpus-per-replica", args.gpus_per_replica, 0.0),
            ("--cpus-per-replica", args.cpus_per_replica, None), ("--min-replicas", args.min_replicas, None),
            ("--max-replicas", args.max_replicas, None),
            ("--target-ongoing-requests", args.target_ongoing_requests, None)) if value != default]
        if ray_only:
            raise ValueError(f"{', '.join(ray_only)} configure a Ray Serve deployment: add --ray")
    try:
        if args.ray:
            from .serve.ray import run_ray
        else:
            from .serve.server import serve
    except ImportError as e:
        extra = "ray" if args.ray else "serve"
        raise ValueError(f"chatterbox-rt serve{' --ray' if args.ray else ''} needs the {extra} extra: pip install "
                         f"'chatterbox-rt[{extra}]' ({e})") from None
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--max-batch must be >= 1 and --max-queue >= 0")
    key = _api_key(args)
    _model_source(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _note(f"serving on {args.host}: reachable from other machines" + ("" if key else " with no API key"))
    defaults = {"max_new_tokens": DUMMY_MAX_NEW_TOKENS} if args.dummy_weights else {}
    if args.dummy_weights:
        _note(f"--dummy-weights: random weights rarely emit end-of-speech, so each request stops after "
              f"{DUMMY_MAX_NEW_TOKENS} speech tokens unless it sets max_new_tokens")
    if args.ray:
        # Each replica loads the model itself; the voice library directory is all they share.
        return run_ray(args, api_key=key, generate_defaults=defaults)
    library = _library(args) if args.library else None
    tts = _load_tts(args)
    engine = tts.engine(max_batch=args.max_batch)
    serve(engine, host=args.host, port=args.port, library=library, api_key=key, max_queue=args.max_queue,
          request_timeout=args.request_timeout, drain_timeout=args.drain_timeout or None,
          log_level=args.log_level, generate_defaults=defaults)
    return 0


def cmd_tokens_encode(args) -> int:
    from .tokens import encode
    from .tokens.encode import MIN_SEGMENT_S

    if args.codec == "s3":
        if args.snac_checkpoint:
            raise ValueError("--snac-checkpoint applies to --codec snac")
        if not args.ckpt and not args.dummy_weights:
            raise ValueError("no model: give --ckpt DIR (a Chatterbox checkpoint directory; its S3Gen file holds the "
                             "S3 tokenizer) or --dummy-weights (seeded random weights; the tokens are meaningless)")
        if args.ckpt:
            _check_vc_checkpoint(args.ckpt)
    else:
        if not args.snac_checkpoint:
            from .tokens.snac import GET_CHECKPOINT

            raise ValueError(f"--codec snac needs --snac-checkpoint DIR: {GET_CHECKPOINT}")
        if args.ckpt or args.dummy_weights:
            _note("--codec snac reads --snac-checkpoint; --ckpt / --dummy-weights (the S3 tokenizer's) are unused")
    for option, value in (("--batch-size", args.batch_size), ("--max-files", args.max_files)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be an integer >= 1, got {value}")
    if args.segment_length is not None and not args.segment_length >= MIN_SEGMENT_S:
        raise ValueError(f"--segment-length must be at least {MIN_SEGMENT_S:g} s (one S3 token), "
                         f"got {args.segment_length:g}")
    _check_seed(args.seed)
    _check_threads(args.threads)
    device = _device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.codec == "s3" and args.dummy_weights:
        _note("--dummy-weights: the S3 tokenizer's weights are RANDOM, so the tokens are meaningless (the work and "
              "its speed are real); use --ckpt DIR for real tokens")
    result = encode(args.input_dir, args.out, ckpt=args.ckpt if args.codec == "s3" else None,
                    dummy_weights=args.dummy_weights and args.codec == "s3", seed=args.seed or 0, codec=args.codec,
                    segment_length=args.segment_length, batch_size=args.batch_size, max_files=args.max_files,
                    snac_checkpoint=args.snac_checkpoint, device=device, progress=not args.no_progress,
                    overwrite=args.overwrite)
    for rel, why in result.skipped.items():
        _note(f"skipped {rel}: {why}")
    print(result.summary())
    meta = result.metadata
    print(f"{args.out}: {meta['files_encoded']} file(s), {meta['segments']} segment(s), "
          f"{meta['total_duration_s']:.1f} s of audio ({meta['codec']}, checkpoint {meta['checkpoint_hash']})")
    return 0


def cmd_tokens_analyze(args) -> int:
    from .tokens.analyze import analyze, plot

    for out, what in ((args.json, "--json"), (args.plot, "--plot")):
        if out is not None and not Path(out).expanduser().parent.is_dir():
            raise ValueError(f"{what} {out}: {Path(out).expanduser().parent} is not a directory")
    result = analyze(Path(args.out_dir).expanduser())
    print(result.format_table())
    if args.json:
        path = Path(args.json).expanduser()
        result.to_json(path)
        print(f"wrote {path}")
    if args.plot:
        folder = Path(args.plot).expanduser()
        folder.mkdir(exist_ok=True)
        for path in plot(result, folder):
            print(f"wrote {path}")
    return 0


def cmd_tokens_bpe(args) -> int:
    from .tokens.merge import evaluate

    save = Path(args.save).expanduser()
    if not save.parent.is_dir():
        raise ValueError(f"--save {args.save}: {save.parent} is not a directory")
    rules, report = evaluate(Path(args.out_dir).expanduser(), args.method, merges=args.merges, min_freq=args.min_freq)
    print(report.format())
    print(f"wrote {rules.save(save)}")
    return 0


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
VARIANT_CHOICES = VARIANTS + ("multilingual-v2", "multilingual-v3")
MULTILINGUAL_BEHAVIOURS = ("0.1.7", "upstream")  # chatterbox_rt.models.t3.config (not imported here: --help stays light)


def _t3_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t3-file", metavar="FILE", default=None,
                   help="the T3 weights to load instead of the variant's official file: a .safetensors name inside "
                        "--ckpt (e.g. t3_mtl23ls_v3.safetensors or a Single Language Pack file), v2/v3, or a path; "
                        "the variant then follows the file unless --variant is given")
    p.add_argument("--lora", metavar="DIR", default=None,
                   help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) merged "
                        "into T3 at load; needs --ckpt")
    p.add_argument("--behaviour", "--behavior", dest="behaviour", default=None, choices=MULTILINGUAL_BEHAVIOURS,
                   help="multilingual only: 0.1.7 (PyPI's: alignment-guided EOS, repetition penalty 2.0; the "
                        "default for the V2 file) or upstream (upstream HEAD's: no alignment control, penalty 1.2, "
                        "the last token's audio dropped; the default for V3 and Single Language Pack files)")


def _audio_output_options(p: argparse.ArgumentParser) -> None:
    from .audio_out import FORMATS

    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file, overwritten atomically; its extension picks the format (.wav .flac .mp3 "
                        ".ogg/.oga .opus .pcm/.raw); '-' writes to standard output (WAV unless --format), with "
                        "every message on standard error")
    p.add_argument("--format", default=None, choices=tuple(FORMATS),
                   help="audio format instead of the extension's: wav (16-bit PCM), flac, mp3, ogg (Vorbis), opus "
                        "(Ogg/Opus) or pcm (raw 16-bit little-endian mono samples, no header)")


def _model_options(p: argparse.ArgumentParser, variant: bool = True, t3: bool = False, bundle: bool = False,
                   precision: bool = True) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="DIR", help="checkpoint directory (official file names)")
    src.add_argument("--dummy-weights", action="store_true",
                     help="seeded random weights at the real shapes (the audio is noise)")
    if bundle:
        src.add_argument("--bundle", metavar="DIR", default=None,
                         help="an exported bundle (`chatterbox-rt export`), run on onnxruntime (or TensorRT with "
                              "--backend tensorrt)")
        p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                       help="torch (default); onnxruntime: the model is exported once to the export cache "
                            "($CHATTERBOX_RT_EXPORTS, default ~/.cache/chatterbox-rt/onnx) and run there; tensorrt: "
                            "the same, T3 and the flow as TensorRT engines (cached; needs TensorRT and a GPU)")
    if variant:
        p.add_argument("--variant", default=None, choices=VARIANT_CHOICES,
                       help=f"model variant (default: detected from --ckpt; {DUMMY_VARIANT} with --dummy-weights)")
    if t3:
        _t3_options(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the default: cuda if present)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (T3, the flow and HiFT; see --precision)")
    if precision:  # (export has its own --precision: the graphs')
        p.add_argument("--precision", dest="load_precision", default=None, metavar="MODE",
                       help="auto, fp32, bf16, fp16, int8 (8-bit T3 weights) or fp8 (Ada/Hopper GPUs): each module's "
                            "precision (chatterbox_rt.PrecisionConfig; BENCHMARKS.md has the quality and speed of "
                            "each)")
    p.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    # Testing aid, deliberately undocumented: a dummy T3 with N layers, so CLI tests run fast.
    p.add_argument("--t3-layers", type=int, default=0, help=argparse.SUPPRESS)


def _vc_control_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion controls", "Each default gives the reference's output "
                             "(chatterbox_rt.vc; `chatterbox-rt vc-eval` measures their effect).")
    g.add_argument("--prune-tokens", type=int, default=0, metavar="N",
                   help="drop the first N source speech tokens (40 ms each), where the source speaker shows most "
                        "(default 0)")
    g.add_argument("--speaker-strength", type=float, default=1.0, metavar="S",
                   help="scale the target's normalised speaker embedding (default 1.0; above 1 pushes toward "
                        "the target)")
    g.add_argument("--flow-cfg-rate", type=float, default=None, metavar="W",
                   help="the decoder's classifier-free guidance rate (default 0.7; not for a meanflow S3Gen)")
    g.add_argument("--guidance-ramp", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="the guidance rate linear over the decoder's steps instead")
    g.add_argument("--speaker-ramp", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="the speaker strength linear over the decoder's steps instead")
    g.add_argument("--pitch-match", action="store_true",
                   help="shift the source's pitch toward the target's median F0 first (needs --target clips or "
                        "a library voice with a measured F0, and the vc extra)")
    g.add_argument("--pitch-tolerance", type=float, default=None, metavar="SEMITONES",
                   help="with --pitch-match: leave the source alone when this close (default 1)")
    g.add_argument("--max-pitch-shift", type=float, default=None, metavar="SEMITONES",
                   help="with --pitch-match: shift by at most this much (default 12)")
    g.add_argument("--post", choices=POST_CHOICES, default=None,
                   help="post-process the output before the watermark: 'clean' removes DC and rumble "
                        "(high-pass) and limits peaks to -1 dBFS")


def _library_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", metavar="DIR", default=None,
                   help="voice library directory (default: $CHATTERBOX_RT_VOICES or ~/.cache/chatterbox-rt/voices)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatterbox-rt", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"chatterbox-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate speech tokens with T3 and report tokens/s")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="DIR", help="checkpoint directory (official file names)")
    src.add_argument("--dummy-weights", action="store_true", help="seeded random weights (the default)")
    d.add_argument("--variant", default="all", choices=("all",) + VARIANT_CHOICES)
    d.add_argument("--text", default=DEMO_TEXT, help="text to speak (with --ckpt)")
    d.add_argument("--language", default=None, help="language id for the multilingual model (default en)")
    d.add_argument("--tokens", type=int, default=32, help="speech tokens to generate (at most, with --ckpt)")
    _t3_options(d)
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the default: cuda if present)")
    d.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    d.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    d.add_argument("--seed", type=int, default=0, help=SEED_HELP + " (default 0)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="text -> 24 kHz audio file (WAV, FLAC, MP3, Ogg, Opus, raw PCM)",
                       description="Synthesise TEXT ('-' reads standard input) into 24 kHz mono audio (16-bit WAV "
                                   "by default; the output's extension or --format picks another). Long text is "
                                   f"split into segments (sentences packed into at most {MAX_CHUNK_CHARS} characters, "
                                   "about 20 s of speech, cut further where one would exceed the model's text "
                                   "limit) that are decoded together, --batch at a time, and joined with "
                                   f"{SENTENCE_GAP_S:g} s of silence; a progress bar counts them.")
    s.add_argument("text", nargs="?", default=None, metavar="TEXT", help="text to speak, or '-' for standard input")
    s.add_argument("--text-file", metavar="PATH", default=None, help="read the text from a UTF-8 file")
    _audio_output_options(s)
    vs = s.add_mutually_exclusive_group()
    vs.add_argument("--voice", metavar="CLIP", help="reference clip to clone (default: the checkpoint's voice)")
    vs.add_argument("--voice-id", metavar="NAME", help="a voice from the library (see `voices add`)")
    _model_options(s, t3=True, bundle=True)
    _library_option(s)
    s.add_argument("--language", default=None, help="language id for the multilingual model (default en)")
    s.add_argument("--exaggeration", type=float, default=None,
                   help="emotion exaggeration, 0-10 (English and multilingual; default the voice's, 0.5; Turbo and "
                        "Nano ignore it)")
    s.add_argument("--max-new-tokens", "--tokens", dest="max_new_tokens", type=int, default=None, metavar="N",
                   help=f"speech tokens per chunk at most, from 1 to the variant's limit (English/multilingual "
                        f"4099, Turbo/Nano 7818; default: the variant's 1000; {DUMMY_MAX_NEW_TOKENS} with "
                        "--dummy-weights)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--cfg-weight", type=float)
    s.add_argument("--no-watermark", action="store_true", help="skip the PerthNet output watermark")
    s.add_argument("--post", choices=POST_CHOICES, default=None,
                   help="post-process the output before the watermark: 'clean' removes DC and rumble "
                        "(high-pass) and limits peaks to -1 dBFS")
    s.add_argument("--batch", type=int, default=None, metavar="N",
                   help="segments of a long text decoded at once (default 4: the default engine's)")
    s.set_defaults(func=cmd_synth)

    c = sub.add_parser("vc", help="voice conversion: SOURCE speech in the target voice -> audio file",
                       description="Convert SOURCE speech into the target voice (24 kHz mono audio; the output's "
                                   "extension or --format picks the format). Voice conversion has one model, the "
                                   "S3Gen decoder of --ckpt (s3gen.safetensors), so there is no --variant.")
    c.add_argument("source", metavar="SOURCE", help="speech to convert (audio file)")
    _audio_output_options(c)
    ts = c.add_mutually_exclusive_group()
    ts.add_argument("--target", metavar="CLIP", action="append",
                    help="clip of the target voice (default: the checkpoint's voice); repeat it for several clips "
                         "of one speaker (their speaker embeddings are averaged, the prompt is the longest's)")
    ts.add_argument("--target-id", metavar="NAME", help="a voice from the library")
    _model_options(c, variant=False)
    _library_option(c)
    c.add_argument("--no-watermark", action="store_true", help="skip the PerthNet output watermark")
    _vc_control_options(c)
    c.set_defaults(func=cmd_vc)

    e = sub.add_parser("vc-eval", help="sweep voice-conversion controls and measure how far the speaker moves",
                       description="Convert SOURCE into the target voice once per setting of the sweeps (their "
                                   "product; the default setting always runs first), then measure each output's "
                                   "speaker: the cosine of its embedding to the target's and to the source's by the "
                                   "voice encoder (ve.safetensors) and by CAMPPlus (S3Gen's). Prints a table (a "
                                   "positive shift under both encoders: the setting moves the output toward the "
                                   "target) with the VC time per setting. With --dummy-weights the cosines are "
                                   "meaningless.")
    e.add_argument("source", metavar="SOURCE", help="speech to convert (audio file)")
    e.add_argument("--target", metavar="CLIP", action="append", required=True,
                   help="clip of the target voice; repeat it for several clips of one speaker")
    e.add_argument("--sweep", metavar="NAME=V1,V2,...", action="append", default=[],
                   help="values of one control, e.g. prune_tokens=0,4,8 or speaker_strength=1.0,1.3; ramps as "
                        "START:END (guidance_ramp=1.0:0.5); pitch_match=false,true; post=none,clean. Repeat for "
                        "more controls")
    e.add_argument("--json", metavar="F", default=None, help="write every row as JSON to F")
    e.add_argument("--plot", metavar="F.png", default=None, help="plot the cosines and times to a PNG (matplotlib)")
    e.add_argument("--n-steps", type=int, default=None, metavar="N", help="CFM steps (default: the decoder's, 10)")
    e.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up conversion")
    _model_options(e, variant=False)
    e.set_defaults(func=cmd_vc_eval)

    v = sub.add_parser("voices", help="the voice library: add, list, remove")
    vsub = v.add_subparsers(dest="voices_command", required=True)
    a = vsub.add_parser("add", help="prepare a clip once and store it under NAME")
    a.add_argument("name", metavar="NAME", help="1-64 of A-Z a-z 0-9 . _ - (not starting with '.')")
    a.add_argument("clip", metavar="CLIP", nargs="+",
                   help="reference clip (audio file); several clips of one speaker average their speaker "
                        "embeddings (the prompt is the longest clip's)")
    _model_options(a, t3=True, bundle=True)
    _library_option(a)
    a.add_argument("--exaggeration", type=float, default=0.5, help="emotion exaggeration stored with the voice")
    a.add_argument("--overwrite", action="store_true", help="replace an existing voice of that name")
    a.set_defaults(func=cmd_voices_add)
    ls = vsub.add_parser("list", help="list the voices")
    _library_option(ls)
    ls.set_defaults(func=cmd_voices_list)
    rm = vsub.add_parser("remove", help="delete a voice")
    rm.add_argument("name", metavar="NAME")
    _library_option(rm)
    rm.set_defaults(func=cmd_voices_remove)

    tk = sub.add_parser("tokens", help="speech-token datasets: encode an audio corpus, analyze it, merge tokens")
    tsub = tk.add_subparsers(dest="tokens_command", required=True)
    te = tsub.add_parser("encode", help="audio files -> S3 speech tokens (or SNAC codes) in Parquet",
                         description="Encode every audio file under INPUT_DIR (wav, flac, mp3, ogg; any rate; "
                                     "channels averaged) with the S3 tokenizer of a Chatterbox checkpoint (--ckpt: its "
                                     "S3Gen file) or with SNAC (--codec snac), into OUT_DIR/tokens_batch_XXXX.parquet "
                                     "(one row per segment) and metadata.json. A re-run into the same OUT_DIR skips "
                                     "the files already there; unreadable or empty files are reported and skipped.")
    te.add_argument("input_dir", metavar="INPUT_DIR", help="folder of audio files (searched recursively)")
    te.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (created; resumed if it exists)")
    src = te.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="DIR", help="Chatterbox checkpoint directory (its S3Gen file holds the "
                                                   "S3 tokenizer)")
    src.add_argument("--dummy-weights", action="store_true",
                     help="seeded random tokenizer weights (VC --dummy-weights' tokenizer; the tokens are meaningless)")
    te.add_argument("--codec", default="s3", choices=("s3", "snac"),
                    help="s3: S3 speech tokens, 25 Hz (default); snac: SNAC's multi-scale codes (the snac extra)")
    te.add_argument("--segment-length", type=float, default=None, metavar="SECONDS",
                    help="cut files into segments this long (default: whole files)")
    te.add_argument("--batch-size", type=int, default=16, metavar="N", help="utterances per model call (default 16)")
    te.add_argument("--max-files", type=int, default=None, metavar="N", help="only the first N files (sorted by path)")
    te.add_argument("--snac-checkpoint", metavar="PATH", default=None,
                    help="with --codec snac: a local SNAC directory (config.json + pytorch_model.bin); nothing is "
                         "downloaded")
    te.add_argument("--overwrite", action="store_true",
                    help="replace what OUT_DIR holds instead of resuming it (needed for other settings)")
    te.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the default: cuda if present)")
    te.add_argument("--seed", type=int, default=None, help="--dummy-weights' seed (default 0)")
    te.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    te.add_argument("--no-progress", action="store_true", help="no progress bar")
    te.set_defaults(func=cmd_tokens_encode)
    ta = tsub.add_parser("analyze", help="token statistics of an encoded OUT_DIR: is merging worth it?")
    ta.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by `chatterbox-rt tokens encode`")
    ta.add_argument("--json", metavar="F", default=None, help="write the statistics as JSON to F")
    ta.add_argument("--plot", metavar="DIR", default=None,
                    help="write rank-frequency and run-length plots (PNG, matplotlib) into DIR")
    ta.set_defaults(func=cmd_tokens_analyze)
    tb = tsub.add_parser("bpe", help="learn weight-free token merges on an encoded OUT_DIR and report the gain")
    tb.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by `chatterbox-rt tokens encode`")
    tb.add_argument("--method", required=True, choices=MERGE_METHODS,
                    help="rl: run-length; bpe: byte-pair merges; rl-bpe: both; cross-scale: SNAC frames across scales")
    tb.add_argument("--merges", type=int, default=1000, metavar="N", help="merges to learn at most (default 1000)")
    tb.add_argument("--min-freq", type=int, default=2, metavar="N",
                    help="a pair merges only if it occurs at least N times (default 2)")
    tb.add_argument("--save", required=True, metavar="RULES.json", help="write the learned rules to this file")
    tb.set_defaults(func=cmd_tokens_bpe)

    sv = sub.add_parser("serve", help="an OpenAI-compatible speech server (POST /v1/audio/speech)",
                        description="Serve the model over HTTP: OpenAI's /v1/audio/speech (streamed or whole; mp3, "
                                    "opus, aac, flac, wav, pcm; SSE), /v1/models, /v1/audio/voices, /health, "
                                    "/ready and /metrics (Prometheus). Binds to 127.0.0.1 unless --host says "
                                    "otherwise; SIGTERM drains the requests in flight, then exits.")
    _model_options(sv, t3=True, bundle=True)
    _library_option(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=16, help="requests the engine runs at once (default 16)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting beyond --max-batch before 429 Too Many Requests (default 64)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also --api-key-file)")
    sv.add_argument("--api-key-file", default=None, metavar="F", help="read the API key from a file")
    sv.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    sv.add_argument("--drain-timeout", type=float, default=0.0,
                    help="seconds to wait for requests in flight on SIGTERM (default 0: as long as they take)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    rs = sv.add_argument_group("Ray Serve (--ray)", "Serve through Ray Serve instead: N replicas, each loading "
                               "the model itself (on the Ray cluster RAY_ADDRESS names, else a new local Ray "
                               "instance), behind Ray's HTTP proxy on --host/--port; the replicas share only "
                               "--library. Needs the ray extra.")
    rs.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment")
    rs.add_argument("--replicas", type=int, default=1, metavar="N",
                    help="replicas (default 1; the initial count with --max-replicas)")
    rs.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                    help="GPUs each replica reserves (fractions share a GPU); above 0 the replicas run on cuda, "
                         "else on cpu (default 0)")
    rs.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                    help="CPUs each replica reserves, which is also its torch thread count unless --threads "
                         "(default: Ray's 1)")
    rs.add_argument("--min-replicas", type=int, default=None, metavar="N",
                    help="autoscaling: the fewest replicas (default 1; 0 scales to zero when idle)")
    rs.add_argument("--max-replicas", type=int, default=None, metavar="N",
                    help="autoscale between --min-replicas and this many replicas")
    rs.add_argument("--target-ongoing-requests", type=float, default=None, metavar="R",
                    help="autoscaling: requests in flight per replica to aim for (default --max-batch)")
    sv.set_defaults(func=cmd_serve)

    from .profiling.bench import add_arguments

    b = sub.add_parser("bench", help="per-stage speed, optionally against the reference (--compare-upstream)",
                       description="Times voice preparation, T3 prefill and decode, CFM, HiFT and the watermark "
                                   "for a fixed number of speech tokens, with medians, p90, RTF, peak memory and "
                                   "the environment; --compare-upstream runs chatterbox-tts 0.1.7 with identical "
                                   "weights and inputs in the same process and reports reference/ours ratios.")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)

    from .export.cli import add_parsers as add_export_parsers

    add_export_parsers(sub, _model_options)
    return p


def cmd_bench(args) -> int:
    from .profiling import bench

    return bench.main(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .export._onnx import ExportError
    from .export.manifest import BundleError
    from .export.tensorrt import EngineError
    from .kernels.dispatch import KernelUnavailable
    from .voice import VoiceError
    from .watermark import WatermarkUnavailable

    try:
        return args.func(args)
    except (AudioError, VoiceError, CheckpointError, WatermarkUnavailable, KernelUnavailable, ValueError, TypeError,
            ImportError, OSError, BundleError, ExportError, EngineError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"chatterbox-rt: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatterbox-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
