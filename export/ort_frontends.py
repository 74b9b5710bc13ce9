"""Voice preparation on onnxruntime: the front-end graphs of :mod:`.frontend_onnx` behind the
interfaces ``TTS.prepare_conditionals`` uses, so that a voice is prepared without torch's weights.

* :class:`OrtVoiceEncoder` is ``VoiceEncoder`` (``embeds_from_wavs``, ``embeds_from_mels``,
  ``inference``): the same resampling, silence trim, mel, partials and chunking (the weight-free
  helpers of :mod:`chatterbox_rt.models.voice_encoder`), the LSTM in onnxruntime.
* :class:`OrtS3Tokenizer` is ``S3Tokenizer.__call__`` (``tokenizer(wavs, max_len=...) -> (tokens,
  lens)``) for utterances up to 30 s (the torch code's windowed path for longer ones is not built).
* :class:`OrtCAMPPlus` is ``CAMPPlus.inference`` for rows of one length.
* :class:`OrtFrontEnds` holds the four and answers what ``prepare_conditionals`` asks of S3Gen:
  ``embed_ref(wav_24k, wav_16k=None)`` (the same dict as ``S3Gen.embed_ref``) and ``tokenizer``.
  :class:`OrtFrontEndsMixin` gives an onnxruntime S3Gen stand-in those two by delegation.

Torch stays for the weight-free steps (the voice encoder's float64 mel, the sinc resampler,
averaging partials): that keeps their rounding identical to the torch backend's.
"""
from __future__ import annotations

import json
from dataclasses import fields
from itertools import pairwise
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..models.voice_encoder import (
    VoiceEncoder,
    VoiceEncoderConfig,
    get_frame_step,
    get_num_wins,
    pack,
    wav_mels,
)
from ._onnx import open_session
from .frontend_onnx import FRONTEND_GRAPHS, frontends_config

Audio = Union[np.ndarray, Tensor]
# Files a bundle may hold the front ends' config in, tried in order when none is given.
CONFIG_FILES = ("frontends.json", "manifest.json")


def _as_f32(x: Audio) -> Tensor:
    x = x.detach().cpu() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    if not x.is_floating_point():
        raise TypeError(f"audio must be floating point, got {x.dtype}")
    return x.float().contiguous()


def _run(sess, feeds: Mapping[str, np.ndarray]) -> list:
    return sess.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})


def load_frontends_config(bundle_dir: Union[str, Path], config=None) -> dict:
    """The front ends' config (``ComponentExport.config`` of ``export_frontends``) from ``config``:
    that dict itself, a manifest dict holding it (under ``"frontends"``, ``"components" ->
    "frontends"`` or ``"config"``), or a JSON file of either; ``None`` reads the first of
    :data:`CONFIG_FILES` in ``bundle_dir`` that exists, else uses the defaults (the standard graph
    names and model constants)."""
    bundle_dir = Path(bundle_dir)
    if config is None:
        for name in CONFIG_FILES:
            if (bundle_dir / name).is_file():
                config = bundle_dir / name
                break
        else:
            return frontends_config()
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_absolute() and not path.is_file():
            path = bundle_dir / path
        config = json.loads(path.read_text())
    if not isinstance(config, Mapping):
        raise TypeError(f"front-end config must be a dict or a JSON file, got {type(config).__name__}")
    for _ in range(4):  # unwrap a manifest down to the front ends' entry
        if "graphs" in config and "voice_encoder" in config:
            break
        for key in ("frontends", "components", "config"):
            if isinstance(config.get(key), Mapping):
                config = config[key]
                break
        else:
            raise ValueError(f"no front-end config found (keys: {sorted(config)[:12]})")
    return {**frontends_config(), **config}


# ------------------------------------------------------------------------------ voice encoder


class OrtVoiceEncoder:
    """``VoiceEncoder`` with its LSTM in onnxruntime: partials -> embeddings -> utterance means."""

    def __init__(self, session, config: VoiceEncoderConfig = VoiceEncoderConfig()):
        self.session = session
        self.config = config

    device = torch.device("cpu")  # where embeddings are returned (as VoiceEncoder.inference)

    @classmethod
    def load(cls, path: Union[str, Path], config=None, *, device: str = "cpu",
             threads: Optional[int] = None, session_factory=None) -> "OrtVoiceEncoder":
        """``path``: a bundle directory (``config`` as :func:`load_frontends_config` takes it) or the
        ``voice_encoder.onnx`` file (``config``: the front ends' config or its ``"voice_encoder"``
        entry; None: the defaults)."""
        path = Path(path)
        if path.is_dir():
            cfg = load_frontends_config(path, config)
            path, config = path / cfg["graphs"]["voice_encoder"], cfg["voice_encoder"]
        elif isinstance(config, Mapping) and isinstance(config.get("voice_encoder"), Mapping):
            config = config["voice_encoder"]
        names = {f.name for f in fields(VoiceEncoderConfig) if f.init}
        c = VoiceEncoderConfig(**{k: v for k, v in (config or {}).items() if k in names})
        return cls(open_session(path, device=device, threads=threads, session_factory=session_factory), c)

    def __call__(self, mels: Union[Tensor, np.ndarray]) -> Tensor:
        """Partials ``[B, P, M]`` -> L2-normalised embeddings ``[B, E]`` (CPU float32)."""
        x = mels.detach().cpu().float().numpy() if torch.is_tensor(mels) else np.asarray(mels, np.float32)
        return torch.from_numpy(_run(self.session, {"mel_partials": x})[0])

    forward = __call__

    def inference(self, mels: Tensor, mel_lens, overlap: float = 0.5, rate: Optional[float] = None,
                  min_coverage: float = 0.8, batch_size: Optional[int] = None) -> Tensor:
        """``VoiceEncoder.inference``: utterances ``[B, T, M]`` (+ lengths) -> ``[B, E]`` on CPU."""
        c = self.config
        mels = torch.as_tensor(mels).cpu().float()
        mel_lens = mel_lens.tolist() if torch.is_tensor(mel_lens) else list(mel_lens)
        frame_step = get_frame_step(overlap, rate, c)
        n_partials, target_lens = zip(*(get_num_wins(n, frame_step, min_coverage, c) for n in mel_lens), strict=True)
        len_diff = max(target_lens) - mels.size(1)
        if len_diff > 0:
            mels = torch.cat((mels, mels.new_zeros(mels.size(0), len_diff, c.num_mels)), dim=1)
        partials = torch.stack([mel[i * frame_step: i * frame_step + c.ve_partial_frames]
                                for mel, n in zip(mels, n_partials, strict=True) for i in range(n)])  # [N, P, M]
        # Chunked as the torch module chunks (chunk(n_chunks)): the same batch shapes.
        n_chunks = int(np.ceil(len(partials) / (batch_size or len(partials))))
        partial_embeds = torch.cat([self(batch) for batch in partials.chunk(n_chunks)], dim=0)
        slices = np.concatenate(([0], np.cumsum(n_partials)))
        raw = torch.stack([partial_embeds[s:e].mean(dim=0) for s, e in pairwise(slices)])
        return raw / torch.linalg.norm(raw, dim=1, keepdim=True)

    utt_to_spk_embed = staticmethod(VoiceEncoder.utt_to_spk_embed)
    voice_similarity = staticmethod(VoiceEncoder.voice_similarity)

    def embeds_from_mels(self, mels, mel_lens=None, as_spk: bool = False, batch_size: int = 32,
                         **kwargs) -> np.ndarray:
        """``VoiceEncoder.embeds_from_mels``: ``[B, T, M]`` (+ lengths) or a list of ``[Ti, M]``."""
        if isinstance(mels, (list, tuple)):
            mels = [m if isinstance(m, Tensor) else np.asarray(m) for m in mels]
            assert all(m.shape[1] == mels[0].shape[1] for m in mels), "Mels aren't in (B, T, M) format"
            mel_lens = [m.shape[0] for m in mels]
            mels = pack(mels)
        utt = self.inference(mels, mel_lens, batch_size=batch_size, **kwargs).numpy()
        return self.utt_to_spk_embed(utt) if as_spk else utt

    def embeds_from_wavs(self, wavs: Sequence[Audio], sample_rate: int, as_spk: bool = False,
                         batch_size: int = 32, trim_top_db: Optional[float] = 20, **kwargs) -> np.ndarray:
        """``VoiceEncoder.embeds_from_wavs``: waveforms -> ``[B, E]`` utterance embeddings (``[E]`` if
        ``as_spk``); silence trimmed at 20 dB and ``rate=1.3`` unless given, as the reference."""
        kwargs.setdefault("rate", self.config.default_rate)
        mels = wav_mels(wavs, sample_rate, trim_top_db, self.config)
        return self.embeds_from_mels(mels, as_spk=as_spk, batch_size=batch_size, **kwargs)


# ------------------------------------------------------------------------------ S3 tokenizer


class OrtS3Tokenizer:
    """``S3Tokenizer.__call__`` on onnxruntime, one utterance per run (each utterance's tokens equal
    its single run in torch too: padding is masked)."""

    def __init__(self, session, config: Optional[Mapping] = None, device="cpu"):
        self.session = session
        c = {**frontends_config()["s3_tokenizer"], **(config or {})}
        self.sample_rate, self.hop, self.n_fft = int(c["sample_rate"]), int(c["hop"]), int(c["n_fft"])
        self.frames_per_token, self.window_frames = int(c["frames_per_token"]), int(c["window_frames"])
        self.device = torch.device(device)

    @classmethod
    def load(cls, path, config: Optional[Mapping] = None, *, device: str = "cpu",
             threads: Optional[int] = None, session_factory=None) -> "OrtS3Tokenizer":
        return cls(open_session(path, device=device, threads=threads, session_factory=session_factory), config,
                   device)

    def _rows(self, wavs) -> list:
        if torch.is_tensor(wavs) and wavs.dim() == 1:
            raise ValueError("pass a [B, N] tensor or a list of 1-D waveforms")
        rows = []
        for w in wavs:
            w = _as_f32(w)
            if w.dim() == 2:
                if w.shape[0] != 1:
                    raise ValueError(f"expected 1-D waveforms (or [1, N]), got shape {tuple(w.shape)}")
                w = w[0]
            if w.dim() != 1:
                raise ValueError(f"expected 1-D waveforms, got shape {tuple(w.shape)}")
            rows.append(w)
        if not rows:
            raise ValueError("no waveforms to tokenise")
        return rows

    def __call__(self, wavs: Union[Sequence[Audio], Tensor], max_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """16 kHz waveforms -> tokens ``[B, T]`` (long, zero-padded), lens ``[B]`` (long); at most
        ``max_len`` tokens each (the mel cut to ``4 * max_len`` frames, as the torch tokenizer)."""
        if max_len is not None and (isinstance(max_len, bool) or int(max_len) < 1):
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        toks = []
        for w in self._rows(wavs):
            n = w.shape[-1]
            if n <= self.n_fft // 2:
                raise ValueError(f"a waveform of {n} samples is too short for the tokenizer's centred STFT "
                                 f"(more than {self.n_fft // 2} needed)")
            frames = n // self.hop
            full = -(-frames // self.frames_per_token)
            keep = full if max_len is None else min(full, int(max_len))
            if min(frames, keep * self.frames_per_token) > self.window_frames:
                raise ValueError(f"the onnxruntime tokenizer encodes at most {self.window_frames} mel frames "
                                 f"({self.window_frames * self.hop / self.sample_rate:g} s) per utterance; "
                                 f"got {frames} "
                                 f"(the torch tokenizer's windowed path for long audio is not exported)")
            tokens, lens = _run(self.session, {"wav_16k": w[None].numpy(),
                                               "max_tokens": np.array([keep], dtype=np.int64)})
            toks.append(torch.from_numpy(tokens[0, : int(lens[0])]))
        lens = torch.tensor([len(t) for t in toks], dtype=torch.long)
        out = torch.zeros(len(toks), int(lens.max()), dtype=torch.long)
        for b, t in enumerate(toks):
            out[b, : len(t)] = t
        return out.to(self.device), lens.to(self.device)

    forward = __call__


# ------------------------------------------------------------------------------ CAM++, prompt mel


class OrtCAMPPlus:
    """``CAMPPlus.inference`` on onnxruntime for rows of one length (the torch code zero-pads the
    features of unequal lengths without a mask; that quirk is not exported)."""

    def __init__(self, session, config: Optional[Mapping] = None, device="cpu"):
        self.session = session
        c = {**frontends_config()["campplus"], **(config or {})}
        self.min_samples = int(c["min_samples"])
        self.device = torch.device(device)

    @classmethod
    def load(cls, path, config: Optional[Mapping] = None, *, device: str = "cpu",
             threads: Optional[int] = None, session_factory=None) -> "OrtCAMPPlus":
        return cls(open_session(path, device=device, threads=threads, session_factory=session_factory), config,
                   device)

    def inference(self, wavs: Union[Sequence[Audio], Tensor]) -> Tensor:
        """16 kHz ``[B, N]`` (or a list of equal-length 1-D waveforms) -> ``[B, 192]`` float32."""
        if torch.is_tensor(wavs) or isinstance(wavs, np.ndarray):
            x = _as_f32(wavs)
            if x.dim() != 2:
                raise ValueError(f"pass a [B, N] waveform or a list of 1-D waveforms, got shape {tuple(x.shape)}")
        else:
            rows = [_as_f32(w).reshape(-1) for w in wavs]
            if len({r.shape[0] for r in rows}) != 1:
                raise ValueError("OrtCAMPPlus embeds rows of one length only; call it once per clip")
            x = torch.stack(rows)
        if x.shape[-1] < self.min_samples:
            raise ValueError(f"waveform of {x.shape[-1]} samples is shorter than one {self.min_samples}-sample "
                             f"fbank frame")
        return torch.from_numpy(_run(self.session, {"wav_16k": x.numpy()})[0]).to(self.device)

    __call__ = inference


class OrtPromptMel:
    """S3Gen's prompt mel (``mel_spectrogram(wav).transpose(1, 2)``) on onnxruntime."""

    def __init__(self, session, config: Optional[Mapping] = None, device="cpu"):
        self.session = session
        c = {**frontends_config()["prompt_mel"], **(config or {})}
        self.pad = (int(c["n_fft"]) - int(c["hop_size"])) // 2
        self.device = torch.device(device)

    @classmethod
    def load(cls, path, config: Optional[Mapping] = None, *, device: str = "cpu",
             threads: Optional[int] = None, session_factory=None) -> "OrtPromptMel":
        return cls(open_session(path, device=device, threads=threads, session_factory=session_factory), config,
                   device)

    def __call__(self, wav_24k: Audio) -> Tensor:
        """``[N]`` or ``[B, N]`` 24 kHz -> ``[B, N // 480, 80]`` float32."""
        x = torch.atleast_2d(_as_f32(wav_24k))
        if x.dim() != 2:
            raise ValueError(f"prompt mel expects a [N] or [B, N] waveform, got shape {tuple(x.shape)}")
        if x.shape[-1] <= self.pad:
            raise ValueError(f"prompt mel needs more than {self.pad} samples for its reflect padding, "
                             f"got {x.shape[-1]}")
        return torch.from_numpy(_run(self.session, {"wav_24k": x.numpy()})[0]).to(self.device)


# ------------------------------------------------------------------------------ all of them


class OrtFrontEnds:
    """The four front ends from an export bundle; ``embed_ref`` and ``tokenizer`` as on ``S3Gen``,
    ``voice_encoder`` (alias ``ve``) as ``TTS.ve``."""

    def __init__(self, voice_encoder: OrtVoiceEncoder, tokenizer: OrtS3Tokenizer, speaker_encoder: OrtCAMPPlus,
                 prompt_mel: OrtPromptMel, config: Optional[Mapping] = None, device="cpu"):
        self.voice_encoder = voice_encoder
        self.tokenizer = tokenizer
        self.speaker_encoder = speaker_encoder
        self.prompt_mel = prompt_mel
        self.config = dict(config or frontends_config())
        self.device = torch.device(device)
        self.s3_sr, self.s3gen_sr = int(self.config["s3_sr"]), int(self.config["s3gen_sr"])

    @property
    def ve(self) -> OrtVoiceEncoder:
        return self.voice_encoder

    @classmethod
    def load(cls, bundle_dir: Union[str, Path], config=None, *, device: str = "cpu",
             threads: Optional[int] = None, session_factory=None) -> "OrtFrontEnds":
        """Open ``bundle_dir``'s front-end graphs. ``config``: see :func:`load_frontends_config`.
        ``device``: onnxruntime's device ("cpu", "cuda"); outputs are returned there as torch tensors
        (embeddings of the voice encoder on the CPU, as ``VoiceEncoder`` returns numpy)."""
        bundle_dir = Path(bundle_dir)
        cfg = load_frontends_config(bundle_dir, config)
        files = cfg["graphs"]
        missing = [g for g in FRONTEND_GRAPHS if g not in files or not (bundle_dir / files[g]).is_file()]
        if missing:
            raise FileNotFoundError(f"front-end graph(s) {missing} not found in {bundle_dir} "
                                    f"(export them with chatterbox_rt.export.frontend_onnx.export_frontends)")
        kw = dict(device=device, threads=threads, session_factory=session_factory)
        return cls(OrtVoiceEncoder.load(bundle_dir / files["voice_encoder"], cfg["voice_encoder"], **kw),
                   OrtS3Tokenizer.load(bundle_dir / files["s3_tokenizer"], cfg["s3_tokenizer"], **kw),
                   OrtCAMPPlus.load(bundle_dir / files["campplus"], cfg["campplus"], **kw),
                   OrtPromptMel.load(bundle_dir / files["prompt_mel"], cfg["prompt_mel"], **kw),
                   cfg, device)

    def embed_ref(self, wav_24k: Audio, wav_16k: Optional[Audio] = None) -> dict:
        """``S3Gen.embed_ref``: a 24 kHz clip (already cut to 10 s) -> ``prompt_token [1, P]``,
        ``prompt_token_len [1]``, ``prompt_feat [1, 2P, 80]``, ``prompt_feat_len`` (None),
        ``embedding [1, 192]``. The 16 kHz signal is the clip sinc-resampled, unless given."""
        from ..models.resample import sinc_resample

        wav = torch.atleast_2d(_as_f32(wav_24k))
        if wav.size(0) != 1:
            raise ValueError(f"embed_ref takes one clip, got a batch of {wav.size(0)}")
        feat = self.prompt_mel(wav)  # [1, F, 80]
        wav_16k = sinc_resample(wav, self.s3gen_sr, self.s3_sr) if wav_16k is None else _as_f32(wav_16k)
        wav_16k = torch.atleast_2d(wav_16k)
        embedding = self.speaker_encoder.inference(wav_16k)
        tokens, token_lens = self.tokenizer(wav_16k)
        if feat.shape[1] != 2 * tokens.shape[1]:  # the reference trims the tokens to the mel
            tokens = tokens[:, : feat.shape[1] // 2]
            token_lens = torch.full_like(token_lens, tokens.shape[1])
        return dict(prompt_token=tokens.to(self.device), prompt_token_len=token_lens.to(self.device),
                    prompt_feat=feat.to(self.device), prompt_feat_len=None, embedding=embedding.to(self.device))


class OrtFrontEndsMixin:
    """For an onnxruntime stand-in of S3Gen: ``embed_ref``, ``tokenizer`` and ``speaker_encoder``
    delegated to ``self.frontends`` (an :class:`OrtFrontEnds`)."""

    frontends: OrtFrontEnds

    def embed_ref(self, wav_24k: Audio, wav_16k: Optional[Audio] = None) -> dict:
        return self.frontends.embed_ref(wav_24k, wav_16k)

    @property
    def tokenizer(self) -> OrtS3Tokenizer:
        return self.frontends.tokenizer

    @property
    def speaker_encoder(self) -> OrtCAMPPlus:
        return self.frontends.speaker_encoder
