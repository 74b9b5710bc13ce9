"""An engine request: the handle ``Engine.submit`` returns, and the state the engine keeps for it.

The user side (``result``, ``chunks``, ``cancel``, ``status``, ``metrics``, ``aresult``, ``achunks``)
is thread-safe; the engine's threads fill it in. Audio leaves as CPU float32 chunks through a
queue, so a reader never blocks the engine and the engine never waits for a reader.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Iterator, List, Optional

import torch
from torch import Tensor

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
FINAL_STATUSES = (DONE, CANCELLED, FAILED)
# aresult / achunks poll the request this often (seconds): first, and at most after backing off.
ASYNC_POLL_S = (0.002, 0.02)


class RequestCancelled(RuntimeError):
    """``result()`` / ``chunks()`` of a request that was cancelled (by ``cancel()`` or ``Engine.close``)."""


class RequestFailed(RuntimeError):
    """Raised by ``result()`` / ``chunks()`` when the request's work failed; ``__cause__`` is the error."""


@dataclass
class RequestMetrics:
    """Milliseconds from submit unless named otherwise; None until known."""

    queue_ms: Optional[float] = None  # submit -> admitted (prefill starts)
    prefill_ms: Optional[float] = None  # T3 prefill
    t3_ms: Optional[float] = None  # admitted -> last speech token
    s3gen_ms: Optional[float] = None  # flow + HiFT time spent on this request (its share of batches)
    first_audio_ms: Optional[float] = None  # submit -> first chunk ready
    total_ms: Optional[float] = None  # submit -> done
    n_tokens: int = 0  # speech tokens drawn
    n_text_tokens: int = 0  # text tokens of the prompt
    n_samples: int = 0  # audio samples emitted (24 kHz)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_END = object()


class Request:
    """One submitted synthesis. Created by ``Engine.submit``; not constructed by users."""

    def __init__(self, rid: int, text: str, *, stream: bool, engine):
        self.id = rid
        self.text = text
        self.stream = stream
        self.metrics = RequestMetrics()
        self.tokens: Optional[Tensor] = None  # the speech tokens, once T3 is done
        self._engine = engine
        self._status = QUEUED
        self._error: Optional[BaseException] = None
        self._chunks: "queue.Queue[Any]" = queue.Queue()
        self._audio: List[Tensor] = []
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._cancel_requested = False
        self.t_submit = time.perf_counter()
        self.t_admit: Optional[float] = None
        # A segment of a long text: its audio and end go to the LongRequest (engine.longtext).
        self.parent = None
        self.index = 0

    def __repr__(self) -> str:
        return f"Request(id={self.id}, status={self._status!r}, tokens={self.metrics.n_tokens})"

    # ------------------------------------------------------------------ user side

    @property
    def status(self) -> str:
        """"queued" | "running" | "done" | "cancelled" | "failed"."""
        return self._status

    @property
    def error(self) -> Optional[BaseException]:
        return self._error

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Ask the engine to drop this request; its rows are freed before the next step. Returns
        False if it had already finished."""
        with self._lock:
            if self._status in FINAL_STATUSES:
                return False
            self._cancel_requested = True
        self._engine._wake()
        return True

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def result(self, timeout: Optional[float] = None) -> Tensor:
        """The whole waveform ``[1, N]`` (CPU float32, 24 kHz); blocks until done. A streamed
        request returns its chunks joined."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s (status {self._status})")
        self._raise_if_unsuccessful()
        if not self._audio:
            return torch.zeros(1, 0)
        return torch.cat(self._audio)[None]

    def chunks(self, timeout: Optional[float] = None) -> Iterator[Tensor]:
        """Audio chunks ``[n_i]`` (CPU float32) as they are produced: one when ``stream=False``.
        Ends when the request is done; raises if it failed or was cancelled. One consumer."""
        while True:
            try:
                item = self._chunks.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no audio from request {self.id} for {timeout} s") from None
            if item is _END:
                self._chunks.put(_END)  # a second iterator ends too
                self._raise_if_unsuccessful()
                return
            yield item

    async def aresult(self) -> Tensor:
        """``result()`` for asyncio: awaits without blocking the event loop or holding a thread
        (the request is polled, every 2 ms at first, backing off to every 20 ms)."""
        wait = ASYNC_POLL_S[0]
        while not self._done.is_set():
            await asyncio.sleep(wait)
            wait = min(wait * 2, ASYNC_POLL_S[1])
        return self.result(0)

    async def achunks(self):
        """``chunks()`` for asyncio: ``async for chunk in req.achunks()``. Polls the chunk queue like
        ``aresult``, so any number of waiting streams hold no threads."""
        wait = ASYNC_POLL_S[0]
        while True:
            try:
                item = self._chunks.get_nowait()
            except queue.Empty:
                await asyncio.sleep(wait)
                wait = min(wait * 2, ASYNC_POLL_S[1])
                continue
            wait = ASYNC_POLL_S[0]
            if item is _END:
                self._chunks.put(_END)
                self._raise_if_unsuccessful()
                return
            yield item

    def _raise_if_unsuccessful(self) -> None:
        if self._status == CANCELLED:
            raise RequestCancelled(f"request {self.id} was cancelled")
        if self._status == FAILED:
            raise RequestFailed(f"request {self.id} failed: {self._error}") from self._error

    # ------------------------------------------------------------------ engine side

    def _ms(self, since: Optional[float] = None) -> float:
        return (time.perf_counter() - (self.t_submit if since is None else since)) * 1e3

    def _set_running(self) -> None:
        with self._lock:
            if self._status == QUEUED:
                self._status = RUNNING
        self.t_admit = time.perf_counter()
        self.metrics.queue_ms = self._ms()
        if self.parent is not None:
            self.parent._child_running(self)

    def _emit(self, chunk: Tensor) -> None:
        if self._status in FINAL_STATUSES or chunk.numel() == 0:
            return
        if self.metrics.first_audio_ms is None:
            self.metrics.first_audio_ms = self._ms()
        chunk = chunk.reshape(-1)
        self.metrics.n_samples += int(chunk.numel())
        if self.parent is not None:
            self.parent._child_chunk(self, chunk)
            return
        self._audio.append(chunk)
        self._chunks.put(chunk)

    def _finish(self, status: str, error: Optional[BaseException] = None) -> bool:
        """Move to a final status once; later calls are ignored. Returns whether this call did it."""
        with self._lock:
            if self._status in FINAL_STATUSES:
                return False
            self._status = status
            self._error = error
        if status != DONE:
            self._audio.clear()
        self.metrics.total_ms = self._ms()
        self._chunks.put(_END)
        self._done.set()
        if self.parent is not None:
            self.parent._child_end(self, status, error)
        return True
