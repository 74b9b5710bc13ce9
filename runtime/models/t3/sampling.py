"""T3 next-token sampling with the reference's semantics, without a host sync.

The reference (chatterbox-tts 0.1.7, ``models/t3/t3.py``) builds its chain from transformers
5.2.0 logits processors; we reproduce each one's arithmetic exactly (same ops, same order), so
the processed probabilities are identical:

* Llama variants (``T3.inference``): CFG combine ``cond + w * (cond - uncond)`` → [multilingual
  alignment control] → repetition penalty → temperature → min-p → top-p.
* GPT-2 variants (``T3.inference_turbo``): temperature → top-k → top-p → repetition penalty,
  each only when it is not a no-op (``temperature != 1``, ``top_k > 0``, ``top_p < 1``,
  ``penalty != 1``).

The repetition history is a per-request boolean mask over the vocabulary (``seen``), updated in
place on the device; HF's gather/scatter over the token list gives the same result because
each distinct token is penalised once.

The draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` (the exponential-race form of sampling from
``p``, as in gpt-fast's ``multinomial_sample_one_no_sync``): unlike ``torch.multinomial`` it
never synchronises with the host and is safe inside a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    min_p: float
    top_k: int
    repetition_penalty: float
    cfg_weight: float

    def validate(self) -> "SamplingParams":
        def bad(name, value, rule):
            raise ValueError(f"{name}={value!r} is invalid: {rule}")

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            bad("temperature", self.temperature, "must be a finite number > 0 (use e.g. 1e-5 for near-greedy)")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", self.min_p, "must be in [0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", self.top_k, "must be an integer >= 0 (0 disables it)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
        if not (math.isfinite(self.cfg_weight) and self.cfg_weight >= 0):
            bad("cfg_weight", self.cfg_weight, "must be a finite number >= 0")
        return self


def cfg_combine(logits: Tensor, cfg_weight: float) -> Tensor:
    """``[2R, V]`` rows (conditional rows first, then unconditional) -> ``[R, V]``."""
    R = logits.shape[0] // 2
    cond, uncond = logits[:R], logits[R:]
    w = torch.as_tensor(cfg_weight, device=cond.device, dtype=cond.dtype)
    return cond + w * (cond - uncond)


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor``: seen tokens' logits are divided (if >= 0) or
    multiplied (if < 0) by ``penalty``. ``seen``: bool ``[R, V]``."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """HF ``MinPLogitsWarper``: drop tokens whose probability is below ``min_p`` x the top one.
    (The top token always survives for min_p <= 1, so HF's keep-at-least-one step is a no-op.)"""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """HF ``TopPLogitsWarper`` (ascending sort, cumulative sum, keep at least one)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """HF ``TopKLogitsWarper``: keep tokens scoring at least the k-th best (ties kept)."""
    k = min(max(top_k, 1), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, NEG_INF)


def process_llama(logits: Tensor, seen: Tensor, p: SamplingParams) -> Tensor:
    """Chain after CFG (and the multilingual alignment control) for the Llama variants.

    The reference always applies top-p, even at 1.0; there it removes only tokens whose
    probability is already exactly zero, so skipping it leaves the probabilities unchanged.
    ``top_k`` is not part of the reference's Llama chain; when set (> 0) it runs last.
    """
    logits = repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature != 1.0:
        logits = logits / p.temperature
    logits = min_p_filter(logits, p.min_p)
    if p.top_p < 1.0:
        logits = top_p_filter(logits, p.top_p)
    if p.top_k > 0:
        logits = top_k_filter(logits, p.top_k)
    return logits


def process_gpt(logits: Tensor, seen: Tensor, p: SamplingParams) -> Tensor:
    """Turbo/Nano chain: temperature -> top-k -> top-p -> repetition penalty."""
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if p.top_k > 0:
        logits = top_k_filter(logits, p.top_k)
    if p.top_p < 1.0:
        logits = top_p_filter(logits, p.top_p)
    if p.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, p.repetition_penalty)
    return logits


def sample_no_sync(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Draw one token per row of ``probs`` ``[R, V]`` -> ``[R]``, with no host synchronisation."""
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # An exact 0 from the exponential would give 0/0 for a zero-probability token.
    e.clamp_min_(torch.finfo(e.dtype).tiny)
    return torch.argmax(probs / e, dim=-1)
