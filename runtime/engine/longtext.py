"""Long text in the engine: one request made of segment requests, joined in order.

``Engine.submit`` cuts a long text into segments (``chatterbox_rt.longtext``) and queues one child
request per segment at once, so the segments share T3's decode steps and S3Gen's batches like any
concurrent requests. Each child has its own seed (``segment_seed``), the request's voice and
settings, and no watermark or post-processing of its own. The parent (``LongRequest``, what
``submit`` returns) takes the children's audio as it comes, holds what arrives out of turn, and
sends it out in segment order through the joins (``Joiner``), then post-processing, then the
watermark (``OutputChain``). With ``stream=True`` the first segment streams (quick first audio) and
the others decode whole, in batches, each going out as soon as every segment before it has.
One child failing or being cancelled ends the parent the same way and cancels the others.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from ..longtext import Joiner
from .request import CANCELLED, DONE, FAILED, Request


class OutputChain:
    """What happens to a request's audio on its way out: post-processing (``chatterbox_rt.post``),
    then the watermark. ``stream=True``: chunk by chunk (``push``), the tails at ``flush``;
    ``stream=False``: ``push`` collects and ``flush`` returns the whole waveform, processed."""

    def __init__(self, sr: int, post: Optional[str], watermark: bool, stream: bool):
        self.sr, self.post, self.watermark, self.stream = sr, post, watermark, stream
        self._pieces: list[Tensor] = []
        self._pp = self._wm = None
        if stream and post is not None:
            from ..post import PostProcessor

            self._pp = PostProcessor(sr, post)
        if stream and watermark:
            from ..watermark import StreamWatermarker

            self._wm = StreamWatermarker(sr)

    def push(self, chunk: Tensor) -> Tensor:
        chunk = chunk.reshape(-1)
        if not self.stream:
            self._pieces.append(chunk)
            return chunk[:0]
        if self._pp is not None:
            chunk = self._pp.process(chunk)
        if self._wm is not None:
            chunk = self._wm.push(chunk)
        return chunk

    def flush(self) -> Tensor:
        if not self.stream:
            wav = torch.cat(self._pieces) if self._pieces else torch.zeros(0)
            self._pieces = []
            if self.post is not None:
                from ..post import apply_post

                wav = apply_post(wav, self.sr, self.post)
            if self.watermark and wav.numel():
                from ..watermark import watermark_output

                wav = watermark_output(wav[None], self.sr)[0]
            return wav
        tail = self._pp.flush() if self._pp is not None else torch.zeros(0)
        if self._wm is not None:
            tail = torch.cat([self._wm.push(tail), self._wm.flush()])
        return tail


class LongRequest(Request):
    """A request whose text runs as several segment requests (``children``), joined in order.
    Everything a ``Request`` offers works on it; ``progress`` says how many segments are done."""

    def __init__(self, rid: int, text: str, segments: list[str], *, stream: bool, engine, sr: int,
                 post: Optional[str], watermark: bool):
        super().__init__(rid, text, stream=stream, engine=engine)
        self.segments = list(segments)
        self.children: list[Request] = []
        self._join_lock = threading.RLock()
        self._joiner = Joiner(sr)
        self._chain = OutputChain(sr, post, watermark, stream=stream)
        self._waiting: dict[int, list[Tensor]] = {}  # chunks of segments whose turn has not come
        self._ended: set[int] = set()  # segments done, not yet all sent
        self._turn = 0  # the segment whose audio goes out now
        self._n_done = 0

    def __repr__(self) -> str:
        return (f"LongRequest(id={self.id}, status={self._status!r}, segments={self._n_done}/{len(self.segments)}, "
                f"tokens={self.metrics.n_tokens})")

    @property
    def progress(self) -> tuple[int, int]:
        """(segments done, segments)."""
        return self._n_done, len(self.segments)

    def cancel(self) -> bool:
        ok = super().cancel()
        for child in self.children:
            child.cancel()
        return ok

    # ------------------------------------------------------------------ from the children (engine threads)

    def _child_running(self, child: Request) -> None:
        if self.t_admit is None:
            self._set_running()

    def _child_chunk(self, child: Request, chunk: Tensor) -> None:
        with self._join_lock:
            if self.done():
                return
            if child.index == self._turn:
                self._send(self._joiner.push(chunk))
            else:
                self._waiting.setdefault(child.index, []).append(chunk)

    def _child_end(self, child: Request, status: str, error: Optional[BaseException]) -> None:
        with self._join_lock:
            if self.done():
                return
            if status != DONE:
                for other in self.children:
                    if other is not child:
                        other.cancel()
                if status == FAILED:
                    err = RuntimeError(f"segment {child.index + 1} of {len(self.segments)} failed: {error}")
                    err.__cause__ = error
                    self._finish(FAILED, err)
                else:
                    self._finish(CANCELLED)
                return
            self._n_done += 1
            self._ended.add(child.index)
            n = len(self.segments)
            while self._turn in self._ended:
                last = self._turn == n - 1
                self._send(self._joiner.end_segment(last))
                self._turn += 1
                for chunk in self._waiting.pop(self._turn, []):
                    self._send(self._joiner.push(chunk))
            if self._turn == n:
                self._complete()

    def _send(self, audio: Tensor) -> None:
        if audio.numel():
            out = self._chain.push(audio)
            if out.numel():
                self._emit(out)

    def _complete(self) -> None:
        try:
            tail = self._chain.flush()
        except Exception as e:  # noqa: BLE001 - the post-processing or watermark failed: this request's error
            self._finish(FAILED, e)
            return
        if tail.numel():
            self._emit(tail)
        kids = self.children
        m = self.metrics
        m.n_tokens = sum(c.metrics.n_tokens for c in kids)
        m.n_text_tokens = sum(c.metrics.n_text_tokens for c in kids)
        m.prefill_ms = sum(c.metrics.prefill_ms or 0.0 for c in kids)
        m.s3gen_ms = sum(c.metrics.s3gen_ms or 0.0 for c in kids)
        if self.t_admit is not None:
            ends = [c.t_admit + c.metrics.t3_ms / 1e3 for c in kids if c.t_admit is not None and c.metrics.t3_ms]
            if ends:
                m.t3_ms = (max(ends) - self.t_admit) * 1e3
        toks = [c.tokens for c in kids if c.tokens is not None]
        self.tokens = torch.cat(toks) if toks else None
        self._finish(DONE)


__all__ = ["LongRequest", "OutputChain"]
