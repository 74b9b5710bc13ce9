"""``chatterbox-rt serve`` as a user runs it: a separate process on 127.0.0.1 that answers the
``openai`` client, and on SIGTERM finishes the request in flight before it exits."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> list:
    exe = Path(sys.executable).with_name("chatterbox-rt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "chatterbox_rt.cli"]


def test_serve_answers_the_openai_client_and_drains_on_sigterm(tmp_path):
    port = _free_port()
    cmd = _cli() + ["serve", "--dummy-weights", "--variant", "nano", "--t3-layers", "2", "--device", "cpu",
                    "--port", str(port), "--max-batch", "2", "--log-level", "warning", "--library", str(tmp_path)]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server not ready in time"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        wav = client.audio.speech.create(model="chatterbox-nano", voice="alloy", input="Hello.",
                                         response_format="wav").content
        assert wav[:4] == b"RIFF" and len(wav) > 44

        got = {}

        def long_stream():
            body = dict(model="m", voice="default", input="A long one.", response_format="pcm", max_new_tokens=80,
                        seed=1)
            with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=600) as r:
                got["status"] = r.status_code
                data = b""
                for piece in r.iter_bytes():
                    if not data:
                        got["first"] = time.monotonic()
                    data += piece
                got["bytes"] = len(data)

        t = threading.Thread(target=long_stream)
        t.start()
        end = time.monotonic() + 240
        while "first" not in got and time.monotonic() < end and t.is_alive():
            time.sleep(0.02)
        assert "first" in got, "no audio before the timeout"
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        rc = proc.wait(300)
        out = (tmp_path / "server.log").read_text()
        assert rc == 0, out
        # the request in flight was finished, whole: 80 tokens x 2 frames x 480 samples (+3 silence tokens), s16
        assert got["status"] == 200 and got["bytes"] >= 80 * 960 * 2, got
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
