"""S3 speech tokenizer v2 (``speech_tokenizer_v2_25hz``): 16 kHz waveform -> 25 Hz FSQ speech tokens.

A port of the reference's ``chatterbox/models/s3tokenizer/s3tokenizer.py`` (a subclass of
``s3tokenizer.S3TokenizerV2``, package ``s3tokenizer``: ``model_v2.py``, ``model.py``, ``utils.py``)
without torchaudio, librosa or the s3tokenizer package at run time. Its weights are the ``tokenizer.*``
keys of the S3Gen checkpoint; the two front-end buffers (``_mel_filters``, ``window``) are recomputed
here and not stored (the reference's S3Token2Wav ignores them as missing too).

The math, for one utterance ``wav`` of N samples at 16 kHz:

1. log-mel:  STFT (periodic Hann 400, hop 160, centred, reflect padding; the last frame is dropped, so
             T = N // 160 frames), |.|^2, 128-band Slaney mel filterbank (``librosa.filters.mel``
             defaults), ``log10(max(mel, 1e-10))``, floored at (utterance max - 8), then ``(x + 4) / 4``.
2. encoder:  two Conv1d(k=3, stride 2, pad 1) + GELU (lengths ``(L - 1) // 2 + 1`` each, so
             ceil(T / 4) tokens), then 6 pre-LN blocks of FSMN attention (rotary q/k on 64-d heads,
             q and k each scaled by ``d_head^-1/4``, additive -1e10 key-padding bias, plus a depthwise
             Conv1d(k=31) "memory" over the masked values) and a GELU MLP (x4).
3. FSQ:      Linear(1280 -> 8), ``round(tanh(h) * 0.999) + 1`` in {0, 1, 2}, read as 8 base-3 digits
             (least significant first) -> token in [0, 3^8 = 6561).

Utterances longer than 30 s (3000 mel frames) are cut into 30 s windows every 26 s, and the tokens of
2 s (half the 4 s overlap) are dropped at each inner seam (``S3TokenizerV2._quantize_mixed_batch``).

Quirks kept from the reference:
* the dynamic-range floor uses each utterance's own maximum (utterances are featurised one by one);
* the batch's padded frames are zeros *after* the log-mel scaling, i.e. not silence; they are masked
  out of the convolutions, attention and FSMN memory, so each utterance's tokens equal its single run;
* ``max_len`` truncates the mel to ``4 * max_len`` frames *before* encoding (not the tokens after),
  but *after* the dynamic-range floor, which therefore still sees the whole utterance's maximum;
* tokens past ``lens[b]`` are unspecified (computed from padding) on the short path, zeros on the
  long (windowed) path.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import length_mask
from .voice_encoder import VoiceEncoderConfig, mel_filterbank


@dataclass(frozen=True)
class S3TokenizerConfig:
    # Front end.
    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160  # 100 mel frames / s
    n_mels: int = 128
    fmin: float = 0.0
    log_floor: float = 1e-10  # clamp before log10
    dynamic_range: float = 8.0  # log10 units below the utterance max
    log_offset: float = 4.0  # (log_spec + offset) / scale
    log_scale: float = 4.0
    token_rate: int = 25
    # Encoder (AudioEncoderV2 with ModelConfig defaults).
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    conv_kernel: int = 3
    conv_stride: int = 2
    fsmn_kernel: int = 31
    mlp_ratio: int = 4
    ln_eps: float = 1e-5
    rope_dim: int = 64  # precompute_freqs_cis(64, 2048): fixed, whatever the head size
    rope_positions: int = 2048
    rope_theta: float = 10000.0
    attn_mask_bias: float = -1.0e10  # mask_to_bias
    # FSQ quantizer.
    fsq_levels: int = 3
    fsq_dim: int = 8
    fsq_scale: float = 0.9990000128746033  # float32(0.999), as exported from ONNX
    # Long utterances (> window_s) are tokenised in overlapping windows.
    window_s: int = 30
    overlap_s: int = 4
    # Derived.
    codebook_size: int = field(init=False)  # 6561
    head_dim: int = field(init=False)
    token_hop: int = field(init=False)  # samples per token: 640
    frames_per_token: int = field(init=False)  # 4
    window_frames: int = field(init=False)  # 3000
    stride_frames: int = field(init=False)  # 2600
    seam_tokens: int = field(init=False)  # 50 tokens dropped on each side of an inner seam

    def __post_init__(self):
        s = object.__setattr__
        s(self, "codebook_size", self.fsq_levels ** self.fsq_dim)
        s(self, "head_dim", self.n_state // self.n_head)
        s(self, "token_hop", self.sample_rate // self.token_rate)
        s(self, "frames_per_token", self.token_hop // self.hop)
        frames_per_s = self.sample_rate // self.hop
        s(self, "window_frames", self.window_s * frames_per_s)
        s(self, "stride_frames", (self.window_s - self.overlap_s) * frames_per_s)
        s(self, "seam_tokens", (self.overlap_s // 2) * self.token_rate)
        assert self.n_state % self.n_head == 0
        assert self.head_dim == self.rope_dim, "the reference's rotary table is fixed at 64-d heads"
        assert self.frames_per_token == self.conv_stride ** 2


def s3_mel_filterbank(config: S3TokenizerConfig = S3TokenizerConfig()) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` float32, bit-equal to ``librosa.filters.mel(sr, n_fft, n_mels)``."""
    c = config
    return mel_filterbank(VoiceEncoderConfig(num_mels=c.n_mels, sample_rate=c.sample_rate, n_fft=c.n_fft,
                                             win_size=c.n_fft, fmin=c.fmin, fmax=c.sample_rate / 2))


def conv_out_len(n: Tensor | int, c: S3TokenizerConfig) -> Tensor | int:
    """Length after one Conv1d(kernel 3, stride 2, padding 1): ``(n - 1) // 2 + 1``."""
    pad = c.conv_kernel // 2
    return (n + 2 * pad - (c.conv_kernel - 1) - 1) // c.conv_stride + 1


def num_tokens(n_samples: int, config: S3TokenizerConfig = S3TokenizerConfig()) -> int:
    """Tokens for an utterance of ``n_samples`` (no ``max_len``, <= 30 s): ceil((n_samples // hop) / 4)."""
    return conv_out_len(conv_out_len(n_samples // config.hop, config), config)


def _rope_table(c: S3TokenizerConfig) -> tuple[Tensor, Tensor]:
    """cos, sin ``[rope_positions, rope_dim]``: each of the rope_dim/2 frequencies twice (rotate-half)."""
    half = c.rope_dim // 2
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, c.rope_dim, 2)[:half].float() / c.rope_dim))
    angles = torch.outer(torch.arange(c.rope_positions), freqs).float()
    # torch.polar, as the reference, so that cos/sin round the same way.
    rot = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    cos, sin = rot[..., 0], rot[..., 1]
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (s3tokenizer.model.LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type(x.dtype)


class FSMNAttention(nn.Module):
    """Multi-head self-attention with rotary q/k plus an FSMN memory (depthwise conv over values)."""

    def __init__(self, c: S3TokenizerConfig):
        super().__init__()
        self.n_head = c.n_head
        self.query = nn.Linear(c.n_state, c.n_state)
        self.key = nn.Linear(c.n_state, c.n_state, bias=False)
        self.value = nn.Linear(c.n_state, c.n_state)
        self.out = nn.Linear(c.n_state, c.n_state)
        self.fsmn_block = nn.Conv1d(c.n_state, c.n_state, c.fsmn_kernel, groups=c.n_state, bias=False)
        left = (c.fsmn_kernel - 1) // 2
        self.fsmn_pad = (left, c.fsmn_kernel - 1 - left)

    def forward(self, x: Tensor, bias: Tensor, mask_pad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x: [B, T, D]; bias: [B, 1, 1, T]; mask_pad: [B, T, 1]; cos, sin: [1, T, 1, Dh]
        B, T, D = x.shape
        scale = (D // self.n_head) ** -0.25
        q = self.query(x).view(B, T, self.n_head, -1)  # [B, T, H, Dh]
        k = self.key(x).view(B, T, self.n_head, -1)
        v = self.value(x)  # [B, T, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        v_masked = v * mask_pad
        memory = self.fsmn_block(F.pad(v_masked.transpose(1, 2), self.fsmn_pad)).transpose(1, 2)
        memory = (memory + v_masked) * mask_pad  # [B, T, D]

        q = q.permute(0, 2, 1, 3) * scale  # [B, H, T, Dh]
        k = k.permute(0, 2, 3, 1) * scale  # [B, H, Dh, T]
        v = v.view(B, T, self.n_head, -1).permute(0, 2, 1, 3)  # [B, H, T, Dh]
        w = torch.softmax((q @ k + bias).float(), dim=-1).to(q.dtype)  # [B, H, T, T]
        wv = (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)  # [B, T, D]
        return self.out(wv) + memory


class EncoderBlock(nn.Module):
    def __init__(self, c: S3TokenizerConfig):
        super().__init__()
        self.attn = FSMNAttention(c)
        self.attn_ln = LayerNorm(c.n_state, eps=c.ln_eps)
        n_mlp = c.n_state * c.mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(c.n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, c.n_state))
        self.mlp_ln = LayerNorm(c.n_state, eps=c.ln_eps)

    def forward(self, x: Tensor, bias: Tensor, mask_pad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x), bias, mask_pad, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


class S3Encoder(nn.Module):
    """AudioEncoderV2: mel ``[B, n_mels, T]`` + lengths -> hidden ``[B, ceil(T/4), n_state]`` + lengths."""

    def __init__(self, c: S3TokenizerConfig):
        super().__init__()
        self.config = c
        pad = c.conv_kernel // 2
        self.conv1 = nn.Conv1d(c.n_mels, c.n_state, c.conv_kernel, stride=c.conv_stride, padding=pad)
        self.conv2 = nn.Conv1d(c.n_state, c.n_state, c.conv_kernel, stride=c.conv_stride, padding=pad)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layer))
        cos, sin = _rope_table(c)
        self.register_buffer("rope_cos", cos, persistent=False)  # [positions, rope_dim]
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, x_len: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        T = x.shape[-1]
        mask = length_mask(x_len, T).unsqueeze(1)  # [B, 1, T]
        x = F.gelu(self.conv1(x * mask))
        x_len, T = conv_out_len(x_len, c), conv_out_len(T, c)
        mask = length_mask(x_len, T).unsqueeze(1)
        x = F.gelu(self.conv2(x * mask))
        x_len, T = conv_out_len(x_len, c), conv_out_len(T, c)
        mask = length_mask(x_len, T).unsqueeze(1)  # [B, 1, T]
        x = x.permute(0, 2, 1)  # [B, T, D]
        mask_pad = mask.transpose(1, 2).to(x.dtype)  # [B, T, 1]
        bias = ((1.0 - mask.to(x.dtype)) * c.attn_mask_bias).unsqueeze(1)  # [B, 1, 1, T]
        if T > c.rope_positions:
            raise ValueError(f"{T} encoder frames exceed the rotary table ({c.rope_positions})")
        cos = self.rope_cos[None, :T, None, :].to(x.dtype)  # [1, T, 1, Dh]
        sin = self.rope_sin[None, :T, None, :].to(x.dtype)
        for block in self.blocks:
            x = block(x, bias, mask_pad, cos, sin)
        return x, x_len


class FSQCodebook(nn.Module):
    """Finite scalar quantisation: project to fsq_dim digits in {0..levels-1} -> base-levels index."""

    def __init__(self, c: S3TokenizerConfig):
        super().__init__()
        self.config = c
        self.project_down = nn.Linear(c.n_state, c.fsq_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` -> int32 tokens ``[B, T]``."""
        c = self.config
        h = self.project_down(x).float().tanh() * c.fsq_scale
        digits = h.round() + 1  # in {0, 1, 2}
        powers = c.fsq_levels ** torch.arange(c.fsq_dim, device=x.device, dtype=h.dtype)
        return (digits * powers).sum(dim=-1).int()


class FSQVectorQuantization(nn.Module):
    """Holds the codebook under the reference's key (``quantizer._codebook.project_down``)."""

    def __init__(self, c: S3TokenizerConfig):
        super().__init__()
        self._codebook = FSQCodebook(c)

    def forward(self, x: Tensor) -> Tensor:
        return self._codebook(x)


class S3Tokenizer(nn.Module):
    """``S3Tokenizer("speech_tokenizer_v2_25hz")`` of the reference: waveforms -> (tokens, lens)."""

    # Front-end buffers the reference registers (persistent) but the checkpoint does not hold.
    RECOMPUTED_BUFFERS = ("_mel_filters", "window")

    def __init__(self, config: S3TokenizerConfig = S3TokenizerConfig()):
        super().__init__()
        c = self.config = config
        self.encoder = S3Encoder(c)
        self.quantizer = FSQVectorQuantization(c)
        self.register_buffer("_mel_filters", torch.from_numpy(s3_mel_filterbank(c).copy()), persistent=False)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------------------
    # Front end
    # ------------------------------------------------------------------------------------------
    def log_mel_spectrogram(self, audio: Tensor | np.ndarray) -> Tensor:
        """``[..., N]`` 16 kHz float32 -> ``[..., n_mels, N // hop]``; the floor uses the max over all of it."""
        c = self.config
        if not torch.is_tensor(audio):
            audio = torch.from_numpy(np.asarray(audio))
        audio = audio.to(self._mel_filters.device)
        stft = torch.stft(audio, c.n_fft, c.hop, window=self.window, return_complex=True)
        magnitudes = stft[..., :-1].abs() ** 2  # the last (centred) frame is dropped
        log_spec = torch.clamp(self._mel_filters @ magnitudes, min=c.log_floor).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - c.dynamic_range)
        return (log_spec + c.log_offset) / c.log_scale

    def featurize(self, wavs: Sequence[Tensor | np.ndarray] | Tensor,
                  max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Waveforms -> zero-padded mels ``[B, n_mels, T]`` and int32 frame counts ``[B]``."""
        mels = []
        for wav in wavs:
            wav = torch.from_numpy(np.asarray(wav)) if not torch.is_tensor(wav) else wav
            if wav.dim() == 2:
                if wav.shape[0] != 1:
                    raise ValueError(f"expected 1-D waveforms (or [1, N]), got shape {tuple(wav.shape)}")
                wav = wav[0]
            mel = self.log_mel_spectrogram(wav.float())  # [n_mels, T]
            if max_len is not None:
                mel = mel[:, :max_len * self.config.frames_per_token]
            mels.append(mel)
        lens = torch.tensor([m.shape[1] for m in mels], dtype=torch.int32, device=self._mel_filters.device)
        feats = torch.zeros(len(mels), self.config.n_mels, int(lens.max()), device=lens.device)
        for i, m in enumerate(mels):
            feats[i, :, :m.shape[1]] = m
        return feats, lens

    # ------------------------------------------------------------------------------------------
    # Encoder + quantizer
    # ------------------------------------------------------------------------------------------
    def encode(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-quantisation hidden states ``[B, T', n_state]`` and token lengths (short path)."""
        return self.encoder(mel, mel_len)

    def quantize(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """mel ``[B, n_mels, T]`` + lengths -> tokens ``[B, T']`` + lengths (windowed past 30 s)."""
        # NOTE: .any() syncs with the device; the reference does the same check.
        if (mel_len > self.config.window_frames).any():
            return self._quantize_windowed(mel, mel_len)
        hidden, code_len = self.encoder(mel, mel_len)
        return self.quantizer(hidden), code_len

    def _quantize_windowed(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """S3TokenizerV2._quantize_mixed_batch: every utterance padded/cut to 30 s windows, one batch."""
        c = self.config
        W = c.window_frames
        segments, seg_lens, owner = [], [], []  # owner: batch index of each segment
        for b, n in enumerate(mel_len.tolist()):
            starts = [0] if n <= W else range(0, n, c.stride_frames)
            for start in starts:
                seg = mel[b, :, start:min(start + W, n)]
                seg_lens.append(seg.shape[1])
                segments.append(F.pad(seg, (0, W - seg.shape[1])))
                owner.append(b)
        hidden, code_len = self.encoder(torch.stack(segments),
                                        torch.tensor(seg_lens, dtype=mel_len.dtype, device=mel.device))
        codes = self.quantizer(hidden).long()
        per_utt: list[list[Tensor]] = [[] for _ in range(mel.shape[0])]
        for i, b in enumerate(owner):
            per_utt[b].append(codes[i, :int(code_len[i])])
        merged = []
        for segs in per_utt:
            if len(segs) == 1:
                merged.append(segs[0])
                continue
            # Keep the middle of each window: drop half the overlap on each inner seam.
            k = c.seam_tokens
            merged.append(torch.cat([s[(k if j > 0 else 0):(-k if j < len(segs) - 1 else None)]
                                     for j, s in enumerate(segs)]))
        lens = torch.tensor([len(m) for m in merged], dtype=torch.long, device=mel.device)
        out = torch.zeros(len(merged), int(lens.max()), dtype=torch.long, device=mel.device)
        for b, m in enumerate(merged):
            out[b, :len(m)] = m
        return out, lens

    @torch.inference_mode()
    def forward(self, wavs: Sequence[Tensor | np.ndarray] | Tensor,
                max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """16 kHz waveforms (list of 1-D, or rows of a 2-D tensor) -> tokens ``[B, T]`` (long), lens ``[B]``.

        ``max_len`` keeps at most ``4 * max_len`` mel frames per utterance (i.e. <= max_len tokens).
        """
        mels, mel_lens = self.featurize(wavs, max_len)
        tokens, lens = self.quantize(mels, mel_lens)
        return tokens.long(), lens.long()
