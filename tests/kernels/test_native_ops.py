"""The native ops (csrc/ -> chatterbox_rt._C, kernels/_native.py) against the model's own torch code.

The references are the model's plain-torch expressions, copied here op for op so that they stay
independent of the kernel dispatch (hift.py's Snake may itself run this extension): snake =
Snake.forward's expression; istft = HiFT's head (exp, clip, sin, cos, complex, torch.istft,
clamp) and the masked ``_istft`` overlap-add; cfg_euler/euler = cfm.py's Euler updates. fp32 is held to the TOL
table; low-precision inputs are compared with the fp32 reference cast down (elementwise ops, fp32
math inside), or with flash-attention's rule for the iSTFT's reductions. ``ngram_counts`` and
``token_stats`` (chatterbox_rt.tokens.analyze's counters) are compared with a Counter over every
window and a Python loop over the runs. ``torch.library.opcheck`` checks schemas, Meta kernels and
fake-tensor tracing. Skipped when the extension is not built.
"""
import collections

import numpy as np
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
CPU_ONLY = ("ngram_counts", "token_stats")

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
    assert _native.ngram_counts_available()


# -- ngram_counts, token_stats (chatterbox_rt.tokens.analyze) ---------------------------------------

# Vocabularies: 2 (1-bit digits), 3, the codecs' (4096 is 13 bits like 6561), and 2^19 - 1, whose
# 19-bit tokens fill all 95 bits of context at max_n = 6 (the wide format's limit).
NGRAM_VOCABS = [2, 3, 4096, 6561, 2 ** 19 - 1]


def _rows(seed, vocab, n_rows=None, alphabet=None, max_len=14):
    """Random rows over a small alphabet of the vocabulary (so n-grams repeat), lengths 0..max_len."""
    rng = np.random.default_rng(seed)
    alphabet = alphabet or min(vocab, int(rng.integers(1, 6)))
    codes = rng.choice(vocab, size=alphabet, replace=False)
    n_rows = n_rows or int(rng.integers(1, 25))
    return [codes[rng.integers(0, alphabet, int(rng.integers(0, max_len + 1)))] for _ in range(n_rows)]


def _ngram_ref(rows, max_n):
    """n -> (counts >= 2 in lexicographic order of the n-grams, number of n-grams seen once)."""
    out = {}
    for n in range(1, max_n + 1):
        c = collections.Counter(tuple(r[i:i + n].tolist()) for r in rows for i in range(len(r) - n + 1))
        out[n] = ([c[g] for g in sorted(c) if c[g] >= 2], sum(1 for v in c.values() if v == 1))
    return out


def _stream(rows, dtype=torch.int64):
    tokens = torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, np.int64)).to(dtype)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def _max_n_for(vocab, want=7):
    return min(want, 1 + 95 // vocab.bit_length())


@pytest.mark.parametrize("vocab", NGRAM_VOCABS)
def test_ngram_counts_match_counter(vocab):
    for seed in range(12):
        rows = _rows(seed, vocab)
        rows.append(np.full(9, rows[0][0] if len(rows[0]) else 0))  # one long run
        tokens, lengths = _stream(rows)
        for max_n in sorted({1, 2, 3, 5, _max_n_for(vocab)}):
            if max_n > _max_n_for(vocab):
                continue
            sizes, n_sizes, ones = _native.ngram_counts(tokens, lengths, vocab, max_n)
            want = _ngram_ref(rows, max_n)
            for n in range(1, max_n + 1):
                got = sizes[n - 1, :n_sizes[n - 1]].tolist()
                assert (got, int(ones[n - 1])) == want[n], f"vocab {vocab} seed {seed} max_n {max_n} n {n}"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_ngram_counts_token_dtypes(dtype):
    rows = _rows(5, 200, n_rows=30, alphabet=4)
    sizes, n_sizes, ones = _native.ngram_counts(*_stream(rows, dtype), 200, 7)
    want = _ngram_ref(rows, 7)
    for n in range(1, 8):
        assert (sizes[n - 1, :n_sizes[n - 1]].tolist(), int(ones[n - 1])) == want[n], (dtype, n)


def test_ngram_counts_edge_cases():
    # no tokens; empty rows only; one row; rows shorter than max_n; one token
    for rows in ([], [np.zeros(0, np.int64)] * 3, [np.array([3, 3, 3, 1, 3, 3, 3, 1])],
                 [np.array([1, 2]), np.array([], np.int64), np.array([1]), np.array([1, 2, 1])], [np.array([0])]):
        sizes, n_sizes, ones = _native.ngram_counts(*_stream(rows), 4, 7)
        want = _ngram_ref(rows, 7)
        for n in range(1, 8):
            assert (sizes[n - 1, :n_sizes[n - 1]].tolist(), int(ones[n - 1])) == want[n], (rows, n)
    # a long row of one token: one n-gram per n, seen N - n + 1 times
    sizes, n_sizes, ones = _native.ngram_counts(torch.zeros(1000, dtype=torch.int16), torch.tensor([1000]), 6561, 7)
    assert n_sizes.tolist() == [1] * 7 and ones.tolist() == [0] * 7
    assert [int(sizes[n - 1, 0]) for n in range(1, 8)] == [1001 - n for n in range(1, 8)]


def _runs_ref(rows, vocab):
    counts = np.bincount(np.concatenate(rows), minlength=vocab) if rows else np.zeros(vocab, np.int64)
    hist = collections.Counter()
    for r in rows:
        i = 0
        while i < len(r):
            j = i
            while j < len(r) and r[j] == r[i]:
                j += 1
            hist[j - i] += 1
            i = j
    return counts, hist


@pytest.mark.parametrize("vocab", [2, 6561, 2 ** 17])
def test_token_stats_match_python(vocab):
    for seed in range(10):
        rows = _rows(seed, vocab, max_len=200 if seed % 2 else 14)  # long rows take the 64-wide path
        tokens, lengths = _stream(rows, torch.int32)
        code_counts, run_hist = _native.token_stats(tokens, lengths, vocab)
        counts, hist = _runs_ref(rows, vocab)
        assert code_counts.tolist() == counts.tolist()
        assert run_hist[0] == 0 and {L: int(c) for L, c in enumerate(run_hist.tolist()) if c} == dict(hist)
    code_counts, run_hist = _native.token_stats(*_stream([]), vocab)
    assert not code_counts.any() and run_hist.tolist() == [0]


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
    tokens, lengths = torch.tensor([1, 2, 1, 2, 0, 1, 2], dtype=torch.int16), torch.tensor([4, 0, 3])
    yield "ngram_counts", (torch.empty(7, 3, dtype=torch.int32), torch.empty(7, dtype=torch.int64),
                           torch.empty(7, dtype=torch.int64), tokens, lengths, 6561)
    yield "token_stats", (torch.empty(6561, dtype=torch.int64), torch.empty(5, dtype=torch.int64), tokens, lengths)


@pytest.mark.parametrize("name,args", list(_opcheck_cases()), ids=lambda a: a if isinstance(a, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


def test_meta_tensors():
    x = torch.empty(2, 5, 33, device="meta")
    ops.snake(torch.empty_like(x), x, torch.empty(5, device="meta"), EPS)
    with pytest.raises(RuntimeError, match=r"alpha must be \[C\]"):
        ops.snake(torch.empty_like(x), x, torch.empty(4, device="meta"), EPS)
    tokens, lengths = torch.empty(9, dtype=torch.int16, device="meta"), torch.empty(2, dtype=torch.int64, device="meta")
    counts = [torch.empty(7, dtype=torch.int64, device="meta") for _ in range(2)]
    ops.ngram_counts(torch.empty(7, 4, dtype=torch.int32, device="meta"), *counts, tokens, lengths, 6561)
    with pytest.raises(RuntimeError, match=r"n_sizes and ones must be \[max_n\]"):
        ops.ngram_counts(torch.empty(6, 4, dtype=torch.int32, device="meta"), *counts, tokens, lengths, 6561)


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
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1, 5]), torch.tensor([2]), 5, 3), r"\[0, vocab_size = 5\)"),
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1, -1]), torch.tensor([2]), 5, 3), r"found -1"),
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1, 2]), torch.tensor([3]), 5, 3), "add up to 3"),
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1, 2]), torch.tensor([3, -1]), 5, 3), "must be >= 0"),
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1.0, 2.0]), torch.tensor([2]), 5, 3), "uint8, int16"),
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1, 2]), torch.tensor([2]), 6561, 9), "numpy path"),
    ("ngram_counts", lambda: _native.ngram_counts(torch.tensor([1, 2]), torch.tensor([2]), 2 ** 20, 2), "vocab_size"),
    ("ngram_counts", lambda: ops.ngram_counts(torch.empty(3, 0, dtype=torch.int32), torch.empty(3, dtype=torch.int64),
                                              torch.empty(3, dtype=torch.int64), torch.tensor([1, 2, 1]),
                                              torch.tensor([3]), 5), "room for N / 2"),
    ("token_stats", lambda: _native.token_stats(torch.tensor([1, 5]), torch.tensor([2]), 5), r"\[0, vocab_size = 5\)"),
    ("token_stats", lambda: _native.token_stats(torch.tensor([1, 2, 2]), torch.tensor([3]), 5, longest=2),
     "longest row"),
    ("token_stats", lambda: _native.token_stats(torch.tensor([1, 2]), torch.tensor([1, 2]), 5), "add up to 3"),
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
            if name in CPU_ONLY:
                continue
            args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(getattr(ops, name).default, args)
