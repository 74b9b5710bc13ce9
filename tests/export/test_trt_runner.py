"""``TensorRTRunner`` (bindings, reused buffers, CUDA-graph capture) against stand-ins for TensorRT
and CUDA that keep their memory semantics on the CPU: the engine reads its inputs from, and writes
its outputs to, the raw addresses the runner binds (``set_tensor_address``), and a launch made
while a stream is being captured is recorded, not run, then run on each ``replay()``. So a replay
that read the caller's tensors instead of the graph's static inputs, or a capture that baked in
the wrong shapes, gives wrong numbers here, as it would on a GPU."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chatterbox_rt.export.tensorrt import TensorRTRunner

_CTYPES = {"f32": (ctypes.c_float, np.float32), "i64": (ctypes.c_int64, np.int64)}


def _view(ptr: int, shape, kind: str) -> np.ndarray:
    ct, _ = _CTYPES[kind]
    n = int(np.prod(shape)) if len(shape) else 1
    return np.ctypeslib.as_array((ct * max(n, 1)).from_address(ptr))[:n].reshape(shape)


class FakeCuda:
    """The ``_CudaApi`` calls: streams are tokens, a graph records the launches made while it is
    being captured."""

    def __init__(self, fail_capture=False):
        self.capturing = None
        self.fail_capture = fail_capture

    class Stream:
        def __init__(self, handle):
            self.cuda_stream = handle

        def wait_stream(self, other):
            """Nothing to order: the stand-in runs every launch when it is made (or replayed)."""

    class Graph:
        def __init__(self):
            self.launches = []

        def replay(self):
            for launch in self.launches:
                launch()

    def current_stream(self, device):
        return self.Stream(0)

    def new_stream(self, device):
        return self.Stream(7)

    def stream(self, stream):
        return contextlib.nullcontext()

    def new_graph(self):
        return self.Graph()

    @contextlib.contextmanager
    def capture(self, graph, stream):
        assert stream.cuda_stream != 0, "capture on the default stream"
        self.capturing = graph.launches
        try:
            if self.fail_capture:
                raise RuntimeError("operation not permitted when stream is capturing")
            yield
        finally:
            self.capturing = None


class FakeEngine:
    """y[b, t] = 2 x[b, t] + idx[b] (float32 x [B, T], int64 idx [B]); ``data_dependent``: y's
    shape reads -1, as a nonzero-like output's does."""

    num_io_tensors = 3
    device_memory_size_v2 = 4096

    def __init__(self, cuda, data_dependent=False, shared_memory=True):
        self.cuda, self.data_dependent = cuda, data_dependent
        self.executes = 0
        self.memory = []
        if not shared_memory:
            self.create_execution_context_without_device_memory = None

    def get_tensor_name(self, i):
        return ("x", "idx", "y")[i]

    def get_tensor_mode(self, name):
        return 0 if name in ("x", "idx") else 1

    def get_tensor_dtype(self, name):
        return "i64" if name == "idx" else "f32"

    def create_execution_context(self):
        return FakeContext(self)

    def create_execution_context_without_device_memory(self):  # set to None on an instance: no sharing
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr = engine, {}, {}

    def set_device_memory(self, ptr, size):
        self.engine.memory.append((ptr, size))

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def get_tensor_shape(self, name):
        return (-1,) if self.engine.data_dependent else self.shapes["x"]

    def execute_async_v3(self, stream_handle):
        # like a kernel launch: the shapes and addresses are taken now, the work runs now or on replay
        launch = functools.partial(self._compute, dict(self.shapes), dict(self.addr))
        if self.engine.cuda.capturing is not None:
            self.engine.cuda.capturing.append(launch)
        else:
            launch()
        return True

    def _compute(self, shapes, addr):
        self.engine.executes += 1
        x = _view(addr["x"], shapes["x"], "f32")
        idx = _view(addr["idx"], shapes["idx"], "i64")
        _view(addr["y"], shapes["x"], "f32")[...] = 2 * x + idx[:, None]


def fake_trt(engine):
    return SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine),
        TensorIOMode=SimpleNamespace(INPUT=0, OUTPUT=1),
        float32="f32", int64="i64", float16="f16", bfloat16="bf16", int32="i32", bool="b", int8="i8")


def make_runner(tmp_path, *, data_dependent=False, fail_capture=False, shared_memory=True, **kw):
    cuda = FakeCuda(fail_capture)
    engine = FakeEngine(cuda, data_dependent, shared_memory)
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"plan")
    runner = TensorRTRunner(plan, _trt=fake_trt(engine), _cuda=cuda, _device="cpu", **kw)
    return runner, engine


def feeds(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, T, generator=g), "idx": torch.randint(0, 5, (B,), generator=g)}


def want(f):
    return 2 * f["x"] + f["idx"][:, None].float()


def test_plain_runs_bind_and_reuse_buffers(tmp_path):
    r, engine = make_runner(tmp_path)
    a = r(feeds(2, 5, 0))["y"]
    assert torch.equal(a, want(feeds(2, 5, 0)))
    b = r(feeds(1, 3, 1))["y"]  # smaller: a view of the same buffer
    assert torch.equal(b, want(feeds(1, 3, 1))) and b.data_ptr() == a.data_ptr()
    c = r(feeds(3, 9, 2))["y"]  # larger: the buffer grows
    assert torch.equal(c, want(feeds(3, 9, 2)))
    assert r.stats == {"captures": 0, "replays": 0, "plain": 3} and engine.executes == 3


def test_a_repeated_shape_is_captured_then_replayed(tmp_path):
    r, engine = make_runner(tmp_path, cuda_graph=True)
    assert torch.equal(r(feeds(2, 5, 0))["y"], want(feeds(2, 5, 0)))  # first sight: not captured
    assert r.stats["captures"] == 0
    y1 = r(feeds(2, 5, 1))["y"]  # second: captured, and this call's outputs computed
    assert torch.equal(y1, want(feeds(2, 5, 1))) and r.stats["captures"] == 1
    executes = engine.executes
    for seed in (2, 3, 4):  # replays read the new inputs through the graph's static buffers
        f = feeds(2, 5, seed)
        y = r(f)["y"]
        assert torch.equal(y, want(f)), seed
        assert y.data_ptr() == y1.data_ptr()  # the graph's output buffer, valid until the next call
    assert r.stats["replays"] == 3 and engine.executes == executes + 3
    # another shape set runs uncaptured until it repeats, and does not disturb the first graph
    assert torch.equal(r(feeds(1, 7, 5))["y"], want(feeds(1, 7, 5)))
    assert torch.equal(r(feeds(1, 7, 6))["y"], want(feeds(1, 7, 6))) and r.stats["captures"] == 2
    assert torch.equal(r(feeds(2, 5, 7))["y"], want(feeds(2, 5, 7)))
    assert torch.equal(r(feeds(1, 7, 8))["y"], want(feeds(1, 7, 8)))
    assert r.stats["replays"] == 5
    # every graph has its own context; they share the engine's activation memory
    assert len(engine.memory) == 2 and len({p for p, _ in engine.memory}) == 1
    assert engine.memory[0][1] == FakeEngine.device_memory_size_v2


def test_graphs_are_bounded_least_recently_used_first(tmp_path):
    r, _ = make_runner(tmp_path, cuda_graph=True, capture_after=1, max_graphs=2)
    for T in (3, 4, 5):
        r(feeds(1, T, T))
    assert [k[0][1] for k in r._graphs] == [(1, 4), (1, 5)]
    f = feeds(1, 3, 9)
    assert torch.equal(r(f)["y"], want(f))  # recaptured
    assert r.stats["captures"] == 4 and len(r._graphs) == 2


def test_data_dependent_outputs_are_not_captured(tmp_path):
    r, _ = make_runner(tmp_path, cuda_graph=True, capture_after=1, data_dependent=True)
    r.context.get_tensor_shape = lambda name: r.context.shapes["x"]  # the plain path's context resolves it
    for seed in range(3):
        f = feeds(2, 4, seed)
        assert torch.equal(r(f)["y"], want(f))
    assert r.stats == {"captures": 0, "replays": 0, "plain": 3}
    assert "data-dependent" in next(iter(r._uncapturable.values()))


def test_a_failed_capture_falls_back_and_is_not_retried(tmp_path, caplog):
    r, _ = make_runner(tmp_path, cuda_graph=True, capture_after=1, fail_capture=True)
    with caplog.at_level(logging.WARNING, logger="chatterbox_rt.export.tensorrt"):
        f = feeds(2, 4, 0)
        assert torch.equal(r(f)["y"], want(f))  # the launch before capture computed it
    assert "capture failed" in caplog.text
    for seed in (1, 2):
        f = feeds(2, 4, seed)
        assert torch.equal(r(f)["y"], want(f))
    assert r.stats == {"captures": 0, "replays": 0, "plain": 2}


def test_without_shared_memory_each_graph_context_has_its_own(tmp_path):
    r, engine = make_runner(tmp_path, cuda_graph=True, capture_after=1, shared_memory=False)
    f = feeds(2, 4, 0)
    assert torch.equal(r(f)["y"], want(f)) and r.stats["captures"] == 1 and engine.memory == []


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="capture_after"):
        make_runner(tmp_path, cuda_graph=True, capture_after=0)
