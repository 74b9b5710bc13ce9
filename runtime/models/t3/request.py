"""One T3 request's decode state: what ``T3.generate`` keeps per request, in one object.

``T3.generate`` runs one of these alone; the engine (``chatterbox_rt.engine``) runs many in one
decode batch. Both call the same ``sample`` on the same logits rows, so a request draws the same
tokens whichever way it runs: the sampling chain, the multilingual alignment control, the
repetition history, the random stream, EOS and ``max_new_tokens`` all live here, per request.

Step ``s`` (0-based) draws token ``s``: step 0 from the prefill's logits, step ``s >= 1`` from a
decode step that feeds token ``s - 1`` at cache position ``P + s - 1`` and speech position ``s``
(Llama), attending to the first ``P + s`` cache entries (``input_pos``, ``speech_pos``,
``kv_len``). ``P`` is the prompt length (``embeds.shape[1]``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .alignment import AlignmentController
from .backbone import AttentionProbe
from .cond_enc import T3Cond
from .config import SPEECH_CODEBOOK_SIZE
from .sampling import SamplingParams, cfg_combine, process_gpt, process_llama, sample_no_sync

# On a GPU the host reads the EOS flag every this many steps (a sync); the tokens drawn after
# EOS are discarded. On the CPU reading it is free, so every step.
EOS_POLL_EVERY_CUDA = 16


class T3Request:
    """Validated inputs, prompt embeddings and per-request sampling state of one T3 request.

    Construction does every check ``T3.generate`` does (sampling values, ``max_new_tokens``, the
    text's ids and length against this model's positions) and raises the same errors, before any
    work: an engine builds one at submit time."""

    def __init__(self, t3, cond: T3Cond, text_tokens: Tensor, *, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 top_k: Optional[int] = None, repetition_penalty: Optional[float] = None,
                 cfg_weight: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 stop_on_eos: bool = True, poll_every: Optional[int] = None):
        cfg = t3.config
        self.t3 = t3
        self.params: SamplingParams = t3.sampling_params(
            temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
            repetition_penalty=float(repetition_penalty) if repetition_penalty is not None else None,
            cfg_weight=cfg_weight)
        n_max = cfg.sampling.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if n_max < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {n_max}")
        self.n_max = n_max
        text_tokens = t3._check_text(text_tokens)
        if cfg.learned_pos_emb:
            if n_max > cfg.speech_pos_len - 1:
                raise ValueError(f"max_new_tokens={n_max} exceeds this model's speech positions "
                                 f"(at most {cfg.speech_pos_len - 1})")
        else:  # GPT-2: the prompt, the text and the speech tokens share one set of positions
            used = t3.cond_len(cond) + 1  # the voice's prompt and the start-of-speech token
            free = cfg.backbone.n_positions - used
            if n_max > free - 1:
                raise ValueError(f"max_new_tokens={n_max} leaves no room for text: this model has "
                                 f"{cfg.backbone.n_positions} positions and this voice's prompt takes {used}; "
                                 f"ask for at most {free - 1}")
            if text_tokens.numel() > free - n_max:
                raise t3._text_too_long(text_tokens.numel(), free - n_max,
                                        f" with this voice's prompt and up to {n_max} new speech tokens")
        self.cond, self.text_tokens = cond, text_tokens
        self.generator = generator
        self.stop_on_eos = stop_on_eos
        self.use_cfg = cfg.uses_cfg and self.params.cfg_weight > 0
        self.rows = 2 if self.use_cfg else 1  # CFG: a conditional and an unconditional row
        self.len_cond = t3.cond_len(cond)
        # Prompt length: conditioning, text, and one (GPT-2) or two (Llama) start-of-speech tokens.
        self.P = self.len_cond + text_tokens.numel() + (2 if cfg.learned_pos_emb else 1)
        self.step = 0  # tokens drawn so far
        self.finished = False
        dev = t3.device
        self.poll_every = poll_every or (EOS_POLL_EVERY_CUDA if dev.type == "cuda" else 1)
        self._embeds: Optional[Tensor] = None
        self._state_ready = False

    # ------------------------------------------------------------------ sizes

    @property
    def cache_len(self) -> int:
        """Cache entries this request can need: its prompt and every token it may draw."""
        return self.P + self.n_max

    def embeds(self) -> Tensor:
        """Prefill input ``[rows, P, D]`` (built once, on first use)."""
        if self._embeds is None:
            self._embeds, len_cond = self.t3.prompt_embeds(self.cond, self.text_tokens, self.use_cfg)
            assert len_cond == self.len_cond and self._embeds.shape[1] == self.P
        return self._embeds

    def release_embeds(self) -> None:
        self._embeds = None  # the prefill has consumed them

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        t3, cfg = self.t3, self.t3.config
        dev, V = t3.device, cfg.speech_vocab_size
        self.eos = cfg.stop_speech_token
        self.out = torch.full((1, self.n_max), self.eos, dtype=torch.long, device=dev)
        self.seen = torch.zeros(1, V, dtype=torch.bool, device=dev)
        self.seen[:, cfg.start_speech_token] = True
        self.done = torch.zeros(1, dtype=torch.bool, device=dev)
        self.align = self.probe = self.step_probe = None
        if cfg.alignment_heads:
            text_end = self.len_cond + self.text_tokens.shape[0]
            self.align = AlignmentController(self.len_cond, text_end, self.n_max, self.eos, dev)
            self.probe = AttentionProbe(heads=t3._probe_heads(), row=0, n_query=self.P - text_end)
            self.step_probe = AttentionProbe(heads=self.probe.heads, row=0, n_query=1)
        # Sampling: the fused kernel where the dispatch layer picks one (Triton on a GPU), else the
        # torch chain of sampling.py. The kernel draws from Philox keyed by a per-request seed (from
        # ``generator``, one host read per request) and a per-request step counter.
        self.fused = t3._sample_op.get(dev)
        self.order = "gpt" if cfg.is_gpt else "llama"
        self.rng_seed = self.rng_offset = None
        if self.fused is not None:
            g = self.generator
            gen_dev = g.device if g is not None else torch.device("cpu")
            self.rng_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=gen_dev).item())
            self.rng_offset = torch.zeros(1, dtype=torch.long, device=dev)
        self._state_ready = True

    def prefill_probe(self) -> Optional[AttentionProbe]:
        """The probe the prefill fills (alignment control), or None. Sets up the sampling state."""
        if not self._state_ready:
            self._init_state()
        return self.probe

    def current_probe(self) -> Optional[AttentionProbe]:
        """The probe a decode step for the next draw fills (after step 0)."""
        return self.step_probe

    # Decode-step inputs for the next draw (step >= 1)
    @property
    def input_pos(self) -> int:
        return self.P + self.step - 1

    @property
    def speech_pos(self) -> int:
        return self.step

    @property
    def kv_len(self) -> int:
        return self.P + self.step

    def last_token(self) -> Tensor:
        """The token drawn last (``[1]`` on the device), the next decode step's input."""
        return self.out[0, self.step - 1:self.step]

    # ------------------------------------------------------------------ one draw

    @torch.inference_mode()
    def sample(self, logits: Tensor) -> None:
        """Draw the next token from this request's logits rows ``[rows, V]`` (CFG: conditional,
        then unconditional); updates the history, EOS and ``finished``."""
        if not self._state_ready:
            self._init_state()
        cfg, p = self.t3.config, self.params
        step, eos = self.step, self.eos
        logits = logits.float()
        probe = self.probe if step == 0 else self.step_probe
        cfg_w = p.cfg_weight if self.use_cfg else None
        if not cfg.is_gpt and self.align is not None:
            # The alignment control acts between the CFG combine and the chain.
            logits, cfg_w = (cfg_combine(logits, p.cfg_weight) if self.use_cfg else logits), None
            prev = self.out[0, step - 2:step] if step >= 2 else None
            logits = self.align.step(self.t3._stack_probe(probe), logits, prev)
        if self.fused is not None:  # one kernel: CFG, the chain and the draw (-1: nothing left)
            tok = self.fused(logits, self.seen, order=self.order, temperature=p.temperature, top_p=p.top_p,
                             min_p=p.min_p, top_k=p.top_k, repetition_penalty=p.repetition_penalty,
                             cfg_weight=cfg_w, seed=self.rng_seed, offset=self.rng_offset)
            self.rng_offset.add_(1)
            dead = tok < 0
        else:
            if cfg_w is not None:
                logits = cfg_combine(logits, cfg_w)
            processed = process_gpt(logits, self.seen, p) if cfg.is_gpt else process_llama(logits, self.seen, p)
            dead = torch.isneginf(processed).all(dim=-1)
            tok = sample_no_sync(torch.softmax(processed, dim=-1), self.generator)
        if cfg.is_gpt and step == 0:  # the first draw's history is the start token, later ones the generated tokens
            self.seen.zero_()
        # Turbo stops when every logit was filtered to -inf (reference), which ends the sequence like EOS.
        tok = torch.where(dead, torch.full_like(tok, eos), tok)
        if self.stop_on_eos:
            tok = torch.where(self.done, torch.full_like(tok, eos), tok)
        self.out[:, step] = tok
        self.seen.scatter_(1, tok[:, None], True)
        self.step = step + 1
        if self.stop_on_eos:
            # Turbo/Nano check EOS from the second draw on (reference); a first EOS is skipped.
            self.done |= dead if (cfg.is_gpt and step == 0) else (tok == eos)
            if self.step % self.poll_every == 0 and bool(self.done.all()):
                self.finished = True
        if self.step >= self.n_max:
            self.finished = True

    # ------------------------------------------------------------------ results

    def drawn(self) -> Tensor:
        """Every token drawn so far (EOS-like ids included) ``[step]``."""
        return self.out[0, :self.step]

    def tokens(self) -> Tensor:
        """The request's result, as ``T3.generate`` returns it: EOS cut (and the Llama variants'
        start-of-speech rule) with ``stop_on_eos``; every draw without."""
        drawn = self.drawn()
        return self.t3._trim_eos(drawn) if self.stop_on_eos else drawn

    def stream_tokens(self) -> Tensor:
        """Speech tokens safe to decode while the request still runs: the valid codes (< 6561)
        drawn before the first EOS. Unlike ``tokens`` this never drops tokens already seen (a
        start-of-speech token drawn mid-sequence is skipped rather than cutting what came
        before: streamed audio cannot be taken back)."""
        ids = self.drawn()
        if self.stop_on_eos:
            first = 1 if self.t3.config.is_gpt else 0
            hits = (ids[first:] == self.eos).nonzero()
            if hits.numel():
                ids = ids[: first + int(hits[0, 0])]
        return ids[ids < SPEECH_CODEBOOK_SIZE]
