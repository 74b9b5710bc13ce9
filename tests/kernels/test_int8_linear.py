"""Weight-only INT8 linear: every form against the plain-torch reference over odd shapes, the CPU
kernel's row-count invariance, and T3's Int8Linear layer (state dict in the checkpoint layout)."""
import pytest
import torch

from chatterbox_rt.kernels import _native
from chatterbox_rt.kernels.int8_linear_op import (HAS_TRITON, dequantize_int8, int8_linear, int8_linear_cpu,
                                                  int8_linear_ref, int8_linear_triton, quantize_int8)
from chatterbox_rt.models.t3.linear import Conv1D, Linear
from chatterbox_rt.models.t3.quant import Int8Linear

SHAPES = [(1, 7, 5), (2, 33, 1030), (3, 64, 512), (17, 130, 257)]  # (M, N, K)


def _case(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    q, s = quantize_int8(torch.randn(N, K, generator=g))
    return x, q, s, torch.randn(N, generator=g)


def test_quantize_round_trip_and_zero_rows():
    w = torch.randn(9, 40)
    w[3] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and s[3] == 1 and not q[3].any()
    err = (dequantize_int8(q, s) - w).abs().max(dim=1).values
    assert bool((err <= s / 2 + 1e-7).all())  # round to nearest: half a step at most


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_native_matches_reference(M, N, K):
    if not _native.int8_linear_available():
        pytest.skip("the native extension (chatterbox_rt._C) is not built")
    x, q, s, b = _case(M, N, K)
    ref = int8_linear_ref(x.double(), q, s, b.double())
    y = int8_linear(x, q, s, b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_native_rows_are_invariant_to_the_row_count():
    if not _native.int8_linear_available():
        pytest.skip("the native extension (chatterbox_rt._C) is not built")
    x, q, s, _ = _case(32, 200, 1100)
    full = _native.int8_linear(x, q, s)
    for rows in (1, 2, 5, 16):
        assert torch.equal(_native.int8_linear(x[:rows].contiguous(), q, s), full[:rows])


def test_native_rejects_bad_input():
    if not _native.int8_linear_available():
        pytest.skip("the native extension (chatterbox_rt._C) is not built")
    x, q, s, _ = _case(2, 8, 16)
    with pytest.raises(RuntimeError, match="K = 16"):
        _native.int8_linear(torch.randn(2, 15), q, s)
    with pytest.raises(RuntimeError, match="q must be a contiguous int8"):
        _native.int8_linear(x, q.float(), s)


@pytest.mark.parametrize("M,N,K", SHAPES[:3])
def test_aten_form_matches_reference(M, N, K):
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        pytest.skip("this torch has no aten._weight_int8pack_mm")
    x, q, s, b = _case(M, N, K)
    ref = int8_linear_ref(x, q, s, b)
    assert (int8_linear_cpu(x, q, s, b) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("M,N,K", [(1, 7, 5), (2, 33, 130), (17, 70, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(M, N, K, dtype):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1 (conftest)
    x, q, s, b = (t.to(dev) for t in _case(M, N, K))
    x = x.to(dtype)
    y = int8_linear_triton(x, q, s, b)
    ref = int8_linear_ref(x.float(), q, s, b)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (y.float() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("conv1d", [False, True])
def test_int8_layer_keeps_the_checkpoint_view(conv1d):
    torch.manual_seed(0)
    dense = Conv1D(48, 80) if conv1d else Linear(48, 80, bias=True)
    with torch.no_grad():
        dense.weight.normal_()
        dense.bias.normal_()
    layer = Int8Linear.from_module(dense)
    x = torch.randn(3, 48)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"} and tuple(sd["weight"].shape) == tuple(dense.weight.shape)
    rel = (layer(x) - dense(x)).abs().max() / dense(x).abs().max()
    assert 0 < rel < 2e-2
    # Loading a dense state dict re-quantises it; .to(dtype) must not round the per-channel scales.
    other = Int8Linear(48, 80, bias=torch.zeros(80), conv1d=conv1d)
    other.load_state_dict(dense.state_dict())
    assert torch.equal(other.qweight, layer.qweight) and torch.equal(other(x), layer(x))
    scale = layer.scale.clone()
    layer.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(layer.scale, scale)
