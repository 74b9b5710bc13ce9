"""The fused T3 sampling kernel against sampling.py's chain, and its draw against the probabilities.

Runs on CUDA when present, else on CPU under Triton's interpreter (tests/conftest.py). The
statistical test uses ``num_samples`` so that thousands of draws (at consecutive offsets) cost one
program per row under the interpreter.
"""
import math

import pytest
import torch
from _tolerances import CUDA, DEVICE, TOL, assert_verbose_allclose, import_without_triton, triton_marks
from chatterbox_rt.kernels import sample_op as mod
from chatterbox_rt.kernels.sample_op import MAX_V, processed_probs_ref, sample_ref, sample_triton

pytestmark = triton_marks(mod.HAS_TRITON)

NOOP = dict(temperature=1.0, top_p=1.0, min_p=0.0, top_k=0, repetition_penalty=1.0)
PARAMS = {
    "noop": NOOP,
    "chatterbox": dict(temperature=0.8, top_p=1.0, min_p=0.05, top_k=0, repetition_penalty=1.2),
    "turbo": dict(temperature=0.8, top_p=0.95, min_p=0.0, top_k=1000, repetition_penalty=1.2),
    "aggressive": dict(temperature=0.3, top_p=0.5, min_p=0.2, top_k=5, repetition_penalty=2.0),
    "hot": dict(temperature=1.7, top_p=0.99, min_p=0.01, top_k=200, repetition_penalty=1.05),
    "top_k_1": dict(temperature=0.7, top_p=0.8, min_p=0.1, top_k=1, repetition_penalty=1.3),
}
SIZES = ((1, 6563), (3, 1000))  # (R, V): T3's speech vocabulary and an odd small one
CFG_WEIGHT = 0.5  # Chatterbox's default
TOL32 = TOL[torch.float32]


def _inputs(R, V, cfg, seed=0, scale=3.0, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * R if cfg else R, V, generator=g) * scale
    if neg_inf:  # e.g. the multilingual alignment control forbids tokens with -inf
        logits[:, torch.randperm(V, generator=g)[: V // 10]] = float("-inf")
    seen = torch.rand(R, V, generator=g) < 0.1
    return logits.to(DEVICE), seen.to(DEVICE)


def _run(logits, seen, order, params, cfg, **kw):
    R, V = seen.shape
    probs = torch.full((R, V), float("nan"), device=seen.device)
    tok = sample_triton(logits, seen, order=order, cfg_weight=cfg, seed=kw.pop("seed", 1234),
                        offset=kw.pop("offset", 0), out_probs=probs, **params, **kw)
    return tok, probs


def _check_probs(probs, logits, seen, order, params, cfg, name):
    ref = processed_probs_ref(logits, seen, order, cfg_weight=cfg, **params)
    assert torch.isfinite(probs).all(), f"{name}: non-finite probabilities"
    kept, kept_ref = probs > 0, ref > 0
    assert torch.equal(kept, kept_ref), (f"{name}: kept sets differ in {int((kept != kept_ref).sum())} tokens "
                                         f"(kernel keeps {kept.sum(1).tolist()}, reference {kept_ref.sum(1).tolist()})")
    assert_verbose_allclose(probs, ref, name=name, **TOL32)
    return ref


@pytest.mark.parametrize("R,V", SIZES)
@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("order", ("llama", "gpt"))
def test_processed_probs_match_reference(order, pname, R, V):
    cfg = CFG_WEIGHT if order == "llama" else None  # as T3 runs them: CFG only for the Llama variants
    params = PARAMS[pname]
    logits, seen = _inputs(R, V, cfg, seed=list(PARAMS).index(pname) * 10 + R + (order == "gpt") * 100)
    tok, probs = _run(logits, seen, order, params, cfg)
    ref = _check_probs(probs, logits, seen, order, params, cfg, f"{order}/{pname}")
    assert tok.shape == (R,) and tok.dtype == torch.int64
    assert (ref[torch.arange(R), tok] > 0).all(), "drew a token the reference chain filtered out"


@pytest.mark.parametrize("order,cfg", (("llama", None), ("gpt", 0.0), ("gpt", 1.5), ("llama", 3.0)))
def test_cfg_optional_in_both_orders(order, cfg):
    R, V = 2, 777
    params = PARAMS["turbo"] if order == "gpt" else PARAMS["chatterbox"]
    logits, seen = _inputs(R, V, cfg, seed=11)
    _, probs = _run(logits, seen, order, params, cfg)
    _check_probs(probs, logits, seen, order, params, cfg, f"{order}/cfg={cfg}")


@pytest.mark.parametrize("order", ("llama", "gpt"))
def test_neg_inf_logits(order):
    """-inf logits as the multilingual alignment control leaves them. It runs after the CFG
    combine, so the kernel gets [R, V] rows (-inf in both CFG halves would be NaN, as in torch)."""
    R, V = 3, 1001
    cfg = None
    for pname in ("chatterbox", "aggressive"):
        logits, seen = _inputs(R, V, cfg, seed=5, neg_inf=True)
        tok, probs = _run(logits, seen, order, PARAMS[pname], cfg)
        ref = _check_probs(probs, logits, seen, order, PARAMS[pname], cfg, f"{order}/{pname}/-inf")
        assert (ref[torch.arange(R), tok] > 0).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_low_precision_logits(dtype):
    """The kernel upcasts on load: it must equal the chain run in fp32 on the same values."""
    R, V = 2, 1000
    logits, seen = _inputs(R, V, True, seed=7)
    logits = logits.to(dtype)
    _, probs = _run(logits, seen, "llama", PARAMS["hot"], CFG_WEIGHT)
    _check_probs(probs, logits, seen, "llama", PARAMS["hot"], CFG_WEIGHT, f"llama/{dtype}")


def test_top_k_keeps_ties_like_hf():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5]], device=DEVICE)
    seen = torch.zeros(1, 7, dtype=torch.bool, device=DEVICE)
    params = dict(NOOP, top_k=3)  # 3rd best is 2.0, shared by three tokens: all five survive
    _, probs = _run(logits, seen, "gpt", params, None)
    _check_probs(probs, logits, seen, "gpt", params, None, "top-k ties")
    assert (probs > 0).sum().item() == 5


def test_top_p_tie_rule():
    """Documented difference from the sorted form: a group of equal logits straddling the cut is
    kept whole. Four equal tokens with top_p = 0.6: HF removes the first one in its sort order
    (running sum 0.25 <= 0.4) and keeps three; the kernel keeps all four. Without ties they agree."""
    seen = torch.zeros(1, 5, dtype=torch.bool, device=DEVICE)
    params = dict(NOOP, top_p=0.6)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -30.0]], device=DEVICE)
    _, probs = _run(logits, seen, "gpt", params, None)
    ref = processed_probs_ref(logits, seen, "gpt", cfg_weight=None, **params)
    assert (ref > 0).sum().item() == 3
    assert (probs > 0).sum().item() == 4 and probs[0, 4] == 0
    assert_verbose_allclose(probs[0, :4], torch.full((4,), 0.25, device=DEVICE), **TOL32)
    logits = torch.tensor([[0.0, 0.01, 0.02, 0.03, -30.0]], device=DEVICE)
    _, probs = _run(logits, seen, "gpt", params, None)
    _check_probs(probs, logits, seen, "gpt", params, None, "top-p without ties")


def test_dead_row_gives_minus_one_and_no_nan():
    R, V = 3, 300
    logits, seen = _inputs(R, V, False, seed=8)
    logits[1] = float("-inf")
    for order in ("llama", "gpt"):
        tok, probs = _run(logits, seen, order, PARAMS["aggressive"], None)
        assert torch.isfinite(probs).all()
        assert (probs[1] == 0).all() and tok[1].item() == -1
        assert tok[0] >= 0 and tok[2] >= 0
        ref_tok = sample_ref(logits, seen, order=order, cfg_weight=None, seed=1, offset=0, **PARAMS["aggressive"])
        assert ref_tok[1].item() == -1


def test_determinism_and_streams():
    R, V = 3, 1000
    logits, seen = _inputs(R, V, True, seed=9, scale=0.1)  # nearly flat: draws differ between streams
    kw = dict(order="llama", cfg_weight=CFG_WEIGHT, **PARAMS["hot"])
    a = sample_triton(logits, seen, seed=42, offset=7, num_samples=16, **kw)
    assert torch.equal(a, sample_triton(logits, seen, seed=42, offset=7, num_samples=16, **kw))
    assert not torch.equal(a, sample_triton(logits, seen, seed=42, offset=8, num_samples=16, **kw))
    assert not torch.equal(a, sample_triton(logits, seen, seed=43, offset=7, num_samples=16, **kw))
    # draw d of a multi-draw call is the single draw at offset + d
    for d in (0, 1, 15):
        assert torch.equal(a[:, d], sample_triton(logits, seen, seed=42, offset=7 + d, **kw))
    # device tensors (what a CUDA graph uses) give the same stream as Python ints
    seed_t = torch.tensor([42], device=DEVICE)
    assert torch.equal(a[:, 3], sample_triton(logits, seen, seed=seed_t, offset=torch.tensor(10, device=DEVICE), **kw))
    # per-row offsets: row r draws from its own position in the stream
    per_row = sample_triton(logits, seen, seed=seed_t, offset=torch.tensor([7, 9, 22], device=DEVICE), **kw)
    assert torch.equal(per_row, torch.stack([a[0, 0], a[1, 2], a[2, 15]]))
    # 64-bit seeds and offsets
    big = sample_triton(logits, seen, seed=2 ** 40 + 3, offset=2 ** 33 + 1, **kw)
    assert torch.equal(big, sample_triton(logits, seen, seed=torch.tensor([2 ** 40 + 3], device=DEVICE),
                                          offset=torch.tensor([2 ** 33 + 1], device=DEVICE), **kw))


def _chi2_quantile(df, z):
    """Wilson-Hilferty: the chi-square quantile at the standard-normal quantile z. At z = 4.753 it is
    within 4% of the exact quantile for df >= 6, and above it (the test errs towards passing)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# One-sided normal quantile for a false-failure probability of (at most about) 1e-6 per row.
Z_1E6 = 4.753


@pytest.mark.parametrize("order", ("llama", "gpt"))
def test_draw_frequencies_match_processed_probs(order):
    """4000 draws per row at consecutive offsets from fixed logits (V = 50): a chi-square
    goodness-of-fit test against the processed probabilities at a false-failure probability of
    1e-6 per row (Wilson-Hilferty quantile; bins expected < 5 times are pooled). Seeds are fixed, so
    the outcome is deterministic. No draw may land on a filtered token. The same counts must fail
    against the unprocessed softmax, which shows the test has power."""
    R, V, N = 3, 50, 4000
    cfg = CFG_WEIGHT if order == "llama" else None
    params = dict(temperature=0.9, top_p=0.9, min_p=0.02, top_k=30, repetition_penalty=1.5)
    logits, seen = _inputs(R, V, cfg, seed=21, scale=1.5)
    seen[:, :10] = True
    probs = torch.empty(R, V, device=DEVICE)
    tok = sample_triton(logits, seen, order=order, cfg_weight=cfg, seed=2024, offset=100, num_samples=N,
                        out_probs=probs, **params)
    assert tok.shape == (R, N)
    ref = _check_probs(probs, logits, seen, order, params, cfg, "stat")
    raw = torch.softmax(logits[:R].float(), dim=-1)
    for r in range(R):
        counts = torch.bincount(tok[r].cpu(), minlength=V).double()
        p = ref[r].cpu().double()
        assert counts[p == 0].sum() == 0, f"row {r}: drew filtered tokens"
        for target, should_pass in ((p, True), (raw[r].cpu().double(), False)):
            expected = target * N
            big = expected >= 5
            obs = torch.cat([counts[big], counts[~big].sum()[None]])
            exp = torch.cat([expected[big], expected[~big].sum()[None]])
            keep = exp > 0  # a pooled bin of filtered tokens only: its count was checked to be 0
            chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
            df = int(keep.sum()) - 1
            crit = _chi2_quantile(df, Z_1E6)
            if should_pass:
                assert chi2 <= crit, f"row {r}: chi2 {chi2:.1f} > {crit:.1f} (df {df}): draws do not follow p"
            else:
                assert chi2 > crit, f"row {r}: chi2 {chi2:.1f} against the raw softmax: the test has no power"


def test_sample_ref_draws_from_the_same_chain():
    R, V = 3, 1000
    logits, seen = _inputs(R, V, True, seed=13)
    probs = torch.empty(R, V, device=DEVICE)
    tok = sample_ref(logits, seen, order="llama", cfg_weight=CFG_WEIGHT, seed=5, offset=1, out_probs=probs,
                     **PARAMS["aggressive"])
    assert (probs[torch.arange(R), tok] > 0).all()
    assert torch.equal(tok, sample_ref(logits, seen, order="llama", cfg_weight=CFG_WEIGHT, seed=5, offset=1,
                                       **PARAMS["aggressive"]))


def test_bad_inputs_raise():
    R, V = 2, 100
    logits, seen = _inputs(R, V, True)
    ok = dict(order="llama", cfg_weight=CFG_WEIGHT, seed=0, offset=0, **PARAMS["chatterbox"])

    def bad(match, logits=logits, seen=seen, **over):
        with pytest.raises(ValueError, match=match):
            sample_triton(logits, seen, **{**ok, **over})

    bad("order must be", order="mistral")
    bad("temperature", temperature=0.0)
    bad("top_p", top_p=0.0)
    bad("top_p", top_p=1.5)
    bad("min_p", min_p=-0.1)
    bad("top_k", top_k=-1)
    bad("repetition_penalty", repetition_penalty=0.0)
    bad("cfg_weight", cfg_weight=-1.0)
    bad("cfg_weight is None", cfg_weight=None)
    bad("needs \\[2R, V\\]", logits=logits[:R])
    bad("logits must be", logits=logits[:, :V - 1])
    bad("logits must be", logits=logits[:3])
    bad("seen must be a bool", seen=seen.to(torch.uint8))
    bad("unit stride", logits=logits.t().contiguous().t())
    bad("seed must be", seed=-1)
    bad("seed must be", seed=1.5)
    bad("offset as a tensor", offset=torch.tensor([0], dtype=torch.int32, device=DEVICE))
    bad("offset as a tensor", offset=torch.zeros(R + 1, dtype=torch.int64, device=DEVICE))
    bad("out_probs must be", out_probs=torch.empty(R, V, dtype=torch.float16, device=DEVICE))
    bad("out must be", out=torch.empty(R + 1, dtype=torch.int64, device=DEVICE))
    bad("num_samples", num_samples=0)
    big = torch.zeros(1, MAX_V + 1, device=DEVICE)
    with pytest.raises(ValueError, match="outside"):
        sample_triton(big, torch.zeros(1, MAX_V + 1, dtype=torch.bool, device=DEVICE), **{**ok, "cfg_weight": None})


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter refusal")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    logits, seen = _inputs(1, 10, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sample_triton(logits, seen, order="gpt", cfg_weight=None, seed=0, offset=0, **NOOP)


def test_imports_and_refuses_cleanly_without_triton(monkeypatch):
    fresh = import_without_triton(monkeypatch, mod)
    assert fresh.HAS_TRITON is False
    logits, seen = _inputs(1, 10, False)
    assert fresh.processed_probs_ref(logits, seen, "gpt", cfg_weight=None, **NOOP).shape == (1, 10)
    with pytest.raises(RuntimeError, match="pip install triton"):
        fresh.sample_triton(logits, seen, order="gpt", cfg_weight=None, seed=0, offset=0, **NOOP)


# --- CUDA only: T3's real sizes -----------------------------------------------------------------

REAL_R, REAL_V = 8, 8194  # 8 requests; Chatterbox's speech vocabulary (incl. start/stop tokens)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("order,pname", (("llama", "chatterbox"), ("llama", "aggressive"), ("gpt", "turbo"),
                                         ("gpt", "hot")))
def test_cuda_real_size(order, pname):
    cfg = CFG_WEIGHT if order == "llama" else None
    logits, seen = _inputs(REAL_R, REAL_V, cfg, seed=31)
    tok, probs = _run(logits, seen, order, PARAMS[pname], cfg)
    ref = _check_probs(probs, logits, seen, order, PARAMS[pname], cfg, f"cuda/{order}/{pname}")
    assert (ref[torch.arange(REAL_R, device=DEVICE), tok] > 0).all()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_advances_offset_on_device():
    """The T3 loop's use: seed a Python int, offset an int64 device tensor advanced in the graph."""
    logits, seen = _inputs(REAL_R, REAL_V, True, seed=32, scale=0.5)
    kw = dict(order="llama", cfg_weight=CFG_WEIGHT, **PARAMS["chatterbox"])
    offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out = torch.empty(REAL_R, dtype=torch.int64, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_triton(logits, seen, seed=77, offset=offset, out=out, **kw)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_triton(logits, seen, seed=77, offset=offset, out=out, **kw)
        offset.add_(1)
    want = sample_triton(logits, seen, seed=77, offset=0, num_samples=3, **kw)
    for step in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want[:, step]), f"step {step}"
    assert offset.item() == 3
