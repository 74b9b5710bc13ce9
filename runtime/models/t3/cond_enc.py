"""T3 conditioning: speaker projection, perceiver resampler over the prompt speech, emotion.

Mirrors the reference's ``models/t3/modules/cond_enc.py`` and ``perceiver.py`` (parameter
names included). The conditioning prefix is ``[speaker (1), prompt (32 perceiver queries, or the
raw prompt embeddings for Turbo/Nano), emotion (1, Llama variants)]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T3Config


@dataclass
class T3Cond:
    """Per-voice conditioning for T3 (field names as in the reference's ``conds.pt``).

    ``speaker_emb`` [1, 256] voice-encoder embedding; ``cond_prompt_speech_tokens`` [1, P] S3
    tokens of the reference clip; ``emotion_adv`` exaggeration, a float or [1, 1, 1] tensor.
    """

    speaker_emb: Tensor
    cond_prompt_speech_tokens: Optional[Tensor] = None
    emotion_adv: Union[Tensor, float] = 0.5
    clap_emb: Optional[Tensor] = None
    cond_prompt_speech_emb: Optional[Tensor] = field(default=None, repr=False)

    def to(self, device=None, dtype=None) -> "T3Cond":
        """Move tensors; float tensors also take ``dtype`` (token ids stay integer)."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device=device, dtype=dtype if value.is_floating_point() else None))
        return self

    def emotion_tensor(self, device, dtype) -> Tensor:
        if torch.is_tensor(self.emotion_adv):
            return self.emotion_adv.to(device=device, dtype=dtype)
        return torch.full((1, 1, 1), float(self.emotion_adv), device=device, dtype=dtype)


class AttentionBlock2(nn.Module):
    """Pre-norm multi-head attention with separate Q/K/V projections and one shared LayerNorm."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        q = self._heads(self.to_q(self.norm(x1)))
        x2n = self.norm(x2)
        k, v = self._heads(self.to_k(x2n)), self._heads(self.to_v(x2n))
        h = F.scaled_dot_product_attention(q, k, v)
        B, _, T, _ = h.shape
        return x1 + self.proj_out(h.transpose(1, 2).reshape(B, T, -1))


class Perceiver(nn.Module):
    """Resamples the prompt to a fixed number of learned queries: cross- then self-attention,
    both through the same attention block (as in the reference)."""

    def __init__(self, num_queries: int, dim: int, num_heads: int):
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.empty(1, num_queries, dim))
        bound = (3.0 ** 0.5) * (2.0 / (num_queries + num_queries)) ** 0.5
        nn.init.uniform_(self.pre_attention_query, -bound, bound)
        self.attn = AttentionBlock2(dim, num_heads)

    def forward(self, h: Tensor) -> Tensor:
        query = self.pre_attention_query.expand(h.shape[0], -1, -1)
        pre = self.attn(query, h)
        return self.attn(pre, pre)


class T3CondEnc(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, d)
        self.emotion_adv_fc = nn.Linear(1, d, bias=False) if cfg.emotion_adv else None
        self.perceiver = Perceiver(cfg.perceiver_queries, d, cfg.perceiver_heads) if cfg.use_perceiver else None

    def forward(self, speaker_emb: Tensor, prompt_emb: Optional[Tensor], emotion: Optional[Tensor]) -> Tensor:
        """-> [B, len_cond, D]; ``prompt_emb`` [B, P, D] already embedded (or None)."""
        parts = [self.spkr_enc(speaker_emb.reshape(-1, self.cfg.speaker_embed_size))[:, None]]
        if prompt_emb is not None:
            parts.append(self.perceiver(prompt_emb) if self.perceiver is not None else prompt_emb)
        if self.emotion_adv_fc is not None:
            if emotion is None:
                raise ValueError("this T3 variant needs an emotion_adv (exaggeration) value in its T3Cond")
            parts.append(self.emotion_adv_fc(emotion.reshape(-1, 1, 1)))
        return torch.cat(parts, dim=1)
