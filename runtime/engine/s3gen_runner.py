"""S3Gen's side of the engine: whole utterances batched by length bucket, streams chunk by chunk.

Every request keeps its own random stream: its CFM noise and HiFT source noise are drawn from its
own generator with the shapes its solo run draws, then padded into the batch, so a request alone
gives exactly ``TTS.generate``'s audio and in a batch the same within the batch tolerance of
``tests/unit/test_s3gen*`` (padding changes only rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..models.s3gen.cfm import MEL_BINS
from ..models.s3gen.s3gen import PROMPT_MAX_SECONDS, S3Gen
from ..profiling import nvtx

# Requests whose estimator lengths (mel frames, prompt included) fall in one bucket of this
# many frames share a flow call; padding wastes at most one bucket per request.
LENGTH_BUCKET_FRAMES = 256
# At most this many requests per flow / HiFT call.
MAX_S3GEN_BATCH = 16


@dataclass
class Utterance:
    """One request's whole-utterance S3Gen work."""

    tokens: Tensor  # [T] valid speech ids on the device
    ref: Mapping  # the voice's S3Gen reference dict
    generator: Optional[torch.Generator]
    n_steps: Optional[int]


def estimator_frames(s3gen: S3Gen, u: Utterance) -> int:
    full, _, _ = s3gen.mel_lengths(torch.tensor([u.tokens.numel()]), [u.ref])
    return int(full[0])


def bucket_key(s3gen: S3Gen, u: Utterance) -> tuple:
    return (u.n_steps or s3gen.default_steps, estimator_frames(s3gen, u) // LENGTH_BUCKET_FRAMES)


def group_utterances(s3gen: S3Gen, items: Sequence[Utterance], max_batch: int = MAX_S3GEN_BATCH) -> list[list[int]]:
    """Indices of ``items`` grouped by (steps, length bucket), at most ``max_batch`` per group,
    in arrival order within a group."""
    groups: dict = {}
    for i, u in enumerate(items):
        groups.setdefault(bucket_key(s3gen, u), []).append(i)
    out = []
    for idx in groups.values():
        out += [idx[k:k + max_batch] for k in range(0, len(idx), max_batch)]
    return out


# Speech tokens per second of S3Gen's tokenizer: bounds a voice prompt's tokens (10 s at most).
TOKENS_PER_SECOND = 25


class S3GenWorkspace:
    """The batched flow call's input buffers, allocated once when the engine is built: speech
    tokens ``[max_batch, max_tokens]`` and the CFM noise ``[max_batch, 80, max_frames]``, sized for
    ``max_tokens`` speech tokens after a voice prompt of up to 10 s. A batch uses views of them
    (the used region cleared first); a larger one (a voice with a longer prompt than the
    reference allows) gets its own tensors instead."""

    def __init__(self, s3gen: S3Gen, max_batch: int, max_tokens: int):
        self.max_batch, self.max_tokens = int(max_batch), int(max_tokens)
        ratio = s3gen.flow.config.token_mel_ratio
        self.max_frames = ratio * (PROMPT_MAX_SECONDS * TOKENS_PER_SECOND + self.max_tokens)
        dev = s3gen.device
        self.tokens = torch.zeros(self.max_batch, self.max_tokens, dtype=torch.long, device=dev)
        self.noise = torch.zeros(self.max_batch, MEL_BINS, self.max_frames, dtype=torch.float32, device=dev)

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size() + self.noise.numel() * self.noise.element_size()

    def take(self, B: int, T: int, L: int, dev) -> tuple[Tensor, Tensor]:
        """Zeroed ``tokens [B, T]`` and ``noise [B, 80, L]``: views when they fit."""
        if B <= self.max_batch and T <= self.max_tokens and L <= self.max_frames and self.noise.device == dev:
            tokens, noise = self.tokens[:B, :T], self.noise[:B, :, :L]
            tokens.zero_()
            noise.zero_()
            return tokens, noise
        return (torch.zeros(B, T, dtype=torch.long, device=dev),
                torch.zeros(B, MEL_BINS, L, dtype=torch.float32, device=dev))


@torch.inference_mode()
def decode_batch(s3gen: S3Gen, items: Sequence[Utterance], cfm=None,
                 workspace: Optional[S3GenWorkspace] = None) -> list[Tensor]:
    """Whole utterances of one bucket -> each one's waveform ``[480 M_i]`` on the device (with the
    reference's trim-fade, as ``S3Gen.hift``). ``cfm``: the CFM loop's runner (CUDA graphs);
    ``workspace``: pre-allocated input buffers (else allocated here)."""
    dev = s3gen.device
    B = len(items)
    lens = torch.tensor([u.tokens.numel() for u in items])
    refs = [u.ref for u in items]
    full, _, _ = s3gen.mel_lengths(lens, refs)
    L = int(full.max())
    if workspace is not None:
        tokens, noise = workspace.take(B, int(lens.max()), L, dev)
    else:
        tokens = torch.zeros(B, int(lens.max()), dtype=torch.long, device=dev)
        noise = torch.zeros(B, MEL_BINS, L, dtype=torch.float32, device=dev)
    for b, u in enumerate(items):
        tokens[b, : u.tokens.numel()] = u.tokens.to(dev)
    for b, u in enumerate(items):  # each request's own draw, the shape its solo run draws
        g = u.generator
        n = torch.randn(1, MEL_BINS, int(full[b]), generator=g, device=g.device if g is not None else dev,
                        dtype=torch.float32)
        noise[b, :, : n.shape[-1]] = n[0].to(dev)
    steps = items[0].n_steps
    with nvtx.range("s3gen_batch_flow", "s3gen"):
        mel, mel_lens = s3gen.flow_mel(tokens, lens, refs, n_steps=steps, noise=noise,
                                       **({"cfm": cfm} if cfm is not None else {}))
    gens = [u.generator for u in items]
    with nvtx.range("s3gen_batch_hift", "s3gen"):
        wav = s3gen.hift(mel, mel_lens, generator=gens if all(g is not None for g in gens) else None)
    spf = s3gen.mel2wav.config.samples_per_frame
    return [wav[b, : int(mel_lens[b]) * spf] for b in range(B)]
