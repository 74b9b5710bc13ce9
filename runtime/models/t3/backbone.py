"""T3's transformer backbones (Llama for Chatterbox/Multilingual, GPT-2 for Turbo/Nano).

Our own implementation of what the reference builds with ``transformers.LlamaModel`` and
``GPT2Model`` (transformers 5.2.0): parameter names match theirs under the ``tfmr.`` prefix, so
the official checkpoints load unchanged. Math follows ``modeling_llama.py`` (RMSNorm in fp32,
llama3-scaled RoPE, SwiGLU) and ``modeling_gpt2.py`` (pre-LN, Conv1D weights stored
[in, out], tanh GELU, learned positions).

Unlike the reference (a growing ``DynamicCache``), keys and values live in one static cache
allocated once; a decode step has static shapes and takes its positions from a device tensor,
so it never waits on the host and can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BackboneConfig
from .linear import Conv1D, Linear, make_linear


class KVCache:
    """Keys and values of every layer in one buffer ``[layers, 2, batch, heads, max_len, head_dim]``.

    Allocated once at (max_batch, max_len); ``ensure`` re-allocates only when a request needs
    more, which a server avoids by sizing it up front.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, max_batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, zero: bool = True):
        alloc = torch.zeros if zero else torch.empty  # empty: for users that never read unwritten entries
        self.kv = alloc(num_layers, 2, max_batch, num_heads, max_len, head_dim, dtype=dtype, device=device)

    @property
    def max_batch(self) -> int:
        return self.kv.shape[2]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (batch <= self.max_batch and length <= self.max_len and self.kv.dtype == dtype
                and self.kv.device == torch.device(device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.kv[i, 0], self.kv[i, 1]  # each [B, H, L, D]

    def rows(self, start: int, n: int) -> "KVCache":
        """A view of cache rows ``start:start + n`` (one request's slots): a prefill into it writes
        the shared buffer, nothing is copied."""
        view = KVCache.__new__(KVCache)
        view.kv = self.kv[:, :, start:start + n]
        return view


@dataclass
class AttentionProbe:
    """Asks the backbone for the softmax attention of a few (layer, head) pairs of one batch row.

    The multilingual model's EOS control reads these (reference ``AlignmentStreamAnalyzer``,
    which switches the whole model to eager attention to get them; we compute only the heads
    it needs). ``n_query`` rows are taken from the end of the current input.
    """

    heads: dict  # layer index -> list of head indices
    row: int = 0
    n_query: int = 1
    out: dict = field(default_factory=dict)  # layer -> [len(heads), n_query, kv_len] fp32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class UnusedTable(nn.Module):
    """Stands in for a checkpoint tensor the model never reads (GPT-2's ``wte``).

    The reference builds the table, loads it, then deletes it; we accept and validate the key
    when loading (so files load with ``strict=True``) without holding ~200 MB of weights, and
    emit a zero-strided tensor of the right shape in ``state_dict()`` so the keys and shapes
    stay identical to the reference's.
    """

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = tuple(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        got = tuple(state_dict[key].shape)
        if got != self.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {list(got)} from checkpoint, "
                              f"the shape in current model is {list(self.shape)}.")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = torch.zeros((), dtype=torch.float32).expand(self.shape)


@dataclass
class Step:
    """What every layer of one forward needs about positions, built once per forward.

    Prefill: ``pos`` None (causal attention over the input, cache written from 0). Decode: one
    new entry per row at ``pos`` [B] (a device tensor: no host sync), attention over the first
    ``kv_len`` cache entries, of which row b sees those ``<= pos[b]``."""

    pos: Optional[Tensor] = None
    kv_len: int = 0
    mask: Optional[Tensor] = None  # [B, 1, 1, kv_len] bool
    index: Optional[Tensor] = None  # [B, H, 1, D] scatter index into the cache
    # Per-request decode (the engine's batch-invariant mode): input row b writes cache row
    # ``slots[b]`` at ``pos[b]``; each segment attends only to its own rows' first kv_len entries.
    slots: Optional[Tensor] = None  # [B] long
    segments: Optional[list] = None  # [Segment]

    @classmethod
    def decode(cls, pos: Tensor, kv_len: int, num_heads: int, head_dim: int) -> "Step":
        B = pos.shape[0]
        mask = torch.arange(kv_len, device=pos.device)[None, :] <= pos[:, None]
        index = pos.view(B, 1, 1, 1).expand(B, num_heads, 1, head_dim)
        return cls(pos, kv_len, mask[:, None, None, :], index)

    @classmethod
    def per_request(cls, pos: Tensor, slots: Tensor, segments: list) -> "Step":
        return cls(pos=pos, slots=slots, segments=segments)


@dataclass
class Segment:
    """One request's rows in a per-request decode step: input rows ``row:row + n``, cache rows
    ``slot:slot + n``, attending to the first ``kv_len`` cache entries (all of them valid: a
    request's rows share one position). ``mask`` is the all-True ``[n, 1, 1, kv_len]`` mask
    ``Step.decode`` would build for that request alone, so the attention call is the very call
    a solo decode step makes (same kernel, same result). ``probe``: this request's alignment
    probe (``row`` counts within the segment)."""

    row: int
    n: int
    slot: int
    kv_len: int
    mask: Tensor
    probe: Optional["AttentionProbe"] = None


def _attend_per_request(q: Tensor, cache_k: Tensor, cache_v: Tensor, step: Step, layer_idx: int) -> Tensor:
    """Per-request attention over each segment's own cache rows -> [B, H, 1, D]."""
    out = torch.empty_like(q)
    for seg in step.segments:
        r, s = slice(seg.row, seg.row + seg.n), slice(seg.slot, seg.slot + seg.n)
        k, v = _read(cache_k[s, :, :seg.kv_len], q), _read(cache_v[s, :, :seg.kv_len], q)
        if seg.probe is not None:
            _probe(seg.probe, layer_idx, q[r], k, step.pos[r])
        out[r] = F.scaled_dot_product_attention(q[r], k, v, attn_mask=seg.mask)
    return out


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, cache: tuple[Tensor, Tensor], step: Step, probe,
                      layer_idx: int) -> Tensor:
    """Write this forward's keys/values into the cache and attend: prefill, a dense decode
    step, or a per-request decode step."""
    if step.segments is not None:
        # NOTE: advanced indices around a slice put the indexed dim first: [B, H, D] = k[:, :, 0].
        cache[0][step.slots, :, step.pos] = k[:, :, 0].to(cache[0].dtype)
        cache[1][step.slots, :, step.pos] = v[:, :, 0].to(cache[1].dtype)
        return _attend_per_request(q, cache[0], cache[1], step, layer_idx)
    B = q.shape[0]
    _write_cache(cache[0], cache[1], k, v, step)
    if step.pos is not None:
        k, v = _read(cache[0][:B, :, :step.kv_len], q), _read(cache[1][:B, :, :step.kv_len], q)
    if probe is not None:
        _probe(probe, layer_idx, q, k, step.pos)
    return _attend(q, k, v, step)


def _read(cached: Tensor, q: Tensor) -> Tensor:
    """Cache entries in the query's dtype (a KV cache may be stored narrower than the activations)."""
    return cached if cached.dtype == q.dtype else cached.to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
    if step.pos is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask)


def _probe(probe: AttentionProbe, layer: int, q: Tensor, k: Tensor, pos: Optional[Tensor]):
    heads = probe.heads.get(layer)
    if heads is None:
        return
    # Slices, not an index tensor: building one from the host list would copy to the device every step.
    qs = torch.cat([q[probe.row, h:h + 1, -probe.n_query:] for h in heads]).float()  # [h, nq, D]
    ks = torch.cat([k[probe.row, h:h + 1] for h in heads]).float()  # [h, L, D]
    scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    L = ks.shape[-2]
    if pos is None:  # prefill: query i (counted from the end) sits at position L - nq + i
        qpos = torch.arange(L - probe.n_query, L, device=q.device)
    else:
        qpos = pos[probe.row].view(1)
    keep = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
    probe.out[layer] = scores.masked_fill(~keep, float("-inf")).softmax(-1)


def _write_cache(cache_k: Tensor, cache_v: Tensor, k: Tensor, v: Tensor, step: Step):
    B, T = k.shape[0], k.shape[2]
    if step.pos is None:
        cache_k[:B, :, :T] = k
        cache_v[:B, :, :T] = v
    else:
        cache_k[:B].scatter_(2, step.index, k.to(cache_k.dtype))
        cache_v[:B].scatter_(2, step.index, v.to(cache_v.dtype))


# --------------------------------------------------------------------------------------- Llama


def llama3_inv_freq(head_dim: int, theta: float, scaling) -> Tensor:
    """Inverse RoPE frequencies with llama3 scaling (transformers ``_compute_llama3_parameters``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, hd
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = Linear(d, cfg.num_heads * hd, bias=False)
        self.v_proj = Linear(d, cfg.num_heads * hd, bias=False)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, cache: tuple[Tensor, Tensor], step: Step, probe, layer_idx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = _cached_attention(q, k, v, cache, step, probe, layer_idx)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, cos, sin, cache, step: Step, probe, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, step, probe, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        # Unused (T3 feeds embeddings), but present in every checkpoint; 8 x hidden, so kept.
        self.embed_tokens = nn.Embedding(cfg.llama_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.register_buffer("inv_freq", llama3_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # fp32 as in transformers; positions [B, T] -> cos/sin [B, 1, T, D]
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, x: Tensor, cache: KVCache, pos: Optional[Tensor] = None, kv_len: Optional[int] = None,
                probe: Optional[AttentionProbe] = None, step: Optional[Step] = None) -> Tensor:
        """``x`` [B, T, D]. Prefill (``pos`` None) writes cache[0:T]; decode (T == 1) writes at ``pos`` [B]
        and attends to the first ``kv_len`` cache entries (a host bound; None = the whole cache).
        ``step``: a per-request decode step (``Step.per_request``) instead of ``pos``/``kv_len``."""
        B, T, _ = x.shape
        if step is not None:
            positions = step.pos.view(B, 1)
        elif pos is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
            step = Step()
        else:
            positions = pos.view(B, 1)
            step = Step.decode(pos, kv_len or cache.max_len, self.cfg.num_heads, self.cfg.head_dim)
        cos, sin = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i), step, probe, i)
        return self.norm(x)


# ---------------------------------------------------------------------------------------- GPT-2


class GPT2Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cache, step: Step, probe, layer_idx):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = _cached_attention(q, k, v, cache, step, probe, layer_idx)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, D))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, conv1d=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, cache, step: Step, probe, layer_idx):
        x = x + self.attn(self.ln_1(x), cache, step, probe, layer_idx)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = UnusedTable(cfg.gpt2_vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: Tensor, cache: KVCache, pos: Optional[Tensor] = None, kv_len: Optional[int] = None,
                probe: Optional[AttentionProbe] = None, step: Optional[Step] = None) -> Tensor:
        B, T, _ = x.shape
        if step is not None:
            x = x + self.wpe(step.pos.view(B, 1))
        elif pos is None:
            x = x + self.wpe(torch.arange(T, device=x.device))
            step = Step()
        else:
            x = x + self.wpe(pos.view(B, 1))
            step = Step.decode(pos, kv_len or cache.max_len, self.cfg.num_heads, self.cfg.head_dim)
        for i, block in enumerate(self.h):
            x = block(x, cache.layer(i), step, probe, i)
        return self.ln_f(x)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    return LlamaBackbone(cfg) if cfg.kind == "llama" else GPT2Backbone(cfg)
