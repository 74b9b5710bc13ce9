"""T3: text tokens + voice conditioning -> speech tokens (25 Hz S3 codes).

Same parameters and outputs as the reference's ``models/t3/t3.py`` (chatterbox-tts 0.1.7),
with a decode loop built for speed: a static KV cache, a device-resident position, on-device
sampling and EOS detection, and a host that only polls for EOS every few steps.

Quirks of the reference kept on purpose (they change the tokens):

* Llama variants put the start-of-speech token in the prompt twice: once from
  ``prepare_input_embeds`` and once as the explicit BOS, both with speech position 0; the
  token sampled at step ``i`` is fed back with speech position ``i + 1``.
* CFG's unconditional row has its text embeddings zeroed *before* the text position
  embeddings are added, so it still carries text positions.
* The prompt speech tokens get speech position embeddings (Llama variants only).
* Turbo/Nano: the first token comes from the prefill and is not checked for EOS; the
  repetition history of that first draw is the start-of-speech token, afterwards only the
  generated tokens.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn

from ...kernels.dispatch import DispatchedOp
from ...profiling import nvtx
from .backbone import AttentionProbe, KVCache, Linear, Step, build_backbone
from .cond_enc import T3Cond, T3CondEnc
from .config import T3Config
from .request import EOS_POLL_EVERY_CUDA, T3Request  # noqa: F401  (EOS_POLL_EVERY_CUDA: re-exported)
from .sampling import SamplingParams

log = logging.getLogger(__name__)

# KV-cache lengths are rounded up to this, so similar requests reuse one allocation.
CACHE_LEN_QUANTUM = 256


class LearnedPositionEmbeddings(nn.Module):
    def __init__(self, seq_len: int, dim: int, init: float = 0.02):
        super().__init__()
        self.emb = nn.Embedding(seq_len, dim)
        nn.init.normal_(self.emb.weight, mean=0.0, std=init)

    def forward(self, n: int, device=None) -> Tensor:
        """Embeddings of positions 0..n-1 -> [n, D]."""
        return self.emb(torch.arange(n, device=device or self.emb.weight.device))


class T3(nn.Module):
    def __init__(self, config: T3Config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self._sample_op = DispatchedOp("sample")
        self.tfmr = build_backbone(config.backbone)
        self.cond_enc = T3CondEnc(config)
        self.text_emb = nn.Embedding(config.text_vocab_size, d)
        self.speech_emb = nn.Embedding(config.speech_vocab_size, d)
        if config.learned_pos_emb:
            self.text_pos_emb = LearnedPositionEmbeddings(config.text_pos_len, d)
            self.speech_pos_emb = LearnedPositionEmbeddings(config.speech_pos_len, d)
        else:
            self.text_pos_emb = self.speech_pos_emb = None
        self.text_head = Linear(d, config.text_vocab_size, bias=False)
        self.speech_head = Linear(d, config.speech_vocab_size, bias=config.is_gpt)
        self._cache: Optional[KVCache] = None

    # ------------------------------------------------------------------ construction helpers

    @property
    def device(self) -> torch.device:
        return self.speech_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.speech_head.weight.dtype

    # The KV cache's dtype when it differs from the activations' (chatterbox_rt.precision; None: the same).
    kv_cache_dtype: Optional[torch.dtype] = None
    # "int8" / "fp8" once the transformer's linears are 8-bit (chatterbox_rt.models.t3.quant.quantize_t3_).
    weight_mode: Optional[str] = None

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype the KV cache is stored in (keys and values are read back in ``dtype``)."""
        return self.kv_cache_dtype or self.dtype

    @classmethod
    def from_dummy(cls, variant: str, seed: int = 0, device="cpu", dtype=torch.float32, **overrides) -> "T3":
        """Real shapes, seeded random weights (benchmarks and tests; no checkpoint needed)."""
        from ...checkpoint import init_dummy_

        model = cls(T3Config.for_variant(variant, **overrides))
        init_dummy_(model, seed)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_local(cls, ckpt_dir, variant: Optional[str] = None, device="cpu", dtype=torch.float32, *,
                   t3_file=None, behaviour: Optional[str] = None, lora=None) -> "T3":
        """Load T3 from a checkpoint directory by the official file names (or ``t3_file``; see
        ``chatterbox_rt.checkpoint.load_t3`` for ``behaviour`` and ``lora``)."""
        from ...checkpoint import load_t3

        return load_t3(ckpt_dir, variant=variant, device=device, dtype=dtype, t3_file=t3_file, behaviour=behaviour,
                       lora=lora)

    def allocate_cache(self, max_batch: int, max_len: int) -> KVCache:
        """Allocate the KV cache up front (a server does this once at start-up)."""
        b = self.config.backbone
        max_len = -(-max_len // CACHE_LEN_QUANTUM) * CACHE_LEN_QUANTUM
        self._cache = None  # free the old one before allocating
        self._cache = KVCache(b.num_layers, b.num_heads, b.head_dim, max_batch, max_len, self.kv_dtype, self.device)
        return self._cache

    def _ensure_cache(self, batch: int, length: int) -> KVCache:
        c = self._cache
        if c is None or not c.fits(batch, length, self.kv_dtype, self.device):
            if c is not None:
                batch, length = max(batch, c.max_batch), max(length, c.max_len)
                log.info("growing T3 KV cache to batch %d, length %d", batch, length)
            c = self.allocate_cache(batch, length)
        return c

    # ------------------------------------------------------------------------- embeddings

    def embed_cond(self, cond: T3Cond) -> Tensor:
        """Conditioning prefix [1, len_cond, D]."""
        prompt = cond.cond_prompt_speech_tokens
        prompt_emb = cond.cond_prompt_speech_emb
        if prompt is not None and prompt_emb is None:
            prompt = torch.atleast_2d(prompt).to(self.device, torch.long)
            prompt_emb = self.speech_emb(prompt)
            if self.speech_pos_emb is not None:
                prompt_emb = prompt_emb + self.speech_pos_emb(prompt.shape[1])
        elif prompt_emb is not None:  # precomputed by the reference and stored in conds.pt
            prompt_emb = prompt_emb.to(self.device, self.dtype)
        emotion = cond.emotion_tensor(self.device, self.dtype) if self.config.emotion_adv else None
        return self.cond_enc(cond.speaker_emb.to(self.device, self.dtype), prompt_emb, emotion)

    def embed_speech(self, tokens: Tensor, speech_pos: Optional[Tensor]) -> Tensor:
        """tokens [B] at speech positions [B] (Llama) -> [B, 1, D]."""
        x = self.speech_emb(tokens)
        if self.speech_pos_emb is not None:
            x = x + self.speech_pos_emb.emb(speech_pos)
        return x[:, None]

    def prompt_embeds(self, cond: T3Cond, text_tokens: Tensor, cfg: bool) -> tuple[Tensor, int]:
        """Prefill input [B, P, D] (B = 2 with CFG) and the conditioning length."""
        cond_emb = self.embed_cond(cond)  # [1, C, D]
        B = 2 if cfg else 1
        text = self.text_emb(text_tokens)[None].expand(B, -1, -1).clone()  # [B, T, D]
        if cfg:
            text[1].zero_()
        start = torch.full((1,), self.config.start_speech_token, device=self.device, dtype=torch.long)
        start_emb = self.speech_emb(start)[None]  # [1, 1, D]
        if self.config.learned_pos_emb:
            text = text + self.text_pos_emb(text_tokens.shape[0])
            start_emb = start_emb + self.speech_pos_emb(1)
            starts = [start_emb, start_emb]  # the reference's doubled start-of-speech (see module doc)
        else:
            starts = [start_emb]
        parts = [cond_emb.expand(B, -1, -1), text] + [s.expand(B, -1, -1) for s in starts]
        return torch.cat(parts, dim=1), cond_emb.shape[1]

    # ---------------------------------------------------------------------------- forward

    def prefill(self, embeds: Tensor, probe: Optional[AttentionProbe] = None, max_len: int = 0) -> Tensor:
        """Run the prompt, fill the cache; -> speech logits of the last position [B, V]."""
        B, P, _ = embeds.shape
        cache = self._ensure_cache(B, max(P, max_len))
        h = self.tfmr(embeds, cache, probe=probe)
        return self.speech_head(h[:, -1])

    def decode_step(self, tokens: Tensor, pos: Tensor, speech_pos: Optional[Tensor], kv_len: Optional[int] = None,
                    probe: Optional[AttentionProbe] = None) -> Tensor:
        """One token per row at cache position ``pos`` [B] (device) -> logits [B, V].

        Static shapes and no host synchronisation: capturable in a CUDA graph (pass
        ``kv_len=None`` to attend over the whole, masked, cache)."""
        x = self.embed_speech(tokens, speech_pos)
        h = self.tfmr(x, self._cache, pos=pos, kv_len=kv_len, probe=probe)
        return self.speech_head(h[:, -1])

    # --------------------------------------------------------------------------- generate

    def sampling_params(self, **given) -> SamplingParams:
        d = self.config.sampling
        values = {k: (getattr(d, k) if v is None else v) for k, v in given.items()}
        if self.config.is_gpt:
            for name in ("min_p", "cfg_weight"):
                if given[name]:
                    log.warning("%s is not supported by %s (as in the reference) and is ignored", name,
                                self.config.variant)
                values[name] = 0.0
        return SamplingParams(**values).validate()

    def cond_len(self, cond: T3Cond) -> int:
        """Length of the conditioning prefix ``embed_cond`` builds, without running it: the
        speaker embedding, the prompt (resampled to the perceiver's queries, or as it is) and the
        emotion value."""
        cfg = self.config
        n = 1
        prompt = cond.cond_prompt_speech_emb if cond.cond_prompt_speech_emb is not None \
            else cond.cond_prompt_speech_tokens
        if prompt is not None:
            n += cfg.perceiver_queries if cfg.use_perceiver else torch.atleast_2d(prompt).shape[1]
        return n + (1 if cfg.emotion_adv else 0)

    def max_text_tokens(self, cond: T3Cond, max_new_tokens: Optional[int] = None) -> int:
        """How many text tokens (start/stop included) one request may have: the text positions of
        the Llama variants; for GPT-2 variants what the shared positions leave after the voice's
        prompt, the start-of-speech token and ``max_new_tokens`` (default: the variant's)."""
        cfg = self.config
        if cfg.learned_pos_emb:
            return cfg.text_pos_len
        n_max = cfg.sampling.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        return cfg.backbone.n_positions - self.cond_len(cond) - 1 - n_max

    def _text_too_long(self, n_text: int, limit: int, why: str = "") -> ValueError:
        return ValueError(f"text is too long: {n_text} tokens, this model takes at most {max(limit, 0)}{why}; "
                          "split it into sentences and synthesise them one by one")

    def _check_text(self, text_tokens: Tensor) -> Tensor:
        cfg = self.config
        if not torch.is_tensor(text_tokens) or text_tokens.dim() != 1:
            raise ValueError("text_tokens must be a 1-D tensor of token ids "
                             f"(got {type(text_tokens).__name__} {tuple(getattr(text_tokens, 'shape', ()))})")
        if text_tokens.numel() == 0:
            raise ValueError("text_tokens is empty")
        text_tokens = text_tokens.to(self.device, torch.long)
        lo, hi = int(text_tokens.min()), int(text_tokens.max())
        if lo < 0 or hi >= cfg.text_vocab_size:
            raise ValueError(f"text token ids must be in [0, {cfg.text_vocab_size}); got range [{lo}, {hi}]")
        if cfg.learned_pos_emb:
            ids = text_tokens.tolist()
            if cfg.start_text_token not in ids or cfg.stop_text_token not in ids:
                raise ValueError(f"text_tokens must contain the start ({cfg.start_text_token}) and stop "
                                 f"({cfg.stop_text_token}) text tokens, as the text front end adds them")
            if len(ids) > cfg.text_pos_len:
                raise self._text_too_long(len(ids), cfg.text_pos_len)
        return text_tokens

    @torch.inference_mode()
    def generate(
        self,
        cond: T3Cond,
        text_tokens: Tensor,
        *,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: Optional[float] = None,
        cfg_weight: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        stop_on_eos: bool = True,
    ) -> Tensor:
        """Speech tokens for one request, EOS excluded -> LongTensor [N] on the model's device.

        ``text_tokens``: 1-D ids (for Llama variants including the start/stop text tokens).
        Sampling arguments left as None take the reference's defaults for this variant
        (``config.sampling``). ``stop_on_eos=False`` always draws ``max_new_tokens`` tokens
        (benchmarks), keeping EOS-like ids in the output.

        The per-request state (checks, sampling, history, EOS) is a ``T3Request``, the same one
        the engine batches: this loop is the engine's with one request.
        """
        req = T3Request(self, cond, text_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, min_p=min_p, top_k=top_k, repetition_penalty=repetition_penalty,
                        cfg_weight=cfg_weight, generator=generator, stop_on_eos=stop_on_eos)
        embeds = req.embeds()
        B, P, _ = embeds.shape
        with nvtx.range("t3_prefill"):
            logits = self.prefill(embeds, req.prefill_probe(), max_len=req.cache_len)
        dev = self.device
        pos = torch.full((B,), P, dtype=torch.long, device=dev)  # cache slot of the next input token
        speech_pos = torch.ones(B, dtype=torch.long, device=dev) if self.config.learned_pos_emb else None
        with nvtx.range("t3_decode"):
            with nvtx.range("t3_step"):
                req.sample(logits)
            while not req.finished:
                with nvtx.range("t3_step"):
                    logits = self.decode_step(req.last_token().expand(B), pos, speech_pos, kv_len=req.kv_len,
                                              probe=req.current_probe())
                    pos += 1
                    if speech_pos is not None:
                        speech_pos += 1
                    req.sample(logits)
        return req.tokens()

    # ------------------------------------------------------------------ the engine's entry points

    def prefill_rows(self, embeds: Tensor, cache: KVCache, probe: Optional[AttentionProbe] = None) -> Tensor:
        """A request's prefill into its own cache rows (``cache.rows(slot, n)``) -> last-position
        speech logits ``[n, V]``."""
        h = self.tfmr(embeds, cache, probe=probe)
        return self.speech_head(h[:, -1])

    def decode_rows(self, tokens: Tensor, speech_pos: Optional[Tensor], step: Step, cache: KVCache) -> Tensor:
        """A per-request decode step (``Step.per_request``) over rows of several requests -> logits ``[B, V]``."""
        x = self.embed_speech(tokens, speech_pos)
        h = self.tfmr(x, cache, step=step)
        return self.speech_head(h[:, -1])

    def _trim_eos(self, tokens: Tensor) -> Tensor:
        """The reference's cut of the drawn tokens: up to the first EOS; for the Llama variants
        also everything up to and including a start-of-speech token drawn mid-sequence
        (``drop_invalid_tokens``; with several, up to the last one, where the reference fails)."""
        eos = self.config.stop_speech_token
        ids = tokens.tolist()
        # Turbo/Nano ignore an EOS drawn first (reference); it is dropped from the result.
        first = 1 if self.config.is_gpt else 0
        end = next((i for i in range(first, len(ids)) if ids[i] == eos), len(ids))
        if self.config.is_gpt:
            kept = tokens[:end]
            return kept[kept != eos]
        sos = self.config.start_speech_token
        start = max((i + 1 for i in range(end) if ids[i] == sos), default=0)
        return tokens[start:end]

    def _probe_heads(self) -> dict:
        heads: dict = {}
        for layer, head in self.config.alignment_heads:
            heads.setdefault(layer, []).append(head)
        return heads

    def _stack_probe(self, probe: AttentionProbe) -> Tensor:
        """[heads, n, L] in the reference's head order."""
        rows = []
        for layer, head in self.config.alignment_heads:
            rows.append(probe.out[layer][probe.heads[layer].index(head)])
        return torch.stack(rows)
