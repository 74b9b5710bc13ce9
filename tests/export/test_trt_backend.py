"""The TensorRT backend of a whole TTS (``load_exported(..., backend="tensorrt")``): the
onnxruntime-backed classes over ``TrtSession``, with a stand-in engine runner (TensorRTRunner's call
contract, run by onnxruntime on CPU tensors, its output buffers reused across calls and poisoned
first, int64 bound as int32) so it runs here; the real build and run skip without TensorRT and a
CUDA GPU, and a missing TensorRT raises the install advice."""
import logging

import numpy as np
import pytest
import torch

from chatterbox_rt import TTS
from chatterbox_rt.export import Manifest, export
from chatterbox_rt.export.tensorrt import EngineError, TensorRTUnavailable, tensorrt_available
from chatterbox_rt.export.trt_session import TrtSession, TrtValue
from chatterbox_rt.models.t3.config import smaller_backbone

ort = pytest.importorskip("onnxruntime")

NEAR_GREEDY = dict(temperature=0.05, top_k=1)
GEN = dict(seed=3, max_new_tokens=10, stop_on_eos=False, watermark=False, **NEAR_GREEDY)
_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
                 "tensor(bool)": torch.bool, "tensor(float16)": torch.float16}


class FakeTensorRTRunner:
    """``TensorRTRunner``'s contract on the CPU: ``runner(feeds) -> {output: tensor}``, the outputs
    views of per-output buffers reused across calls (filled with NaN / -1 before each call's
    results are written, so a caller that keeps a view reads garbage on the next call), int64
    inputs and outputs bound as int32 as a TensorRT engine may bind them. Checks that every input
    arrives on its device, contiguous, in the dtype ``_torch_dtype`` names."""

    def __init__(self, onnx_path, narrow_int64: bool = True):
        from chatterbox_rt.export._onnx import open_session

        self.sess = open_session(onnx_path, threads=1)
        self.types = {a.name: a.type for a in list(self.sess.get_inputs()) + list(self.sess.get_outputs())}
        self.inputs = [a.name for a in self.sess.get_inputs()]
        self.outputs = [a.name for a in self.sess.get_outputs()]
        self.narrow = narrow_int64
        self.device = torch.device("cpu")
        self._out: dict = {}
        self.calls = 0
        self.last_feeds: dict = {}

    def _torch_dtype(self, name):
        t = _ORT_TO_TORCH[self.types[name]]
        return torch.int32 if (self.narrow and t == torch.int64) else t

    def __call__(self, feeds, stream=None):
        arrays = {}
        for n in self.inputs:
            x = feeds[n]
            assert torch.is_tensor(x) and x.device == self.device and x.is_contiguous(), n
            assert x.dtype == self._torch_dtype(n), (n, x.dtype)
            a = x.numpy()
            arrays[n] = a.astype(np.int64) if self.types[n] == "tensor(int64)" else a
        self.last_feeds = dict(feeds)
        res = self.sess.run(self.outputs, arrays)
        out = {}
        for n, r in zip(self.outputs, res):
            t = torch.from_numpy(np.ascontiguousarray(r)).to(self._torch_dtype(n))
            buf = self._out.get(n)
            if buf is None or buf.numel() < t.numel():
                buf = self._out[n] = torch.empty(max(2 * t.numel(), 1), dtype=t.dtype)
            buf.fill_(float("nan") if t.is_floating_point() else -1)
            view = buf[: t.numel()].view(t.shape)
            view.copy_(t)
            out[n] = view
        self.calls += 1
        return out


def fake_runners(bundle, fail=(), made=None):
    """``make_runner`` for load_exported: a FakeTensorRTRunner per graph; graphs in ``fail`` raise
    as a failed TensorRT build does."""
    m = Manifest.read(bundle)

    def make(name):
        if name in fail:
            raise EngineError(f"TensorRT could not parse {name}.onnx: stand-in failure")
        r = FakeTensorRTRunner(bundle / m.graphs[name]["file"])
        if made is not None:
            made[name] = r
        return r

    return make


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, one_thread):
    tts = TTS.from_dummy("nano", seed=0, device="cpu", **smaller_backbone("nano", num_layers=1))
    out = tmp_path_factory.mktemp("trt") / "nano"
    export(tts, out, components=["t3", "s3gen"])
    return out


@pytest.fixture(scope="module")
def ort_tts(bundle):
    return TTS.from_exported(bundle, threads=1)


# ------------------------------------------------------------------------------ TrtSession


class _Tiny(torch.nn.Module):
    def forward(self, x, idx):
        return x * 2.0 + idx[:, None].float(), idx + 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from chatterbox_rt.export._onnx import export_graph, save_model
    from chatterbox_rt.export.spec import Dim, GraphSpec, T

    spec = GraphSpec("tiny", "test", [T("x", "float32", "b", 4), T("idx", "int64", "b")],
                     [T("y", "float32", "b", 4), T("n", "int64", "b")], {"b": Dim(1, 2, 8)})
    d = tmp_path_factory.mktemp("tiny")
    save_model(export_graph(_Tiny(), (torch.randn(2, 4), torch.tensor([1, 2])), spec, d), d / spec.file)
    entry = spec.to_json()
    from chatterbox_rt.export.tensorrt import profile_of

    return d / spec.file, entry, profile_of(entry)


def test_session_api_and_copies(tiny):
    path, entry, prof = tiny
    runner = FakeTensorRTRunner(path)
    s = TrtSession(runner, entry["inputs"], entry["outputs"], name="tiny", profile=prof)
    assert [(a.name, a.type, a.shape) for a in s.get_inputs()] == [("x", "tensor(float)", ["b", 4]),
                                                                     ("idx", "tensor(int64)", ["b"])]
    assert [o.name for o in s.get_outputs()] == ["y", "n"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y1, n1 = s.run(None, {"x": x, "idx": np.array([1, 5], dtype=np.int64)})
    assert runner.last_feeds["idx"].dtype == torch.int32  # bound as the engine binds it
    assert n1.dtype == np.int64 and n1.tolist() == [2, 6]  # returned as the graph declares
    np.testing.assert_array_equal(y1, x * 2 + np.array([[1], [5]]))
    keep = y1.copy()
    s.run(["y"], {"x": -x, "idx": np.array([0, 0], dtype=np.int64)})  # the runner's buffers are reused
    np.testing.assert_array_equal(y1, keep)  # ... but what run returned was a copy


def test_ort_values_stay_on_device_and_outlive_the_next_call(tiny):
    path, entry, prof = tiny
    runner = FakeTensorRTRunner(path)
    s = TrtSession(runner, entry["inputs"], entry["outputs"], name="tiny", profile=prof)
    x = torch.ones(3, 4)
    v, n = s.run_with_ort_values(["y", "n"], {"x": x, "idx": torch.tensor([1, 2, 3])})
    assert isinstance(v, TrtValue) and v.shape() == [3, 4] and v.data_type() == "tensor(float)"
    assert n.tensor.dtype == torch.int64
    first = v.numpy().copy()
    w, = s.run_with_ort_values(["y"], {"x": v, "idx": torch.tensor([0, 0, 0])})  # fed back as it is
    assert runner.last_feeds["x"].data_ptr() == v.tensor.data_ptr()  # no copy on the way in
    np.testing.assert_array_equal(v.numpy(), first)  # the next call did not overwrite it
    np.testing.assert_array_equal(w.numpy(), first * 2)


def test_profile_and_feed_errors_name_the_graph(tiny):
    path, entry, prof = tiny
    s = TrtSession(FakeTensorRTRunner(path), entry["inputs"], entry["outputs"], name="tiny", profile=prof)
    with pytest.raises(ValueError, match=r"tiny: input x of shape \[9, 4\] is outside .*max \[8, 4\]"):
        s.run(None, {"x": np.zeros((9, 4), np.float32), "idx": np.zeros(9, np.int64)})
    with pytest.raises(ValueError, match=r"tiny: inputs missing \['idx'\]"):
        s.run(None, {"x": np.zeros((2, 4), np.float32)})


# ------------------------------------------------------------------------------ the whole TTS


def test_tts_on_tensorrt_sessions_matches_onnxruntime(bundle, ort_tts):
    made = {}
    trt = TTS.from_exported(bundle, backend="tensorrt", threads=1, trt_components=("t3", "s3gen"),
                            trt_runner=fake_runners(bundle, made=made))
    assert trt.backend == "tensorrt"
    m = Manifest.read(bundle)
    # The estimator (another step count) and HiFT's streaming pieces open on first use.
    lazy = {"s3gen_cfm_estimator", "s3gen_hift_f0", "s3gen_hift_decode"}
    opened = {g for g in m.graphs if g not in lazy}
    assert {g for g, b in trt.graph_backends.items() if b == "tensorrt"} == opened
    assert "TensorRT: t3_prefill, t3_decode" in trt.source
    want_tok = ort_tts.t3_tokens("Hello there.", seed=3, max_new_tokens=10, stop_on_eos=False, **NEAR_GREEDY)
    got_tok = trt.t3_tokens("Hello there.", seed=3, max_new_tokens=10, stop_on_eos=False, **NEAR_GREEDY)
    assert torch.equal(got_tok, want_tok)
    assert made["t3_decode"].calls >= 9 and made["t3_prefill"].calls == 1
    want, got = ort_tts.generate("Hello there.", **GEN), trt.generate("Hello there.", **GEN)
    assert got.shape == want.shape and torch.equal(got, want)  # the same graphs, the same onnxruntime kernels
    # another step count: the estimator graph, opened (and its engine made) on first use
    want, got = ort_tts.generate("Hi.", n_steps=3, **GEN), trt.generate("Hi.", n_steps=3, **GEN)
    assert torch.equal(got, want) and trt.graph_backends["s3gen_cfm_estimator"] == "tensorrt"
    # streaming: HiFT's two streaming graphs, opened on the first stream, run as engines too
    kw = dict(seed=5, max_new_tokens=20, stop_on_eos=False, watermark=False, chunk_tokens=6, first_chunk_tokens=6,
              **NEAR_GREEDY)
    streamed = {}
    for name, tts in (("ort", ort_tts), ("trt", trt)):
        with tts.engine(max_batch=1) as eng:
            streamed[name] = list(eng.submit("Hi.", stream=True, **kw).chunks(timeout=600))
    assert len(streamed["trt"]) >= 2 and torch.equal(torch.cat(streamed["trt"]), torch.cat(streamed["ort"]))
    assert trt.graph_backends["s3gen_hift_f0"] == trt.graph_backends["s3gen_hift_decode"] == "tensorrt"


def test_engine_on_tensorrt_sessions_matches_onnxruntime(bundle, ort_tts):
    """Two requests interleave their decode calls on one runner: each keeps its own keys/values
    (device copies), never a view of the runner's reused buffers."""
    trt = TTS.from_exported(bundle, backend="tensorrt", threads=1, trt_components=("t3", "s3gen"),
                            trt_runner=fake_runners(bundle))
    texts = ["One two.", "Three four five."]
    outs = {}
    for name, tts in (("ort", ort_tts), ("trt", trt)):
        with tts.engine(max_batch=2) as eng:
            reqs = [eng.submit(t, **GEN) for t in texts]
            outs[name] = [r.result(timeout=300) for r in reqs]
    for a, b in zip(outs["ort"], outs["trt"]):
        assert a.shape == b.shape and torch.equal(a, b)


def test_a_graph_that_fails_to_build_runs_on_onnxruntime(bundle, ort_tts, caplog):
    with caplog.at_level(logging.WARNING, logger="chatterbox_rt.export.ort_backend"):
        trt = TTS.from_exported(bundle, backend="tensorrt", threads=1, trt_components=("t3", "s3gen"),
                                trt_runner=fake_runners(bundle, fail=("s3gen_hift", "t3_decode")))
    gb = trt.graph_backends
    assert gb["s3gen_hift"] == "onnxruntime" and gb["s3gen_flow_encoder"] == "tensorrt"
    assert gb["t3_prefill"] == gb["t3_decode"] == "onnxruntime"  # T3's two graphs share the keys/values
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and any("s3gen_hift" in w and "onnxruntime" in w for w in warned), warned
    assert set(trt.session_factory.failures) == {"s3gen_hift", "t3_decode"}
    assert torch.equal(trt.generate("Hello.", **GEN), ort_tts.generate("Hello.", **GEN))


def test_strict_build_failure_names_the_graph_and_the_fallback(bundle):
    with pytest.raises(EngineError, match=r"s3gen_hift .*onnxruntime"):
        TTS.from_exported(bundle, backend="tensorrt", trt_strict=True, trt_components=("t3", "hift"),
                          trt_runner=fake_runners(bundle, fail=("s3gen_hift",)))


def test_components_select_what_runs_on_tensorrt(bundle):
    trt = TTS.from_exported(bundle, backend="tensorrt", trt_runner=fake_runners(bundle))  # default: T3, the flow
    gb = trt.graph_backends
    assert gb["t3_decode"] == gb["s3gen_flow_encoder"] == gb["s3gen_cfm_loop2"] == "tensorrt"
    assert gb["s3gen_hift"] == "onnxruntime"
    trt = TTS.from_exported(bundle, backend="tensorrt", trt_components=("t3",), trt_runner=fake_runners(bundle))
    assert trt.graph_backends["t3_decode"] == "tensorrt" and trt.graph_backends["s3gen_cfm_loop2"] == "onnxruntime"
    with pytest.raises(ValueError, match="neither a component"):
        TTS.from_exported(bundle, backend="tensorrt", trt_components=("vocoder",), trt_runner=fake_runners(bundle))
    with pytest.raises(ValueError, match="share state"):
        TTS.from_exported(bundle, backend="tensorrt", trt_components=("t3_prefill",),
                          trt_runner=fake_runners(bundle))
    with pytest.raises(TypeError, match="backend='tensorrt'"):
        TTS.from_exported(bundle, trt_components=("t3",))


# ------------------------------------------------------------------------------ without TensorRT / a GPU


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_without_tensorrt_the_error_says_how_to_install(bundle):
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        TTS.from_exported(bundle, backend="tensorrt")
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):  # before any export
        TTS.from_dummy("nano", device="cuda", backend="tensorrt")


@pytest.mark.skipif(not tensorrt_available() or torch.cuda.is_available(), reason="needs TensorRT without a GPU")
def test_without_a_gpu_the_error_says_so(bundle):
    with pytest.raises(EngineError, match="CUDA GPU"):
        TTS.from_exported(bundle, backend="tensorrt")


@pytest.mark.skipif(not tensorrt_available() or not torch.cuda.is_available(),
                    reason="the real TensorRT path needs TensorRT (pip install tensorrt-cu12) and a CUDA GPU")
def test_real_tensorrt_matches_onnxruntime(bundle, ort_tts, tmp_path):
    trt = TTS.from_exported(bundle, device="cuda", backend="tensorrt", engine_cache=tmp_path / "engines")
    assert trt.graph_backends["t3_decode"] == "tensorrt", trt.source
    tok = dict(seed=3, max_new_tokens=10, stop_on_eos=False, **NEAR_GREEDY)
    assert torch.equal(trt.t3_tokens("Hello there.", **tok).cpu(), ort_tts.t3_tokens("Hello there.", **tok).cpu())
    want, got = ort_tts.generate("Hello there.", **GEN), trt.generate("Hello there.", **GEN)
    assert got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max()) < 5e-2  # TensorRT's fp32 may use TF32
    # CUDA graphs: a request twice (the second replays the graphs the first one's repeated shapes got)
    graphs = TTS.from_exported(bundle, device="cuda", backend="tensorrt", engine_cache=tmp_path / "engines",
                               trt_cuda_graphs=True)
    first, second = graphs.generate("Hello there.", **GEN), graphs.generate("Hello there.", **GEN)
    assert float((first - want).abs().max() / want.abs().max()) < 5e-2
    assert torch.equal(first, second)


def test_cuda_graphs_are_a_tensorrt_option(bundle):
    from chatterbox_rt.export.ort_backend import load_exported

    with pytest.raises(ValueError, match="trt_cuda_graphs"):
        load_exported(bundle, trt_cuda_graphs=True)
