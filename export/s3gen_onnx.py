"""S3Gen's ONNX graphs: the flow encoder, the CFM estimator, the whole CFM loop and HiFT.

Six graphs, each declared once as a ``GraphSpec`` (fp32, dynamic batch and length)::

    s3gen_flow_encoder    tokens [B, T] int64, token_lens [B] int64 -> mu [B, 80, 2T], mask [B, 1, 2T]
    s3gen_cfm_estimator   x, mask, mu, t [B], spks [B, 80], cond (, r [B] for meanflow) -> v [B, 80, L]
    s3gen_cfm_loop<n>     noise, mask, mu, spks, cond -> mel [B, 80, L]  (n Euler steps, CFG inside)
    s3gen_hift            mel [B, 80, M], mel_lens [B] int64, source_phase [B, 9, 1],
                          source_noise [B, 9, M, 480] -> wav [B, 480 M]
    s3gen_hift_f0         mel, mel_lens -> f0 [B, M]                    (streaming: HiFT in two pieces,
    s3gen_hift_decode     mel, mel_lens, source [B, M, 480] -> wav       the excitation built between them)

What stays in torch (``ort_s3gen.OrtS3Gen``): joining each request's prompt and new tokens
(``concat_prompt_tokens``), the speaker projection (an 80 x 192 affine, kept in ``extras``), the
prompt-mel ``cond``, every random draw (the CFM's x0 and HiFT's source phases and noise, drawn
from the request's generator exactly as the torch path draws them, so both backends give the same
audio for the same seed) and ``trim_fade``.

Padded batches: every graph takes the per-request lengths (``token_lens``, ``mask``,
``mel_lens``) and masks exactly where the torch modules mask when given lengths; an unpadded batch
passes full lengths (an all-ones mask), which multiplies by one and so equals torch's unmasked
fast path.

Two pieces of HiFT have no ONNX export as torch writes them, and are re-expressed here:

* The iSTFT (``torch.istft``, complex): a ConvTranspose1d whose kernel is the inverse real DFT
  times the window (``c_k / N cos(2 pi k n / N)`` and ``-c_k / N sin(...)``, ``c_0 = c_{N/2} = 1``,
  else 2), the window envelope another ConvTranspose1d of the frame mask with ``w^2``, then the
  centre trim and ``y / env`` (``exportable_istft``; matches ``torch.istft`` to ~3e-7).
* The source STFT (``torch.stft``, complex, centre reflect padding per request): a gather that
  rebuilds each request's reflect padding (as ``HiFTGenerator._source_stft`` does) and a strided
  Conv1d with the windowed forward DFT as its kernel (``exportable_stft``).

and the NSF phase: torch's CPU ``cumsum`` over the 480x upsampled F0 accumulates in float64 and
rounds once to float32; a float32 ``CumSum`` over ~10^5 samples would drift by whole cycles. The
graph uses that F0 is constant within a mel frame and sums in fixed point: q = int64(f 2^40) per
frame (exact for f >= 2^-16 cycles/sample, i.e. everything voiced), the phase of sample i of frame
j = 480 sum_{k<j} q_k + (i + 1) q_j, rounded once to float32 and scaled by 2^-40: torch's value
(bit-equal on every case tried). NOTE: ORT's and torch's F0 still differ by float rounding, and
the phase integrates that difference over an utterance. NOTE: the int64 ``CumSum``/``Mul`` need
int64 support in the backend (onnxruntime has it; check TensorRT's before building an engine).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.masks import length_mask
from ..models.s3gen.cfm import MEL_BINS, time_span
from ._onnx import DEFAULT_OPSET, ExportError, check_graph, export_graph, save_model, save_shared
from .spec import ComponentExport, Dim, GraphCheck, GraphSpec, T

log = logging.getLogger(__name__)

# Profile sizes. Tokens: the encoder's relative-position table covers 5000 frames (2500 tokens);
# batches: the engine's MAX_S3GEN_BATCH, doubled for the CFG estimator.
MAX_BATCH = 16
MAX_TOKENS = 2500
MAX_FRAMES = 2 * MAX_TOKENS
MAX_MEL = 4000
SOURCE_HARMONICS = 9  # HiFTConfig.nb_harmonics + 1
SAMPLES_PER_FRAME = 480  # HiFTConfig.samples_per_frame
ENV_EPS = 1e-11  # torch.istft's window-envelope threshold
PHASE_SCALE = float(2 ** 40)  # the NSF phase's fixed point: exact for F0 * k / sr >= 2^-16, no int64 overflow

FLOW_ENCODER = GraphSpec(
    name="s3gen_flow_encoder", component="flow",
    inputs=[T("tokens", "int64", "batch", "tokens"), T("token_lens", "int64", "batch")],
    outputs=[T("mu", "float32", "batch", MEL_BINS, "frames"), T("mask", "float32", "batch", 1, "frames")],
    dims={"batch": Dim(1, 1, MAX_BATCH), "tokens": Dim(1, 300, MAX_TOKENS)},
    doc="Speech tokens (each request's prompt tokens then its new ones, right-padded) -> the CFM's mu "
        "and frame mask at 2x the token rate (frames = 2 tokens).")


def _cfm_inputs(meanflow: bool, first: str) -> list:
    ins = [T(first, "float32", "batch", MEL_BINS, "frames"), T("mask", "float32", "batch", 1, "frames"),
           T("mu", "float32", "batch", MEL_BINS, "frames")]
    if first == "x":
        ins.append(T("t", "float32", "batch"))
    ins += [T("spks", "float32", "batch", MEL_BINS), T("cond", "float32", "batch", MEL_BINS, "frames")]
    if first == "x" and meanflow:
        ins.append(T("r", "float32", "batch"))
    return ins


CFM_ESTIMATOR = GraphSpec(
    name="s3gen_cfm_estimator", component="flow", inputs=_cfm_inputs(False, "x"),
    outputs=[T("v", "float32", "batch", MEL_BINS, "frames")],
    dims={"batch": Dim(1, 2, 2 * MAX_BATCH), "frames": Dim(2, 600, MAX_FRAMES)},
    doc="The CFM's U-Net velocity estimator; a CFG step runs it on 2B rows (conditional, then "
        "unconditional with mu = spks = cond = 0).")
CFM_ESTIMATOR_MEANFLOW = GraphSpec(
    name="s3gen_cfm_estimator", component="flow", inputs=_cfm_inputs(True, "x"),
    outputs=[T("v", "float32", "batch", MEL_BINS, "frames")],
    dims={"batch": Dim(1, 1, MAX_BATCH), "frames": Dim(2, 600, MAX_FRAMES)},
    doc="The meanflow CFM's U-Net estimator (Turbo/Nano): also embeds the end time r; no CFG.")

HIFT = GraphSpec(
    name="s3gen_hift", component="hift",
    inputs=[T("mel", "float32", "batch", MEL_BINS, "mel"), T("mel_lens", "int64", "batch"),
            T("source_phase", "float32", "batch", SOURCE_HARMONICS, 1),
            T("source_noise", "float32", "batch", SOURCE_HARMONICS, "mel", SAMPLES_PER_FRAME)],
    outputs=[T("wav", "float32", "batch", "samples")],
    dims={"batch": Dim(1, 1, MAX_BATCH), "mel": Dim(1, 300, MAX_MEL)},
    doc="HiFT vocoder without its random draws: source_phase = the harmonics' initial phases "
        "(-pi + 2 pi U(0, 1), the first harmonic 0), source_noise = the standard normal draw "
        "[B, 9, 480 M] viewed as [B, 9, M, 480] (zeros for noise_free); samples past 480 mel_lens "
        "are zero. Trim-fade is not applied.")


# HiFT in two pieces for streaming (``engine.stream.S3GenStream``): a stream builds each piece's
# excitation itself (the previous piece's source over the join, then continued from its NSF phase,
# ``hift.continue_excitation``), so it needs the F0 and the filter apart. Their weights are
# ``s3gen_hift``'s, stored once in its data file.
HIFT_F0 = GraphSpec(
    name="s3gen_hift_f0", component="hift",
    inputs=[T("mel", "float32", "batch", MEL_BINS, "mel"), T("mel_lens", "int64", "batch")],
    outputs=[T("f0", "float32", "batch", "mel")],
    dims={"batch": Dim(1, 1, MAX_BATCH), "mel": Dim(1, 300, MAX_MEL)},
    doc="HiFT's F0 predictor: mel -> F0 in Hz per mel frame (frames past mel_lens are masked at the input, "
        "as HiFTGenerator masks them).")
HIFT_DECODE = GraphSpec(
    name="s3gen_hift_decode", component="hift",
    inputs=[T("mel", "float32", "batch", MEL_BINS, "mel"), T("mel_lens", "int64", "batch"),
            T("source", "float32", "batch", "mel", SAMPLES_PER_FRAME)],
    outputs=[T("wav", "float32", "batch", "samples")],
    dims={"batch": Dim(1, 1, MAX_BATCH), "mel": Dim(1, 300, MAX_MEL)},
    doc="HiFT's filter (HiFTGenerator.decode): mel + the NSF excitation [B, 1, 480 M] viewed as [B, M, 480] "
        "-> waveform [B, 480 M], zero past 480 mel_lens. Trim-fade is not applied.")
STREAM_GRAPHS = {"hift_f0": HIFT_F0.file, "hift_decode": HIFT_DECODE.file}


def cfm_estimator_spec(meanflow: bool) -> GraphSpec:
    return CFM_ESTIMATOR_MEANFLOW if meanflow else CFM_ESTIMATOR


def cfm_loop_spec(n_steps: int, meanflow: bool) -> GraphSpec:
    """The whole-loop graph for ``n_steps`` (the steps are unrolled: one graph per step count)."""
    how = "plain Euler over (t, r) on the linear grid" if meanflow else \
        "Euler with CFG (one 2B-row estimator call per step) on the cosine grid"
    return GraphSpec(
        name=f"s3gen_cfm_loop{n_steps}", component="flow", inputs=_cfm_inputs(meanflow, "noise"),
        outputs=[T("mel", "float32", "batch", MEL_BINS, "frames")],
        dims={"batch": Dim(1, 1, MAX_BATCH), "frames": Dim(2, 600, MAX_FRAMES)},
        doc=f"All {n_steps} CFM steps ({how}) from the initial noise (masked inside) to the mel over "
            "the full length (prompt frames first).")


# ------------------------------------------------------------------------------ kernels for export


@contextlib.contextmanager
def native_kernels():
    """Route the models' dispatched ops (Snake, ...) to their plain-torch forms while tracing: the
    C++/Triton kernels have no ONNX export. Process-wide while it lasts (export is a one-off)."""
    from ..kernels import dispatch

    old = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = "native"
    dispatch.reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = old
        dispatch.reset()


# ------------------------------------------------------------------------------ STFT / iSTFT


def _dft_kernels(window: Tensor, n_fft: int) -> tuple[Tensor, Tensor]:
    """(forward ``[2K, 1, N]``: w[n] cos(2 pi k n / N) then -w[n] sin(...); inverse ``[2K, 1, N]``:
    the irfft rows c_k/N cos and -c_k/N sin (DC and Nyquist counted once, their imaginary parts
    ignored) times w[n]), built in float64 and rounded once to fp32."""
    K = n_fft // 2 + 1
    k = torch.arange(K, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * ((k * n) % n_fft) / n_fft
    w = window.double()[None, :]
    fwd = torch.cat([w * torch.cos(ang), -w * torch.sin(ang)])
    c = torch.full((K, 1), 2.0 / n_fft, dtype=torch.float64)
    c[0] = c[-1] = 1.0 / n_fft
    inv_sin = -c * torch.sin(ang)
    inv_sin[0] = inv_sin[-1] = 0.0
    inv = torch.cat([c * torch.cos(ang), inv_sin]) * w
    return fwd.float()[:, None, :], inv.float()[:, None, :]


def exportable_stft(x: Tensor, window: Tensor, n_fft: int, hop: int, lengths: Optional[Tensor] = None) -> Tensor:
    """``torch.stft(x, n_fft, hop, window=window, center=True)`` (reflect padding) of ``x [B, N]``
    as ``[B, 2 (n_fft/2 + 1), N / hop + 1]`` (real bins, then imaginary), with ONNX-exportable ops.

    ``lengths [B]`` (samples): reflect each row at its own end, as ``HiFTGenerator._source_stft``
    does for a padded batch (default: all N)."""
    half = n_fft // 2
    N = x.shape[-1]
    n = torch.arange(-half, N + half, device=x.device)[None, :]  # [1, N + n_fft]
    end = torch.full_like(n[:, :1], N) if lengths is None else lengths.long()[:, None]
    idx = n.abs()
    idx = torch.where(idx >= end, 2 * (end - 1) - idx, idx).clamp(0, N - 1)
    padded = torch.gather(x, 1, idx.expand(x.shape[0], -1))  # [B, N + n_fft]
    fwd, _ = _dft_kernels(window, n_fft)
    return F.conv1d(padded[:, None], fwd.to(x.device, x.dtype), stride=hop)


def exportable_istft(spec: Tensor, window: Tensor, n_fft: int, hop: int, frame_mask: Optional[Tensor] = None) -> Tensor:
    """``torch.istft(X, n_fft, hop, window=window, center=True)`` for ``spec [B, 2K, F]`` = [Re X; Im X]
    (K = n_fft/2 + 1) -> ``[B, hop (F - 1)]``, with ONNX-exportable ops (two ConvTranspose1d).

    ``frame_mask [B, 1, F]``: only frames with 1 enter the overlap-add and its window envelope (a
    padded batch's rows, as ``istft_ref(n_frames=...)``); where the envelope is ~0 the output is 0
    (torch.istft raises there)."""
    _, inv = _dft_kernels(window, n_fft)
    inv = inv.to(spec.device, spec.dtype)
    if frame_mask is None:
        frame_mask = torch.ones_like(spec[:, :1])
    y = F.conv_transpose1d(spec * frame_mask, inv, stride=hop)[:, 0]  # [B, n_fft + hop (F - 1)]
    w2 = (window.to(spec.device, spec.dtype) ** 2)[None, None, :]
    env = F.conv_transpose1d(frame_mask, w2, stride=hop)[:, 0]
    half = n_fft // 2
    total = y.shape[-1]
    y, env = y[:, half: total - half], env[:, half: total - half]
    return torch.where(env > ENV_EPS, y / env.clamp_min(ENV_EPS), torch.zeros_like(y))


# ------------------------------------------------------------------------------ graph modules


class FlowEncoderGraph(nn.Module):
    """``FlowFront.encode_tokens(tokens, token_lens, finalize=True)``."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, tokens: Tensor, token_lens: Tensor):
        return self.flow.encode_tokens(tokens, token_lens, finalize=True)


class EstimatorGraph(nn.Module):
    def __init__(self, estimator, meanflow: bool):
        super().__init__()
        self.estimator, self.meanflow = estimator, meanflow

    def forward(self, x, mask, mu, t, spks, cond, r=None):
        return self.estimator(x, mask, mu, t, spks, cond, r if self.meanflow else None)


class CfmLoopGraph(nn.Module):
    """``CausalCFM.forward`` (n_steps unrolled) from the unmasked noise, as ``S3Gen.flow_mel`` calls it:
    x0 = noise * mask; CFG rows [:B] conditional, [B:] with mu = spks = cond = 0;
    x <- x + dt ((1 + w) v[:B] - w v[B:]) (meanflow: x <- x + dt v(x, t, r), no CFG)."""

    def __init__(self, decoder, n_steps: int, meanflow: bool):
        super().__init__()
        cfg = decoder.config
        self.estimator, self.meanflow, self.n_steps = decoder.estimator, meanflow, n_steps
        self.cfg_rate = cfg.cfg_rate
        t_span = time_span(n_steps, "linear" if meanflow else cfg.t_scheduler)
        self.register_buffer("t_span", t_span, persistent=False)

    def forward(self, noise, mask, mu, spks, cond):
        ts = self.t_span.to(noise.device, noise.dtype)
        dts = ts[1:] - ts[:-1]  # the same float32 steps as the torch loop
        x = noise * mask
        if self.meanflow:
            for i in range(self.n_steps):
                v = self.estimator(x, mask, mu, ts[i: i + 1], spks, cond, ts[i + 1: i + 2])
                x = x + dts[i] * v
            return x
        B = x.shape[0]
        w = self.cfg_rate
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        for i in range(self.n_steps):
            v = self.estimator(torch.cat([x, x]), mask_in, mu_in, ts[i: i + 1], spks_in, cond_in)
            x = x + dts[i] * ((1.0 + w) * v[:B] - w * v[B:])
        return x


class _ExportableIstft:
    """Stands in for ``HiFTGenerator._istft_op`` (a ``DispatchedOp``): the same call, exportable."""

    @staticmethod
    def get(device):
        return _istft_head

    @staticmethod
    def backend(device):
        return "onnx"


def _istft_head(x: Tensor, window: Tensor, n_fft: int, hop: int, audio_limit: float,
                n_frames: Optional[Tensor] = None) -> Tensor:
    """``kernels.istft_op.istft_ref``'s math (magnitude/phase, iSTFT, clamp), exportable."""
    from ..kernels.istft_op import MAGNITUDE_MAX

    K = n_fft // 2 + 1
    x = x.float()
    mag = torch.clamp(torch.exp(x[:, :K]), max=MAGNITUDE_MAX)
    phase = torch.sin(x[:, K:])
    spec = torch.cat([mag * torch.cos(phase), mag * torch.sin(phase)], dim=1)
    frame_mask = None
    if n_frames is not None:
        frame_mask = length_mask(n_frames, x.shape[-1]).to(spec.dtype)[:, None, :]
    wav = exportable_istft(spec, window.float(), n_fft, hop, frame_mask)
    return torch.clamp(wav, -audio_limit, audio_limit)


class HiftGraph(nn.Module):
    """``HiFTGenerator.forward(mel, lengths)`` with the source's random draws as inputs.

    The filter is ``HiFTGenerator.decode`` itself, run on this module (which holds the generator's
    layers under the same names) with the exportable source STFT and iSTFT in place of
    ``_source_stft`` and the dispatched ``istft``."""

    def __init__(self, hift):
        super().__init__()
        self.config = hift.config
        for name in ("f0_predictor", "m_source", "conv_pre", "ups", "source_downs", "source_resblocks",
                     "resblocks", "conv_post"):
            setattr(self, name, getattr(hift, name))
        self.register_buffer("stft_window", hift.stft_window.float().clone(), persistent=False)
        self._istft_op = _ExportableIstft()

    def _source_stft(self, s: Tensor, lengths: Tensor) -> Tensor:
        c = self.config
        spec = exportable_stft(s.squeeze(1).float(), self.stft_window, c.n_fft, c.hop,
                               lengths * c.samples_per_frame)
        return spec.to(s.dtype)

    def source(self, f0: Tensor, phase: Tensor, noise: Tensor) -> Tensor:
        """``SineSource.forward`` on mel-rate F0 ``[B, M]`` with its draws given: phase ``[B, H, 1]``,
        noise ``[B, H, M, spf]`` -> excitation ``[B, 1, spf M]``."""
        c = self.config
        H, spf = c.nb_harmonics + 1, c.samples_per_frame
        B, M = f0.shape
        f0 = f0.float()[:, None, :]  # [B, 1, M]
        harmonics = torch.arange(1, H + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        f = f0 * harmonics / c.sampling_rate  # [B, H, M] cycles per sample, constant in a frame
        # Exact fixed-point phase (see the module docstring): q = f 2^40 is an integer for every f above
        # 2^-16 cycles/sample, so the running sum is exact in int64 and one rounding to float32 gives
        # torch's float64-accumulated cumsum rounded to float32.
        q = (f * PHASE_SCALE).to(torch.int64)
        before = (torch.cumsum(q, dim=-1) - q) * spf  # [B, H, M] sum over the earlier frames' samples
        i = torch.arange(1, spf + 1, device=f0.device, dtype=torch.int64)  # the cumsum includes sample n
        acc = before[..., None] + q[..., None] * i  # [B, H, M, spf]
        cyc = acc.to(f0.dtype) * (1.0 / PHASE_SCALE)
        theta = 2 * math.pi * (cyc - torch.floor(cyc))
        sines = c.nsf_alpha * torch.sin(theta + phase[..., None])
        uv = (f0 > c.nsf_voiced_threshold).to(f0.dtype)[..., None]  # [B, 1, M, 1]
        noise_amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
        e = (sines * uv + noise_amp * noise).reshape(B, H, M * spf)
        lin = self.m_source.l_linear
        w = lin.weight.to(e.dtype)
        s = torch.tanh(torch.einsum("bhn,oh->bon", e, w) + lin.bias.to(e.dtype)[None, :, None])
        return s.to(lin.weight.dtype)

    def forward(self, mel: Tensor, mel_lens: Tensor, source_phase: Tensor, source_noise: Tensor) -> Tensor:
        from ..models.s3gen.hift import HiFTGenerator

        mask = length_mask(mel_lens, mel.shape[-1]).to(mel.dtype)[:, None, :]
        f0 = self.f0_predictor(mel, mask)  # [B, M]
        s = self.source(f0, source_phase, source_noise)
        return HiFTGenerator.decode(self, mel, s, mel_lens)


class HiftF0Graph(nn.Module):
    """``HiFTGenerator.f0_predictor`` with the length mask built from ``mel_lens``."""

    def __init__(self, hift):
        super().__init__()
        self.f0_predictor = hift.f0_predictor

    def forward(self, mel: Tensor, mel_lens: Tensor) -> Tensor:
        mask = length_mask(mel_lens, mel.shape[-1]).to(mel.dtype)[:, None, :]
        return self.f0_predictor(mel, mask)


class HiftDecodeGraph(HiftGraph):
    """``HiFTGenerator.decode(mel, source, mel_lens)``: the filter of ``HiftGraph`` with the source given."""

    def forward(self, mel: Tensor, mel_lens: Tensor, source: Tensor) -> Tensor:  # noqa: D102
        from ..models.s3gen.hift import HiFTGenerator

        B, M = mel.shape[0], mel.shape[-1]
        return HiFTGenerator.decode(self, mel, source.reshape(B, 1, M * self.config.samples_per_frame), mel_lens)


# ------------------------------------------------------------------------------ the random draws


def draw_source_noise(batch: int, frames: int, *, harmonics: int = SOURCE_HARMONICS,
                      samples_per_frame: int = SAMPLES_PER_FRAME, noise_free: bool = False,
                      generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                      lengths: Optional[Sequence[int]] = None, device=None) -> tuple[Tensor, Tensor]:
    """HiFT's source draws as ``SineSource.forward`` makes them for a ``[B, 80, frames]`` mel ->
    (phase ``[B, H, 1]``, noise ``[B, H, frames, spf]``), the ``s3gen_hift`` graph's inputs.

    Same calls in the same order (``rand`` phases, then ``randn`` noise), on ``device`` (the torch
    model's device; default the generator's, else CPU). ``generator`` may be one per row, each
    row then drawing over its own ``lengths[b]`` mel frames (None: all), zeros past them."""
    B, H, N = batch, harmonics, frames * samples_per_frame
    per_row = generator is not None and not isinstance(generator, torch.Generator)
    if device is None:
        g0 = generator if isinstance(generator, torch.Generator) else (list(generator)[0] if per_row else None)
        device = g0.device if g0 is not None else torch.device("cpu")
    if noise_free:
        return (torch.zeros(B, H, 1, device=device), torch.zeros(B, H, frames, samples_per_frame, device=device))
    gens = list(generator) if per_row else None
    if per_row and len(gens) != B:
        raise ValueError(f"{len(gens)} generators for a batch of {B}")
    if per_row:
        u = torch.cat([torch.rand((1, H, 1), generator=g, device=device) for g in gens])
    else:
        u = torch.rand((B, H, 1), generator=generator, device=device)
    phase = -math.pi + u * (2 * math.pi)  # torch Uniform(-pi, pi).sample, as SineSource
    phase[:, 0, :] = 0
    if per_row:
        n_b = [N] * B if lengths is None else [int(n) * samples_per_frame for n in lengths]
        z = torch.zeros(B, H, N, device=device)
        for b, g in enumerate(gens):
            z[b, :, : n_b[b]] = torch.randn((1, H, n_b[b]), generator=g, device=device)[0]
    else:
        z = torch.randn((B, H, N), generator=generator, device=device)
    return phase, z.view(B, H, frames, samples_per_frame)


# ------------------------------------------------------------------------------ export


def dedupe_initializers(model) -> int:
    """Make initializers with equal content (dtype, dims, bytes) one: the encoder's two equal
    position tables, constants the exporter folds once per unrolled CFM step. Returns how many
    were dropped."""
    from onnx import numpy_helper  # noqa: F401  (the onnx package is present: the model came from it)

    first: dict = {}
    rename: dict = {}
    keep = []
    for t in model.graph.initializer:
        data = t.raw_data if t.HasField("raw_data") else t.SerializeToString()
        key = (t.data_type, tuple(t.dims), hashlib.sha1(data).hexdigest())
        if key in first:
            rename[t.name] = first[key]
        else:
            first[key] = t.name
            keep.append(t)
    if not rename:
        return 0
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)

    def fix(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            for a in node.attribute:
                if a.g is not None and a.HasField("g"):
                    fix(a.g)
                for g in a.graphs:
                    fix(g)

    fix(model.graph)
    return len(rename)


def _ids(shape, vocab, g):
    return torch.randint(0, vocab, shape, generator=g)


def _check_sizes(check_sizes) -> list:
    """[(batch, tokens, per-row token lengths)]: batch 1 and a padded batch 3 at odd lengths."""
    out = []
    for B, L in check_sizes or ((1, 7), (3, 11)):
        lens = [L] + [max(1, L - 3 * (b + 1) - (b % 2)) for b in range(B - 1)]
        out.append((B, L, lens))
    return out


def export_s3gen(s3gen, out_dir: Union[str, Path], *, opset: int = DEFAULT_OPSET, n_steps: Optional[int] = None,
                 check_sizes: Optional[Sequence[tuple]] = None, threads: Optional[int] = None) -> ComponentExport:
    """Write S3Gen's flow encoder, CFM estimator, CFM loop (``n_steps`` unrolled; default the
    decoder's) and HiFT graphs to ``out_dir``, check each against torch with onnxruntime, and
    return what the bundle writer needs.

    ``check_sizes``: (batch, tokens) pairs the checks run at (default (1, 7) and (3, 11); a batch
    above 1 is padded, each row shorter than the one before). The estimator and loop run at
    2 tokens + 1 frames (odd), HiFT at tokens + 2 mel frames."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if s3gen.dtype != torch.float32 or s3gen.mel2wav.conv_pre.weight.dtype != torch.float32:
        # The graphs are fp32 (as the torch path's phase and FFT math is): export an fp32 copy.
        log.info("s3gen runs in %s: exporting an fp32 copy", s3gen.dtype)
        s3gen = copy.deepcopy(s3gen).to_precision(s3gen.device, torch.float32)
    meanflow = bool(s3gen.meanflow)
    steps = int(n_steps or s3gen.default_steps)
    if steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {steps}")
    flow, hift = s3gen.flow, s3gen.mel2wav
    fcfg, dcfg, hcfg = flow.config, flow.decoder.config, hift.config
    if hcfg.nb_harmonics + 1 != SOURCE_HARMONICS or hcfg.samples_per_frame != SAMPLES_PER_FRAME:
        raise ExportError("the HiFT graph spec assumes 9 source harmonics and 480 samples per frame")
    sizes = _check_sizes(check_sizes)
    dev = s3gen.device
    est_spec, loop_spec = cfm_estimator_spec(meanflow), cfm_loop_spec(steps, meanflow)
    g = torch.Generator().manual_seed(0)
    graphs, timings = [], {}

    def record(spec, path, ref, cases, tol):
        res = check_graph(path, spec, ref, cases, tol=tol, threads=threads)
        log.info("%s: max relative error %.3g over %d cases", spec.name, res["max_rel_error"], res["cases"])
        graphs.append(GraphCheck(spec, res))

    # Inputs shared by the checks: real encoder outputs, so the estimator sees mu in its range.
    flow_cases, cfm_cases = [], []
    for B, L, lens in sizes:
        tl = torch.tensor(lens, device=dev)
        flow_cases.append({"tokens": _ids((B, L), fcfg.vocab_size, g).to(dev), "token_lens": tl})
        Lf = 2 * L + 1
        with torch.inference_mode():
            mu, _ = flow.encode_tokens(flow_cases[-1]["tokens"], tl)
        mu = F.pad(mu, (0, 1), mode="replicate")
        mask = length_mask(2 * tl + (tl == L).long(), Lf).float()[:, None]  # the longest row: odd length
        cond = torch.zeros(B, MEL_BINS, Lf)
        cond[:, :, : Lf // 3] = torch.randn(B, MEL_BINS, Lf // 3, generator=g) * 2 - 5
        cond = cond.to(dev) * mask
        cfm_cases.append({"mask": mask, "mu": mu * mask, "spks": (torch.randn(B, MEL_BINS, generator=g) * 0.3).to(dev),
                          "cond": cond, "noise": torch.randn(B, MEL_BINS, Lf, generator=g).to(dev)})

    with native_kernels():
        # -- flow encoder
        t0 = time.perf_counter()
        spec = FLOW_ENCODER
        c0 = flow_cases[0]
        model = export_graph(FlowEncoderGraph(flow), (c0["tokens"], c0["token_lens"]), spec, out_dir, opset=opset)
        dedupe_initializers(model)
        save_model(model, out_dir / spec.file)
        del model
        timings[spec.name] = time.perf_counter() - t0

        # -- estimator and loop (weights stored once, in the estimator's data file)
        t0 = time.perf_counter()
        c0 = cfm_cases[0]
        B0 = c0["mu"].shape[0]
        est_args = (c0["noise"], c0["mask"], c0["mu"], torch.full((B0,), 0.3, device=dev), c0["spks"], c0["cond"])
        if meanflow:
            est_args += (torch.full((B0,), 0.6, device=dev),)
        est_model = export_graph(EstimatorGraph(flow.decoder.estimator, meanflow), est_args, est_spec, out_dir,
                                 opset=opset)
        timings[est_spec.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loop_args = (c0["noise"], c0["mask"], c0["mu"], c0["spks"], c0["cond"])
        loop_model = export_graph(CfmLoopGraph(flow.decoder, steps, meanflow), loop_args, loop_spec, out_dir,
                                  opset=opset)
        n = dedupe_initializers(loop_model)
        log.info("%s: %d duplicate initializers merged", loop_spec.name, n)
        save_shared({est_spec.name: est_model, loop_spec.name: loop_model}, out_dir, est_spec.file + ".data")
        del est_model, loop_model
        timings[loop_spec.name] = time.perf_counter() - t0

        # -- HiFT
        t0 = time.perf_counter()
        hift_cases, hift_seeds = [], {}
        for i, (B, L, lens) in enumerate(sizes):
            M = L + 2
            ml = torch.tensor([M] + [n + 2 for n in lens[1:]], device=dev)
            mel = torch.randn(B, MEL_BINS, M, generator=g) * 1.5 - 6 + torch.linspace(0, 3, MEL_BINS)[:, None]
            mel = mel.to(dev) * length_mask(ml, M).float()[:, None]
            phase, noise = draw_source_noise(B, M, generator=torch.Generator(device=dev).manual_seed(100 + i))
            case = {"mel": mel, "mel_lens": ml, "source_phase": phase, "source_noise": noise}
            hift_cases.append(case)
            hift_seeds[id(mel)] = 100 + i
        c0 = hift_cases[0]
        model = export_graph(HiftGraph(hift), tuple(c0.values()), HIFT, out_dir, opset=opset)
        timings[HIFT.name] = time.perf_counter() - t0
        # The streaming pieces (F0, filter), their weights shared with s3gen_hift's.
        t0 = time.perf_counter()
        f0_cases, dec_cases = [], []
        for i, c in enumerate(hift_cases):
            with torch.inference_mode():
                f0 = HiftF0Graph(hift)(c["mel"], c["mel_lens"])
                src = hift.excitation(f0, generator=torch.Generator(device=dev).manual_seed(200 + i))
            f0_cases.append({"mel": c["mel"], "mel_lens": c["mel_lens"]})
            B, M = c["mel"].shape[0], c["mel"].shape[-1]
            dec_cases.append({"mel": c["mel"], "mel_lens": c["mel_lens"],
                              "source": src.reshape(B, M, hift.config.samples_per_frame)})
        f0_model = export_graph(HiftF0Graph(hift), tuple(f0_cases[0].values()), HIFT_F0, out_dir, opset=opset)
        dec_model = export_graph(HiftDecodeGraph(hift), tuple(dec_cases[0].values()), HIFT_DECODE, out_dir,
                                 opset=opset)
        save_shared({HIFT.name: model, HIFT_F0.name: f0_model, HIFT_DECODE.name: dec_model}, out_dir,
                    HIFT.file + ".data")
        del model, f0_model, dec_model
        timings[HIFT_DECODE.name] = time.perf_counter() - t0

    # -- checks against the torch modules (their own kernels), at every check size
    t0 = time.perf_counter()
    record(FLOW_ENCODER, out_dir / FLOW_ENCODER.file,
           lambda tokens, token_lens: flow.encode_tokens(tokens, token_lens, finalize=True), flow_cases, tol=1e-4)

    def est_ref(x, mask, mu, t, spks, cond, r=None):
        return flow.decoder.estimator(x, mask, mu, t, spks, cond, r)

    est_cases = []
    for c in cfm_cases:
        B = c["mu"].shape[0]
        case = {"x": c["noise"] * c["mask"], "mask": c["mask"], "mu": c["mu"], "t": torch.full((B,), 0.37, device=dev),
                "spks": c["spks"], "cond": c["cond"]}
        if meanflow:
            case["r"] = torch.full((B,), 0.81, device=dev)
        est_cases.append(case)
    record(est_spec, out_dir / est_spec.file, est_ref, est_cases, tol=1e-4)

    def loop_ref(noise, mask, mu, spks, cond):
        return flow.decoder(mu, mask, spks, cond, n_steps=steps, noise=noise * mask, meanflow=meanflow)

    record(loop_spec, out_dir / loop_spec.file, loop_ref, cfm_cases, tol=1e-3)

    def hift_ref(mel, mel_lens, source_phase, source_noise):
        gen = torch.Generator(device=dev).manual_seed(hift_seeds[id(mel)])
        return hift(mel, mel_lens, generator=gen)

    record(HIFT, out_dir / HIFT.file, hift_ref, hift_cases, tol=1e-3)

    def f0_ref(mel, mel_lens):
        return hift.f0_predictor(mel, length_mask(mel_lens, mel.shape[-1]).float()[:, None, :])

    record(HIFT_F0, out_dir / HIFT_F0.file, f0_ref, f0_cases, tol=1e-4)

    def decode_ref(mel, mel_lens, source):
        return hift.decode(mel, source.reshape(mel.shape[0], 1, -1), mel_lens)

    # The source is given, so no phase is integrated here (seen: 1.6e-5 on a test model, 1.5e-4 on
    # the full-size random-weight HiFT, whose convs amplify rounding); HiFT's bound.
    record(HIFT_DECODE, out_dir / HIFT_DECODE.file, decode_ref, dec_cases, tol=1e-3)
    timings["checks"] = time.perf_counter() - t0

    lin = flow.spk_embed_affine_layer
    extras = {"s3gen.spk_embed_affine_layer.weight": lin.weight.detach().float().cpu().clone(),
              "s3gen.spk_embed_affine_layer.bias": lin.bias.detach().float().cpu().clone(),
              "s3gen.m_source.l_linear.weight": hift.m_source.l_linear.weight.detach().float().cpu().clone(),
              "s3gen.m_source.l_linear.bias": hift.m_source.l_linear.bias.detach().float().cpu().clone()}
    config = {
        "meanflow": meanflow, "n_steps": steps, "default_steps": int(s3gen.default_steps),
        "cfg_rate": float(dcfg.cfg_rate), "t_scheduler": "linear" if meanflow else dcfg.t_scheduler,
        "mel_bins": MEL_BINS, "token_mel_ratio": int(fcfg.token_mel_ratio), "vocab_size": int(fcfg.vocab_size),
        "sample_rate": int(hcfg.sampling_rate), "samples_per_frame": int(hcfg.samples_per_frame),
        "source_harmonics": SOURCE_HARMONICS, "pre_lookahead_len": int(fcfg.pre_lookahead_len),
        # The NSF excitation a stream builds beside the graphs (hift.continue_excitation); its
        # 9 -> 1 merge is in extras.
        "nsf": {"alpha": float(hcfg.nsf_alpha), "sigma": float(hcfg.nsf_sigma),
                "voiced_threshold": float(hcfg.nsf_voiced_threshold)},
        # The encoder's relative-position tables are traced at their stored length: longer inputs
        # (which torch handles by rebuilding the table) are outside the graph.
        "max_tokens": int(fcfg.pos_max_len // fcfg.token_mel_ratio),
        "graphs": {"flow_encoder": FLOW_ENCODER.file, "cfm_estimator": est_spec.file, "cfm_loop": loop_spec.file,
                   "hift": HIFT.file, **STREAM_GRAPHS},
        "export_s": {k: round(v, 2) for k, v in timings.items()},
    }
    return ComponentExport(component="s3gen", graphs=graphs, extras=extras, config=config)


__all__ = ["FLOW_ENCODER", "CFM_ESTIMATOR", "CFM_ESTIMATOR_MEANFLOW", "HIFT", "HIFT_F0", "HIFT_DECODE", "STREAM_GRAPHS", "cfm_estimator_spec", "cfm_loop_spec",
           "export_s3gen", "exportable_stft", "exportable_istft", "draw_source_noise", "native_kernels",
           "dedupe_initializers", "FlowEncoderGraph", "EstimatorGraph", "CfmLoopGraph", "HiftGraph",
           "HiftF0Graph", "HiftDecodeGraph"]
