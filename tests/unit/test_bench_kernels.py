"""``profiling/bench_kernels.py --quick`` on CPU: it runs, its JSON has the documented structure and an
eager-reference row for every op and shape. No assertion is about speed."""
import json

import pytest

from chatterbox_rt.profiling import bench_kernels

ROW_KEYS = {"op", "shape", "dtype", "backend", "us", "speedup", "gbps", "pct_peak"}


def test_quick_cpu_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--device", "cpu", "--quick", "--threads", "1", "--dtype", "fp32,bf16",
                               "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "% peak" in printed and "unavailable backends" in printed

    result = json.loads(out.read_text())
    env, rows = result["env"], result["rows"]
    assert env["device"] == "cpu" and env["peak_gbps"] > 0 and "eager" in env["backends"]
    assert "triton" in env["unavailable"]  # Triton kernels are not timed on CPU
    assert rows and all(ROW_KEYS <= set(r) for r in rows)

    eager = [r for r in rows if r["backend"] == "eager"]
    assert {r["op"] for r in eager} == set(bench_kernels.OPS)
    assert {r["dtype"] for r in eager if r["op"] != "sample"} == {"fp32", "bf16"}
    for r in eager:
        assert r["us"] > 0 and r["speedup"] == 1.0 and r["gbps"] > 0 and r["pct_peak"] > 0
    # every (op, shape, dtype) timed by another backend has its eager row, the speed-up's baseline
    keys = {(r["op"], r["shape"], r["dtype"]) for r in eager}
    for r in rows:
        assert (r["op"], r["shape"], r["dtype"]) in keys
        if r["backend"] != "eager" and r["us"] is not None:
            assert r["speedup"] > 0
            assert r["max_err"] is None or r["max_err"] < 0.1  # a backend computing something else
    assert "cpp" in env["backends"] or "cpp" in env["unavailable"]
    assert isinstance(result["targets"], list)


def test_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench_kernels.main(["--device", "cpu", "--quick", "--ops", "conv"])
