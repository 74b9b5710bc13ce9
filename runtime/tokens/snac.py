"""SNAC codes for ``chatterbox-rt tokens encode --codec snac`` (the ``snac`` extra).

SNAC (Siuzdak et al., "Multi-Scale Neural Audio Codec", package ``snac``) quantises the encoder's
latent with a residual VQ whose K-th codebook runs at ``hop_length * vq_strides[K]`` samples per code
(snac_24khz: hop 512, strides 4, 2, 1 -> 12, 23, 47 Hz; 4096 codes each). ``SNAC.encode`` first pads
the audio on the right to a multiple of ``hop_length * lcm(vq_strides[0], attn_window_size)`` (so the
coarsest scale and the encoder's local attention windows tile it exactly) and returns one
``[B, T_K]`` tensor per scale.

A batch is exact only if no row is padded beyond its own multiple (the padding's codes depend on
what follows it), so utterances are grouped by their padded length and each group runs as one
batch of at most ``batch_size``. Segments of a fixed ``segment_length`` mostly share one length.

Weights come from a local directory holding ``config.json`` and ``pytorch_model.bin`` (as on the
Hugging Face Hub, e.g. ``hubertsiuzdak/snac_24khz``); nothing is downloaded, and the weights are read
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .encode import DEFAULT_BATCH_SIZE, Codec, EncodeError, list_array, sha256_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.bin"
INSTALL = "pip install snac (or pip install 'chatterbox-rt[snac]')"
GET_CHECKPOINT = ("a local directory with SNAC's config.json and pytorch_model.bin, e.g. "
                  "`huggingface-cli download hubertsiuzdak/snac_24khz --local-dir DIR`; nothing is downloaded")


def snac_module():
    """The ``snac`` package, or an ImportError that says how to install it."""
    try:
        import snac
    except ImportError as e:
        raise ImportError(f"--codec snac needs the snac package: {INSTALL} ({e})") from None
    return snac


def checkpoint_files(path: Optional[Union[str, os.PathLike]]) -> tuple[Path, Path]:
    """A SNAC checkpoint directory (or its ``pytorch_model.bin``) -> (config.json, weights)."""
    if path is None:
        raise EncodeError(f"--codec snac needs --snac-checkpoint DIR (snac_checkpoint=...): {GET_CHECKPOINT}")
    p = Path(path).expanduser()
    if p.is_file():
        config, weights = p.parent / CONFIG_FILE, p
    elif p.is_dir():
        config, weights = p / CONFIG_FILE, p / WEIGHTS_FILE
    else:
        raise EncodeError(f"SNAC checkpoint {p} not found: --snac-checkpoint must be {GET_CHECKPOINT}")
    missing = [f.name for f in (config, weights) if not f.is_file()]
    if missing:
        raise EncodeError(f"SNAC checkpoint {p} has no {' or '.join(missing)}: --snac-checkpoint must be "
                          f"{GET_CHECKPOINT}")
    return config, weights


def load_snac(path, device="cpu"):
    """``SNAC.from_config(config.json)`` with the weights of ``pytorch_model.bin`` (strict), in eval mode."""
    from ..checkpoint import CheckpointError, load_tensors, unwrap_state_dict

    config, weights = checkpoint_files(path)
    SNAC = snac_module().SNAC
    try:
        model = SNAC.from_config(str(config))
    except (ValueError, TypeError, OSError) as e:  # bad JSON, unknown keys
        raise CheckpointError(f"cannot build SNAC from {config}: {e}") from e
    sd = unwrap_state_dict(load_tensors(weights, "SNAC checkpoint"), source=str(weights))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not fit {config}: {' '.join(str(e).split())}") from None
    return model.eval().to(device), weights


class SnacCodec(Codec):
    """SNAC's multi-scale codes: ``tokens_scale_K`` (K = 0 the coarsest), their counts and shapes."""

    name = "snac"

    def __init__(self, model, *, checkpoint: str, checkpoint_file: Optional[str] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.batch_size = batch_size
        self.sample_rate = int(model.sampling_rate)
        self.vocab_size = int(model.codebook_size)
        self.strides = tuple(int(s) for s in model.vq_strides)
        self.hop = int(model.hop_length)
        # SNAC.preprocess: the padded length is a multiple of this
        self.pad_multiple = self.hop * math.lcm(self.strides[0], model.attn_window_size or 1)
        self.checkpoint = checkpoint
        self.checkpoint_file = checkpoint_file
        self.scales = {f"scale_{k}": f"tokens_scale_{k}" for k in range(len(self.strides))}

    def padded_length(self, n: int) -> int:
        return math.ceil(n / self.pad_multiple) * self.pad_multiple

    def schema_fields(self) -> list:
        import pyarrow as pa

        fields = []
        for k in range(len(self.strides)):
            fields += [pa.field(f"tokens_scale_{k}", pa.list_(pa.int16())), pa.field(f"n_tokens_scale_{k}", pa.int32()),
                       pa.field(f"shape_scale_{k}", pa.list_(pa.int32()))]
        return fields

    def columns(self, rows: list[dict]) -> dict:
        import pyarrow as pa

        out = {}
        for k in range(len(self.strides)):
            codes = [r[k] for r in rows]
            out[f"tokens_scale_{k}"] = list_array(codes, np.int16)
            out[f"n_tokens_scale_{k}"] = pa.array([len(c) for c in codes], type=pa.int32())
            out[f"shape_scale_{k}"] = list_array([np.array([1, len(c)]) for c in codes], np.int32)
        return out

    def config(self) -> dict:
        return {**super().config(), "vq_strides": list(self.strides), "hop_length": self.hop}

    def describe(self) -> dict:
        return {"hop_length": self.hop, "vq_strides": list(self.strides),
                "code_rates_hz": [self.sample_rate / (self.hop * s) for s in self.strides],
                "pad_multiple": self.pad_multiple}

    def encode(self, wavs: Sequence[np.ndarray]) -> list[dict]:
        import torch

        groups = defaultdict(list)  # padded length -> indices
        for i, w in enumerate(wavs):
            groups[self.padded_length(len(w))].append(i)
        out: list = [None] * len(wavs)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for length, idx in sorted(groups.items()):
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start:start + self.batch_size]
                    x = torch.zeros(len(chunk), 1, length)  # [B, 1, L]: the zero padding SNAC.preprocess adds
                    for j, i in enumerate(chunk):
                        x[j, 0, :len(wavs[i])] = torch.from_numpy(wavs[i])
                    codes = [c.cpu().numpy() for c in self.model.encode(x.to(device))]  # K x [B, T_K]
                    for j, i in enumerate(chunk):
                        out[i] = {k: c[j].astype(np.int16) for k, c in enumerate(codes)}
        return out


def load_snac_codec(path, *, batch_size: int = DEFAULT_BATCH_SIZE, device="cpu") -> SnacCodec:
    snac_module()  # the package first: its absence is the more basic problem
    model, weights = load_snac(path, device)
    return SnacCodec(model, checkpoint=sha256_file(weights), checkpoint_file=str(weights), batch_size=batch_size)


__all__ = ["SnacCodec", "load_snac", "load_snac_codec", "checkpoint_files", "snac_module"]
