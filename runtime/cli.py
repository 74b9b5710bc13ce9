"""The ``chatterbox-rt`` command.

* ``demo``: T3 (text -> speech tokens) for one or every variant, reporting its decode speed.
* ``synth TEXT -o out.wav``: text to a 16-bit 24 kHz WAV. Long text is split into sentences
  (:func:`split_text`), each is synthesised, and they are joined with a short silence.
* ``vc SOURCE -o out.wav --target clip.wav``: voice conversion.
* ``voices add|list|remove``: the persistent voice library (``chatterbox_rt.voices``).
* ``bench``: per-stage speed, optionally against the reference (``chatterbox_rt.profiling.bench``).

Models come from ``--ckpt DIR`` (the official file names) or ``--dummy-weights`` (seeded random
weights at the real shapes: the speed is real, the audio is noise). A user error prints one line
``chatterbox-rt: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from . import VARIANTS, __version__

DEMO_TEXT = "Chatterbox-rt turns text into speech tokens, fast and exactly like the reference."
# Placeholder text length with dummy weights (there are no tokenizer files to read).
DUMMY_TEXT_TOKENS = 48


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown --dtype {name!r}; choose from fp32, bf16, fp16")
    return table[name]


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return name


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

        model = T3.from_local(args.ckpt, variant=variant, device=device, dtype=dtype)
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

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        from .checkpoint import detect_variant

        variants = [args.variant if args.variant != "all" else detect_variant(args.ckpt)]
    else:
        variants = list(VARIANTS) if args.variant == "all" else [args.variant]
        print("chatterbox-rt demo: no checkpoint given (--ckpt DIR), so seeded random weights at real shapes are "
              "used; the tokens are meaningless, the speed is real.")
    for v in variants:
        _demo_one(v, args)
    return 0


# ----------------------------------------------------------------------------------------------
# synth / vc / voices
# ----------------------------------------------------------------------------------------------
MAX_CHUNK_CHARS = 300  # text per T3 call; the reference models are trained on sentence-length text
SENTENCE_GAP_S = 0.2  # silence between synthesised chunks
DUMMY_VARIANT = "chatterbox"
# Random weights rarely emit the end-of-speech token, so dummy runs stop here unless told otherwise.
DUMMY_MAX_NEW_TOKENS = 50
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by white space;
# "3.14" and "e.g.," therefore do not split, "Dr. Smith" does.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?][\"'”’)\]])\s+|(?<=[.!?])\s+")
_SOFT_BREAK = re.compile(r"[,;:]\s")


def _note(msg: str) -> None:
    print(f"chatterbox-rt: {msg}", file=sys.stderr)


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than ``max_chars`` -> pieces at the last ', ; :' in reach, else the last
    space, else a hard cut."""
    out = []
    while len(sentence) > max_chars:
        head = sentence[: max_chars + 1]
        soft = [m.end() for m in _SOFT_BREAK.finditer(head)]
        cut = soft[-1] if soft else head.rfind(" ") + 1
        if cut <= 0:
            cut = max_chars
        out.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    if sentence:
        out.append(sentence)
    return out


def split_text(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Text -> chunks of at most ``max_chars`` characters, one T3 call each.

    The splitter is deliberately simple: the text breaks at newlines and after ``.``, ``!`` or ``?``
    (optionally followed by a closing quote or bracket) followed by white space; a sentence longer
    than ``max_chars`` breaks at its last comma/semicolon/colon or space in reach. Adjacent pieces are
    then packed greedily, joined by a space, while the chunk stays within ``max_chars`` (so text
    hard-wrapped at newlines comes back together). White space inside a piece is collapsed.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces = []
    for line in text.splitlines():
        for sentence in _SENTENCE_BREAK.split(line):
            sentence = " ".join(sentence.split())
            if sentence:
                pieces.extend(_cut_long(sentence, max_chars))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] = f"{chunks[-1]} {piece}"
        else:
            chunks.append(piece)
    return chunks


def _progress(items: list, desc: str):
    """Iterate with a tqdm bar when tqdm is installed (not a dependency), else a stderr counter."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=desc, unit="chunk", file=sys.stderr, disable=True if len(items) < 2 else None)
        return
    for i, item in enumerate(items):
        if len(items) > 1:
            print(f"\r{desc}: {i + 1}/{len(items)}", end="" if i + 1 < len(items) else "\n", file=sys.stderr,
                  flush=True)
        yield item


def _need_file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    return p


def _output_path(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"-o {p} is a directory; give a file name such as {p / 'out.wav'}")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"cannot write {p}: directory {p.parent} does not exist")
    return p


def _write_wav(path: Path, wav, sr: int) -> float:
    """Float waveform -> 16-bit PCM WAV (clipped to [-1, 1] first: libsndfile would wrap around)."""
    import soundfile as sf

    data = wav.detach().reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy()
    sf.write(str(path), data, sr, subtype="PCM_16", format="WAV")
    return data.shape[0] / sr


def _check_watermark(args) -> None:
    """Fail before loading any model when the watermark weights are missing."""
    if not args.no_watermark:
        from .watermark import get_watermarker

        get_watermarker("cpu")


def _library(args):
    from .voices import VoiceLibrary

    return VoiceLibrary(args.library)


def _model_source(args) -> None:
    if not args.ckpt and not args.dummy_weights:
        raise ValueError("no model: give --ckpt DIR (a checkpoint directory with the official files) or "
                         "--dummy-weights (seeded random weights; the audio is noise)")
    if args.t3_layers and not args.dummy_weights:
        raise ValueError("--t3-layers (a testing aid) only applies with --dummy-weights")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.dummy_weights:
        _note("--dummy-weights: the model weights are RANDOM, so the audio is noise (the work and its speed are "
              "real); use --ckpt DIR for speech")


def _load_tts(args):
    from .tts import TTS

    device, dtype = _device(args.device), _dtype(args.dtype)
    if args.ckpt:
        return TTS.from_local(args.ckpt, variant=args.variant, device=device, dtype=dtype)
    variant = args.variant or DUMMY_VARIANT
    overrides = {}
    if args.t3_layers:
        # Testing aid: a T3 with fewer layers (S3Gen stays full size).
        from .models.t3.config import smaller_backbone

        overrides = smaller_backbone(variant, num_layers=args.t3_layers)
    return TTS.from_dummy(variant, seed=args.seed or 0, device=device, dtype=dtype, **overrides)


def _read_text(args) -> str:
    if args.text_file is not None:
        if args.text is not None:
            raise ValueError("give the text either as TEXT or with --text-file, not both")
        try:
            text = _need_file(args.text_file, "text file").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.text_file} is not UTF-8 text ({e})") from e
    elif args.text == "-":
        text = sys.stdin.read()
    elif args.text is not None:
        text = args.text
    else:
        raise ValueError("no text: give TEXT, '-' to read standard input, or --text-file PATH")
    if not text.strip():
        raise ValueError("the text is empty: there is nothing to say")
    return text


def cmd_synth(args) -> int:
    import torch

    from .tts import SAMPLING_ARGS  # the argparse dests of the sampling options have the same names

    chunks = split_text(_read_text(args))
    out = _output_path(args.output)
    if args.voice:
        _need_file(args.voice, "voice clip")
    library = None
    if args.voice_id:
        library = _library(args)
        library.info(args.voice_id)  # exists? (before the model loads)
    _model_source(args)
    _check_watermark(args)
    max_new = args.max_new_tokens
    if args.dummy_weights and max_new is None:
        max_new = DUMMY_MAX_NEW_TOKENS
        _note(f"--dummy-weights: random weights rarely emit end-of-speech, so each chunk stops after "
              f"{max_new} speech tokens (~{max_new / 25:.0f} s); --tokens N changes that")

    tts = _load_tts(args)
    if args.voice:
        voice = tts.prepare_conditionals(args.voice, exaggeration=0.5 if args.exaggeration is None
                                         else args.exaggeration)
    elif library is not None:
        voice = library.get(args.voice_id, device=tts.device, variant=tts.variant)
    else:
        voice = None  # the checkpoint's built-in voice (conds.pt)
    language = args.language or ("en" if tts.variant == "multilingual" else None)
    sampling = {k: getattr(args, k) for k in SAMPLING_ARGS if getattr(args, k) is not None}
    if max_new is not None:
        sampling["max_new_tokens"] = max_new

    gap = torch.zeros(int(SENTENCE_GAP_S * tts.sr))
    pieces = []
    t0 = time.perf_counter()
    for i, chunk in enumerate(_progress(chunks, "synthesising")):
        wav = tts.generate(chunk, voice, seed=args.seed, language_id=language, watermark=False,
                           exaggeration=args.exaggeration, **sampling)
        if i:
            pieces.append(gap)
        pieces.append(wav.reshape(-1))
    wav = torch.cat(pieces)
    if not args.no_watermark:
        from .watermark import watermark_output

        wav = watermark_output(wav, tts.sr)  # once over the joined audio
    dt = time.perf_counter() - t0
    seconds = _write_wav(out, wav, tts.sr)
    rtf = f", RTF {dt / seconds:.2f}" if seconds else ""
    print(f"wrote {out}: {seconds:.2f} s of audio at {tts.sr} Hz from {len(chunks)} chunk(s) in {dt:.1f} s{rtf} "
          f"({tts.variant}, {tts.source}{'' if args.no_watermark else ', watermarked'})")
    return 0


def cmd_vc(args) -> int:
    from .vc import VC

    source = _need_file(args.source, "source audio")
    out = _output_path(args.output)
    if args.target:
        _need_file(args.target, "target clip")
    target = None
    if args.target_id:
        target = _library(args).get(args.target_id)  # any variant's voice: VC reads only its S3Gen part
    _model_source(args)
    _check_watermark(args)
    device, dtype = _device(args.device), _dtype(args.dtype)
    if args.ckpt:
        vc = VC.from_local(args.ckpt, device=device, dtype=dtype)
    else:
        vc = VC.from_dummy(seed=args.seed or 0, device=device, dtype=dtype)
    if args.target:
        target = str(args.target)
    t0 = time.perf_counter()
    wav = vc.generate(str(source), target_voice=target, seed=args.seed, watermark=not args.no_watermark)
    dt = time.perf_counter() - t0
    seconds = _write_wav(out, wav, vc.sr)
    print(f"wrote {out}: {seconds:.2f} s of audio at {vc.sr} Hz in {dt:.1f} s ({vc.source})")
    return 0


def cmd_voices_add(args) -> int:
    from .voices import check_name

    check_name(args.name)
    library = _library(args)
    if args.name in library and not args.overwrite:
        raise ValueError(f"a voice named {args.name!r} already exists in {library.root}; add --overwrite to "
                         f"replace it")
    clip = _need_file(args.clip, "voice clip")
    _model_source(args)
    tts = _load_tts(args)
    library.add(args.name, clip, tts, exaggeration=args.exaggeration, overwrite=args.overwrite)
    info = library.info(args.name)
    print(f"added voice {info.name!r} to {library.root} ({info.variant}, {info.duration_s:.1f} s clip, "
          f"exaggeration {info.exaggeration:g})")
    return 0


def cmd_voices_list(args) -> int:
    library = _library(args)
    infos = library.list()
    if not infos:
        print(f"no voices in {library.root} (add one with `chatterbox-rt voices add NAME clip.wav ...`)")
        return 0
    rows = [("NAME", "VARIANT", "DURATION", "CREATED")]
    rows += [(i.name, i.variant, f"{i.duration_s:.1f} s", i.created) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print(f"{len(infos)} voice(s) in {library.root}")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_voices_remove(args) -> int:
    library = _library(args)
    library.remove(args.name)
    print(f"removed voice {args.name!r} from {library.root}")
    return 0


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
VARIANT_CHOICES = VARIANTS + ("multilingual-v2", "multilingual-v3")


def _model_options(p: argparse.ArgumentParser, variant: bool = True) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="DIR", help="checkpoint directory (official file names)")
    src.add_argument("--dummy-weights", action="store_true",
                     help="seeded random weights at the real shapes (the audio is noise)")
    if variant:
        p.add_argument("--variant", default=None, choices=VARIANT_CHOICES,
                       help=f"model variant (default: detected from --ckpt; {DUMMY_VARIANT} with --dummy-weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    # Testing aid, deliberately undocumented: a dummy T3 with N layers, so CLI tests run fast.
    p.add_argument("--t3-layers", type=int, default=0, help=argparse.SUPPRESS)


def _library_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", metavar="DIR", default=None,
                   help="voice library directory (default: $CHATTERBOX_RT_VOICES or ~/.cache/chatterbox-rt/voices)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatterbox-rt", description=__doc__,
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
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    d.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    d.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="text -> 24 kHz WAV",
                       description="Synthesise TEXT ('-' reads standard input) into a 16-bit 24 kHz WAV. Long text "
                                   f"is split into sentences (chunks of at most {MAX_CHUNK_CHARS} characters), joined "
                                   f"with {SENTENCE_GAP_S:g} s of silence.")
    s.add_argument("text", nargs="?", default=None, metavar="TEXT", help="text to speak, or '-' for standard input")
    s.add_argument("--text-file", metavar="PATH", default=None, help="read the text from a UTF-8 file")
    s.add_argument("-o", "--output", required=True, metavar="OUT.wav", help="output WAV file (overwritten)")
    vs = s.add_mutually_exclusive_group()
    vs.add_argument("--voice", metavar="CLIP", help="reference clip to clone (default: the checkpoint's voice)")
    vs.add_argument("--voice-id", metavar="NAME", help="a voice from the library (see `voices add`)")
    _model_options(s)
    _library_option(s)
    s.add_argument("--language", default=None, help="language id for the multilingual model (default en)")
    s.add_argument("--exaggeration", type=float, default=None, help="emotion exaggeration (Llama variants; 0.5)")
    s.add_argument("--max-new-tokens", "--tokens", dest="max_new_tokens", type=int, default=None, metavar="N",
                   help=f"speech tokens per chunk at most (default: the variant's; {DUMMY_MAX_NEW_TOKENS} with "
                        "--dummy-weights)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--cfg-weight", type=float)
    s.add_argument("--no-watermark", action="store_true", help="skip the PerthNet output watermark")
    s.set_defaults(func=cmd_synth)

    c = sub.add_parser("vc", help="voice conversion: SOURCE speech in the target voice -> WAV")
    c.add_argument("source", metavar="SOURCE", help="speech to convert (audio file)")
    c.add_argument("-o", "--output", required=True, metavar="OUT.wav", help="output WAV file (overwritten)")
    ts = c.add_mutually_exclusive_group()
    ts.add_argument("--target", metavar="CLIP", help="clip of the target voice (default: the checkpoint's voice)")
    ts.add_argument("--target-id", metavar="NAME", help="a voice from the library")
    _model_options(c, variant=False)
    _library_option(c)
    c.add_argument("--no-watermark", action="store_true", help="skip the PerthNet output watermark")
    c.set_defaults(func=cmd_vc)

    v = sub.add_parser("voices", help="the voice library: add, list, remove")
    vsub = v.add_subparsers(dest="voices_command", required=True)
    a = vsub.add_parser("add", help="prepare a clip once and store it under NAME")
    a.add_argument("name", metavar="NAME", help="1-64 of A-Z a-z 0-9 . _ - (not starting with '.')")
    a.add_argument("clip", metavar="CLIP", help="reference clip (audio file)")
    _model_options(a)
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

    from .profiling.bench import add_arguments

    b = sub.add_parser("bench", help="per-stage speed, optionally against the reference (--compare-upstream)",
                       description="Times voice preparation, T3 prefill and decode, CFM, HiFT and the watermark "
                                   "for a fixed number of speech tokens, with medians, p90, RTF, peak memory and "
                                   "the environment; --compare-upstream runs chatterbox-tts 0.1.7 with identical "
                                   "weights and inputs in the same process and reports reference/ours ratios.")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    from .profiling import bench

    return bench.main(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .voice import VoiceError
    from .watermark import WatermarkUnavailable

    try:
        return args.func(args)
    except (AudioError, VoiceError, CheckpointError, WatermarkUnavailable, ValueError, TypeError, ImportError,
            OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"chatterbox-rt: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatterbox-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
