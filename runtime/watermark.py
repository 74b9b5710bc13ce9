"""Resemble AI's PerthNet implicit audio watermark, without librosa, torchaudio or pkg_resources.

The reference (chatterbox-tts 0.1.7) passes every output through
``perth.PerthImplicitWatermarker().apply_watermark(wav, sample_rate=24000)`` (resemble-perth 1.0.1).
This file re-implements that call and its detector ``get_watermark``; from resemble-perth we use
only the pretrained weights shipped inside the package (``perth/perth_net/pretrained/implicit/``:
``hparams.yaml`` + ``perth_net_<step>.pth.tar``), located without importing ``perth``.

The math (``perth/perth_net/perth_net_implicit/{perth_watermarker,audio_processor,utils}.py``,
``model/{__init__,encoder,decoder}.py``), for a mono signal at ``sr``:

1. resample sr -> 32 kHz: librosa's default ``resample`` == ``soxr.resample(quality="HQ")`` followed
   by ``fix_length`` to ``ceil(n * 32000 / sr)`` samples (zero-pad or trim).
2. STFT: torchaudio ``Spectrogram(power=None)`` == ``torch.stft`` (periodic Hann 2048, hop 320,
   n_fft 2048, centred with reflect padding, onesided, not normalised) -> ``[1025, T]`` complex.
3. magphase: ``phase = angle(S)``, ``mag = (20 log10(max(|S|, 1e-9)) + 180) / 195`` (the dB scale
   normalised to [-180 dB, +15 dB headroom]).
4. encoder: on the lowest 128 bins (0..2 kHz) a conv stack predicts a residual, gated per frame
   by ``magmask`` (frames whose bin-sum exceeds 5 % of the loudest frame), added to the magnitude.
5. inverse: ``|S| = 10 ** min(denorm(mag) / 20, 10)``, ``S = |S| exp(i phase)``; torchaudio
   ``InverseSpectrogram`` == ``torch.istft`` with the same settings and ``length=None``, so the
   signal comes back truncated to a multiple of the hop (320 samples).
6. resample 32 kHz -> sr as in 1.

Detection resamples with librosa's ``res_type="polyphase"`` (``scipy.signal.resample_poly``,
re-implemented below in numpy), takes the same magnitude, and runs the three-rate decoder; the
result is one confidence in [0, 1] per clip. Perth's ``get_watermark`` rounds it to 0/1;
``Watermarker.detect`` returns it unrounded.

The network runs in torch on the chosen device; resampling runs in numpy/soxr on the host, as
in the reference.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

PERTH_PACKAGE = "perth"
PERTH_DISTRIBUTION = "resemble-perth"
PRETRAINED_SUBDIR = ("perth_net", "pretrained", "implicit")
HPARAMS_FILE = "hparams.yaml"
CHECKPOINT_PREFIX, CHECKPOINT_SUFFIX = "perth_net_", ".pth.tar"

HEADROOM_DB = 15.0           # top of the normalised dB scale above 0 dBFS (perth utils.normalize)
MAX_LOG_MAGNITUDE = 10.0     # magphase_to_cx clips the log10 magnitude here before exponentiating
MAGMASK_FRACTION = 0.05      # frames louder than this fraction of the loudest one carry the mark
N_HIDDEN_CONVS, HIDDEN_KERNEL = 5, 7
DECODER_RATES = (1.25, 1.0, 0.75)  # slow, normal, fast branches: time-stretch of the sub-band
POLYPHASE_HALF_LEN, POLYPHASE_KAISER_BETA = 10, 5.0  # scipy.signal.resample_poly's default filter

# Checkpoint entries that are not network weights: torchaudio's transform buffers. The STFT window
# is used (it is a periodic Hann window); TimeStretch's phase advance served training only.
WINDOW_KEY = "ap.spectrogram.window"
AUX_KEYS = (WINDOW_KEY, "ap.inv_spectrogram.window", "ap.stretch.phase_advance")


class WatermarkUnavailable(RuntimeError):
    """The PerthNet weights (shipped in the resemble-perth package) cannot be found or read."""


def _unavailable(reason: str) -> WatermarkUnavailable:
    return WatermarkUnavailable(
        f"{reason}. The output watermark needs the PerthNet weights shipped in the "
        f"`{PERTH_DISTRIBUTION}` package: `pip install {PERTH_DISTRIBUTION}` (it is not imported, only "
        "its weight file is read), or turn the watermark off with `watermark=False` / `--no-watermark`.")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def parse_hparams(text: str) -> dict:
    """Parse perth's flat ``hparams.yaml`` (``key: value`` lines) without PyYAML.

    Scalars only: ints, floats (``1.0e-09``), ``true``/``false``, ``null`` and plain or quoted
    strings; blank lines and ``#`` comments are skipped. Anything nested raises ValueError.
    """
    out = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or line[0].isspace() or line.startswith("-") or not key.strip():
            raise ValueError(f"hparams line {lineno}: expected a flat `key: value`, got {raw!r}")
        value = value.strip()
        if not value or value[0] in "[{|>&*!":
            raise ValueError(f"hparams line {lineno}: unsupported (non-scalar) value in {raw!r}")
        out[key.strip()] = _parse_scalar(value)
    return out


def _parse_scalar(value: str):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue  # not this type; try the next
    return value


@dataclass
class PerthConfig:
    """The hparams PerthNet inference uses (``perth_net_implicit/config.py``; training ones dropped)."""

    sample_rate: int = 32000
    n_fft: int = 2048
    hop_size: int = 320
    window_size: int = 2048
    stft_magnitude_min: float = 1e-9
    max_wmark_freq: float = 2000
    hidden_size: int = 256
    window_fn: str = "hann"
    # derived: number of low STFT bins (0 .. max_wmark_freq) that carry the watermark
    subband: int = field(init=False)

    def __post_init__(self):
        if self.window_fn != "hann":
            raise ValueError(f"PerthNet window_fn {self.window_fn!r} is not supported (only 'hann')")
        nfreq = self.n_fft // 2 + 1
        self.subband = int(round(nfreq * self.max_wmark_freq / (self.sample_rate / 2)))

    @classmethod
    def from_hparams(cls, hp: dict) -> "PerthConfig":
        names = [f for f in cls.__dataclass_fields__ if f != "subband"]
        missing = [n for n in names if n not in hp]
        if missing:
            raise ValueError(f"hparams lack {missing}")
        return cls(**{n: hp[n] for n in names})


# ----------------------------------------------------------------------------------------------
# Network (state-dict names as in perth's PerthNet)
# ----------------------------------------------------------------------------------------------
class Conv(nn.Module):
    """'Same'-padded Conv1d, optionally followed by LeakyReLU (perth ``model.Conv``)."""

    def __init__(self, i: int, o: int, k: int, act: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(i, o, k, padding=(k - 1) // 2)
        self.act = nn.LeakyReLU() if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


def _conv_stack(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        Conv(c_in, hidden, 1),
        *[Conv(hidden, hidden, HIDDEN_KERNEL) for _ in range(N_HIDDEN_CONVS)],
        Conv(hidden, c_out, 1, act=False),
    )


def magmask(magspec: Tensor, p: float = MAGMASK_FRACTION) -> Tensor:
    """[B, F, T] -> [B, T] float mask of frames whose summed magnitude exceeds p * the loudest frame's."""
    s = magspec.sum(dim=1)  # [B, T]
    thresh = s.max(dim=1).values * p  # [B]
    return (s > thresh[:, None]).float()


class Encoder(nn.Module):
    """Adds a watermark residual to the sub-band of a normalised magnitude spectrogram."""

    def __init__(self, hidden: int, subband: int):
        super().__init__()
        self.subband = subband
        self.layers = _conv_stack(subband, hidden, subband)

    def forward(self, magspec: Tensor) -> Tensor:  # [B, F, T] -> [B, F, T]
        mask = magmask(magspec)[:, None]  # [B, 1, T]
        res = self.layers(magspec[:, :self.subband]) * mask
        # NOTE: clone + in-place add, not torch.cat: clone keeps the STFT's time-major strides, and the
        # element-wise ops of the inverse path round differently (by an ulp) on another layout.
        out = magspec.clone()
        out[:, :self.subband] += res
        return out


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum(dim=2) / m.sum(dim=2)  # [B, C]


class Decoder(nn.Module):
    """Watermark confidence from a magnitude spectrogram: three time-stretched branches, attention-pooled."""

    def __init__(self, hidden: int, subband: int):
        super().__init__()
        self.subband = subband
        self.slow_layers = _conv_stack(subband, hidden, 2)
        self.normal_layers = _conv_stack(subband, hidden, 2)
        self.fast_layers = _conv_stack(subband, hidden, 2)

    def forward(self, magspec: Tensor) -> Tensor:  # [B, F, T] -> [B]
        mask = magmask(magspec)[:, None]  # [B, 1, T]
        subband = magspec[:, :self.subband]
        T = subband.shape[2]
        attns, wmarks = [], []
        for layers, rate in zip((self.slow_layers, self.normal_layers, self.fast_layers), DECODER_RATES, strict=True):
            x = subband
            if rate != 1.0:
                x = F.interpolate(x, size=int(T * rate), mode="linear", align_corners=True)
            out = layers(x)  # [B, 2, T_rate]: attention logit, watermark
            m = F.interpolate(mask, size=out.size(2), mode="nearest")
            attns.append(_masked_mean(out[:, :1], m))
            wmarks.append(_masked_mean(out[:, 1:], m))
        attn = F.softmax(torch.cat(attns, dim=1), dim=1)  # [B, 3]
        return (torch.cat(wmarks, dim=1) * attn).sum(dim=1)


class PerthNet(nn.Module):
    """Encoder + decoder + the STFT round trip, all in torch on one device."""

    def __init__(self, cfg: PerthConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.hidden_size, cfg.subband)
        self.decoder = Decoder(cfg.hidden_size, cfg.subband)
        self.register_buffer("window", torch.hann_window(cfg.window_size), persistent=False)

    def load_perth_state_dict(self, sd: dict) -> None:
        """Load perth's ``ckpt["model"]``: network keys strictly, plus the STFT window buffer."""
        sd = dict(sd)
        missing_aux = [k for k in AUX_KEYS if k not in sd]
        if missing_aux:
            raise ValueError(f"PerthNet checkpoint lacks {missing_aux}")
        window = sd[WINDOW_KEY]
        for k in AUX_KEYS:
            del sd[k]
        self.load_state_dict(sd, strict=True)
        if window.shape != self.window.shape:
            raise ValueError(f"PerthNet window shape {tuple(window.shape)} != {tuple(self.window.shape)}")
        self.window.copy_(window)

    # NOTE: the expressions below mirror perth's utils.py operation for operation (constants in
    # the same order, exp(1j * phase) rather than torch.polar) so the output matches bit for bit.
    def signal_to_magphase(self, signal: Tensor) -> tuple[Tensor, Tensor]:
        """[N] float32 at cfg.sample_rate -> normalised magnitude and phase, each [F, T]."""
        c = self.cfg
        if signal.numel() <= c.n_fft // 2:  # reflect padding needs more samples than the pad
            raise ValueError(f"PerthNet needs more than {c.n_fft // 2} samples at {c.sample_rate} Hz "
                             f"(~{1000 * c.n_fft // 2 // c.sample_rate} ms) to watermark; got {signal.numel()}")
        spec = torch.stft(signal.reshape(1, -1), n_fft=c.n_fft, hop_length=c.hop_size, win_length=c.window_size,
                          window=self.window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True)[0]
        phase = torch.angle(spec)
        mag = 20 * torch.log10(spec.abs().clip(c.stft_magnitude_min))
        min_level_db = 20 * np.log10(c.stft_magnitude_min)
        mag = (mag - min_level_db) / (-min_level_db + HEADROOM_DB)
        return mag, phase

    def magphase_to_signal(self, mag: Tensor, phase: Tensor) -> Tensor:
        """Inverse of signal_to_magphase: [F, T] each -> [hop * (T - 1)] samples."""
        c = self.cfg
        min_level_db = 20 * np.log10(c.stft_magnitude_min)
        mag = mag * (-min_level_db + HEADROOM_DB) + min_level_db
        mag = 10.0 ** ((mag / 20).clip(max=MAX_LOG_MAGNITUDE))
        spec = mag * torch.exp(1.0j * phase)
        return torch.istft(spec[None], n_fft=c.n_fft, hop_length=c.hop_size, win_length=c.window_size,
                           window=self.window, center=True, normalized=False, onesided=True, length=None,
                           return_complex=False)[0]

    @torch.inference_mode()
    def embed(self, signal: Tensor) -> Tensor:
        """Watermark a [N] float32 signal at cfg.sample_rate; returns [hop * (N // hop)] samples."""
        mag, phase = self.signal_to_magphase(signal)
        return self.magphase_to_signal(self.encoder(mag[None])[0], phase)

    @torch.inference_mode()
    def confidence(self, signal: Tensor) -> Tensor:
        """Unrounded watermark confidence in [0, 1] (0-d tensor) of a [N] signal at cfg.sample_rate."""
        mag, _ = self.signal_to_magphase(signal)
        return self.decoder(mag[None])[0].clip(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Resampling (host, numpy)
# ----------------------------------------------------------------------------------------------
def _fix_length(y: np.ndarray, n: int) -> np.ndarray:
    return y[:n] if y.shape[0] >= n else np.pad(y, (0, n - y.shape[0]))


def resample_hq(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``librosa.resample(y, orig_sr=, target_sr=)`` (default res_type "soxr_hq"), bit for bit."""
    if orig_sr == target_sr:
        return y
    import soxr

    n_out = int(np.ceil(y.shape[0] * (float(target_sr) / orig_sr)))
    return _fix_length(soxr.resample(y, orig_sr, target_sr, quality="HQ"), n_out).astype(y.dtype, copy=False)


def _polyphase_filter(up: int, down: int, dtype) -> tuple[np.ndarray, int]:
    """scipy ``firwin(2 * half_len + 1, 1 / max(up, down), window=("kaiser", 5.0)) * up`` and half_len."""
    max_rate = max(up, down)
    cutoff, half_len = 1.0 / max_rate, POLYPHASE_HALF_LEN * max_rate
    m = np.arange(2 * half_len + 1) - half_len
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(2 * half_len + 1, POLYPHASE_KAISER_BETA)
    h = (h / h.sum()).astype(dtype)  # unit DC gain, then cast to the signal's dtype like scipy
    h *= up
    return h, half_len


def resample_poly(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``librosa.resample(res_type="polyphase")`` == ``scipy.signal.resample_poly`` (default Kaiser filter,
    zero padding), in numpy. Equal to scipy up to float rounding of the filter sums."""
    if orig_sr == target_sr:
        return y
    g = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g
    n_in = y.shape[0]
    n_out = -(-n_in * up // down)
    h, half_len = _polyphase_filter(up, down, y.dtype)
    # scipy's bookkeeping: zero-pad the filter in front so that output sample 0 sits at its centre
    n_pre_pad = down - half_len % down
    n_pre_remove = (half_len + n_pre_pad) // down
    h = np.concatenate([np.zeros(n_pre_pad, h.dtype), h])
    # upfirdn(h, y, up, down)[j] = sum_k h[k] * upsampled[j * down - k], upsampled = y with up - 1
    # zeros after each sample; only k = (j * down) % up + i * up hit a sample: y[(j * down) // up - i].
    taps = -(-h.shape[0] // up)
    phases = np.zeros(taps * up, h.dtype)
    phases[:h.shape[0]] = h
    phases = phases.reshape(taps, up).T  # [up, taps]: phases[p, i] = h[p + i * up]
    j = np.arange(n_pre_remove, n_pre_remove + n_out)
    p, base = (j * down) % up, (j * down) // up
    padded = np.concatenate([np.zeros(taps, y.dtype), y, np.zeros(max(int(base[-1]) + 1 - n_in, 0), y.dtype)])
    out = np.zeros(n_out, y.dtype)
    for i in range(taps):  # few taps per phase (~21 for 24 -> 32 kHz): loop over them, vectorise over time
        out += phases[p, i] * padded[base + (taps - i)]
    ratio = float(target_sr) / orig_sr  # librosa then fixes the length to ceil(n * ratio)
    return _fix_length(out, int(np.ceil(n_in * ratio))).astype(y.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def find_pretrained_dir(package: str = PERTH_PACKAGE) -> Path:
    """Directory of the installed package's ``pretrained/implicit`` weights, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _unavailable(f"the `{package}` package ({PERTH_DISTRIBUTION}) is not installed")
    tried = []
    for loc in spec.submodule_search_locations:
        d = Path(loc).joinpath(*PRETRAINED_SUBDIR)
        if (d / HPARAMS_FILE).is_file() and _checkpoints(d):
            return d
        tried.append(str(d))
    raise _unavailable(f"no {HPARAMS_FILE} + {CHECKPOINT_PREFIX}<step>{CHECKPOINT_SUFFIX} found in "
                       f"{', '.join(tried)} (incomplete {PERTH_DISTRIBUTION} install?)")


def _checkpoints(d: Path) -> list[Path]:
    """Checkpoint files by training step, newest last (perth's CheckpointManager.load_latest)."""
    found = []
    for p in d.iterdir():
        step = p.name[len(CHECKPOINT_PREFIX):-len(CHECKPOINT_SUFFIX)]
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name.endswith(CHECKPOINT_SUFFIX) and step.isdigit():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


AudioLike = Union[Tensor, np.ndarray]


class Watermarker:
    """PerthNet implicit watermarking of mono audio: ``apply`` (embed) and ``detect``."""

    def __init__(self, net: PerthNet):
        self.net = net.eval()
        self.sample_rate = net.cfg.sample_rate

    @property
    def device(self) -> torch.device:
        return self.net.window.device

    @classmethod
    def from_dir(cls, pretrained_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "Watermarker":
        d = Path(pretrained_dir)
        ckpts = _checkpoints(d) if d.is_dir() else []
        if not (d / HPARAMS_FILE).is_file() or not ckpts:
            raise _unavailable(f"no {HPARAMS_FILE} + {CHECKPOINT_PREFIX}<step>{CHECKPOINT_SUFFIX} in {d}")
        cfg = PerthConfig.from_hparams(parse_hparams((d / HPARAMS_FILE).read_text()))
        try:
            ckpt = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or truncated download
            raise _unavailable(f"cannot read {ckpts[-1]}: {e}") from e
        net = PerthNet(cfg)
        net.load_perth_state_dict(ckpt["model"] if "model" in ckpt else ckpt)
        return cls(net.to(device))

    @classmethod
    def from_package(cls, device: Union[str, torch.device] = "cpu") -> "Watermarker":
        """Load the weights shipped in the installed resemble-perth package (perth is not imported)."""
        return cls.from_dir(find_pretrained_dir(), device)

    def apply(self, wav: AudioLike, sample_rate: int) -> AudioLike:
        """Watermark ``wav`` ([N] or [1, N]) at ``sample_rate``; returns the same type, shape rank and dtype.

        Equals ``PerthImplicitWatermarker().apply_watermark(wav, sample_rate)``. The length changes:
        the 32 kHz signal is truncated to a multiple of 320 samples before resampling back (a
        second application leaves the length unchanged when sample_rate divides evenly).
        """
        y, restore = self._host_mono(wav)
        x = resample_hq(y, sample_rate, self.sample_rate)
        out = self.net.embed(torch.from_numpy(np.ascontiguousarray(x)).float().to(self.device))
        out = resample_hq(out.cpu().numpy(), self.sample_rate, sample_rate)
        return restore(out)

    def can_apply(self, n_samples: int, sample_rate: int) -> bool:
        """Whether ``n_samples`` at ``sample_rate`` are enough to watermark: PerthNet's STFT needs more
        than ``n_fft / 2`` samples at its own rate (~32 ms)."""
        return math.ceil(n_samples * self.sample_rate / sample_rate) > self.net.cfg.n_fft // 2

    def detect(self, wav: AudioLike, sample_rate: int) -> float:
        """Watermark confidence in [0, 1]: ~1 for watermarked audio, ~0 for clean audio.

        Perth's ``get_watermark(..., round=True)`` returns this rounded to 0.0/1.0; this returns it
        unrounded (NaN for digital silence, where the decoder's frame mask is empty, as in perth).
        """
        y, _ = self._host_mono(wav)
        x = resample_poly(y, sample_rate, self.sample_rate)
        return float(self.net.confidence(torch.from_numpy(np.ascontiguousarray(x)).float().to(self.device)))

    @staticmethod
    def _host_mono(wav: AudioLike):
        """wav -> (1-D float32/float64 numpy array, function mapping a result back to wav's kind)."""
        if wav.ndim == 2 and wav.shape[0] == 1:
            squeeze = True
        elif wav.ndim == 1:
            squeeze = False
        else:
            raise ValueError(f"watermarking expects mono audio of shape [N] or [1, N], got {tuple(wav.shape)}")
        if isinstance(wav, Tensor):
            y = wav.detach().reshape(-1)
            y = y.cpu().numpy() if y.dtype == torch.float64 else y.float().cpu().numpy()

            def restore(out: np.ndarray) -> Tensor:
                t = torch.from_numpy(out).to(device=wav.device, dtype=wav.dtype)
                return t[None] if squeeze else t
        else:
            y = np.asarray(wav).reshape(-1)
            if y.dtype != np.float64:
                y = y.astype(np.float32, copy=False)

            def restore(out: np.ndarray) -> np.ndarray:
                out = out.astype(wav.dtype, copy=False)
                return out[None] if squeeze else out
        return y, restore


@lru_cache(maxsize=None)
def _cached(device: str) -> Watermarker:
    return Watermarker.from_package(device)


def get_watermarker(device: Union[str, torch.device] = "cpu") -> Watermarker:
    """A process-wide Watermarker per device (loaded on first use)."""
    return _cached(str(torch.device(device)))


def watermark_output(wav: Tensor, sample_rate: int) -> Tensor:
    """Watermark a synthesised waveform ``[N]`` or ``[1, N]``, as the runtime does for every output.
    Audio too short to carry the watermark (under ~32 ms) is returned unchanged with a warning."""
    wm = get_watermarker("cpu")
    if not wm.can_apply(wav.shape[-1], sample_rate):
        log.warning("%d samples are too short to watermark; returned without a watermark", wav.shape[-1])
        return wav
    return wm.apply(wav, sample_rate)


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------
STREAM_RESAMPLER_MARGIN_S = 0.01  # > soxr HQ's edge transient (a few ms) at either end of a window
STREAM_CONTEXT_S = 0.1            # right context held back by default (output latency)
STREAM_MIN_EMIT_S = 0.1           # process once at least this much new audio can be emitted
STREAM_CROSSFADE_S = 0.005        # raised-cosine blend of two windows' outputs at each join


def receptive_field_s(cfg: PerthConfig) -> float:
    """How far (s) either side an output sample of ``PerthNet.embed`` depends on its input: the STFT
    window, the encoder's stacked k=7 convs over frames, and the inverse STFT's overlap-add window."""
    conv_frames = N_HIDDEN_CONVS * (HIDDEN_KERNEL - 1) // 2
    return (conv_frames * cfg.hop_size + cfg.n_fft) / cfg.sample_rate


class StreamWatermarker:
    """Watermark a stream of mono chunks so that the joined output carries the mark like the whole
    output marked at once (``watermark_output``), with no clicks at the joins.

    How the stream is marked. Input is kept in a buffer; whenever at least ``min_emit_s`` of new
    audio can be emitted, one window is marked with ``Watermarker.apply`` (the same resample ->
    STFT -> encoder -> inverse STFT -> resample as for a whole output) and only its middle is
    emitted:

    * the window starts ``left_context_s`` (default: PerthNet's receptive field plus a resampler
      margin, ~0.22 s) before the first sample to emit, rounded down to a whole number of 32 kHz
      hops in stream time (240 samples at 24 kHz), so its STFT frames are the whole output's frames
      and its left edge (reflect padding, the convs' zero padding, soxr's start transient) falls in
      audio that is not emitted;
    * it ends at the newest sample received; the last ``context_s`` seconds (default 0.1 s, at
      least one hop + 10 ms) are its right context and are held back until the next window, which
      emits them: the output trails the input by ``context_s`` (by up to ``context_s + min_emit_s``
      when chunks are shorter than ``min_emit_s``);
    * at each join the first ``crossfade_s`` of the new window are blended (raised cosine) with the
      previous window's output for the same samples, so the output is continuous at the join.

    ``flush`` marks the rest with the stream's true end as the window's end, reflect-padded by
    ``context_s`` so every sample, including the < 10 ms tail that ``watermark_output``
    drops (it truncates to a whole hop), is emitted marked. Total samples out == total in.

    Compared with marking the whole output: away from the joins and the end, the frames, their
    inputs and the network are the same. The differences: (1) the magmask's "loudest frame" is
    that of each processed window, not of the clip; it changes little, since only frames near
    digital silence fall under 5 % of the loudest frame's bin-sum of the normalised dB magnitude
    (white noise at -140 dBFS is still marked), and a window of exact zeros stays unmarked as in
    perth. (2) With ``context_s`` shorter than the receptive field (~0.21 s), a window's last
    emitted samples were computed without all their right context; the crossfade smooths the step
    this leaves. On tests/data speech the stream is within 61-68 dB SNR of the whole output at the
    default 0.1 s and ~80 dB at 0.25 s (the watermark itself is at 16 dB); both detect at 1.0.
    (3) The last ~0.2 s of the stream see reflect padding of the ``sample_rate`` signal instead of
    perth's edge (reflect padding at 32 kHz, the convs' zero padding after the last frame, then the
    truncation), so they differ a little more. A stream shorter than ``Watermarker.can_apply``
    accepts is returned unchanged by ``flush``, with a warning, exactly as ``watermark_output``
    returns such a clip. ``flush`` resets the object for a new stream.
    """

    def __init__(self, sample_rate: int = 24000, device: Union[str, torch.device] = "cpu", *,
                 context_s: float = STREAM_CONTEXT_S, left_context_s: float | None = None,
                 min_emit_s: float = STREAM_MIN_EMIT_S, crossfade_s: float = STREAM_CROSSFADE_S,
                 watermarker: Watermarker | None = None):
        self.wm = watermarker if watermarker is not None else get_watermarker(device)
        self.sample_rate = sr = int(sample_rate)
        cfg = self.wm.net.cfg
        if left_context_s is None:
            left_context_s = receptive_field_s(cfg) + STREAM_RESAMPLER_MARGIN_S
        if min(context_s, left_context_s, crossfade_s) < 0 or min_emit_s <= 0:
            raise ValueError("context_s, left_context_s and crossfade_s must be >= 0 and min_emit_s > 0")
        # samples at sr spanning a whole number of PerthNet hops: 240 at 24 kHz, 441 at 22.05 / 44.1 kHz
        self.align = sr * cfg.hop_size // math.gcd(sr * cfg.hop_size, self.wm.sample_rate)
        # the right context covers at least apply()'s truncation to a hop and soxr's end transient
        edge = self.align + round(STREAM_RESAMPLER_MARGIN_S * sr)
        self.right = max(round(context_s * sr), edge)
        self.left = round(left_context_s * sr)
        self.min_emit = max(1, round(min_emit_s * sr))
        # the crossfade must lie inside the previous window's output, which apply() cut to a whole hop
        self.crossfade = min(round(crossfade_s * sr), self.right - self.align)
        self._reset()

    def _reset(self) -> None:
        self._buf = np.zeros(0, np.float32)  # input from stream sample self._buf_start on ...
        self._pending: list[np.ndarray] = []  # ... then these chunks, joined only when a window runs
        self._buf_start = 0
        self._received = 0
        self._emitted = 0
        self._fade = np.zeros(0, np.float32)  # previous window's output for the samples from _emitted

    def push(self, chunk: AudioLike) -> Tensor:
        """Add a 1-D chunk; returns the marked samples ready so far (1-D float32 CPU, maybe empty)."""
        x = self._as_host(chunk)
        if x.size:
            self._pending.append(x)
            self._received += x.size
        emit_end = self._received - self.right
        window = self._received - self._window_start()
        if emit_end - self._emitted < self.min_emit or not self.wm.can_apply(window, self.sample_rate):
            return torch.zeros(0, dtype=torch.float32)
        return torch.from_numpy(self._mark(emit_end, final=False))

    def flush(self) -> Tensor:
        """The rest of the stream, marked (1-D float32 CPU); then the object starts a new stream."""
        try:
            if self._emitted == 0 and not self.wm.can_apply(self._received, self.sample_rate):
                log.warning("%d samples are too short to watermark; returned without a watermark", self._received)
                return torch.from_numpy(self._joined())
            return torch.from_numpy(self._mark(self._received, final=True))
        finally:
            self._reset()

    def _mark(self, emit_end: int, final: bool) -> np.ndarray:
        """Mark one window and return its samples [_emitted, emit_end) of the stream."""
        start = self._window_start()
        x = self._joined()[start - self._buf_start:]
        if final:  # stand-in right context, so the true end is not at the window's truncated edge
            x = np.pad(x, (0, self.right), mode="reflect" if x.size > 1 else "edge")
        y = self.wm.apply(x, self.sample_rate)
        lo, hi = self._emitted - start, emit_end - start
        # NOTE: apply() truncates to a whole 32 kHz hop; the window's right context covers that.
        assert y.shape[0] >= hi + (0 if final else self.crossfade), (y.shape, hi)
        out = y[lo:hi].copy()
        n = min(self._fade.size, out.size)
        if n:
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
            out[:n] = self._fade[:n] + ramp.astype(np.float32) * (out[:n] - self._fade[:n])
        self._fade = y[hi:hi + self.crossfade].copy()
        self._emitted = emit_end
        keep = self._window_start()  # the next window starts here or later
        self._buf = self._buf[keep - self._buf_start:]
        self._buf_start = keep
        return out

    def _joined(self) -> np.ndarray:
        if self._pending:
            self._buf = np.concatenate([self._buf, *self._pending])
            self._pending = []
        return self._buf

    def _window_start(self) -> int:
        return max(self._emitted - self.left, 0) // self.align * self.align

    @staticmethod
    def _as_host(chunk: AudioLike) -> np.ndarray:
        if chunk.ndim != 1:
            raise ValueError(f"StreamWatermarker.push expects a 1-D chunk, got shape {tuple(chunk.shape)}")
        if isinstance(chunk, Tensor):
            return chunk.detach().to("cpu", torch.float32).numpy().copy()
        return np.array(chunk, dtype=np.float32)  # a copy: the caller may reuse its buffer
