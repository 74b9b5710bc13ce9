"""The TensorRT engine cache: keying, stale/foreign entries, locking, profiles (a stand-in builder;
the real build and run need TensorRT and a GPU and skip with a reason without them)."""
import json
import threading
import time

import pytest
import torch

from chatterbox_rt.export._onnx import export_graph, save_model
from chatterbox_rt.export.manifest import new_manifest, record_files
from chatterbox_rt.export.spec import Dim, GraphSpec, T
from chatterbox_rt.export.tensorrt import (DeviceInfo, EngineCache, EngineError, EngineKey, TensorRTUnavailable,
                                           build_bundle_engines, import_tensorrt, profile_of, tensorrt_available)

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "12.8", "10.9.0")


class StandInBuilder:
    """Records what it was asked to build; returns bytes naming it."""

    def __init__(self, delay: float = 0.0):
        self.calls = []
        self.delay = delay
        self.lock = threading.Lock()

    def build(self, onnx_path, profile, precision, graph_precision, timing_cache, log_path):
        with self.lock:
            self.calls.append((onnx_path.name, precision, json.dumps(profile, sort_keys=True)))
        time.sleep(self.delay)
        log_path.write_text("stand-in build\n")
        timing_cache.write_bytes(b"timing")
        return f"plan:{onnx_path.name}:{precision}".encode() * 100


@pytest.fixture()
def bundle(tmp_path):
    spec = GraphSpec("tiny", "test", [T("x", "float32", "b", 8)], [T("y", "float32", "b", 8)], {"b": Dim(1, 4, 16)})
    d = tmp_path / "bundle"
    d.mkdir()
    model = export_graph(torch.nn.Linear(8, 8), (torch.randn(2, 8),), spec, d)
    save_model(model, d / spec.file)
    m = new_manifest(variant="nano", layout="native", precision="fp32", opset=17, model_hash="abc123",
                     source="test")
    entry = spec.to_json()
    entry.update(precision="fp32", weights_hash="w1")
    m.data["graphs"][spec.name] = entry
    record_files(m, d, [spec.file])
    m.write(d)
    return d


def test_profile_comes_from_the_manifest(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    assert profile_of(m["graphs"]["tiny"]) == {"x": {"min": [1, 8], "opt": [4, 8], "max": [16, 8]}}


def test_build_once_then_hit(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    first = build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    again = build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    assert first == again and len(b.calls) == 1
    plan = first["tiny"]
    assert plan.read_bytes().startswith(b"plan:tiny.onnx:fp32")
    meta = json.loads((plan.parent / "meta.json").read_text())
    assert meta["key"]["gpu_name"] == H100.gpu_name and meta["profile"]["x"]["max"] == [16, 8]
    assert (plan.parent / "build.log").is_file()
    assert [e["key"]["graph"] for e in cache.entries()] == ["tiny"]


@pytest.mark.parametrize("field,value", [("gpu_name", "NVIDIA L4"), ("compute_capability", "8.9"),
                                         ("tensorrt", "11.1.0"), ("cuda", "13.0")])
def test_other_gpu_or_versions_get_their_own_engine(bundle, tmp_path, field, value):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    other = DeviceInfo(**{**H100.__dict__, field: value})
    build_bundle_engines(bundle, cache=cache, builder=b, device=other)
    assert len(b.calls) == 2 and len(cache.entries()) == 2


def test_precision_is_part_of_the_key(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    a = build_bundle_engines(bundle, cache=cache, builder=b, device=H100)["tiny"]
    h = build_bundle_engines(bundle, cache=cache, builder=b, device=H100, precision="fp16")["tiny"]
    assert a != h and [c[1] for c in b.calls] == ["fp32", "fp16"]


def test_stale_entry_is_rebuilt_not_used(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    plan = build_bundle_engines(bundle, cache=cache, builder=b, device=H100)["tiny"]
    meta_path = plan.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["key"]["weights_hash"] = "someone-else"  # a foreign engine under this key's directory
    meta_path.write_text(json.dumps(meta))
    m = json.loads((bundle / "manifest.json").read_text())
    from chatterbox_rt.export.manifest import Manifest
    key = EngineKey.make(Manifest(m, bundle), "tiny", H100)
    assert cache.lookup(key) is None
    build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    assert len(b.calls) == 2 and cache.lookup(key) == plan


def test_truncated_engine_is_rebuilt(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    plan = build_bundle_engines(bundle, cache=cache, builder=b, device=H100)["tiny"]
    plan.write_bytes(plan.read_bytes()[:10])
    build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    assert len(b.calls) == 2 and plan.stat().st_size > 10


def test_reexported_graph_is_another_engine(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["tiny.onnx"]["sha256"] = "0" * 64  # the graph file changed (another export)
    (bundle / "manifest.json").write_text(json.dumps(m))
    build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    assert len(b.calls) == 2


def test_concurrent_builders_build_once(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder(delay=0.3)
    results, errors = [], []

    def go():
        try:
            results.append(build_bundle_engines(bundle, cache=cache, builder=b, device=H100)["tiny"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(b.calls) == 1
    assert results[0].read_bytes().startswith(b"plan:tiny.onnx")


def test_failed_build_leaves_no_entry(bundle, tmp_path):
    class Failing(StandInBuilder):
        def build(self, *a, **k):
            raise EngineError("boom")

    cache = EngineCache(tmp_path / "engines")
    with pytest.raises(EngineError, match="boom"):
        build_bundle_engines(bundle, cache=cache, builder=Failing(), device=H100)
    assert all(e.get("incomplete") for e in cache.entries())
    assert build_bundle_engines(bundle, cache=cache, builder=StandInBuilder(), device=H100)["tiny"].is_file()


def test_clean(bundle, tmp_path):
    cache, b = EngineCache(tmp_path / "engines"), StandInBuilder()
    build_bundle_engines(bundle, cache=cache, builder=b, device=H100)
    build_bundle_engines(bundle, cache=cache, builder=b, device=DeviceInfo("NVIDIA L4", "8.9", "12.8", "10.9.0"))
    removed = cache.clean(keep=lambda rec: rec["key"].get("gpu_name") == "NVIDIA L4")
    assert len(removed) == 1 and [e["key"]["gpu_name"] for e in cache.entries()] == ["NVIDIA L4"]


def test_unknown_graph_is_named(bundle, tmp_path):
    with pytest.raises(EngineError, match="no graph 'nope'"):
        build_bundle_engines(bundle, graphs=["nope"], cache=tmp_path / "e", builder=StandInBuilder(), device=H100)


def test_missing_tensorrt_says_how_to_install():
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        import_tensorrt()


@pytest.mark.skipif(not tensorrt_available() or not torch.cuda.is_available(),
                    reason="needs TensorRT and a CUDA GPU (pip's tensorrt fetches its libraries from NVIDIA's "
                           "index, not reachable on these machines)")
def test_real_build_and_run(bundle, tmp_path):  # pragma: no cover - runs only where TensorRT is installed
    from chatterbox_rt.export.tensorrt import TensorRTRunner

    plan = build_bundle_engines(bundle, cache=tmp_path / "engines")["tiny"]
    runner = TensorRTRunner(plan)
    x = torch.randn(3, 8, device="cuda")
    y = runner({"x": x})["y"]
    torch.cuda.synchronize()
    assert y.shape == (3, 8)
