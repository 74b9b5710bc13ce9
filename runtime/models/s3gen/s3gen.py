"""S3Gen as one module with the official file's parameter names.

``s3gen.safetensors`` / ``s3gen.pt`` (multilingual) / ``s3gen_meanflow.safetensors`` (Turbo,
Nano) hold ``tokenizer.*`` (S3 tokenizer v2), ``speaker_encoder.*`` (CAMPPlus), ``flow.*``
(token embedding, conformer encoder, ``encoder_proj``, speaker affine, ``decoder.estimator``) and
``mel2wav.*`` (HiFT, weight-normed). The reference builds them in ``S3Token2Wav``; this module
has the same state-dict layout, folds weight norm at load, and is batched: the flow takes a
batch of requests with per-request token and prompt lengths, HiFT a batch of mels with lengths.

Data flow of one request (``flow_mel`` then ``hift``)::

    [prompt tokens; new tokens] -> embedding -> encoder (x2 upsample) -> encoder_proj -> mu
    cond = [prompt mel; zeros], spks = affine(normalise(x-vector)), x0 = noise
    CFM (10 Euler steps with CFG, or 2 meanflow steps) -> mel; keep the frames after the prompt
"""
from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ...profiling import nvtx
from ..campplus import CAMPPlus
from ..masks import length_mask
from ..s3tokenizer import S3Tokenizer
from .cfm import MEL_BINS, CausalCFM, FlowConfig
from .encoder import SPEECH_VOCAB_SIZE, EncoderConfig, FlowFront, concat_prompt_tokens
from .hift import S3GEN_SR, HiFTGenerator, fold_weight_norm, trim_fade

log = logging.getLogger(__name__)

S3_SR = 16000  # S3 tokenizer and CAMPPlus input rate
S3GEN_SIL = 4299  # the speech token Turbo appends three times as trailing silence (reference const)
PROMPT_MAX_SECONDS = 10  # the reference's DEC_COND_LEN: the prompt mel covers at most 10 s

# Keys the reference's S3Tokenizer registers as buffers but recomputes; a checkpoint may hold them.
TOLERATED_KEYS = tuple(f"tokenizer.{k}" for k in S3Tokenizer.RECOMPUTED_BUFFERS)


# HiFT's parts that run in fp32 whatever HiFT's dtype (the quality table in BENCHMARKS.md).
HIFT_FP32_PARTS = ("f0_predictor", "m_source")
# The CFM estimator's time-embedding MLPs, fp32 whatever the estimator's dtype (ConditionalDecoder.time_embedding).
CFM_FP32_PARTS = ("time_mlp", "time_embed_mixer")


class Flow(FlowFront):
    """``CausalMaskedDiffWithXvec`` for inference: ``FlowFront`` plus ``decoder`` (the CFM)."""

    def __init__(self, encoder: Optional[EncoderConfig] = None, flow: Optional[FlowConfig] = None):
        super().__init__(encoder)
        self.decoder = CausalCFM(flow or FlowConfig())


class S3Gen(nn.Module):
    """Speech tokens + a voice's S3Gen conditionals -> 24 kHz waveform."""

    sr = S3GEN_SR

    def __init__(self, meanflow: bool = False):
        super().__init__()
        self.meanflow = meanflow
        self.tokenizer = S3Tokenizer()
        self.speaker_encoder = CAMPPlus()
        self.flow = Flow(EncoderConfig(), FlowConfig(meanflow=meanflow))
        self.mel2wav = HiFTGenerator()

    # ------------------------------------------------------------------ construction

    @property
    def device(self) -> torch.device:
        return self.flow.encoder_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.flow.encoder_proj.weight.dtype

    @property
    def default_steps(self) -> int:
        c = self.flow.decoder.config
        return c.meanflow_n_steps if self.meanflow else c.n_steps

    @classmethod
    def from_dummy(cls, meanflow: bool = False, seed: int = 0, device="cpu", dtype=torch.float32) -> "S3Gen":
        """Seeded random weights at real shapes (activations kept in a trained model's range)."""
        from ...checkpoint import init_dummy_conv_

        model = init_dummy_conv_(cls(meanflow), seed)
        return model.eval().to_precision(device, dtype)

    @classmethod
    def from_file(cls, path: Union[str, Path], meanflow: Optional[bool] = None, device="cpu",
                  dtype=torch.float32) -> "S3Gen":
        """Load ``s3gen.safetensors``, ``s3gen.pt`` or ``s3gen_meanflow.safetensors``.

        ``meanflow`` defaults to what the file holds (its estimator has a time-mixing layer)."""
        from ...checkpoint import read_state_dict

        sd = read_state_dict(path)
        if meanflow is None:
            meanflow = any(k.startswith("flow.decoder.estimator.time_embed_mixer") for k in sd)
        model = cls(meanflow)
        model.load_checkpoint(sd, str(path))
        return model.eval().to_precision(device, dtype)

    def load_checkpoint(self, sd: Mapping[str, Tensor], source: str) -> "S3Gen":
        """Strict load of an official state dict: weight norm folded (both key styles), the
        reference's recomputed tokenizer buffers tolerated, anything else missing or extra an error."""
        from ...checkpoint import check_state_dict

        sd = fold_weight_norm(dict(sd))
        for k in TOLERATED_KEYS:
            sd.pop(k, None)
        check_state_dict(self, sd, source)
        self.load_state_dict(sd, strict=True)
        return self

    def to_precision(self, device="cpu", dtype=torch.float32, *, config=None) -> "S3Gen":
        """Move to ``device`` and set each part's dtype: ``config`` (a ``chatterbox_rt.PrecisionConfig``:
        ``flow_encoder``, ``cfm``, ``hift``, ``frontends`` for the tokenizer and the x-vector), or
        ``dtype`` for the flow and the vocoder with the front ends fp32. HiFT's fp32 islands (F0
        predictor, sine source) and the CFM's time embedding stay fp32 whatever their module's dtype
        (chatterbox_rt.precision)."""
        from ...precision import PrecisionConfig, cast_frontend

        config = config or PrecisionConfig.uniform(dtype)
        self.to(device=device)
        for name, child in self.flow.named_children():
            child.to(dtype=config.dtype("cfm" if name == "decoder" else "flow_encoder"))
        est = self.flow.decoder.estimator
        for island in CFM_FP32_PARTS:
            if getattr(est, island, None) is not None:
                getattr(est, island).float()
        self.mel2wav.to(dtype=config.dtype("hift"))
        for island in HIFT_FP32_PARTS:
            getattr(self.mel2wav, island).float()
        for front in (self.tokenizer, self.speaker_encoder):
            cast_frontend(front, config.dtype("frontends"))
        self.precision = config
        return self

    COMPILE_PARTS = ("estimator", "hift")

    def compile(self, parts=COMPILE_PARTS, **options) -> "S3Gen":
        """``torch.compile`` the CFM estimator's and/or HiFT's forward (``parts``), in place.

        Off by default: ``profiling/compile_bench.py`` measures it against eager (and CUDA graphs)
        and BENCHMARKS.md has the figures; it is the default nowhere it has not won. Only the
        bound methods are replaced, so state-dict keys and checkpoints are unchanged.
        ``options`` go to ``torch.compile`` (default ``dynamic=True``: one compile for every length)."""
        unknown = set(parts) - set(self.COMPILE_PARTS)
        if unknown:
            raise ValueError(f"unknown compile part(s) {sorted(unknown)}; expected some of {self.COMPILE_PARTS}")
        options = {"dynamic": True, **options}
        if "estimator" in parts:
            est = self.flow.decoder.estimator
            est.forward = torch.compile(type(est).forward.__get__(est), **options)
        if "hift" in parts:
            h = self.mel2wav
            h.decode = torch.compile(type(h).decode.__get__(h), **options)
        return self

    # ------------------------------------------------------------------ voice

    @torch.inference_mode()
    @nvtx.annotate("embed_ref", "voice")
    def embed_ref(self, wav_24k: Union[Tensor, np.ndarray], wav_16k: Optional[Tensor] = None) -> dict:
        """The reference's ``embed_ref`` for a 24 kHz clip (already cut to ``PROMPT_MAX_SECONDS``):
        ``prompt_token [1, P]``, ``prompt_token_len [1]``, ``prompt_feat [1, 2P, 80]``,
        ``prompt_feat_len`` (None, as the reference stores it), ``embedding [1, 192]``.

        The 16 kHz signal for the tokenizer and the x-vector is the 24 kHz clip resampled with
        torchaudio's sinc interpolation (as the reference does), unless given.
        """
        from ..resample import sinc_resample
        from .mel import mel_spectrogram

        wav = torch.atleast_2d(torch.as_tensor(wav_24k).to(device=self.device, dtype=torch.float32))
        if wav.size(0) != 1:
            raise ValueError(f"embed_ref takes one clip, got a batch of {wav.size(0)}")
        feat = mel_spectrogram(wav).transpose(1, 2)  # [1, F, 80]
        if wav_16k is None:
            wav_16k = sinc_resample(wav, S3GEN_SR, S3_SR)
        wav_16k = torch.atleast_2d(wav_16k.to(device=self.device, dtype=torch.float32))
        embedding = self.speaker_encoder.inference(wav_16k)
        tokens, token_lens = self.tokenizer(wav_16k)
        if feat.shape[1] != 2 * tokens.shape[1]:  # the reference trims the tokens to the mel
            tokens = tokens[:, : feat.shape[1] // 2]
            token_lens = torch.full_like(token_lens, tokens.shape[1])
        return dict(prompt_token=tokens, prompt_token_len=token_lens, prompt_feat=feat,
                    prompt_feat_len=None, embedding=embedding)

    @torch.inference_mode()
    def xvector(self, wav_24k: Union[Tensor, np.ndarray]) -> Tensor:
        """``embed_ref``'s x-vector alone (CAMPPlus on the clip resampled to 16 kHz) -> ``[1, 192]``:
        what a second or later clip of a voice contributes (voice conversion's averaged targets)."""
        from ..resample import sinc_resample

        wav = torch.atleast_2d(torch.as_tensor(wav_24k).to(device=self.device, dtype=torch.float32))
        return self.speaker_encoder.inference(sinc_resample(wav, S3GEN_SR, S3_SR))

    # ------------------------------------------------------------------ flow

    def mel_lengths(self, token_lens: Tensor, refs: Sequence[Mapping]) -> tuple[Tensor, Tensor, Tensor]:
        """Per request: (full estimator length, prompt mel frames, new mel frames)."""
        ratio = self.flow.config.token_mel_ratio
        p_tok = torch.tensor([int(_prompt_len(r)) for r in refs])
        p_mel = torch.tensor([int(r["prompt_feat"].shape[-2]) for r in refs])
        full = ratio * (p_tok + token_lens.cpu().long())
        return full, p_mel, full - p_mel

    @torch.inference_mode()
    @nvtx.annotate("flow")
    def flow_mel(self, tokens: Tensor, token_lens: Optional[Tensor], refs: Union[Mapping, Sequence[Mapping]], *,
                 n_steps: Optional[int] = None, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, cfm=None,
                 cfg_rate: Union[None, float, Sequence[float]] = None,
                 speaker_strength: Union[None, float, Sequence[float]] = None) -> tuple[Tensor, Tensor]:
        """Speech tokens ``[B, T]`` (right-padded; ``token_lens [B]``) with one S3Gen reference
        dict per request (or one shared) -> (mel ``[B, 80, M]``, mel lengths ``[B]`` on the CPU):
        the frames after each request's prompt, zero past its length.

        ``noise [B, 80, L]`` is the CFM's initial noise over each request's full length (prompt
        frames + new frames; ``L`` at least the longest); None draws ``randn`` from ``generator``.
        ``cfm``: runs the CFM loop instead of ``self.flow.decoder`` with its call signature (the
        engine's CUDA-graph pool, ``chatterbox_rt.engine.cfm_graphs.CFMGraphs``).

        Per-call controls (voice conversion; None: the model's, and the path is unchanged):
        ``cfg_rate``, the CFG rate (``FlowConfig.cfg_rate``, 0.7) or one per Euler step (not for
        a meanflow model: it has no CFG); ``speaker_strength``, the factor on the normalised
        x-vector before the speaker affine, or one per step (the estimator's ``spks`` then
        differs per step). The shared config is never changed, and ``cfm`` cannot take them.
        """
        dev, dtype = self.device, self.dtype
        steps = n_steps or self.default_steps
        cfm_kw = {}
        if cfg_rate is not None:
            if self.meanflow:
                raise ValueError("the meanflow S3Gen (Turbo/Nano) has no classifier-free guidance: cfg_rate does "
                                 "not apply")
            cfm_kw["cfg_rates"] = [float(cfg_rate)] * steps if isinstance(cfg_rate, numbers.Real) else list(cfg_rate)
        strengths = None
        if speaker_strength is not None and not isinstance(speaker_strength, numbers.Real):
            strengths = [float(s) for s in speaker_strength]
            if len(strengths) != steps:
                raise ValueError(f"speaker_strength has {len(strengths)} values for {steps} steps")
        if cfm is not None and (cfm_kw or speaker_strength is not None):
            raise ValueError("cfg_rate / speaker_strength are per-call controls of the eager CFM; cfm= cannot take them")
        tokens = torch.atleast_2d(tokens).to(dev)
        B = tokens.size(0)
        if token_lens is None:
            token_lens = torch.full((B,), tokens.size(1), dtype=torch.long)
        token_lens = torch.as_tensor(token_lens).long()
        refs = [refs] * B if isinstance(refs, Mapping) else list(refs)
        if len(refs) != B:
            raise ValueError(f"{len(refs)} reference dicts for a batch of {B}")
        if int(token_lens.min()) < 1:
            raise ValueError("every request needs at least one speech token")
        bad = (tokens >= SPEECH_VOCAB_SIZE) | (tokens < 0)
        valid_cols = length_mask(token_lens.to(dev), tokens.size(1))
        if bool((bad & valid_cols).any()):
            raise ValueError(f"speech tokens must be in [0, {SPEECH_VOCAB_SIZE}); drop T3's special tokens first")

        full, p_mel, new = self.mel_lengths(token_lens, refs)
        if int(new.min()) < 1:
            raise ValueError("the prompt mel is longer than prompt plus new tokens allow")
        L = int(full.max())
        prompt_tok = _pad_rows([torch.atleast_2d(r["prompt_token"])[0, : _prompt_len(r)] for r in refs], dev)
        prompt_lens = torch.tensor([_prompt_len(r) for r in refs], device=dev)
        all_tok, all_lens = concat_prompt_tokens(prompt_tok, prompt_lens, tokens, token_lens.to(dev))
        with nvtx.range("flow_encoder", "flow"):
            mu, mask = self.flow.encode_tokens(all_tok, all_lens, finalize=True)  # [B, 80, L], [B, 1, L]
        strength = 1.0 if speaker_strength is None or strengths is not None else float(speaker_strength)
        spks = torch.cat([self.flow.embed_speaker(torch.atleast_2d(r["embedding"]).to(dev, dtype), strength)
                          for r in refs])
        if strengths is not None:  # [n_steps, B, 80]
            cfm_kw["step_spks"] = torch.stack([
                torch.cat([self.flow.embed_speaker(torch.atleast_2d(r["embedding"]).to(dev, dtype), s) for r in refs])
                for s in strengths])
        cond = torch.zeros_like(mu)
        for b, r in enumerate(refs):
            feat = torch.atleast_3d(r["prompt_feat"]).reshape(-1, MEL_BINS)  # [F, 80]
            cond[b, :, : feat.shape[0]] = feat.to(dev, dtype).T

        if noise is None:
            noise = torch.randn(B, MEL_BINS, L, generator=generator, device=generator.device if generator else dev,
                                dtype=torch.float32)
        noise = torch.atleast_3d(noise)
        if noise.dim() != 3 or noise.shape[0] != B or noise.shape[1] != MEL_BINS or noise.shape[2] < L:
            raise ValueError(f"noise must be [{B}, {MEL_BINS}, >= {L}] (prompt + new frames), "
                             f"got {list(noise.shape)}")
        padded = bool((full < L).any())  # host-known: no device sync
        noise = noise[..., :L].to(dev, torch.float32)  # the CFM casts it to its own dtype; the mel comes back fp32
        if padded:
            noise = noise * mask
        # Unpadded (every single request): the estimator skips its ~100 all-ones mask passes.
        mel = (cfm or self.flow.decoder)(mu, mask if padded else None, spks, cond, n_steps=steps,
                                         noise=noise, meanflow=self.meanflow, **cfm_kw)
        M = int(new.max())
        out = mel.new_zeros(B, MEL_BINS, M)
        for b in range(B):
            s, n = int(p_mel[b]), int(new[b])
            out[b, :, :n] = mel[b, :, s: s + n]
        return out, new  # lengths stay on the host: they are known there, and HiFT reads them

    # ------------------------------------------------------------------ vocoder

    @torch.inference_mode()
    @nvtx.annotate("hift")
    def hift(self, mel: Tensor, lengths: Optional[Tensor] = None, *, noise_free: bool = False,
             generator: Optional[torch.Generator] = None, fade: bool = True) -> Tensor:
        """Mel ``[B, 80, T]`` -> waveform ``[B, 480 T]`` with the reference's trim-fade."""
        mel = torch.atleast_3d(mel).to(self.device, self.mel2wav.conv_pre.weight.dtype)
        wav = self.mel2wav(mel, lengths, noise_free=noise_free, generator=generator)
        return trim_fade(wav) if fade else wav


def _prompt_len(ref: Mapping) -> int:
    """Valid prompt tokens of a reference dict (``prompt_token_len`` or the tensor's width)."""
    n = ref.get("prompt_token_len")
    width = torch.atleast_2d(ref["prompt_token"]).shape[1]
    return width if n is None else min(int(torch.as_tensor(n).reshape(-1)[0]), width)


def _pad_rows(rows: Sequence[Tensor], device) -> Tensor:
    out = torch.zeros(len(rows), max(1, max(r.numel() for r in rows)), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        out[b, : r.numel()] = r.to(device)
    return out


__all__ = ["S3Gen", "Flow", "S3_SR", "S3GEN_SIL", "PROMPT_MAX_SECONDS", "TOLERATED_KEYS"]
