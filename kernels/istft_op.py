"""HiFT's head: conv_post output -> waveform, in one launch (magnitude/phase, iSTFT, clamp): the
Triton launcher ``istft_triton`` and the plain-torch ``istft_ref`` (the dispatched op is
``chatterbox_rt.kernels.istft``).

``runtime/models/s3gen/hift.py`` ``HiFTGenerator.decode``/``_istft`` (reference chatterbox-tts
0.1.7 ``hifigan.HiFTGenerator._istft``, from iSTFTNet, arXiv 2203.02395), for
``spec [B, n_fft + 2, F]`` with K = n_fft/2 + 1 bins, window w of length N = n_fft, hop H:

    mag_k[f] = min(exp(spec[k, f]), 100)          phase_k[f] = sin(spec[K + k, f])
    X_k[f]   = mag_k[f] * (cos(phase_k[f]) + i sin(phase_k[f]))
    x_f[n]   = 1/N sum_k c_k (Re X_k[f] cos(2 pi k n / N) - Im X_k[f] sin(2 pi k n / N))
               (irfft: c_0 = c_{N/2} = 1 and their imaginary parts ignored, c_k = 2 otherwise)
    y[u]     = sum_f w[u - H f] x_f[u - H f]         env[u] = sum_f w[u - H f]^2
    wav[t]   = clamp(y[t + N/2] / env[t + N/2], -0.99, 0.99),   t < H (F - 1)

which is ``torch.istft(X, N, H, N, window=w, center=True)`` (output length N + H (F - 1) - 2 (N/2)
with no ``length``) followed by ``clamp``. With ``n_frames [B]`` only frames f < n_frames[b] enter
y and env: the model's padded-batch path, where ``frame_mask`` holds ``lengths * 120 + 1`` ones.

The kernel: one program per (block of hop-long output segments, batch row). Output sample
u = H j + m lies in frames f = j - r at offset n = m + H r for r < ceil(N / H), so for each r the
program loads the K bins of frames j - r once per segment (not once per sample), forms X in fp32,
and does the length-K x H slice of the inverse DFT as a small outer-product sum against a
precomputed fp32 table of c_k/N cos and -c_k/N sin (``_twiddles``, cached per device).

NOTE: torch.istft raises when the envelope is <= 1e-11 anywhere; the kernel (like the model's
masked path) writes 0 there instead. With a Hann window and H <= N/2 that only happens past the
last valid frame of a shorter request.
NOTE: samples past ``480 * lengths[b]`` but before the end of the last valid frame are nonzero,
as in ``_istft``; ``decode`` zeroes them afterwards with the sample mask, outside this op.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ._common import check_triton_device
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the op is optional: models fall back to istft_ref
    triton = None
    tl = None
    HAS_TRITON = False

MAGNITUDE_MAX = 1e2  # HiFTConfig.magnitude_max
AUDIO_LIMIT = 0.99  # HiFTConfig.audio_limit
ENV_EPS = 1e-11  # torch.istft's "window overlap add min" threshold
_BLOCK_SEG = 64  # hop-long output segments per program


def istft_ref(spec: torch.Tensor, window: torch.Tensor, n_fft: int = 16, hop: int = 4, audio_limit: float = AUDIO_LIMIT,
              n_frames: Optional[torch.Tensor] = None, upcast: bool = False) -> torch.Tensor:
    """The model's ops from ``conv_post``'s output to the clamp (``decode`` + ``_istft``), in torch.

    ``n_frames [B]``: valid frames per row; the masked path of ``_istft`` with
    ``frame_mask[b, 0, f] = f < n_frames[b]``. ``upcast``: take spec to fp32 first.

    An empty result (one frame, no frames, or no rows) is an fp32 ``[B, hop (F - 1)]`` (``[B, 0]``
    for F <= 1) of zeros, as the kernels give: torch.istft and the FFT refuse such inputs."""
    n_fr = spec.shape[-1]
    L_out = max(n_fft + hop * (n_fr - 1) - 2 * (n_fft // 2), 0)
    if spec.shape[0] == 0 or L_out == 0:
        return torch.zeros(spec.shape[0], L_out, dtype=torch.float32, device=spec.device)
    if upcast:
        spec = spec.float()
    n_freq = n_fft // 2 + 1
    magnitude = torch.exp(spec[:, :n_freq])
    phase = torch.sin(spec[:, n_freq:])
    # From here on: HiFTGenerator._istft, op for op.
    magnitude = torch.clip(magnitude.float(), max=MAGNITUDE_MAX)
    phase = phase.float()
    spec_c = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))  # [B, n_freq, F]
    window = window.float()
    if n_frames is None:
        wav = torch.istft(spec_c, n_fft, hop, n_fft, window=window)
    else:
        frame_mask = (torch.arange(n_fr, device=spec.device)[None, :] < n_frames.long()[:, None]).float()[:, None, :]
        frames = torch.fft.irfft(spec_c * frame_mask, n=n_fft, dim=1) * window[None, :, None]  # [B, n_fft, F]
        total = n_fft + hop * (n_fr - 1)
        y = F.fold(frames, output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
        env = F.conv_transpose1d(frame_mask, (window * window)[None, None, :], stride=hop)[:, 0]
        half = n_fft // 2
        y, env = y[:, half: total - half], env[:, half: total - half]
        wav = torch.where(env > ENV_EPS, y / env.clamp_min(ENV_EPS), torch.zeros_like(y))
    return torch.clamp(wav, -audio_limit, audio_limit)


if HAS_TRITON:

    @triton.jit
    def _istft_kernel(
        # pointers
        spec_ptr, window_ptr, twiddle_ptr, n_frames_ptr, out_ptr,
        # spec strides (any layout: conv_post's output is read in place)
        stride_sb, stride_sc, stride_sf,
        # sizes
        n_fr, L_out,
        # scalars
        mag_max, audio_limit, env_eps,
        # meta-parameters
        N_FFT: tl.constexpr, HOP: tl.constexpr, HOP_P: tl.constexpr, N_OVERLAP: tl.constexpr,
        SEG0: tl.constexpr, HAS_N_FRAMES: tl.constexpr, BLOCK_SEG: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        N_FREQ: tl.constexpr = N_FFT // 2 + 1
        HALF: tl.constexpr = N_FFT // 2

        j = SEG0 + pid * BLOCK_SEG + tl.arange(0, BLOCK_SEG)  # hop-long segment index  [BLOCK_SEG]
        m = tl.arange(0, HOP_P)  # sample within the segment  [HOP_P]
        t = j[:, None] * HOP + m[None, :] - HALF  # output sample (after the centre trim)
        out_mask = (m[None, :] < HOP) & (t >= 0) & (t < L_out)

        n_valid = n_fr
        if HAS_N_FRAMES:
            n_valid = tl.minimum(tl.load(n_frames_ptr + b), n_fr).to(tl.int32)

        spec_row = spec_ptr + b.to(tl.int64) * stride_sb
        y = tl.zeros((BLOCK_SEG, HOP_P), dtype=tl.float32)
        env = tl.zeros((BLOCK_SEG, HOP_P), dtype=tl.float32)
        # Runtime loops, not static_range: unrolled, the 4 x 9 bodies inline 100+ libdevice sin/cos
        # (a 1 MB PTX); the loop keeps 3, and the work is tiny next to the memory traffic anyway.
        for r in range(N_OVERLAP):
            f = j - r  # the frame holding sample H j + m at offset n = m + H r
            n = m + HOP * r
            f_ok = (f >= 0) & (f < n_valid)
            n_ok = (m < HOP) & (n < N_FFT)
            w = tl.load(window_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            frame = tl.zeros((BLOCK_SEG, HOP_P), dtype=tl.float32)
            f_offs = f.to(tl.int64) * stride_sf
            for k in range(N_FREQ):
                lm = tl.load(spec_row + k * stride_sc + f_offs, mask=f_ok, other=0.0).to(tl.float32)
                lp = tl.load(spec_row + (N_FREQ + k) * stride_sc + f_offs, mask=f_ok, other=0.0).to(tl.float32)
                mag = tl.minimum(tl.exp(lm), mag_max, propagate_nan=tl.PropagateNan.ALL)  # torch.clip keeps NaN
                phase = tl.sin(lp)
                tw_cos = tl.load(twiddle_ptr + k * N_FFT + n, mask=n_ok, other=0.0)
                tw_sin = tl.load(twiddle_ptr + (N_FREQ + k) * N_FFT + n, mask=n_ok, other=0.0)
                frame += (mag * tl.cos(phase))[:, None] * tw_cos[None, :]
                frame += (mag * tl.sin(phase))[:, None] * tw_sin[None, :]
            fw = tl.where(f_ok[:, None], w[None, :], 0.0)
            y += frame * fw
            env += fw * fw
        wav = tl.where(env > env_eps, y / tl.maximum(env, env_eps), 0.0)
        wav = tl.minimum(tl.maximum(wav, -audio_limit), audio_limit)
        tl.store(out_ptr + b.to(tl.int64) * L_out + t, wav, mask=out_mask)


@functools.lru_cache(maxsize=None)
def _twiddles(n_fft: int, device: torch.device) -> torch.Tensor:
    """irfft as a product: ``[2, n_fft/2 + 1, n_fft]`` fp32 rows c_k/N cos(2 pi k n/N) then
    -c_k/N sin(2 pi k n/N), built in float64 once per (n_fft, device).

    NOTE: built (a host-to-device copy) on the first call per device; make that call before
    capturing a CUDA graph."""
    n_freq = n_fft // 2 + 1
    k = torch.arange(n_freq, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * ((k * n) % n_fft) / n_fft
    c = torch.full((n_freq, 1), 2.0 / n_fft, dtype=torch.float64)
    c[0] = c[-1] = 1.0 / n_fft  # DC and Nyquist are counted once ...
    sin = -c * torch.sin(ang)
    sin[0] = sin[-1] = 0.0  # ... and their imaginary parts ignored, as irfft does
    return torch.stack([c * torch.cos(ang), sin]).float().to(device)


def _check_device(*tensors: torch.Tensor) -> None:
    check_triton_device("istft", *tensors)


def istft_triton(spec: torch.Tensor, window: torch.Tensor, n_fft: int = 16, hop: int = 4,
                 audio_limit: float = AUDIO_LIMIT, n_frames: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton launcher: conv_post output ``spec [B, n_fft + 2, F]`` (log-magnitudes then phase
    logits) -> clamped waveform ``[B, hop * (F - 1)]`` fp32 (``[B, 0]`` for F <= 1), equal to
    ``istft_ref``. ``chatterbox_rt.kernels.istft`` is the dispatched op that runs anywhere.

    ``window [n_fft]``; ``n_frames [B]`` (integer, optional): valid frames per row of a padded batch."""
    if not HAS_TRITON:
        raise RuntimeError("istft: the Triton kernel needs triton (pip install triton); use istft_ref or "
                           "the dispatched chatterbox_rt.kernels.istft instead")
    if n_fft <= 0 or n_fft % 2:
        raise ValueError(f"istft: n_fft must be even and positive, got {n_fft}")
    if not 0 < hop <= n_fft:
        raise ValueError(f"istft: hop must be in [1, n_fft={n_fft}], got {hop}")
    if spec.dim() != 3:
        raise ValueError(f"istft: spec must be [B, n_fft + 2, F], got shape {tuple(spec.shape)}")
    B, C, n_fr = spec.shape
    if C != n_fft + 2:
        raise ValueError(f"istft: spec must have n_fft + 2 = {n_fft + 2} channels (magnitudes then phases), got {C}")
    if not spec.dtype.is_floating_point:
        raise ValueError(f"istft: spec must be a float tensor, got {spec.dtype}")
    if window.shape != (n_fft,):
        raise ValueError(f"istft: window must be [n_fft] = [{n_fft}], got {tuple(window.shape)}")
    tensors = [spec, window]
    if n_frames is not None:
        if n_frames.shape != (B,) or n_frames.dtype.is_floating_point or n_frames.dtype == torch.bool:
            raise ValueError(f"istft: n_frames must be an integer tensor [B] = [{B}], got "
                             f"{tuple(n_frames.shape)} {n_frames.dtype}")
        tensors.append(n_frames)
    _check_device(*tensors)

    L_out = max(n_fft + hop * (n_fr - 1) - 2 * (n_fft // 2), 0)
    out = torch.empty(B, L_out, dtype=torch.float32, device=spec.device)
    if B == 0 or L_out == 0:
        return out
    window = window.contiguous()
    half = n_fft // 2
    seg0 = half // hop
    n_seg = (half + L_out - 1) // hop - seg0 + 1
    block = min(_BLOCK_SEG, triton.next_power_of_2(n_seg))
    grid = (triton.cdiv(n_seg, block), B)
    _istft_kernel[grid](
        spec, window, _twiddles(n_fft, spec.device), n_frames if n_frames is not None else out, out,
        spec.stride(0), spec.stride(1), spec.stride(2),
        n_fr, L_out,
        MAGNITUDE_MAX, float(audio_limit), ENV_EPS,
        N_FFT=n_fft, HOP=hop, HOP_P=triton.next_power_of_2(hop), N_OVERLAP=triton.cdiv(n_fft, hop),
        SEG0=seg0, HAS_N_FRAMES=n_frames is not None, BLOCK_SEG=block,
        num_warps=4,
    )
    return out


__all__ = ["istft_triton", "istft_ref", "HAS_TRITON", "MAGNITUDE_MAX", "AUDIO_LIMIT"]
