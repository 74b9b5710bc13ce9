"""The OpenAI-compatible HTTP app over one ``Engine``: a thin adapter, no model logic.

Routes (OpenAI's audio API where it has one; its request fields and error shape):

* ``POST /v1/audio/speech``: ``model``, ``input`` (at most ``MAX_INPUT_CHARS``, 100 000 characters,
  more than OpenAI's 4096: a long text runs as a batch of segments, ``chatterbox_rt.longtext``), ``voice`` (a library
  voice id, ``default`` for the checkpoint's built-in voice, one of OpenAI's stock names, which map
  to the built-in voice unless ``voice_aliases`` says otherwise, or ``{"id": ...}``),
  ``instructions`` (accepted and ignored: Chatterbox takes no style prompt), ``response_format``
  (mp3 | opus | aac | flac | wav | pcm), ``speed`` (0.25-4, a pitch-keeping time-stretch of the
  output), ``stream_format`` ("audio": the encoded bytes with chunked transfer as the engine makes
  them; "sse": ``speech.audio.delta`` events with base64 audio, then ``speech.audio.done`` with
  ``usage``). Chatterbox's own settings are optional extra fields: ``exaggeration``,
  ``cfg_weight``, ``temperature``, ``top_p``, ``min_p``, ``top_k``, ``repetition_penalty``,
  ``seed``, ``language``, ``max_new_tokens`` (per segment of a long text), ``post`` ("clean": DC removal,
  high-pass and a peak limiter before the watermark, ``chatterbox_rt.post``); and ``stream`` (default true; false waits for the whole utterance, which
  is decoded in one piece, and answers with its length). An unknown field is a 400 naming it.
* ``GET /v1/models``; ``GET/POST /v1/audio/voices``, ``DELETE /v1/audio/voices/{id}`` (the
  voice library: a multipart ``file`` clip and a ``name``); ``GET /health`` (alive), ``GET /ready``
  (warmed up and not draining); ``GET /metrics`` (Prometheus).
* ``POST /v1/audio/voice-conversion`` (ours; OpenAI has none): multipart ``file`` (source speech),
  the target as ``voice`` or ``target`` clips, ``VC.generate``'s controls, ``response_format``
  (default wav); the fields are in ``serve/vc_route.py``. One conversion runs at a time, beside the
  engine, and counts toward the in-flight limit.

Limits: at most ``max_batch + max_queue`` requests in flight (the rest: 429 with ``Retry-After``);
503 while warming up or draining; a body over ``max_body_bytes`` (uploads ``max_upload_bytes``)
is a 413; a request running past ``request_timeout`` is cancelled (504 if nothing was sent yet);
a client that disconnects cancels its request, which frees its KV slots before the engine's next
step. An optional bearer ``api_key`` is compared in constant time (``/health`` and ``/ready``
stay open). Every error leaves through one handler in OpenAI's shape ``{"error": {"message",
"type", "param", "code"}}``; a server error says only its id (the traceback goes to the log).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal, Mapping, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..voice import VOICE_FAMILY

log = logging.getLogger("chatterbox_rt.serve")

MAX_INPUT_CHARS = 100_000  # a chapter: it runs as a batch of segments (chatterbox_rt.longtext)
MAX_INSTRUCTIONS_CHARS = 4096  # OpenAI's limit; the field is accepted and ignored
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY = 1 << 20  # JSON bodies: 100 000 characters of text fit (JSON-escaped non-ASCII too)
DEFAULT_MAX_UPLOAD = 25 << 20  # a voice clip (a minute of 48 kHz float WAV is 11 MB)
DEFAULT_TIMEOUT_S = 600.0
RETRY_AFTER_S = 1
SAMPLE_RATE = 24000
# OpenAI's stock voice names: accepted, and the built-in voice unless ``voice_aliases`` maps them.
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
BUILTIN_VOICE = "default"
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
OPEN_ROUTES = ("/health", "/ready")
VC_ROUTE = "/v1/audio/voice-conversion"  # our own route (OpenAI has none): serve/vc_route.py
UPLOAD_ROUTES = ("/v1/audio/voices", VC_ROUTE)  # multipart audio: max_upload_bytes
# A streamed response's engine chunks are polled this often at most (s): cheap, and far below
# the audio's own chunk period.
POLL_S = (0.002, 0.02)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's ``CreateSpeechRequest`` plus Chatterbox's settings (optional)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: Union[str, VoiceRef]
    instructions: Optional[str] = Field(default=None, max_length=MAX_INSTRUCTIONS_CHARS)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # Chatterbox
    stream: bool = True
    exaggeration: Optional[float] = Field(default=None, ge=0.0, le=10.0)
    cfg_weight: Optional[float] = Field(default=None, ge=0.0)
    temperature: Optional[float] = Field(default=None, gt=0.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    language: Optional[str] = None
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    post: Optional[Literal["clean"]] = None


SAMPLING_FIELDS = ("cfg_weight", "temperature", "top_p", "min_p", "top_k", "repetition_penalty")


class ServerState:
    """What the routes share: the engine, the library, counters, readiness."""

    def __init__(self, engine, *, library=None, api_key: Optional[str] = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 request_timeout: float = DEFAULT_TIMEOUT_S, voice_aliases: Optional[Mapping[str, str]] = None,
                 model_name: Optional[str] = None, generate_defaults: Optional[Mapping[str, Any]] = None):
        self.engine, self.library = engine, library
        self.generate_defaults = dict(generate_defaults or {})
        self.tts = engine.tts
        self.api_key = api_key.encode() if api_key else None
        self.max_inflight = engine.max_batch + int(max_queue)
        self.request_timeout = float(request_timeout)
        self.voice_aliases = dict(voice_aliases or {})
        self.model_name = model_name or f"chatterbox-{self.tts.variant}"
        self.ready = threading.Event()
        self.draining = False
        self._lock = threading.Lock()
        self.inflight = 0
        self.warmup_error: Optional[BaseException] = None

    def try_acquire(self) -> bool:
        with self._lock:
            if self.inflight >= self.max_inflight:
                return False
            self.inflight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.inflight -= 1

    def warm_up(self) -> None:
        """One short request through the engine (the first step's one-time costs), then ready."""
        try:
            req = self.engine.submit("Ready.", max_new_tokens=8, watermark=False, seed=0)
            req.result()
            self.ready.set()
        except BaseException as e:  # noqa: BLE001 - reported by /ready and the log
            self.warmup_error = e
            log.exception("warm-up request failed; the server stays not ready")

    # ------------------------------------------------------------------ voices

    def voice(self, spec) -> Any:
        """A request's ``voice`` -> the Voice the engine takes (None: built-in)."""
        name = spec if isinstance(spec, str) else spec.id
        name = self.voice_aliases.get(name, name)
        if name in (BUILTIN_VOICE, *OPENAI_VOICES) and name not in self.voice_aliases:
            if self.tts.builtin_voice is None:
                raise APIError(400, f"voice {name!r} means the checkpoint's built-in voice, and this checkpoint has "
                                    "none: give a library voice id", param="voice", code="voice_not_found")
            return None
        from ..voices import VoiceError, check_name

        if self.library is None:
            raise APIError(400, f"unknown voice {name!r}: this server has no voice library; use "
                                f"{BUILTIN_VOICE!r}", param="voice", code="voice_not_found")
        try:
            check_name(name)  # a library name never reaches a path outside the library
        except (ValueError, VoiceError) as e:
            raise APIError(400, f"invalid voice id: {e}", param="voice", code="invalid_voice") from None
        if name not in self.library:
            raise APIError(400, f"unknown voice {name!r}; GET /v1/audio/voices lists them", param="voice",
                           code="voice_not_found")
        try:
            return self.library.get(name, device=self.tts.device, variant=self.tts.variant)
        except VoiceError as e:
            raise APIError(400, f"voice {name!r} cannot be used with this model: {e}", param="voice",
                           code="invalid_voice") from None


def _error_response(err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _field_of(loc) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


def create_app(engine, *, library=None, api_key: Optional[str] = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               request_timeout: float = DEFAULT_TIMEOUT_S, voice_aliases: Optional[Mapping[str, str]] = None,
               model_name: Optional[str] = None, warmup: bool = True, metrics_registry=None,
               close_engine: bool = False, generate_defaults: Optional[Mapping[str, Any]] = None):
    """The FastAPI app serving ``engine`` (an ``chatterbox_rt.Engine``).

    ``library``: a ``VoiceLibrary`` (or its directory) for ``voice`` ids and the voice routes;
    ``api_key``: require ``Authorization: Bearer KEY``; ``max_queue``: requests waiting beyond the
    engine's ``max_batch`` before 429; ``warmup``: run one short request at start-up before
    ``/ready`` says ready; ``metrics_registry``: a ``prometheus_client.CollectorRegistry`` (default:
    a new one per app); ``close_engine``: close the engine when the app shuts down (after the
    in-flight requests are done); ``generate_defaults``: ``Engine.submit`` keywords applied to every
    request unless it sets them (e.g. ``n_steps``, ``watermark``, or ``max_new_tokens`` for dummy
    weights, which rarely emit end-of-speech)."""
    from . import metrics as metrics_mod

    if library is not None and not hasattr(library, "get"):
        from ..voices import VoiceLibrary

        library = VoiceLibrary(library)
    state = ServerState(engine, library=library, api_key=api_key, max_queue=max_queue,
                        request_timeout=request_timeout, voice_aliases=voice_aliases, model_name=model_name,
                        generate_defaults=generate_defaults)
    metrics = metrics_mod.ServerMetrics(state, registry=metrics_registry)

    @asynccontextmanager
    async def lifespan(app):
        if warmup:
            threading.Thread(target=state.warm_up, name="chatterbox-rt-warmup", daemon=True).start()
        else:
            state.ready.set()
        yield
        state.draining = True
        if close_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="chatterbox-rt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.chatterbox = state
    app.state.metrics = metrics

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        field = _field_of(first.get("loc", ()))
        kind = first.get("type", "")
        if kind == "extra_forbidden":
            msg = f"unknown field {field!r}"
        elif kind in ("json_invalid", "model_attributes_type") or field is None:
            msg = "the request body must be a JSON object of the speech request's fields"
        else:
            msg = f"invalid {field!r}: {first.get('msg', 'invalid value')}"
        return _error_response(APIError(400, msg, param=field, code=kind or "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=typ))

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        rid = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", rid, request.method, request.url.path, exc_info=exc)
        return _error_response(APIError(500, f"internal server error (id {rid})", type="server_error",
                                        code="internal_error"))

    # ------------------------------------------------------------------ middleware: auth, size, metrics

    app.add_middleware(_Guard, state=state, metrics=metrics, max_body_bytes=max_body_bytes,
                       max_upload_bytes=max_upload_bytes)

    # ------------------------------------------------------------------ speech

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request):
        if state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="draining")
        if not state.ready.is_set():
            raise APIError(503, "the model is still warming up; retry shortly", type="server_error",
                           code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})
        from .encode import StreamEncoder, encode_whole, media_type
        from .speed import StreamingTimeStretch, time_stretch

        voice = state.voice(body.voice)
        kw = dict(state.generate_defaults)
        kw.update({k: getattr(body, k) for k in SAMPLING_FIELDS if getattr(body, k) is not None})
        for k in ("exaggeration", "max_new_tokens"):
            if getattr(body, k) is not None:
                kw[k] = getattr(body, k)
        stream = bool(body.stream) and state.tts.can_stream
        fmt, speed = body.response_format, float(body.speed)
        _check_writable(fmt)
        if not state.try_acquire():
            raise APIError(429, f"the server is busy ({state.max_inflight} requests in flight); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            encoder = StreamEncoder(fmt, SAMPLE_RATE) if stream else None
            req = engine.submit(body.input, voice, seed=body.seed, language_id=body.language, stream=stream,
                                post=body.post, **kw)
        except (ValueError, TypeError) as e:
            state.release()
            raise APIError(400, str(e), param=_param_of(str(e)), code="invalid_value") from None
        except BaseException:
            state.release()
            raise
        started = time.perf_counter()
        done = {"released": False}

        def finish(outcome: str) -> None:
            if done["released"]:
                return
            done["released"] = True
            if not req.done():
                req.cancel()
            state.release()
            metrics.observe_speech(req, outcome, fmt)

        if not stream:  # the whole utterance: wait, then answer with its length
            try:
                wav = await _await_result(req, state.request_timeout)
            except BaseException as e:
                finish(_outcome(req, e))
                raise
            finish("done")

            def encoded() -> bytes:  # off the event loop: seconds of audio take tens of ms to stretch and encode
                audio = wav.reshape(-1).numpy()
                if speed != 1.0:
                    audio = time_stretch(audio, speed, SAMPLE_RATE)
                return encode_whole(audio, fmt, SAMPLE_RATE)

            data = await asyncio.get_running_loop().run_in_executor(None, encoded)
            if body.stream_format == "sse":
                return StreamingResponse(_sse_whole(data, req), media_type="text/event-stream")
            return Response(data, media_type=media_type(fmt, SAMPLE_RATE))

        stretch = StreamingTimeStretch(speed, SAMPLE_RATE) if speed != 1.0 else None

        async def pieces():
            """Encoded bytes as the engine's chunks arrive; cancels the request when the client goes."""
            try:
                deadline = started + state.request_timeout
                async for chunk in _engine_chunks(req, deadline):
                    audio = chunk.numpy()
                    if stretch is not None:
                        audio = stretch.process(audio)
                    out = encoder.write(audio)
                    if out:
                        yield out
                tail = stretch.flush() if stretch is not None else None
                out = (encoder.write(tail) if tail is not None and tail.size else b"") + encoder.close()
                if out:
                    yield out
                finish("done")
            except BaseException as e:
                finish(_outcome(req, e))
                if not isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                    log.warning("streamed request %s ended early: %s", req.id, e)
                raise

        if body.stream_format == "sse":
            return StreamingResponse(_sse(pieces(), req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return StreamingResponse(_swallow_end(pieces()), media_type=encoder.media_type)

    # ------------------------------------------------------------------ voice conversion (our own route)

    vc_lock = threading.Lock()  # one conversion at a time: it runs beside the engine's batches
    vc_holder: dict = {}

    def vc_model():
        if "vc" not in vc_holder:
            from ..vc import VC

            builtin = state.tts.builtin_voice
            vc_holder["vc"] = VC(state.tts.s3gen, builtin.gen if builtin is not None else None,
                                 source=f"the server's {state.model_name}")
        return vc_holder["vc"]

    @app.post(VC_ROUTE)
    async def voice_conversion(request: Request):
        if state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="draining")
        if getattr(state.tts, "backend", "torch") != "torch":
            raise APIError(400, "voice conversion runs on the torch backend only; this server uses "
                                f"{state.tts.backend!r}", code="unsupported_backend")
        from .encode import encode_whole, media_type
        from .vc_route import FormError, parse_form

        form = await request.form()
        try:
            source, targets, voice_id, kw, fmt = parse_form(form)
        except FormError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        _check_writable(fmt)
        src_wav, src_sr = _read_clip(await source.read(), param="file")
        if targets:
            clips = [_read_clip(await t.read(), param="target") for t in targets]
            rates = {sr for _, sr in clips}
            if len(rates) > 1:  # VC.generate takes one target_sr for all clips
                from ..audio import resample

                clips = [(resample(w, sr, max(rates)), max(rates)) for w, sr in clips]
            target, target_sr = [w for w, _ in clips], clips[0][1]
        else:
            target = state.voice(voice_id) if voice_id else state.voice(BUILTIN_VOICE)
            target_sr = None
        if not state.try_acquire():
            raise APIError(429, f"the server is busy ({state.max_inflight} requests in flight); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

        def convert() -> bytes:
            with vc_lock:
                wav = vc_model().generate(src_wav, target, sr=src_sr, target_sr=target_sr, **kw)
            return encode_whole(wav.reshape(-1).numpy(), fmt, SAMPLE_RATE)

        try:
            fut = asyncio.get_running_loop().run_in_executor(None, convert)
            data = await asyncio.wait_for(fut, state.request_timeout)
        except asyncio.TimeoutError:
            raise APIError(504, f"the conversion took longer than {state.request_timeout:g} s", type="server_error",
                           code="timeout") from None
        except (ValueError, TypeError) as e:  # the controls' and the clips' checks, before any work
            from .vc_route import param_of

            raise APIError(400, str(e), param=param_of(str(e), kw), code="invalid_value") from None
        finally:
            state.release()
        return Response(data, media_type=media_type(fmt, SAMPLE_RATE))

    # ------------------------------------------------------------------ models, voices, health, metrics

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatterbox-rt"}]}

    @app.get("/v1/audio/voices")
    async def voices():
        out = []
        if state.tts.builtin_voice is not None:
            out.append({"id": BUILTIN_VOICE, "object": "voice", "name": "built-in voice of the checkpoint",
                        "aliases": [n for n in OPENAI_VOICES if n not in state.voice_aliases]})
        for alias, target in sorted(state.voice_aliases.items()):
            out.append({"id": alias, "object": "voice", "alias_of": target})
        if state.library is not None:
            for info in state.library.list():
                if info.broken:
                    continue
                out.append({"id": info.name, "object": "voice", "variant": info.variant,
                            "exaggeration": info.exaggeration, "duration_s": info.duration_s,
                            "created": info.created, "usable": VOICE_FAMILY.get(info.variant) == VOICE_FAMILY.get(state.tts.variant)})
        return {"object": "list", "data": out}

    @app.post("/v1/audio/voices")
    async def add_voice(request: Request):
        lib = _need_library(state)
        form = await request.form()
        name = form.get("name") or form.get("id")
        upload = form.get("file")
        if not isinstance(name, str) or not name:
            raise APIError(400, "give the voice's id as the form field 'name'", param="name", code="missing_field")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "give the clip as the multipart file field 'file'", param="file", code="missing_field")
        from ..voices import VoiceError, check_name

        try:
            check_name(name)
        except (ValueError, VoiceError) as e:
            raise APIError(400, f"invalid voice id: {e}", param="name", code="invalid_voice") from None
        if name in (BUILTIN_VOICE, *OPENAI_VOICES) or name in state.voice_aliases:
            raise APIError(400, f"{name!r} is a reserved voice name", param="name", code="invalid_voice")
        exaggeration = form.get("exaggeration")
        overwrite = str(form.get("overwrite", "false")).lower() in ("1", "true", "yes")
        data = await upload.read()
        if len(data) > max_upload_bytes:
            raise APIError(413, f"the clip is {len(data)} bytes, over the limit of {max_upload_bytes}",
                           param="file", code="request_too_large")
        wav, sr = _read_clip(data)
        try:
            exg = float(exaggeration) if exaggeration not in (None, "") else 0.5
        except ValueError:
            raise APIError(400, f"exaggeration must be a number, got {exaggeration!r}", param="exaggeration",
                           code="invalid_value") from None

        def add():
            return lib.add(name, wav, state.tts, exaggeration=exg, overwrite=overwrite, sr=sr)

        try:
            await asyncio.get_running_loop().run_in_executor(None, add)
        except VoiceError as e:
            status = 409 if "already exists" in str(e) else 400
            raise APIError(status, str(e), param="name", code="voice_exists" if status == 409 else "invalid_voice") \
                from None
        except ValueError as e:
            raise APIError(400, f"cannot prepare a voice from this clip: {e}", param="file",
                           code="invalid_audio") from None
        info = lib.info(name)
        return JSONResponse({"id": name, "object": "voice", "variant": info.variant, "duration_s": info.duration_s,
                             "exaggeration": info.exaggeration, "created": info.created}, status_code=201)

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        lib = _need_library(state)
        from ..voices import VoiceError, check_name

        try:
            check_name(voice_id)
        except (ValueError, VoiceError) as e:
            raise APIError(400, f"invalid voice id: {e}", param="voice_id", code="invalid_voice") from None
        if voice_id not in lib and not any(i.name == voice_id for i in lib.list()):
            raise APIError(404, f"no voice {voice_id!r}", type="not_found_error", param="voice_id",
                           code="voice_not_found")
        await asyncio.get_running_loop().run_in_executor(None, lib.remove, voice_id)
        return {"id": voice_id, "object": "voice", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.warmup_error is not None:
            return JSONResponse({"status": "failed", "error": "the warm-up request failed (see the server log)"},
                                status_code=503)
        if not state.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return {"status": "ready", "model": state.model_name}

    @app.get("/metrics")
    async def prometheus():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return app


# ---------------------------------------------------------------------------------------------- helpers


class _BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is over this route's limit of {limit} bytes", code="request_too_large")


class _Guard:
    """ASGI middleware: the API key, the body-size limits (declared length, and a chunked body
    counted as it is read) and the request metrics (status and time to the body's end)."""

    def __init__(self, app, *, state: ServerState, metrics, max_body_bytes: int, max_upload_bytes: int):
        self.app, self.state, self.metrics = app, state, metrics
        self.max_body, self.max_upload = int(max_body_bytes), int(max_upload_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        t0 = time.perf_counter()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            err = self._check(path, method, headers)
            if err is not None:
                await _send_error(sending, err)
                return
            if method in ("POST", "PUT", "PATCH"):
                # The body is read here, counted, and replayed to the app: a chunked body of no
                # declared length is refused with a 413 as soon as it passes the limit.
                limit = self.max_upload if path in UPLOAD_ROUTES and method == "POST" else self.max_body
                messages, n = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] != "http.request":
                        return  # the client went away before its body was complete
                    n += len(msg.get("body", b""))
                    if n > limit:
                        await _send_error(sending, _BodyTooLarge(limit))
                        return
                    messages.append(msg)
                    if not msg.get("more_body", False):
                        break
                replay = iter(messages)

                async def replaying():
                    msg = next(replay, None)
                    return msg if msg is not None else await receive()

                await self.app(scope, replaying, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unmatched" if status["code"] == 404 else path)
            self.metrics.observe_request(label, status["code"], time.perf_counter() - t0)

    def _check(self, path: str, method: str, headers: dict) -> Optional[APIError]:
        key = self.state.api_key
        if key is not None and path not in OPEN_ROUTES:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                type="authentication_error", code="invalid_api_key")
        limit = self.max_upload if path in UPLOAD_ROUTES and method == "POST" else self.max_body
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return APIError(413, f"request body of {int(length)} bytes is over this route's limit of {limit}",
                            code="request_too_large")
        return None


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _param_of(message: str) -> Optional[str]:
    for field in ("language", "exaggeration", "temperature", "top_p", "min_p", "top_k", "repetition_penalty",
                  "cfg_weight", "seed", "voice", "input", "max_new_tokens"):
        if field in message or field.replace("_", " ") in message:
            return "language" if field == "language" else field
    if "text" in message.lower():
        return "input"
    return None


def _need_library(state: ServerState):
    if state.library is None:
        raise APIError(404, "this server has no voice library (start it with --library DIR)",
                       type="not_found_error", code="no_library")
    return state.library


def _check_writable(fmt: str) -> None:
    """Before any work: a 400 if this server cannot write ``fmt`` (AAC needs PyAV)."""
    if fmt == "aac":
        try:
            import av  # noqa: F401
        except ImportError:
            raise APIError(400, "response_format 'aac' needs PyAV on the server (pip install av); choose "
                                "another format", param="response_format", code="unsupported_format") from None


def _read_clip(data: bytes, param: str = "file"):
    import io

    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's clip
        raise APIError(400, f"the clip is not audio soundfile can read (WAV, FLAC, Ogg, MP3): {e}", param=param,
                       code="invalid_audio") from None
    if wav.shape[0] == 0:
        raise APIError(400, "the clip holds no samples", param=param, code="invalid_audio")
    return wav.mean(axis=1), int(sr)


def _outcome(req, e: BaseException) -> str:
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "disconnected"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "failed"


async def _engine_chunks(req, deadline: float):
    """The request's chunks (``Request.achunks``: polled, no thread held per waiting stream) until
    ``deadline`` (``time.perf_counter()``). A client that goes away cancels the generator
    (Starlette's streaming response listens for the disconnect), and the caller cancels the request."""
    chunks = req.achunks()
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"request {req.id} ran past the server's timeout")
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), left)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise TimeoutError(f"request {req.id} ran past the server's timeout") from None
            yield chunk
    finally:
        await chunks.aclose()


async def _await_result(req, timeout: float):
    """A whole request's waveform; a 504 after ``timeout`` seconds (the caller cancels it)."""
    from ..engine.request import RequestCancelled

    try:
        return await asyncio.wait_for(req.aresult(), timeout)
    except asyncio.TimeoutError:
        raise APIError(504, f"the request took longer than the server's {timeout:g} s timeout",
                       type="server_error", code="timeout") from None
    except RequestCancelled:
        raise APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                       code="cancelled") from None


async def _swallow_end(gen):
    """A streamed body: a client that went away or a stream that broke after the headers just
    ends the body (the status was sent already)."""
    try:
        async for piece in gen:
            yield piece
    except asyncio.CancelledError:
        return
    except Exception:  # noqa: BLE001 - logged in pieces(); the status line is gone already
        return


def _usage(req) -> dict:
    n_text = int(req.metrics.n_text_tokens)
    n_out = int(req.metrics.n_tokens or 0)
    return {"input_tokens": n_text, "output_tokens": n_out, "total_tokens": n_text + n_out}


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _sse(pieces, req):
    """OpenAI's speech SSE: ``speech.audio.delta`` per piece of encoded audio, then ``speech.audio.done``."""
    try:
        async for piece in pieces:
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()})
    except asyncio.CancelledError:
        return
    except Exception as e:  # noqa: BLE001 - the status was sent: say it in the stream
        yield _event({"type": "error", "error": {"message": _public_message(e), "type": "server_error"}})
        return
    yield _event({"type": "speech.audio.done", "usage": _usage(req)})


async def _sse_whole(data: bytes, req):
    yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    yield _event({"type": "speech.audio.done", "usage": _usage(req)})


def _public_message(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "the request took longer than the server's timeout"
    return "the request failed (see the server log)"


__all__ = ["create_app", "APIError", "ServerState", "OPENAI_VOICES", "RESPONSE_FORMATS", "MAX_INPUT_CHARS"]
