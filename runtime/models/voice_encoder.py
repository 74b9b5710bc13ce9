"""Speaker voice encoder (the ``ve`` checkpoint): 16 kHz waveform -> 256-d L2-normalised embedding.

A port of the reference's ``chatterbox/models/voice_encoder/{config,melspec,voice_encoder}.py``
(itself adapted from CorentinJ/Real-Time-Voice-Cloning) without librosa or scipy at run time.

The math, for one utterance ``wav`` at 16 kHz:

1. trim:    drop leading/trailing frames whose RMS is ``trim_top_db`` dB below the loudest frame
            (``librosa.effects.trim``: 2048-sample frames, hop 512, zero-padded centred frames).
2. mel:     |STFT(wav)|^2 (periodic Hann 400, hop 160, centred with reflect padding), projected on a
            40-band Slaney mel filterbank (0..8 kHz, Slaney area norm) -> ``[T, 40]``; no log, no
            normalisation (``mel_type="amp"``, ``normalized_mels=False``, ``preemphasis=0``).
3. partials: windows of 160 frames every ``step`` frames; ``step = round((16000 / rate) / 160)``
            (77 for the default ``rate=1.3``) — a quirk kept from the reference: the formula divides
            by the partial length where a frame rate was probably meant. The last window is kept
            only if it covers at least ``min_coverage`` of real frames; the mel is zero-padded to fit.
4. embed:   3-layer LSTM(40 -> 256) -> last layer's final hidden state -> Linear(256, 256) -> ReLU
            -> L2 normalise (per partial); mean over partials -> L2 normalise (per utterance).

Numerics follow the reference: the STFT is taken in float64 and rounded to complex64 (librosa
multiplies the float32 frames by a float64 window), magnitudes are squared and projected in float32.
The trim is done in numpy with librosa's exact float32 arithmetic so that frame decisions match.

Resampling (``sample_rate != 16000``) uses ``soxr`` (high quality); the reference uses
``librosa.resample(res_type="kaiser_fast")`` (resampy). The two are close but NOT bit-identical, so
embeddings of non-16 kHz input differ slightly from the reference's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import as_strided
from torch import Tensor, nn

from .melbank import hz_to_mel_slaney, mel_to_hz_slaney, slaney_mel_basis  # noqa: F401


@dataclass(frozen=True)
class VoiceEncoderConfig:
    """Constants of the reference's ``VoiceEncConfig`` plus the defaults of its call chain."""

    num_mels: int = 40
    sample_rate: int = 16000
    speaker_embed_size: int = 256
    ve_hidden_size: int = 256
    num_lstm_layers: int = 3
    flatten_lstm_params: bool = False
    n_fft: int = 400
    hop_size: int = 160
    win_size: int = 400
    fmax: float = 8000
    fmin: float = 0
    preemphasis: float = 0.0
    mel_power: float = 2.0
    mel_type: str = "amp"  # "amp" or "db"
    normalized_mels: bool = False
    ve_partial_frames: int = 160
    ve_final_relu: bool = True
    stft_magnitude_min: float = 1e-4
    normalize_headroom_db: float = 15.0
    # Initial values of the (unused at inference) cosine-similarity scaling parameters.
    similarity_weight_init: float = 10.0
    similarity_bias_init: float = -5.0
    default_rate: float = 1.3  # embeds_from_wavs' "Resemble's default value" for the partial rate
    # librosa.effects.trim defaults (frame_length, hop_length) and amplitude_to_db's amin.
    trim_frame_length: int = 2048
    trim_hop_length: int = 512
    trim_amin: float = 1e-5
    n_freqs: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "n_freqs", self.n_fft // 2 + 1)
        assert self.fmax <= self.sample_rate // 2


# ----------------------------------------------------------------------------------------------
# Mel filterbank: librosa.filters.mel (htk=False, norm="slaney", dtype=float32), reproduced in
# s3gen/mel.py (shared with S3Gen's prompt mel and the S3 tokenizer).
# ----------------------------------------------------------------------------------------------
def mel_filterbank(config: VoiceEncoderConfig = VoiceEncoderConfig()) -> np.ndarray:
    """``[num_mels, n_freqs]`` float32 triangular Slaney filters, bit-equal to librosa's. Read-only."""
    c = config
    return slaney_mel_basis(c.sample_rate, c.n_fft, c.num_mels, c.fmin, c.fmax)


# ----------------------------------------------------------------------------------------------
# Mel spectrogram (melspec.py)
# ----------------------------------------------------------------------------------------------
def _reflect_pad(x: Tensor, pad: int) -> Tensor:
    if x.shape[-1] > pad:
        return F.pad(x[None], (pad, pad), mode="reflect")[0]
    # torch's reflect pad needs pad < length; numpy's repeats the reflection like librosa does.
    return torch.from_numpy(np.pad(x.cpu().numpy(), (pad, pad), mode="reflect")).to(x.device)


def _stft_power(wav: Tensor, c: VoiceEncoderConfig, center: bool) -> Tensor:
    """librosa.stft(center, pad_mode="reflect") -> |.|^mel_power, ``[n_freqs, T]`` in wav's dtype."""
    complex_dtype = torch.complex64 if wav.dtype == torch.float32 else torch.complex128
    y = wav.to(torch.float64)
    if center:
        y = _reflect_pad(y, c.n_fft // 2)
    if y.shape[-1] < c.n_fft:
        raise ValueError(f"signal of {wav.shape[-1]} samples is too short for n_fft={c.n_fft} without centering")
    window = torch.hann_window(c.win_size, periodic=True, dtype=torch.float64, device=y.device)
    left = (c.n_fft - c.win_size) // 2  # librosa.util.pad_center
    window = F.pad(window, (left, c.n_fft - c.win_size - left))
    frames = y.unfold(-1, c.n_fft, c.hop_size)  # [T, n_fft]
    spec = torch.fft.rfft(frames * window, dim=-1).to(complex_dtype).T  # [n_freqs, T]
    mag = spec.abs()
    if c.mel_power != 1.0:
        mag = mag ** c.mel_power
    return mag


def _amp_to_db(x: Tensor, c: VoiceEncoderConfig) -> Tensor:
    return 20 * torch.log10(torch.clamp(x, min=c.stft_magnitude_min))


def _normalize(s: Tensor, c: VoiceEncoderConfig) -> Tensor:
    min_level_db = 20 * np.log10(c.stft_magnitude_min)
    return (s - min_level_db) / (-min_level_db + c.normalize_headroom_db)


def _preemphasis(wav: Tensor, c: VoiceEncoderConfig) -> Tensor:
    # scipy.signal.lfilter([1, -k], [1], wav) is an FIR: y[n] = x[n] - k x[n-1]; then clip.
    y = wav.to(torch.float64)
    y = torch.cat([y[:1], y[1:] - c.preemphasis * y[:-1]])
    return y.clamp(-1, 1)


def melspectrogram(wav: np.ndarray | Tensor, config: VoiceEncoderConfig = VoiceEncoderConfig(),
                   pad: bool = True) -> Tensor:
    """Mel spectrogram ``[num_mels, T]`` (T = 1 + len // hop when ``pad``), as the reference's
    ``melspectrogram(wav, hp, pad)``. float32 input gives float32 output (float64 gives float64)."""
    c = config
    wav = torch.as_tensor(wav)
    if not wav.is_floating_point():
        raise TypeError(f"audio must be floating point, got {wav.dtype}")
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform [n], got shape {tuple(wav.shape)}")
    if c.preemphasis > 0:
        # scipy.lfilter returns float64 whatever the input dtype.
        wav = _preemphasis(wav, c)
    power = _stft_power(wav, c, center=pad)
    basis = torch.from_numpy(np.array(mel_filterbank(c))).to(device=power.device, dtype=power.dtype)
    mel = basis @ power
    if c.mel_type == "db":
        mel = _amp_to_db(mel, c)
    if c.normalized_mels:
        mel = _normalize(mel, c).to(torch.float32)
    assert not pad or mel.shape[1] == 1 + len(wav) // c.hop_size
    return mel  # [M, T]


# ----------------------------------------------------------------------------------------------
# Silence trimming: librosa.effects.trim(y, top_db) with its defaults (ref=np.max), in numpy.
# ----------------------------------------------------------------------------------------------
def trim_silence(wav: np.ndarray, top_db: float, config: VoiceEncoderConfig = VoiceEncoderConfig()
                 ) -> tuple[np.ndarray, tuple[int, int]]:
    """Returns ``(wav[start:end], (start, end))``; an all-silent signal gives an empty slice."""
    c = config
    y = np.asarray(wav)
    if y.ndim != 1:
        raise ValueError(f"expected a mono waveform [n], got shape {y.shape}")
    half = c.trim_frame_length // 2
    # feature.rms: zero-padded centred frames, mean of float32 squares over each frame.
    yp = np.pad(y, (half, half), mode="constant")
    n_frames = 1 + (yp.shape[-1] - c.trim_frame_length) // c.trim_hop_length
    frames = as_strided(yp, shape=(c.trim_frame_length, n_frames),
                        strides=(yp.strides[0], yp.strides[0] * c.trim_hop_length), writeable=False)
    power = np.mean(np.square(frames, dtype=np.float32), axis=0)
    rms = np.sqrt(power)
    # amplitude_to_db(rms, ref=np.max, top_db=None) = power_to_db(rms^2, ref=max^2, amin=amin^2)
    ref = np.max(rms)
    db = 10.0 * np.log10(np.maximum(c.trim_amin ** 2, np.square(rms)))
    db -= 10.0 * np.log10(np.maximum(c.trim_amin ** 2, ref ** 2))
    nonzero = np.flatnonzero(db > -top_db)
    if nonzero.size > 0:
        start = int(nonzero[0] * c.trim_hop_length)
        end = min(y.shape[-1], int((nonzero[-1] + 1) * c.trim_hop_length))
    else:
        start, end = 0, 0
    return y[start:end], (start, end)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample with soxr. NOTE: the reference uses librosa's kaiser_fast (resampy); not bit-identical."""
    try:
        import soxr
    except ImportError as e:
        raise ImportError(
            f"resampling {orig_sr} Hz -> {target_sr} Hz audio for the voice encoder needs the `soxr` package "
            f"(pip install soxr), or pass audio already at {target_sr} Hz") from e
    y = np.asarray(wav)
    return soxr.resample(y, orig_sr, target_sr, quality="HQ").astype(y.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# Partial windows
# ----------------------------------------------------------------------------------------------
def get_num_wins(n_frames: int, step: int, min_coverage: float, config: VoiceEncoderConfig) -> tuple[int, int]:
    """(number of partial windows, mel length they span) for a mel of ``n_frames`` frames."""
    assert n_frames > 0
    win_size = config.ve_partial_frames
    n_wins, remainder = divmod(max(n_frames - win_size + step, 0), step)
    if n_wins == 0 or (remainder + (win_size - step)) / win_size >= min_coverage:
        n_wins += 1
    target_n = win_size + step * (n_wins - 1)
    return n_wins, target_n


def get_frame_step(overlap: float, rate: float | None, config: VoiceEncoderConfig) -> int:
    """Frames between two partials. NOTE: with ``rate`` the reference computes
    ``round((sample_rate / rate) / partial_frames)`` (77 for rate 1.3); kept as is."""
    assert 0 <= overlap < 1
    if rate is None:
        frame_step = int(np.round(config.ve_partial_frames * (1 - overlap)))
    else:
        frame_step = int(np.round((config.sample_rate / rate) / config.ve_partial_frames))
    assert 0 < frame_step <= config.ve_partial_frames
    return frame_step


def stride_as_partials(mel: np.ndarray, config: VoiceEncoderConfig = VoiceEncoderConfig(), overlap: float = 0.5,
                       rate: float | None = None, min_coverage: float = 0.8) -> np.ndarray:
    """``[T, M]`` mel -> overlapping partials ``[N, P, M]`` (a strided float32 view)."""
    c = config
    assert 0 < min_coverage <= 1
    frame_step = get_frame_step(overlap, rate, c)
    n_partials, target_len = get_num_wins(len(mel), frame_step, min_coverage, c)
    if target_len > len(mel):
        mel = np.concatenate((mel, np.full((target_len - len(mel), c.num_mels), 0)))
    elif target_len < len(mel):
        mel = mel[:target_len]
    mel = mel.astype(np.float32, order="C")
    shape = (n_partials, c.ve_partial_frames, c.num_mels)
    strides = (mel.strides[0] * frame_step, mel.strides[0], mel.strides[1])
    return as_strided(mel, shape, strides)


def pack(arrays: Sequence, seq_len: int | None = None, pad_value=0) -> Tensor:
    """List of ``[Ti, ...]`` arrays/tensors -> ``[B, T, ...]`` tensor, right-padded with ``pad_value``."""
    if seq_len is None:
        seq_len = max(len(a) for a in arrays)
    else:
        assert seq_len >= max(len(a) for a in arrays)
    tensors = [a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a)) for a in arrays]
    device = tensors[0].device
    packed = torch.full((len(tensors), seq_len, *tensors[0].shape[1:]), pad_value,
                        dtype=tensors[0].dtype, device=device)
    for i, t in enumerate(tensors):
        packed[i, :t.size(0)] = t.to(device)
    return packed


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
def wav_mels(wavs, sample_rate: int, trim_top_db: float | None, config: VoiceEncoderConfig,
             device=None) -> list[Tensor]:
    """``embeds_from_wavs``'s signal side (no weights): waveforms as float32 (the reference's LSTM
    needs float32 mels), resampled to 16 kHz, silence trimmed at ``trim_top_db`` -> mels ``[T, M]``."""
    c = config
    wavs = [(w.detach().cpu().numpy() if isinstance(w, Tensor) else np.asarray(w)).astype(np.float32, copy=False)
            for w in wavs]
    if sample_rate != c.sample_rate:
        wavs = [resample(w, sample_rate, c.sample_rate) for w in wavs]
    if trim_top_db:
        wavs = [trim_silence(w, trim_top_db, c)[0] for w in wavs]
    return [melspectrogram(torch.from_numpy(np.ascontiguousarray(w)).to(device), c).T for w in wavs]


class VoiceEncoder(nn.Module):
    """State-dict keys/shapes equal the reference ``VoiceEncoder``'s (``lstm.*``, ``proj.*``,
    ``similarity_weight``, ``similarity_bias``)."""

    def __init__(self, config: VoiceEncoderConfig = VoiceEncoderConfig()):
        super().__init__()
        c = self.config = config
        self.lstm = nn.LSTM(c.num_mels, c.ve_hidden_size, num_layers=c.num_lstm_layers, batch_first=True)
        if c.flatten_lstm_params:
            self.lstm.flatten_parameters()
        self.proj = nn.Linear(c.ve_hidden_size, c.speaker_embed_size)
        # Cosine-similarity scaling; trained with the encoder, unused at inference, kept for loading.
        self.similarity_weight = nn.Parameter(torch.tensor([c.similarity_weight_init]))
        self.similarity_bias = nn.Parameter(torch.tensor([c.similarity_bias_init]))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, mels: Tensor) -> Tensor:
        """Partials ``[B, P, M]`` -> L2-normalised embeddings ``[B, E]``. An all-zero ReLU output
        gives NaN, as in the reference."""
        if self.config.normalized_mels and (mels.min() < 0 or mels.max() > 1):
            raise ValueError(f"Mels outside [0, 1]. Min={mels.min()}, Max={mels.max()}")
        _, (hidden, _) = self.lstm(mels)  # hidden: [layers, B, H]
        raw = self.proj(hidden[-1])
        if self.config.ve_final_relu:
            raw = F.relu(raw)
        return raw / torch.linalg.norm(raw, dim=1, keepdim=True)

    def inference(self, mels: Tensor, mel_lens, overlap: float = 0.5, rate: float | None = None,
                  min_coverage: float = 0.8, batch_size: int | None = None) -> Tensor:
        """Full utterances ``[B, T, M]`` (+ lengths) -> utterance embeddings ``[B, E]`` on CPU."""
        c = self.config
        mel_lens = mel_lens.tolist() if torch.is_tensor(mel_lens) else list(mel_lens)
        frame_step = get_frame_step(overlap, rate, c)
        n_partials, target_lens = zip(*(get_num_wins(n, frame_step, min_coverage, c) for n in mel_lens), strict=True)

        len_diff = max(target_lens) - mels.size(1)
        if len_diff > 0:
            pad = torch.zeros((mels.size(0), len_diff, c.num_mels), dtype=torch.float32, device=mels.device)
            mels = torch.cat((mels, pad), dim=1)

        partials = torch.stack([
            mel[i * frame_step: i * frame_step + c.ve_partial_frames]
            for mel, n in zip(mels, n_partials, strict=True) for i in range(n)
        ])  # [N, P, M]

        # NOTE: Tensor.chunk(n_chunks) makes chunks of ceil(N / n_chunks), not of batch_size;
        # kept because the LSTM's batch shape can change its rounding.
        n_chunks = int(np.ceil(len(partials) / (batch_size or len(partials))))
        partial_embeds = torch.cat([self(batch) for batch in partials.chunk(n_chunks)], dim=0).cpu()

        slices = np.concatenate(([0], np.cumsum(n_partials)))
        raw = torch.stack([partial_embeds[s:e].mean(dim=0) for s, e in pairwise(slices)])
        return raw / torch.linalg.norm(raw, dim=1, keepdim=True)

    @staticmethod
    def utt_to_spk_embed(utt_embeds: np.ndarray) -> np.ndarray:
        """Mean of L2-normalised utterance embeddings ``[n, E]``, L2-normalised -> ``[E]``."""
        assert utt_embeds.ndim == 2
        e = np.mean(utt_embeds, axis=0)
        return e / np.linalg.norm(e, 2)

    @staticmethod
    def voice_similarity(embeds_x: np.ndarray, embeds_y: np.ndarray):
        """Cosine similarity of utterance (``[n, E]``, reduced to a speaker) or speaker (``[E]``) embeddings."""
        embeds_x = embeds_x if embeds_x.ndim == 1 else VoiceEncoder.utt_to_spk_embed(embeds_x)
        embeds_y = embeds_y if embeds_y.ndim == 1 else VoiceEncoder.utt_to_spk_embed(embeds_y)
        return embeds_x @ embeds_y

    def embeds_from_mels(self, mels: Tensor | list, mel_lens=None, as_spk: bool = False,
                         batch_size: int = 32, **kwargs) -> np.ndarray:
        """``[B, T, M]`` tensor (+ ``mel_lens``) or list of ``[Ti, M]`` mels -> ``[B, E]`` (``[E]`` if as_spk)."""
        if isinstance(mels, (list, tuple)):
            mels = [m if isinstance(m, Tensor) else np.asarray(m) for m in mels]
            assert all(m.shape[1] == mels[0].shape[1] for m in mels), "Mels aren't in (B, T, M) format"
            mel_lens = [m.shape[0] for m in mels]
            mels = pack(mels)
        with torch.inference_mode():
            utt = self.inference(mels.to(self.device), mel_lens, batch_size=batch_size, **kwargs).numpy()
        return self.utt_to_spk_embed(utt) if as_spk else utt

    def embeds_from_wavs(self, wavs: list[np.ndarray | Tensor], sample_rate: int, as_spk: bool = False,
                         batch_size: int = 32, trim_top_db: float | None = 20, **kwargs) -> np.ndarray:
        """Waveforms -> ``[B, E]`` utterance embeddings (``[E]`` if as_spk). Defaults as the reference:
        silence trimmed at 20 dB, ``rate=1.3`` unless given.

        Waveforms are taken as float32 (the reference needs float32 too: float64 mels fail in its LSTM).
        """
        kwargs.setdefault("rate", self.config.default_rate)
        mels = wav_mels(wavs, sample_rate, trim_top_db, self.config, self.device)
        return self.embeds_from_mels(mels, as_spk=as_spk, batch_size=batch_size, **kwargs)
