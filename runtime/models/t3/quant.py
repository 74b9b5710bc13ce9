"""T3 with 8-bit weights: INT8 weight-only (any device) and FP8 e4m3 (Hopper/Ada GPUs).

:func:`quantize_t3_` replaces every linear layer of T3's transformer (attention and MLP: 98 % of
its weights) by :class:`Int8Linear` or :class:`Fp8Linear`, in place, in seconds (symmetric
per-output-channel scales need one pass over each matrix). The embeddings, the conditioning
encoder and the two heads stay in the activation dtype: they are 2 % of the bytes and the heads
set the logits directly.

The layers keep the checkpoints' view: ``state_dict()`` gives the dequantised dense weight under
the original key and shape (``[out, in]``, GPT-2's Conv1D ``[in, out]``), and loading a dense
state dict quantises it, so LoRA merges, exports and checkpoint round trips see ordinary weights.
The per-channel scale is held as the bit pattern of its fp32 values (an int32 buffer), and FP8
weights as their bytes (an int8 buffer viewed as e4m3), so ``.to(dtype)`` (casting T3 to bf16,
say) never rounds either; they are not state-dict entries.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .linear import BlockedLinear, Conv1D, size_mismatch

WEIGHT_MODES = ("int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): e4m3 tensor cores behind torch._scaled_mm
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_supported(device) -> Optional[str]:
    """None if FP8 T3 weights can run on ``device``, else the reason they cannot."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FP8 weights need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); the device is {device}"
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8_e4m3fn / _scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < FP8_MIN_CAPABILITY:
        return (f"FP8 weights need compute capability >= 8.9 (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    return None


def _dense_oi(m: nn.Module) -> tuple[Tensor, bool]:
    """A linear layer's weight as ``[out, in]`` and whether its checkpoint layout is Conv1D's ``[in, out]``."""
    if isinstance(m, Conv1D):
        return m.dense_weight().t(), True
    if isinstance(m, BlockedLinear):
        w = m.dense_weight()
        return (w.t(), True) if m.conv1d else (w, False)
    if isinstance(m, QuantLinear):
        return m.dense_oi(), m.conv1d
    if hasattr(m, "dense_weight"):  # our Linear (possibly oneDNN-packed)
        return m.dense_weight(), False
    return m.weight, False  # nn.Linear


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w [N, K]`` -> (e4m3 ``q [N, K]``, fp32 ``scale [N]``), symmetric per output channel."""
    w = w.float()
    s = w.abs().amax(dim=1) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (w / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


class QuantLinear(nn.Module):
    """8-bit weights ``qweight [out, in]`` (``QDTYPE``) with one fp32 scale per output channel,
    quantised by ``quantize`` (w -> (q, scale)); the checkpoint's dense ``weight`` in and out of
    state dicts. Subclasses define ``forward``."""

    QDTYPE: torch.dtype
    quantize = None  # staticmethod: [N, K] float -> (q [N, K] in QDTYPE, scale [N] fp32)

    def __init__(self, n_in: int, n_out: int, bias: Optional[Tensor] = None, conv1d: bool = False, device=None):
        super().__init__()
        self.n_in, self.n_out, self.conv1d = n_in, n_out, conv1d
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Stored as int8 bytes whatever QDTYPE (Module.to(dtype) casts every floating buffer, float8 too).
        self.register_buffer("qweight", torch.zeros(n_out, n_in, dtype=torch.int8, device=device), persistent=False)
        self.register_buffer("scale_bits", torch.zeros(n_out, dtype=torch.int32, device=device), persistent=False)

    @classmethod
    def from_module(cls, m: nn.Module) -> "QuantLinear":
        w, conv1d = _dense_oi(m)
        out = cls(w.shape[1], w.shape[0], getattr(m, "bias", None), conv1d, device=w.device)
        with torch.no_grad():
            out._quantize_from(w)
        return out

    @property
    def q(self) -> Tensor:
        """The 8-bit weights ``[out, in]`` in ``QDTYPE``."""
        return self.qweight if self.QDTYPE == torch.int8 else self.qweight.view(self.QDTYPE)

    @property
    def scale(self) -> Tensor:
        return self.scale_bits.view(torch.float32)

    @property
    def key_shape(self) -> tuple:
        return (self.n_in, self.n_out) if self.conv1d else (self.n_out, self.n_in)

    def _quantize_from(self, w_oi: Tensor) -> None:
        q, s = type(self).quantize(w_oi.to(self.qweight.device))
        self.qweight.copy_(q.view(torch.int8))
        self.scale_bits.copy_(s.view(torch.int32))

    def dense_oi(self, dtype=torch.float32) -> Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def dense_weight(self) -> Tensor:
        """The dequantised weight in the checkpoint layout (a new fp32 tensor)."""
        w = self.dense_oi()
        return w.t() if self.conv1d else w

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != self.key_shape:
                error_msgs.append(size_mismatch(key, w.shape, self.key_shape))
            else:
                with torch.no_grad():
                    self._quantize_from(w.t() if self.conv1d else w)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in={self.n_in}, out={self.n_out}, bias={self.bias is not None}, {self.QDTYPE} per-channel"


def _quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    from ...kernels.int8_linear_op import quantize_int8

    return quantize_int8(w)


class Int8Linear(QuantLinear):
    """Weight-only INT8: the input stays in its float dtype and the product accumulates in fp32
    (``chatterbox_rt.kernels.int8_linear_op.int8_linear``: our C++ kernel on a CPU, Triton on a GPU)."""

    QDTYPE = torch.int8
    quantize = staticmethod(_quantize_int8)

    def forward(self, x: Tensor) -> Tensor:
        from ...kernels.int8_linear_op import int8_linear

        return int8_linear(x, self.qweight, self.scale, self.bias)


class Fp8Linear(QuantLinear):
    """FP8 e4m3 weights; each call scales its input rows to e4m3 (one scale per row) and multiplies
    on the tensor cores with ``torch._scaled_mm`` (row-wise scales, bf16 out). Hopper/Ada only
    (:func:`fp8_supported`)."""

    QDTYPE = getattr(torch, "float8_e4m3fn", None)
    quantize = staticmethod(quantize_fp8)

    def __init__(self, n_in: int, n_out: int, bias: Optional[Tensor] = None, conv1d: bool = False, device=None):
        if n_in % 16 or n_out % 16:
            raise ValueError(f"FP8 weights need both dimensions to be multiples of 16, got {n_out} x {n_in}")
        super().__init__(n_in, n_out, bias, conv1d, device)

    def forward(self, x: Tensor) -> Tensor:
        K = self.n_in
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        pad = (-M) % 16  # _scaled_mm wants the row count a multiple of 16 too
        if pad:
            x2 = torch.cat([x2, x2.new_zeros(pad, K)])
        xf = x2.float()
        sx = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_(min=1e-12)
        x8 = (xf / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.q.t(), scale_a=sx, scale_b=self.scale[None, :],
                             out_dtype=torch.bfloat16)[:M]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.n_out)


_LINEAR_TYPES = (nn.Linear, Conv1D, BlockedLinear)


def quantize_t3_(t3: nn.Module, mode: str = "int8") -> int:
    """Replace every linear layer of ``t3.tfmr`` by its ``mode`` ("int8" | "fp8") form, in place.
    Returns the number of layers replaced. Biases keep T3's activation dtype."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"T3 weight mode {mode!r}: expected one of {', '.join(WEIGHT_MODES)}")
    if mode == "fp8":
        why = fp8_supported(t3.device)
        if why:
            raise RuntimeError(why)
    cls = Int8Linear if mode == "int8" else Fp8Linear
    count = 0
    for parent in list(t3.tfmr.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _LINEAR_TYPES) and not isinstance(child, QuantLinear):
                setattr(parent, name, cls.from_module(child))
                count += 1
    t3.weight_mode = mode
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantised weights at their stored width)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size() if not t.is_mkldnn else t.to_dense().numel() * t.element_size()
    return total
