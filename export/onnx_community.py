"""``--layout onnx-community``: the four-graph bundle that existing Chatterbox ONNX clients read.

The layout is the one of the published ``onnx-community/chatterbox-ONNX`` bundle (English; made
by the public conversion scripts VladOS95-cyber/onnx_conversion_scripts ``chatterbox/``) and read
unchanged by the ``chatterbox-onnx`` PyPI client and transformers.js ``ChatterboxModel``::

    onnx/speech_encoder.onnx (+ .onnx_data)       audio_values [1, N] f32 (24 kHz)
        -> audio_features [1, 33, 1024] f32 (T3 conditioning: speaker, perceiver; no emotion)
           audio_tokens [1, P] i64           (S3Gen prompt tokens)
           speaker_embeddings [1, 192] f32   (CAM++ x-vector)
           speaker_features [1, F, 80] f32   (S3Gen prompt mel)
    onnx/embed_tokens.onnx (+ .onnx_data)         input_ids, position_ids [B, T] i64, exaggeration [B] f32
        -> inputs_embeds [B, T, 1024] f32
    onnx/language_model.onnx (+ .onnx_data)       inputs_embeds [B, T, 1024], attention_mask [B, S + T] i64,
                                                  past_key_values.{i}.key/value [B, 16, S, 64] f32
        -> logits [B, T, 8194] f32, present.{i}.key/value [B, 16, S + T, 64] f32
    onnx/conditional_decoder.onnx (+ .onnx_data)  speech_tokens [B, P + G] i64, speaker_embeddings [B, 192],
                                                  speaker_features [B, F, 80]
        -> waveform [B, 480 (2 (P + G) - F)] f32 (24 kHz)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, config.json, generation_config.json,
    preprocessor_config.json, processor_config.json, default_voice.wav (when given), manifest.json

What the graphs compute (the clients do the rest: tokenizer, the concatenation
``[audio_features; embed_tokens(prompt ids)]``, greedy/sampled decoding, prompt tokens + new tokens):

* The tokenizer (``tokenizer.json``) writes ``[6563, 255, text..., 0, 6561, 6561]``: the emotion
  ("exaggeration") slot, the text between its start/stop tokens (spaces as ``[SPACE]``), and T3's
  two start-of-speech tokens. ``embed_tokens`` turns 6563 into ``emotion_adv_fc(exaggeration)``,
  text ids (up to the first stop token, in a row that has a start-of-speech after it) into text
  embeddings plus text positions and everything else into speech embeddings plus speech positions
  (``position_ids``), so ``[audio_features; inputs_embeds]`` is exactly ``T3.prompt_embeds`` of the
  voice and text (without CFG), and one generated token at ``position_ids = i + 1`` is
  ``T3.embed_speech``.
* ``language_model`` is T3's Llama backbone and speech head with HF-style caches; positions are
  ``S .. S + T - 1`` (S = past length; the layout has no ``position_ids`` input), keys where
  ``attention_mask`` is 0 are not attended to.
* ``speech_encoder`` is ``TTS.prepare_conditionals`` (Llama variants) in one graph: the clip
  resampled to 16 kHz, T3's prompt tokens (first 6 s, 150 tokens) through the speech embeddings
  and the perceiver, the voice encoder's speaker embedding (silence trim, mel, partials, LSTM, mean;
  the published graph uses a zero speaker embedding instead), and S3Gen's reference of the first
  10 s (prompt mel, CAM++ x-vector, prompt tokens trimmed to the mel).
* ``conditional_decoder`` is S3Gen: flow encoder, 10 CFM Euler steps with CFG (rate 0.7) from a
  fixed noise draw (seeded, baked in: the published graph draws ``randn`` inside, so its audio
  changes from run to run), the prompt frames dropped, HiFT with fixed source draws (harmonic
  phases and a 2 s cycle of source noise, seeded) and the exportable iSTFT, then the trim-fade.

Differences from the published English graphs, all deliberate (each published one departs from
the PyTorch model; ours follow ``chatterbox_rt``'s torch runtime, which follows the reference):

* 16 kHz resampling: the published graph uses torchaudio's windowed sinc everywhere. Ours uses it
  for S3Gen's reference (as ``S3Gen.embed_ref``, exactly), and for T3's path (prompt tokens, voice
  encoder), where ``TTS.prepare_conditionals`` uses soxr, a long Kaiser FIR fitted to soxr
  (``SoxrLikeResample``: ~65 dB SNR against soxr on speech; torchaudio's sinc is at ~33 dB). The
  remaining difference is measured at export (``check.vs_prepare_conditionals`` in the manifest).
* Speaker embedding: the voice encoder's (published: zeros); CAM++ with its BatchNorm (published
  swaps the last BatchNorm for an untrained LayerNorm); the x-vector of the first 10 s (published:
  the whole clip).
* CFM: both branches of CFG see the same x and mask at every step (published: the unconditional
  branch gets x = 0 and mask = 0 at the first step).
* ``embed_tokens``: a single generated speech token 0 is a speech token (published: a text token).
* ``speech_encoder`` takes one clip (batch 1); the published graph names a batch axis.

Only fp32 graphs are written here (``precision="int4"`` adds ``language_model_q4.onnx``, what
``ChatterboxOnnx(quantized=True)`` loads; ``"int8"`` adds ``language_model_quantized.onnx``; either
also writes the other three graphs under that suffix, unquantised, for clients that load all four
by dtype: ``_alias_graphs``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._onnx import DEFAULT_OPSET, ExportError, check_opset, export_graph, open_session, rel_error, run
from .manifest import MANIFEST, BundleError, Manifest, combined_hash, move_into_place, new_manifest, record_files
from .spec import Dim, GraphSpec, T

log = logging.getLogger(__name__)

LAYOUT = "onnx-community"
ONNX_DIR = "onnx"
DATA_SUFFIX = ".onnx_data"  # <name>.onnx_data next to <name>.onnx, as the clients fetch it
GRAPHS = ("speech_encoder", "embed_tokens", "language_model", "conditional_decoder")
DEFAULT_VOICE = "default_voice.wav"

EXAGGERATION_TOKEN = 6563  # the emotion slot the tokenizer writes first (published EXAGGERATION_TOKEN)
S3_SR, S3GEN_SR = 16000, 24000
T3_PROMPT_SECONDS = 6  # ENC_COND_LEN: T3's prompt tokens come from the first 6 s at 16 kHz (Turbo/Nano: 15)
S3GEN_PROMPT_SECONDS = 10  # DEC_COND_LEN: S3Gen's reference is the first 10 s at 24 kHz
MAX_SPEECH_TOKENS = 2500  # the flow encoder's position table: 5000 mel frames
NOISE_SEED = 0  # the fixed CFM noise and HiFT source draws
SOURCE_NOISE_FRAMES = 100  # HiFT's source noise repeats every 100 mel frames (2 s)
# Export-check tolerances (max |ort - torch| / max |torch|, fp32).
TOL = {"speech_encoder": 1e-4, "embed_tokens": 1e-5, "language_model": 1e-4, "conditional_decoder": 2e-3}

PRECISIONS = ("fp32", "int8", "int4")
QUANTIZED_LM = {"int4": ("language_model_q4", 4), "int8": ("language_model_quantized", 8)}


# ------------------------------------------------------------------------------------ specs


def graph_specs(t3_cfg) -> dict:
    """The four ``GraphSpec``s of the layout for a Llama T3 config (names, dtypes and axes as the
    published English bundle; symbolic axis names as its export's ``dynamic_axes``)."""
    b = t3_cfg.backbone
    L, H, Dh, D, V = b.num_layers, b.num_heads, b.head_dim, b.hidden_size, t3_cfg.speech_vocab_size
    cond_len = 1 + t3_cfg.perceiver_queries
    batch = Dim(1, 1, 8)
    se = GraphSpec(
        "speech_encoder", "frontend",
        inputs=[T("audio_values", "float32", 1, "num_samples")],
        outputs=[T("audio_features", "float32", 1, cond_len, D),
                 T("audio_tokens", "int64", 1, "audio_sequence_length"),
                 T("speaker_embeddings", "float32", 1, 192),
                 T("speaker_features", "float32", 1, "feature_dim", 80)],
        dims={"num_samples": Dim(S3GEN_SR, 10 * S3GEN_SR, 60 * S3GEN_SR)},
        doc="A 24 kHz reference clip -> T3's conditioning [speaker, perceiver(prompt speech)] (the emotion comes "
            "from embed_tokens), S3Gen's prompt tokens, CAM++ x-vector and prompt mel (first 10 s); "
            "TTS.prepare_conditionals with sinc resampling.")
    et = GraphSpec(
        "embed_tokens", "t3",
        inputs=[T("input_ids", "int64", "batch_size", "sequence_length"),
                T("position_ids", "int64", "batch_size", "sequence_length"),
                T("exaggeration", "float32", "batch_size")],
        outputs=[T("inputs_embeds", "float32", "batch_size", "sequence_length", D)],
        dims={"batch_size": batch, "sequence_length": Dim(1, 64, t3_cfg.text_pos_len + 3)},
        doc=f"{EXAGGERATION_TOKEN} -> emotion_adv_fc(exaggeration); ids up to the first stop-text token "
            f"(0) in a row with a start-of-speech ({t3_cfg.start_speech_token}) after it -> text embedding + "
            "text position; the rest -> speech embedding + speech position (position_ids).")
    kv = lambda names, length: [T(n, "float32", "batch_size", H, length, Dh) for i in range(L)
                                for n in names(i)]
    lm = GraphSpec(
        "language_model", "t3",
        inputs=[T("inputs_embeds", "float32", "batch_size", "sequence_length", D),
                T("attention_mask", "int64", "batch_size", "total_sequence_length")]
        + kv(lambda i: (f"past_key_values.{i}.key", f"past_key_values.{i}.value"), "past_sequence_length"),
        outputs=[T("logits", "float32", "batch_size", "sequence_length", V)]
        + kv(lambda i: (f"present.{i}.key", f"present.{i}.value"), "total_sequence_length"),
        dims={"batch_size": batch, "sequence_length": Dim(1, 1, 2048), "past_sequence_length": Dim(0, 256, 4096),
              "total_sequence_length": Dim(1, 257, 4096 + 2048)},
        doc="T3's Llama backbone + speech head, HF-style past/present keys and values; positions "
            "past_sequence_length + [0, T); logits of every position.")
    cd = conditional_decoder_spec(
        "S3Gen: [prompt tokens; new tokens] -> flow encoder -> 10-step CFG CFM (fixed noise) -> the frames "
        "after the prompt mel -> HiFT (fixed source draws) -> trim-fade; 24 kHz.")
    return {"speech_encoder": se, "embed_tokens": et, "language_model": lm, "conditional_decoder": cd}


def conditional_decoder_spec(doc: str) -> GraphSpec:
    """The decoder graph's contract, the same in every layout (English, Turbo, Nano)."""
    return GraphSpec(
        "conditional_decoder", "s3gen",
        inputs=[T("speech_tokens", "int64", "batch_size", "num_speech_tokens"),
                T("speaker_embeddings", "float32", "batch_size", 192),
                T("speaker_features", "float32", "batch_size", "feature_dim", 80)],
        outputs=[T("waveform", "float32", "batch_size", "num_samples")],
        dims={"batch_size": Dim(1, 1, 4), "num_speech_tokens": Dim(4, 400, MAX_SPEECH_TOKENS),
              "feature_dim": Dim(2, 500, 1000)},
        doc=doc)


# ------------------------------------------------------------------------------ graph modules


def _t3_prompt_seconds(t3_cfg) -> int:
    """ENC_COND_LEN in seconds: 6 for the Llama variants, 15 for Turbo/Nano (``tts_turbo.py``)."""
    from .onnx_community_turbo import T3_PROMPT_SECONDS as GPT_SECONDS

    return GPT_SECONDS if t3_cfg.is_gpt else T3_PROMPT_SECONDS


class SincResample(nn.Module):
    """``chatterbox_rt.models.resample.sinc_resample`` (torchaudio's Resample, 24 -> 16 kHz) with a
    traced output length: ``[B, N]`` -> ``[B, ceil(2 N / 3)]``."""

    def __init__(self, orig: int = S3GEN_SR, new: int = S3_SR):
        super().__init__()
        from ..models.resample import _sinc_kernel

        g = math.gcd(orig, new)
        self.orig, self.new = orig // g, new // g
        kernel, self.width = _sinc_kernel(self.orig, self.new, None)
        self.register_buffer("kernel", kernel.float().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N = x.shape
        y = F.conv1d(F.pad(x[:, None], (self.width, self.width + self.orig)), self.kernel, stride=self.orig)
        y = y.transpose(1, 2).reshape(B, -1)
        return y[:, : (self.new * N + self.orig - 1) // self.orig]


class SoxrLikeResample(nn.Module):
    """24 -> 16 kHz with a long linear-phase FIR (Kaiser-windowed sinc, 2 x 256 + 1 taps at 48 kHz,
    cutoff 0.9575 of the 8 kHz Nyquist, beta 11) as a strided polyphase conv: an approximation of
    soxr's HQ resampler (what ``chatterbox_rt.audio.resample`` / librosa use) fitted on speech,
    ~65 dB SNR against it on speech (~49 dB on white noise), where torchaudio's sinc is at ~33 dB.
    ``[B, N]`` -> ``[B, ceil(2 N / 3)]``."""

    UP, DOWN = 2, 3
    TAPS_HALF, CUTOFF, BETA = 256, 0.9575, 11.0

    def __init__(self):
        super().__init__()
        L, M, half = self.UP, self.DOWN, self.TAPS_HALF
        n = np.arange(-half, half + 1, dtype=np.float64)
        fc = self.CUTOFF / M  # the cutoff in cycles per 48 kHz sample, times 2 (np.sinc's unit)
        h = fc * L * np.sinc(fc * n) * np.kaiser(n.size, self.BETA)
        h = h / h.sum() * L  # unit DC gain per output phase (on average)
        # y[L q + r] = sum_t x[M q + t] h[half + M r - L t]; kernel tap j holds t = j - pad
        self.pad = half // L + 1
        taps = 2 * self.pad + M
        k = np.zeros((L, 1, taps))
        for r in range(L):
            for j in range(taps):
                i = half + M * r - L * (j - self.pad)
                if 0 <= i < h.size:
                    k[r, 0, j] = h[i]
        self.register_buffer("kernel", torch.from_numpy(k).float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N = x.shape
        taps = self.kernel.shape[-1]
        xp = F.pad(x[:, None], (self.pad, taps))
        y = F.conv1d(xp, self.kernel, stride=self.DOWN)  # [B, UP, Q]
        y = y.transpose(1, 2).reshape(B, -1)
        return y[:, : (self.UP * N + self.DOWN - 1) // self.DOWN]


class VoiceEncoderPipeline(nn.Module):
    """``VoiceEncoder.embeds_from_wavs([wav], 16000)`` in one graph: ``[N]`` -> ``[1, 256]``.

    The silence trim (librosa's RMS frames, 20 dB below the loudest), the mel (float64 STFT as a
    DFT product, rounded to float32 like librosa's complex64), the partials (160 frames every 77,
    the last kept at >= 80 % coverage), the LSTM, the mean over partials and the L2 norm."""

    def __init__(self, ve, top_db: float = 20.0):
        super().__init__()
        from ..models.voice_encoder import get_frame_step, mel_filterbank

        c = self.config = ve.config
        self.ve = ve
        self.top_db = float(top_db)
        self.step = get_frame_step(0.5, c.default_rate, c)
        if c.mel_type != "amp" or c.normalized_mels or c.preemphasis or c.win_size != c.n_fft:
            raise ExportError("the voice encoder graph assumes the reference's amp mels of a full-length window")
        n = torch.arange(c.n_fft, dtype=torch.float64)[:, None]
        k = torch.arange(c.n_fft // 2 + 1, dtype=torch.float64)[None]
        ang = 2 * math.pi * ((n * k) % c.n_fft) / c.n_fft
        window = torch.hann_window(c.win_size, periodic=True, dtype=torch.float64)[:, None]
        self.register_buffer("dft_cos", window * torch.cos(ang), persistent=False)  # [n_fft, K] float64
        self.register_buffer("dft_sin", -window * torch.sin(ang), persistent=False)
        self.register_buffer("basis_t", torch.from_numpy(np.array(mel_filterbank(c))).T.contiguous(),
                             persistent=False)  # [K, M] float32

    def trim(self, y: Tensor) -> Tensor:
        c = self.config
        N = y.shape[0]
        half = c.trim_frame_length // 2
        sq = F.pad((y * y)[None, None], (half, half))
        power = F.avg_pool1d(sq, c.trim_frame_length, c.trim_hop_length)[0, 0]  # [n_frames]
        rms = torch.sqrt(power)
        amin2 = c.trim_amin ** 2
        db = 10.0 * torch.log10(torch.clamp(rms * rms, min=amin2))
        ref = rms.max()
        db = db - 10.0 * torch.log10(torch.clamp(ref * ref, min=amin2))
        keep = db > -self.top_db
        n = keep.shape[0]
        idx = torch.arange(n)
        first = torch.where(keep, idx, torch.full_like(idx, n)).min()
        last = torch.where(keep, idx, torch.full_like(idx, -1)).max()
        start = torch.clamp(first * c.trim_hop_length, max=N)
        end = torch.clamp((last + 1) * c.trim_hop_length, max=N)
        length = torch.clamp(end - start, min=0)
        return y.index_select(0, torch.arange(length) + start)

    def mel(self, y: Tensor) -> Tensor:
        """``[L]`` -> power mel ``[T, 40]`` (T = 1 + L // hop), as ``melspectrogram(y).T``."""
        c = self.config
        pad = c.n_fft // 2
        yp = F.pad(y.double()[None, None], (pad, pad), mode="reflect")[0, 0]
        n_frames = y.shape[0] // c.hop_size + 1
        idx = torch.arange(n_frames)[:, None] * c.hop_size + torch.arange(c.n_fft)[None]
        frames = yp[idx]  # [T, n_fft] float64
        re, im = (frames @ self.dft_cos).float(), (frames @ self.dft_sin).float()  # complex64 rounding
        mag = torch.sqrt(re * re + im * im)
        return (mag * mag) @ self.basis_t

    def forward(self, wav_16k: Tensor) -> Tensor:
        c = self.config
        mel = self.mel(self.trim(wav_16k))  # [T, M]
        win, step = c.ve_partial_frames, self.step
        n_frames = mel.shape[0]
        q = torch.clamp(torch.ones((), dtype=torch.long) * (n_frames - win + step), min=0)
        n0 = q // step
        rem = q - n0 * step
        # get_num_wins: one more window if none fits or the last covers >= 0.8 (= 4/5) of its frames
        extra = (n0 == 0) | ((rem + (win - step)) * 5 >= 4 * win)
        n_wins = n0 + extra.long()
        mel = torch.cat([mel, torch.zeros(win, c.num_mels, dtype=mel.dtype)])
        idx = torch.arange(n_wins)[:, None] * step + torch.arange(win)[None]
        partials = mel[idx]  # [n, 160, 40]
        embeds = self.ve(partials)  # [n, 256], L2-normalised per partial
        raw = embeds.mean(dim=0, keepdim=True)
        return raw / torch.linalg.norm(raw, dim=1, keepdim=True)


class SpeechEncoderGraph(nn.Module):
    """``TTS.prepare_conditionals`` of a Llama variant: ``audio_values [1, N]`` (24 kHz) ->
    (audio_features, audio_tokens, speaker_embeddings, speaker_features)."""

    def __init__(self, tts):
        super().__init__()
        from .frontend_onnx import CAMPPlusGraph, PromptMelGraph, S3TokenizerGraph

        t3, s3gen = tts.t3, tts.s3gen
        cfg = t3.config
        self.resample = SincResample()  # S3Gen's reference: torchaudio's sinc, as S3Gen.embed_ref
        self.resample_t3 = SoxrLikeResample()  # T3's conditioning: soxr in TTS.prepare_conditionals
        self.prompt_mel = PromptMelGraph()
        self.campplus = CAMPPlusGraph(s3gen.speaker_encoder)
        self.s3_tokenizer = S3TokenizerGraph(s3gen.tokenizer)
        self.voice_encoder = VoiceEncoderPipeline(tts.ve)
        # Turbo/Nano: no prompt positions, no perceiver, 15 s of prompt (onnx_community_turbo)
        self.speech_emb = t3.speech_emb
        self.speech_pos_emb = t3.speech_pos_emb.emb if t3.speech_pos_emb is not None else None
        self.spkr_enc, self.perceiver = t3.cond_enc.spkr_enc, t3.cond_enc.perceiver
        self.speaker_embed_size = cfg.speaker_embed_size
        self.prompt_len = cfg.speech_cond_prompt_len
        self.prompt_samples = _t3_prompt_seconds(cfg) * S3_SR
        self.register_buffer("t3_max_tokens", torch.tensor([cfg.speech_cond_prompt_len]), persistent=False)
        # more than a 10 s reference can have (25 tokens/s)
        self.register_buffer("ref_max_tokens", torch.tensor([S3GEN_PROMPT_SECONDS * 25 + 8]), persistent=False)

    def forward(self, audio_values: Tensor):
        wav24 = audio_values.float()
        # T3's conditioning: the whole clip at 16 kHz
        wav16 = self.resample_t3(wav24)
        prompt, _ = self.s3_tokenizer(wav16[:, : self.prompt_samples], self.t3_max_tokens)  # [1, P]
        speaker = self.voice_encoder(wav16[0])  # [1, 256]
        prompt_emb = self.speech_emb(prompt)
        if self.speech_pos_emb is not None:
            prompt_emb = prompt_emb + self.speech_pos_emb(torch.arange(prompt.shape[1]))[None]
        if self.perceiver is not None:
            prompt_emb = self.perceiver(prompt_emb)
        cond = torch.cat([self.spkr_enc(speaker.reshape(-1, self.speaker_embed_size))[:, None], prompt_emb], dim=1)
        # S3Gen's reference: the first 10 s (S3Gen.embed_ref)
        ref24 = wav24[:, : S3GEN_PROMPT_SECONDS * S3GEN_SR]
        feat = self.prompt_mel(ref24)  # [1, F, 80]
        ref16 = self.resample(ref24)
        xvec = self.campplus(ref16)  # [1, 192]
        tokens, _ = self.s3_tokenizer(ref16, self.ref_max_tokens)
        keep = torch.minimum(torch.ones((), dtype=torch.long) * tokens.shape[1],
                             torch.ones((), dtype=torch.long) * (feat.shape[1] // 2))
        tokens = tokens.index_select(1, torch.arange(keep))  # trimmed to the mel, as embed_ref
        return cond, tokens, xvec, feat


class EmbedTokensGraph(nn.Module):
    """``input_ids``, ``position_ids`` ``[B, T]``, ``exaggeration [B]`` -> ``inputs_embeds [B, T, D]``."""

    def __init__(self, t3):
        super().__init__()
        self.cfg = t3.config
        self.text_emb, self.text_pos_emb = t3.text_emb, t3.text_pos_emb.emb
        self.speech_emb, self.speech_pos_emb = t3.speech_emb, t3.speech_pos_emb.emb
        self.emotion_adv_fc = t3.cond_enc.emotion_adv_fc

    def forward(self, input_ids: Tensor, position_ids: Tensor, exaggeration: Tensor) -> Tensor:
        cfg = self.cfg
        B, T_ = input_ids.shape
        ids, pos = input_ids.long(), position_ids.long()
        idx = torch.arange(T_)[None].expand(B, T_)
        big = torch.full_like(idx, T_)
        first_stop = torch.where(ids == cfg.stop_text_token, idx, big).min(dim=1, keepdim=True).values
        last_start = torch.where(ids == cfg.start_speech_token, idx, torch.full_like(idx, -1)).max(
            dim=1, keepdim=True).values
        emotion = ids == EXAGGERATION_TOKEN
        text = (idx <= first_stop) & (last_start > first_stop) & ~emotion
        zero = torch.zeros_like(ids)
        t_ids = torch.where(text, ids, zero).clamp(0, cfg.text_vocab_size - 1)
        t_pos = torch.where(text, pos, zero).clamp(0, cfg.text_pos_len - 1)
        s_ids = torch.where(text | emotion, zero, ids).clamp(0, cfg.speech_vocab_size - 1)
        s_pos = torch.where(text | emotion, zero, pos).clamp(0, cfg.speech_pos_len - 1)
        text_e = self.text_emb(t_ids) + self.text_pos_emb(t_pos)
        speech_e = self.speech_emb(s_ids) + self.speech_pos_emb(s_pos)
        out = torch.where(text[..., None], text_e, speech_e)
        emo = self.emotion_adv_fc(exaggeration.float().reshape(B, 1, 1))  # [B, 1, D]
        return torch.where(emotion[..., None], emo.expand_as(out), out)


def _language_model_class():
    from .t3_onnx import _T3Graph

    class LanguageModelGraph(_T3Graph):
        """T3's backbone and speech head with HF-style caches: ``inputs_embeds [B, T, D]``,
        ``attention_mask [B, S + T]``, past keys/values ``[B, H, S, Dh]`` per layer -> (logits
        ``[B, T, V]``, presents). Positions ``S + [0, T)``; causal within the new block."""

        def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, *past_key_values: Tensor):
            if self.kind != "llama":
                raise ExportError("the onnx-community language model graph is for the Llama variants")
            x = inputs_embeds
            B, T_, _ = x.shape
            S = past_key_values[0].shape[2]
            q_pos = torch.arange(T_) + S  # [T]
            positions = q_pos[None].expand(B, T_)
            k_pos = torch.arange(T_ + S)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
            cos, sin = self.tfmr._rope(positions, x.dtype)
            presents = []
            for i, layer in enumerate(self.tfmr.layers):
                past = (past_key_values[2 * i], past_key_values[2 * i + 1])
                x, k, v, _ = self._llama_layer(layer, x, cos, sin, past, mask, i)
                presents += [k, v]
            logits = self._linear(self.head, self.tfmr.norm(x))
            return (logits, *presents)

    return LanguageModelGraph


class ConditionalDecoderGraph(nn.Module):
    """``speech_tokens [B, P + G]``, ``speaker_embeddings [B, 192]``, ``speaker_features [B, F, 80]``
    -> ``waveform [B, 480 (2 (P + G) - F)]``: ``S3Gen.flow_mel`` (fixed noise) + HiFT (fixed source
    draws) + trim-fade."""

    def __init__(self, s3gen, n_steps: Optional[int] = None):
        super().__init__()
        from ..models.s3gen.hift import S3GEN_SR as SR
        from .s3gen_onnx import CfmLoopGraph, FlowEncoderGraph, HiftGraph

        flow, hift = s3gen.flow, s3gen.mel2wav
        self.meanflow = bool(s3gen.meanflow)
        self.n_steps = int(n_steps or s3gen.default_steps)
        self.vocab = int(flow.config.vocab_size)
        self.ratio = int(flow.config.token_mel_ratio)
        self.flow_encoder = FlowEncoderGraph(flow)
        self.cfm = CfmLoopGraph(flow.decoder, self.n_steps, self.meanflow)
        self.hift = HiftGraph(hift)
        self.spk_affine = flow.spk_embed_affine_layer
        noise, phase, source = fixed_draws(hift.config.nb_harmonics + 1, hift.config.samples_per_frame)
        self.register_buffer("noise", noise, persistent=False)  # [1, 80, 2 * MAX_SPEECH_TOKENS]
        self.register_buffer("source_phase", phase, persistent=False)  # [1, H, 1]
        self.register_buffer("source_noise", source, persistent=False)  # [1, H, C, spf]
        n_trim = SR // 50
        fade = torch.zeros(2 * n_trim)
        fade[n_trim:] = (torch.cos(torch.linspace(torch.pi, 0, n_trim)) + 1) / 2
        self.register_buffer("fade", fade, persistent=False)

    def forward(self, speech_tokens: Tensor, speaker_embeddings: Tensor, speaker_features: Tensor) -> Tensor:
        B, T_ = speech_tokens.shape
        tokens = speech_tokens.long().clamp(0, self.vocab - 1)
        lens = torch.ones_like(tokens[:, 0]) * T_
        mu, mask = self.flow_encoder(tokens, lens)  # [B, 80, L], [B, 1, L]
        L = mu.shape[2]
        spks = self.spk_affine(F.normalize(speaker_embeddings.float(), dim=1))
        feat = speaker_features.float().transpose(1, 2)  # [B, 80, F]
        n_prompt = feat.shape[2]
        cond = torch.cat([feat, torch.zeros_like(mu)], dim=2)[:, :, :L]
        noise = self.noise[:, :, :L].expand(B, -1, -1)
        mel = self.cfm(noise, mask, mu, spks, cond)  # [B, 80, L]
        mel = mel[:, :, n_prompt:]
        M = mel.shape[2]
        mel_lens = torch.ones_like(lens) * M
        C = self.source_noise.shape[2]
        src = self.source_noise.index_select(2, torch.arange(M) % C).expand(B, -1, -1, -1)
        wav = self.hift(mel, mel_lens, self.source_phase.expand(B, -1, -1), src)  # [B, 480 M]
        fade = torch.cat([self.fade, torch.ones_like(wav[0])])[: wav.shape[1]]
        return wav * fade


def fixed_draws(harmonics: int = 9, samples_per_frame: int = 480, seed: int = NOISE_SEED):
    """The conditional decoder's baked-in random draws: CFM noise ``[1, 80, 5000]`` ~ N(0, 1);
    HiFT's harmonic phases ``[1, H, 1]`` ~ U(-pi, pi) (the fundamental's 0) and source noise
    ``[1, H, 100, spf]`` ~ N(0, 1), repeated every 100 mel frames."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 80, 2 * MAX_SPEECH_TOKENS, generator=g)
    phase = -math.pi + torch.rand(1, harmonics, 1, generator=g) * (2 * math.pi)
    phase[:, 0] = 0
    source = torch.randn(1, harmonics, SOURCE_NOISE_FRAMES, samples_per_frame, generator=g)
    return noise, phase, source


# ------------------------------------------------------------------------------ torch references


_RESAMPLERS: dict = {}


def _SOXR_LIKE() -> "SoxrLikeResample":
    if "t3" not in _RESAMPLERS:
        _RESAMPLERS["t3"] = SoxrLikeResample()
    return _RESAMPLERS["t3"]


@torch.inference_mode()
def reference_speech_encoder(tts, audio: Tensor, *, soxr: bool = False):
    """What ``speech_encoder`` computes, with ``chatterbox_rt``'s own modules: T3's 16 kHz by
    ``SoxrLikeResample`` as in the graph, or (``soxr=True``) by soxr, exactly as
    ``TTS.prepare_conditionals``. -> ((audio_features, audio_tokens, speaker_embeddings,
    speaker_features), the ``T3Cond`` (exaggeration 0.5))."""
    from ..audio import resample as soxr_resample
    from ..models.t3 import T3Cond

    wav24 = audio.reshape(-1).float().cpu()
    if soxr:
        wav16 = torch.from_numpy(soxr_resample(wav24.numpy(), S3GEN_SR, S3_SR))
    else:
        wav16 = _SOXR_LIKE()(wav24[None])[0]
    gen = tts.s3gen.embed_ref(wav24[: S3GEN_PROMPT_SECONDS * S3GEN_SR])
    plen = tts.t3.config.speech_cond_prompt_len
    prompt, _ = tts.s3gen.tokenizer([wav16[: _t3_prompt_seconds(tts.t3.config) * S3_SR]], max_len=plen)
    spk = torch.from_numpy(tts.ve.embeds_from_wavs([wav16.numpy()], sample_rate=S3_SR)).mean(dim=0, keepdim=True)
    cond = T3Cond(speaker_emb=spk, cond_prompt_speech_tokens=prompt, emotion_adv=0.5)
    cond_emb = tts.t3.embed_cond(cond)
    if tts.t3.config.emotion_adv:
        cond_emb = cond_emb[:, :-1]  # without the emotion slot (embed_tokens adds it)
    return (cond_emb, gen["prompt_token"].long(), gen["embedding"], gen["prompt_feat"]), cond


@torch.inference_mode()
def reference_decoder(s3gen, hift_graph, speech_tokens: Tensor, speaker_embeddings: Tensor,
                      speaker_features: Tensor, n_steps: Optional[int] = None) -> Tensor:
    """``conditional_decoder`` in torch: ``S3Gen.flow_mel`` with the fixed noise, then HiFT's
    filter with the fixed source draws (``s3gen_onnx.HiftGraph`` in torch) and ``trim_fade``."""
    from ..models.s3gen.hift import trim_fade

    hc = s3gen.mel2wav.config
    noise, phase, source = fixed_draws(hc.nb_harmonics + 1, hc.samples_per_frame)
    tokens = speech_tokens.long()
    ref = dict(prompt_token=tokens[:, :1], prompt_token_len=torch.tensor([1]), prompt_feat=speaker_features,
               prompt_feat_len=None, embedding=speaker_embeddings)
    L = 2 * tokens.shape[1]
    mel, _ = s3gen.flow_mel(tokens[:, 1:], None, ref, n_steps=n_steps, noise=noise[:, :, :L])
    M = mel.shape[2]
    src = source.index_select(2, torch.arange(M) % source.shape[2])
    wav = hift_graph(mel, torch.tensor([M]), phase, src)
    return trim_fade(wav)


# ------------------------------------------------------------------------------ checks


def _check(path: Path, names: Sequence[str], cases: Sequence[tuple], *, tol: float, what: str,
           threads: Optional[int] = None) -> dict:
    """Run ``path`` on each (feeds, expected outputs) case; -> per-output max relative error.
    Integer outputs must be equal."""
    sess = open_session(path, threads=threads)
    worst = {n: 0.0 for n in names}
    for feeds, want in cases:
        got = run(sess, feeds)
        shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
        for n, g, w in zip(names, got, want):
            w = w.detach().cpu().numpy() if torch.is_tensor(w) else np.asarray(w)
            if np.issubdtype(w.dtype, np.integer):
                if g.shape != w.shape or not np.array_equal(g, w):
                    bad = int((g != w).sum()) if g.shape == w.shape else -1
                    raise ExportError(f"{what}: output {n} differs from torch ({bad} of {w.size} ids; shapes "
                                      f"{list(g.shape)} vs {list(w.shape)}) at {shapes}")
                continue
            e = rel_error(g, w.astype(np.float32))
            if not np.isfinite(e) or e > tol:
                raise ExportError(f"{what}: output {n} differs from torch by {e:.3g} (relative, tolerance {tol:g}) "
                                  f"at {shapes}")
            worst[n] = max(worst[n], e)
    return {"max_rel_error": max(worst.values()) if worst else 0.0, "per_output": worst, "cases": len(cases),
            "tolerance": tol}


def check_signal(seconds: float, sr: int = S3GEN_SR, seed: int = 0) -> np.ndarray:
    from .frontend_onnx import check_signal as _sig

    return _sig(int(seconds * sr) | 1, sr, seed=seed)


# ------------------------------------------------------------------------------ bundle files


def _save(model, out_dir: Path, name: str) -> list:
    """``onnx/<name>.onnx`` with every weight in ``onnx/<name>.onnx_data`` (as the clients fetch
    both); -> the relative paths written."""
    import onnx

    d = out_dir / ONNX_DIR
    d.mkdir(parents=True, exist_ok=True)
    path, data = d / f"{name}.onnx", f"{name}{DATA_SUFFIX}"
    tmp = d / f"{name}.onnx.tmp"
    with contextlib.suppress(FileNotFoundError):
        (d / data).unlink()
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024, convert_attribute=True)
    os.replace(tmp, path)
    return [f"{ONNX_DIR}/{name}.onnx", f"{ONNX_DIR}/{data}"]


def tokenizer_json(tts) -> str:
    """The bundle's ``tokenizer.json``: the model's English tokenizer with spaces turned into
    ``[SPACE]`` by its normalizer and a template ``[6563] [START] $A [STOP] [6561] [6561]``, so that a
    client's ``tokenizer.encode(text).ids`` is what ``embed_tokens`` expects (what the runtime's
    front end gives for the same, already normalised, text, framed by the emotion and start slots)."""
    from tokenizers import Tokenizer

    from ..text import EOT, SOT, SPACE, EnglishTokenizer

    inner = getattr(tts.frontend, "tokenizer", None)
    if not isinstance(inner, EnglishTokenizer):
        raise ExportError(f"the onnx-community layout needs the English grapheme tokenizer, not "
                          f"{type(inner).__name__}")
    data = json.loads(inner.tokenizer.to_str())
    found = False
    for t in data.get("added_tokens") or []:
        if t["content"] == SPACE:
            t["normalized"] = True  # matched after the normalizer wrote it
            found = True
    if not found:
        raise ExportError(f"the tokenizer has no {SPACE} token")
    data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    cfg = tts.t3.config
    sot, eot = cfg.start_text_token, cfg.stop_text_token
    sos = cfg.start_speech_token
    specials = {"[EXAGGERATION]": EXAGGERATION_TOKEN, SOT: sot, EOT: eot, "[START_SPEECH]": sos}
    seq = [{"SpecialToken": {"id": "[EXAGGERATION]", "type_id": 0}}, {"SpecialToken": {"id": SOT, "type_id": 0}},
           {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOT, "type_id": 0}},
           {"SpecialToken": {"id": "[START_SPEECH]", "type_id": 0}},
           {"SpecialToken": {"id": "[START_SPEECH]", "type_id": 0}}]
    data["post_processor"] = {
        "type": "TemplateProcessing", "single": seq, "pair": seq[:-2] + [
            {"Sequence": {"id": "B", "type_id": 1}}] + seq[-2:],
        "special_tokens": {k: {"id": k, "ids": [v], "tokens": [k]} for k, v in specials.items()}}
    text = json.dumps(data, ensure_ascii=False)
    tok = Tokenizer.from_str(text)  # it must load, and frame the ids as embed_tokens expects
    probe = "Hello there, how are you?"
    want = [EXAGGERATION_TOKEN, sot] + inner.encode(probe) + [eot, sos, sos]
    got = tok.encode(probe).ids
    if got != want:
        raise ExportError(f"the bundle tokenizer gives {got[:12]}... for {probe!r}, expected {want[:12]}...")
    return text


def config_files(tts, specs: Mapping[str, GraphSpec]) -> dict:
    """``config.json`` and friends for transformers.js (``ChatterboxModel``: ``text_config`` holds the
    Llama shapes its KV cache is built from) and the tokenizer's configs."""
    cfg = tts.t3.config
    b = cfg.backbone
    text_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": b.hidden_size,
        "intermediate_size": b.intermediate_size, "num_hidden_layers": b.num_layers,
        "num_attention_heads": b.num_heads, "num_key_value_heads": b.num_heads, "head_dim": b.head_dim,
        "vocab_size": cfg.speech_vocab_size, "max_position_embeddings": 131072, "rms_norm_eps": b.norm_eps,
        "rope_theta": b.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": cfg.start_speech_token, "eos_token_id": cfg.stop_speech_token,
        "rope_scaling": None if b.rope_scaling is None else {
            "rope_type": "llama3", "factor": b.rope_scaling.factor, "low_freq_factor": b.rope_scaling.low_freq_factor,
            "high_freq_factor": b.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": b.rope_scaling.original_max_position_embeddings}}
    config = {
        "architectures": ["ChatterboxModel"], "model_type": "chatterbox", "text_config": text_config,
        "bos_token_id": cfg.start_speech_token, "eos_token_id": cfg.stop_speech_token,
        "start_speech_token": cfg.start_speech_token, "stop_speech_token": cfg.stop_speech_token,
        "exaggeration_token": EXAGGERATION_TOKEN, "start_text_token": cfg.start_text_token,
        "stop_text_token": cfg.stop_text_token, "sampling_rate": S3GEN_SR,
        "transformers.js_config": {"use_external_data_format": {f"{n}.onnx": 1 for n in GRAPHS}},
        "chatterbox_rt": {"variant": tts.variant, "layout": LAYOUT},
    }
    s = cfg.sampling
    generation = {"bos_token_id": cfg.start_speech_token, "eos_token_id": cfg.stop_speech_token,
                  "decoder_start_token_id": cfg.start_speech_token, "max_new_tokens": s.max_new_tokens,
                  "repetition_penalty": s.repetition_penalty, "do_sample": False}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.text_pos_len,
                        "clean_up_tokenization_spaces": False, "unk_token": "[UNK]"}
    return {"config.json": config, "generation_config.json": generation,
            "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": {"unk_token": "[UNK]"},
            "preprocessor_config.json": {"feature_extractor_type": "ChatterboxFeatureExtractor",
                                         "sampling_rate": S3GEN_SR, "processor_class": "ChatterboxProcessor"},
            "processor_config.json": {"processor_class": "ChatterboxProcessor"}}


def _write_voice(src, path: Path) -> None:
    import soundfile as sf

    from ..audio import load_audio

    wav, _ = load_audio(src, None if isinstance(src, (str, Path)) else S3GEN_SR, target_sr=S3GEN_SR)
    sf.write(str(path), np.asarray(wav, dtype=np.float32), S3GEN_SR, subtype="PCM_16")


# ------------------------------------------------------------------------------ export


def _model_hashes(tts) -> dict:
    from .exporter import model_hashes

    return model_hashes(tts)


def _check_out_dir(out: Path, model_hash: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"cannot export to {out}: it is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()) or force:
        return
    if not (out / MANIFEST).is_file():
        raise BundleError(f"{out} is not empty and holds no bundle: refusing to write into it (give an empty or new "
                          f"directory, or --force / force=True to write anyway)")
    old = Manifest.read(out)
    if old.model_hash != model_hash or old.layout != LAYOUT:
        raise BundleError(f"{out} holds another bundle ({old.layout} layout, weights {old.model_hash}; this one is "
                          f"{LAYOUT}, {model_hash}): refusing to overwrite it without --force / force=True")


def export_onnx_community(tts, out_dir: Union[str, Path], *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                          force: bool = False, default_voice=None, n_steps: Optional[int] = None,
                          check_seconds: Sequence[float] = (2.3, 4.1), threads: Optional[int] = None) -> Manifest:
    """Write the onnx-community four-graph bundle of ``tts`` (a torch ``TTS`` of the English model,
    or of Turbo/Nano: the ResembleAI/chatterbox-turbo-ONNX layout, ``onnx_community_turbo``;
    official or fine-tuned weights) to ``out_dir`` and check each graph against torch.

    ``precision``: "fp32" (the graphs); "int4"/"int8" also write ``language_model_q4.onnx`` /
    ``language_model_quantized.onnx`` (weight-only MatMulNBits). ``default_voice``: a clip (path or
    24 kHz array) written as ``default_voice.wav``, the voice ``ChatterboxOnnx.synthesize`` uses
    when given none (a checkpoint's built-in voice has no audio to write). ``n_steps``: CFM steps
    of the decoder (default the decoder's: 10, meanflow 2). ``check_seconds``: clip lengths of the speech encoder's check.
    Returns the written ``Manifest`` (``layout="onnx-community"``)."""
    from .s3gen_onnx import native_kernels

    check_opset(opset)
    if precision not in PRECISIONS:
        raise ValueError(f"the onnx-community layout is exported as fp32 (plus a quantised language model with "
                         f"int8/int4); got precision {precision!r}")
    if getattr(tts, "backend", "torch") != "torch":
        raise ValueError(f"export needs the torch backend's model; this TTS runs on {tts.backend}")
    from . import onnx_community_turbo as turbo

    if tts.variant not in ("chatterbox",) + turbo.VARIANTS:
        raise NotImplementedError(
            f"--layout onnx-community is implemented for the English model (onnx-community/chatterbox-ONNX) and "
            f"Turbo/Nano (ResembleAI/chatterbox-turbo-ONNX); {tts.variant} is not: the multilingual bundle "
            f"(onnx-community/chatterbox-multilingual-ONNX) has its own tokenizer and language-id contract, not "
            f"implemented here")
    gpt = tts.variant in turbo.VARIANTS
    if tts.t3.dtype != torch.float32 or tts.s3gen.dtype != torch.float32:
        raise ExportError("export from fp32 weights (load with dtype=torch.float32)")
    hashes = _model_hashes(tts)
    model_hash = combined_hash(hashes)
    out = Path(out_dir)
    _check_out_dir(out, model_hash, force)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    manifest = new_manifest(variant=tts.variant, layout=LAYOUT, precision=precision, opset=opset,
                            model_hash=model_hash, source=getattr(tts, "source", ""), behaviour=tts.behaviour)
    manifest.data["hashes"] = hashes
    specs = (turbo.graph_specs if gpt else graph_specs)(tts.t3.config)
    devices = {m: next(m.parameters()).device for m in (tts.t3, tts.s3gen, tts.ve)}
    for m in devices:
        m.cpu()
    t_all = time.perf_counter()
    try:
        with torch.inference_mode(False), torch.no_grad(), native_kernels():
            checks, timings = (turbo.export_graphs if gpt else _export_graphs)(
                tts, staging, specs, opset=opset, n_steps=n_steps, check_seconds=check_seconds, threads=threads)
            if precision in QUANTIZED_LM:
                checks.update(_quantized_lm(staging, specs["language_model"], precision, threads))
                checks.update(_alias_graphs(staging, specs, precision))
        # tokenizer, configs, voice
        (staging / "tokenizer.json").write_text((turbo.tokenizer_json if gpt else tokenizer_json)(tts),
                                                encoding="utf-8")
        for name, obj in (turbo.config_files if gpt else config_files)(tts, specs).items():
            (staging / name).write_text(json.dumps(obj, indent=2) + "\n")
        if default_voice is not None:
            _write_voice(default_voice, staging / DEFAULT_VOICE)
        record_files(manifest, out, move_into_place(staging, out))
        for name, (spec, check, extra) in checks.items():
            entry = spec.to_json()
            entry["file"] = f"{ONNX_DIR}/{extra.get('file', spec.file)}"
            entry.update(precision=extra.get("precision", "fp32"), opset=opset, check=check)
            entry["bytes"] = sum(rec["bytes"] for n, rec in manifest.data["files"].items()
                                 if n.startswith(entry["file"]))
            manifest.data["graphs"][name] = entry
        manifest.data["components"] = {
            LAYOUT: {"graphs": list(checks), "export_s": {k: round(v, 1) for k, v in timings.items()},
                     "config": {"n_steps": int(n_steps or tts.s3gen.default_steps), "meanflow": bool(tts.s3gen.meanflow),
                                "noise_seed": NOISE_SEED,
                                "source_noise_frames": SOURCE_NOISE_FRAMES,
                                "default_voice": DEFAULT_VOICE if default_voice is not None else None,
                                "tokenizer": "tokenizer.json"}}}
        manifest.data["text_frontend"] = "tokenizer.json"
        manifest.data["export_s"] = round(time.perf_counter() - t_all, 1)
        manifest.write(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for m, d in devices.items():
            m.to(d)
    return manifest


def _export_graphs(tts, staging: Path, specs: Mapping[str, GraphSpec], *, opset: int, n_steps: Optional[int],
                   check_seconds: Sequence[float], threads: Optional[int]) -> tuple[dict, dict]:
    from .s3gen_onnx import dedupe_initializers

    t3, s3gen = tts.t3, tts.s3gen
    cfg = t3.config
    checks, timings = {}, {}
    g = torch.Generator().manual_seed(0)

    def finish(name, module, example, cases, extra_check=None):
        t0 = time.perf_counter()
        spec = specs[name]
        model = export_graph(module.eval(), example, spec, staging, opset=opset)
        dedupe_initializers(model)  # the unrolled CFM steps' folded constants, shared tables
        _save(model, staging, name)
        del model
        timings[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = _check(staging / ONNX_DIR / spec.file, spec.output_names, cases, tol=TOL[name], what=spec.file,
                     threads=threads)
        if extra_check is not None:
            res.update(extra_check())
        timings[name + "_check"] = time.perf_counter() - t0
        log.info("%s: max relative error %.3g", spec.file, res["max_rel_error"])
        checks[name] = (spec, res, {})

    # -- speech encoder: our front ends on clips of a few lengths
    se = SpeechEncoderGraph(tts)
    clips = [torch.from_numpy(check_signal(s, seed=i))[None] for i, s in enumerate(check_seconds)]
    se_cases = []
    for clip in clips:
        want, _ = reference_speech_encoder(tts, clip)
        se_cases.append(({"audio_values": clip}, want))

    def vs_runtime():
        """The graph against ``TTS.prepare_conditionals`` itself (soxr for T3's 16 kHz)."""
        from ..audio import resample as soxr_resample

        sess = open_session(staging / ONNX_DIR / "speech_encoder.onnx", threads=threads)
        worst, tok_diff, n_tok, snr, cos = 0.0, 0, 0, float("inf"), 1.0
        for clip in clips:
            (cond_ref, *_), c = reference_speech_encoder(tts, clip, soxr=True)
            _, c_graph = reference_speech_encoder(tts, clip)
            got = run(sess, {"audio_values": clip})
            worst = max(worst, rel_error(got[0], cond_ref.numpy()))
            a, b = c.cond_prompt_speech_tokens, c_graph.cond_prompt_speech_tokens
            n = min(a.shape[1], b.shape[1])
            tok_diff += int((a[:, :n] != b[:, :n]).sum()) + abs(a.shape[1] - b.shape[1])
            n_tok += max(a.shape[1], b.shape[1])
            cos = min(cos, float(F.cosine_similarity(c.speaker_emb, c_graph.speaker_emb).min()))
            want16 = soxr_resample(clip[0].numpy(), S3GEN_SR, S3_SR)
            with torch.inference_mode():
                got16 = se.resample_t3(clip)[0].numpy()
            snr = min(snr, float(10 * np.log10((want16 ** 2).sum() / max(((got16 - want16) ** 2).sum(), 1e-30))))
        return {"vs_prepare_conditionals": {
            "audio_features_max_rel_error": worst, "t3_prompt_tokens_differing": tok_diff, "t3_prompt_tokens": n_tok,
            "speaker_emb_min_cosine": cos, "resample_16k_snr_db": snr,
            "note": "T3's 16 kHz: soxr in the runtime, SoxrLikeResample in the graph"}}

    finish("speech_encoder", se, (clips[0],), se_cases, vs_runtime)

    # -- embed_tokens: against T3.prompt_embeds / T3.embed_speech
    et = EmbedTokensGraph(t3)
    et_cases = []
    for n_text, exag in ((7, 0.5), (23, 1.3)):
        text = torch.randint(1, min(cfg.text_vocab_size, 600), (n_text,), generator=g)
        text[0], text[-1] = cfg.start_text_token, cfg.stop_text_token
        text[1:-1] = torch.where(text[1:-1] == cfg.start_text_token, 1, text[1:-1])
        ids = torch.cat([torch.tensor([EXAGGERATION_TOKEN]), text,
                         torch.tensor([cfg.start_speech_token, cfg.start_speech_token])])[None]
        pos = torch.where(ids >= cfg.start_speech_token, 0, torch.arange(ids.shape[1])[None] - 1)
        want = _reference_prompt_tail(t3, text, exag)
        et_cases.append(({"input_ids": ids, "position_ids": pos, "exaggeration": torch.tensor([exag])}, [want]))
    for tok, p in ((0, 1), (4321, 17), (cfg.stop_speech_token, 250)):  # one generated token, speech token 0 too
        with torch.inference_mode():
            want = t3.embed_speech(torch.tensor([tok]), torch.tensor([p]))
        et_cases.append(({"input_ids": torch.tensor([[tok]]), "position_ids": torch.tensor([[p]]),
                          "exaggeration": torch.tensor([0.5])}, [want]))
    ex = et_cases[0][0]
    finish("embed_tokens", et, (ex["input_ids"], ex["position_ids"], ex["exaggeration"]), et_cases)

    # -- language model: against the torch backbone with its static KV cache
    lm = _language_model_class()(t3)
    lm_cases, ex_args = _lm_cases(t3, lm, g)
    finish("language_model", lm, ex_args, lm_cases)

    # -- conditional decoder: against S3Gen.flow_mel + HiFT (fixed draws) + trim_fade
    cd = ConditionalDecoderGraph(s3gen, n_steps)
    cd_cases = []
    for n_tok, n_feat in ((12, 9), (21, 20)):
        tokens = torch.randint(0, 6561, (1, n_tok), generator=g)
        xvec = torch.randn(1, 192, generator=g)
        feat = torch.randn(1, n_feat, 80, generator=g) * 1.5 - 6
        want = reference_decoder(s3gen, cd.hift, tokens, xvec, feat, n_steps)
        cd_cases.append(({"speech_tokens": tokens, "speaker_embeddings": xvec, "speaker_features": feat}, [want]))
    ex = cd_cases[0][0]
    finish("conditional_decoder", cd, (ex["speech_tokens"], ex["speaker_embeddings"], ex["speaker_features"]),
           cd_cases)
    return checks, timings


@torch.inference_mode()
def _reference_prompt_tail(t3, text: Tensor, exaggeration: float) -> Tensor:
    """``T3.prompt_embeds`` (no CFG) after the speaker and prompt slots: the emotion, the text
    and the two start-of-speech embeddings ``[1, 1 + len(text) + 2, D]``."""
    from ..models.t3 import T3Cond

    cfg = t3.config
    cond = T3Cond(speaker_emb=torch.zeros(1, cfg.speaker_embed_size),
                  cond_prompt_speech_tokens=torch.zeros(1, 4, dtype=torch.long), emotion_adv=exaggeration)
    embeds, n_cond = t3.prompt_embeds(cond, text, cfg=False)
    return embeds[:, n_cond - 1:]


def _lm_cases(t3, lm, g) -> tuple[list, tuple]:
    """(feeds, want) cases for the language model: a prefill from an empty past, then two
    one-token steps and a three-token chunk over it, the torch side T3's own backbone (static
    cache) and speech head."""
    from ..models.t3.backbone import KVCache

    b = t3.config.backbone
    L, H, Dh, D = b.num_layers, b.num_heads, b.head_dim, b.hidden_size
    P = 9
    x = torch.randn(1, P, D, generator=g) * 0.5
    cases = []
    with torch.inference_mode():
        cache = KVCache(L, H, Dh, 1, P + 8, t3.dtype, t3.device)
        want = t3.speech_head(t3.tfmr(x, cache))  # [1, P, V]
        kv = [cache.kv[i, j, :, :, :P].clone() for i in range(L) for j in range(2)]
    empty = [torch.zeros(1, H, 0, Dh) for _ in range(2 * L)]
    feeds = {"inputs_embeds": x, "attention_mask": torch.ones(1, P, dtype=torch.long)}
    feeds.update({f"past_key_values.{i}.{'key' if j == 0 else 'value'}": empty[2 * i + j]
                  for i in range(L) for j in range(2)})
    cases.append((feeds, [want] + kv))
    n = P
    for _ in range(2):
        e = torch.randn(1, 1, D, generator=g) * 0.5
        with torch.inference_mode():
            want = t3.speech_head(t3.tfmr(e, cache, pos=torch.tensor([n]), kv_len=n + 1))  # [1, 1, V]
            new_kv = [cache.kv[i, j, :, :, :n + 1].clone() for i in range(L) for j in range(2)]
        feeds = {"inputs_embeds": e, "attention_mask": torch.ones(1, n + 1, dtype=torch.long)}
        feeds.update({f"past_key_values.{i}.{'key' if j == 0 else 'value'}": kv[2 * i + j]
                      for i in range(L) for j in range(2)})
        cases.append((feeds, [want.reshape(1, 1, -1)] + new_kv))
        kv, n = new_kv, n + 1
    # a chunk of three new positions over the cache (the wrapper, itself checked step by step above)
    e = torch.randn(1, 3, D, generator=g) * 0.5
    feeds = {"inputs_embeds": e, "attention_mask": torch.ones(1, n + 3, dtype=torch.long)}
    feeds.update({f"past_key_values.{i}.{'key' if j == 0 else 'value'}": kv[2 * i + j]
                  for i in range(L) for j in range(2)})
    with torch.inference_mode():
        want = lm(e, feeds["attention_mask"], *kv)
    cases.append((feeds, list(want)))
    f1 = cases[1][0]
    ex_args = (f1["inputs_embeds"], f1["attention_mask"], *[f1[k] for k in list(f1)[2:]])
    return cases, ex_args


def _quantized_lm(staging: Path, spec: GraphSpec, precision: str, threads: Optional[int]) -> dict:
    """``language_model_q4.onnx`` / ``language_model_quantized.onnx``: the fp32 language model with
    weight-only MatMulNBits, its error against the fp32 graph recorded."""
    import onnx

    from .quantize import _quantize_model

    name, bits = QUANTIZED_LM[precision]
    src = staging / ONNX_DIR / "language_model.onnx"
    model = onnx.load(str(src), load_external_data=True)
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = qlog.level
    qlog.setLevel(logging.WARNING)  # it logs every MatMul it visits at INFO
    try:
        q = _quantize_model(model, bits)
    finally:
        qlog.setLevel(level)
    _save(q, staging, name)
    del model, q
    g = torch.Generator().manual_seed(1)
    L = sum(1 for t in spec.inputs if t.name.endswith(".key"))
    past0 = next(t for t in spec.inputs if t.name.endswith(".key"))
    H, Dh, D = past0.axes[1], past0.axes[3], spec.inputs[0].axes[2]
    feeds = {"inputs_embeds": torch.randn(1, 7, D, generator=g) * 0.5,
             "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    if any(t.name == "position_ids" for t in spec.inputs):  # Turbo/Nano
        feeds["position_ids"] = torch.arange(7)[None]
    feeds.update({f"past_key_values.{i}.{kv}": torch.zeros(1, H, 0, Dh) for i in range(L) for kv in ("key", "value")})
    ref = run(open_session(src, threads=threads), feeds)[0]
    got = run(open_session(staging / ONNX_DIR / f"{name}.onnx", threads=threads), feeds)[0]
    qspec = GraphSpec(name, spec.component, spec.inputs, spec.outputs, spec.dims, spec.doc + f" ({bits}-bit weights)")
    res = {"vs_fp32_logits_max_rel_error": rel_error(got, ref), "bits": bits, "cases": 1}
    return {name: (qspec, res, {"precision": precision, "file": f"{name}.onnx"})}


def _alias_graphs(staging: Path, specs: Mapping[str, GraphSpec], precision: str) -> dict:
    """The other graphs under the quantised language model's suffix (``speech_encoder_q4.onnx``,
    ``conditional_decoder_quantized.onnx``...): clients that take a dtype (``q4``, ``q8``) load
    every graph as ``<name><suffix>.onnx`` with ``<name><suffix>.onnx_data`` beside it. Only the
    language model is quantised; these are the fp32 graphs, their data hard-linked (a copy where
    the file system has no links), and the manifest says so."""
    import onnx

    suffix = QUANTIZED_LM[precision][0][len("language_model"):]
    d = staging / ONNX_DIR
    out = {}
    for name, spec in specs.items():
        if name == "language_model":
            continue
        alias = f"{name}{suffix}"
        model = onnx.load(str(d / f"{name}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = f"{alias}{DATA_SUFFIX}"
        src, dst = d / f"{name}{DATA_SUFFIX}", d / f"{alias}{DATA_SUFFIX}"
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        onnx.save_model(model, str(d / f"{alias}.onnx"))
        aspec = GraphSpec(alias, spec.component, spec.inputs, spec.outputs, spec.dims,
                          spec.doc + f" (the fp32 graph under the {suffix} file set's name)")
        out[alias] = (aspec, {"same_as": name, "skipped": f"the fp32 {name}.onnx (checked there) under the name "
                                                         f"a '{suffix.lstrip('_')}' client loads"},
                      {"precision": "fp32", "file": f"{alias}.onnx"})
    return out


__all__ = ["export_onnx_community", "graph_specs", "tokenizer_json", "config_files", "SpeechEncoderGraph",
           "EmbedTokensGraph", "ConditionalDecoderGraph", "VoiceEncoderPipeline", "SincResample", "fixed_draws",
           "reference_speech_encoder", "reference_decoder", "LAYOUT", "GRAPHS", "EXAGGERATION_TOKEN"]
