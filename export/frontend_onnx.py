"""The voice front ends as ONNX graphs: what ``TTS.prepare_conditionals`` runs on a reference clip.

Four graphs, one per front end (``chatterbox_rt.export.ort_frontends`` runs them):

===============  ===================================================  =====================================
graph            inputs                                               outputs
===============  ===================================================  =====================================
voice_encoder    mel_partials ``[P, 160, 40]`` f32                    partial_embeds ``[P, 256]`` f32
campplus         wav_16k ``[B, N16]`` f32                             embedding ``[B, 192]`` f32
s3_tokenizer     wav_16k ``[1, N16]`` f32, max_tokens ``[1]`` i64     speech_tokens ``[1, S]`` i64,
                                                                      speech_token_lens ``[1]`` i64
prompt_mel       wav_24k ``[B, N24]`` f32                             prompt_feat ``[B, F, 80]`` f32
===============  ===================================================  =====================================

What is inside each graph, and what stays in host code (none of which has weights):

* ``voice_encoder``: the 3-layer LSTM, the projection, ReLU and the per-partial L2 normalisation.
  The voice encoder's mel stays in :mod:`chatterbox_rt.models.voice_encoder`: it is computed in
  float64 to round like librosa, after a data-dependent silence trim (numpy), and cut into a
  data-dependent number of partials; averaging the partials per utterance is two torch ops.
* ``campplus``: the Kaldi fbank of :func:`chatterbox_rt.models.campplus.kaldi_fbank` (framing by
  gather, DC removal, pre-emphasis, Povey window, the 512-point DFT as a product with fixed
  cos/sin matrices, power, Kaldi mel banks, log), the mean normalisation over time, and CAM++.
  Only equal-length rows batch (the torch code's padded-list quirk is not reproduced; S3Gen passes
  one clip).
* ``s3_tokenizer``: the tokenizer's log-mel (centred STFT with reflect padding as a DFT product,
  the last frame dropped, 128 Slaney bands, log10, the utterance-max floor), the cut to
  ``4 * max_tokens`` mel frames (after the floor, as the torch code), the encoder and the FSQ code
  as int64 ids. One utterance per run, up to 30 s (the torch code windows longer ones; the host
  side refuses them).
* ``prompt_mel``: S3Gen's 24 kHz prompt mel (:func:`chatterbox_rt.models.s3gen.mel.mel_spectrogram`,
  transposed to ``[B, F, 80]``).

The DFTs are products with fixed cos/sin tables; only the bins a mel bank uses are kept (bins 0-640
of 961 for the prompt mel: its bank stops at 8 kHz; 256 of 257 for the fbank: Kaldi's Nyquist bin
has weight 0). NOTE: in float32 such a product is as far from the exact transform as torch's
float32 FFT is (measured on speech: 8.6e-5 vs 8.8e-5 of the prompt log-mel), but the two errors
add, so a float32 graph sits about twice that from torch, past the parity tolerances (1e-4) on
quiet frames. By default the products run in float64 (the framed, windowed float32 samples cast
up, re/im rounded back to float32 as torch's complex64 spectrum is), which leaves only torch's
own error; ``dft_dtype="float32"`` is for runtimes without double (TensorRT).

CAM++'s segment pooling and statistics pooling are re-expressed with ops the exporter handles
(its ``std`` exports to a graph onnxruntime rejects); they reuse the module's own weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.campplus import (
    LOG_FLOOR,
    POVEY_EXPONENT,
    PREEMPHASIS,
    CAMDenseTDNNBlock,
    CAMPPlus,
    StatsPool,
    frame_geometry,
    kaldi_mel_banks,
)
from ..models.melbank import slaney_mel_basis
from ..models.s3gen.mel import MelConfig, mel_spectrogram
from ..models.s3tokenizer import S3Tokenizer, S3TokenizerConfig
from ..models.voice_encoder import VoiceEncoder, VoiceEncoderConfig, melspectrogram, stride_as_partials
from ._onnx import DEFAULT_OPSET, ExportError, check_graph, check_opset, export_graph, open_session, run, save_model
from .spec import ComponentExport, Dim, GraphCheck, GraphSpec, T

log = logging.getLogger(__name__)

S3_SR = 16000  # tokenizer, CAM++ and voice encoder input rate (the prompt mel's is MelConfig's)
# Audio lengths of the shape profiles (seconds): a voice is prepared from the first 10 s
# (S3Gen's prompt) of a clip; 30 s is the longest utterance the tokenizer encodes in one window.
PROFILE_MIN_S, PROFILE_OPT_S, PROFILE_MAX_S = 0.5, 10, 30
# Export checks run each graph at these lengths (odd sample counts, off every hop) besides the
# profile's minimum.
CHECK_SECONDS = (1.3, 3.7)
# Tolerances of the export check (check_graph: max |ort - torch| / max |torch|). Measured on
# random weights and the check signal: voice encoder ~1e-6, CAM++ ~5e-7, prompt mel ~4e-7.
TOL = {"voice_encoder": 1e-5, "campplus": 1e-4, "prompt_mel": 1e-5, "s3_tokenizer": 0.0}
# An FSQ digit whose torch value ``tanh(h) * 0.999`` lies within this of a rounding boundary
# (+-0.5) may legitimately round the other way in onnxruntime; any other token difference fails.
FSQ_BOUNDARY_MARGIN = 1e-4
# Partials per voice-encoder call in the profile (VoiceEncoder's default batch_size is 32).
VE_PARTIALS = Dim(1, 8, 64)

FRONTEND_GRAPHS = ("voice_encoder", "campplus", "s3_tokenizer", "prompt_mel")
# Precisions of the DFT products (see export_frontends).
DFT_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _samples(sr: int) -> Dim:
    return Dim(int(PROFILE_MIN_S * sr), int(PROFILE_OPT_S * sr), int(PROFILE_MAX_S * sr))


# ------------------------------------------------------------------------------------- specs


def voice_encoder_spec(c: VoiceEncoderConfig = VoiceEncoderConfig()) -> GraphSpec:
    return GraphSpec(
        "voice_encoder", "frontend",
        inputs=[T("mel_partials", "float32", "partials", c.ve_partial_frames, c.num_mels)],
        outputs=[T("partial_embeds", "float32", "partials", c.speaker_embed_size)],
        dims={"partials": VE_PARTIALS},
        doc="Voice encoder: mel partials (40-band power mel, 160 frames each) -> L2-normalised "
            "partial embeddings. The mel, the silence trim, the partial cut and the per-utterance "
            "mean run on the host.")


def campplus_spec(embedding_size: int = 192) -> GraphSpec:
    return GraphSpec(
        "campplus", "frontend",
        inputs=[T("wav_16k", "float32", "batch", "samples_16k")],
        outputs=[T("embedding", "float32", "batch", embedding_size)],
        dims={"batch": Dim(1, 1, 4), "samples_16k": _samples(S3_SR)},
        doc="CAM++ x-vector of 16 kHz audio, Kaldi fbank and mean normalisation included "
            "(rows of one length).")


def s3_tokenizer_spec() -> GraphSpec:
    return GraphSpec(
        "s3_tokenizer", "frontend",
        inputs=[T("wav_16k", "float32", 1, "samples_16k"), T("max_tokens", "int64", 1)],
        outputs=[T("speech_tokens", "int64", 1, "tokens"), T("speech_token_lens", "int64", 1)],
        dims={"samples_16k": _samples(S3_SR)},
        doc="S3 tokenizer v2 of one 16 kHz utterance (<= 30 s), log-mel included; at most "
            "max_tokens tokens (the mel is cut to 4 * max_tokens frames after its floor).")


def prompt_mel_spec(c: MelConfig = MelConfig()) -> GraphSpec:
    return GraphSpec(
        "prompt_mel", "frontend",
        inputs=[T("wav_24k", "float32", "batch", "samples_24k")],
        outputs=[T("prompt_feat", "float32", "batch", "frames", c.num_mels)],
        dims={"batch": Dim(1, 1, 4), "samples_24k": _samples(c.sample_rate)},
        doc="S3Gen's prompt mel: 24 kHz audio -> [B, N // 480, 80] log-mel.")


# ------------------------------------------------------------------------------- graph modules


def _dft_tables(n_fft: int, n_bins: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """cos and -sin of ``2 pi n k / n_fft`` for ``n < n_fft``, ``k < n_bins``: ``[n_fft, n_bins]`` in
    ``dtype`` (built in float64), so that ``frames @ cos``, ``frames @ sin`` are rfft's real and
    imaginary parts."""
    n = torch.arange(n_fft, dtype=torch.float64)[:, None]
    k = torch.arange(n_bins, dtype=torch.float64)[None]
    angle = 2 * math.pi * ((n * k) % n_fft) / n_fft  # reduced mod n_fft: exact phases
    return torch.cos(angle).to(dtype), (-torch.sin(angle)).to(dtype)


def _used_bins(basis: np.ndarray) -> int:
    """Bins up to the last one any band weighs (the rest contribute exact zeros)."""
    nz = np.flatnonzero(np.abs(basis).sum(axis=0))
    return int(nz[-1]) + 1


def _dft(frames: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts (float32) of the DFT of float32 ``frames [..., n]``, computed in the
    tables' dtype (float64: closer to the exact transform than torch's own float32 FFT)."""
    x = frames.to(cos.dtype)
    return (x @ cos).float(), (x @ sin).float()


def _frames(x: Tensor, win: int, hop: int, n_frames: Tensor) -> Tensor:
    """``[B, L]`` -> ``[B, n_frames, win]``, frame t = x[:, t * hop : t * hop + win] (a gather)."""
    idx = torch.arange(n_frames, device=x.device)[:, None] * hop + torch.arange(win, device=x.device)[None]
    return x[:, idx]


class VoiceEncoderGraph(nn.Module):
    def __init__(self, ve: VoiceEncoder):
        super().__init__()
        self.ve = ve

    def forward(self, mel_partials: Tensor) -> Tensor:  # [P, 160, 40] -> [P, 256]
        return self.ve(mel_partials)


class KaldiFbank(nn.Module):
    """:func:`chatterbox_rt.models.campplus.kaldi_fbank` with exportable ops: ``[B, N]`` -> ``[B, T, M]``."""

    def __init__(self, sample_rate: int = S3_SR, num_mel_bins: int = 80, dft_dtype: torch.dtype = torch.float64):
        super().__init__()
        self.win, self.hop, n_fft = frame_geometry(sample_rate)
        banks = kaldi_mel_banks(num_mel_bins, sample_rate)  # [n_fft // 2 + 1, M]
        n_bins = _used_bins(banks.T.numpy())
        cos, sin = _dft_tables(n_fft, n_bins, dft_dtype)
        # Zero padding to n_fft contributes nothing: only the first win rows of the DFT are used.
        self.register_buffer("dft_cos", cos[: self.win].contiguous(), persistent=False)
        self.register_buffer("dft_sin", sin[: self.win].contiguous(), persistent=False)
        self.register_buffer("banks", banks[:n_bins].clone(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win, periodic=False, dtype=torch.float32)
                             .pow(POVEY_EXPONENT), persistent=False)

    def forward(self, wav: Tensor) -> Tensor:
        n_frames = (wav.shape[-1] - self.win) // self.hop + 1  # snip_edges
        frames = _frames(wav.float(), self.win, self.hop, n_frames)  # [B, T, W]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - PREEMPHASIS * previous) * self.window
        re, im = _dft(frames, self.dft_cos, self.dft_sin)  # [B, T, K]
        power = re * re + im * im
        return torch.clamp_min(power @ self.banks, LOG_FLOOR).log()  # [B, T, M]


def _seg_pooling(x: Tensor, seg_len: int) -> Tensor:
    """CAMLayer.seg_pooling: the mean of each ``seg_len``-frame segment (the last, partial one over its
    real frames), repeated over the segment. ``[B, C, T]`` -> ``[B, C, T]``."""
    B, C, T_ = x.shape
    n_seg = (T_ + seg_len - 1) // seg_len
    sums = F.pad(x, (0, n_seg * seg_len - T_)).reshape(B, C, n_seg, seg_len).sum(-1)  # [B, C, S]
    counts = torch.clamp(T_ - torch.arange(n_seg, device=x.device) * seg_len, max=seg_len).to(x.dtype)
    seg = sums / counts
    return seg[..., None].expand(B, C, n_seg, seg_len).reshape(B, C, n_seg * seg_len)[..., :T_]


def _cam_layer(cam, x: Tensor) -> Tensor:
    y = cam.linear_local(x)
    context = x.mean(-1, keepdim=True) + _seg_pooling(x, cam.seg_len)
    return y * torch.sigmoid(cam.linear2(F.relu(cam.linear1(context))))


def _stats_pool(x: Tensor) -> Tensor:
    """StatsPool (mean and unbiased std over time): ``[B, C, T]`` -> ``[B, 2C]``."""
    mean = x.mean(dim=-1)
    d = x - mean[..., None]
    std = torch.sqrt((d * d).sum(dim=-1) / (x.shape[-1] - 1))
    return torch.cat([mean, std], dim=-1)


class CAMPPlusGraph(nn.Module):
    """16 kHz ``[B, N]`` -> x-vector ``[B, 192]``: fbank, mean normalisation, CAM++ (its own modules)."""

    def __init__(self, campplus: CAMPPlus, dft_dtype: torch.dtype = torch.float64):
        super().__init__()
        c = campplus.config
        self.fbank = KaldiFbank(c.sample_rate, c.feat_dim, dft_dtype)
        self.campplus = campplus

    def forward(self, wav_16k: Tensor) -> Tensor:
        feats = self.fbank(wav_16k)
        feats = feats - feats.mean(dim=1, keepdim=True)  # [B, T, 80]
        m = self.campplus
        x = m.head(feats.transpose(1, 2))
        for layer in m.xvector:
            if isinstance(layer, StatsPool):
                x = _stats_pool(x)
            elif isinstance(layer, CAMDenseTDNNBlock):
                for d in layer:
                    h = d.nonlinear2(d.linear1(d.nonlinear1(x)))
                    x = torch.cat([x, _cam_layer(d.cam_layer, h)], dim=1)
            else:
                x = layer(x)
        return x


class S3TokenizerGraph(nn.Module):
    """One 16 kHz utterance ``[1, N]`` (+ ``max_tokens [1]``) -> (tokens ``[1, S]``, lens ``[1]``) int64."""

    def __init__(self, tokenizer: S3Tokenizer, dft_dtype: torch.dtype = torch.float64):
        super().__init__()
        c = self.config = tokenizer.config
        self.tokenizer = tokenizer
        basis = tokenizer._mel_filters  # [n_mels, n_fft // 2 + 1]
        n_bins = _used_bins(basis.cpu().numpy())
        cos, sin = _dft_tables(c.n_fft, n_bins, dft_dtype)
        self.register_buffer("dft_cos", cos, persistent=False)
        self.register_buffer("dft_sin", sin, persistent=False)
        self.register_buffer("basis_t", basis[:, :n_bins].T.contiguous().float(), persistent=False)
        self.register_buffer("window", tokenizer.window.float().clone(), persistent=False)

    def log_mel(self, wav: Tensor) -> Tensor:
        """S3Tokenizer.log_mel_spectrogram: ``[1, N]`` -> ``[1, n_mels, N // hop]``."""
        c = self.config
        pad = c.n_fft // 2
        x = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]  # torch.stft(center=True)
        n_frames = wav.shape[-1] // c.hop  # the last centred frame is dropped
        frames = _frames(x, c.n_fft, c.hop, n_frames) * self.window  # [1, T, n_fft]
        re, im = _dft(frames, self.dft_cos, self.dft_sin)
        mel = (re * re + im * im) @ self.basis_t  # [1, T, n_mels]
        log_spec = torch.clamp(mel, min=c.log_floor).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - c.dynamic_range)
        return ((log_spec + c.log_offset) / c.log_scale).transpose(1, 2)

    def forward(self, wav_16k: Tensor, max_tokens: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        mel = self.log_mel(wav_16k.float())
        keep = torch.minimum(max_tokens[0] * c.frames_per_token, torch.ones_like(max_tokens[0]) * mel.shape[-1])
        mel = mel.index_select(2, torch.arange(keep, device=mel.device))  # max_len: cut after the floor
        mel_len = torch.ones_like(mel[:, 0, :], dtype=torch.long).sum(dim=-1)  # [1]
        hidden, lens = self.tokenizer.encoder(mel, mel_len)
        return self.tokenizer.quantizer(hidden).long(), lens.long()


class PromptMelGraph(nn.Module):
    """24 kHz ``[B, N]`` -> S3Gen's prompt mel ``[B, N // hop, num_mels]``."""

    def __init__(self, config: MelConfig = MelConfig(), dft_dtype: torch.dtype = torch.float64):
        super().__init__()
        c = self.config = config
        basis = slaney_mel_basis(c.sample_rate, c.n_fft, c.num_mels, c.fmin, c.fmax)  # [M, n_fft // 2 + 1]
        n_bins = _used_bins(basis)
        cos, sin = _dft_tables(c.n_fft, n_bins, dft_dtype)
        # NOTE: a win_size < n_fft window would be centred in the frame (torch.stft); here they are equal.
        assert c.win_size == c.n_fft, "prompt mel graph assumes win_size == n_fft"
        self.register_buffer("dft_cos", cos, persistent=False)
        self.register_buffer("dft_sin", sin, persistent=False)
        self.register_buffer("basis_t", torch.from_numpy(basis[:, :n_bins].T.copy()), persistent=False)
        self.register_buffer("window", torch.hann_window(c.win_size), persistent=False)

    def forward(self, wav_24k: Tensor) -> Tensor:
        c = self.config
        pad = (c.n_fft - c.hop_size) // 2
        x = F.pad(wav_24k.float()[:, None], (pad, pad), mode="reflect")[:, 0]
        n_frames = (x.shape[-1] - c.n_fft) // c.hop_size + 1
        frames = _frames(x, c.n_fft, c.hop_size, n_frames) * self.window  # [B, T, n_fft]
        re, im = _dft(frames, self.dft_cos, self.dft_sin)
        mag = torch.sqrt(re * re + im * im + c.magnitude_eps)
        return torch.log(torch.clamp(mag @ self.basis_t, min=c.log_clip))  # [B, T, M]


# ------------------------------------------------------------------------------------- checks


def check_signal(n: int, sr: int, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like test clip of ``n`` samples: a gliding harmonic voice with a
    syllable envelope, a chirp, noise and a quiet lead-in (which exercises the log floors)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    f0 = 120 + 45 * np.sin(2 * np.pi * 0.8 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(0.3 / k * np.sin(k * phase) for k in range(1, 9))
    chirp = 0.05 * np.sin(2 * np.pi * (300 * t + 400 * t ** 2))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.3 * t) ** 2
    x = envelope * (voiced + chirp) + 0.02 * rng.standard_normal(n)
    x[: sr // 10] *= 1e-3
    return x.astype(np.float32)


def check_lengths(sr: int, dim: Dim, seconds: Sequence[float] = CHECK_SECONDS) -> list:
    """Sample counts an export check runs at: the profile's minimum, then ``seconds`` as odd counts."""
    out = [dim.min]
    for s in seconds:
        n = int(s * sr) | 1
        if n not in out and dim.min <= n <= dim.max:
            out.append(n)
    return out


def fsq_margins(tokenizer: S3Tokenizer, wav: Tensor, max_len: Optional[int] = None) -> Tensor:
    """Torch's distance of each token's closest FSQ digit to a rounding boundary ``[B, S]``: a token
    with a margin near 0 may round the other way on another backend."""
    with torch.inference_mode():
        mels, lens = tokenizer.featurize([wav], max_len)
        hidden, _ = tokenizer.encode(mels, lens)
        cb = tokenizer.quantizer._codebook
        h = cb.project_down(hidden).float().tanh() * cb.config.fsq_scale  # [B, S, D]
        return ((h.abs() - 0.5).abs()).amin(dim=-1)


def compare_tokens(got: np.ndarray, want: Tensor, margins: Tensor, *,
                   margin: float = FSQ_BOUNDARY_MARGIN) -> dict:
    """Tokens of onnxruntime vs torch: {"compared", "mismatched", "unexplained", "min_margin"}.
    ``unexplained`` counts differences where torch is not within ``margin`` of an FSQ boundary."""
    got = torch.as_tensor(np.asarray(got))
    if got.shape != want.shape:
        raise ExportError(f"speech token shapes differ: onnxruntime {list(got.shape)}, torch {list(want.shape)}")
    diff = got != want.cpu()
    unexplained = diff & (margins.cpu() >= margin)
    return {"compared": int(want.numel()), "mismatched": int(diff.sum()), "unexplained": int(unexplained.sum()),
            "min_margin": float(margins.min()) if margins.numel() else float("inf")}


# ----------------------------------------------------------------------------------- exporters


def _dtype(name: str) -> torch.dtype:
    if name not in DFT_DTYPES:
        raise ValueError(f"dft_dtype must be one of {list(DFT_DTYPES)}, got {name!r}")
    return DFT_DTYPES[name]


def _write(module: nn.Module, args: tuple, spec: GraphSpec, out_dir: Path, opset: int) -> Path:
    model = export_graph(module, args, spec, out_dir, opset=opset)
    return save_model(model, out_dir / spec.file)


def export_voice_encoder(ve: VoiceEncoder, out_dir: Path, *, opset: int = DEFAULT_OPSET,
                         check_seconds: Sequence[float] = CHECK_SECONDS, threads: Optional[int] = None,
                         dft_dtype: str = "float64") -> GraphCheck:
    """(``dft_dtype`` is unused: the voice encoder's mel stays on the host.)"""
    spec = voice_encoder_spec(ve.config)
    c = ve.config
    ve = ve.eval()
    example = torch.rand(3, c.ve_partial_frames, c.num_mels)
    path = _write(VoiceEncoderGraph(ve), (example,), spec, out_dir, opset)
    cases = []
    for i, n in enumerate(int(s * c.sample_rate) | 1 for s in check_seconds):
        mel = melspectrogram(torch.from_numpy(check_signal(n, S3_SR, seed=i)), c).T.numpy()  # [T, 40]
        parts = stride_as_partials(mel, c, rate=c.default_rate)
        cases.append({"mel_partials": torch.from_numpy(np.ascontiguousarray(parts))})
    g = torch.Generator().manual_seed(0)
    for n in sorted({VE_PARTIALS.min, VE_PARTIALS.opt | 1}):  # non-negative, like power mels
        cases.append({"mel_partials": torch.rand(n, c.ve_partial_frames, c.num_mels, generator=g) * 2})
    res = check_graph(path, spec, lambda mel_partials: ve(mel_partials), cases, tol=TOL["voice_encoder"],
                      threads=threads)
    return GraphCheck(spec, res)


def export_campplus(campplus: CAMPPlus, out_dir: Path, *, opset: int = DEFAULT_OPSET,
                    check_seconds: Sequence[float] = CHECK_SECONDS, threads: Optional[int] = None,
                    dft_dtype: str = "float64") -> GraphCheck:
    spec = campplus_spec(campplus.config.embedding_size)
    campplus = campplus.eval()
    example = torch.from_numpy(check_signal(S3_SR, S3_SR))[None]
    path = _write(CAMPPlusGraph(campplus, _dtype(dft_dtype)), (example,), spec, out_dir, opset)
    lengths = check_lengths(S3_SR, spec.dims["samples_16k"], check_seconds)
    cases = [{"wav_16k": torch.from_numpy(check_signal(n, S3_SR, seed=i))[None]} for i, n in enumerate(lengths)]
    res = check_graph(path, spec, lambda wav_16k: campplus.inference(wav_16k), cases, tol=TOL["campplus"],
                      threads=threads)
    return GraphCheck(spec, res)


def export_prompt_mel(out_dir: Path, config: MelConfig = MelConfig(), *, opset: int = DEFAULT_OPSET,
                      check_seconds: Sequence[float] = CHECK_SECONDS, threads: Optional[int] = None,
                      dft_dtype: str = "float64") -> GraphCheck:
    spec = prompt_mel_spec(config)
    example = torch.from_numpy(check_signal(config.sample_rate, config.sample_rate))[None]
    path = _write(PromptMelGraph(config, _dtype(dft_dtype)), (example,), spec, out_dir, opset)
    lengths = check_lengths(config.sample_rate, spec.dims["samples_24k"], check_seconds)
    cases = [{"wav_24k": torch.from_numpy(check_signal(n, config.sample_rate, seed=i))[None]}
             for i, n in enumerate(lengths)]
    res = check_graph(path, spec, lambda wav_24k: mel_spectrogram(wav_24k, config).transpose(1, 2), cases,
                      tol=TOL["prompt_mel"], threads=threads)
    return GraphCheck(spec, res)


def export_s3_tokenizer(tokenizer: S3Tokenizer, out_dir: Path, *, opset: int = DEFAULT_OPSET,
                        check_seconds: Sequence[float] = CHECK_SECONDS, threads: Optional[int] = None,
                        dft_dtype: str = "float64") -> GraphCheck:
    """Export and check; tokens must equal torch's except where torch sits within
    ``FSQ_BOUNDARY_MARGIN`` of an FSQ rounding boundary (counted in the check's result)."""
    spec = s3_tokenizer_spec()
    tokenizer = tokenizer.eval()
    c = tokenizer.config
    example = torch.from_numpy(check_signal(S3_SR, S3_SR))[None]
    path = _write(S3TokenizerGraph(tokenizer, _dtype(dft_dtype)), (example, torch.tensor([1000])), spec, out_dir,
                  opset)
    lengths = check_lengths(S3_SR, spec.dims["samples_16k"], check_seconds)
    cases = []
    for i, n in enumerate(lengths):
        wav = torch.from_numpy(check_signal(n, S3_SR, seed=i))[None]
        full = (n // c.hop + c.frames_per_token - 1) // c.frames_per_token
        cases.append({"wav_16k": wav, "max_tokens": torch.tensor([full + 7])})
        if full > 3:  # a cut: the floor still sees the whole clip
            cases.append({"wav_16k": wav, "max_tokens": torch.tensor([full // 2 + 1])})

    def reference(wav_16k, max_tokens):
        return tokenizer([wav_16k[0]], max_len=int(max_tokens[0]))

    res = check_graph(path, spec, reference, cases, tol=0.0, threads=threads, compare=["speech_token_lens"])
    sess = open_session(path, threads=threads)
    totals = {"compared": 0, "mismatched": 0, "unexplained": 0, "min_margin": float("inf")}
    for case in cases:
        got, _ = run(sess, case)
        want, _ = reference(**case)
        cmp = compare_tokens(got, want, fsq_margins(tokenizer, case["wav_16k"][0], int(case["max_tokens"][0])))
        if cmp["unexplained"]:
            raise ExportError(f"{spec.file}: {cmp['unexplained']} of {cmp['compared']} speech tokens differ from "
                              f"torch away from any FSQ rounding boundary (input {list(case['wav_16k'].shape)}, "
                              f"max_tokens {int(case['max_tokens'][0])})")
        for k in ("compared", "mismatched", "unexplained"):
            totals[k] += cmp[k]
        totals["min_margin"] = min(totals["min_margin"], cmp["min_margin"])
    res.update(tokens=totals, fsq_boundary_margin=FSQ_BOUNDARY_MARGIN)
    return GraphCheck(spec, res)


def frontends_config(ve_config: VoiceEncoderConfig = VoiceEncoderConfig(),
                     tok_config: S3TokenizerConfig = S3TokenizerConfig(), mel_config: MelConfig = MelConfig(),
                     embedding_size: int = 192, opset: int = DEFAULT_OPSET, dft_dtype: str = "float64") -> dict:
    """The JSON facts :class:`chatterbox_rt.export.ort_frontends.OrtFrontEnds` needs."""
    ve = {f.name: getattr(ve_config, f.name) for f in fields(ve_config) if f.init}
    return {
        "graphs": {name: f"{name}.onnx" for name in FRONTEND_GRAPHS},
        "opset": opset,
        "dft_dtype": dft_dtype,
        "s3_sr": S3_SR,
        "s3gen_sr": mel_config.sample_rate,
        "voice_encoder": ve,
        "campplus": {"sample_rate": S3_SR, "embedding_size": embedding_size,
                     "min_samples": frame_geometry(S3_SR)[0]},
        "s3_tokenizer": {"sample_rate": tok_config.sample_rate, "hop": tok_config.hop, "n_fft": tok_config.n_fft,
                         "frames_per_token": tok_config.frames_per_token,
                         "window_frames": tok_config.window_frames, "codebook_size": tok_config.codebook_size},
        "prompt_mel": asdict(mel_config),
    }


def export_frontends(ve: VoiceEncoder, s3gen, out_dir, *, opset: int = DEFAULT_OPSET,
                     check_seconds: Sequence[float] = CHECK_SECONDS, threads: Optional[int] = None,
                     only: Optional[Sequence[str]] = None, dft_dtype: str = "float64") -> ComponentExport:
    """Write the four front-end graphs to ``out_dir`` and check each against torch.

    ``ve``: the :class:`VoiceEncoder`; ``s3gen``: an :class:`S3Gen` (or anything with its
    ``.tokenizer`` and ``.speaker_encoder``). A ``TTS`` may be passed as ``ve`` with ``s3gen=None``.
    ``check_seconds``: audio lengths (besides each profile's minimum) of the check; ``only``: a
    subset of :data:`FRONTEND_GRAPHS`. ``dft_dtype``: the precision of the graphs' DFT products
    ("float64", the default: closer to the exact transform than torch's float32 FFT, so the graphs
    match torch within the parity tolerances; "float32" for runtimes without double, e.g. TensorRT:
    as accurate as torch's FFT, so about twice its distance from torch). Raises ``ExportError``
    when a graph does not match torch."""
    if s3gen is None and hasattr(ve, "ve") and hasattr(ve, "s3gen"):
        ve, s3gen = ve.ve, ve.s3gen
    check_opset(opset)
    names = list(only or FRONTEND_GRAPHS)
    unknown = sorted(set(names) - set(FRONTEND_GRAPHS))
    if unknown:
        raise ValueError(f"unknown front-end graph(s) {unknown}; expected some of {list(FRONTEND_GRAPHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _dtype(dft_dtype)
    kw = dict(opset=opset, check_seconds=check_seconds, threads=threads, dft_dtype=dft_dtype)
    tok, camp = s3gen.tokenizer, s3gen.speaker_encoder
    # Export on the CPU in fp32: the graphs and their checks do not depend on where torch runs.
    devices = {m: m.device for m in (ve, tok, camp)}
    for m in devices:
        m.cpu()
    graphs = []
    try:
        with torch.inference_mode(False):
            for name in names:
                if name == "voice_encoder":
                    g = export_voice_encoder(ve, out_dir, **kw)
                elif name == "campplus":
                    g = export_campplus(camp, out_dir, **kw)
                elif name == "s3_tokenizer":
                    g = export_s3_tokenizer(tok, out_dir, **kw)
                else:
                    g = export_prompt_mel(out_dir, **kw)
                log.info("exported %s: max rel error %.3g", g.spec.file, g.check["max_rel_error"])
                graphs.append(g)
    finally:
        for m, d in devices.items():
            m.to(d)
    config = frontends_config(ve.config, tok.config, MelConfig(), camp.config.embedding_size, opset, dft_dtype)
    config["graphs"] = {g.spec.name: g.spec.file for g in graphs}
    return ComponentExport(component="frontends", graphs=graphs, extras={}, config=config)
