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

from .models.t3.config import variant_key

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


def find_file(ckpt_dir: Union[str, Path], variant: str, table: Mapping[str, tuple], what: str) -> Path:
    """The first official file of ``table[variant]`` present in ``ckpt_dir``; a clear error otherwise."""
    from .models.t3.config import canonical_variant

    ckpt_dir = Path(ckpt_dir)
    names = table[canonical_variant(variant)]
    for name in names:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise CheckpointError(f"missing {what} file for variant {variant!r}: "
                          f"{' or '.join(str(ckpt_dir / n) for n in names)}")


def read_state_dict(path: Union[str, Path]) -> dict:
    """Tensors of a checkpoint file, unwrapped from ``{"model": [sd]}`` if so stored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, wrong format, pickled code
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return unwrap_state_dict(sd, source=str(path))


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


def load_t3(ckpt_dir, variant: Optional[str] = None, device="cpu", dtype=torch.float32):
    """T3 from a checkpoint directory (variant detected from the file names when not given)."""
    from .models.t3 import T3, T3Config

    variant = variant or detect_variant(ckpt_dir)
    path = t3_file(ckpt_dir, variant)
    sd = read_state_dict(path)
    model = T3(T3Config.for_variant(variant))
    load_into(model, sd, str(path))
    return model.to(device=device, dtype=dtype).eval()
