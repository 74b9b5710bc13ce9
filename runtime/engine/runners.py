"""The component-runner interface: what the engine asks of a backend (torch here; onnxruntime and
TensorRT implement the same in ``chatterbox_rt.export``).

Sampling, EOS, the alignment control, scheduling, streaming and the watermark stay above the
runners (``T3Request``, ``Engine``), so every backend gives the same tokens for the same logits.
A runner owns its device state (the KV cache, CUDA graphs, engines) and decides nothing.

``T3Runner`` (``t3_runner.T3Runner`` for torch)::

    max_rows, max_len, mode, group_rows      sizes fixed at construction
    allocate(n) -> slot | None               n adjacent KV rows (a request: 2 with CFG)
    release(slot, n)
    prefill(req: T3Request, slot) -> logits  [req.rows, V]: req.embeds() into its rows
    decode([(req, slot), ...]) -> [logits]   one step for each: feeds req.last_token() at
                                             req.input_pos (speech position req.speech_pos),
                                             attends to its first req.kv_len entries
    free()

``FlowRunner`` and ``HiFTRunner`` are, for torch, ``S3Gen.flow_mel(tokens [B, T], token_lens [B],
refs, n_steps=, noise=[B, 80, L]) -> (mel [B, 80, M], mel_lens [B])`` and ``S3Gen.hift(mel,
mel_lens, generator=[one per row]) -> wav [B, 480 M]``; the engine's S3Gen side
(``s3gen_runner.decode_batch``) calls nothing else.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

from torch import Tensor

from ..models.t3.request import T3Request


class T3RunnerProtocol(Protocol):
    max_rows: int
    max_len: int
    mode: str
    group_rows: int

    def allocate(self, n: int) -> Optional[int]: ...

    def release(self, slot: int, n: int) -> None: ...

    def prefill(self, req: T3Request, slot: int) -> Tensor: ...

    def decode(self, items: Sequence[tuple[T3Request, int]]) -> list[Tensor]: ...

    def free(self) -> None: ...
