"""profiling/bench_serve.py runs end to end (tiny settings) and reports both sides."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def test_bench_serve_reports_engine_and_http(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "profiling"))
    try:
        import bench_serve
    finally:
        sys.path.pop(0)
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--variant", "nano", "--t3-layers", "2", "--tokens", "4", "--steps", "1",
                             "--concurrency", "1,2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["concurrency"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        for side in ("engine", "http"):
            assert r[side]["first_audio_ms_p50"] > 0 and r[side]["x_real_time"] > 0
        assert r["http"]["units"] == 2 * r["engine"]["units"]  # pcm: the same samples, 2 bytes each
