"""HiFT: the mel -> 24 kHz waveform vocoder of S3Gen (HiFTNet = neural source filter + iSTFTNet).

Re-implements the reference ``chatterbox.models.s3gen.hifigan.HiFTGenerator`` and its
``f0_predictor.ConvRNNF0Predictor`` (chatterbox-tts 0.1.7, adapted there from CosyVoice's
``cosyvoice/hifigan/generator.py``; paper: https://arxiv.org/abs/2309.09493), built as
``S3Token2Wav.mel2wav`` is built, plus the ``trim_fade`` that ``S3Token2Wav`` applies to its output.

The math, for a mel ``[B, 80, T]`` at 50 frames/s:

1. F0:      f0 = |Linear(ELU(Conv3)^5 (mel))|                                  ``[B, T]`` Hz
2. Source:  f0 is nearest-upsampled x480 to samples; for harmonics k = 1..9,
            theta_k[n] = 2 pi (cumsum_n(k f0 / sr) mod 1),
            e_k = 0.1 sin(theta_k + phi_k) * uv + noise,  uv = [f0 > 10],
            s = tanh(Linear_9->1(e))                                          ``[B, 1, 480 T]``
            (phi_1 = 0, phi_k~U(-pi, pi); noise std 0.003 voiced, 0.1/3 unvoiced.)
3. STFT of s: n_fft 16, hop 4, periodic Hann window, center=True (reflect)  -> 18 channels
   (9 real + 9 imaginary) at 120 T + 1 frames.
4. Filter:  conv_pre, then 3 stages of [leaky_relu, ConvTranspose x(8, 5, 3)] each fused with
   a strided conv of the source STFT and a Snake resblock; the stage output is the mean of
   three Snake resblocks (kernels 3, 7, 11). Snake(x) = x + sin^2(alpha x) / (alpha + 1e-9).
5. Head:    conv_post -> 18 channels: magnitude = min(exp(x[:9]), 100), phase = sin(x[9:]);
            iSTFT (same window, hop 4, center=True) -> 480 T samples, clamped to +-0.99.

Batching: ``forward(mel, lengths)`` runs requests of different lengths zero-padded to one T.
Every convolution here is non-causal, so padding would leak into the last frames of a shorter
request; we zero the padded time steps after every layer that mixes time, at that layer's rate
(mel rate, x8, x40, x120 + 1 and the STFT frame rate). Where the reference depends on the
*end* of a signal (the reflect padding of the source STFT and the window envelope of the
iSTFT), the batched path reproduces that per request. The result on each request's valid
samples equals running it alone (to float rounding of batch-size dependent GEMM/conv kernels).

Checkpoints store weight-normed convolutions (``weight_g``/``weight_v`` or
``parametrizations.weight.original0``/``original1``); they are folded into a plain ``weight``
at load time (``fold_weight_norm``), so the runtime has no parametrizations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.dispatch import DispatchedOp
from ..masks import length_mask

S3GEN_SR = 24000

# Weight-norm key spellings: the old ``torch.nn.utils.weight_norm`` and the new
# ``torch.nn.utils.parametrizations.weight_norm`` (which the reference uses).
_WN_OLD = ("weight_g", "weight_v")
_WN_NEW = ("parametrizations.weight.original0", "parametrizations.weight.original1")


@dataclass(frozen=True)
class HiFTConfig:
    """Shapes and constants of the reference vocoder, as ``S3Token2Wav`` builds it."""

    sampling_rate: int = S3GEN_SR
    in_channels: int = 80  # mel bins
    base_channels: int = 512
    nb_harmonics: int = 8  # overtones above F0; the source has nb_harmonics + 1 sines
    upsample_rates: Tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: Tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop: int = 4
    resblock_kernel_sizes: Tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: Tuple[Tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: Tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: Tuple[Tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    conv_pre_kernel_size: int = 7
    conv_post_kernel_size: int = 7
    # NSF source (reference names: nsf_alpha = sine_amp, nsf_sigma = add_noise_std)
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0  # Hz
    lrelu_slope: float = 0.1
    # The reference calls F.leaky_relu(x) with torch's default slope before conv_post.
    post_lrelu_slope: float = 0.01
    snake_eps: float = 1e-9
    magnitude_max: float = 1e2
    audio_limit: float = 0.99
    # F0 predictor (reference ConvRNNF0Predictor defaults)
    f0_cond_channels: int = 512
    f0_num_convs: int = 5
    f0_kernel_size: int = 3
    f0_num_class: int = 1
    # Derived in __post_init__.
    upsample_factor: int = field(init=False)  # conv-stack upsampling (120)
    samples_per_frame: int = field(init=False)  # waveform samples per mel frame (480)
    n_freq: int = field(init=False)  # one-sided STFT bins (9)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "upsample_factor", math.prod(self.upsample_rates))
        set_(self, "samples_per_frame", self.upsample_factor * self.hop)
        set_(self, "n_freq", self.n_fft // 2 + 1)
        assert len(self.upsample_rates) == len(self.upsample_kernel_sizes) == len(self.source_resblock_kernel_sizes)

    @property
    def source_down_rates(self) -> Tuple[int, ...]:
        """Stride of the source-STFT conv feeding each stage (reference ``downsample_cum_rates[::-1]``)."""
        rates = (1,) + tuple(reversed(self.upsample_rates))[:-1]
        cum = [math.prod(rates[: i + 1]) for i in range(len(rates))]
        return tuple(reversed(cum))


# --------------------------------------------------------------------------- weight norm


def _fold_one(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # weight = g * v / ||v||, the norm over every dim except the one g keeps (dim 0 for both
    # torch weight_norm APIs by default; for ConvTranspose1d's [in, out, k] weight that is the
    # *input* channel, which is what the reference does).
    if g.dim() == 0:  # old weight_norm(dim=None): one norm over the whole tensor
        g = g.reshape([1] * v.dim())
    keep = [d for d in range(v.dim()) if g.dim() == v.dim() and g.shape[d] != 1]
    if g.dim() != v.dim() or len(keep) > 1 or any(g.shape[d] != v.shape[d] for d in keep):
        raise ValueError(f"weight-norm g {list(g.shape)} does not fit v {list(v.shape)}")
    # aten's own weight-norm op: the same rounding as the reference's parametrization, which
    # matters because F0 errors grow linearly in the NSF phase accumulator.
    dim = keep[0] if keep else -1
    return torch._weight_norm(v.float(), g.float(), dim).to(v.dtype)


def fold_weight_norm(state_dict: dict, prefix: str = "") -> dict:
    """Replace every weight-norm pair under ``prefix`` by its folded ``weight``, in place.

    Accepts ``<m>.weight_g``/``<m>.weight_v`` and ``<m>.parametrizations.weight.original0``/
    ``original1``. A lone half of a pair is left alone so a strict load still reports it.
    """
    for g_suffix, v_suffix in (_WN_OLD, _WN_NEW):
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("." + g_suffix)]:
            base = key[: -len(g_suffix)]
            v_key = base + v_suffix
            if v_key not in state_dict:
                continue
            state_dict[base + "weight"] = _fold_one(state_dict.pop(key), state_dict.pop(v_key))
    return state_dict


def _fold_weight_norm_hook(state_dict, prefix, *args):
    fold_weight_norm(state_dict, prefix)


def hann_window(n_fft: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """scipy ``get_window("hann", n, fftbins=True)`` (periodic Hann, float64) cast to ``dtype``."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64, device=device).to(dtype)


def trim_fade(wav: torch.Tensor, sr: int = S3GEN_SR) -> torch.Tensor:
    """The reference's ad-hoc fix for spill-over from the prompt: zero the first 20 ms of
    ``wav [B, N]`` and fade the next 20 ms in with a raised cosine (``S3Token2Wav.trim_fade``)."""
    n_trim = sr // 50
    # Built exactly as the reference buffer: float32 linspace/cos, then cast.
    fade = torch.zeros(2 * n_trim)
    fade[n_trim:] = (torch.cos(torch.linspace(torch.pi, 0, n_trim)) + 1) / 2
    fade = fade.to(device=wav.device, dtype=wav.dtype)
    n = min(wav.shape[-1], fade.numel())
    out = wav.clone()
    out[..., :n] = out[..., :n] * fade[:n]
    return out


# --------------------------------------------------------------------------- building blocks


def _mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x * mask


def _time_mask(lengths: Optional[torch.Tensor], size: int, scale: int = 1, extra: int = 0,
               dtype=torch.float32) -> Optional[torch.Tensor]:
    """``[B, 1, size]`` with ones on the first ``lengths * scale + extra`` steps (None if no lengths)."""
    if lengths is None:
        return None
    return length_mask(lengths * scale + extra, size).to(dtype)[:, None, :]


class Snake(nn.Module):
    """Snake(x) = x + sin^2(alpha x) / (alpha + eps), per channel (Liu et al., arXiv 2006.08195).

    Runs through the kernel dispatch layer (``chatterbox_rt.kernels.dispatch``: CUDA, Triton, C++
    or plain torch, chosen once per device); ``mask`` multiplies x first (``_mask``) in the same pass."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.eps = eps
        self._op = DispatchedOp("snake")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # [B, C, T]
        return self._op.get(x.device)(x, self.alpha, self.eps, mask)


class ResBlock(nn.Module):
    """Snake residual block (HiFi-GAN/BigVGAN): x += conv2(snake(conv1_d(snake(x)))) per dilation d."""

    def __init__(self, channels: int, kernel_size: int, dilations: Tuple[int, ...], eps: float):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels, eps) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels, eps) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Snake(0) = 0, so masking each conv's output keeps padded steps at exactly zero; the first
        # conv's mask is applied inside the next Snake's pass.
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=True):
            xt = act2(conv1(act1(x)), mask)
            xt = _mask(conv2(xt), mask)
            x = xt + x
        return x


class F0Predictor(nn.Module):
    """Reference ``ConvRNNF0Predictor``: 5 x (Conv1d k3 + ELU), Linear to 1, abs -> F0 in Hz."""

    def __init__(self, config: HiFTConfig = HiFTConfig()):
        super().__init__()
        c = config
        layers = []
        for i in range(c.f0_num_convs):
            cin = c.in_channels if i == 0 else c.f0_cond_channels
            layers += [nn.Conv1d(cin, c.f0_cond_channels, c.f0_kernel_size, padding=c.f0_kernel_size // 2),
                       nn.ELU()]
        # An nn.Sequential with the ELUs keeps the checkpoint's ``condnet.{0,2,4,6,8}`` keys.
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(c.f0_cond_channels, c.f0_num_class)
        self._register_load_state_dict_pre_hook(_fold_weight_norm_hook)

    def forward(self, mel: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt = self.classifier.weight.dtype  # fp32 when HiFT runs narrower (s3gen.HIFT_FP32_PARTS)
        mel, mask = mel.to(dt), None if mask is None else mask.to(dt)
        x = _mask(mel, mask)  # [B, 80, T]
        for layer in self.condnet:
            x = layer(x)
            if isinstance(layer, nn.Conv1d):  # ELU(0) = 0: masking after the conv suffices
                x = _mask(x, mask)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))  # [B, T]


def _row_generators(generators: Sequence[torch.Generator], rows: int) -> list:
    gens = list(generators)
    if len(gens) != rows:
        raise ValueError(f"{len(gens)} generators for a batch of {rows}")
    return gens


class SineSource(nn.Module):
    """Reference ``SourceModuleHnNSF`` + ``SineGen``: harmonic sines of F0 merged into one excitation."""

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.config = config
        self.l_linear = nn.Linear(config.nb_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor, *, noise_free: bool = False,
                generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f0 ``[B, 1, N]`` Hz at the sample rate -> excitation ``[B, 1, N]``.

        With ``noise_free`` the random initial phases and the additive noise are zero. Otherwise
        the draws follow the reference's order (rand for phases, then randn for the noise), so a
        generator seeded like the reference's global RNG gives the same signal.

        ``generator`` may be one generator per row (an engine's batch of requests, each with its
        own random stream): row b then draws exactly what it would draw alone, over its own
        ``lengths[b]`` samples (host ints; default: all N), zero noise past them."""
        c = self.config
        B = f0.shape[0]
        H = c.nb_harmonics + 1
        # The reference accumulates phase in float32 over the whole utterance (F_mat is a
        # default-dtype zeros tensor); kept as is so the phase drift matches it.
        f0 = f0.float()
        harmonics = torch.arange(1, H + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        f_mat = f0 * harmonics / c.sampling_rate  # [B, H, N] cycles per sample
        theta = 2 * math.pi * (torch.cumsum(f_mat, dim=-1) % 1)
        if noise_free:
            sines = c.nsf_alpha * torch.sin(theta)
        else:
            per_row = generator is not None and not isinstance(generator, torch.Generator)
            if per_row:
                u = torch.cat([torch.rand((1, H, 1), generator=g, device=f0.device, dtype=f0.dtype)
                               for g in _row_generators(generator, B)])
            else:
                u = torch.rand((B, H, 1), generator=generator, device=f0.device, dtype=f0.dtype)
            phase = -math.pi + u * (2 * math.pi)  # torch Uniform(-pi, pi).sample
            phase[:, 0, :] = 0
            sines = c.nsf_alpha * torch.sin(theta + phase)
        uv = (f0 > c.nsf_voiced_threshold).to(f0.dtype)  # [B, 1, N]
        if noise_free:
            e = sines * uv
        else:
            noise_amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
            if per_row:
                N = sines.shape[-1]
                n_b = [N] * B if lengths is None else [int(n) for n in lengths]
                z = sines.new_zeros(sines.shape)
                for b, g in enumerate(_row_generators(generator, B)):
                    z[b, :, :n_b[b]] = torch.randn((1, H, n_b[b]), generator=g, device=f0.device, dtype=f0.dtype)[0]
            else:
                z = torch.randn(sines.shape, generator=generator, device=f0.device, dtype=f0.dtype)
            noise = noise_amp * z
            e = sines * uv + noise
        w = self.l_linear.weight.to(e.dtype)
        s = torch.tanh(torch.einsum("bhn,oh->bon", e, w) + self.l_linear.bias.to(e.dtype)[None, :, None])
        return s.to(self.l_linear.weight.dtype)  # [B, 1, N]


# --------------------------------------------------------------------------- generator


class HiFTGenerator(nn.Module):
    """mel ``[B, 80, T]`` -> waveform ``[B, 480 T]`` at 24 kHz. State-dict keys match the reference's
    ``HiFTGenerator`` (with its ``f0_predictor``) after weight norm is folded; ``load_state_dict``
    folds weight-normed checkpoints itself."""

    def __init__(self, config: HiFTConfig = HiFTConfig()):
        super().__init__()
        c = self.config = config
        ch = c.base_channels
        self.f0_predictor = F0Predictor(c)
        self.m_source = SineSource(c)
        self.conv_pre = nn.Conv1d(c.in_channels, ch, c.conv_pre_kernel_size, padding=c.conv_pre_kernel_size // 2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2 ** i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)))
        src_ch = 2 * c.n_freq  # real and imaginary STFT of the source
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(c.source_down_rates, c.source_resblock_kernel_sizes,
                                          c.source_resblock_dilation_sizes, strict=True)):
            out = ch // 2 ** (i + 1)
            self.source_downs.append(nn.Conv1d(src_ch, out, 1) if u == 1 else
                                     nn.Conv1d(src_ch, out, 2 * u, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(out, k, d, c.snake_eps))
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2 ** (i + 1), k, d, c.snake_eps)
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True))
        last_ch = ch // 2 ** len(c.upsample_rates)
        self.conv_post = nn.Conv1d(last_ch, src_ch, c.conv_post_kernel_size, padding=c.conv_post_kernel_size // 2)
        self.register_buffer("stft_window", hann_window(c.n_fft), persistent=False)
        self._istft_op = DispatchedOp("istft")
        self._register_load_state_dict_pre_hook(_fold_weight_norm_hook)

    # -- source ---------------------------------------------------------------------------

    def excitation(self, f0: torch.Tensor, *, noise_free: bool = False,
                   generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                   lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
        """F0 ``[B, T]`` at mel rate -> NSF source ``[B, 1, 480 T]`` (reference ``inference``'s ``s``).
        ``generator``/``lengths`` (samples): as ``SineSource.forward``."""
        # nn.Upsample(scale_factor=480) in the reference: same op, same float index rounding.
        f0_up = F.interpolate(f0[:, None], scale_factor=float(self.config.samples_per_frame), mode="nearest")
        return self.m_source(f0_up, noise_free=noise_free, generator=generator, lengths=lengths)

    def _source_stft(self, s: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """``s [B, 1, N]`` -> ``[B, 2 * n_freq, N / hop + 1]`` (real bins then imaginary bins)."""
        c = self.config
        # The 16-point transforms run in fp32 whatever the model's dtype (no half-precision FFT on
        # CPU; their cost is negligible); the result returns to the model's dtype.
        dtype = s.dtype
        window = self.stft_window.float()
        s = s.squeeze(1).float()
        if lengths is None:
            spec = torch.stft(s, c.n_fft, c.hop, c.n_fft, window=window, center=True, return_complex=True)
        else:
            # center=True reflect-pads n_fft/2 at each end of *each request's* signal; rebuild that
            # padding per request with one gather, then frame without centering.
            half = c.n_fft // 2
            n = torch.arange(-half, s.shape[-1] + half, device=s.device)[None, :]  # [1, N + n_fft]
            end = (lengths * c.samples_per_frame)[:, None]
            idx = n.abs()
            idx = torch.where(idx >= end, 2 * (end - 1) - idx, idx).clamp(0, s.shape[-1] - 1)
            padded = torch.gather(s, 1, idx)
            spec = torch.stft(padded, c.n_fft, c.hop, c.n_fft, window=window, center=False, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1).to(dtype)

    # -- filter ---------------------------------------------------------------------------

    def decode(self, mel: torch.Tensor, s: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mel ``[B, 80, T]`` + source ``[B, 1, 480 T]`` -> waveform ``[B, 480 T]`` (reference ``decode``)."""
        c = self.config
        T = mel.shape[-1]
        dt = mel.dtype
        s_stft = self._source_stft(s, lengths).to(dt)  # [B, 18, 120 T + 1]
        n_frames = s_stft.shape[-1]
        frame_mask = _time_mask(lengths, n_frames, c.upsample_factor, 1, dt)
        s_stft = _mask(s_stft, frame_mask)

        mask = _time_mask(lengths, T, 1, 0, dt)
        x = _mask(self.conv_pre(_mask(mel, mask)), mask)
        n_up = len(self.ups)
        n_k = len(c.resblock_kernel_sizes)
        scale = 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            scale *= c.upsample_rates[i]
            extra = 0
            if i == n_up - 1:
                # Reference quirk: a 1-step left reflection pad so the last stage has
                # 120 T + 1 steps, one per source STFT frame.
                x = F.pad(x, (1, 0), mode="reflect")
                extra = 1
            mask = _time_mask(lengths, x.shape[-1], scale, extra, dt)
            x = _mask(x, mask)
            si = _mask(self.source_downs[i](s_stft), mask)
            x = x + self.source_resblocks[i](si, mask)
            xs = None
            for j in range(n_k):
                r = self.resblocks[i * n_k + j](x, mask)
                xs = r if xs is None else xs + r
            x = xs / n_k
        x = self.conv_post(F.leaky_relu(x, c.post_lrelu_slope))  # [B, 18, 120 T + 1]
        # magnitude = exp(x[:, :9]) clipped at 1e2, phase = sin(x[:, 9:]) (sin of a phase: redundant,
        # but it is what was trained), inverse STFT in fp32 and the clamp: one fused op (kernels/istft_op.py).
        # A padded batch's frame mask is passed as valid frame counts (torch.istft's envelope would
        # otherwise include a shorter request's padding frames).
        n_valid = None if lengths is None else lengths.to(x.device) * c.upsample_factor + 1
        wav = self._istft_op.get(x.device)(x, self.stft_window, c.n_fft, c.hop, c.audio_limit, n_valid)
        if lengths is not None:
            wav = wav * _time_mask(lengths, wav.shape[-1], c.samples_per_frame, 0, dt)[:, 0]
        return wav

    def forward(self, mel: torch.Tensor, lengths: Optional[torch.Tensor] = None, *, noise_free: bool = False,
                generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None) -> torch.Tensor:
        """mel ``[B, 80, T]`` (log-mel, 50 frames/s), optional ``lengths [B]`` in mel frames ->
        waveform ``[B, 480 T]``; samples past ``480 * lengths[b]`` are zero. ``generator``: one,
        or one per row (each row then draws its source noise as it would alone)."""
        if lengths is not None:
            if lengths.device.type == "cpu" and bool((lengths == mel.shape[-1]).all()):
                lengths = None  # nothing is padded: skip the masks (known on the host, so no sync)
            else:
                lengths = lengths.to(device=mel.device, dtype=torch.long)
        mask = _time_mask(lengths, mel.shape[-1], 1, 0, mel.dtype)
        f0 = self.f0_predictor(mel, mask)  # [B, T]
        per_row = generator is not None and not isinstance(generator, torch.Generator)
        n_samples = (lengths.cpu() * self.config.samples_per_frame).tolist() if per_row and lengths is not None \
            else None
        s = self.excitation(f0, noise_free=noise_free, generator=generator, lengths=n_samples)  # [B, 1, 480 T]
        return self.decode(mel, s, lengths)



# --------------------------------------------------------------------------- streaming source


def continue_excitation(hift: HiFTGenerator, f0: torch.Tensor, cycles: Optional[torch.Tensor] = None, *,
                        noise_free: bool = False, generator: Optional[torch.Generator] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The next piece of one NSF excitation: F0 ``[B, T]`` at mel rate -> (source ``[B, 1, 480 T]``,
    cycles ``[B, H, 1]``).

    ``SineSource`` starts every call at phase 0 with fresh random harmonic phases; a stream cut
    into pieces would then restart each harmonic at every cut. Here ``cycles`` carries where each
    harmonic's phase ended (in cycles, random initial phase included, in [0, 1)) from the piece
    before; None starts a stream and draws the initial phases. Draws follow ``SineSource``'s order
    (``rand`` phases once, at the start; ``randn`` noise for each piece's own samples), so a stream
    of one piece equals ``HiFTGenerator.excitation`` with an equally seeded generator, and the
    pieces of a longer stream join into one continuous excitation. Math as ``SineSource.forward``:
    theta_k = 2 pi ((cycles_k + cumsum(k f0 / sr)) mod 1).
    """
    c = hift.config
    src = hift.m_source
    B = f0.shape[0]
    H = c.nb_harmonics + 1
    f0_up = F.interpolate(f0[:, None], scale_factor=float(c.samples_per_frame), mode="nearest").float()
    # Draws happen on the generator's device (then move), so a CPU generator works for a GPU model.
    draw_dev = generator.device if generator is not None else f0.device
    if cycles is None:
        cycles = torch.zeros(B, H, 1, device=f0.device, dtype=torch.float32)
        if not noise_free:
            u = torch.rand((B, H, 1), generator=generator, device=draw_dev, dtype=torch.float32).to(f0.device)
            cycles = u - 0.5  # phase -pi + 2 pi u, in cycles
            cycles[:, 0, :] = 0
    harmonics = torch.arange(1, H + 1, device=f0.device, dtype=torch.float32)[None, :, None]
    f_mat = f0_up * harmonics / c.sampling_rate  # [B, H, N] cycles per sample
    acc = torch.cumsum(f_mat, dim=-1)
    # Phase of sample n: the carried cycles plus the cumulative sum up to and including n, as
    # SineSource (whose first sample already has f0/sr of phase).
    sines = c.nsf_alpha * torch.sin(2 * math.pi * ((acc + cycles) % 1))
    uv = (f0_up > c.nsf_voiced_threshold).to(torch.float32)  # [B, 1, N]
    e = sines * uv
    if not noise_free:
        noise_amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
        e = e + noise_amp * torch.randn(sines.shape, generator=generator, device=draw_dev,
                                        dtype=torch.float32).to(f0.device)
    w = src.l_linear.weight.float()
    s = torch.tanh(torch.einsum("bhn,oh->bon", e, w) + src.l_linear.bias.float()[None, :, None])
    return s.to(src.l_linear.weight.dtype), (cycles + acc[..., -1:]) % 1


__all__ = ["HiFTConfig", "HiFTGenerator", "F0Predictor", "SineSource", "ResBlock", "Snake",
           "fold_weight_norm", "hann_window", "trim_fade", "continue_excitation", "S3GEN_SR"]
