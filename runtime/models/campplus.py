"""CAM++ speaker x-vector (S3Gen's ``speaker_encoder``): 16 kHz waveform -> 192-d embedding.

A port of the reference's ``chatterbox/models/s3gen/xvector.py`` (FunASR / 3D-Speaker CAM++) as
S3Gen builds it (``CAMPPlus(memory_efficient=False)``, ``output_level="segment"``), with the
Kaldi filterbank of ``torchaudio.compliance.kaldi.fbank`` re-implemented in torch so that torchaudio
is not needed at run time.

Features (``extract_feature``, per utterance, the options the reference passes: only
``num_mel_bins=80``, everything else torchaudio's defaults):

1. frames:  25 ms (400 samples) every 10 ms (160), ``snip_edges=True``:
            ``T = 1 + (N - 400) // 160`` frames, only frames that fit entirely; N < 400 is an error.
2. window:  per frame remove the DC offset, pre-emphasis ``x[n] - 0.97 x[n-1]`` (with x[-1] := x[0]),
            Povey window ``hann(400, periodic=False) ** 0.85``, zero-pad to 512 (next power of two).
3. mel:     |rfft|^2 projected on 80 triangular bands, equally spaced on Kaldi's mel scale
            ``1127 ln(1 + f / 700)`` between 20 Hz and Nyquist (the Nyquist bin has weight 0),
            then ``log(max(x, float32 eps))``. No dither (torchaudio's default 0.0), no energy term.
4. CMN:     subtract the mean over time of each mel band.

Network (input ``[B, T, 80]``): FCM (2-D ResNet front end, the frequency axis strided 80 -> 10)
-> ``[B, 320, T]`` -> TDNN (k5, stride 2) -> 3 CAM dense TDNN blocks (12/24/16 layers, growth 32,
dilation 1/2/2) each followed by a halving transition -> BN-ReLU -> mean+std pooling over time
-> 1x1 conv 1024 -> 192 -> BatchNorm without affine.

Quirks kept from the reference:

* A batch of utterances of different lengths is handled as the reference does: each utterance's
  features are mean-normalised alone, then zero-padded at the end to the longest one, and the network
  runs over the padded batch with NO mask. The padding frames therefore enter the convolutions, the
  CAM context means and the statistics pooling, so a short utterance embedded next to a longer one
  gets a different x-vector than embedded alone. Only equal-length inputs (S3Gen passes one
  ``[1, N]`` reference) give batch == single. Call ``inference`` once per utterance to avoid it.
* Statistics pooling uses the unbiased std: an input that reaches it with a single frame
  (fewer than ~4 fbank frames, i.e. under ~0.07 s) yields NaN.
* FCM's second stage is built from ``num_blocks[0]`` (not ``[1]``); both are 2.

Numerics: the filterbank is computed in float32 whatever the input dtype (the reference computes it
in the input's dtype, float32 in S3Gen). The reference's activation checkpointing
(``memory_efficient``) only matters for training and is omitted; it has no parameters.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# Kaldi filterbank (torchaudio.compliance.kaldi.fbank with the reference's options)

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
POVEY_EXPONENT = 0.85
LOW_FREQ = 20.0
HIGH_FREQ = 0.0  # <= 0 means an offset from Nyquist, as in Kaldi
KALDI_MEL_SCALE = 1127.0
KALDI_MEL_BREAK = 700.0
# torchaudio floors the mel energies at float32's eps whatever the dtype.
LOG_FLOOR = torch.finfo(torch.float32).eps


def _next_power_of_2(x: int) -> int:
    return 1 if x == 0 else 2 ** (x - 1).bit_length()


def frame_geometry(sample_rate: int = SAMPLE_RATE) -> tuple[int, int, int]:
    """(window_size, window_shift, fft_size) in samples: 400, 160, 512 at 16 kHz."""
    window_size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    window_shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    return window_size, window_shift, _next_power_of_2(window_size)


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames Kaldi emits with ``snip_edges=True``: only frames that fit entirely (0 if none fits)."""
    window_size, window_shift, _ = frame_geometry(sample_rate)
    return 0 if num_samples < window_size else 1 + (num_samples - window_size) // window_shift


def _kaldi_mel(freq):
    return KALDI_MEL_SCALE * (1.0 + freq / KALDI_MEL_BREAK).log()


@lru_cache(maxsize=8)
def kaldi_mel_banks(num_mel_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE,
                    low_freq: float = LOW_FREQ, high_freq: float = HIGH_FREQ) -> Tensor:
    """``[fft_size // 2 + 1, num_mel_bins]`` float32 projection (torchaudio's ``get_mel_banks`` without
    VTLN, plus the zero row for the Nyquist bin). Computed in float32 in torchaudio's operation order.
    Cached: do not modify the returned tensor."""
    _, _, fft_size = frame_geometry(sample_rate)
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    assert 0.0 <= low_freq < high_freq <= nyquist, (low_freq, high_freq, nyquist)
    mel_low = KALDI_MEL_SCALE * math.log(1.0 + low_freq / KALDI_MEL_BREAK)
    mel_high = KALDI_MEL_SCALE * math.log(1.0 + high_freq / KALDI_MEL_BREAK)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)

    band = torch.arange(num_mel_bins).unsqueeze(1)  # [M, 1] int64; times a float -> float32
    left = mel_low + band * mel_delta
    center = mel_low + (band + 1.0) * mel_delta
    right = mel_low + (band + 2.0) * mel_delta
    fft_bin_width = sample_rate / fft_size
    mel = _kaldi_mel(fft_bin_width * torch.arange(float(fft_size // 2), dtype=torch.float32)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp_min(torch.minimum(up, down), 0.0)  # [M, fft_size // 2]
    return F.pad(banks, (0, 1)).T.contiguous()  # [fft_size // 2 + 1, M]


@lru_cache(maxsize=8)
def _povey_window(window_size: int) -> Tensor:
    return torch.hann_window(window_size, periodic=False, dtype=torch.float32).pow(POVEY_EXPONENT)


def kaldi_fbank(wav: Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> Tensor:
    """Log mel filterbank of ``torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80)``.

    ``wav``: ``[N]`` -> ``[T, num_mel_bins]``; ``[B, N]`` (equal lengths) -> ``[B, T, num_mel_bins]``
    (NOTE: torchaudio reads a ``[C, N]`` input as channels and returns channel 0 as ``[T, M]``; here a
    2-D input is a batch). ``T = 1 + (N - 400) // 160``; raises ``ValueError`` when ``N < 400``
    (torchaudio asserts). Always computed in float32.
    """
    window_size, window_shift, fft_size = frame_geometry(sample_rate)
    if wav.dim() not in (1, 2):
        raise ValueError(f"kaldi_fbank expects a [N] or [B, N] waveform, got shape {tuple(wav.shape)}")
    if wav.shape[-1] < window_size:
        raise ValueError(f"waveform of {wav.shape[-1]} samples is shorter than one {window_size}-sample "
                         f"frame ({FRAME_LENGTH_MS} ms at {sample_rate} Hz)")
    wav = wav.float()
    frames = wav.unfold(-1, window_size, window_shift)  # [..., T, W]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - PREEMPHASIS * previous
    frames = frames * _povey_window(window_size).to(frames.device)
    frames = F.pad(frames, (0, fft_size - window_size))  # [..., T, fft_size]
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [..., T, fft_size // 2 + 1]
    banks = kaldi_mel_banks(num_mel_bins, sample_rate).to(power.device)
    return torch.clamp_min(power @ banks, LOG_FLOOR).log()  # [..., T, M]


def extract_features(wavs: Sequence[Tensor] | Tensor, sample_rate: int = SAMPLE_RATE,
                     num_mel_bins: int = NUM_MEL_BINS) -> tuple[Tensor, list[int]]:
    """The reference's ``extract_feature``: per utterance fbank minus its mean over time, zero-padded
    at the end to the longest. ``wavs``: a ``[B, N]`` tensor or a list of 1-D tensors.
    Returns ``([B, T_max, M] float32, [T_b])``."""
    if isinstance(wavs, Tensor):
        if wavs.dim() == 1:
            raise ValueError("pass a [B, N] tensor or a list of 1-D waveforms (the reference iterates rows)")
        feats = kaldi_fbank(wavs, sample_rate, num_mel_bins)  # equal lengths: one batched call
        return feats - feats.mean(dim=1, keepdim=True), [feats.shape[1]] * feats.shape[0]
    feats = []
    for wav in wavs:
        f = kaldi_fbank(wav, sample_rate, num_mel_bins)
        feats.append(f - f.mean(dim=0, keepdim=True))
    lens = [f.shape[0] for f in feats]
    return nn.utils.rnn.pad_sequence(feats, batch_first=True, padding_value=0.0), lens


# ----------------------------------------------------------------------------------------------
# Network


@dataclass(frozen=True)
class CAMPPlusConfig:
    """The reference's ``CAMPPlus`` defaults (what S3Gen uses) and its hard-coded block layout."""

    feat_dim: int = NUM_MEL_BINS
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    fcm_channels: int = 32  # FCM's m_channels
    fcm_num_blocks: int = 2  # residual blocks per FCM stage (the reference uses num_blocks[0] twice)
    tdnn_kernel: int = 5
    tdnn_stride: int = 2
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    cam_reduction: int = 2
    cam_seg_len: int = 100  # CAM segment pooling length, in frames
    sample_rate: int = SAMPLE_RATE
    fcm_out_channels: int = field(init=False)
    bn_channels: int = field(init=False)

    def __post_init__(self):
        # Three stride-2 stages on the frequency axis: 80 -> 40 -> 20 -> 10.
        object.__setattr__(self, "fcm_out_channels", self.fcm_channels * (self.feat_dim // 8))
        object.__setattr__(self, "bn_channels", self.bn_size * self.growth_rate)
        assert len(self.block_layers) == len(self.block_kernels) == len(self.block_dilations)


class BNReLU(nn.Module):
    """The reference's ``get_nonlinear("batchnorm-relu")`` Sequential; keys ``batchnorm.*``."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.batchnorm(x))


class BasicResBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """2-D convolutional front end: ``[B, F, T]`` -> ``[B, C * F / 8, T]``."""

    def __init__(self, c: CAMPPlusConfig):
        super().__init__()
        m = c.fcm_channels
        self.conv1 = nn.Conv2d(1, m, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self.layer1 = nn.Sequential(*(BasicResBlock(m, m, 2 if i == 0 else 1) for i in range(c.fcm_num_blocks)))
        self.layer2 = nn.Sequential(*(BasicResBlock(m, m, 2 if i == 0 else 1) for i in range(c.fcm_num_blocks)))
        self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))  # [B, C, F, T]
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))  # [B, C, F / 8, T]
        return out.flatten(1, 2)


class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                                padding=(kernel_size - 1) // 2, bias=False)
        self.nonlinear = BNReLU(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a local conv gated by a sigmoid of (utterance mean + segment means)."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 reduction: int, seg_len: int):
        super().__init__()
        self.seg_len = seg_len
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size,
                                      padding=(kernel_size - 1) // 2 * dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)

    def seg_pooling(self, x: Tensor) -> Tensor:
        # ceil_mode: the last, partial segment averages only its real frames.
        seg = F.avg_pool1d(x, kernel_size=self.seg_len, stride=self.seg_len, ceil_mode=True)  # [B, C, S]
        return seg.repeat_interleave(self.seg_len, dim=-1)[..., : x.shape[-1]]

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear_local(x)
        context = x.mean(-1, keepdim=True) + self.seg_pooling(x)
        m = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return y * m


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, c: CAMPPlusConfig, kernel_size: int, dilation: int):
        super().__init__()
        assert kernel_size % 2 == 1, f"odd kernel size expected, got {kernel_size}"
        self.nonlinear1 = BNReLU(in_channels)
        self.linear1 = nn.Conv1d(in_channels, c.bn_channels, 1, bias=False)
        self.nonlinear2 = BNReLU(c.bn_channels)
        self.cam_layer = CAMLayer(c.bn_channels, c.growth_rate, kernel_size, dilation, c.cam_reduction, c.cam_seg_len)

    def forward(self, x: Tensor) -> Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleList):
    """Densely connected: each layer's ``growth_rate`` channels are appended to its input."""

    def __init__(self, num_layers: int, in_channels: int, c: CAMPPlusConfig, kernel_size: int, dilation: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}",
                            CAMDenseTDNNLayer(in_channels + i * c.growth_rate, c, kernel_size, dilation))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = BNReLU(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, 2C]
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class _AffineFreeBN(nn.Module):
    """``get_nonlinear("batchnorm_")``: keys ``batchnorm.running_*``."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.batchnorm(x)


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = _AffineFreeBN(out_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in] -> [B, C_out]
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """State-dict compatible with the reference ``CAMPPlus`` (S3Gen's ``speaker_encoder.*`` keys)."""

    def __init__(self, config: CAMPPlusConfig = CAMPPlusConfig()):
        super().__init__()
        c = self.config = config
        self.head = FCM(c)
        self.xvector = nn.Sequential()
        self.xvector.add_module("tdnn", TDNNLayer(c.fcm_out_channels, c.init_channels, c.tdnn_kernel, c.tdnn_stride))
        channels = c.init_channels
        for i, (n, k, d) in enumerate(zip(c.block_layers, c.block_kernels, c.block_dilations, strict=True)):
            self.xvector.add_module(f"block{i + 1}", CAMDenseTDNNBlock(n, channels, c, k, d))
            channels += n * c.growth_rate
            self.xvector.add_module(f"transit{i + 1}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.xvector.add_module("out_nonlinear", BNReLU(channels))
        self.xvector.add_module("stats", StatsPool())
        self.xvector.add_module("dense", DenseLayer(channels * 2, c.embedding_size))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, feats: Tensor) -> Tensor:
        """``feats``: ``[B, T, feat_dim]`` mean-normalised fbank -> ``[B, embedding_size]``."""
        return self.xvector(self.head(feats.transpose(1, 2)))

    @torch.no_grad()
    def inference(self, wavs: Sequence[Tensor] | Tensor) -> Tensor:
        """The reference's ``inference(audio_list)``: 16 kHz ``[B, N]`` tensor or list of 1-D waveforms
        -> ``[B, embedding_size]`` float32. Lists of unequal lengths are zero-padded without a mask
        (see the module docstring)."""
        if isinstance(wavs, Tensor):
            wavs = wavs.to(self.device)
        else:
            wavs = [w.to(self.device) for w in wavs]
        feats, _ = extract_features(wavs, self.config.sample_rate, self.config.feat_dim)
        return self.forward(feats.float())
