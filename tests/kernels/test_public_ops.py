"""The public ops of ``chatterbox_rt.kernels`` called as a user calls them: dispatched (C++ or plain
torch on a CPU, CUDA -> Triton -> torch on a GPU), with their documented signatures and defaults,
``CHATTERBOX_RT_KERNELS`` honoured, float64 through plain torch, names never shadowed by submodules,
the iSTFT's empty outputs on every backend, and the Triton backend's compute-capability floor.

CPU runs here set ``TRITON_INTERPRET=0`` unless a test asks for the Triton backend: a user's CPU
process has no interpreter, and the public ops must not need it. Every op module is imported at
collection (interpreter on, tests/conftest.py), so no Triton kernel is first defined with it off.
"""
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import types

import pytest
import torch

import chatterbox_rt.kernels as K
from chatterbox_rt.kernels import _native, cfg_euler_op, dispatch, istft_op, sample_op, snake_op
from chatterbox_rt.kernels.cfg_euler_op import cfg_euler_ref, euler_ref
from chatterbox_rt.kernels.dispatch import ENV_VAR, KernelUnavailable
from chatterbox_rt.kernels.istft_op import istft_ref
from chatterbox_rt.kernels.sample_op import processed_probs_ref, sample_ref
from chatterbox_rt.kernels.snake_op import snake_ref
from chatterbox_rt.models.s3gen.hift import hann_window

from _tolerances import TOL, assert_close_dtype, assert_reduction_close, assert_verbose_allclose

PUBLIC = ("snake", "istft", "cfg_euler", "cfg_euler_", "euler", "sample")
FORMS = ("snake_triton", "istft_triton", "cfg_euler_triton", "cfg_euler_triton_", "euler_triton", "sample_triton",
         "snake_ref", "istft_ref", "cfg_euler_ref", "euler_ref", "sample_ref", "processed_probs_ref")
HAS_TRITON = dispatch._has_triton()
CPP = _native.available("cpu")
AUTO_CPU = "cpp" if CPP else "native"
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
N_FFT, HOP, CFG_RATE = 16, 4, 0.7

needs_cpp = pytest.mark.skipif(not CPP, reason="native extension chatterbox_rt._C is not built with CPU kernels")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# "auto" is the automatic choice (cpp where built, else native); "triton" runs under the interpreter.
CPU_BACKENDS = ["auto", "native", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]


@pytest.fixture
def backend(monkeypatch):
    """``backend(name)``: force ``CHATTERBOX_RT_KERNELS`` (None or "auto": the automatic choice), with
    the interpreter only for "triton"; ``dispatch.reset()`` after each change and at the end."""
    def force(name, interpret=None):
        if name in (None, "auto"):
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, name)
        interpret = name == "triton" if interpret is None else interpret
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
        dispatch.reset()

    force(None)
    yield force
    dispatch.reset()


@pytest.fixture
def spy(monkeypatch):
    """``spy(op, backend)`` wraps the implementation the public op should reach and returns its call
    list: the public op must go through the dispatch table, not around it. The public ``sample``
    runs ``sample_op.sample_ref`` where dispatch answers None (native), so that is spied there."""
    def install(op, name):
        name = AUTO_CPU if name == "auto" else name
        if op == "sample" and name != "triton":  # no cpp form: native, i.e. None -> sample_ref
            target, attr, obj = sample_op.sample_ref, "sample_ref", sample_op
        else:
            target, attr, obj = dispatch.IMPLS[op][name], name, dispatch.IMPLS[op]
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(args[0].dtype)
            return target(*args, **kwargs)

        if obj is sample_op:
            monkeypatch.setattr(sample_op, attr, wrapped)
        else:
            monkeypatch.setitem(obj, attr, wrapped)
        dispatch.reset()
        return calls

    yield install
    dispatch.reset()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _snake_inputs(dtype, shape=(2, 3, 37), seed=0):
    x = 2 * torch.randn(shape, generator=_gen(seed))
    alpha = 0.2 + 1.8 * torch.rand(shape[1], generator=_gen(seed + 1))
    return x.to(dtype), alpha.to(dtype)


def _spec(B, F, dtype=torch.float32, seed=0):
    return torch.randn(B, N_FFT + 2, F, generator=_gen(seed)).to(dtype)


def _euler_inputs(dtype, B=2, C=5, T=11, seed=0):
    g = _gen(seed)
    return torch.randn(B, C, T, generator=g).to(dtype), torch.randn(2 * B, C, T, generator=g).to(dtype)


def _check(out, fp32_ref, own_dtype_ref, name, dtype=None):
    """For inputs of ``dtype`` (default: the reference's). fp32: the TOL table against the fp32 math.
    fp16/bf16: flash-attention's rule against the fp32 math (at most twice the error of the model's
    own-dtype expression, plus the table's atol), since the model rounds after each op and the
    kernels once. float64: the plain-torch expression itself."""
    dtype = own_dtype_ref.dtype if dtype is None else dtype
    if dtype == torch.float64:
        assert torch.equal(out, own_dtype_ref), f"{name}: float64 must take the plain-torch path"
    elif dtype == torch.float32:
        assert_verbose_allclose(out, fp32_ref, name=name, **TOL[torch.float32])
    else:
        assert_reduction_close(out, fp32_ref, own_dtype_ref, atol=TOL[dtype]["atol"], name=name)


# ------------------------------------------------------------------------------ names and signatures

def _assert_public_ops(module):
    for name in PUBLIC:
        fn = getattr(module, name)
        assert isinstance(fn, types.FunctionType), f"chatterbox_rt.kernels.{name} is {fn!r}, not the op"
        assert fn.__module__ == "chatterbox_rt.kernels", f"{name} resolves to {fn.__module__}.{fn.__qualname__}"
        assert getattr(module, name) is fn, f"{name} changed between two accesses"


def test_public_ops_are_the_dispatched_functions_and_stay_so():
    _assert_public_ops(K)
    for name in FORMS:
        assert callable(getattr(K, name)), name
    assert K.snake_triton is snake_op.snake_triton and K.snake_ref is snake_op.snake_ref
    assert K.cfg_euler_triton_ is cfg_euler_op.cfg_euler_triton_ and K.sample_triton is sample_op.sample_triton
    assert K.KernelUnavailable is KernelUnavailable and K.dispatch is dispatch
    assert set(PUBLIC) | set(FORMS) <= set(K.__all__) and set(K.__all__) <= set(dir(K))


def test_names_not_shadowed_after_importing_every_submodule_or_reloading():
    subs = [m.name for m in pkgutil.iter_modules(K.__path__)]
    assert {"snake_op", "istft_op", "cfg_euler_op", "sample_op", "dispatch"} <= set(subs)
    assert not set(subs) & set(PUBLIC), "a submodule named after a public op rebinds that name when imported"
    for sub in subs:
        importlib.import_module(f"chatterbox_rt.kernels.{sub}")
    from chatterbox_rt.kernels import cfg_euler, cfg_euler_, euler, istft, sample, snake

    for fn in (snake, istft, cfg_euler, cfg_euler_, euler, sample):
        assert isinstance(fn, types.FunctionType) and fn.__module__ == "chatterbox_rt.kernels", fn
    _assert_public_ops(importlib.reload(K))
    _assert_public_ops(K)


def test_fresh_interpreter_without_triton_at_import_and_submodules_first():
    """A new process: the package imports without triton; then every submodule is imported before
    the package's names are read, and each public name is still the op."""
    code = f"""
import importlib, pkgutil, sys, types
import chatterbox_rt.kernels as K
assert 'triton' not in sys.modules, 'importing chatterbox_rt.kernels imported triton'
for m in pkgutil.iter_modules(K.__path__):
    importlib.import_module('chatterbox_rt.kernels.' + m.name)
import chatterbox_rt.kernels as K
for name in {PUBLIC!r}:
    fn = getattr(K, name)
    assert callable(fn) and not isinstance(fn, types.ModuleType), (name, fn)
    assert fn.__module__ == 'chatterbox_rt.kernels' and getattr(K, name) is fn, (name, fn)
from chatterbox_rt.kernels import snake
assert snake is K.snake
print('ok')
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_signatures_and_defaults():
    def params(fn):
        return {n: (p.kind, p.default) for n, p in inspect.signature(fn).parameters.items()}

    E, PK, KO = inspect.Parameter.empty, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    assert params(K.snake) == {"x": (PK, E), "alpha": (PK, E), "eps": (PK, 1e-9), "mask": (PK, None)}
    assert params(K.istft) == {"spec": (PK, E), "window": (PK, E), "n_fft": (PK, 16), "hop": (PK, 4),
                               "audio_limit": (PK, 0.99), "n_frames": (PK, None)}
    assert params(K.cfg_euler) == {n: (PK, E) for n in ("x", "v", "dt", "cfg_rate")}
    assert params(K.cfg_euler_) == {n: (PK, E) for n in ("x", "v", "dt", "cfg_rate", "x_in")}
    assert params(K.euler) == {n: (PK, E) for n in ("x", "v", "dt")}
    assert params(K.sample) == {"logits": (PK, E), "seen": (PK, E), "order": (KO, E), "temperature": (KO, 1.0),
                                "top_p": (KO, 1.0), "min_p": (KO, 0.0), "top_k": (KO, 0),
                                "repetition_penalty": (KO, 1.0), "cfg_weight": (KO, None), "seed": (KO, 0),
                                "offset": (KO, 0)}


# ------------------------------------------------------------------------------ each op on CPU, each backend

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_snake(name, dtype, backend, spy):
    backend(name)
    calls = spy("snake", name)
    x, alpha = _snake_inputs(dtype)
    y = K.snake(x, alpha)
    assert calls and y.dtype == dtype and y.shape == x.shape
    _check(y, snake_ref(x.float(), alpha.float()), snake_ref(x, alpha), f"snake {name}")
    mask = (torch.arange(37)[None, None, :] < torch.tensor([37, 20])[:, None, None]).to(dtype)
    ym = K.snake(x, alpha, mask=mask)
    _check(ym, snake_ref(x.float(), alpha.float(), mask=mask.float()), snake_ref(x, alpha, mask=mask),
           f"masked snake {name}")
    assert (ym[1, :, 20:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_istft(name, dtype, backend, spy):
    backend(name)
    calls = spy("istft", name)
    spec, w = _spec(2, 9, dtype), hann_window(N_FFT)
    out = K.istft(spec, w)
    assert calls and out.dtype == torch.float32 and out.shape == (2, HOP * 8)
    _check(out, istft_ref(spec, w, upcast=True), istft_ref(spec, w), f"istft {name}", dtype)
    n_frames = torch.tensor([9, 4])
    out = K.istft(spec, w, n_frames=n_frames)
    _check(out, istft_ref(spec, w, n_frames=n_frames, upcast=True), istft_ref(spec, w, n_frames=n_frames),
           f"masked istft {name}", dtype)


@pytest.mark.parametrize("dt_kind", ("float", "tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_cfg_euler_and_euler(name, dtype, dt_kind, backend, spy):
    backend(name)
    calls = {op: spy(op, name) for op in ("cfg_euler", "cfg_euler_", "euler")}
    x, v = _euler_inputs(dtype)
    dt = 0.27 if dt_kind == "float" else torch.tensor([0.0, 0.27], dtype=dtype).diff()[0]
    x0 = x.clone()

    out = K.cfg_euler(x, v, dt, CFG_RATE)
    assert out is not x and torch.equal(x, x0), "cfg_euler must leave x untouched"
    assert out.dtype == dtype and out.shape == x.shape
    _check(out, cfg_euler_ref(x, v, dt, CFG_RATE, upcast=True), cfg_euler_ref(x, v, dt, CFG_RATE, upcast=False),
           f"cfg_euler {name}")

    x_in = torch.full((4, 5, 11), float("nan"), dtype=dtype)
    ret = K.cfg_euler_(x, v, dt, CFG_RATE, x_in)
    assert ret is x
    if dtype == torch.float64:
        assert torch.equal(x, out)
    else:
        assert_close_dtype(x, out, name=f"cfg_euler_ {name} vs cfg_euler")
    assert torch.equal(x_in[:2], x) and torch.equal(x_in[2:], x)

    v1 = v[:2].contiguous()
    out = K.euler(x0, v1, dt)
    assert out.dtype == dtype
    _check(out, euler_ref(x0, v1, dt, upcast=True), euler_ref(x0, v1, dt, upcast=False), f"euler {name}")
    assert all(calls.values()), {op: len(c) for op, c in calls.items()}


def test_cfg_euler_float64_dt_tensor_and_mixed_dtypes(backend):
    """Forms the CFM never passes but a user may: a float64 dt tensor with fp32 x, and fp32 v with
    bf16 x (plain torch's promotion)."""
    x, v = _euler_inputs(torch.float32)
    dt = torch.tensor(0.3, dtype=torch.float64)
    assert_close_dtype(K.cfg_euler(x, v, dt, CFG_RATE), cfg_euler_ref(x, v, 0.3, CFG_RATE))
    assert_close_dtype(K.euler(x, v[:2], dt), euler_ref(x, v[:2], 0.3))
    xb = x.bfloat16()
    out = K.cfg_euler(xb, v, 0.3, CFG_RATE)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cfg_euler_ref(xb, v, 0.3, CFG_RATE, upcast=False))


def _sample_inputs(R, V, cfg, dtype=torch.float32, seed=0):
    g = _gen(seed)
    logits = (torch.randn(2 * R if cfg else R, V, generator=g) * 3).to(dtype)
    return logits, torch.rand(R, V, generator=g) < 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_sample(name, dtype, backend, spy):
    backend(name)
    calls = spy("sample", name)
    want_fn = sample_op.sample_triton if name == "triton" else sample_ref
    R, V = 3, 301
    params = {"temperature": 0.8, "top_p": 0.9, "min_p": 0.05, "top_k": 50, "repetition_penalty": 1.2}
    for order, cfg in (("llama", 0.5), ("gpt", None)):
        logits, seen = _sample_inputs(R, V, cfg is not None, dtype)
        tok = K.sample(logits, seen, order=order, cfg_weight=cfg, seed=7, offset=3, **params)
        assert tok.shape == (R,) and tok.dtype == torch.int64
        assert torch.equal(tok, want_fn(logits, seen, order=order, cfg_weight=cfg, seed=7, offset=3, **params))
        probs = processed_probs_ref(logits, seen, order, cfg_weight=cfg, **params)
        assert (probs[torch.arange(R), tok] > 0).all(), "drew a token the reference chain filtered out"
    # every optional argument has its no-op default: plain softmax sampling
    logits, seen = _sample_inputs(R, V, False, dtype, seed=1)
    tok = K.sample(logits, seen, order="gpt")
    noop = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "top_k": 0, "repetition_penalty": 1.0, "cfg_weight": None}
    assert torch.equal(tok, want_fn(logits, seen, order="gpt", seed=0, offset=0, **noop))
    dead = logits.clone()
    dead[1] = float("-inf")
    assert K.sample(dead, seen, order="llama")[1].item() == -1
    assert calls


def test_sample_argument_errors_on_the_plain_torch_path(backend):
    logits, seen = _sample_inputs(2, 50, True)
    with pytest.raises(ValueError, match="cfg_weight is None"):
        K.sample(logits, seen, order="llama")
    with pytest.raises(ValueError, match="order must be"):
        K.sample(logits, seen, order="mistral", cfg_weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        K.sample(logits, seen, order="llama", cfg_weight=0.5, temperature=0.0)


# ------------------------------------------------------------------------------ CHATTERBOX_RT_KERNELS

def _call_all():
    x, alpha = _snake_inputs(torch.float32)
    xe, v = _euler_inputs(torch.float32)
    logits, seen = _sample_inputs(2, 40, False)
    return {
        "snake": lambda: K.snake(x, alpha),
        "istft": lambda: K.istft(_spec(1, 5), hann_window(N_FFT)),
        "cfg_euler": lambda: K.cfg_euler(xe, v, 0.1, CFG_RATE),
        "cfg_euler_": lambda: K.cfg_euler_(xe.clone(), v, 0.1, CFG_RATE, torch.empty_like(v)),
        "euler": lambda: K.euler(xe, v[:2], 0.1),
        "sample": lambda: K.sample(logits, seen, order="gpt"),
    }


@pytest.mark.parametrize("name", ["native", pytest.param("cpp", marks=needs_cpp)])
def test_override_is_honoured_by_every_public_op(name, backend, spy):
    backend(name)
    calls = {op: spy(op, name) for op in PUBLIC}
    for op, call in _call_all().items():
        call()
        assert calls[op], f"{ENV_VAR}={name}: {op} did not run the {name} form"
    assert dispatch.summary("cpu") == {op: "native" if op == "sample" else name for op in dispatch.OPS}
    assert "cfg_euler" in dispatch.OPS
    # T3 runs its own torch chain when dispatch answers None for sample: the public op's CPU
    # fallback (sample_ref) must not change that.
    assert dispatch.IMPLS["sample"]["native"] is None
    for forced in ("auto", "native", "cpp"):
        backend(forced)
        assert dispatch.DispatchedOp("sample").get(torch.device("cpu")) is None


def test_explicit_backend_that_cannot_run_on_cpu_raises(backend):
    backend("cuda")
    for op, call in _call_all().items():
        if op == "sample":  # no cuda form at all: plain torch, as dispatch documents
            assert call().shape == (2,)
            continue
        with pytest.raises(KernelUnavailable, match="cuda kernels run on cuda tensors"):
            call()
    backend("triton", interpret=False)
    for call in _call_all().values():
        with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1|triton is not installed"):
            call()
    if not CPP:
        backend("cpp")
        with pytest.raises(KernelUnavailable, match="not built"):
            K.snake(*_snake_inputs(torch.float32))


# ------------------------------------------------------------------------------ iSTFT: empty outputs

EMPTY = [(2, 1), (2, 0), (0, 5), (0, 1), (0, 0)]  # (B, F); F <= 1 or B = 0: nothing to write


def _empty_forms():
    forms = {"istft_ref": istft_ref}
    if CPP:
        forms["_native.istft"] = _native.istft
    if HAS_TRITON:
        forms["istft_triton"] = istft_op.istft_triton
    return forms


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("B,F", EMPTY)
def test_istft_empty_outputs_every_form(B, F, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec, w = _spec(B, F, dtype), hann_window(N_FFT)
    want = (B, max(HOP * (F - 1), 0))
    for name, fn in _empty_forms().items():
        for n_frames in (None, torch.full((B,), F)):
            out = fn(spec, w, N_FFT, HOP, 0.99, n_frames=n_frames)
            assert out.shape == want and out.dtype == torch.float32, (name, n_frames, out.shape, out.dtype)
    assert istft_ref(spec, w).shape == want


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_istft_single_frame_through_the_public_op(name, backend, spy):
    backend(name)
    calls = spy("istft", name)
    w = hann_window(N_FFT)
    for dtype in (torch.float32, torch.float16, torch.float64):
        for B, F in EMPTY:
            for n_frames in (None, torch.full((B,), F)):
                out = K.istft(_spec(B, F, dtype), w, n_frames=n_frames)
                assert out.shape == (B, max(HOP * (F - 1), 0)) and out.dtype == torch.float32
    assert calls


# ------------------------------------------------------------------------------ Triton's compute capability

@pytest.fixture
def fake_gpus(monkeypatch):
    """``fake_gpus((7, 5), ...)``: CUDA devices of those compute capabilities, as dispatch sees them."""
    def install(*caps, error=None):
        def capability(device=None):
            if error is not None:
                raise error
            index = device if isinstance(device, int) else (device.index or 0) if device is not None else 0
            return caps[index]

        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
        monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(dispatch, "_has_triton", lambda: True)
        dispatch.reset()

    yield install
    dispatch.reset()  # forget the fake capabilities


def test_triton_needs_compute_capability_7(fake_gpus, backend):
    fake_gpus((6, 1))
    reason = dispatch.why_unavailable("triton", "cuda")
    assert reason is not None and "compute capability >= 7.0" in reason and "6.1" in reason
    auto = dispatch.choose("snake", "cuda").backend
    assert auto in ("cuda", "native") and auto != "triton"
    assert dispatch.choose("sample", "cuda").fn is None  # T3 then runs its torch chain
    backend("triton")
    fake_gpus((6, 1))
    with pytest.raises(KernelUnavailable, match=r"triton.*compute capability >= 7\.0.*6\.1"):
        dispatch.choose("istft", "cuda")
    with pytest.raises(KernelUnavailable, match="compute capability"):
        dispatch.DispatchedOp("sample").get(torch.device("cuda"))
    for cap in ((7, 0), (7, 5), (8, 0), (9, 0)):
        fake_gpus(cap)
        assert dispatch.why_unavailable("triton", "cuda") is None
        assert dispatch.choose("snake", "cuda").backend == "triton"
        assert dispatch.DispatchedOp("sample").get(torch.device("cuda")) is dispatch.IMPLS["sample"]["triton"]


def test_triton_capability_of_every_gpu_and_unreadable(fake_gpus):
    fake_gpus((8, 0), (6, 0))
    assert "cuda:1 has 6.0" in dispatch.why_unavailable("triton", "cuda")
    fake_gpus((8, 0), error=RuntimeError("no driver"))
    assert "cannot read" in dispatch.why_unavailable("triton", "cuda")
    fake_gpus()
    assert "no CUDA device" in dispatch.why_unavailable("triton", "cuda")


def test_bf16_on_triton_below_compute_capability_8_takes_plain_torch(fake_gpus, monkeypatch):
    fake_gpus((7, 5), (8, 6))
    assert dispatch.triton_lacks_bf16(torch.device("cuda", 0))
    assert not dispatch.triton_lacks_bf16(torch.device("cuda", 1))
    assert not dispatch.triton_lacks_bf16(torch.device("cpu"))
    # The wrapper's routing, on CPU tensors standing in for such a GPU's.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_lacks_bf16", lambda device: True)
    launched = []

    def fake_launcher(name):
        real = getattr(snake_op if name == "snake_triton" else sample_op, name)

        def run(x, *args, **kwargs):
            launched.append((name, x.dtype))
            return real(x, *args, **kwargs)
        return run

    monkeypatch.setattr(snake_op, "snake_triton", fake_launcher("snake_triton"))
    monkeypatch.setattr(sample_op, "sample_triton", fake_launcher("sample_triton"))
    x, alpha = _snake_inputs(torch.bfloat16)
    assert torch.equal(dispatch.IMPLS["snake"]["triton"](x, alpha, 1e-9), snake_ref(x, alpha))
    assert launched == []
    dispatch.IMPLS["snake"]["triton"](x.half(), alpha.half(), 1e-9)
    assert launched == [("snake_triton", torch.float16)]
    logits, seen = _sample_inputs(2, 40, False, torch.bfloat16)
    dispatch.IMPLS["sample"]["triton"](logits, seen, order="gpt", temperature=1.0, top_p=1.0, min_p=0.0, top_k=0,
                                       repetition_penalty=1.0, cfg_weight=None, seed=0, offset=0)
    assert launched[-1] == ("sample_triton", torch.float32)  # upcast first: exact, the kernel computes in fp32


# ------------------------------------------------------------------------------ on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_ops_on_cuda(dtype, backend):
    backend("auto")
    dev = "cuda"
    x, alpha = (t.to(dev) for t in _snake_inputs(dtype))
    _check(K.snake(x, alpha), snake_ref(x.float(), alpha.float()), snake_ref(x, alpha), "snake cuda")
    spec, w = _spec(2, 9, dtype).to(dev), hann_window(N_FFT, device=dev)
    _check(K.istft(spec, w), istft_ref(spec, w, upcast=True), istft_ref(spec, w), "istft cuda", dtype)
    for B, F in EMPTY:
        assert K.istft(_spec(B, F, dtype).to(dev), w).shape == (B, max(HOP * (F - 1), 0))
    xe, v = (t.to(dev) for t in _euler_inputs(dtype))
    _check(K.cfg_euler(xe, v, 0.3, CFG_RATE), cfg_euler_ref(xe, v, 0.3, CFG_RATE),
           cfg_euler_ref(xe, v, 0.3, CFG_RATE, upcast=False), "cfg_euler cuda")
    _check(K.euler(xe, v[:2], 0.3), euler_ref(xe, v[:2], 0.3), euler_ref(xe, v[:2], 0.3, upcast=False), "euler cuda")
    logits, seen = (t.to(dev) for t in _sample_inputs(2, 301, False, dtype))
    tok = K.sample(logits, seen, order="gpt", top_k=20)
    probs = processed_probs_ref(logits, seen, "gpt", temperature=1.0, top_p=1.0, min_p=0.0, top_k=20,
                                repetition_penalty=1.0, cfg_weight=None)
    assert (probs[torch.arange(2, device=dev), tok] > 0).all()
