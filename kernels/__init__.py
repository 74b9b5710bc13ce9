"""Fused ops, one per file: a Triton kernel, its launcher and a plain-torch ``<op>_ref``.

* ``snake(x, alpha, eps=1e-9, out=None, mask=None)`` — HiFT's Snake activation (kernels/snake.py)
* ``istft(spec, window, n_fft=16, hop=4, audio_limit=0.99, n_frames=None)`` — HiFT's head from
  conv_post's output to clamped samples in one launch (kernels/istft.py)
* ``cfg_euler(x, v, dt, cfg_rate)``, ``cfg_euler_(x, v, dt, cfg_rate, x_in)``, ``euler(x, v, dt)``
  — the CFM's Euler steps with and without CFG (kernels/cfg_euler.py)
* ``sample(logits, seen, *, order, ...)`` — T3's per-step sampling without a host sync
  (kernels/sample.py)

The launchers here are the Triton forms. Models reach every backend (CUDA, Triton, C++, plain
torch) through ``chatterbox_rt.kernels.dispatch``. Names resolve lazily, so importing the package
does not import triton.
"""
from importlib import import_module

_EXPORTS = {
    "snake": "snake", "snake_ref": "snake",
    "istft": "istft", "istft_ref": "istft",
    "cfg_euler": "cfg_euler", "cfg_euler_": "cfg_euler", "euler": "cfg_euler", "cfg_euler_ref": "cfg_euler",
    "euler_ref": "cfg_euler",
    "sample": "sample", "sample_ref": "sample", "processed_probs_ref": "sample",
}
__all__ = sorted(_EXPORTS) + ["dispatch"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    if name == "dispatch":
        return import_module(".dispatch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
