"""NVTX ranges for Nsight Systems / Nsight Compute: one domain, ``chatterbox_rt``, one colour per stage.

    from chatterbox_rt.profiling import nvtx

    with nvtx.range("t3_prefill"):            # the stage is the name when the name is a stage
        ...
    with nvtx.range("embed_ref", "voice"):    # any name, coloured by its stage
        ...
    @nvtx.annotate("hift", "hift")
    def vocode(mel): ...

Off unless asked for: ``CHATTERBOX_RT_NVTX=1`` (read once, at import) or ``enable()`` at run time.
While off, ``range()`` returns one shared no-op context manager (no allocation, no call into NVTX),
so ranges can sit in per-step loops. While on, each (name, stage) pair gets one cached range object
holding its registered NVTX event attributes; entering it pushes a thread range
(``nvtxDomainRangePushEx``), leaving it pops (also on an exception). Push/pop ranges nest per
thread, which is what ``ncu --nvtx-include "chatterbox_rt@estimator/"`` filters on.

The ``nvtx`` PyPI package is not a dependency: it is imported on the first range after enabling,
and if it is missing one warning is logged and everything stays a no-op.

``profiler_start()`` / ``profiler_stop()`` bracket the timed part of a benchmark for
``nsys profile --capture-range=cudaProfilerApi`` (see ``profiling/nsys.sh``).

This module imports nothing else from the package: models may import it.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Mapping, Optional

log = logging.getLogger(__name__)

DOMAIN = "chatterbox_rt"
ENV_VAR = "CHATTERBOX_RT_NVTX"

# ARGB, one per stage; neighbouring stages get contrasting colours on the Nsight timeline.
STAGE_COLORS: dict[str, int] = {
    "text": 0xFF9E9E9E,        # grey: text normalisation + tokenizer (host)
    "voice": 0xFF8E24AA,       # purple: reference clip -> Voice (S3Gen prompt, T3 prompt, speaker embedding)
    "t3": 0xFF1565C0,          # dark blue: one whole T3 call (parent of prefill + decode)
    "t3_prefill": 0xFF1E88E5,  # blue
    "t3_decode": 0xFF00ACC1,   # cyan: the decode loop
    "t3_step": 0xFF4DD0E1,     # light cyan: one decode step
    "sampling": 0xFFFDD835,    # yellow: CFG combine, penalties, filters, draw
    "flow": 0xFF43A047,        # green: speech tokens -> mel (encoder + CFM)
    "cfm_step": 0xFF7CB342,    # light green: one Euler step
    "estimator": 0xFFC0CA33,   # lime: one CFM estimator call
    "hift": 0xFFFB8C00,        # orange: mel -> waveform
    "watermark": 0xFFE53935,   # red
    "io": 0xFF6D4C41,          # brown: device <-> host copies, file I/O
}
DEFAULT_COLOR = 0xFF607D8B  # blue-grey: a name that is no stage, with no stage given

_TRUE = frozenset({"1", "true", "yes", "on"})


def env_enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``CHATTERBOX_RT_NVTX`` asks for ranges: 1/true/yes/on (any case) do; unset, 0, anything else do not."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return value.strip().lower() in _TRUE


class _NoRange:
    """The shared disabled range: a context manager and nothing else."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False


NO_RANGE = _NoRange()


class _Range:
    """One (name, stage) pair's NVTX range, reused for every entry (push/pop keep no per-call state)."""

    __slots__ = ("name", "color", "_domain", "_attrs")

    def __init__(self, domain, name: str, color: int):
        self.name, self.color, self._domain = name, color, domain
        self._attrs = domain.get_event_attributes(message=name, color=color)  # registers the string once

    def __enter__(self):
        self._domain.push_range(self._attrs)
        return self

    def __exit__(self, exc_type, exc, tb):
        self._domain.pop_range()
        return False


_enabled: bool = env_enabled()
_domain = None  # the nvtx Domain, resolved on the first range after enabling
_ranges: dict = {}  # (name, stage) -> _Range
_missing_logged = False


def enable(on: bool = True) -> None:
    """Turn ranges on (or off) at run time, e.g. for a ``--nvtx`` flag."""
    global _enabled
    _enabled = bool(on)


def disable() -> None:
    enable(False)


def is_enabled() -> bool:
    return _enabled


def color_of(name: str, stage: Optional[str] = None) -> int:
    """The ARGB colour of a range: its stage's, else the name's if the name is a stage, else
    ``DEFAULT_COLOR`` (never an error: a profiling label must not break a run)."""
    return STAGE_COLORS.get(name if stage is None else stage, DEFAULT_COLOR)


def _load_domain():
    """Import ``nvtx`` and get the domain; None (and one warning, and ranges off) if it is not installed."""
    global _domain, _enabled, _missing_logged
    try:
        import nvtx
    except ImportError:
        _enabled = False
        if not _missing_logged:
            _missing_logged = True
            log.warning("NVTX ranges were requested but the 'nvtx' package is not installed (pip install nvtx); "
                        "running without them")
        return None
    _domain = nvtx.get_domain(DOMAIN)
    return _domain


def _enabled_range(name: str, stage: Optional[str]):
    r = _ranges.get((name, stage))
    if r is None:
        domain = _domain if _domain is not None else _load_domain()
        if domain is None:
            return NO_RANGE
        r = _ranges[(name, stage)] = _Range(domain, name, color_of(name, stage))
    return r


def range(name: str, stage: Optional[str] = None):  # noqa: A001 - mirrors nvtx's naming; used as nvtx.range
    """A context manager marking ``name`` in domain ``chatterbox_rt``, coloured by ``stage``
    (default: ``name`` itself when it is a stage). Off: the shared no-op ``NO_RANGE``."""
    if not _enabled:
        return NO_RANGE
    return _enabled_range(name, stage)


def annotate(name: Optional[str] = None, stage: Optional[str] = None) -> Callable:
    """Decorator form of ``range``; ``name`` defaults to the function's qualified name. Whether
    ranges are on is checked at each call, so ``enable()`` after decoration works."""
    def wrap(fn: Callable) -> Callable:
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not _enabled:
                return fn(*args, **kwargs)
            with _enabled_range(label, stage):
                return fn(*args, **kwargs)

        return inner

    return wrap


def profiler_start() -> None:
    """``cudaProfilerStart`` after a device sync (nsys ``--capture-range=cudaProfilerApi`` begins
    here); a no-op without CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.profiler.start()


def profiler_stop() -> None:
    """``cudaProfilerStop`` after a device sync, so the bracketed work is inside the capture; a
    no-op without CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


__all__ = ["DOMAIN", "ENV_VAR", "STAGE_COLORS", "DEFAULT_COLOR", "NO_RANGE", "range", "annotate", "enable",
           "disable", "is_enabled", "env_enabled", "color_of", "profiler_start", "profiler_stop"]
