"""How each fused op runs, decided in one place (vLLM's ``CustomOp`` pattern).

Backends per op:

* ``cuda``: the CUDA kernels of the native extension (csrc/cuda, ``chatterbox_rt._C``).
* ``triton``: the Triton kernels in this package (kernels/*_op.py; CUDA tensors on a GPU of compute
  capability >= 7.0, see ``TRITON_MIN_CAPABILITY``; CPU tensors only under ``TRITON_INTERPRET=1``,
  which is how CI runs them).
* ``cpp``: the C++ CPU kernels of the native extension (csrc/cpu).
* ``native``: plain torch, the model's own expressions (always available; bit-identical to the
  code the kernels replace).

Automatic choice: on a GPU ``cuda`` -> ``triton`` -> ``native``, on a CPU ``cpp`` -> ``native``,
skipping what the op does not have (``sample`` has Triton and native forms only) or what cannot
run here (extension not built, triton not installed, a GPU below Triton's compute capability); the
first automatic fallback of a session logs one line. ``CHATTERBOX_RT_KERNELS=native|triton|cuda|cpp``
overrides it: an explicit choice that cannot run on the device raises ``KernelUnavailable`` with the
reason; an op that has no implementation in the chosen backend at all uses ``native``.

Per call, whatever the backend: float64 tensors (a precision check, not a serving mode) take the
native form of the op; so do bf16 tensors given to a Triton kernel on a GPU below compute capability
8.0 (no bf16 conversions there, ``TRITON_BF16_MIN_CAPABILITY``).

A model resolves its ops once per device (``choose`` is cached by op, device type and the
override; ``DispatchedOp`` keeps the callable), never per call. All callables of one op share one
signature:

* ``snake(x, alpha, eps, mask=None) -> y``
* ``istft(spec, window, n_fft, hop, audio_limit, n_frames=None) -> wav`` (fp32)
* ``cfg_euler(x, v, dt, cfg_rate) -> x_new`` (x untouched)
* ``cfg_euler_(x, v, dt, cfg_rate, x_in) -> x``: in place, and x copied into both halves of x_in
* ``euler(x, v, dt) -> x_new``
* ``sample(logits, seen, *, order, temperature, top_p, min_p, top_k, repetition_penalty,
  cfg_weight, seed, offset) -> tokens`` (``native``: None; T3 then runs its own torch chain)

The public ops ``chatterbox_rt.kernels.snake``, ``istft``, ``cfg_euler``, ``cfg_euler_``, ``euler``
and ``sample`` (kernels/__init__.py) call ``choose(op, device).fn`` on every call, with defaults for
the optional arguments; the public ``sample`` runs ``sample_op.sample_ref`` where the choice is
``native`` (None here).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("chatterbox_rt")

ENV_VAR = "CHATTERBOX_RT_KERNELS"
BACKENDS = ("cuda", "triton", "cpp", "native")
AUTO_ORDER = {"cuda": ("cuda", "triton", "native"), "cpu": ("cpp", "native")}
OPS = ("snake", "istft", "cfg_euler", "cfg_euler_", "euler", "sample")
# Triton compiles for NVIDIA GPUs of compute capability 7.0 and up (torch's own gate for it,
# torch.utils._triton.has_triton; Triton's README lists 8.0+ as its tested hardware). Below 8.0
# PTX has no bf16 conversions (ptxas: "cvt with .bf16 requires sm_80"): bf16 tensors go native there.
TRITON_MIN_CAPABILITY = (7, 0)
TRITON_BF16_MIN_CAPABILITY = (8, 0)


class KernelUnavailable(RuntimeError):
    """An explicitly requested kernel backend cannot run on this machine or device."""


@dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    fn: Optional[Callable]


# ------------------------------------------------------------------------------ plain torch (native)

def _snake_native(x, alpha, eps, mask=None):
    from .snake_op import snake_ref

    return snake_ref(x, alpha, eps, mask=mask)


def _istft_native(spec, window, n_fft, hop, audio_limit, n_frames=None):
    from .istft_op import istft_ref

    return istft_ref(spec, window, n_fft, hop, audio_limit, n_frames=n_frames)


def _cfg_euler_native(x, v, dt, cfg_rate):
    from .cfg_euler_op import cfg_euler_ref

    return cfg_euler_ref(x, v, dt, cfg_rate, upcast=False)  # the model's own expression


def _cfg_euler_inplace_native(x, v, dt, cfg_rate, x_in):
    B = x.shape[0]
    x.copy_(_cfg_euler_native(x, v, dt, cfg_rate))
    x_in[:B] = x
    x_in[B:] = x
    return x


def _euler_native(x, v, dt):
    from .cfg_euler_op import euler_ref

    return euler_ref(x, v, dt, upcast=False)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_capabilities: dict = {}  # CUDA device index -> (major, minor); cleared by reset()


def _capability(device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(index)
    if cap is None:
        cap = _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


def triton_lacks_bf16(device: torch.device) -> bool:
    """True on an NVIDIA GPU below ``TRITON_BF16_MIN_CAPABILITY`` (Triton cannot convert bf16 there)."""
    return device.type == "cuda" and not torch.version.hip and _capability(device) < TRITON_BF16_MIN_CAPABILITY


def _needs_native(x: torch.Tensor, triton: bool) -> bool:
    if x.dtype not in _KERNEL_DTYPES:
        return True
    return triton and x.dtype == torch.bfloat16 and triton_lacks_bf16(x.device)


def _with_native(native: Callable, triton: bool = False) -> Callable:
    """The fused kernels compute fp32/fp16/bf16; a float64 tensor (a precision check, not a
    serving mode) takes the plain-torch path of the same op, and so does a bf16 tensor given to a
    Triton kernel on a GPU without bf16 conversions (``triton=True``)."""
    def wrap(fn: Callable) -> Callable:
        def inner(x, *args, **kwargs):
            if _needs_native(x, triton):
                return native(x, *args, **kwargs)
            return fn(x, *args, **kwargs)

        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        return inner

    return wrap


# ------------------------------------------------------------------------------ Triton

@_with_native(_snake_native, triton=True)
def _snake_triton(x, alpha, eps, mask=None):
    from .snake_op import snake_triton

    return snake_triton(x, alpha, eps, mask=mask)


@_with_native(_istft_native, triton=True)
def _istft_triton(spec, window, n_fft, hop, audio_limit, n_frames=None):
    from .istft_op import istft_triton

    return istft_triton(spec, window, n_fft, hop, audio_limit, n_frames=n_frames)


@_with_native(_cfg_euler_native, triton=True)
def _cfg_euler_triton(x, v, dt, cfg_rate):
    from .cfg_euler_op import cfg_euler_triton

    return cfg_euler_triton(x.contiguous(), v.contiguous(), dt, cfg_rate)


@_with_native(_cfg_euler_inplace_native, triton=True)
def _cfg_euler_inplace_triton(x, v, dt, cfg_rate, x_in):
    from .cfg_euler_op import cfg_euler_triton_

    return cfg_euler_triton_(x, v.contiguous(), dt, cfg_rate, x_in)


@_with_native(_euler_native, triton=True)
def _euler_triton(x, v, dt):
    from .cfg_euler_op import euler_triton

    return euler_triton(x.contiguous(), v.contiguous(), dt)


def _sample_triton(logits, seen, **kw):
    from .sample_op import sample_triton

    if logits.dtype == torch.bfloat16 and triton_lacks_bf16(logits.device):
        logits = logits.float()  # exact: the kernel computes in fp32 after its load anyway
    if logits.dim() == 2 and logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel wants unit stride along V (rows may be strided)
    if seen.dim() == 2 and seen.stride(1) != 1:
        seen = seen.contiguous()
    return sample_triton(logits, seen, **kw)


# ------------------------------------------------------------------------------ native extension (cpp, cuda)

def _ext_dt(dt):
    """dt for the extension: a float, or a one-element float32/16/bf16 tensor (a float64 one is cast
    on its device, no host sync)."""
    if isinstance(dt, torch.Tensor) and dt.dtype not in _KERNEL_DTYPES:
        return dt.float()
    return dt


@_with_native(_snake_native)
def _snake_ext(x, alpha, eps, mask=None):
    from . import _native

    if mask is not None:
        x = x * mask  # the model's _mask(x, mask), then Snake
    return _native.snake(x.contiguous(), alpha.to(x.dtype).contiguous(), eps)


@_with_native(_istft_native)
def _istft_ext(spec, window, n_fft, hop, audio_limit, n_frames=None):
    from . import _native

    return _native.istft(spec.contiguous(), window.float().contiguous(), n_fft, hop, audio_limit, n_frames=n_frames)


def _same_dtype_or_native(native: Callable) -> Callable:
    """The extension's Euler ops take v in x's dtype; a mixed pair takes torch's promotion (native)."""
    def wrap(fn: Callable) -> Callable:
        def inner(x, v, *args):
            if v.dtype != x.dtype:
                return native(x, v, *args)
            return fn(x, v, *args)

        inner.__name__ = fn.__name__
        return inner

    return wrap


@_with_native(_cfg_euler_native)
@_same_dtype_or_native(_cfg_euler_native)
def _cfg_euler_ext(x, v, dt, cfg_rate):
    from . import _native

    return _native.cfg_euler(x.contiguous(), v.contiguous(), _ext_dt(dt), cfg_rate)


@_with_native(_cfg_euler_inplace_native)
@_same_dtype_or_native(_cfg_euler_inplace_native)
def _cfg_euler_inplace_ext(x, v, dt, cfg_rate, x_in):
    from . import _native

    return _native.cfg_euler_(x, v.contiguous(), _ext_dt(dt), cfg_rate, x_in)


@_with_native(_euler_native)
@_same_dtype_or_native(_euler_native)
def _euler_ext(x, v, dt):
    from . import _native

    return _native.euler(x.contiguous(), v.contiguous(), _ext_dt(dt))


IMPLS: dict[str, dict[str, Optional[Callable]]] = {
    "snake": {"native": _snake_native, "triton": _snake_triton, "cpp": _snake_ext, "cuda": _snake_ext},
    "istft": {"native": _istft_native, "triton": _istft_triton, "cpp": _istft_ext, "cuda": _istft_ext},
    "cfg_euler": {"native": _cfg_euler_native, "triton": _cfg_euler_triton, "cpp": _cfg_euler_ext,
                  "cuda": _cfg_euler_ext},
    "cfg_euler_": {"native": _cfg_euler_inplace_native, "triton": _cfg_euler_inplace_triton,
                   "cpp": _cfg_euler_inplace_ext, "cuda": _cfg_euler_inplace_ext},
    "euler": {"native": _euler_native, "triton": _euler_triton, "cpp": _euler_ext, "cuda": _euler_ext},
    "sample": {"native": None, "triton": _sample_triton},
}


# ------------------------------------------------------------------------------ availability

def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_cuda_reason() -> Optional[str]:
    """Why Triton cannot compile for the visible GPUs (compute capability below the floor), or None."""
    if torch.version.hip:
        return None  # ROCm: no CUDA compute capability; Triton's AMD backend takes the device as it is
    try:
        caps = [(i, _capability(torch.device("cuda", i))) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001 - no driver, a broken device: the reason is what we report
        return f"cannot read the GPU's compute capability ({type(e).__name__}: {e})"
    if not caps:
        return "no CUDA device is visible"
    index, low = min(caps, key=lambda c: c[1])
    if low < TRITON_MIN_CAPABILITY:
        want = ".".join(map(str, TRITON_MIN_CAPABILITY))
        return (f"Triton needs an NVIDIA GPU of compute capability >= {want}; cuda:{index} has "
                f"{low[0]}.{low[1]}")
    return None


def why_unavailable(backend: str, device_type: str) -> Optional[str]:
    """None when ``backend`` can run on ``device_type``, else the reason (a sentence)."""
    if backend == "native":
        return None
    if backend == "triton":
        if not _has_triton():
            return "triton is not installed (pip install triton)"
        if device_type == "cuda":
            return _triton_cuda_reason()
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton kernels need CUDA tensors here ({device_type}); set TRITON_INTERPRET=1 to interpret them"
    if backend in ("cpp", "cuda"):
        want = "cpu" if backend == "cpp" else "cuda"
        if device_type != want:
            return f"the {backend} kernels run on {want} tensors, not {device_type}"
        from . import _native

        if _native.load() is None:
            return ("the native extension chatterbox_rt._C is not built or failed to load "
                    "(reinstall with `pip install -e . --no-build-isolation`)")
        if not _native.available(device_type):
            return f"the native extension was built without {backend} kernels"
        return None
    return f"unknown backend {backend!r}"


def requested() -> Optional[str]:
    """The backend forced by ``CHATTERBOX_RT_KERNELS``, or None for the automatic choice."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a kernel backend; choose one of {', '.join(BACKENDS)} "
                         "(or leave it unset for the automatic choice)")
    return value


_cache: dict = {}
_fallback_logged: set = set()


def choose(op: str, device) -> Choice:
    """The implementation of ``op`` for tensors on ``device`` (cached; see the module docstring)."""
    if op not in IMPLS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    device_type = torch.device(device).type
    forced = requested()
    key = (op, device_type, forced, os.environ.get("TRITON_INTERPRET"))
    hit = _cache.get(key)
    if hit is not None:
        return hit
    impls = IMPLS[op]
    if forced is not None:
        if forced not in impls:
            backend = "native"  # the op has no such form at all: plain torch
        else:
            reason = why_unavailable(forced, device_type)
            if reason is not None:
                raise KernelUnavailable(f"{ENV_VAR}={forced} but {op} cannot use it on {device_type}: {reason}")
            backend = forced
    else:
        backend, skipped = "native", []
        for b in AUTO_ORDER.get(device_type, ("native",)):
            if b not in impls:
                continue
            reason = why_unavailable(b, device_type)
            if reason is None:
                backend = b
                break
            skipped.append(f"{b}: {reason}")
        if skipped and (device_type, skipped[0]) not in _fallback_logged:
            _fallback_logged.add((device_type, skipped[0]))
            log.info("chatterbox_rt kernels on %s: using %s for %s (%s)", device_type, backend, op, "; ".join(skipped))
    choice = _cache[key] = Choice(op, backend, impls[backend])
    return choice


_generation = [0]  # bumped by reset(): every DispatchedOp resolves again


def reset() -> None:
    """Forget cached choices (after changing ``CHATTERBOX_RT_KERNELS``; tests)."""
    _cache.clear()
    _capabilities.clear()
    _generation[0] += 1


def summary(device) -> dict:
    """{op: backend} for a device, e.g. for the bench's environment block."""
    return {op: choose(op, device).backend for op in OPS}


class DispatchedOp:
    """A model's handle on one op: resolves on the first call for a device type and keeps it
    (until ``reset()``), so a forward pass costs one attribute check, not a choice."""

    __slots__ = ("op", "_key", "_fn")

    def __init__(self, op: str):
        if op not in IMPLS:
            raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        self.op, self._key, self._fn = op, None, None

    def get(self, device: torch.device) -> Optional[Callable]:
        key = (device.type, _generation[0])
        if key != self._key:
            self._fn = choose(self.op, device).fn
            self._key = key
        return self._fn

    def backend(self, device) -> str:
        return choose(self.op, device).backend
