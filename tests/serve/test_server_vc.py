"""``POST /v1/audio/voice-conversion`` against uvicorn on 127.0.0.1 with httpx (a multipart client),
over a Nano server (dummy weights; Nano's S3Gen is the meanflow one).

What a user relies on: the route gives exactly what ``VC.generate`` gives for the same source,
target, controls and seed; a target can be a library voice, the built-in one, or uploaded clips;
every bad field is a 400 in OpenAI's error shape that names it, and the server keeps serving.
"""
import io

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
sf = pytest.importorskip("soundfile")

from chatterbox_rt import TTS  # noqa: E402
from chatterbox_rt.models.t3.config import smaller_backbone  # noqa: E402
from chatterbox_rt.vc import VC  # noqa: E402
from chatterbox_rt.voices import VoiceLibrary  # noqa: E402

from test_server import DEFAULTS, Running  # noqa: E402 - tests/serve is on sys.path (rootdir imports)

SR = 24000
ROUTE = "/v1/audio/voice-conversion"


def _tone(seconds: float, sr: int, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _wav_bytes(wav: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tts():
    return TTS.from_dummy("nano", seed=0, device="cpu", **smaller_backbone("nano", num_layers=2))


@pytest.fixture(scope="module")
def server(tts, tmp_path_factory):
    eng = tts.engine(max_batch=2)
    lib = VoiceLibrary(tmp_path_factory.mktemp("voices"))
    lib.add("alice", _tone(5.5, 22050, 210.0, 1), tts, sr=22050)
    srv = Running(eng, library=lib, max_queue=2, generate_defaults=DEFAULTS)
    yield srv
    srv.stop()
    eng.close()


SOURCE = _tone(1.5, 16000, 120.0, 0)


def _post(server, data=None, files=None):
    files = files if files is not None else [("file", ("src.wav", _wav_bytes(SOURCE, 16000), "audio/wav"))]
    return httpx.post(server.url + ROUTE, data=data or {}, files=files, timeout=300)


def _read(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    wav, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == SR
    return wav


def test_route_equals_vc_generate_with_controls(server, tts):
    data = {"prune_tokens": "3", "speaker_ramp": "1.4:1.0", "seed": "5",
            "watermark": "false", "post": "clean", "voice": "alice"}
    got = _read(_post(server, data))
    voice = server.state.library.get("alice", device="cpu", variant=tts.variant)
    vc = VC(tts.s3gen, tts.builtin_voice.gen)
    want = vc.generate(SOURCE, voice, sr=16000, prune_tokens=3, speaker_ramp=(1.4, 1.0),
                       seed=5, watermark=False, post="clean").reshape(-1).numpy()
    assert got.shape == want.shape
    # the WAV response is 16-bit PCM: equal to within half a step
    np.testing.assert_allclose(got, want, atol=1.0 / 32768 + 1e-6, rtol=0)
    # the controls did something: the default differs
    plain = vc.generate(SOURCE, voice, sr=16000, seed=5, watermark=False).reshape(-1).numpy()
    assert plain.shape != want.shape or not np.allclose(plain, want, atol=1e-3)


def test_builtin_voice_and_uploaded_target_clips(server, tts):
    a = _read(_post(server, {"seed": "1", "watermark": "false"}))
    want = VC(tts.s3gen, tts.builtin_voice.gen).generate(SOURCE, None, sr=16000, seed=1,
                                                          watermark=False).reshape(-1).numpy()
    np.testing.assert_allclose(a, want, atol=1.0 / 32768 + 1e-6, rtol=0)
    files = [("file", ("src.wav", _wav_bytes(SOURCE, 16000), "audio/wav")),
             ("target", ("t1.wav", _wav_bytes(_tone(2.0, 24000, 200.0, 2), 24000), "audio/wav")),
             ("target", ("t2.flac", _wav_bytes(_tone(2.5, 16000, 205.0, 3), 16000, "FLAC", "PCM_16"), "audio/flac"))]
    b = _read(_post(server, {"seed": "1", "watermark": "false"}, files))
    assert b.size > 0 and np.isfinite(b).all()
    assert b.shape != a.shape or not np.allclose(a, b, atol=1e-3)  # another target, another voice


def test_mp3_response(server):
    r = _post(server, {"response_format": "mp3", "watermark": "false"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/mpeg")
    wav, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == SR and wav.size > SR // 2


@pytest.mark.parametrize("data,files,param", [
    ({}, [], "file"),
    ({"bogus": "1"}, None, "bogus"),
    ({"prune_tokens": "many"}, None, "prune_tokens"),
    ({"prune_tokens": "-1"}, None, "prune_tokens"),
    ({"speaker_ramp": "1.0"}, None, "speaker_ramp"),
    ({"speaker_strength": "inf"}, None, "speaker_strength"),
    ({"speaker_strength": "1.2", "speaker_ramp": "1:2"}, None, "speaker_strength"),
    ({"flow_cfg_rate": "0.5"}, None, "flow_cfg_rate"),  # Nano's meanflow S3Gen runs no guidance
    ({"pitch_match": "maybe"}, None, "pitch_match"),
    ({"response_format": "ogg9"}, None, "response_format"),
    ({"voice": "nobody"}, None, "voice"),
    ({"voice": "alice"}, [("file", ("s.wav", _wav_bytes(SOURCE, 16000), "audio/wav")),
                          ("target", ("t.wav", _wav_bytes(SOURCE, 16000), "audio/wav"))], "voice"),
    ({}, [("file", ("s.wav", b"not audio at all", "audio/wav"))], "file"),
    ({}, [("file", ("s.wav", _wav_bytes(SOURCE[:800], 16000), "audio/wav"))], "file"),  # 50 ms: too short
])
def test_bad_fields_are_400_naming_the_field(server, data, files, param):
    r = _post(server, data, files)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert server.state.inflight == 0  # nothing held after a refusal


def test_server_still_speaks_after_conversions(server):
    r = httpx.post(server.url + "/v1/audio/speech", json={"model": "m", "input": "Still here.", "voice": "alloy",
                                                          "response_format": "wav", "stream": False}, timeout=120)
    assert r.status_code == 200 and len(r.content) > 44
