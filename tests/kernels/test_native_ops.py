"""The native ops (csrc/ -> chatterbox_rt._C, kernels/_native.py) against the model's own torch code.

The references are the model's plain-torch expressions, copied here op for op so that they stay
independent of the kernel dispatch (hift.py's Snake may itself run this extension): snake =
Snake.forward's expression; istft = HiFT's head (exp, clip, sin, cos, complex, torch.istft,
clamp) and the masked ``_istft`` overlap-add; cfg_euler/euler = cfm.py's Euler updates. fp32 is held to the TOL
table; low-precision inputs are compared with the fp32 reference cast down (elementwise ops, fp32
math inside), or with flash-attention's rule for the iSTFT's reductions. ``torch.library.opcheck``
checks schemas, Meta kernels and fake-tensor tracing. Skipped when the extension is not built.
"""
import pytest
import torch
import torch.nn.functional as F

from chatterbox_rt.kernels import _native
from chatterbox_rt.models.s3gen.hift import HiFTConfig, hann_window

from _tolerances import DTYPES, TOL, assert_close_dtype, assert_reduction_close, assert_verbose_allclose

if _native.load() is None:
    pytest.skip("native extension chatterbox_rt._C is not built (pip install -e . --no-build-isolation builds it "
                "when a C++ compiler is present)", allow_module_level=True)

ops = torch.ops.chatterbox_rt
CFG = HiFTConfig()
N_FFT, HOP = CFG.n_fft, CFG.hop
EPS = 1e-9
SNAKE_SHAPES = [(1, 1, 7), (3, 63, 129), (1, 513, 33), (2, 4, 1001)]
FRAMES = [1, 2, 5, 37, 121]
BATCHES = [1, 3]
CFG_SHAPES = [(1, 80, 37), (3, 63, 101), (1, 1, 1)]
CFG_RATE = 0.7
FP32_TOL = TOL[torch.float32]

has_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _native.available("cuda")),
                              reason="needs a GPU and an extension built with CUDA")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- references (the model's own expressions) -------------------------------------------------


def _alpha(C, seed=0, lo=0.05, hi=3.0):
    return lo + (hi - lo) * torch.rand(C, generator=_gen(seed))


def _snake_ref(x, alpha, eps=EPS):
    """hift.py Snake.forward's expression (the reference's order)."""
    alpha = alpha[None, :, None]
    return x + (1.0 / (alpha + eps)) * torch.sin(x * alpha).pow(2)


def _head_ref(spec, n_frames=None):
    """HiFTGenerator.decode's head in spec's dtype: exp / sin, then _istft in fp32, then clamp."""
    B, n_fr = spec.shape[0], spec.shape[-1]
    if n_fr == 1:  # torch.istft cannot do a single frame (empty signal)
        return torch.zeros(B, 0)
    magnitude = torch.exp(spec[:, : CFG.n_freq])
    phase = torch.sin(spec[:, CFG.n_freq:])
    magnitude = torch.clip(magnitude.float(), max=CFG.magnitude_max)
    phase = phase.float()
    spec_c = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))  # [B, n_freq, F]
    window = hann_window(N_FFT)
    if n_frames is None:
        wav = torch.istft(spec_c, N_FFT, HOP, N_FFT, window=window)
    else:  # per-row overlap-add and envelope (the frame_mask path)
        frame_mask = (torch.arange(n_fr)[None, :] < n_frames[:, None]).float()[:, None, :]  # [B, 1, F]
        frames = torch.fft.irfft(spec_c * frame_mask, n=N_FFT, dim=1) * window[None, :, None]  # [B, n_fft, F]
        total = N_FFT + HOP * (n_fr - 1)
        y = F.fold(frames, output_size=(1, total), kernel_size=(1, N_FFT), stride=(1, HOP))[:, 0, 0]
        env = F.conv_transpose1d(frame_mask, (window * window)[None, None, :], stride=HOP)[:, 0]
        half = N_FFT // 2
        y, env = y[:, half: total - half], env[:, half: total - half]
        wav = torch.where(env > 1e-11, y / env.clamp_min(1e-11), torch.zeros_like(y))
    return torch.clamp(wav, -CFG.audio_limit, CFG.audio_limit)


def _spec(B, F, seed=0, log_mag_shift=0.0):
    """conv_post-like output: log-magnitudes (exp ~ 0.1 .. 10) then phase logits."""
    spec = torch.randn(B, N_FFT + 2, F, generator=_gen(seed))
    spec[:, : CFG.n_freq] += log_mag_shift
    return spec


def _cfg_ref(x, v, dt, w):
    B = x.shape[0]
    return x + dt * ((1.0 + w) * v[:B] - w * v[B:])


# -- snake --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SNAKE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_snake_matches_hift_snake(shape, dtype):
    B, C, T = shape
    alpha = _alpha(C)
    x = 2.0 * torch.randn(shape, generator=_gen(1))
    if dtype == torch.float32:
        assert_close_dtype(_native.snake(x, alpha), _snake_ref(x, alpha), name="snake fp32")
    else:
        # fp32 math inside: the reference is the expression in fp32 on the rounded inputs, cast down.
        xl, alpha_l = x.to(dtype), alpha.to(dtype)
        ref = _snake_ref(xl.float(), alpha_l.float()).to(dtype)
        assert_close_dtype(_native.snake(xl, alpha_l), ref, name=f"snake {dtype}")


@pytest.mark.parametrize("max_arg", [10.0, 1e3, 3e4])
def test_snake_wide_argument_range(max_arg):
    """|alpha x| up to 1e3 (the polynomial path) and 3e4 (rows routed to std::sin)."""
    C, T = 8, 4097
    alpha = _alpha(C, lo=0.01, hi=50.0)
    x = torch.linspace(-1.0, 1.0, T)[None, None, :] * (max_arg / alpha.max()) * torch.ones(2, C, 1)
    x = x + 1e-3 * torch.randn(x.shape, generator=_gen(2))
    out, ref = _native.snake(x, alpha), _snake_ref(x, alpha)
    assert_close_dtype(out, ref, name=f"snake |ax| <= {max_arg:g}")
    # and as close to the exact value as torch's own fp32 (Sleef) result is
    a64 = alpha.double()[None, :, None]
    exact = x.double() + (1.0 / (a64 + EPS)) * torch.sin((x * alpha[None, :, None]).double()) ** 2
    assert_reduction_close(out, exact, ref, atol=0.0, name=f"snake vs fp64, |ax| <= {max_arg:g}")


@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: rows that take the std::sin redo must still see x
def test_snake_in_place_and_out(scale):
    alpha = _alpha(63)
    x = scale * torch.randn(3, 63, 129, generator=_gen(3))
    ref = _snake_ref(x, alpha)
    _native.snake(x, alpha, out=x)
    assert_close_dtype(x, ref, name="snake in place")


# -- istft --------------------------------------------------------------------------------------


@pytest.mark.parametrize("F", FRAMES)
@pytest.mark.parametrize("B", BATCHES)
def test_istft_fp32_matches_hift_head(B, F):
    spec = _spec(B, F, seed=F)
    out = _native.istft(spec, hann_window(N_FFT), N_FFT, HOP, CFG.audio_limit)
    assert_verbose_allclose(out, _head_ref(spec), name=f"istft B={B} F={F}", **FP32_TOL)


def test_istft_clips_magnitude_and_clamps():
    spec = _spec(2, 37, seed=5, log_mag_shift=4.0)  # many magnitudes above 1e2 and samples past 0.99
    out = _native.istft(spec, hann_window(N_FFT), N_FFT, HOP, CFG.audio_limit)
    assert_verbose_allclose(out, _head_ref(spec), name="istft clipped", **FP32_TOL)
    assert out.abs().max().item() == pytest.approx(CFG.audio_limit)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("F", [5, 121])
def test_istft_low_precision(dtype, F):
    spec = _spec(3, F, seed=7).to(dtype)
    out = _native.istft(spec, hann_window(N_FFT), N_FFT, HOP, CFG.audio_limit)
    assert_reduction_close(out, _head_ref(spec.float()), _head_ref(spec), name=f"istft {dtype}")


@pytest.mark.parametrize("F", [2, 5, 37, 121])
def test_istft_masked_matches_hift_masked_path(F):
    """n_frames [B] = hift.py's frame_mask path (per-row overlap-add and envelope)."""
    B = 3
    spec = _spec(B, F, seed=11)
    n_frames = torch.tensor([F, max(1, F - 3), 1])
    out = _native.istft(spec, hann_window(N_FFT), N_FFT, HOP, CFG.audio_limit, n_frames=n_frames)
    assert_verbose_allclose(out, _head_ref(spec, n_frames), name=f"masked istft F={F}", **FP32_TOL)


def test_istft_masked_hift_lengths():
    """The frame counts HiFT derives from mel lengths (120 frames per mel frame, plus one)."""
    lengths = torch.tensor([2, 1])
    F = 2 * CFG.upsample_factor + 1
    spec = _spec(2, F, seed=13)
    n_frames = lengths * CFG.upsample_factor + 1
    out = _native.istft(spec, hann_window(N_FFT), N_FFT, HOP, CFG.audio_limit, n_frames=n_frames.int())
    assert_verbose_allclose(out, _head_ref(spec, n_frames), name="masked istft (HiFT lengths)", **FP32_TOL)


# -- Euler steps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CFG_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_euler(shape, dtype):
    B = shape[0]
    x = torch.randn(shape, generator=_gen(1))
    v = torch.randn((2 * B, *shape[1:]), generator=_gen(2))
    dt = torch.tensor([0.1234])
    ref = _cfg_ref(x, v, dt, CFG_RATE).to(dtype)  # fp32 math inside, as the op
    xl, vl = x.to(dtype), v.to(dtype)
    if dtype != torch.float32:
        ref = _cfg_ref(xl.float(), vl.float(), dt, CFG_RATE).to(dtype)
    assert_close_dtype(_native.cfg_euler(xl, vl, dt, CFG_RATE), ref, name="cfg_euler")
    assert_close_dtype(_native.cfg_euler(xl, vl, 0.1234, CFG_RATE), ref, name="cfg_euler (float dt)")

    x_in = torch.full((2 * B, *shape[1:]), float("nan"), dtype=dtype)
    x2 = xl.clone()
    assert _native.cfg_euler_(x2, vl, dt, CFG_RATE, x_in) is x2
    assert_close_dtype(x2, ref, name="cfg_euler_ x")
    assert_close_dtype(x_in[:B], ref, name="cfg_euler_ x_in[:B]")
    assert_close_dtype(x_in[B:], ref, name="cfg_euler_ x_in[B:]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler(dtype):
    x = torch.randn(3, 80, 37, generator=_gen(1)).to(dtype)
    v = torch.randn(3, 80, 37, generator=_gen(2)).to(dtype)
    dt = torch.tensor([0.25])
    ref = (x.float() + dt * v.float()).to(dtype)
    assert_close_dtype(_native.euler(x, v, dt), ref, name="euler")
    if dtype == torch.float32:  # the model's own expression, same dtype
        assert_close_dtype(_native.euler(x, v, 0.25), x + dt * v, name="euler (float dt)")


# -- registration, opcheck, bad inputs ------------------------------------------------------------


def test_available():
    assert _native.available("cpu")
    assert not _native.available("tpu")


def _opcheck_cases():
    x = torch.randn(2, 5, 33)
    yield "snake", (torch.empty_like(x), x, torch.rand(5) + 0.1, EPS)
    spec = _spec(2, 9)
    yield "istft", (torch.empty(2, HOP * 8), spec, hann_window(N_FFT), N_FFT, HOP, 0.99, None)
    yield "istft", (torch.empty(2, HOP * 8), spec, hann_window(N_FFT), N_FFT, HOP, 0.99, torch.tensor([9, 4]))
    v = torch.randn(4, 5, 33)
    dt = torch.tensor([0.1])
    yield "cfg_euler", (torch.empty_like(x), x, v, dt, CFG_RATE)
    yield "cfg_euler_refresh", (x.clone(), torch.empty_like(v), v, dt, CFG_RATE)
    yield "euler", (torch.empty_like(x), x, torch.randn_like(x), dt)


@pytest.mark.parametrize("name,args", list(_opcheck_cases()), ids=lambda a: a if isinstance(a, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


def test_meta_tensors():
    x = torch.empty(2, 5, 33, device="meta")
    ops.snake(torch.empty_like(x), x, torch.empty(5, device="meta"), EPS)
    with pytest.raises(RuntimeError, match=r"alpha must be \[C\]"):
        ops.snake(torch.empty_like(x), x, torch.empty(4, device="meta"), EPS)


BAD_INPUTS = [
    ("snake", lambda: _native.snake(torch.randn(2, 3, 5, dtype=torch.float64), torch.rand(3)),
     "float32, float16 or bfloat16"),
    ("snake", lambda: _native.snake(torch.randn(2, 5, 3).transpose(1, 2), torch.rand(3)), "must be contiguous"),
    ("snake", lambda: _native.snake(torch.randn(2, 3, 5), torch.rand(4)), r"alpha must be \[C\]"),
    ("snake", lambda: _native.snake(torch.randn(3, 5), torch.rand(3)), r"x must be \[B, C, T\]"),
    ("snake", lambda: _native.snake(torch.randn(2, 3, 5), torch.rand(3), out=torch.empty(2, 3, 4)), "out has shape"),
    ("istft", lambda: _native.istft(torch.randn(1, 17, 5), hann_window(N_FFT)), r"spec must be \[B, n_fft \+ 2, F\]"),
    ("istft", lambda: _native.istft(torch.randn(1, 18, 5), hann_window(8)), r"window must be \[n_fft\]"),
    ("istft", lambda: _native.istft(torch.randn(1, 17, 5), hann_window(15), n_fft=15), "n_fft must be even"),
    ("istft", lambda: _native.istft(torch.randn(2, 18, 5), hann_window(N_FFT), n_frames=torch.tensor([5])),
     r"n_frames must be \[B\]"),
    ("istft", lambda: _native.istft(torch.randn(2, 18, 5), hann_window(N_FFT), n_frames=torch.tensor([5.0, 2.0])),
     "n_frames must be an int64/int32"),
    ("cfg_euler", lambda: _native.cfg_euler(torch.randn(2, 3, 5), torch.randn(2, 3, 5), 0.1, CFG_RATE),
     r"v must be \[2B, ...\]"),
    ("cfg_euler", lambda: _native.cfg_euler(torch.randn(2, 3, 5), torch.randn(4, 3, 5), torch.ones(2), CFG_RATE),
     "dt must be a 1-element tensor"),
    ("cfg_euler", lambda: _native.cfg_euler(torch.randn(2, 3, 5), torch.randn(4, 3, 5).half(), 0.1, CFG_RATE),
     "v has dtype"),
    ("cfg_euler_", lambda: _native.cfg_euler_(torch.randn(2, 3, 5), torch.randn(4, 3, 5), 0.1, CFG_RATE,
                                              torch.empty(2, 3, 5)), "out has shape"),
    ("euler", lambda: _native.euler(torch.randn(2, 3, 5), torch.randn(2, 3, 4), 0.1), "v must match x"),
]


@pytest.mark.parametrize("name,call,message", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise(name, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# -- CUDA ---------------------------------------------------------------------------------------------


@has_cuda
class TestCUDA:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_snake(self, dtype):
        alpha = _alpha(513)
        x = 2.0 * torch.randn(3, 513, 1001, generator=_gen(1))
        xl, alpha_l = x.to(dtype), alpha.to(dtype)
        ref = _snake_ref(xl.float(), alpha_l.float()).to(dtype)
        out = _native.snake(xl.cuda(), alpha_l.cuda())
        assert_close_dtype(out.cpu(), ref, name=f"snake cuda {dtype}")

    @pytest.mark.parametrize("F", FRAMES + [24001])
    def test_istft(self, F):
        spec = _spec(3, F, seed=F)
        window = hann_window(N_FFT)
        out = _native.istft(spec.cuda(), window.cuda())
        assert_verbose_allclose(out.cpu(), _head_ref(spec), name=f"istft cuda F={F}", **FP32_TOL)
        n_frames = torch.tensor([F, max(1, F // 2), 1])
        out = _native.istft(spec.cuda(), window.cuda(), n_frames=n_frames.cuda())
        assert_verbose_allclose(out.cpu(), _head_ref(spec, n_frames), name=f"masked istft cuda F={F}", **FP32_TOL)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_euler_steps(self, dtype):
        x = torch.randn(3, 80, 101, generator=_gen(1)).to(dtype)
        v = torch.randn(6, 80, 101, generator=_gen(2)).to(dtype)
        dt = torch.tensor([0.1])
        ref = _native.cfg_euler(x, v, dt, CFG_RATE)
        assert_close_dtype(_native.cfg_euler(x.cuda(), v.cuda(), dt.cuda(), CFG_RATE).cpu(), ref, name="cfg_euler")
        xc, x_in = x.cuda(), torch.empty_like(v).cuda()
        _native.cfg_euler_(xc, v.cuda(), 0.1, CFG_RATE, x_in)
        assert_close_dtype(xc.cpu(), ref, name="cfg_euler_ cuda")
        assert_close_dtype(x_in.cpu(), torch.cat([ref, ref]), name="cfg_euler_ x_in cuda")
        ref = _native.euler(x, v[:3], dt)
        assert_close_dtype(_native.euler(x.cuda(), v[:3].cuda(), dt.cuda()).cpu(), ref, name="euler cuda")

    def test_opcheck(self):
        for name, args in _opcheck_cases():
            args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(getattr(ops, name).default, args)
