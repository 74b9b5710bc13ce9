"""The Triton launchers cfg_euler_triton / cfg_euler_triton_ / euler_triton (kernels/cfg_euler_op.py)
against their torch references and the CFM loop's own update.

Runs on CUDA when present, else on CPU under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported).
NOTE: the interpreter rounds fp32 -> bf16 toward zero, not to nearest, so bf16 results there are
up to one ulp off the reference; the TOL table's bf16 tolerance covers it.
"""

import pytest
import torch
from _tolerances import (
    CUDA,
    DEVICE,
    DTYPES,
    TOL,
    assert_close_dtype,
    assert_reduction_close,
    assert_verbose_allclose,
    import_without_triton,
    triton_marks,
)
from chatterbox_rt.kernels import cfg_euler_op as mod
from chatterbox_rt.kernels.cfg_euler_op import (
    cfg_euler_ref,
    cfg_euler_triton,
    cfg_euler_triton_,
    euler_ref,
    euler_triton,
)

pytestmark = triton_marks(mod.HAS_TRITON)

BATCHES = (1, 3)
CHANNELS = (1, 63, 80, 513)
LENGTHS = (1, 7, 257)
CFG_RATE = 0.7  # FlowConfig's default guidance weight
T_SPAN = torch.tensor([0.0, 0.13, 0.4, 1.0])  # uneven steps, as the cosine schedule's


def _inputs(B, C, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, generator=g).to(DEVICE, dtype)
    v = torch.randn(2 * B, C, T, generator=g).to(DEVICE, dtype)
    return x, v


def _dt(kind, dtype, k=1):
    """dt = t_span[k+1] - t_span[k] as the loop sees it: a float, or a device view (no sync)."""
    t_span = T_SPAN.to(DEVICE, dtype)
    if kind == "float":
        return float(t_span[k + 1].float() - t_span[k].float())
    return t_span.diff()[k]  # 0-d view on the device


def _model_update(x, v, t_span, k, w):
    """Verbatim CausalCFM._solve_euler_cfg's update, in the storage dtype."""
    B = x.shape[0]
    t, r = t_span[k], t_span[k + 1]
    v_cond, v_uncond = v[:B], v[B:]
    return x + (r - t) * ((1.0 + w) * v_cond - w * v_uncond)


@pytest.mark.parametrize("dt_kind", ("float", "tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("B", BATCHES)
def test_cfg_euler_matches_ref(B, C, T, dtype, dt_kind):
    x, v = _inputs(B, C, T, dtype)
    dt = _dt(dt_kind, dtype)
    out = cfg_euler_triton(x, v, dt, CFG_RATE)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_close_dtype(out, cfg_euler_ref(x, v, dt, CFG_RATE, upcast=True), name="cfg_euler vs fp32 ref")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cfg_euler_equals_model_update(dtype):
    """fp32 (the CFM's default): the model's expression within TOL. fp16/bf16: the model's
    expression rounds four times in the storage dtype and is itself off the exact result by more
    than TOL near zero (e.g. 456 of 395k elements for fp16 at dt = 0.6), while the kernel rounds once;
    so there flash-attention's rule applies: the kernel's error against the fp32 update is at most
    twice the model expression's own error, plus the table's atol."""
    x, v = _inputs(3, 80, 257, dtype, seed=1)
    t_span = T_SPAN.to(DEVICE, dtype)
    for k in range(len(T_SPAN) - 1):
        out = cfg_euler_triton(x, v, t_span.diff()[k], CFG_RATE)
        model = _model_update(x, v, t_span, k, CFG_RATE)
        if dtype == torch.float32:
            assert_close_dtype(out, model, name=f"step {k}")
        else:
            exact = _model_update(x.float(), v.float(), t_span.float(), k, CFG_RATE)
            assert_reduction_close(out, exact, model, atol=TOL[dtype]["atol"], name=f"step {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BATCHES)
def test_cfg_euler_inplace_writes_x_and_both_halves(B, dtype):
    C, T = 80, 257
    x, v = _inputs(B, C, T, dtype, seed=2)
    t_span = T_SPAN.to(DEVICE, dtype)
    want = cfg_euler_triton(x, v, t_span.diff()[0], CFG_RATE)
    x_in = torch.full((2 * B, C, T), float("nan"), device=DEVICE, dtype=dtype)
    ptr = x.data_ptr()
    ret = cfg_euler_triton_(x, v, t_span.diff()[0], CFG_RATE, x_in)
    assert ret is x and x.data_ptr() == ptr
    assert torch.equal(x, want)
    assert torch.equal(x_in[:B], x) and torch.equal(x_in[B:], x)


def test_cfg_euler_inplace_loop_matches_model_loop():
    """Three steps of the loop as cfg_euler_ serves it (x_in written by the kernel) against the
    model's own loop (x_in copied from x each step), with a toy estimator."""
    B, C, T = 2, 80, 63
    x0, _ = _inputs(B, C, T, torch.float32, seed=3)
    weight = torch.linspace(-1, 1, 2 * B, device=DEVICE)[:, None, None]

    def estimator(x_in, t):
        return torch.tanh(x_in) * weight + t

    t_span = T_SPAN.to(DEVICE)
    x_ref, x_in = x0.clone(), torch.empty(2 * B, C, T, device=DEVICE)
    for k in range(len(T_SPAN) - 1):
        x_in[:B] = x_ref
        x_in[B:] = x_ref
        x_ref = _model_update(x_ref, estimator(x_in, t_span[k]), t_span, k, CFG_RATE)

    x, x_in = x0.clone(), torch.empty(2 * B, C, T, device=DEVICE)
    x_in[:B] = x
    x_in[B:] = x
    dts = t_span.diff()
    for k in range(len(T_SPAN) - 1):
        cfg_euler_triton_(x, estimator(x_in, t_span[k]), dts[k], CFG_RATE, x_in)
    assert_close_dtype(x, x_ref, name="x after 3 steps")


@pytest.mark.parametrize("dt_kind", ("float", "tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,T", ((1, 1), (80, 257), (513, 7)))
@pytest.mark.parametrize("B", BATCHES)
def test_euler_meanflow(B, C, T, dtype, dt_kind):
    x, v2 = _inputs(B, C, T, dtype, seed=4)
    v = v2[:B].contiguous()
    dt = _dt(dt_kind, dtype, k=2)
    out = euler_triton(x, v, dt)
    assert_close_dtype(out, euler_ref(x, v, dt, upcast=True), name="euler vs fp32 ref")
    t_span = T_SPAN.to(DEVICE, dtype)
    t, r = t_span[2][None], t_span[3][None]  # CausalCFM._basic_euler's update, verbatim
    model = x + (r - t) * v
    if dtype == torch.float32:
        assert_close_dtype(out, model, name="euler vs model update")
    else:  # two roundings in the storage dtype against the kernel's one: see the CFG test
        exact = x.float() + (r - t).float() * v.float()
        assert_reduction_close(out, exact, model, atol=TOL[dtype]["atol"], name="euler vs model update")


def test_out_and_in_place_aliasing():
    x, v = _inputs(3, 80, 7, torch.float32, seed=5)
    want = cfg_euler_ref(x, v, 0.25, CFG_RATE)
    out = torch.empty_like(x)
    assert cfg_euler_triton(x, v, 0.25, CFG_RATE, out=out) is out
    assert_close_dtype(out, want)
    y = x.clone()
    cfg_euler_triton(y, v, 0.25, CFG_RATE, out=y)
    assert_close_dtype(y, want)
    y = x.clone()
    euler_triton(y, v[:3].contiguous(), 0.25, out=y)
    assert_close_dtype(y, euler_ref(x, v[:3], 0.25))


def test_dt_one_element_tensor_shapes():
    x, v = _inputs(1, 80, 7, torch.float16, seed=6)
    for dt in (torch.tensor(0.3, device=DEVICE), torch.tensor([0.3], device=DEVICE),
               torch.tensor([[0.3]], device=DEVICE, dtype=torch.float64)):
        assert_verbose_allclose(cfg_euler_triton(x, v, dt, CFG_RATE), cfg_euler_ref(x, v, 0.3, CFG_RATE),
                                **TOL[torch.float16])


def test_bad_inputs_raise():
    B, C, T = 2, 80, 7
    x, v = _inputs(B, C, T, torch.float32)
    with pytest.raises(ValueError, match=r"v must be \[2B, C, T\]"):
        cfg_euler_triton(x, v[:B].contiguous(), 0.1, CFG_RATE)
    with pytest.raises(ValueError, match=r"v must be \[2B, C, T\]"):
        cfg_euler_triton(x, v[:, :C - 1].contiguous(), 0.1, CFG_RATE)
    with pytest.raises(ValueError, match=r"v must be \[2B, C, T\]"):
        cfg_euler_triton(x, v[..., :T - 1].contiguous(), 0.1, CFG_RATE)
    with pytest.raises(ValueError, match=r"v must be \[B, C, T\]"):
        euler_triton(x, v, 0.1)
    with pytest.raises(ValueError, match=r"x must be \[B, C, T\]"):
        cfg_euler_triton(x[0], v[0], 0.1, CFG_RATE)
    with pytest.raises(ValueError, match="x_in must be"):
        cfg_euler_triton_(x, v, 0.1, CFG_RATE, torch.empty(B, C, T, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        cfg_euler_triton(x, v, 0.1, CFG_RATE, out=torch.empty(B, C, T, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="one element"):
        cfg_euler_triton(x, v, torch.tensor([0.1, 0.2], device=DEVICE), CFG_RATE)
    with pytest.raises(ValueError, match="contiguous"):
        cfg_euler_triton(x.transpose(1, 2).contiguous().transpose(1, 2), v, 0.1, CFG_RATE)


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter refusal")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    x, v = _inputs(1, 4, 3, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        cfg_euler_triton(x, v, 0.1, CFG_RATE)


def test_imports_and_refuses_cleanly_without_triton(monkeypatch):
    fresh = import_without_triton(monkeypatch, mod)
    assert fresh.HAS_TRITON is False
    x, v = _inputs(1, 4, 3, torch.float32)
    assert_close_dtype(fresh.cfg_euler_ref(x, v, 0.1, CFG_RATE), cfg_euler_ref(x, v, 0.1, CFG_RATE))
    with pytest.raises(RuntimeError, match="pip install triton"):
        fresh.cfg_euler_triton(x, v, 0.1, CFG_RATE)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_real_size_and_graph_capture(dtype):
    """S3Gen's real shape (80 mel channels, ~10 s of 50 Hz frames, batch 2) and a CUDA graph that
    replays with a dt that changes on the device between replays."""
    B, C, T = 2, 80, 500
    x, v = _inputs(B, C, T, dtype, seed=7)
    t_span = T_SPAN.to(DEVICE, dtype)
    assert_close_dtype(cfg_euler_triton(x, v, t_span.diff()[1], CFG_RATE), _model_update(x, v, t_span, 1, CFG_RATE))

    dt = torch.zeros(1, device=DEVICE, dtype=dtype)
    xs, x_in = x.clone(), torch.empty(2 * B, C, T, device=DEVICE, dtype=dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cfg_euler_triton_(xs, v, dt, CFG_RATE, x_in)  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cfg_euler_triton_(xs, v, dt, CFG_RATE, x_in)
    for step in (0.1, 0.25):
        xs.copy_(x)
        dt.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_dtype(xs, cfg_euler_ref(x, v, dt, CFG_RATE))
        assert torch.equal(x_in[:B], xs) and torch.equal(x_in[B:], xs)
