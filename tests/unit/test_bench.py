"""``chatterbox-rt bench`` at a tiny configuration: it runs, its JSON validates against the schema,
and the derived figures are consistent with the per-run times. No assertion is about speed."""
import json
import statistics
import sys
from pathlib import Path

import pytest

from chatterbox_rt import cli
from chatterbox_rt.profiling import bench

jsonschema = pytest.importorskip("jsonschema")
SHORT_CLIP = Path(__file__).parents[1] / "data" / "speech_en_3s.wav"  # a shorter CFM prompt: a quicker test
TINY = ["bench", "--dummy-weights", "--device", "cpu", "--variant", "nano", "--reduced-t3", "--tokens", "6",
        "--runs", "1", "--warmup", "1", "--threads", "1"]


def _validate(result: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(bench.load_schema())
    jsonschema.validate(result, bench.load_schema())


def _check_derived(side: dict, tokens: int, audio_s: float) -> None:
    runs = side["runs"]
    per_tok = [(a - b) / (tokens - 1) for a, b in zip(runs["t3_ms"], runs["t3_prefill_ms"], strict=True)]
    assert side["t3_ms_per_token"] == pytest.approx(statistics.median(per_tok))
    if side["t3_ms_per_token"] > 0:
        assert side["t3_tokens_per_s"] == pytest.approx(1000.0 / side["t3_ms_per_token"])
    parts = ("t3_ms", "cfm_ms", "hift_ms", "watermark_ms")
    first = [sum(v) for v in zip(*(runs[k] for k in parts if k in runs), strict=True)]
    assert side["first_audio_ms"] == pytest.approx(statistics.median(first))
    assert side["rtf"] == pytest.approx(side["first_audio_ms"] / 1000.0 / audio_s)
    assert side["s3gen_rtf"] == pytest.approx((side["cfm_ms"] + side["hift_ms"]) / 1000.0 / audio_s)
    assert side["peak_mem_mb"] > side["weights_mb"] > 0
    for k, v in side["p90"].items():
        if k != "t3_tokens_per_s" and v is not None:
            assert v >= side[k] - 1e-9, k


def _check_concurrency(levels: list, tokens: int, stream: bool) -> None:
    """Per-level figures through the engine agree with each other and with the definitions."""
    assert [c["concurrency"] for c in levels] == sorted(c["concurrency"] for c in levels)
    base = levels[0]
    for c in levels:
        assert c["stream"] is stream and c["requests"] == c["concurrency"]
        assert c["tokens"] == c["concurrency"] * tokens  # EOS disabled: every request draws them all
        assert c["audio_s"] > 0
        assert c["aggregate_x_realtime"] == pytest.approx(c["audio_s"] / c["wall_s"])
        assert c["aggregate_tokens_per_s"] == pytest.approx(c["tokens"] / c["t3_wall_s"])
        assert c["t3_wall_s"] <= c["wall_s"]
        assert c["latency_ms_p90"] >= c["latency_ms_median"] and c["first_audio_ms_p90"] >= c["first_audio_ms_median"]
        assert c["first_audio_ms_median"] <= c["latency_ms_median"] + 1e-6
        assert c["peak_mem_mb"] > 0 and c["engine"]["max_batch"] == c["concurrency"]
        sp = c["speedup"]
        assert sp["vs_concurrency"] == base["concurrency"]
        assert sp["tokens_per_s"] == pytest.approx(c["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"])
        assert sp["x_realtime"] == pytest.approx(c["aggregate_x_realtime"] / base["aggregate_x_realtime"])


@pytest.mark.parity
@pytest.mark.slow
def test_bench_compare_upstream_json_plot_profile(ref, tmp_path, capsys):
    out, png, trace = tmp_path / "out.json", tmp_path / "plot.png", tmp_path / "trace.json"
    rc = cli.main(TINY + ["--compare-upstream", "--concurrency", "1,2", "--json", str(out), "--plot", str(png),
                          "--profile", str(trace)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "T3 decode" in printed and "concurrency through the engine" in printed
    assert "the reference has no batching" in printed
    result = json.loads(out.read_text())
    _validate(result)
    cfg = result["config"]
    assert cfg["tokens"] == 6 and cfg["compare_upstream"] and cfg["concurrency"] == [1, 2]
    for side in ("ours", "reference"):
        _check_derived(result[side], 6, cfg["audio_s"])
        assert set(result[side]["runs"]["cfm_ms"]) and len(result[side]["runs"]["cfm_ms"]) == 1
    for key, ratio in result["speedup"].items():
        if key == "t3_tokens_per_s":
            assert ratio == pytest.approx(result["ours"][key] / result["reference"][key])
        else:
            assert ratio == pytest.approx(result["reference"][key] / result["ours"][key])
    assert [c["concurrency"] for c in result["concurrency"]] == [1, 2] and result["stream"] is None
    _check_concurrency(result["concurrency"], 6, stream=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"chatterbox_rt.t3", "chatterbox_rt.cfm", "chatterbox_rt.hift"} <= names


@pytest.mark.slow
def test_bench_ours_only_llama_no_watermark(tmp_path):
    """Without the reference: ``reference`` is null, no ratios; the Llama (CFG) variant's path,
    in the engine too (the default level, one request at a time)."""
    out = tmp_path / "o.json"
    argv = [a if a != "nano" else "chatterbox" for a in TINY] + ["--no-watermark", "--json", str(out),
                                                                   "--voice", str(SHORT_CLIP)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    _validate(result)
    assert result["reference"] is None and result["speedup"] == {}
    assert "watermark_ms" not in result["ours"] and result["config"]["watermark"] is False
    _check_derived(result["ours"], 6, result["config"]["audio_s"])
    (level,) = result["concurrency"]
    _check_concurrency([level], 6, stream=False)
    assert level["engine"]["slots_total"] == 2  # CFG: a conditioned and an unconditioned row per request


@pytest.mark.slow
def test_bench_stream_concurrency_json_plot(tmp_path, capsys):
    """``--stream``: requests stream through the engine at each level (first audio = first chunk),
    and one streamed request alone is timed; the plot is a PNG."""
    out, png = tmp_path / "s.json", tmp_path / "c.png"
    # Past the engine's first stream cut (20 tokens): two chunks per request (without the watermark,
    # whose stream holds back 0.1 s).
    tokens = 24
    argv = [a if a != "6" else str(tokens) for a in TINY] + ["--stream", "--no-watermark", "--concurrency", "1,2",
                                                              "--json", str(out), "--plot", str(png)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "streaming: 1st audio = first chunk" in printed and "streaming, one request alone" in printed
    result = json.loads(out.read_text())
    _validate(result)
    assert result["config"]["stream"] is True
    _check_concurrency(result["concurrency"], tokens, stream=True)
    st = result["stream"]
    assert st["runs"] == 1 and st["first_chunk_tokens"] < tokens
    assert st["first_chunk_ms"] < st["total_ms"]
    assert st["first_chunk_fraction"] == pytest.approx(st["first_chunk_ms"] / st["total_ms"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    ([], "no model"),
    (["--dummy-weights", "--tokens", "1"], "--tokens must be >= 2"),
    (["--dummy-weights", "--runs", "0"], "--runs and --warmup"),
    (["--dummy-weights", "--concurrency", "1,x"], "comma-separated integers"),
    (["--dummy-weights", "--concurrency", "0"], ">= 1"),
    (["--dummy-weights", "--concurrency", "2,-1"], ">= 1"),
    (["--dummy-weights", "--plot", "/nonexistent/dir/c.png"], "--plot"),
    (["--dummy-weights", "--texts", "/nonexistent/texts.txt"], "no such file"),
    (["--dummy-weights", "--voice", "/nonexistent/clip.wav"], "no such file"),
])
def test_bench_bad_arguments_fail_clearly(extra, message, capsys):
    assert cli.main(["bench", "--device", "cpu"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatterbox-rt: error:") and message in err


def test_bench_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    argv = ["bench", "--dummy-weights", "--device", "cpu", "--plot", str(tmp_path / "c.png")]
    assert cli.main(argv) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_bench_empty_texts_file(tmp_path, capsys):
    p = tmp_path / "t.txt"
    p.write_text("\n  \n")
    assert cli.main(["bench", "--dummy-weights", "--device", "cpu", "--texts", str(p)]) == 2
    assert "no non-empty lines" in capsys.readouterr().err


def test_schema_rejects_missing_stage_keys():
    schema = bench.load_schema()
    side = {k: 1.0 for k in ("voice_ms", "t3_prefill_ms", "t3_ms", "t3_ms_per_token", "t3_tokens_per_s", "cfm_ms",
                             "hift_ms", "first_audio_ms", "rtf", "s3gen_rtf", "peak_mem_mb")}
    side.update(p90={k: 1.0 for k in side if k != "peak_mem_mb"}, runs={"cfm_ms": [1.0]})
    broken = dict(side)
    del broken["cfm_ms"]
    v = jsonschema.Draft202012Validator(schema["$defs"]["side"])
    assert not list(v.iter_errors(side))
    assert any("cfm_ms" in e.message for e in v.iter_errors(broken))
