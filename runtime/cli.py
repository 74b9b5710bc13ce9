"""The ``chatterbox-rt`` command.

``chatterbox-rt demo`` runs T3 (text -> speech tokens) for one or every variant and reports
its decode speed; with ``--ckpt DIR`` it uses a real checkpoint (text front end, the built-in
voice of ``conds.pt``), with ``--dummy-weights`` seeded random weights at real shapes.
"""
from __future__ import annotations

import argparse
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
        raise SystemExit(f"unknown --dtype {name!r}; choose from fp32, bf16, fp16")
    return table[name]


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatterbox-rt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"chatterbox-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate speech tokens with T3 and report tokens/s")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="DIR", help="checkpoint directory (official file names)")
    src.add_argument("--dummy-weights", action="store_true", help="seeded random weights (the default)")
    d.add_argument("--variant", default="all", choices=("all",) + VARIANTS + ("multilingual-v2", "multilingual-v3"))
    d.add_argument("--text", default=DEMO_TEXT, help="text to speak (with --ckpt)")
    d.add_argument("--language", default=None, help="language id for the multilingual model (default en)")
    d.add_argument("--tokens", type=int, default=32, help="speech tokens to generate (at most, with --ckpt)")
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    d.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    d.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, ImportError, FileNotFoundError) as e:
        print(f"chatterbox-rt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
