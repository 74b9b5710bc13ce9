"""Checkpoint discovery and loading by the official Chatterbox file names.

Files load unchanged: ``.safetensors`` with safetensors, ``.pt`` only with
``torch.load(weights_only=True)``. A state dict may come wrapped as ``{"model": [sd]}`` (the
reference's loaders unwrap that too). Every failure names the file and the keys concerned.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .models.t3.config import BEHAVIOUR_PYPI, BEHAVIOUR_UPSTREAM, MULTILINGUAL_BEHAVIOURS, canonical_variant, variant_key

log = logging.getLogger(__name__)

# Official T3 file names per variant, in order of preference. The reference's multilingual
# loader defaults to v2; v3 (same architecture) is used when it is the only one present or
# when asked for as "multilingual-v3".
T3_FILES = {
    "chatterbox": ("t3_cfg.safetensors",),
    "english": ("t3_cfg.safetensors",),
    "multilingual": ("t3_mtl23ls_v2.safetensors", "t3_mtl23ls_v3.safetensors"),
    "multilingual-v2": ("t3_mtl23ls_v2.safetensors",),
    "multilingual-v3": ("t3_mtl23ls_v3.safetensors",),
    "turbo": ("t3_turbo_v1.safetensors",),
    "nano": ("t3_nano_v1.safetensors",),
}


# The other official files per variant (the reference's loaders use exactly these names).
S3GEN_FILES = {
    "chatterbox": ("s3gen.safetensors",),
    "multilingual": ("s3gen.pt", "s3gen.safetensors"),
    "turbo": ("s3gen_meanflow.safetensors",),
    "nano": ("s3gen_meanflow.safetensors",),
}
VE_FILES = {
    "chatterbox": ("ve.safetensors",),
    "multilingual": ("ve.pt", "ve.safetensors"),
    "turbo": ("ve.safetensors",),
    "nano": ("ve.safetensors",),
}
BUILTIN_VOICE_FILE = "conds.pt"
# Text front-end files per variant: each entry is one requirement, met by any of its alternatives
# (a tuple of files that must all be present). Multilingual's Cangjie5_TC.json is only read for
# Chinese text, so it is not required here.
TOKENIZER_FILES = {
    "chatterbox": ((("tokenizer.json",),),),
    "multilingual": ((("grapheme_mtl_merged_expanded_v1.json",),),),
    "turbo": ((("tokenizer.json",), ("vocab.json", "merges.txt")),),
    "nano": ((("tokenizer.json",), ("vocab.json", "merges.txt")),),
}
# Upstream's ``t3_model=`` names for the multilingual T3 files (mtl_tts.MULTILINGUAL_T3_MODELS at
# 5de7a54); any other ``*.safetensors`` name is a file in the checkpoint directory.
MULTILINGUAL_T3_MODELS = {
    "v2": "t3_mtl23ls_v2.safetensors",
    "t3_mtl23ls_v2": "t3_mtl23ls_v2.safetensors",
    "v3": "t3_mtl23ls_v3.safetensors",
    "t3_mtl23ls_v3": "t3_mtl23ls_v3.safetensors",
}
T3_SUFFIXES = (".safetensors", ".pt")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def detect_variant(ckpt_dir: Union[str, Path]) -> str:
    """Which variant a checkpoint directory holds, from its T3 file name."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    found = [v for v in ("chatterbox", "multilingual", "turbo", "nano")
             if any((ckpt_dir / f).is_file() for f in T3_FILES[v])]
    if not found:
        names = sorted({f for files in T3_FILES.values() for f in files})
        raise CheckpointError(f"no T3 checkpoint in {ckpt_dir}: expected one of {', '.join(names)}")
    if len(found) > 1:
        raise CheckpointError(f"{ckpt_dir} holds T3 files of several variants ({', '.join(found)}); "
                              "pass variant=... to choose")
    return found[0]


def t3_file(ckpt_dir: Union[str, Path], variant: str) -> Path:
    ckpt_dir = Path(ckpt_dir)
    key = variant_key(variant)
    if key not in T3_FILES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(T3_FILES)}")
    for name in T3_FILES[key]:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise CheckpointError(f"missing checkpoint file for variant {variant!r}: "
                          f"{' or '.join(str(ckpt_dir / n) for n in T3_FILES[key])}")


_official_t3_file = t3_file  # resolve_t3's argument of that name shadows it there


def find_file(ckpt_dir: Union[str, Path], variant: str, table: Mapping[str, tuple], what: str) -> Path:
    """The first official file of ``table[variant]`` present in ``ckpt_dir``; a clear error otherwise."""
    ckpt_dir = Path(ckpt_dir)
    names = table[canonical_variant(variant)]
    for name in names:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise CheckpointError(f"missing {what} file for variant {variant!r}: "
                          f"{' or '.join(str(ckpt_dir / n) for n in names)}")


def t3_file_path(ckpt_dir: Union[str, Path], t3_file: Union[str, Path]) -> Path:
    """Where a user's ``t3_file`` points: upstream's names ("v2", "v3", ...), a file name inside
    ``ckpt_dir``, or a path of its own. Not checked for existence here."""
    name = str(t3_file)
    if name in MULTILINGUAL_T3_MODELS:
        return Path(ckpt_dir) / MULTILINGUAL_T3_MODELS[name]
    p = Path(name).expanduser()
    if p.suffix.lower() not in T3_SUFFIXES:
        raise CheckpointError(f"unknown T3 model {name!r}: expected one of {sorted(MULTILINGUAL_T3_MODELS)} or a "
                              f"{' / '.join(T3_SUFFIXES)} file name")
    if p.is_absolute() or len(p.parts) > 1:
        return p
    return Path(ckpt_dir) / p


def variant_of_state_dict(shapes: Mapping) -> Optional[str]:
    """Which T3 architecture a state dict holds, from its shapes (None when it fits none).
    ``shapes``: key -> tensor or shape."""
    text = shapes.get("text_emb.weight")
    text = tuple(text.shape) if torch.is_tensor(text) else tuple(text) if text is not None else ()
    if len(text) != 2:
        return None
    if any(k.startswith("tfmr.h.") for k in shapes):
        return {1024: "turbo", 768: "nano"}.get(text[1])
    if any(k.startswith("tfmr.layers.") for k in shapes):
        from .models.t3.config import ENGLISH_TEXT_VOCAB, MULTILINGUAL_TEXT_VOCAB

        return {ENGLISH_TEXT_VOCAB: "chatterbox", MULTILINGUAL_TEXT_VOCAB: "multilingual"}.get(text[0])
    return None


def tensor_shapes(path: Union[str, Path]) -> dict:
    """key -> shape of a checkpoint file; a ``.safetensors`` header is read without the tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - corrupt header: read_state_dict gives the message
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def default_behaviour(variant: str, path: Path, behaviour: Optional[str] = None,
                      named_file: bool = False) -> Optional[str]:
    """The multilingual behaviour a T3 file runs (None for the other variants).

    An explicit ``behaviour`` wins. Otherwise "multilingual-v2"/"-v3" as the variant name choose
    theirs (unless a file was named), and by file: the V2 file runs 0.1.7's behaviour (what PyPI
    runs), any other multilingual file (V3, the Single Language Pack) upstream's, as upstream runs
    every multilingual file at 5de7a54."""
    from .models.t3.config import DEFAULT_BEHAVIOUR

    if canonical_variant(variant) != "multilingual":
        if behaviour is not None:
            raise CheckpointError(f"behaviour={behaviour!r} only applies to the multilingual model, "
                                  f"not {canonical_variant(variant)}")
        return None
    if behaviour is not None:
        if behaviour not in MULTILINGUAL_BEHAVIOURS:
            raise CheckpointError(f"unknown multilingual behaviour {behaviour!r}; expected one of "
                                  f"{', '.join(MULTILINGUAL_BEHAVIOURS)}")
        return behaviour
    key = variant_key(variant)
    if not named_file and key in DEFAULT_BEHAVIOUR and key != "multilingual":
        return DEFAULT_BEHAVIOUR[key]
    return BEHAVIOUR_PYPI if path.name == MULTILINGUAL_T3_MODELS["v2"] else BEHAVIOUR_UPSTREAM


def resolve_t3(ckpt_dir: Union[str, Path], variant: Optional[str] = None, t3_file=None,
               behaviour: Optional[str] = None) -> tuple[Path, str, Optional[str]]:
    """-> (T3 file, variant name, multilingual behaviour) for a checkpoint directory.

    ``t3_file`` names the T3 file (see :func:`t3_file_path`); without it the official name for
    ``variant`` is used, the variant detected from the file names when not given. With a named
    file and no variant, the variant comes from the file's tensor shapes, multilingual when they
    fit none (upstream's ``t3_model=`` is a multilingual option): loading then names the keys and
    shapes that do not fit."""
    ckpt_dir = Path(ckpt_dir)
    if t3_file is None:
        variant = variant or detect_variant(ckpt_dir)
        path = _official_t3_file(ckpt_dir, variant)
        return path, variant, default_behaviour(variant, path, behaviour)
    path = t3_file_path(ckpt_dir, t3_file)
    if not path.is_file():
        raise CheckpointError(f"T3 file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    if variant is None:
        variant = variant_of_state_dict(tensor_shapes(path)) or "multilingual"
    return path, variant, default_behaviour(variant, path, behaviour, named_file=True)


def missing_files(ckpt_dir: Union[str, Path], variant: str, t3_path: Optional[Path] = None) -> list[str]:
    """Every file a variant needs that ``ckpt_dir`` lacks (T3, S3Gen, voice encoder, tokenizer),
    each as "what: name or name" (empty when all are there). ``t3_path``: a T3 file chosen by the
    user instead of the official name."""
    ckpt_dir = Path(ckpt_dir)
    key = variant_key(variant)
    if key not in T3_FILES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(T3_FILES)}")
    canon = canonical_variant(variant)
    problems = []
    if t3_path is None:
        if not any((ckpt_dir / n).is_file() for n in T3_FILES[key]):
            problems.append(f"T3: {' or '.join(T3_FILES[key])}")
    elif not Path(t3_path).is_file():
        problems.append(f"T3: {t3_path}")
    for table, what in ((S3GEN_FILES, "S3Gen"), (VE_FILES, "voice encoder")):
        if not any((ckpt_dir / n).is_file() for n in table[canon]):
            problems.append(f"{what}: {' or '.join(table[canon])}")
    for alternatives in TOKENIZER_FILES[canon]:
        if not any(all((ckpt_dir / n).is_file() for n in alt) for alt in alternatives):
            problems.append("tokenizer: " + " or ".join(" + ".join(alt) for alt in alternatives))
    return problems


def check_files(ckpt_dir: Union[str, Path], variant: str, t3_path: Optional[Path] = None) -> None:
    """Raise one CheckpointError naming every missing file (before anything slow is loaded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    problems = missing_files(ckpt_dir, variant, t3_path)
    if problems:
        raise CheckpointError(f"{ckpt_dir} lacks files the {variant} model needs: " + "; ".join(problems))


def load_tensors(path: Path, what: str = "checkpoint"):
    """A ``.safetensors`` file, or a ``.pt``/``.bin`` file with ``torch.load(weights_only=True)``,
    on the CPU; a CheckpointError naming ``what`` and the file when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, wrong format, pickled code
        raise CheckpointError(f"cannot read {what} {path}: {e}") from e


def read_state_dict(path: Union[str, Path]) -> dict:
    """Tensors of a checkpoint file, unwrapped from ``{"model": [sd]}`` if so stored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    return unwrap_state_dict(load_tensors(path), source=str(path))


def unwrap_state_dict(sd, source: str = "state dict") -> dict:
    if isinstance(sd, Mapping) and "model" in sd and not torch.is_tensor(sd["model"]):
        inner = sd["model"]
        sd = inner[0] if isinstance(inner, (list, tuple)) else inner
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{source} is not a state dict of tensors")
    return dict(sd)


def check_state_dict(model: nn.Module, sd: Mapping, source: str) -> None:
    """Strict key and shape check with a message that lists what is wrong."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [(k, expected[k], tuple(sd[k].shape)) for k in sorted(set(expected) & set(sd))
                  if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for k, want, got in mismatched:
        problems.append(f"shape mismatch for {k}: checkpoint has {list(got)}, model expects {list(want)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))


def load_into(model: nn.Module, sd: Mapping, source: str) -> nn.Module:
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def init_dummy_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights at real shapes, scaled like a trained model's (std 0.02 weights,
    unit norms), so activations stay in a realistic range through 30 layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            elif p.dim() == 1:  # norm weights
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def init_dummy_conv_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights for convolutional stacks (S3Gen, the front ends): weights
    ~ N(0, 1/fan_in) so activations neither vanish nor explode, biases ~ 0.02 N(0, 1), 1-D
    parameters (norm gains, Snake alphas) ~ 1 + 0.05 N(0, 1). Buffers (BatchNorm statistics)
    keep their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0.0, (p[0].numel() if p.dim() > 1 else 1) ** -0.5, generator=g)
    return model


def load_t3(ckpt_dir, variant: Optional[str] = None, device="cpu", dtype=torch.float32, *, t3_file=None,
            behaviour: Optional[str] = None, lora=None):
    """T3 from a checkpoint directory (variant detected from the file names when not given).

    ``t3_file``: another T3 file (upstream's "v2"/"v3", a name in ``ckpt_dir`` such as a Single
    Language Pack file, or a path); ``behaviour``: the multilingual behaviour ("0.1.7" or
    "upstream"; default by file, see :func:`default_behaviour`); ``lora``: a PEFT LoRA adapter
    directory merged into the weights (``chatterbox_rt.lora``)."""
    from .models.t3 import T3, T3Config

    path, variant, behaviour = resolve_t3(ckpt_dir, variant, t3_file, behaviour)
    sd = read_state_dict(path)
    source = str(path)
    if lora is not None:
        from .lora import merge_lora

        sd = merge_lora(sd, lora, source=source)
        source = f"{path} with LoRA adapter {lora}"
    model = T3(T3Config.for_variant(variant, behaviour=behaviour))
    load_into(model, sd, source)
    return model.to(device=device, dtype=dtype).eval()
