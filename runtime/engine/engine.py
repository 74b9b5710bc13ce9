"""``chatterbox_rt.Engine``: many requests at once over one loaded ``TTS``.

Threads and what they own::

    submit() (caller's thread)  validate everything, build the T3 request state -> queue
    T3 loop (one thread)        admit into KV slots, prefill, batched decode steps, per-row
                                sampling, stream cuts; a finished or cancelled request frees its
                                rows before the next step
    S3Gen loop (one thread)     whole utterances batched by length bucket (flow + HiFT), stream
                                chunks (S3GenStream), on its own CUDA stream on a GPU
    post pool (two threads)     host copy, last-token trim, watermark, hand-off to the request

On a GPU the T3 loop and the S3Gen loop run on separate CUDA streams, so one request's decode
overlaps another's S3Gen. On a CPU the two loops still interleave: decode steps go on while
S3Gen works on finished requests (torch releases the GIL inside ops).

A request's tokens never depend on what else runs (``t3_runner``'s invariant mode, the default
for fp32 on a CPU; see there for the GPU), and a request alone in the engine gives exactly
``TTS.generate``'s waveform for the same arguments and seed.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from contextlib import nullcontext, suppress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..models.s3gen.s3gen import S3GEN_SIL
from ..models.t3.config import SPEECH_CODEBOOK_SIZE
from ..models.t3.request import T3Request
from ..profiling import nvtx
from .longtext import LongRequest, OutputChain
from .request import CANCELLED, DONE, FAILED, Request
from .cfm_graphs import CFMGraphs
from .s3gen_runner import S3GenWorkspace, Utterance, decode_batch, group_utterances
from .stream import S3GenStream, can_stream, stream_ops
from .t3_runner import T3Runner

log = logging.getLogger(__name__)

# Speech tokens per streamed chunk, and in the first (smaller, for a quick first audio).
DEFAULT_CHUNK_TOKENS = 25
DEFAULT_FIRST_CHUNK_TOKENS = 20
# Text tokens a request may bring when max_len is not given (sizing the KV slots).
DEFAULT_TEXT_BUDGET = 512
SAMPLES_PER_TOKEN = 960  # 24 kHz samples per 25 Hz speech token
ENGINE_ARGS = ("exaggeration", "max_new_tokens", "n_steps", "stop_on_eos", "watermark")
# Requests admitted per scheduler iteration (each prefill delays the running rows' next step).
MAX_ADMIT_PER_STEP = 4
# Seeds drawn for requests submitted without one.
_SEED_RANGE = 2**31 - 1


class EngineClosed(RuntimeError):
    """``submit`` on an engine that is closing or closed."""


@dataclass
class _Job:
    """The engine's record of one request."""

    request: Request
    t3req: T3Request
    voice: object
    generator: torch.Generator
    n_steps: Optional[int]
    watermark: bool
    stream: bool
    chunk_tokens: int
    first_chunk_tokens: int
    slot: Optional[int] = None
    next_cut: int = 0
    stream_state: object = None
    post: Optional[str] = None
    out_chain: object = None  # the streamed output's post-processing and watermark (longtext.OutputChain)
    stream_sent: int = 0  # samples handed to the watermarker / request so far
    held: list = field(default_factory=list)


class Engine:
    """Continuous batching, streaming and overlap for one ``TTS``.

    ``max_batch``: requests decoding at once (KV slots: ``max_batch`` x rows per request, two for
    CFG variants). ``max_len``: cache entries per slot (prompt + text + speech tokens; default:
    the variant's default ``max_new_tokens`` with a voice prompt and ``DEFAULT_TEXT_BUDGET`` text
    tokens). ``memory_budget`` (bytes) instead sizes ``max_len`` to fit the KV cache in it.
    ``cuda_graphs``: decode steps and the CFM loop as CUDA graphs (default: on for CUDA). ``mode``: the decode
    mode (``t3_runner``), default invariant for fp32 on a CPU, dense otherwise. ``s3gen_batch``:
    requests per flow / HiFT call; the flow's input buffers (speech tokens and CFM noise) for that
    many of the longest utterance the KV slots hold are allocated here too (``stats()`` reports
    ``kv_cache_bytes`` and ``s3gen_buffer_bytes``).
    """

    def __init__(self, tts, *, max_batch: int = 16, max_len: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, memory_budget: Optional[int] = None,
                 mode: Optional[str] = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 first_chunk_tokens: int = DEFAULT_FIRST_CHUNK_TOKENS, s3gen_batch: int = 16):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.tts = tts
        t3 = tts.t3
        cfg = t3.config
        self.rows_per_request = 2 if cfg.uses_cfg else 1
        self.max_batch = max_batch
        rows = max_batch * self.rows_per_request
        b = cfg.backbone
        per_entry = b.num_layers * 2 * b.num_heads * b.head_dim * torch.finfo(t3.kv_dtype).bits // 8
        if max_len is None:
            if memory_budget is not None:
                max_len = int(memory_budget) // (rows * per_entry)
                if max_len < 64:
                    raise ValueError(f"memory_budget={memory_budget} leaves {max_len} cache entries per slot "
                                     f"for max_batch={max_batch}: lower max_batch or raise the budget")
            else:
                max_len = self._default_max_len()
        elif memory_budget is not None:
            raise ValueError("give max_len or memory_budget, not both")
        if not isinstance(max_len, int) or max_len < 16:
            raise ValueError(f"max_len must be an integer >= 16, got {max_len!r}")
        self.chunk_tokens = _check_chunk(chunk_tokens, "chunk_tokens")
        self.first_chunk_tokens = _check_chunk(first_chunk_tokens, "first_chunk_tokens")
        self.s3gen_batch = int(s3gen_batch)
        self.device = tts.device
        make_runner = getattr(t3, "make_engine_runner", None)  # another backend's T3 (onnxruntime)
        if make_runner is not None:
            self._runner = make_runner(rows, max_len, mode=mode, cuda_graphs=cuda_graphs)
        else:
            self._runner = T3Runner(t3, rows, max_len, mode=mode, cuda_graphs=cuda_graphs)
        self.max_len = self._runner.max_len
        # The batched flow call's input buffers, for the longest request the KV slots can hold
        # (its speech tokens plus Turbo/Nano's three silence tokens).
        self._s3_work = S3GenWorkspace(tts.s3gen, self.s3gen_batch, self.max_len + 3)
        # The CFM loop as CUDA graphs per (batch, length bucket) on a GPU (torch backend only).
        decoder = getattr(getattr(tts.s3gen, "flow", None), "decoder", None)
        self._cfm = CFMGraphs(decoder, enabled=cuda_graphs) if decoder is not None and \
            tts.device.type == "cuda" and cuda_graphs is not False else None
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._live: dict[int, _Job] = {}  # every request not yet done, by id
        self._running: list[_Job] = []
        self._s3q: "queue.Queue" = queue.Queue()
        self._closing = False
        self._closed = False
        self._finished_now: Optional[list] = None  # requests done during the current decode step
        self._counts = dict(submitted=0, completed=0, failed=0, cancelled=0)
        self._tok_window: deque = deque(maxlen=64)  # (time, tokens) per step, for tokens/s
        self._decode_tokens, self._decode_s = 0, 0.0  # tokens drawn by decode steps, time inside them
        self._post = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chatterbox-rt-post")
        cuda = self.device.type == "cuda"
        self._t3_stream = torch.cuda.Stream(self.device) if cuda else None
        self._s3_stream = torch.cuda.Stream(self.device) if cuda else None
        self._t3_thread = threading.Thread(target=self._t3_loop, name="chatterbox-rt-t3", daemon=True)
        self._s3_thread = threading.Thread(target=self._s3gen_loop, name="chatterbox-rt-s3gen", daemon=True)
        self._t3_thread.start()
        self._s3_thread.start()

    def __repr__(self) -> str:
        return (f"Engine({self.tts.variant}, max_batch={self.max_batch}, max_len={self.max_len}, "
                f"mode={self._runner.mode}, device={self.device})")

    def _default_max_len(self) -> int:
        t3 = self.tts.t3
        cfg = t3.config
        n_new = cfg.sampling.max_new_tokens
        voice = self.tts.builtin_voice
        cond = t3.cond_len(voice.t3) if voice is not None else 1 + cfg.speech_cond_prompt_len + 1
        n = cond + 2 + DEFAULT_TEXT_BUDGET + n_new
        return n if cfg.learned_pos_emb else min(n, cfg.backbone.n_positions)

    # ------------------------------------------------------------------ public API

    @property
    def mode(self) -> str:
        return self._runner.mode

    def submit(self, text: str, voice=None, *, seed: Optional[int] = None, language_id: Optional[str] = None,
               stream: bool = False, chunk_tokens: Optional[int] = None, first_chunk_tokens: Optional[int] = None,
               post: Optional[str] = None, split: Optional[bool] = None, **kw) -> Request:
        """Queue one synthesis and return its ``Request`` at once. ``kw``: what ``TTS.generate``
        takes (sampling arguments, ``exaggeration``, ``max_new_tokens``, ``n_steps``,
        ``stop_on_eos``, ``watermark``). Bad input raises here, as ``TTS.generate`` would, and
        nothing is queued.

        Long text: a text longer than one segment (``chatterbox_rt.longtext``; ``split``: None
        splits only when needed, True always at sentence ends, False never) runs as one request per
        segment, queued together so they batch, each with its own seed derived from ``seed``; the
        returned ``LongRequest`` gives their audio joined in order (streamed in order with
        ``stream=True``). ``max_new_tokens`` bounds each segment. ``post="clean"``: post-processing
        (``chatterbox_rt.post``) of the output, before the watermark."""
        from ..longtext import segment_seed
        from ..post import check_post
        from ..tts import SAMPLING_ARGS, check_n_steps

        if self._closing:
            raise EngineClosed("this engine is closed")
        unknown = sorted(set(kw) - set(SAMPLING_ARGS) - set(ENGINE_ARGS))
        if unknown:
            raise TypeError(f"unknown argument(s) {unknown}; expected some of "
                            f"{list(SAMPLING_ARGS) + list(ENGINE_ARGS) + ['post', 'split']}")
        if stream and not can_stream(self.tts.s3gen):
            stream_ops(self.tts.s3gen)  # raises, saying why (an old bundle without the streaming graphs)
        post = check_post(post)
        tts = self.tts
        v = tts._voice(voice)
        if kw.get("exaggeration") is not None:
            v = v.with_exaggeration(kw["exaggeration"])
        n_steps = check_n_steps(kw.get("n_steps"))
        if seed is None:
            seed = int(torch.randint(0, _SEED_RANGE, (1,)).item())
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        chunk = _check_chunk(self.chunk_tokens if chunk_tokens is None else chunk_tokens, "chunk_tokens")
        first = _check_chunk(self.first_chunk_tokens if first_chunk_tokens is None else first_chunk_tokens,
                             "first_chunk_tokens")
        watermark = bool(kw.get("watermark", True))
        segments = tts.segments(text, v, language_id=language_id, max_new_tokens=kw.get("max_new_tokens"),
                                split=split)
        if len(segments) == 1:
            job = self._job(segments[0], v, seed, language_id, kw, n_steps, stream, chunk, first, watermark, post)
            self._enqueue([job])
            return job.request
        parent = LongRequest(next(self._ids), text, segments, stream=bool(stream), engine=self, sr=tts.sr,
                             post=post, watermark=watermark)
        # Only the first segment streams (quick first audio); the rest decode whole, in batches.
        jobs = [self._job(seg, v, segment_seed(seed, i), language_id, kw, n_steps, bool(stream) and i == 0,
                          chunk, first, False, None)
                for i, seg in enumerate(segments)]
        for i, job in enumerate(jobs):
            job.request.parent, job.request.index = parent, i
            parent.children.append(job.request)
        self._enqueue(jobs)
        return parent

    def _job(self, text: str, v, seed: int, language_id, kw: dict, n_steps, stream: bool, chunk: int, first: int,
             watermark: bool, post: Optional[str]) -> _Job:
        """One T3 request's engine record (validated; not queued)."""
        from ..tts import SAMPLING_ARGS, make_generator

        tts = self.tts
        sampling = {k: kw[k] for k in SAMPLING_ARGS if k in kw}
        ids = tts.text_tokens(text, language_id)
        generator = make_generator(seed, self.device)
        t3req = T3Request(tts.t3, v.t3, ids, max_new_tokens=kw.get("max_new_tokens"), generator=generator,
                          stop_on_eos=bool(kw.get("stop_on_eos", True)), **sampling)
        if t3req.cache_len > self.max_len:
            raise ValueError(f"this request needs {t3req.cache_len} KV-cache entries (prompt {t3req.P} + up to "
                             f"{t3req.n_max} speech tokens) and this engine's slots hold {self.max_len}: "
                             "lower max_new_tokens, split the text, or build the Engine with a larger max_len")
        req = Request(next(self._ids), text, stream=bool(stream), engine=self)
        req.metrics.n_text_tokens = int(ids.numel())
        return _Job(req, t3req, v, generator, n_steps, watermark, bool(stream), chunk, first, next_cut=first,
                    post=post)

    def _enqueue(self, jobs: list) -> None:
        with self._cv:
            if self._closing:
                raise EngineClosed("this engine is closed")
            for job in jobs:
                self._queue.append(job)
                self._live[job.request.id] = job
                self._counts["submitted"] += 1
            self._cv.notify_all()

    def generate_batch(self, texts: Sequence[str], voices=None, **kw) -> list[Tensor]:
        """Synthesise every text (batched) -> one waveform ``[1, N]`` each, in order. ``voices``:
        None (the built-in voice), one voice for all, or one per text. A request that fails
        raises its error here after the others are done."""
        texts = list(texts)
        if voices is None or not isinstance(voices, (list, tuple)):
            voices = [voices] * len(texts)
        if len(voices) != len(texts):
            raise ValueError(f"{len(voices)} voices for {len(texts)} texts")
        reqs = []
        try:
            for text, voice in zip(texts, voices, strict=True):
                reqs.append(self.submit(text, voice, **kw))
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        return [r.result() for r in reqs]

    def stats(self) -> dict:
        """Queued and running requests, KV slots in use, ``tokens_per_s`` (T3 tokens per second over
        the last 64 steps, prefills included), ``decode_tokens``/``decode_s`` (tokens drawn by
        decode steps and the time spent in them since start: their ratio is the aggregate decode
        rate), request totals."""
        with self._cv:
            window = list(self._tok_window)
            out = dict(queued=len(self._queue), running=len(self._running),
                       slots_in_use=self._runner.slots_in_use if self._runner.cache is not None else 0,
                       slots_total=self._runner.max_rows, max_len=self.max_len, mode=self._runner.mode,
                       group_rows=self._runner.group_rows, decode_tokens=self._decode_tokens,
                       decode_s=self._decode_s, kv_cache_bytes=self._runner_cache_bytes(),
                       s3gen_buffer_bytes=self._s3_work.nbytes, **self._counts)
        if len(window) >= 2:
            dt = window[-1][0] - window[0][0]
            out["tokens_per_s"] = sum(n for _, n in window[1:]) / dt if dt > 0 else 0.0
        else:
            out["tokens_per_s"] = 0.0
        return out

    def _runner_cache_bytes(self) -> int:
        cache = getattr(self._runner, "cache", None)
        return int(getattr(cache, "nbytes", 0) or 0) if cache is not None else 0

    def close(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; ``wait=True`` finishes those already submitted, ``wait=False``
        cancels them. Then stops the threads and frees the KV cache. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closing = True
            live = list(self._live.values())
        if not wait:  # every request not yet done, wherever it is (queue, T3, S3Gen)
            for job in live:
                job.request.cancel()
        with self._cv:
            self._cv.notify_all()
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._cv:
                while self._queue or self._running:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cv.wait(0.05 if left is None else min(left, 0.05))
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._t3_thread.join(timeout)
        self._s3q.put(None)
        self._s3_thread.join(timeout)
        self._post.shutdown(wait=True)
        self._runner.free()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait=exc_type is None)

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        with suppress(Exception):
            if not self._closed:
                self.close(wait=False, timeout=1.0)

    # ------------------------------------------------------------------ scheduler (T3 thread)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _t3_loop(self) -> None:
        ctx = torch.cuda.stream(self._t3_stream) if self._t3_stream is not None else nullcontext()
        with ctx, torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._queue or self._running or self._closed):
                        self._cv.wait()
                    if self._closed and not self._running and not self._queue:
                        return
                try:
                    self._reap_cancelled()
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a bug here must not hang every request
                    log.exception("engine T3 loop error; failing the running requests")
                    with self._cv:
                        jobs = list(self._running)
                    for j in jobs:
                        self._fail_running(j, e)

    def _reap_cancelled(self) -> None:
        with self._cv:
            gone = [j for j in self._running if j.request.cancel_requested]
            queued = [j for j in self._queue if j.request.cancel_requested]
            for j in gone:
                self._running.remove(j)
                self._runner.release(j.slot, j.t3req.rows)
            for j in queued:
                self._queue.remove(j)
        for j in gone + queued:
            self._end(j, CANCELLED)

    def _admit(self) -> None:
        for _ in range(MAX_ADMIT_PER_STEP):
            with self._cv:
                if not self._queue:
                    return
                job = self._queue[0]
                slot = self._runner.allocate(job.t3req.rows)
                if slot is None:
                    return  # waits for a request to finish (FIFO: the head keeps its turn)
                self._queue.popleft()
                job.slot = slot
                self._running.append(job)
            job.request._set_running()
            if self._t3_stream is not None:  # the voice and cache were written on the caller's stream
                self._t3_stream.wait_stream(torch.cuda.default_stream(self.device))
            try:
                t0 = time.perf_counter()
                logits = self._runner.prefill(job.t3req, slot)
                job.t3req.sample(logits)
                job.request.metrics.prefill_ms = (time.perf_counter() - t0) * 1e3
            except Exception as e:  # noqa: BLE001 - one request's failure is that request's
                self._fail_running(job, e)
                continue
            self._after_draw(job)

    def _step(self) -> None:
        t_step = time.perf_counter()
        with self._cv:
            jobs = list(self._running)
        items = [(j.t3req, j.slot) for j in jobs]
        with nvtx.range("engine_step"):
            try:
                logits = self._runner.decode(items)
            except Exception as e:  # noqa: BLE001
                # Whose fault? Retry each request alone (same result in the invariant mode); the
                # ones that still fail fail alone.
                log.warning("batched decode step failed (%s: %s); retrying request by request", type(e).__name__, e)
                logits = []
                for item in items:
                    try:
                        logits.append(self._runner.decode([item])[0])
                    except Exception as e1:  # noqa: BLE001
                        logits.append(e1)
            n = 0
            self._finished_now = []
            for j, lg in zip(jobs, logits, strict=True):
                if isinstance(lg, BaseException):
                    self._fail_running(j, lg)
                    continue
                try:
                    j.t3req.sample(lg)
                except Exception as e:  # noqa: BLE001
                    self._fail_running(j, e)
                    continue
                n += 1
                self._after_draw(j)
            # Requests that finished on this step reach S3Gen together, so they can share a batch.
            done, self._finished_now = self._finished_now, None
            if done:
                self._s3q.put(("whole", done))
        now = time.perf_counter()
        with self._cv:
            self._tok_window.append((now, n))
            self._decode_tokens += n
            self._decode_s += now - t_step

    def _after_draw(self, job: _Job) -> None:
        """Bookkeeping after a request drew a token: stream cuts, T3 completion."""
        r = job.t3req
        job.request.metrics.n_tokens = r.step
        if r.finished:
            self._t3_done(job)
        elif job.stream and r.step >= job.next_cut:
            job.next_cut = r.step + job.chunk_tokens
            try:
                tokens = r.stream_tokens().cpu()  # host copy: a finished hand-off between CUDA streams
            except Exception as e:  # noqa: BLE001
                self._fail_running(job, e)
                return
            self._s3q.put(("stream", job, tokens, False))

    def _t3_done(self, job: _Job) -> None:
        with self._cv:
            if job in self._running:
                self._running.remove(job)
                self._runner.release(job.slot, job.t3req.rows)
            self._cv.notify_all()
        req = job.request
        if req.t_admit is not None:
            req.metrics.t3_ms = (time.perf_counter() - req.t_admit) * 1e3
        try:
            r = job.t3req
            tokens = r.stream_tokens() if job.stream else r.tokens()
            tokens = tokens[tokens < SPEECH_CODEBOOK_SIZE].cpu()
        except Exception as e:  # noqa: BLE001
            self._end(job, FAILED, e)
            return
        req.tokens = tokens
        if job.stream:
            self._s3q.put(("stream", job, tokens, True))
        elif self._finished_now is not None:
            self._finished_now.append(job)
        else:
            self._s3q.put(("whole", [job]))

    def _fail_running(self, job: _Job, error: BaseException) -> None:
        log.warning("request %d failed: %s: %s", job.request.id, type(error).__name__, error)
        with self._cv:
            if job in self._running:
                self._running.remove(job)
                self._runner.release(job.slot, job.t3req.rows)
        self._end(job, FAILED, error)

    def _end(self, job: _Job, status: str, error: Optional[BaseException] = None) -> None:
        if job.request._finish(status, error):
            with self._cv:
                self._live.pop(job.request.id, None)
                key = {DONE: "completed", FAILED: "failed", CANCELLED: "cancelled"}[status]
                self._counts[key] += 1
                self._cv.notify_all()

    # ------------------------------------------------------------------ S3Gen thread

    def _s3gen_loop(self) -> None:
        ctx = torch.cuda.stream(self._s3_stream) if self._s3_stream is not None else nullcontext()
        with ctx, torch.inference_mode():
            while True:
                item = self._s3q.get()
                if item is None:
                    return
                batch = [item]
                while True:  # take what else is ready: whole utterances batch together
                    try:
                        nxt = self._s3q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._s3q.put(None)
                        break
                    batch.append(nxt)
                if self._s3_stream is not None:  # voices were written on the callers' stream
                    self._s3_stream.wait_stream(torch.cuda.default_stream(self.device))
                wholes = [job for it in batch if it[0] == "whole" for job in it[1]]
                try:
                    for it in batch:
                        if it[0] == "stream":
                            self._stream_chunk(*it[1:])
                    if wholes:
                        self._whole(wholes)
                except Exception as e:  # noqa: BLE001 - a bug here must not hang these requests
                    log.exception("engine S3Gen loop error; failing this batch's requests")
                    for j in wholes + [it[1] for it in batch if it[0] == "stream"]:
                        self._end(j, FAILED, e)

    def _utterance(self, job: _Job, tokens: Tensor) -> Utterance:
        if self.tts.variant in ("turbo", "nano"):  # the reference appends three silence tokens
            tokens = torch.cat([tokens, tokens.new_full((3,), S3GEN_SIL)])
        return Utterance(tokens, job.voice.gen, job.generator, job.n_steps)

    def _whole(self, jobs) -> None:
        live = []
        for job in jobs:
            if job.request.cancel_requested:
                self._end(job, CANCELLED)
            elif job.request.tokens.numel() == 0:
                log.warning("T3 produced no speech tokens for %r; returning empty audio", job.request.text[:40])
                self._end(job, DONE)
            else:
                live.append(job)
        if not live:
            return
        utts = [self._utterance(j, j.request.tokens) for j in live]
        for idx in group_utterances(self.tts.s3gen, utts, self.s3gen_batch):
            group = [live[i] for i in idx]
            t0 = time.perf_counter()
            try:
                wavs = decode_batch(self.tts.s3gen, [utts[i] for i in idx], cfm=self._cfm,
                                    workspace=self._s3_work)
                outs = list(zip(group, wavs, strict=True))
            except Exception as e:  # noqa: BLE001
                if len(group) == 1:
                    self._end(group[0], FAILED, e)
                    continue
                outs = []
                for j, i in zip(group, idx, strict=True):  # isolate the failing request(s)
                    try:
                        outs.append((j, decode_batch(self.tts.s3gen, [utts[i]], cfm=self._cfm,
                                                              workspace=self._s3_work)[0]))
                    except Exception as e1:  # noqa: BLE001
                        self._end(j, FAILED, e1)
            ready = None
            if self._s3_stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._s3_stream)
            dt = (time.perf_counter() - t0) * 1e3 / max(1, len(group))
            for j, wav in outs:
                j.request.metrics.s3gen_ms = dt
                self._post.submit(self._post_whole, j, wav, ready)

    def _keep_samples(self, job: _Job, n_samples: int) -> int:
        """Samples of a whole output kept: upstream's multilingual drops the last token's audio."""
        if self.tts.t3.config.drop_last_token_audio:
            n_tok = job.request.tokens.numel()
            return min(n_samples, max(1, n_tok - 1) * SAMPLES_PER_TOKEN)
        return n_samples

    def _post_whole(self, job: _Job, wav: Tensor, ready=None) -> None:
        try:
            wav = wav[: self._keep_samples(job, wav.shape[-1])]
            with nvtx.range("to_host", "io"):
                wav = _to_host(wav, ready)
            with nvtx.range("post_watermark"):
                chain = OutputChain(self.tts.sr, job.post, job.watermark, stream=False)
                chain.push(wav)
                wav = chain.flush()
            job.request._emit(wav)
            self._end(job, DONE)
        except Exception as e:  # noqa: BLE001
            self._end(job, FAILED, e)

    def _stream_chunk(self, job: _Job, tokens: Tensor, final: bool) -> None:
        req = job.request
        if req.status in (CANCELLED, FAILED) or req.done():
            return
        if req.cancel_requested:
            self._end(job, CANCELLED)
            return
        t0 = time.perf_counter()
        try:
            if job.stream_state is None:
                # The stream's noise comes from its own generator (derived from the request's
                # seed): T3 is still drawing from the request's generator meanwhile.
                g = torch.Generator(device=self.device).manual_seed(
                    (job.generator.initial_seed() ^ _STREAM_SEED_MIX) % _SEED_RANGE)
                job.stream_state = S3GenStream(self.tts.s3gen, job.voice.gen, n_steps=job.n_steps, generator=g,
                                               max_tokens=job.t3req.n_max + 3)
            if final and self.tts.variant in ("turbo", "nano"):
                tokens = torch.cat([tokens, tokens.new_full((3,), S3GEN_SIL)])
            if tokens.numel() == 0:
                chunk = torch.zeros(0)
            else:
                chunk = job.stream_state.push(tokens, final=final)
            req.metrics.s3gen_ms = (req.metrics.s3gen_ms or 0.0) + (time.perf_counter() - t0) * 1e3
            self._stream_out(job, _to_host(chunk), final)
        except Exception as e:  # noqa: BLE001
            self._end(job, FAILED, e)

    def _stream_out(self, job: _Job, chunk: Tensor, final: bool) -> None:
        """Hold back one token's audio while upstream's last-token trim may still apply; watermark
        incrementally; emit."""
        req = job.request
        if self.tts.t3.config.drop_last_token_audio:
            job.held.append(chunk)
            pending = torch.cat(job.held) if job.held else torch.zeros(0)
            if final:
                keep = max(1, (req.tokens.numel() if req.tokens is not None else 1) - 1) * SAMPLES_PER_TOKEN
                pending = pending[: max(0, keep - job.stream_sent)]
                job.held = []
                chunk = pending
            else:
                n_out = max(0, pending.numel() - SAMPLES_PER_TOKEN)
                chunk, job.held = pending[:n_out], [pending[n_out:]]
        job.stream_sent += chunk.numel()
        if job.watermark or job.post is not None:
            if job.out_chain is None:
                job.out_chain = OutputChain(self.tts.sr, job.post, job.watermark, stream=True)
            chunk = job.out_chain.push(chunk)
            if final:
                chunk = torch.cat([chunk, job.out_chain.flush()])
        req._emit(chunk)
        if final:
            self._end(job, DONE)


# The stream's S3Gen noise generator: seeded from the request's seed mixed with this constant.
_STREAM_SEED_MIX = 0x5DEECE66D


def _to_host(wav: Tensor, ready: Optional["torch.cuda.Event"] = None) -> Tensor:
    """Device waveform -> CPU float32, through pinned memory on a GPU. ``ready``: an event recorded
    on the stream that produced ``wav`` (the copy waits for it, not for the whole device)."""
    wav = wav.detach()
    if wav.device.type == "cuda":
        if ready is not None:
            torch.cuda.current_stream(wav.device).wait_event(ready)
        buf = torch.empty(wav.shape, dtype=torch.float32, pin_memory=True)
        buf.copy_(wav.float(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(wav.device))
        done.synchronize()  # this thread waits; the engine's loops do not
        return buf
    return wav.float()


def _check_chunk(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


__all__ = ["Engine", "EngineClosed", "DEFAULT_CHUNK_TOKENS", "DEFAULT_FIRST_CHUNK_TOKENS"]
