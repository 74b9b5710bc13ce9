"""S3Gen's token encoder: 25 Hz speech tokens -> 50 Hz ``mu`` features for the flow decoder.

Re-implements the reference ``chatterbox.models.s3gen.transformer.upsample_encoder.
UpsampleConformerEncoder`` (chatterbox-tts 0.1.7, from CosyVoice 2 / WeNet / ESPnet) as
``S3Token2Mel`` builds it, and the part of ``flow.CausalMaskedDiffWithXvec.inference`` that runs
before the CFM decoder (token embedding, encoder, ``encoder_proj``, speaker projection).

The math, for token embeddings ``x`` ``[B, T, 512]`` with lengths ``L``:

1. Embed:      x = LayerNorm_1e-5(Linear(x)) * sqrt(512); rel. positions p ``[1, 2T - 1, 512]``
               (ESPnet "rel_pos_espnet": sin/cos of relative offsets T-1 ... -(T-1)).
2. Lookahead:  x = x + Conv_k3(pad_left 2, leaky_relu(Conv_k4(pad_right 3, x)))  (3 tokens ahead)
3. 6 pre-norm conformer blocks without conv module or macaron FFN (i.e. transformer blocks):
               x = x + RelMHA(LN(x)),  x = x + W2 SiLU(W1 LN(x))       (LN eps 1e-12, 2048 units)
               RelMHA scores = ((q + u) k^T + rel_shift((q + v) (W_pos p)^T)) / sqrt(64), 8 heads
               (Transformer-XL, https://arxiv.org/abs/1901.02860, appendix B).
4. Upsample:   nearest x2 in time, pad_left 4, Conv_k5 (causal)              ``[B, 2T, 512]``
5. Embed again (own Linear/LayerNorm, positions for 2T), 4 more blocks, final LayerNorm_1e-5.

Batching: requests of different lengths are zero-padded to one T. Attention masks padded keys,
the FFNs are per frame and the upsampling conv is causal, so the only place where padding can
reach a valid frame is the look-ahead conv, which reads 3 tokens past the end of a request. The
reference zeroes the padded *token embeddings*, but step 1 turns those zeros into
LayerNorm(bias) before the look-ahead, so in the reference a padded batch differs from single
runs in the last 3 tokens (6 frames) of each shorter request. We zero the padded frames right
before the look-ahead, which is what a single run sees (its conv pads with zeros), so each
request's valid frames equal running it alone (to float rounding of batch-size dependent GEMMs).
On an unpadded input the multiplication is by ones and the output equals the reference's.
Frames past a request's length are not meaningful (the reference leaves them arbitrary too).

Parameter names and shapes equal the reference's, so ``flow.encoder.*`` loads with ``strict=True``
into ``UpsampleConformerEncoder`` and ``flow.*`` minus ``flow.decoder.*`` into ``FlowFront``.
Dropout is inference-inactive in the reference and absent here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import length_mask

SPEECH_VOCAB_SIZE = 6561  # S3 speech tokenizer v2: 3^8 FSQ codes
MEL_BINS = 80
SPEAKER_EMBED_DIM = 192  # CAMPPlus x-vector


@dataclass(frozen=True)
class EncoderConfig:
    """Shapes and constants of the reference encoder as ``S3Token2Mel`` builds it, plus the flow
    front-end sizes of ``CausalMaskedDiffWithXvec``."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # hard-coded in the reference's ``up_encoders``
    pre_lookahead_len: int = 3  # hard-coded in the reference's ``PreLookaheadLayer``
    upsample_stride: int = 2  # 25 Hz tokens -> 50 Hz mel frames (flow's token_mel_ratio)
    embed_ln_eps: float = 1e-5  # LinearNoSubsampling and after_norm
    block_ln_eps: float = 1e-12  # ConformerEncoderLayer norms
    lookahead_lrelu_slope: float = 0.01  # F.leaky_relu default in the reference
    pos_max_len: int = 5000  # EspnetRelPositionalEncoding's precomputed table; longer inputs extend it
    # flow front-end (CausalMaskedDiffWithXvec)
    vocab_size: int = SPEECH_VOCAB_SIZE
    mel_bins: int = MEL_BINS
    speaker_embed_dim: int = SPEAKER_EMBED_DIM

    def __post_init__(self):
        if self.output_size % self.attention_heads:
            raise ValueError(f"output_size {self.output_size} is not divisible by attention_heads "
                             f"{self.attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.output_size // self.attention_heads

    @property
    def token_mel_ratio(self) -> int:
        return self.upsample_stride


def rel_position_table(d_model: int, length: int) -> torch.Tensor:
    """ESPnet relative sinusoids ``[1, 2 length - 1, d_model]`` for offsets length-1 ... -(length-1),
    computed in fp32 exactly as ``EspnetRelPositionalEncoding.extend_pe``."""
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe_positive = torch.zeros(length, d_model)
    pe_negative = torch.zeros(length, d_model)
    pe_positive[:, 0::2] = torch.sin(position * div_term)
    pe_positive[:, 1::2] = torch.cos(position * div_term)
    pe_negative[:, 0::2] = torch.sin(-1 * position * div_term)
    pe_negative[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pe_positive, [0]), pe_negative[1:]], dim=0).unsqueeze(0)


class RelPositionalEncoding(nn.Module):
    """Scales by sqrt(d) and returns the relative position table for the input length."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.register_buffer("pe", rel_position_table(d_model, max_len), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = x.size(1)
        pe = self.pe
        if pe.size(1) < 2 * T - 1:  # the reference rebuilds its table the same way
            pe = rel_position_table(self.d_model, T).to(x.device)
        center = pe.size(1) // 2
        pos_emb = pe[:, center - T + 1: center + T].to(x.dtype)  # [1, 2T - 1, D]
        return x * self.xscale, pos_emb


class LinearEmbed(nn.Module):
    """The reference's ``LinearNoSubsampling``: ``out`` = (Linear, LayerNorm[, Dropout])."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(c.input_size, c.output_size),
                                 nn.LayerNorm(c.output_size, eps=c.embed_ln_eps))
        self.pos_enc = RelPositionalEncoding(c.output_size, c.pos_max_len)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


class PreLookaheadLayer(nn.Module):
    """Residual conv pair that sees ``pre_lookahead_len`` tokens ahead and 2 behind."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        ch = c.output_size
        self.pre_lookahead_len = c.pre_lookahead_len
        self.slope = c.lookahead_lrelu_slope
        self.conv1 = nn.Conv1d(ch, ch, kernel_size=c.pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(ch, ch, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        h = x.transpose(1, 2)
        h = F.leaky_relu(self.conv1(F.pad(h, (0, self.pre_lookahead_len))), self.slope)
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest x stride in time, then a causal conv (kernel 2 stride + 1, left-padded)."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.stride = c.upsample_stride
        self.conv = nn.Conv1d(c.output_size, c.output_size, 2 * self.stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, stride T]
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL self-attention with ESPnet's relative positions (reference ``rel_selfattn``)."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        d = c.output_size
        self.h, self.d_k = c.attention_heads, c.head_dim
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, 2T - 1]`` scores over offsets -> ``[B, H, T, T]`` scores over keys:
        out[..., i, j] = x[..., i, T - 1 - i + j]. Same pad-and-reshape trick as the reference."""
        B, H, T, P = x.shape
        x = torch.cat([x.new_zeros(B, H, T, 1), x], dim=-1).view(B, H, P + 1, T)
        return x[:, :, 1:].view(B, H, T, P)[:, :, :, : P // 2 + 1]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, D]``; key_mask ``[B, 1, T]`` bool (True = valid); pos_emb ``[1, 2T - 1, D]``."""
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)  # [B, T, H, dk]
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)  # [B, H, T, dk]
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)  # [1, H, 2T - 1, dk]
        matrix_ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # [B, H, T, T]
        matrix_bd = self.rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        # Every request has at least one valid key, so no row is all -inf and softmax puts exact
        # zeros on padded keys (the reference's second masked_fill after softmax is a no-op here).
        scores = scores.masked_fill(~key_mask.unsqueeze(1), -float("inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, T, dk]
        return self.linear_out(out.transpose(1, 2).contiguous().view(B, T, self.h * self.d_k))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.w_1 = nn.Linear(c.output_size, c.linear_units)
        self.w_2 = nn.Linear(c.linear_units, c.output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """The reference's ``ConformerEncoderLayer`` with normalize_before=True, no macaron FFN and no
    conv module: a pre-norm transformer block."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(c)
        self.feed_forward = PositionwiseFeedForward(c)
        self.norm_ff = nn.LayerNorm(c.output_size, eps=c.block_ln_eps)
        self.norm_mha = nn.LayerNorm(c.output_size, eps=c.block_ln_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), key_mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class UpsampleConformerEncoder(nn.Module):
    """Tokens' embeddings ``[B, T, 512]`` -> encoder states ``[B, 2T, 512]`` (see module docstring)."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        c = self.config = config or EncoderConfig()
        self.embed = LinearEmbed(c)
        self.pre_lookahead_layer = PreLookaheadLayer(c)
        self.encoders = nn.ModuleList(ConformerBlock(c) for _ in range(c.num_blocks))
        self.up_layer = Upsample1D(c)
        self.up_embed = LinearEmbed(c)
        self.up_encoders = nn.ModuleList(ConformerBlock(c) for _ in range(c.num_up_blocks))
        self.after_norm = nn.LayerNorm(c.output_size, eps=c.embed_ln_eps)

    def output_size(self) -> int:
        return self.config.output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xs ``[B, T, in]``, xs_lens ``[B]`` -> (out ``[B, 2T, D]``, mask ``[B, 1, 2T]`` bool).
        Frames at or past ``2 xs_lens`` are not meaningful."""
        mask = length_mask(xs_lens, xs.size(1)).unsqueeze(1)  # [B, 1, T]
        x, pos_emb = self.embed(xs)
        # NOTE: keeps padding out of the look-ahead (see module docstring); not in the reference.
        x = x * mask.transpose(1, 2).to(x.dtype)
        x = self.pre_lookahead_layer(x)
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)

        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)  # [B, 2T, D]
        up_lens = xs_lens * self.config.upsample_stride
        mask = length_mask(up_lens, x.size(1)).unsqueeze(1)  # [B, 1, 2T]
        x, pos_emb = self.up_embed(x)
        for layer in self.up_encoders:
            x = layer(x, mask, pos_emb)
        return self.after_norm(x), mask


class FlowFront(nn.Module):
    """The decoder-free part of ``CausalMaskedDiffWithXvec``, with its parameter names
    (``input_embedding``, ``encoder``, ``encoder_proj``, ``spk_embed_affine_layer``)."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        c = self.config = config or EncoderConfig()
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.speaker_embed_dim, c.mel_bins)
        self.encoder = UpsampleConformerEncoder(c)
        self.encoder_proj = nn.Linear(c.output_size, c.mel_bins)

    def embed_speaker(self, embedding: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """x-vector ``[B or 1, 192]`` (or ``[192]``) -> ``spks`` ``[B or 1, 80]``: L2-normalise, project.

        ``strength`` scales the normalised x-vector before the affine (voice conversion's
        ``speaker_strength``); 1.0, the reference's, skips the product."""
        unit = F.normalize(torch.atleast_2d(embedding), dim=1)
        return self.spk_embed_affine_layer(unit if strength == 1.0 else unit * strength)

    def encode_tokens(self, tokens: torch.Tensor, token_lens: torch.Tensor,
                      finalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech tokens ``[B, T]`` (prompt then new tokens, right-padded; see ``concat_prompt_tokens``)
        -> (mu ``[B, 80, 2T]``, mask ``[B, 1, 2T]`` in mu's dtype), as ``inference`` builds the
        decoder's ``mu`` and ``mask``.

        ``finalize=False`` drops the last ``pre_lookahead_len * token_mel_ratio`` frames of each
        request (their look-ahead tokens are not yet known while streaming). The reference trims
        the padded tensor but not its mask; here the mask is trimmed too.
        """
        valid = length_mask(token_lens, tokens.size(1))  # [B, T]
        # Padded ids may be anything (e.g. -1); look up 0 there, then zero it as the reference does.
        emb = self.input_embedding(tokens.long().masked_fill(~valid, 0))
        emb = emb * valid.unsqueeze(-1).to(emb.dtype)
        h, h_mask = self.encoder(emb, token_lens)  # [B, 2T, D], [B, 1, 2T]
        if not finalize:
            trim = self.config.pre_lookahead_len * self.config.token_mel_ratio
            h = h[:, : h.size(1) - trim]
            h_lens = (h_mask.sum(dim=-1).squeeze(1) - trim).clamp(min=0)
            h_mask = length_mask(h_lens, h.size(1)).unsqueeze(1)
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()  # [B, 80, 2T]
        return mu, h_mask.to(mu.dtype)


def concat_prompt_tokens(prompt_tokens: torch.Tensor, prompt_lens: torch.Tensor, tokens: torch.Tensor,
                         token_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, valid prompt tokens then valid new tokens, right-padded with 0 -> (``[B, T]``, lens).

    With one unpadded prompt this is the reference's ``torch.concat([prompt_token, token], dim=1)``;
    with padded prompts it keeps each request contiguous, which plain concatenation would not.
    A prompt with batch 1 is shared by all requests.
    """
    B = tokens.size(0)
    if prompt_tokens.size(0) == 1 and B > 1:
        prompt_tokens, prompt_lens = prompt_tokens.expand(B, -1), prompt_lens.expand(B)
    lens = prompt_lens.long() + token_lens.long()
    out = tokens.new_zeros(B, int(lens.max()))
    for b in range(B):
        p, t = int(prompt_lens[b]), int(token_lens[b])
        out[b, :p] = prompt_tokens[b, :p]
        out[b, p: p + t] = tokens[b, :t]
    return out, lens
