"""The speech server as a Ray Serve deployment: two replicas of a small Nano (T3 cut to 2 layers,
dummy weights) on a local Ray instance on the CPU, behind Ray's HTTP proxy on 127.0.0.1, with
the real clients (the ``openai`` package and httpx).

What a user relies on: whole, streamed and SSE speech decode to 24 kHz audio through Ray's proxy;
/v1/models answers; every replica is warm as soon as ``serve.run`` returns and requests reach both;
a voice uploaded through one replica is usable on the other (the shared library directory); bad
deployment options are clear errors before anything starts.
"""
import base64
import io
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
sf = pytest.importorskip("soundfile")

from chatterbox_rt import cli  # noqa: E402
from chatterbox_rt.serve.ray import REPLICA_HEADER, build_deployment, check_model  # noqa: E402
from chatterbox_rt.voices import VoiceLibrary  # noqa: E402

SR = 24000
TOKENS = 10  # speech tokens per request (dummy weights rarely stop by themselves)
DEFAULTS = dict(max_new_tokens=TOKENS, n_steps=2, watermark=False)
SAMPLES = TOKENS * 2 * 480  # 2 mel frames per token, 480 samples per frame (Nano appends silence: more)
NANO = {"dummy": True, "variant": "nano", "seed": 0, "t3_layers": 2}
APP = "chatterbox-rt-test"
CLIP = Path(__file__).parent.parent / "data" / "speech_en_6s.wav"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def url(library):
    # Two CPUs: one per replica (Ray's default per replica), its controller and proxy take none.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 << 20,
             log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_deployment(NANO, replicas=2, max_batch=2,
                                   app_kw=dict(library=library, max_queue=4, generate_defaults=DEFAULTS)),
                  name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _check_audio(wav: np.ndarray) -> None:
    assert SAMPLES <= wav.shape[-1] <= SAMPLES + 3 * 960, wav.shape  # Nano: three silence tokens at most
    assert np.isfinite(wav).all() and np.abs(wav).max() > 1e-3


def test_every_replica_is_warm_and_both_take_requests(url):
    seen = set()
    for _ in range(40):  # Ray's router picks among idle replicas at random
        r = httpx.get(url + "/ready", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text  # warm before Ray routes to it
        seen.add(r.headers[REPLICA_HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    (deployment,) = status.deployments.values()
    assert deployment.replica_states == {"RUNNING": 2}


def test_openai_client_whole_and_streamed_speech(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    assert [m.id for m in client.models.list().data] == ["chatterbox-nano"]
    whole = client.audio.speech.create(model="chatterbox-nano", voice="alloy", input="Hello from Ray.",
                                       response_format="wav", extra_body={"seed": 3, "stream": False})
    wav, rate = sf.read(io.BytesIO(whole.content), dtype="float32")
    assert rate == SR
    _check_audio(wav)
    with client.audio.speech.with_streaming_response.create(model="chatterbox-nano", voice="alloy",
                                                            input="Hello from Ray.", response_format="pcm",
                                                            extra_body={"seed": 3}) as resp:
        assert resp.status_code == 200
        assert "content-length" not in resp.headers  # chunked: passed through as the engine makes it
        streamed = b"".join(resp.iter_bytes())
    _check_audio(_pcm(streamed))


def test_sse_passes_through_the_proxy(url):
    body = dict(model="m", voice="default", input="Streaming events.", response_format="pcm", stream_format="sse",
                seed=5)
    audio, done = b"", None
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                if ev["type"] == "speech.audio.delta":
                    audio += base64.b64decode(ev["audio"])
                elif ev["type"] == "speech.audio.done":
                    done = ev
    assert done is not None and done["usage"]["output_tokens"] == TOKENS
    _check_audio(_pcm(audio))


def test_a_voice_uploaded_on_one_replica_speaks_on_the_other(url, library):
    files = {"file": ("clip.wav", CLIP.read_bytes(), "audio/wav")}
    r = httpx.post(url + "/v1/audio/voices", data={"name": "narrator"}, files=files, timeout=120)
    assert r.status_code == 201, r.text
    assert (library / "narrator.json").is_file() and (library / "narrator.pt").is_file()
    made_on = r.headers[REPLICA_HEADER]
    body = dict(model="m", voice="narrator", input="My voice.", response_format="pcm", stream=False)
    for _ in range(30):
        r = httpx.post(url + "/v1/audio/speech", json=body, timeout=120)
        assert r.status_code == 200, r.text
        if r.headers[REPLICA_HEADER] != made_on:
            break
    assert r.headers[REPLICA_HEADER] != made_on, "every request went to the replica that made the voice"
    _check_audio(_pcm(r.content))


# ------------------------------------------------------------------------------ options (no Ray needed)


@pytest.mark.parametrize("kw, match", [
    (dict(replicas=0), "replicas must be an integer >= 1"),
    (dict(gpus_per_replica=-1), "gpus_per_replica must be >= 0"),
    (dict(cpus_per_replica=-0.5), "cpus_per_replica must be >= 0"),
    (dict(max_batch=0), "max_batch must be"),
    (dict(autoscaling={"min_replicas": 3, "max_replicas": 2}), "min_replicas <= max_replicas"),
    (dict(autoscaling={"min_replicas": 0}), "needs max_replicas"),
    (dict(replicas=5, autoscaling={"max_replicas": 4}), "initial replicas"),
    (dict(app_kw={"warmup": False}), "'warmup': not a create_app keyword"),
    (dict(app_kw={"max_queue": -1}), "max_queue must be >= 0"),
])
def test_bad_deployment_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        build_deployment(NANO, **kw)


def test_the_device_follows_the_gpus_and_the_engine_sets_ray_s_limits(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="needs gpus_per_replica > 0"):
        build_deployment(dict(NANO, device="cuda"))
    with pytest.raises(ValueError, match="would not use"):
        build_deployment(dict(NANO, device="cpu"), gpus_per_replica=1)
    made = {}

    def deployment(cls, **opts):  # what build_deployment asks of Ray Serve
        made.clear()
        made.update(opts)
        return SimpleNamespace(bind=lambda *args: made.update(args=args))

    monkeypatch.setattr(serve, "deployment", deployment)
    build_deployment(NANO, gpus_per_replica=0.5, autoscaling={"max_replicas": 3})
    assert made["ray_actor_options"] == {"num_gpus": 0.5}
    assert made["args"][0]["device"] == "cuda"
    assert made["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 3,
                                          "target_ongoing_requests": 16}  # the engine's max_batch, not Ray's 2
    assert "num_replicas" not in made
    assert made["max_ongoing_requests"] == 16 + 64  # what one replica's app admits: max_batch + max_queue
    assert made["graceful_shutdown_timeout_s"] == 600.0  # no request outlives the request timeout
    build_deployment(NANO, replicas=3, cpus_per_replica=2, app_kw={"library": "voices", "max_queue": 0})
    assert made["num_replicas"] == 3 and made["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 2.0}
    assert made["max_ongoing_requests"] == 16
    # the library reaches every replica as one absolute directory, whichever way it was given
    for given in ("voices", Path("voices"), VoiceLibrary("voices")):
        build_deployment(NANO, app_kw={"library": given})
        assert made["args"][2]["library"] == str(tmp_path / "voices")


@pytest.mark.parametrize("model, match", [
    ({}, "exactly one of"),
    ({"dummy": True, "ckpt": "."}, "exactly one of"),
    ({"dummy": True, "layers": 2}, "unknown model spec key"),
    ({"ckpt": "/nonexistent/ckpt"}, "is not a directory"),
    ({"dummy": True, "t3_layers": 0}, "t3_layers' must be"),
    ({"dummy": True, "backend": "jax"}, "'backend' must be one of"),
    ({"dummy": True, "dtype": "int3"}, "'dtype' must be"),
    ({"dummy": True, "lora": "."}, "applies to a checkpoint"),
])
def test_bad_model_specs_are_clear_errors(model, match):
    with pytest.raises(ValueError, match=match):
        check_model(model)


def test_model_spec_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert check_model({"ckpt": "ckpt"})["ckpt"] == str(tmp_path / "ckpt")


@pytest.mark.parametrize("argv, match", [
    (["--ray", "--replicas", "0"], "--replicas must be >= 1"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must be >= 0"),
    (["--ray", "--min-replicas", "2"], "give --max-replicas too"),
    (["--ray", "--max-replicas", "2", "--replicas", "3"], "must lie from"),
    (["--ray", "--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key"),
    (["--replicas", "2"], "add --ray"),
])
def test_cli_ray_options_fail_before_anything_starts(argv, match, capsys, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **kw: pytest.fail("Ray was started"))
    rc = cli.main(["serve", "--dummy-weights", "--variant", "nano", "--t3-layers", "2", *argv])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_cli_arguments_become_the_model_spec():
    from chatterbox_rt.serve.ray import model_from_args

    args = cli.build_parser().parse_args(["serve", "--ray", "--dummy-weights", "--variant", "nano", "--t3-layers",
                                          "2"])
    assert check_model(model_from_args(args)) == {"dummy": True, "variant": "nano", "seed": 0, "t3_layers": 2,
                                                  "dtype": "fp32", "backend": "torch"}
