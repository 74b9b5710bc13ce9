"""Streaming S3Gen: speech tokens that arrive a few at a time -> audio chunks that join without clicks.

The recipe is CosyVoice 2's streaming ``token2wav`` (FunAudioLLM/CosyVoice ``cosyvoice/cli/model.py``
``CosyVoice2Model.token2wav``; ``flow/flow.py`` ``CausalMaskedDiffWithXvec.inference(finalize=)``;
``flow/flow_matching.py`` ``CausalConditionalCFM.rand_noise``; ``hifigan/generator.py``
``HiFTGenerator.inference(cache_source=)``), re-derived for our modules. On each push of the
tokens so far:

1. Flow: re-decode prompt + *all* tokens so far. Until the final push the last
   ``pre_lookahead_len`` tokens (6 mel frames) are dropped (``encode_tokens(finalize=False)``):
   their look-ahead tokens are not known yet. The CFM's initial noise is a slice of one buffer
   ``[1, 80, 2 (P + max_tokens)]`` drawn once, so a re-decoded prefix starts from the same noise
   (CosyVoice's ``rand_noise``).
2. HiFT, one piece per push, over frames [cut - C, end): C = ``context_frames`` frames that were
   already emitted (left context; their audio is dropped), the X = ``crossfade_frames`` frames
   after the cut that the previous piece vocoded too, and the rest of the new decode. Over
   [cut - C, cut + X) the piece gets the previous piece's mel and excitation, sample for sample
   (CosyVoice's ``hift_cache_dict`` ``mel`` / ``source``); the excitation then continues from the NSF
   phase where the previous one stood (``hift.continue_excitation``; CosyVoice restarts the sines
   there with new random phases). With ``mel_blend`` the mel moves from the previous decode to
   the new one across the X frames, so HiFT never sees a step between two decodes.
3. Overlap-add: the piece's audio over [cut, cut + X) is cross-faded with the previous piece's
   (``hift_cache_dict['speech']``, ``speech_window``; here complementary raised-cosine halves that sum to one, where
   CosyVoice's Hamming halves sum to 1.08). A non-final piece emits up to ``end - R - X`` (R =
   ``holdback_frames``) and keeps its audio of the next X frames as the next tail; the final
   push emits everything. Chunks therefore add up to exactly the whole-utterance length
   (480 samples per frame) and ``trim_fade`` is applied once, by absolute position.

Why not CosyVoice's layout (X = 8, C = R = 0)? HiFT is non-causal: a piece's output differs
from a one-pass vocode up to ~11 frames from either edge (the F0 predictor reaches 5 frames, the
conv stack the rest). CosyVoice fades between the old piece's last 8 frames (its right edge)
and the new piece's first 8 (its left edge): two edge-damaged versions. Measured with the flow
taken out (prefixes of one mel, noise-free, tamed dummy vocoder, against one HiFT pass driven by
the stream's own excitation; ``profiling/stream_quality.py``'s ``seam_dev``), the largest
deviation near a join is 13-18 % of the peak for CosyVoice's layout, 30-50 % for independent
chunks, and 2-7 % (once 15 %) for the defaults here (X = 4, C = 12, R = 8). Left context is free of latency
(HiFT compute only; C = 0 with R = 8: 23 %); R is latency: the defaults hold 12 frames
(240 ms) where CosyVoice holds 8, and X = 4, R = 4 (8 held frames) reached 57 % at single frames.

The price, against decoding the whole utterance at once:

- The flow's attention is full (Chatterbox's encoder and estimator use no chunk masks,
  ``static_chunk_size = 0``; CosyVoice 2 trained with them), so every mel frame depends on every
  later token; a piece's frames are decoded with only the tokens up to its end (+3 look-ahead).
  With dummy weights, whose attention is nearly uniform, this is the dominant error and it
  falls as the prefix grows: 250 tokens after a 4 s prompt, chunks of 25, give 58 % relative mel
  error for the first chunk, 20 % mid-way and under 5 % in the last second; nearly all of it
  comes from the estimator seeing a shorter sequence, not from the encoder's ``mu`` (~1-2 %).
  ``profiling/stream_quality.py`` measures it; real weights need measuring there too.
- HiFT noise (random phases, additive noise) is drawn per piece: statistically the same signal,
  not the same samples as a one-pass run. One final push equals the whole output exactly
  (same noise buffer, equally seeded generator).
- Cost: each push re-decodes the whole prefix (flow cost grows with the square of the number of
  pushes); latency is the look-ahead (3 tokens) plus R + X held frames.

One request per stream; batching streams' flow calls is the engine's business.

Backends: the stream runs its model through ``StreamOps`` (encode, CFM, F0, excitation, filter).
``TorchStreamOps`` wraps the torch ``S3Gen``; a decoder of another backend provides its own through
``stream_ops()`` (``export.ort_s3gen.OrtStreamOps``: the bundle's graphs, the same excitation code),
so the recipe, the noise buffer and the joins are one code path for every backend.
"""
from __future__ import annotations

import math
from typing import List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..models.s3gen.cfm import MEL_BINS
from ..models.s3gen.encoder import SPEECH_VOCAB_SIZE
from ..models.s3gen.hift import continue_excitation, trim_fade
from ..models.s3gen.s3gen import S3Gen, _prompt_len
from ..profiling import nvtx

DEFAULT_MAX_TOKENS = 1100  # T3's longest generation (max_new_tokens 1000) plus margin
CROSSFADE_FRAMES = 4  # frames vocoded twice and cross-faded at a join (CosyVoice 2: 8, its mel_cache_len)
CONTEXT_FRAMES = 12  # already-emitted frames re-vocoded as left context (HiFT's reach is ~11 frames)
HOLDBACK_FRAMES = 8  # frames kept back past the cross-fade, off the piece's right edge (CosyVoice 2: 0)


def crossfade_windows(n: int, device=None, dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """(fade_in, fade_out) ``[n]``: raised-cosine halves with fade_in + fade_out = 1 at every sample."""
    t = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    fade_in = 0.5 - 0.5 * torch.cos(math.pi * t)
    return fade_in.to(dtype), (1 - fade_in).to(dtype)


def noise_buffer(s3gen: S3Gen, ref: Mapping, max_tokens: int = DEFAULT_MAX_TOKENS,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """The CFM's fixed initial noise for one request: ``[1, 80, 2 (P + max_tokens)]`` fp32 (P = prompt tokens)."""
    n = s3gen.flow.config.token_mel_ratio * (_prompt_len(ref) + max_tokens)
    dev = generator.device if generator is not None else s3gen.device
    return torch.randn(1, MEL_BINS, n, generator=generator, device=dev, dtype=torch.float32)


class TorchStreamOps:
    """What ``S3GenStream`` runs, on the torch ``S3Gen`` (another backend's decoder provides the
    same methods through its ``stream_ops()``)."""

    def __init__(self, s3gen: S3Gen):
        self.s3gen = s3gen
        fc, hc = s3gen.flow.config, s3gen.mel2wav.config
        self.token_mel_ratio, self.pre_lookahead_len = fc.token_mel_ratio, fc.pre_lookahead_len
        self.samples_per_frame, self.sampling_rate = hc.samples_per_frame, hc.sampling_rate
        self.device, self.dtype = s3gen.device, s3gen.dtype
        self.hift_dtype = s3gen.mel2wav.conv_pre.weight.dtype
        self.meanflow = s3gen.meanflow

    def embed_speaker(self, embedding: Tensor) -> Tensor:
        """x-vector ``[1, 192]`` -> spks ``[1, 80]``."""
        return self.s3gen.flow.embed_speaker(embedding.to(self.device, self.dtype))

    def encode(self, tokens: Tensor, finalize: bool) -> Tensor:
        """Prompt + new tokens ``[1, T]`` -> mu ``[1, 80, 2T]`` (the look-ahead's frames dropped
        unless ``finalize``)."""
        lens = torch.tensor([tokens.shape[1]], device=tokens.device)
        return self.s3gen.flow.encode_tokens(tokens, lens, finalize=finalize)[0]

    def decode_mel(self, mu: Tensor, spks: Tensor, cond: Tensor, n_steps: int, noise: Tensor) -> Tensor:
        """The CFM over the full (unpadded, so unmasked) length -> mel ``[1, 80, L]``."""
        return self.s3gen.flow.decoder(mu, None, spks, cond, n_steps=n_steps, noise=noise, meanflow=self.meanflow)

    def f0(self, mel: Tensor) -> Tensor:
        return self.s3gen.mel2wav.f0_predictor(mel)

    def excitation(self, f0: Tensor, cycles: Optional[Tensor], *, noise_free: bool,
                   generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
        return continue_excitation(self.s3gen.mel2wav, f0, cycles, noise_free=noise_free, generator=generator)

    def vocode(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel ``[1, 80, M]`` + source ``[1, 1, 480 M]`` -> waveform ``[480 M]`` (no trim-fade)."""
        return self.s3gen.mel2wav.decode(mel, source)[0]


def stream_ops(s3gen):
    """The ``StreamOps`` of a decoder: its own ``stream_ops()`` (another backend's), else the torch
    ``S3Gen``'s. Raises ValueError naming why when the decoder cannot stream."""
    own = getattr(s3gen, "stream_ops", None)
    return own() if callable(own) else TorchStreamOps(s3gen)


def can_stream(s3gen) -> bool:
    """Whether ``S3GenStream`` runs on this decoder (the torch ``S3Gen``, or a bundle with the
    streaming graphs)."""
    own = getattr(s3gen, "can_stream", None)
    return True if own is None else bool(own)


@torch.inference_mode()
def whole_utterance(s3gen: S3Gen, ref: Mapping, tokens: Tensor, *, n_steps: Optional[int] = None,
                    noise: Tensor, noise_free: bool = False,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """All ``tokens [N]`` decoded at once with the same noise buffer a stream uses -> (mel ``[80, M]``,
    wav ``[480 M]`` on the CPU, with trim-fade; M = 2N for a prompt of 2P frames): what a stream
    is measured against."""
    tokens = torch.as_tensor(tokens).reshape(-1)
    mel, _ = s3gen.flow_mel(tokens[None], None, ref, n_steps=n_steps or s3gen.default_steps, noise=noise)
    wav = s3gen.hift(mel, noise_free=noise_free, generator=generator)
    return mel[0], wav[0].float().cpu()


class S3GenStream:
    """Incremental S3Gen decoding of ONE request.

    ``push(tokens_so_far)`` returns the new audio since the last push (possibly empty);
    ``push(tokens, final=True)`` flushes. See the module docstring for the recipe and its price.

    ``noise`` (``[1, 80, >= 2 (P + max_tokens)]``) is the CFM's noise buffer; None draws it from
    ``generator`` (``noise_buffer``). The HiFT source draws from ``generator`` too (none:
    torch's default generator; one on the model's device avoids copying draws over);
    ``noise_free`` drops the HiFT noise altogether.

    Joins, in mel frames: each piece vocodes ``context_frames`` already-emitted frames before
    the join (left context, discarded), cross-fades ``crossfade_frames`` with the previous
    piece's version of them, and holds back its last ``holdback_frames + crossfade_frames``
    frames (its right edge) for the next piece to re-vocode. The held audio is latency.
    """

    def __init__(self, s3gen: S3Gen, ref: Mapping, *, n_steps: Optional[int] = None,
                 noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, crossfade_frames: int = CROSSFADE_FRAMES,
                 context_frames: int = CONTEXT_FRAMES, holdback_frames: int = HOLDBACK_FRAMES,
                 noise_free: bool = False, mel_blend: bool = True, keep_source: bool = False):
        if crossfade_frames < 1 or context_frames < 0 or holdback_frames < 0:
            raise ValueError(f"need crossfade_frames >= 1, context_frames >= 0, holdback_frames >= 0; got "
                             f"{crossfade_frames}, {context_frames}, {holdback_frames}")
        self.s3gen, self.ref = s3gen, ref
        self.ops = ops = stream_ops(s3gen)
        self.n_steps = n_steps or s3gen.default_steps
        self.max_tokens = max_tokens
        self.generator, self.noise_free, self.mel_blend = generator, noise_free, mel_blend
        self.ratio = ops.token_mel_ratio  # mel frames per token (2)
        self.lookahead = ops.pre_lookahead_len  # tokens (3)
        self.hop = ops.samples_per_frame  # samples per mel frame (480)
        self.X, self.C, self.R = crossfade_frames, context_frames, holdback_frames
        dev, dtype = ops.device, ops.dtype

        P = _prompt_len(ref)
        self.prompt_tokens = torch.atleast_2d(ref["prompt_token"])[:, :P].to(dev).long()  # [1, P]
        feat = torch.atleast_3d(ref["prompt_feat"]).reshape(-1, MEL_BINS)  # [F, 80]
        self.prompt_frames = feat.shape[0]
        self.prompt_feat = feat.to(dev, dtype).T.contiguous()  # [80, F]
        with torch.inference_mode():
            self.spks = ops.embed_speaker(torch.atleast_2d(ref["embedding"]).to(dev, dtype))  # [1, 80]
        need = self.ratio * (P + max_tokens)
        if noise is None:
            noise = noise_buffer(s3gen, ref, max_tokens, generator)
        noise = torch.atleast_3d(noise)
        if noise.shape[0] != 1 or noise.shape[1] != MEL_BINS or noise.shape[2] < need:
            raise ValueError(f"noise must be [1, {MEL_BINS}, >= {need}] (2 x (prompt + max_tokens)), "
                             f"got {list(noise.shape)}")
        self.noise = noise  # [1, 80, >= 2 (P + max_tokens)], as given (re-used by whole_utterance)
        self._noise = noise[..., :need].to(dev, dtype)

        hift_dtype = ops.hift_dtype
        self.wav_in, self.wav_out = crossfade_windows(self.X * self.hop, dev, hift_dtype)  # [480 X]
        self.mel_in, _ = crossfade_windows(self.X, dev, hift_dtype)  # [X]: the same fade at frame rate
        self.trim = trim_fade(torch.ones(1, 2 * ops.sampling_rate // 50))[0]  # [960]: the start-of-stream envelope

        self.n_tokens = 0  # the last push's length
        self.frames_emitted = 0  # mel frames (after the prompt) whose audio has been returned
        self.samples_out = 0  # samples returned so far (480 frames_emitted)
        self.finished = False
        self.chunk_mels: List[Tensor] = []  # per piece: the mel of the frames it emitted [80, n] (measurement)
        self.chunk_sources: Optional[List[Tensor]] = [] if keep_source else None  # and their source [480 n]
        self._tokens: Optional[Tensor] = None  # [N] on the device: the last decoded tokens
        self._ctx_mel: Optional[Tensor] = None  # [1, 80, c + X]: last piece's input over [cut - c, cut + X)
        self._ctx_src: Optional[Tensor] = None  # [1, 1, 480 (c + X)]: its source there
        self._cycles: Optional[Tensor] = None  # [1, H, 1]: NSF phase at frame cut + X
        self._tail: Optional[Tensor] = None  # [480 X]: last piece's audio of frames [cut, cut + X)

    # ------------------------------------------------------------------ API

    @property
    def held_frames(self) -> int:
        """Decoded frames a non-final piece keeps back (its right edge): latency beyond the look-ahead."""
        return self.R + self.X

    def tokens_needed(self, frames: int = 1) -> int:
        """Fewest tokens for which a first, non-final push emits at least ``frames`` frames
        (look-ahead and held frames included): what an engine's first chunk should be."""
        n = 0
        while self.frames_available(n, False) - self.held_frames < frames:
            n += 1
        return n

    def frames_available(self, n_tokens: int, final: bool) -> int:
        """Mel frames after the prompt that a decode of ``n_tokens`` tokens gives."""
        usable = n_tokens if final else max(0, n_tokens - self.lookahead)
        full = self.ratio * (int(self.prompt_tokens.shape[1]) + usable)
        return max(0, full - self.prompt_frames)

    @torch.inference_mode()
    def push(self, tokens: Tensor, final: bool = False) -> Tensor:
        """All valid speech tokens so far (``[N]``, growing between calls) -> the new audio ``[n]``
        (CPU float32; empty while too few new tokens). ``final=True`` flushes the rest."""
        if self.finished:
            raise RuntimeError("push after the final push: start a new S3GenStream")
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"push takes the 1-D tokens of one request, got shape {list(tokens.shape)}")
        N = tokens.shape[0]
        if N < self.n_tokens:
            raise ValueError(f"tokens shrank from {self.n_tokens} to {N}: push all tokens so far")
        if N > self.max_tokens:
            raise ValueError(f"{N} tokens exceed this stream's max_tokens={self.max_tokens}")
        self.n_tokens = N
        empty = torch.zeros(0, dtype=torch.float32)
        if N == 0:
            self.finished = final
            return empty

        end = self.frames_available(N, final)  # host-known: no device read
        emit_end = end if final else end - self.held_frames
        # A non-final piece must emit all of the frames it cross-fades (and the first one
        # something): fewer would leave part of a join un-faded.
        if not final and emit_end < self.frames_emitted + (self.X if self._tail is not None else 1):
            return empty
        tokens = self._check_tokens(tokens)
        with nvtx.range("stream_flow", "flow"):
            mel = self._flow(tokens, finalize=final)  # [1, 80, end]
        with nvtx.range("stream_hift", "hift"):
            wav = self._vocode(mel, emit_end, final)
        self.finished = final
        return self._emit(wav)

    def committed_mel(self) -> Tensor:
        """The mel of the frames emitted so far, as each piece decoded them: ``[80, frames_emitted]``."""
        if not self.chunk_mels:
            return torch.zeros(MEL_BINS, 0)
        return torch.cat(self.chunk_mels, dim=-1)

    # ------------------------------------------------------------------ steps

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        tokens = tokens.to(self.ops.device).long()
        bad = ((tokens < 0) | (tokens >= SPEECH_VOCAB_SIZE)).any()
        if self._tokens is not None:
            bad = bad | (tokens[: self._tokens.shape[0]] != self._tokens).any()
        if bool(bad):  # one device read per decode, as flow_mel's own check
            raise ValueError(f"speech tokens must be in [0, {SPEECH_VOCAB_SIZE}) and extend the previous push's")
        self._tokens = tokens
        return tokens

    def _flow(self, tokens: Tensor, finalize: bool) -> Tensor:
        """``S3Gen.flow_mel`` for one unpadded request, with the look-ahead dropped unless ``finalize``
        and the noise sliced from the fixed buffer -> mel after the prompt ``[1, 80, frames]``."""
        all_tok = torch.cat([self.prompt_tokens, tokens[None]], dim=1)  # [1, P + N]
        mu = self.ops.encode(all_tok, finalize)  # [1, 80, L]
        L = mu.shape[-1]
        if L <= self.prompt_frames:
            raise ValueError("the prompt mel is longer than prompt plus new tokens allow")
        cond = torch.zeros_like(mu)
        cond[0, :, : self.prompt_frames] = self.prompt_feat
        # Unpadded: the estimator runs without a mask, as flow_mel does for a single request.
        mel = self.ops.decode_mel(mu, self.spks, cond, self.n_steps, self._noise[..., :L])
        return mel[..., self.prompt_frames:]

    def _vocode(self, mel: Tensor, emit_end: int, final: bool) -> Tensor:
        """One HiFT piece: the decoded mel ``[1, 80, end]`` -> the audio of frames
        [frames_emitted, emit_end); keeps the join state for the next piece."""
        ops = self.ops
        mel = mel.to(ops.hift_dtype)
        cut, X, hop, end = self.frames_emitted, self.X, self.hop, mel.shape[-1]
        if self._tail is None:  # the first piece: nothing before it
            c, x = 0, 0
            mel_in = mel
            src = None
        else:
            c, x = self._ctx_mel.shape[-1] - X, X
            fade = self._ctx_mel[..., c:]  # the previous piece's input over the cross-fade frames
            if self.mel_blend:  # move from the old decode to this one over the cross-fade
                fade = fade + (mel[..., cut: cut + X] - fade) * self.mel_in
            mel_in = torch.cat([self._ctx_mel[..., :c], fade, mel[..., cut + X:]], dim=-1)  # [cut - c, end)
            src = self._ctx_src
        f0 = ops.f0(mel_in)  # [1, c + end - cut]
        # The source: the previous piece's over [cut - c, cut + X), then continued from its phase
        # up to the next piece's cross-fade end (emit_end + X, where its cache will end), then on.
        split = c + x + max(0, min(emit_end + X, end) - (cut + x))
        s1, cycles = ops.excitation(f0[:, c + x: split], self._cycles, noise_free=self.noise_free,
                                    generator=self.generator)
        pieces = [s1] if src is None else [src, s1]
        if split < f0.shape[1]:
            s2, _ = ops.excitation(f0[:, split:], cycles, noise_free=self.noise_free, generator=self.generator)
            pieces.append(s2)
        s = torch.cat(pieces, dim=-1)  # [1, 1, 480 (c + end - cut)]
        wav = ops.vocode(mel_in, s)[c * hop:]  # frames [cut, end)
        if self._tail is not None:
            wav = torch.cat([wav[: X * hop] * self.wav_in + self._tail * self.wav_out, wav[X * hop:]])
        self.chunk_mels.append(mel_in[0, :, c: c + emit_end - cut].float())
        if self.chunk_sources is not None:
            self.chunk_sources.append(s[0, 0, c * hop: (c + emit_end - cut) * hop].float())
        self.frames_emitted = emit_end
        if final:
            self._tail = self._ctx_mel = self._ctx_src = self._cycles = None
            return wav
        lo = max(0, (emit_end - cut + c) - self.C)  # index in mel_in of the next context's start
        hi = c + emit_end - cut + X
        self._ctx_mel = mel_in[..., lo:hi]
        self._ctx_src = s[..., lo * hop: hi * hop]
        self._cycles = cycles
        self._tail = wav[(emit_end - cut) * hop: (emit_end - cut + X) * hop]
        return wav[: (emit_end - cut) * hop]

    def _emit(self, wav: Tensor) -> Tensor:
        """Apply the start-of-stream trim-fade by absolute position; to the CPU as float32."""
        start, n_trim = self.samples_out, self.trim.shape[0]
        wav = wav.float().cpu()
        if start < n_trim and wav.numel():
            k = min(n_trim - start, wav.shape[0])
            wav = wav.clone()
            wav[:k] *= self.trim[start: start + k]
        self.samples_out += wav.shape[0]
        return wav


__all__ = ["S3GenStream", "TorchStreamOps", "stream_ops", "can_stream", "whole_utterance", "noise_buffer", "crossfade_windows", "CROSSFADE_FRAMES", "CONTEXT_FRAMES", "HOLDBACK_FRAMES",
           "DEFAULT_MAX_TOKENS"]
