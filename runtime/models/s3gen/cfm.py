"""S3Gen's conditional flow matching (CFM): the U-Net estimator and the Euler solver with CFG.

Re-implements the reference ``chatterbox.models.s3gen.decoder.ConditionalDecoder`` (with its
``matcha`` building blocks and the diffusers ``BasicTransformerBlock`` it is made of) and
``flow_matching.CausalConditionalCFM`` (chatterbox-tts 0.1.7, adapted there from CosyVoice's
``cosyvoice/flow/decoder.py`` and Matcha-TTS; flow matching: https://arxiv.org/abs/2210.02747),
built as ``S3Token2Mel`` builds ``flow.decoder``. No diffusers: the transformer block is
re-implemented for the one configuration used (self-attention only, LayerNorm, GELU FF).

The math, for mu, cond ``[B, 80, T]``, spks ``[B, 80]``, mask ``[B, 1, T]``, noise x0 ``[B, 80, T]``:

1. Time grid: t_k = k / n for k = 0..n, warped by the cosine schedule t -> 1 - cos(t pi / 2)
   (the meanflow path keeps the linear grid).
2. Estimator v(x, t) = U-Net([x; mu; spks; cond]) (320 channels): time embedding
   SiLU-MLP(sin/cos(1000 t)) -> 1024; one causal resnet + 4 transformer blocks down,
   12 x (resnet + 4 transformers) in the middle, one up with a skip, a causal final block and a
   1x1 projection to 80 channels. Causal convs pad (k - 1) on the left and use LayerNorm over
   channels. Attention masks padded *keys* with a -1e10 bias.
3. Euler with classifier-free guidance (rate w = 0.7): the conditional and the unconditional
   (mu = spks = cond = 0) velocities come from one estimator call on a batch of 2B,
        x <- x + (t_{k+1} - t_k) ((1 + w) v(x | mu, spks, cond) - w v(x | 0, 0, 0)).
4. Meanflow (distilled checkpoints): no CFG, 2 linear steps, and the estimator also embeds the
   end time r and mixes [emb(t); emb(r)] with a bias-free Linear(2048 -> 1024).

Batching: requests of different lengths are zero-padded to one T and described by ``mask``;
every layer masks its input exactly as the reference does, so each request's valid frames equal
running it alone (to float rounding of batch-size dependent GEMM/conv kernels). Padded frames
are not meaningful.

Quirks of the reference kept: ``temperature`` is ignored (the reference never scales its noise);
the time embedding uses ``scale * t * freqs`` in that order; the first causal conv of the up path
sees the concatenation [x; skip] with x cropped to the skip's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.dispatch import DispatchedOp
from ...profiling import nvtx

MEL_BINS = 80
SPK_EMB_DIM = 80  # the speaker x-vector after ``spk_embed_affine_layer``
ATTN_MASK_BIAS = -1.0e10  # the reference's additive bias for masked keys (``mask_to_bias``)
TIME_SCALE = 1000.0  # SinusoidalPosEmb's ``scale``
TIME_MAX_PERIOD = 10000.0


@dataclass(frozen=True)
class FlowConfig:
    """Shapes and solver settings of the reference CFM, as ``S3Token2Mel`` builds ``flow.decoder``."""

    mel_bins: int = MEL_BINS
    spk_emb_dim: int = SPK_EMB_DIM
    out_channels: int = MEL_BINS
    channels: Tuple[int, ...] = (256,)
    n_blocks: int = 4  # transformer blocks per U-Net stage
    num_mid_blocks: int = 12
    num_heads: int = 8
    attention_head_dim: int = 64
    ff_mult: int = 4
    time_embed_mult: int = 4  # time embedding width = channels[0] * time_embed_mult
    layer_norm_eps: float = 1e-5
    causal_kernel_size: int = 3
    meanflow: bool = False
    # Solver (CFM_PARAMS)
    n_steps: int = 10
    meanflow_n_steps: int = 2
    cfg_rate: float = 0.7  # inference_cfg_rate
    t_scheduler: str = "cosine"

    def __post_init__(self):
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"t_scheduler must be 'cosine' or 'linear', got {self.t_scheduler!r}")

    @property
    def in_channels(self) -> int:  # [x; mu; spks; cond]
        return 2 * self.mel_bins + self.spk_emb_dim + self.mel_bins

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * self.time_embed_mult


# --------------------------------------------------------------------------------------------
# Building blocks (key names follow the reference's modules)
# --------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Matcha's SinusoidalPosEmb: [sin(1000 t f), cos(1000 t f)], f_i = 10000^(-i / (dim/2 - 1))."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(TIME_MAX_PERIOD) / (half - 1)))
    emb = TIME_SCALE * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d padded (kernel - 1) on the left, so frame i sees frames <= i."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.causal_padding = (kernel_size - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_padding))


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, T] tensor (the reference's Transpose-LN-Transpose)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _masked(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * mask``; a None mask means nothing is padded and skips the pass over memory."""
    return x if mask is None else x * mask


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, kernel_size: int, eps: float):
        super().__init__()
        # Indices 1 and 3 are the reference's parameter-free Transpose modules.
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, kernel_size), nn.Identity(),
                                   _ChannelLayerNorm(dim_out, eps=eps), nn.Identity(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return _masked(self.block(_masked(x, mask)), mask)


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, kernel_size: int, eps: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out, kernel_size, eps)
        self.block2 = CausalBlock1D(dim_out, dim_out, kernel_size, eps)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(t_emb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(_masked(x, mask))


class Downsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """diffusers ``Attention`` (AttnProcessor2_0) for self-attention with bias-free q/k/v."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:  # x [B, T, C]
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.to_k(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # bias [B, 1, 1, T]
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.to_out[0](y)


class _GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention + GELU feed-forward (diffusers BasicTransformerBlock, layer_norm)."""

    def __init__(self, cfg: FlowConfig, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn1 = Attention(dim, cfg.num_heads, cfg.attention_head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(dim, cfg.ff_mult)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:  # x [B, T, C]
        x = self.attn1(self.norm1(x), attn_bias) + x
        return self.ff(self.norm3(x)) + x


def _transformers(cfg: FlowConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList([BasicTransformerBlock(cfg, dim) for _ in range(cfg.n_blocks)])


def _run_transformers(blocks: nn.ModuleList, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    # NOTE: the reference also forces fully-masked rows to attend everywhere (a host sync);
    # a row is fully masked only for a zero-length request, which we do not support.
    attn_bias = None if mask is None else ((1.0 - mask.to(x.dtype)) * ATTN_MASK_BIAS).unsqueeze(1)  # [B, 1, 1, T]
    x = x.transpose(1, 2).contiguous()  # [B, T, C]
    for block in blocks:
        x = block(x, attn_bias)
    return x.transpose(1, 2).contiguous()  # [B, C, T]


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------

class ConditionalDecoder(nn.Module):
    """The causal U-Net velocity estimator; state-dict keys match ``flow.decoder.estimator.*``."""

    def __init__(self, config: FlowConfig = FlowConfig()):
        super().__init__()
        cfg = self.config = config
        k, eps, tdim = cfg.causal_kernel_size, cfg.layer_norm_eps, cfg.time_embed_dim
        self.time_mlp = TimestepEmbedding(cfg.in_channels, tdim)

        self.down_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(cfg.channels):
            in_ch, out_ch = out_ch, ch
            is_last = i == len(cfg.channels) - 1
            down = CausalConv1d(out_ch, out_ch, k) if is_last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([CausalResnetBlock1D(in_ch, out_ch, tdim, k, eps),
                                                   _transformers(cfg, out_ch), down]))
        self.mid_blocks = nn.ModuleList([
            nn.ModuleList([CausalResnetBlock1D(cfg.channels[-1], out_ch, tdim, k, eps), _transformers(cfg, out_ch)])
            for _ in range(cfg.num_mid_blocks)])
        self.up_blocks = nn.ModuleList()
        up_ch = tuple(cfg.channels[::-1]) + (cfg.channels[0],)
        for i in range(len(up_ch) - 1):
            in_ch, out_ch = up_ch[i] * 2, up_ch[i + 1]
            is_last = i == len(up_ch) - 2
            up = CausalConv1d(out_ch, out_ch, k) if is_last else Upsample1D(out_ch)
            self.up_blocks.append(nn.ModuleList([CausalResnetBlock1D(in_ch, out_ch, tdim, k, eps),
                                                 _transformers(cfg, out_ch), up]))
        self.final_block = CausalBlock1D(up_ch[-1], up_ch[-1], k, eps)
        self.final_proj = nn.Conv1d(up_ch[-1], cfg.out_channels, 1)
        self.time_embed_mixer = nn.Linear(2 * tdim, tdim, bias=False) if cfg.meanflow else None

    @property
    def dtype(self) -> torch.dtype:
        return self.final_proj.weight.dtype

    def time_embedding(self, t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """t (and, for meanflow, r): [B] or [1] -> [B or 1, time_embed_dim] in the estimator's dtype.

        An fp32 island when the estimator runs in bf16/fp16 (s3gen.CFM_FP32_PARTS stay fp32): the
        sinusoid of ``1000 t`` and its MLP lose most where t is small, and keeping them (and t)
        in fp32 halved the 10-step CFM's bf16 mel error (BENCHMARKS.md, "Precision")."""
        dt = self.time_mlp.linear_1.weight.dtype
        emb = self.time_mlp(sinusoidal_embedding(t.float(), self.config.in_channels).to(dt))
        if self.time_embed_mixer is not None:
            if r is None:
                raise ValueError("a meanflow estimator needs the end time r")
            r_emb = self.time_mlp(sinusoidal_embedding(r.float(), self.config.in_channels).to(dt))
            emb = self.time_embed_mixer(torch.cat([emb, r_emb], dim=1).to(self.time_embed_mixer.weight.dtype))
        return emb.to(self.dtype)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x, mu, cond [B, 80, T]; mask [B, 1, T]; t, r [B] or [1]; spks [B, 80] -> velocity [B, 80, T].

        ``mask=None`` declares that no frame is padded: the same result without the mask passes
        (the reference multiplies by an all-ones mask ~100 times per call)."""
        t_emb = self.time_embedding(t, r)
        T = x.shape[-1]
        x = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, T), cond], dim=1)  # [B, 320, T]

        hiddens, masks = [], [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            x = _run_transformers(blocks, resnet(x, m, t_emb), m)
            hiddens.append(x)
            x = down(_masked(x, m))
            masks.append(None if m is None else m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            x = _run_transformers(blocks, resnet(x, m, t_emb), m)
        for resnet, blocks, up in self.up_blocks:
            m, skip = masks.pop(), hiddens.pop()
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
            x = _run_transformers(blocks, resnet(x, m, t_emb), m)
            x = up(_masked(x, m))
        x = self.final_block(x, m)
        return _masked(self.final_proj(_masked(x, m)), mask)


# --------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------

def time_span(n_steps: int, scheduler: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """The n_steps + 1 Euler grid on [0, 1]; 'cosine' warps it to 1 - cos(t pi / 2)."""
    t = torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi) if scheduler == "cosine" else t


class CausalCFM(nn.Module):
    """Euler ODE solver from noise to mel; holds the estimator (keys ``estimator.*``)."""

    def __init__(self, config: FlowConfig = FlowConfig(), estimator: Optional[ConditionalDecoder] = None):
        super().__init__()
        self.config = config
        self.estimator = estimator if estimator is not None else ConditionalDecoder(config)
        self._cfg_euler = DispatchedOp("cfg_euler_")
        self._euler = DispatchedOp("euler")

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: Optional[torch.Tensor], spks: torch.Tensor, cond: torch.Tensor,
                n_steps: Optional[int] = None, noise: Optional[torch.Tensor] = None,
                meanflow: bool = False, *, cfg_rates: Optional[Sequence[float]] = None,
                step_spks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mu, cond, noise [B, 80, T]; mask [B, 1, T] (None: nothing padded); spks [B, 80] -> mel [B, 80, T].

        ``noise`` is the initial x0 (the reference draws ``randn_like(mu)``); it is required so
        that a caller controls the randomness.

        Per-call solver controls (voice conversion's; None keeps the config's, bit for bit):
        ``cfg_rates``, one CFG rate per Euler step (the CFG path only: meanflow has no CFG);
        ``step_spks [n_steps, B, 80]``, the speaker input of each step instead of ``spks``."""
        if noise is None:
            raise ValueError("CausalCFM needs the initial noise [B, 80, T] (draw it with torch.randn_like(mu))")
        if noise.shape != mu.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != mu shape {tuple(mu.shape)}")
        cfg = self.config
        if n_steps is None:
            n_steps = cfg.meanflow_n_steps if meanflow else cfg.n_steps
        if cfg_rates is not None:
            if meanflow:
                raise ValueError("the meanflow solver has no classifier-free guidance: cfg_rates does not apply")
            cfg_rates = [float(w) for w in cfg_rates]
            if len(cfg_rates) != n_steps:
                raise ValueError(f"cfg_rates has {len(cfg_rates)} rates for {n_steps} steps")
        if step_spks is not None and tuple(step_spks.shape) != (n_steps, *spks.shape):
            raise ValueError(f"step_spks must be [{n_steps}, {', '.join(map(str, spks.shape))}] (one spks per step), "
                             f"got {list(step_spks.shape)}")
        scheduler = "linear" if meanflow else cfg.t_scheduler
        t_span = time_span(n_steps, scheduler, device=mu.device, dtype=torch.float32)  # the times stay fp32

        in_dtype, dtype = noise.dtype, self.estimator.dtype
        x, mu, spks, cond = (a.to(dtype) for a in (noise, mu, spks, cond))
        mask = None if mask is None else mask.to(dtype)
        if step_spks is not None:
            step_spks = step_spks.to(x.device, dtype)
        if meanflow:
            return self._basic_euler(x, t_span, mu, mask, spks, cond, step_spks).to(in_dtype)
        return self._solve_euler_cfg(x, t_span, mu, mask, spks, cond, cfg_rates, step_spks).to(in_dtype)

    def _basic_euler(self, x, t_span, mu, mask, spks, cond, step_spks=None) -> torch.Tensor:
        """Meanflow: plain Euler over (t, r) pairs, no CFG (distilled with CFG outputs)."""
        euler = self._euler.get(x.device)
        x = x.contiguous()  # the fused kernels take dense tensors (the noise may be a slice)
        dts = (t_span[1:] - t_span[:-1]).to(x.dtype)  # on the device: no host read per step
        for i, (t, r) in enumerate(zip(t_span[:-1], t_span[1:], strict=True)):
            with nvtx.range("cfm_step"):
                with nvtx.range("estimator"):
                    s = spks if step_spks is None else step_spks[i]
                    v = self.estimator(x, mask, mu, t[None], s, cond, r[None])
                x = euler(x, v, dts[i])
        return x

    def _solve_euler_cfg(self, x, t_span, mu, mask, spks, cond, cfg_rates=None, step_spks=None) -> torch.Tensor:
        """Euler with CFG: rows [:B] conditional, rows [B:] unconditional (mu = spks = cond = 0).

        The 2B estimator inputs live in buffers allocated once per call; the conditioning halves
        are written once. Each step's fused update (``cfg_euler_``) advances x and writes it into
        both halves of the estimator's input, so the loop itself copies nothing (a per-step
        speaker input, ``step_spks``, is written into the conditional half before each step)."""
        B, C, T = x.shape
        w = self.config.cfg_rate
        step = self._cfg_euler.get(x.device)
        x = x.clone(memory_format=torch.contiguous_format)  # updated in place; dense for the fused kernels
        x_in = torch.cat([x, x], dim=0)  # [2B, 80, T]
        mask_in = None if mask is None else torch.cat([mask, mask], dim=0)  # [2B, 1, T]
        mu_in = x.new_zeros(2 * B, *mu.shape[1:])
        spks_in = x.new_zeros(2 * B, *spks.shape[1:])
        cond_in = x.new_zeros(2 * B, *cond.shape[1:])
        mu_in[:B], spks_in[:B], cond_in[:B] = mu, spks, cond
        t_in = t_span.new_empty(1)  # the time is shared by all rows; the embedding broadcasts
        dts = (t_span[1:] - t_span[:-1]).to(x.dtype)
        for i, t in enumerate(t_span[:-1]):
            with nvtx.range("cfm_step"):
                t_in.copy_(t)
                if step_spks is not None:
                    spks_in[:B] = step_spks[i]
                with nvtx.range("estimator"):
                    v = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in)
                step(x, v, dts[i], w if cfg_rates is None else cfg_rates[i], x_in)
        return x


def linear_ramp(start: float, end: float, n_steps: int) -> list[float]:
    """``n_steps`` values from ``start`` (step 0) to ``end`` (the last step), linearly; one step: ``start``."""
    if n_steps == 1:
        return [float(start)]
    return [float(start) + (float(end) - float(start)) * k / (n_steps - 1) for k in range(n_steps)]
