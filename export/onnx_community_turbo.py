"""``--layout onnx-community`` for Turbo and Nano: the bundle of ResembleAI/chatterbox-turbo-ONNX.

The published Turbo bundle's contract, as its clients read it (sources in export/README.md,
"onnx-community layout: Turbo and Nano")::

    onnx/speech_encoder.onnx (+ .onnx_data)       audio_values [1, N] f32 (24 kHz)
        -> cond_emb [1, 1 + P, D] f32            (T3 conditioning: speaker, prompt speech tokens)
           prompt_token [1, P'] i64              (S3Gen prompt tokens)
           speaker_embeddings [1, 192] f32       (CAM++ x-vector)
           speaker_features [1, F, 80] f32       (S3Gen prompt mel)
    onnx/embed_tokens.onnx (+ .onnx_data)         input_ids [B, T] i64 -> inputs_embeds [B, T, D] f32
    onnx/language_model.onnx (+ .onnx_data)       inputs_embeds [B, T, D], attention_mask [B, S + T] i64,
                                                  position_ids [B, T] i64, past_key_values.{i}.key/value
                                                  [B, H, S, Dh] f32
        -> logits [B, T, 6563] f32, present.{i}.key/value [B, H, S + T, Dh] f32
    onnx/conditional_decoder.onnx (+ .onnx_data)  speech_tokens [B, P' + G + 3] i64, speaker_embeddings,
                                                  speaker_features -> waveform [B, 480 (2 (P' + G + 3) - F)]
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, config.json, generation_config.json,
    preprocessor_config.json, manifest.json

What the graphs compute (the clients do the rest: tokenizer, ``[cond_emb; embed_tokens(ids)]``,
greedy decoding with a repetition penalty over [start, generated...], positions ``0..L-1`` then
``L, L+1, ...``, prompt tokens + new tokens + three silence tokens 4299 into the decoder):

* The tokenizer (``tokenizer.json``) is the checkpoint's GPT-2 BPE with a template appending
  ``<|endoftext|>`` (50256) twice. ``embed_tokens`` sends every id but the last two through T3's
  text table and the last two through its speech table, 50256 read as start-of-speech (6561):
  the published graph's ``Slice(-2)`` / ``Where(50256 -> 6561)`` / ``Gather`` routing, so a single
  generated id is a speech embedding. The prompt is therefore ``[cond; text; start; start]``:
  two start-of-speech positions where ``T3.prompt_embeds`` (and the reference's
  ``inference_turbo``) has one; kept, because the clients build their prompts for it (some append
  the two 50256 themselves, one sends a step as ``[pad, id, id]``).
* ``language_model`` is T3's GPT-2 backbone (``wpe`` of ``position_ids`` inside) and speech head.
* ``speech_encoder`` is ``TTS.prepare_conditionals(..., norm_loudness=False)``: T3's prompt tokens
  from the first 15 s (375 tokens) through the speech table (no perceiver, no positions), the
  voice encoder's speaker embedding, S3Gen's reference of the first 10 s. The reference's -27 LUFS
  loudness normalisation of the clip is not in the graph (see export/README.md).
* ``conditional_decoder`` is S3Gen with the meanflow CFM (2 steps, no CFG) from a fixed noise
  draw, the prompt frames dropped, HiFT with fixed source draws, the trim-fade; no watermark.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ._onnx import ExportError, export_graph
from .spec import Dim, GraphSpec, T

log = logging.getLogger(__name__)

EOT_TOKEN = 50256  # GPT-2 <|endoftext|>: the tokenizer's two trailing ids, read as start-of-speech
EOT = "<|endoftext|>"
SPEECH_TAIL = 2  # embed_tokens' last two positions go through the speech table (published Slice(-2))
SILENCE_TOKEN = 4299  # S3GEN_SIL: the three tokens the clients append before the decoder
T3_PROMPT_SECONDS = 15  # Turbo/Nano: T3's prompt tokens come from the first 15 s at 16 kHz
VARIANTS = ("turbo", "nano")


def graph_specs(t3_cfg) -> dict:
    """The four ``GraphSpec``s of the Turbo/Nano layout (names, dtypes and ranks as the published
    Turbo bundle's clients read them)."""
    from .onnx_community import S3GEN_SR, conditional_decoder_spec

    b = t3_cfg.backbone
    L, H, Dh, D, V = b.num_layers, b.num_heads, b.head_dim, b.hidden_size, t3_cfg.speech_vocab_size
    batch = Dim(1, 1, 8)
    se = GraphSpec(
        "speech_encoder", "frontend",
        inputs=[T("audio_values", "float32", 1, "num_samples")],
        outputs=[T("cond_emb", "float32", 1, "cond_length", D),
                 T("prompt_token", "int64", 1, "audio_sequence_length"),
                 T("speaker_embeddings", "float32", 1, 192),
                 T("speaker_features", "float32", 1, "feature_dim", 80)],
        dims={"num_samples": Dim(S3GEN_SR, 10 * S3GEN_SR, 60 * S3GEN_SR)},
        doc=f"A 24 kHz reference clip -> T3's conditioning [speaker, speech_emb(prompt tokens of the first "
            f"{T3_PROMPT_SECONDS} s)], S3Gen's prompt tokens, CAM++ x-vector and prompt mel (first 10 s); "
            "TTS.prepare_conditionals(norm_loudness=False) with sinc resampling.")
    et = GraphSpec(
        "embed_tokens", "t3",
        inputs=[T("input_ids", "int64", "batch_size", "sequence_length")],
        outputs=[T("inputs_embeds", "float32", "batch_size", "sequence_length", D)],
        dims={"batch_size": batch, "sequence_length": Dim(1, 64, 2048)},
        doc=f"ids[:, :-2] -> text embedding; ids[:, -2:] -> speech embedding, {EOT_TOKEN} read as "
            f"{t3_cfg.start_speech_token} (a single id is a speech token).")
    kv = lambda names, length: [T(n, "float32", "batch_size", H, length, Dh) for i in range(L)
                                for n in names(i)]
    lm = GraphSpec(
        "language_model", "t3",
        inputs=[T("inputs_embeds", "float32", "batch_size", "sequence_length", D),
                T("attention_mask", "int64", "batch_size", "total_sequence_length"),
                T("position_ids", "int64", "batch_size", "sequence_length")]
        + kv(lambda i: (f"past_key_values.{i}.key", f"past_key_values.{i}.value"), "past_sequence_length"),
        outputs=[T("logits", "float32", "batch_size", "sequence_length", V)]
        + kv(lambda i: (f"present.{i}.key", f"present.{i}.value"), "total_sequence_length"),
        dims={"batch_size": batch, "sequence_length": Dim(1, 1, 1024), "past_sequence_length": Dim(0, 512, 2048),
              "total_sequence_length": Dim(1, 513, b.n_positions)},
        doc="T3's GPT-2 backbone (position embedding of position_ids) + speech head, HF-style past/present "
            "keys and values; logits of every position.")
    cd = conditional_decoder_spec(
        "S3Gen: [prompt tokens; new tokens; silence] -> flow encoder -> meanflow CFM (fixed noise, no CFG) -> "
        "the frames after the prompt mel -> HiFT (fixed source draws) -> trim-fade; 24 kHz.")
    return {"speech_encoder": se, "embed_tokens": et, "language_model": lm, "conditional_decoder": cd}


# ------------------------------------------------------------------------------ graph modules


class EmbedTokensGraph(nn.Module):
    """``input_ids [B, T]`` -> ``inputs_embeds [B, T, D]``: text table for ``[:, :-2]``, speech
    table for ``[:, -2:]`` (``EOT_TOKEN`` -> start-of-speech)."""

    def __init__(self, t3):
        super().__init__()
        cfg = t3.config
        self.text_emb, self.speech_emb = t3.text_emb, t3.speech_emb
        self.text_vocab, self.speech_vocab = cfg.text_vocab_size, cfg.speech_vocab_size
        self.start = cfg.start_speech_token

    def forward(self, input_ids: Tensor) -> Tensor:
        ids = input_ids.long()
        text = ids[:, :-SPEECH_TAIL].clamp(0, self.text_vocab - 1)  # empty for one or two ids
        tail = ids[:, -SPEECH_TAIL:]
        tail = torch.where(tail == EOT_TOKEN, torch.full_like(tail, self.start), tail).clamp(0, self.speech_vocab - 1)
        return torch.cat([self.text_emb(text), self.speech_emb(tail)], dim=1)


def _language_model_class():
    from .t3_onnx import _T3Graph

    class LanguageModelGraph(_T3Graph):
        """T3's GPT-2 backbone and speech head with HF-style caches: ``inputs_embeds [B, T, D]``,
        ``attention_mask [B, S + T]``, ``position_ids [B, T]``, past keys/values ``[B, H, S, Dh]``
        per layer -> (logits ``[B, T, V]``, presents). Causal within the new block."""

        def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    *past_key_values: Tensor):
            if self.kind != "gpt2":
                raise ExportError("the Turbo/Nano language model graph is for the GPT-2 variants")
            x = inputs_embeds
            T_ = x.shape[1]
            S = past_key_values[0].shape[2]
            q_pos = torch.arange(T_) + S
            k_pos = torch.arange(T_ + S)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
            pos = position_ids.long().clamp(0, self.tfmr.wpe.num_embeddings - 1)
            x = x + self.tfmr.wpe(pos)
            presents = []
            for i, block in enumerate(self.tfmr.h):
                past = (past_key_values[2 * i], past_key_values[2 * i + 1])
                x, k, v, _ = self._gpt2_block(block, x, past, mask, i)
                presents += [k, v]
            logits = self._linear(self.head, self.tfmr.ln_f(x))
            return (logits, *presents)

    return LanguageModelGraph


# ------------------------------------------------------------------------------ torch references


@torch.inference_mode()
def reference_prompt(t3, cond_emb: Tensor, text_ids: Sequence[int]) -> Tensor:
    """The prompt the bundle's clients build, in torch: ``[cond; text_emb(text); speech_emb(start) x 2]``
    ``[1, C + len(text) + 2, D]`` (``T3.prompt_embeds`` has one start-of-speech position)."""
    text = t3.text_emb(torch.tensor(list(text_ids), dtype=torch.long))[None]
    start = t3.speech_emb(torch.full((1, SPEECH_TAIL), t3.config.start_speech_token, dtype=torch.long))
    return torch.cat([cond_emb, text, start], dim=1)


def _lm_cases(t3, lm, g) -> tuple[list, tuple]:
    """(feeds, want) cases for the language model: a prefill from an empty past and two one-token
    steps against T3's own backbone (static cache) and speech head, then a three-token chunk."""
    from ..models.t3.backbone import KVCache

    b = t3.config.backbone
    L, H, Dh, D = b.num_layers, b.num_heads, b.head_dim, b.hidden_size
    P = 9
    names = [f"past_key_values.{i}.{w}" for i in range(L) for w in ("key", "value")]

    def feeds(e, n_past, kv):
        f = {"inputs_embeds": e, "attention_mask": torch.ones(1, n_past + e.shape[1], dtype=torch.long),
             "position_ids": (torch.arange(e.shape[1]) + n_past)[None]}
        f.update(zip(names, kv))
        return f

    x = torch.randn(1, P, D, generator=g) * 0.5
    cases = []
    with torch.inference_mode():
        cache = KVCache(L, H, Dh, 1, P + 8, t3.dtype, t3.device)
        want = t3.speech_head(t3.tfmr(x, cache))  # [1, P, V]
        kv = [cache.kv[i, j, :, :, :P].clone() for i in range(L) for j in range(2)]
    cases.append((feeds(x, 0, [torch.zeros(1, H, 0, Dh) for _ in names]), [want] + kv))
    n = P
    for _ in range(2):
        e = torch.randn(1, 1, D, generator=g) * 0.5
        with torch.inference_mode():
            want = t3.speech_head(t3.tfmr(e, cache, pos=torch.tensor([n]), kv_len=n + 1))
            new_kv = [cache.kv[i, j, :, :, :n + 1].clone() for i in range(L) for j in range(2)]
        cases.append((feeds(e, n, kv), [want.reshape(1, 1, -1)] + new_kv))
        kv, n = new_kv, n + 1
    e = torch.randn(1, 3, D, generator=g) * 0.5
    f = feeds(e, n, kv)
    with torch.inference_mode():
        want = lm(*f.values())
    cases.append((f, list(want)))
    return cases, tuple(cases[1][0].values())


# ------------------------------------------------------------------------------ export


def export_graphs(tts, staging: Path, specs: Mapping[str, GraphSpec], *, opset: int, n_steps: Optional[int],
                  check_seconds: Sequence[float], threads: Optional[int]) -> tuple[dict, dict]:
    """Export and check the four graphs (each against torch at several sizes right after export)."""
    from . import onnx_community as oc
    from .s3gen_onnx import dedupe_initializers

    t3, s3gen = tts.t3, tts.s3gen
    cfg = t3.config
    checks, timings = {}, {}
    g = torch.Generator().manual_seed(0)

    def finish(name, module, example, cases):
        t0 = time.perf_counter()
        spec = specs[name]
        model = export_graph(module.eval(), example, spec, staging, opset=opset)
        dedupe_initializers(model)
        oc._save(model, staging, name)
        del model
        timings[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = oc._check(staging / oc.ONNX_DIR / spec.file, spec.output_names, cases, tol=oc.TOL[name],
                        what=spec.file, threads=threads)
        timings[name + "_check"] = time.perf_counter() - t0
        log.info("%s: max relative error %.3g", spec.file, res["max_rel_error"])
        checks[name] = (spec, res, {})

    # -- speech encoder: our front ends on clips of a few lengths
    se = oc.SpeechEncoderGraph(tts)
    clips = [torch.from_numpy(oc.check_signal(s, seed=i))[None] for i, s in enumerate(check_seconds)]
    se_cases = [({"audio_values": clip}, oc.reference_speech_encoder(tts, clip)[0]) for clip in clips]
    finish("speech_encoder", se, (clips[0],), se_cases)

    # -- embed_tokens: prompts (text + the two trailing ids), single ids, a [pad, id, id] step
    et = EmbedTokensGraph(t3)
    et_cases = []
    with torch.inference_mode():
        for n_text in (5, 23):
            text = torch.randint(0, cfg.text_vocab_size, (n_text,), generator=g)
            ids = torch.cat([text, torch.tensor([EOT_TOKEN, EOT_TOKEN])])[None]
            want = reference_prompt(t3, torch.zeros(1, 0, cfg.hidden_size), text.tolist())
            et_cases.append(({"input_ids": ids}, [want]))
        for tok in (0, 4321, cfg.stop_speech_token):
            et_cases.append(({"input_ids": torch.tensor([[tok]])}, [t3.speech_emb(torch.tensor([[tok]]))]))
        pad_step = torch.tensor([[EOT_TOKEN, 17, 17]])
        et_cases.append(({"input_ids": pad_step}, [torch.cat([t3.text_emb(pad_step[:, :1]),
                                                              t3.speech_emb(pad_step[:, 1:])], dim=1)]))
    finish("embed_tokens", et, (et_cases[0][0]["input_ids"],), et_cases)

    # -- language model: against the torch backbone with its static KV cache
    lm = _language_model_class()(t3)
    lm_cases, ex_args = _lm_cases(t3, lm, g)
    finish("language_model", lm, ex_args, lm_cases)

    # -- conditional decoder: against S3Gen.flow_mel (meanflow) + HiFT (fixed draws) + trim_fade
    cd = oc.ConditionalDecoderGraph(s3gen, n_steps)
    cd_cases = []
    for n_tok, n_feat in ((12, 9), (21, 20)):
        tokens = torch.randint(0, 6561, (1, n_tok), generator=g)
        tokens[0, -3:] = SILENCE_TOKEN
        xvec = torch.randn(1, 192, generator=g)
        feat = torch.randn(1, n_feat, 80, generator=g) * 1.5 - 6
        want = oc.reference_decoder(s3gen, cd.hift, tokens, xvec, feat, n_steps)
        cd_cases.append(({"speech_tokens": tokens, "speaker_embeddings": xvec, "speaker_features": feat}, [want]))
    ex = cd_cases[0][0]
    finish("conditional_decoder", cd, (ex["speech_tokens"], ex["speaker_embeddings"], ex["speaker_features"]),
           cd_cases)
    return checks, timings


# ------------------------------------------------------------------------------ bundle files


def tokenizer_json(tts) -> str:
    """The bundle's ``tokenizer.json``: the model's GPT-2 tokenizer with a template appending
    ``<|endoftext|>`` (id 50256) twice, so a client's ``tokenizer(text).input_ids`` is the runtime
    front end's ids for the same (already normalised) text plus the two ids ``embed_tokens`` reads
    as start-of-speech."""
    from tokenizers import Tokenizer

    from ..text import GPT2Tokenizer

    inner = getattr(tts.frontend, "tokenizer", None)
    if not isinstance(inner, GPT2Tokenizer):
        raise ExportError(f"the Turbo/Nano onnx-community layout needs the GPT-2 tokenizer, not {type(inner).__name__}")
    data = json.loads(inner.tokenizer.to_str())
    seq = [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOT, "type_id": 0}},
           {"SpecialToken": {"id": EOT, "type_id": 0}}]
    data["post_processor"] = {
        "type": "TemplateProcessing", "single": seq,
        "pair": seq[:1] + [{"Sequence": {"id": "B", "type_id": 1}}] + seq[1:],
        "special_tokens": {EOT: {"id": EOT, "ids": [EOT_TOKEN], "tokens": [EOT]}}}
    text = json.dumps(data, ensure_ascii=False)
    tok = Tokenizer.from_str(text)
    probe = "Hello there, how are you? [chuckle] Fine."
    want = inner.encode(probe) + [EOT_TOKEN, EOT_TOKEN]
    got = tok.encode(probe).ids
    if got != want:
        raise ExportError(f"the bundle tokenizer gives {got[:12]}... for {probe!r}, expected {want[:12]}... (does the "
                          "checkpoint's tokenizer add special tokens of its own?)")
    return text


def config_files(tts, specs: Mapping[str, GraphSpec]) -> dict:
    """``config.json`` (a ``ChatterboxModel`` with a GPT-2 ``text_config``: the shapes a client's
    KV cache is built from), ``generation_config.json`` (the reference's Turbo sampling) and the
    tokenizer's configs."""
    from .onnx_community import GRAPHS, LAYOUT, S3GEN_SR

    cfg = tts.t3.config
    b = cfg.backbone
    text_config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": b.hidden_size, "n_layer": b.num_layers,
        "n_head": b.num_heads, "n_inner": b.intermediate_size, "n_positions": b.n_positions,
        "hidden_size": b.hidden_size, "num_hidden_layers": b.num_layers, "num_attention_heads": b.num_heads,
        "num_key_value_heads": b.num_heads, "head_dim": b.head_dim, "vocab_size": cfg.speech_vocab_size,
        "layer_norm_epsilon": b.norm_eps, "activation_function": "gelu_new",
        "bos_token_id": cfg.start_speech_token, "eos_token_id": cfg.stop_speech_token}
    config = {
        "architectures": ["ChatterboxModel"], "model_type": "chatterbox", "text_config": text_config,
        "bos_token_id": cfg.start_speech_token, "eos_token_id": cfg.stop_speech_token,
        "start_speech_token": cfg.start_speech_token, "stop_speech_token": cfg.stop_speech_token,
        "silence_token": SILENCE_TOKEN, "sampling_rate": S3GEN_SR,
        "transformers.js_config": {"use_external_data_format": {f"{n}.onnx": 1 for n in GRAPHS}},
        "chatterbox_rt": {"variant": tts.variant, "layout": LAYOUT},
    }
    s = cfg.sampling
    generation = {"bos_token_id": cfg.start_speech_token, "eos_token_id": cfg.stop_speech_token,
                  "decoder_start_token_id": cfg.start_speech_token, "max_new_tokens": s.max_new_tokens,
                  "repetition_penalty": s.repetition_penalty, "temperature": s.temperature, "top_k": s.top_k,
                  "top_p": s.top_p, "do_sample": True}
    # No add_bos_token/add_eos_token keys: transformers would then replace the template.
    tokenizer_config = {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": b.n_positions,
                        "clean_up_tokenization_spaces": False, "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    return {"config.json": config, "generation_config.json": generation,
            "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
            "preprocessor_config.json": {"feature_extractor_type": "ChatterboxFeatureExtractor",
                                         "sampling_rate": S3GEN_SR, "processor_class": "ChatterboxProcessor"}}


__all__ = ["graph_specs", "export_graphs", "tokenizer_json", "config_files", "EmbedTokensGraph", "reference_prompt",
           "EOT_TOKEN", "SILENCE_TOKEN", "VARIANTS"]
