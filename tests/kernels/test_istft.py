"""kernels/istft_op.py (the Triton launcher ``istft_triton``) against its torch reference, and the
reference against HiFT's own head.

The op reduces (inverse DFT, overlap-add), so low-precision inputs follow flash-attention's rule
against the fp32 reference (``assert_reduction_close``); fp32 inputs are held to a tight tolerance.
Runs on CPU under Triton's interpreter (tests/conftest.py); ``TestIstftCUDA`` runs HiFT-sized F.
"""

import pytest
import torch

from chatterbox_rt.kernels import istft_op as istft_mod
from chatterbox_rt.kernels.istft_op import HAS_TRITON, istft_ref, istft_triton
from chatterbox_rt.models.s3gen.hift import HiFTConfig, hann_window

from _tolerances import DTYPES, assert_reduction_close, assert_verbose_allclose, import_without_triton

CFG = HiFTConfig()
N_FFT, HOP = CFG.n_fft, CFG.hop
# Frame counts that do not line up with anything: 1 frame gives an empty signal.
FRAMES = [1, 2, 5, 37, 121]
BATCHES = [1, 3]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _spec(B, F, dtype=torch.float32, device=DEVICE, seed=0, log_mag_shift=0.0):
    """conv_post-like output: log-magnitudes (exp ~ 0.1 .. 10) then phase logits."""
    g = torch.Generator().manual_seed(seed)
    spec = torch.randn(B, N_FFT + 2, F, generator=g)
    spec[:, : CFG.n_freq] += log_mag_shift
    return spec.to(device, dtype)


def _window(device=DEVICE):
    return hann_window(N_FFT, device=device)


def _mixed_lengths(B, F):
    return torch.tensor([F, F // 2 + 1, 1][:B], device=DEVICE)


# --------------------------------------------------------------------------- kernel


@needs_triton
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("F", FRAMES)
def test_istft_fp32(F, B):
    spec, w = _spec(B, F), _window()
    out = istft_triton(spec, w)
    assert out.dtype == torch.float32 and out.shape == (B, HOP * (F - 1))
    assert_verbose_allclose(out, istft_ref(spec, w), **FP32_TOL)  # F = 1: both [B, 0]


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("F", FRAMES[1:])
def test_istft_low_precision(F, dtype):
    spec, w = _spec(3, F, dtype), _window()
    out = istft_triton(spec, w)
    assert_reduction_close(out, istft_ref(spec, w, upcast=True), istft_ref(spec, w))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", FRAMES)
def test_istft_n_frames(F, dtype):
    spec, w = _spec(3, F, dtype), _window()
    n_frames = _mixed_lengths(3, F)
    out = istft_triton(spec, w, n_frames=n_frames)
    ref32 = istft_ref(spec, w, n_frames=n_frames, upcast=True)
    assert out.shape == ref32.shape
    if out.numel() == 0:
        return
    if dtype == torch.float32:
        assert_verbose_allclose(out, ref32, **FP32_TOL)
    else:
        assert_reduction_close(out, ref32, istft_ref(spec, w, n_frames=n_frames))


@needs_triton
def test_istft_n_frames_edge_cases():
    """0 frames -> silence; n_frames >= F -> the unmasked result; int32 lengths work."""
    F = 37
    spec, w = _spec(3, F), _window()
    n_frames = torch.tensor([0, F + 5, 9], device=DEVICE, dtype=torch.int32)
    out = istft_triton(spec, w, n_frames=n_frames)
    assert (out[0] == 0).all()
    assert_verbose_allclose(out[1], istft_ref(spec[1:2], w)[0], **FP32_TOL, name="n_frames > F")
    assert_verbose_allclose(out, istft_ref(spec, w, n_frames=n_frames), **FP32_TOL)


@needs_triton
def test_istft_hift_batch():
    """The padded batch decode makes: F = 120 T + 1 and lengths * 120 + 1 valid frames."""
    T, lengths = 2, torch.tensor([2, 1], device=DEVICE)
    n_fr = CFG.upsample_factor * T + 1
    spec = _spec(2, n_fr)
    n_valid = lengths * CFG.upsample_factor + 1
    out = istft_triton(spec, _window(), n_frames=n_valid)
    assert_verbose_allclose(out, istft_ref(spec, _window(), n_frames=n_valid), **FP32_TOL)


@needs_triton
def test_istft_clips_and_clamps():
    """Log-magnitudes up to ~9: exp clips at 100 and the waveform saturates at +-0.99."""
    spec, w = _spec(2, 37, log_mag_shift=5.0), _window()
    out = istft_triton(spec, w)
    assert out.abs().max() == pytest.approx(CFG.audio_limit)
    assert_verbose_allclose(out, istft_ref(spec, w), atol=1e-4, rtol=1e-5)  # pre-clamp values reach ~100


@needs_triton
def test_istft_non_contiguous():
    """conv_post's channels sliced out of a wider tensor, and a time-major layout."""
    wide = _spec(3, 41, seed=1)
    spec = torch.cat([wide, wide[:, :2]], dim=1)[:, 1: N_FFT + 3]  # [3, 18, 41], strided view
    w = _window()
    assert not spec.is_contiguous()
    assert_verbose_allclose(istft_triton(spec, w), istft_ref(spec, w), **FP32_TOL)
    tmajor = spec.transpose(1, 2).contiguous().transpose(1, 2)
    assert_verbose_allclose(istft_triton(tmajor, w), istft_ref(spec, w), **FP32_TOL, name="time-major")


@needs_triton
@pytest.mark.parametrize("n_fft,hop", [(8, 2), (16, 3), (16, 8)])
def test_istft_other_sizes(n_fft, hop):
    g = torch.Generator().manual_seed(2)
    spec = torch.randn(2, n_fft + 2, 23, generator=g).to(DEVICE)
    w = hann_window(n_fft, device=DEVICE)
    out = istft_triton(spec, w, n_fft, hop)
    assert_verbose_allclose(out, istft_ref(spec, w, n_fft, hop), **FP32_TOL)
    n_frames = torch.tensor([23, 11], device=DEVICE)
    assert_verbose_allclose(istft_triton(spec, w, n_fft, hop, n_frames=n_frames),
                            istft_ref(spec, w, n_fft, hop, n_frames=n_frames), **FP32_TOL, name="masked")


@needs_triton
def test_istft_bad_inputs(monkeypatch):
    spec, w = _spec(2, 5), _window()
    with pytest.raises(ValueError, match=r"spec must be \[B, n_fft \+ 2, F\]"):
        istft_triton(spec[0], w)
    with pytest.raises(ValueError, match="n_fft \\+ 2 = 18 channels"):
        istft_triton(spec[:, :17], w)
    with pytest.raises(ValueError, match=r"window must be \[n_fft\] = \[16\]"):
        istft_triton(spec, w[:8])
    with pytest.raises(ValueError, match="n_fft must be even"):
        istft_triton(spec[:, :17], w[:15], n_fft=15)
    with pytest.raises(ValueError, match="hop must be in"):
        istft_triton(spec, w, hop=0)
    with pytest.raises(ValueError, match="n_frames must be an integer tensor"):
        istft_triton(spec, w, n_frames=torch.tensor([5.0, 3.0], device=spec.device))
    with pytest.raises(ValueError, match="n_frames must be an integer tensor"):
        istft_triton(spec, w, n_frames=torch.tensor([5], device=spec.device))
    with pytest.raises(ValueError, match="spec must be a float tensor"):
        istft_triton(spec.long(), w)
    if spec.device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
            istft_triton(spec, w)


def test_import_without_triton(monkeypatch):
    mod = import_without_triton(monkeypatch, istft_mod)
    assert mod.HAS_TRITON is False
    x, w = _spec(1, 5, device="cpu"), _window("cpu")
    with pytest.raises(RuntimeError, match="pip install triton"):
        mod.istft_triton(x, w)
    assert torch.equal(mod.istft_ref(x, w), istft_ref(x, w))


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (HiFT-sized frame counts)")
class TestIstftCUDA:
    """F = 24001 frames: 200 mel frames (4 s of audio) at 120 frames per mel frame, plus one."""

    F = 24001

    def test_hift_length(self):
        spec, w = _spec(1, self.F, device="cuda"), _window("cuda")
        assert_verbose_allclose(istft_triton(spec, w), istft_ref(spec, w), **FP32_TOL)

    @pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
    def test_hift_length_low_precision(self, dtype):
        spec, w = _spec(2, self.F, dtype, "cuda"), _window("cuda")
        assert_reduction_close(istft_triton(spec, w), istft_ref(spec, w, upcast=True), istft_ref(spec, w))

    def test_hift_batch(self):
        lengths = torch.tensor([200, 117, 3], device="cuda")
        spec, w = _spec(3, self.F, device="cuda"), _window("cuda")
        n_valid = lengths * CFG.upsample_factor + 1
        out = istft_triton(spec, w, n_frames=n_valid)
        assert_verbose_allclose(out, istft_ref(spec, w, n_frames=n_valid), **FP32_TOL)
