"""The speech server with real clients: the ``openai`` package and httpx, against uvicorn on
127.0.0.1 (started and stopped here), over a small Nano (T3 cut to 2 layers, dummy weights).

What a user relies on: every response format decodes to 24 kHz audio of the right length, plain
and streamed; SSE carries the audio and usage; errors come in OpenAI's shape with the right
status and the field named; the queue bound answers 429, big bodies 413; a client that goes
away frees its engine slots; voices can be uploaded, used and deleted; metrics count it all.
"""
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
sf = pytest.importorskip("soundfile")

from chatterbox_rt import TTS  # noqa: E402
from chatterbox_rt.models.t3.config import smaller_backbone  # noqa: E402
from _server import Running, _free_port  # noqa: E402,F401 - tests/ is on sys.path; test_server_vc imports Running here
from chatterbox_rt.serve import make_server  # noqa: E402
from chatterbox_rt.serve.app import MAX_INPUT_CHARS  # noqa: E402
from chatterbox_rt.voices import VoiceLibrary  # noqa: E402

SR = 24000
TOKENS = 10  # speech tokens per request (dummy weights rarely stop by themselves)
DEFAULTS = dict(max_new_tokens=TOKENS, n_steps=2, watermark=False)
SAMPLES = TOKENS * 2 * 480  # 2 mel frames per token, 480 samples per frame (Nano appends silence: more)


@pytest.fixture(scope="module")
def tts():
    return TTS.from_dummy("nano", seed=0, device="cpu", **smaller_backbone("nano", num_layers=2))


@pytest.fixture(scope="module")
def engine(tts):
    eng = tts.engine(max_batch=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    lib = VoiceLibrary(tmp_path_factory.mktemp("voices"))
    srv = Running(engine, library=lib, max_queue=4, generate_defaults=DEFAULTS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def _metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def _decode(data: bytes, fmt: str):
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, SR
    if fmt in ("aac", "flac"):  # a streamed FLAC has no total length, which libsndfile 1.2 misreads
        av = pytest.importorskip("av")
        with av.open(io.BytesIO(data), format="aac" if fmt == "aac" else "flac") as f:
            frames = [fr.to_ndarray() for fr in f.decode(audio=0)]
            rate = f.streams.audio[0].rate
        wav = np.concatenate([x.reshape(x.shape[0], -1)[0] for x in frames])
        if wav.dtype.kind == "i":
            wav = wav.astype(np.float32) / 32768.0
        return wav, rate
    wav, rate = sf.read(io.BytesIO(data), dtype="float32")
    return wav, rate


# ------------------------------------------------------------------------------ speech, every format


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
@pytest.mark.parametrize("streamed", [False, True])
def test_openai_client_every_format_decodes_to_the_right_rate_and_length(client, fmt, streamed):
    args = dict(model="chatterbox-nano", voice="alloy", input="Hello from the server.", response_format=fmt,
                extra_body={"seed": 3, "stream": streamed})
    if streamed:
        with client.audio.speech.with_streaming_response.create(**args) as resp:
            assert resp.status_code == 200
            pieces = list(resp.iter_bytes())
        data = b"".join(pieces)
    else:
        data = client.audio.speech.create(**args).content
    wav, rate = _decode(data, fmt)
    assert rate == SR
    lossless = fmt in ("wav", "flac", "pcm")
    # Nano: the tokens plus three silence tokens; lossy codecs add a little padding
    lo, hi = SAMPLES, SAMPLES + 3 * 960 + (0 if lossless else 4096)
    assert lo <= wav.shape[-1] <= hi, (fmt, wav.shape)
    assert np.isfinite(wav).all() and np.abs(wav).max() > 1e-3


def test_whole_response_equals_the_engine_output(server, engine):
    r = httpx.post(server.url + "/v1/audio/speech", json=dict(model="m", voice="default", input="Same words.",
                                                               response_format="pcm", seed=11, stream=False))
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/L16")
    got = np.frombuffer(r.content, dtype="<i2")
    want = engine.submit("Same words.", seed=11, **DEFAULTS).result(300)[0].numpy()
    want16 = np.clip(np.rint(np.clip(want, -1, 1) * 32768.0), -32768, 32767).astype(np.int16)
    assert np.array_equal(got, want16)


def test_sse_stream_has_deltas_then_done_with_usage(server):
    body = dict(model="m", voice="default", input="Streaming events.", response_format="pcm", stream_format="sse",
                seed=5)
    audio, done = b"", None
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"] == "speech.audio.delta":
                assert done is None
                audio += base64.b64decode(ev["audio"])
            elif ev["type"] == "speech.audio.done":
                done = ev
    assert done is not None
    u = done["usage"]
    assert u["output_tokens"] == TOKENS and u["input_tokens"] > 0 and u["total_tokens"] == u["input_tokens"] + TOKENS
    assert SAMPLES <= len(audio) // 2 <= SAMPLES + 3 * 960


def test_speed_changes_the_duration(server):
    def n(speed):
        r = httpx.post(server.url + "/v1/audio/speech", json=dict(model="m", voice="default", input="Speed.",
                                                                   response_format="pcm", seed=1, speed=speed,
                                                                   stream=False), timeout=300)
        assert r.status_code == 200, r.text
        return len(r.content) // 2

    base, fast = n(1.0), n(2.0)
    assert fast == round(base / 2.0)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("body, param", [
    (dict(model="m", voice="default", input=""), "input"),
    (dict(model="m", voice="default", input="x" * (MAX_INPUT_CHARS + 1)), "input"),
    (dict(model="m", voice="default", input="hi", post="loud"), "post"),
    (dict(model="m", voice="default", input="hi", response_format="ogg"), "response_format"),
    (dict(model="m", voice="default", input="hi", speed=5), "speed"),
    (dict(model="m", voice="default", input="hi", temprature=0.5), "temprature"),
    (dict(model="m", voice="nobody", input="hi"), "voice"),
    (dict(model="m", voice="../etc/passwd", input="hi"), "voice"),
    (dict(model="m", voice="default", input="hi", top_p=2.0), "top_p"),
    (dict(voice="default", input="hi"), "model"),
])
def test_bad_fields_are_400_in_openai_shape_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "Traceback" not in r.text


def test_openai_client_raises_its_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="m", voice="nobody", input="hi")
    assert e.value.body["param"] == "voice"


def test_not_json_and_oversized_bodies(server):
    r = httpx.post(server.url + "/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    big = json.dumps(dict(model="m", voice="default", input="x" * 100, pad="y" * (2 << 20)))
    r = httpx.post(server.url + "/v1/audio/speech", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it is read
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(server.url + "/v1/audio/speech", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_is_404_in_openai_shape(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# ------------------------------------------------------------------------------ limits, disconnects


def test_queue_full_is_429_with_retry_after(engine):
    srv = Running(engine, max_queue=0, generate_defaults=dict(DEFAULTS, max_new_tokens=60), warmup=False)
    try:
        body = dict(model="m", voice="default", input="Busy.", response_format="pcm", stream=False)
        results = []

        def post():
            results.append(httpx.post(srv.url + "/v1/audio/speech", json=body, timeout=300))

        threads = [threading.Thread(target=post) for _ in range(engine.max_batch)]
        for t in threads:
            t.start()
        end = time.monotonic() + 60
        while srv.state.inflight < engine.max_batch and time.monotonic() < end:
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/audio/speech", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        for t in threads:
            t.join(300)
        assert all(x.status_code == 200 for x in results)
        assert srv.state.inflight == 0
    finally:
        srv.stop()


def test_a_client_that_disconnects_mid_stream_frees_its_slots(server, engine):
    body = dict(model="m", voice="default", input="Long one.", response_format="pcm", max_new_tokens=400)
    before = _metric(server.url, "chatterbox_rt_speech_requests_total", outcome="disconnected")
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=300) as r:
        assert r.status_code == 200
        next(r.iter_bytes())  # the first chunk arrived: the request holds its slots now
        assert engine.stats()["slots_in_use"] >= 1
    end = time.monotonic() + 60
    while (engine.stats()["slots_in_use"] or server.state.inflight) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.stats()["slots_in_use"] == 0 and server.state.inflight == 0
    assert _metric(server.url, "chatterbox_rt_kv_slots_in_use") == 0
    assert _metric(server.url, "chatterbox_rt_speech_requests_total", outcome="disconnected") == before + 1


def test_api_key_is_required_when_set(engine):
    srv = Running(engine, api_key="s3cret", warmup=False, generate_defaults=DEFAULTS)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200  # open
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret")
        assert [m.id for m in ok.models.list().data] == ["chatterbox-nano"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope").models.list()
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ voices, health, metrics


def test_voice_upload_use_and_delete(server, tts):
    from pathlib import Path

    clip = (Path(__file__).parent.parent / "data" / "speech_en_6s.wav").read_bytes()
    files = {"file": ("clip.wav", clip, "audio/wav")}
    r = httpx.post(server.url + "/v1/audio/voices", data={"name": "narrator"}, files=files, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "narrator"
    r = httpx.post(server.url + "/v1/audio/voices", data={"name": "narrator"}, files=files, timeout=120)
    assert r.status_code == 409
    ids = [v["id"] for v in httpx.get(server.url + "/v1/audio/voices").json()["data"]]
    assert "narrator" in ids and "default" in ids
    for voice in ("narrator", {"id": "narrator"}):
        r = httpx.post(server.url + "/v1/audio/speech", json=dict(model="m", voice=voice, input="My voice.",
                                                                   response_format="wav", stream=False), timeout=300)
        assert r.status_code == 200, r.text
    bad = {"file": ("x.wav", b"not audio at all", "audio/wav")}
    r = httpx.post(server.url + "/v1/audio/voices", data={"name": "junk"}, files=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(server.url + "/v1/audio/voices", data={"name": "../x"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert httpx.delete(server.url + "/v1/audio/voices/narrator").status_code == 200
    assert httpx.delete(server.url + "/v1/audio/voices/narrator").status_code == 404


def test_models_health_ready_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["chatterbox-nano"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    text = httpx.get(server.url + "/metrics").text
    for name in ("chatterbox_rt_http_requests_total", "chatterbox_rt_http_request_duration_seconds_bucket",
                 "chatterbox_rt_first_audio_seconds_bucket", "chatterbox_rt_queue_depth",
                 "chatterbox_rt_running_requests", "chatterbox_rt_kv_slots_in_use",
                 "chatterbox_rt_speech_tokens_total", "chatterbox_rt_audio_seconds_total"):
        assert name in text, name
    assert _metric(server.url, "chatterbox_rt_http_requests_total", route="/v1/audio/speech", status="200") >= 1


# ------------------------------------------------------------------------------ bounded load


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("n", [48, pytest.param(200, marks=pytest.mark.slow)])
def test_load_200_mixed_requests_at_16_way_concurrency(tts, n):
    """``n`` mixed requests (200 under ``make test-all``; 48 in ``make test``). No good request fails, bad ones get their 400s, no slot or in-flight count leaks, and
    resident memory stays flat once warm."""
    from concurrent.futures import ThreadPoolExecutor

    eng = tts.engine(max_batch=8)
    srv = Running(eng, max_queue=16, generate_defaults=dict(DEFAULTS, max_new_tokens=6, n_steps=1),
                  voice_aliases={"narrator": "default"})
    formats = ["pcm", "wav", "mp3", "opus", "flac", "aac"]
    rng = np.random.default_rng(0)

    def body(i):
        b = dict(model="m", input=f"Request number {i}.", voice=["default", "alloy", "narrator"][i % 3],
                 response_format=formats[i % len(formats)], seed=i, stream=bool(i % 2))
        if i % 7 == 0:
            b["stream_format"] = "sse"
        if i % 5 == 0:
            b["speed"] = 1.25
        if i % 23 == 0:
            b["temperature"] = -1.0  # bad: 400
        return b

    def one(i):
        b = body(i)
        with httpx.Client(timeout=600) as c:
            r = c.post(srv.url + "/v1/audio/speech", json=b)
            return i, b, r.status_code, len(r.content)

    try:
        with ThreadPoolExecutor(16) as pool:
            warm = list(pool.map(one, range(16)))
            rss_warm = _rss_mb()
            rest = list(pool.map(one, range(16, n)))
        results = warm + rest
        rss_end = _rss_mb()
        bad = [r for r in results if r[1].get("temperature") == -1.0]
        good = [r for r in results if r[1].get("temperature") != -1.0]
        assert all(st == 400 for _, _, st, _ in bad), [(i, st) for i, _, st, _ in bad]
        failed = [(i, st) for i, _, st, _ in good if st != 200]
        assert not failed, failed
        assert all(n > 0 for *_, n in good)
        end = time.monotonic() + 30
        while (eng.stats()["slots_in_use"] or srv.state.inflight) and time.monotonic() < end:
            time.sleep(0.05)
        assert eng.stats()["slots_in_use"] == 0 and srv.state.inflight == 0
        assert eng.stats()["queued"] == 0 and eng.stats()["running"] == 0
        assert rss_end - rss_warm < 300, (rss_warm, rss_end)  # MB: flat, allowing allocator slack
        done = _metric(srv.url, "chatterbox_rt_speech_requests_total", outcome="done")
        assert done == len(good)
    finally:
        srv.stop()
        eng.close()


def test_a_server_error_is_500_in_openai_shape_without_a_traceback(server, engine, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("secret internal detail /home/user/path.py line 12")

    monkeypatch.setattr(engine, "submit", broken)
    r = httpx.post(server.url + "/v1/audio/speech", json=dict(model="m", voice="default", input="hi"))
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["message"].startswith("internal server error (id ")
    assert "secret" not in r.text and "Traceback" not in r.text and "path.py" not in r.text
    assert server.state.inflight == 0


def test_a_request_that_fails_mid_stream_ends_its_sse_with_an_error_event(server, engine, monkeypatch):
    import chatterbox_rt.engine.engine as engine_mod

    def decode_batch(*a, **k):
        raise RuntimeError("injected S3Gen failure")

    real = engine.submit

    def submit(*a, **k):  # a whole (non-streamed engine) request whose S3Gen fails
        k["stream"] = False
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "decode_batch", decode_batch)
    monkeypatch.setattr(engine, "submit", submit)
    r = httpx.post(server.url + "/v1/audio/speech", json=dict(model="m", voice="default", input="hi", stream=False))
    assert r.status_code == 500 and "injected" not in r.text
    events = []
    with httpx.stream("POST", server.url + "/v1/audio/speech",
                      json=dict(model="m", voice="default", input="hi", stream_format="sse"), timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events and events[-1]["type"] == "error" and "injected" not in json.dumps(events)
    assert server.state.inflight == 0


def test_not_ready_and_timeout_and_upload_limit(engine, tmp_path, monkeypatch):
    from chatterbox_rt.serve import app as app_mod

    gate = threading.Event()
    real_warm_up = app_mod.ServerState.warm_up

    def slow_warm_up(self):
        gate.wait(120)
        real_warm_up(self)

    monkeypatch.setattr(app_mod.ServerState, "warm_up", slow_warm_up)
    srv = Running.__new__(Running)  # started by hand: Running() waits for /ready
    srv.port = _free_port()
    srv.server = make_server(engine, host="127.0.0.1", port=srv.port, log_level="warning", close_engine=False,
                             library=VoiceLibrary(tmp_path), request_timeout=0.5, max_upload_bytes=1000,
                             generate_defaults=dict(DEFAULTS, max_new_tokens=200))
    srv.state = srv.server.config.app.state.chatterbox
    srv.thread = threading.Thread(target=srv.server.run, daemon=True)
    srv.thread.start()
    srv.url = f"http://127.0.0.1:{srv.port}"
    try:
        end = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(srv.url + "/ready")
                break
            except httpx.TransportError:
                assert time.monotonic() < end
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "warming_up"
        r = httpx.post(srv.url + "/v1/audio/speech", json=dict(model="m", voice="default", input="hi"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        gate.set()
        while httpx.get(srv.url + "/ready").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.05)
        # 200 tokens take far longer than the 0.5 s timeout: cancelled, 504, slots freed
        r = httpx.post(srv.url + "/v1/audio/speech", json=dict(model="m", voice="default", input="hi", stream=False),
                       timeout=120)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        while (engine.stats()["slots_in_use"] or srv.state.inflight) and time.monotonic() < end:
            time.sleep(0.02)
        assert engine.stats()["slots_in_use"] == 0 and srv.state.inflight == 0
        r = httpx.post(srv.url + "/v1/audio/voices", data={"name": "big"},
                       files={"file": ("x.wav", b"\0" * 5000, "audio/wav")})
        assert r.status_code == 413
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ long text


@pytest.mark.slow
def test_a_20000_character_chapter_streams_through_the_openai_client(tts, monkeypatch):
    """A chapter runs as a batch of segments (chatterbox_rt.longtext) and streams back in order."""
    from chatterbox_rt.longtext import JOIN_PAUSE_S
    from chatterbox_rt.tts import dummy_voice

    sentence = "The quick brown fox jumps over the lazy dog, and then it runs away. "
    text = (sentence * (20_000 // len(sentence) + 2))[:20_001]
    # A 0.4 s S3Gen prompt for the built-in voice: the test's time goes to the 70-odd segments.
    short = dummy_voice(tts.builtin_voice.t3.cond_prompt_speech_tokens.shape[1], seed=5, prompt_seconds=0.4)
    monkeypatch.setattr(tts, "builtin_voice", short)
    n_segments = len(tts.segments(text))
    assert n_segments > 60
    eng = tts.engine(max_batch=16)
    srv = Running(eng, generate_defaults=dict(n_steps=1, watermark=False))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        with client.audio.speech.with_streaming_response.create(
                model="m", voice="default", input=text, response_format="pcm",
                extra_body=dict(max_new_tokens=1, seed=0, post="clean")) as resp:
            data = b"".join(resp.iter_bytes())
    finally:
        srv.stop()
        eng.close(wait=False)
    pcm = np.frombuffer(data, dtype="<i2")
    # Every segment's token (40 ms) plus Nano's silence, and the pauses between them.
    assert pcm.size >= (n_segments - 1) * int(JOIN_PAUSE_S * SR) + n_segments * 960
    assert np.abs(pcm).max() <= round(32767 * 10 ** (-1 / 20)) + 1  # post="clean": peaks at -1 dBFS
