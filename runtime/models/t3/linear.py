"""Linear layers laid out for fast decode on the CPU, with the checkpoints' parameter keys.

T3 decode multiplies one or two rows by every weight matrix, so it is bound by reading the
weights. On the 2-core CI-class CPU (AMD EPYC, MKL, torch 2.13) we measured for fp32:

* ``x @ W.T`` (``F.linear``) with 2 rows: 7-10 GB/s; with 1 row (a GEMV): 15-20 GB/s;
* ``W @ x.T`` with ``x`` row-major (so ``x.T`` is column-major), 2 rows: 30-34 GB/s when the
  inner dimension is <= 1024, but only ~20 GB/s at 3072-4096;
* the same product over contiguous 512-column blocks ``[nb, out, 512]`` (one ``bmm`` plus a
  sum of the partial products): 32-34 GB/s for the wide matrices too (1024-column blocks:
  26 GB/s at 768 x 3072).

The read bandwidth of that machine is ~32 GB/s, so these forms reach it. :func:`linear` uses
``W @ x.T`` for up to ``DECODE_ROWS_MAX`` rows (one row is doubled, since a single column
takes the slow GEMV path); :class:`BlockedLinear` stores matrices wider than
``DECODE_WIDE_K`` as column blocks of ``DECODE_BLOCK_K``. Larger inputs (prefill) and other devices or dtypes take
``F.linear`` or a batched product. Only the summation order inside the dot products differs
from ``F.linear``.

Those forms lose on other CPUs. On the 2-core Intel Xeon VM (torch 2.13) ``W @ x.T`` reads
15-16 GB/s and the blocks 10-11, while MKL's ``F.linear`` with 2 rows reads 26-32 GB/s but
falls to ~13 GB/s at 4-16 rows and is row-count invariant only up to 15 rows. oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``) reads ~21 GB/s at 2 rows and ~15 GB/s at 16, and is
row-count invariant from 2 to 64 rows there. So the decode product is chosen per machine, once
per process, by :func:`decode_kernel`: ``"onednn"`` (weights packed once for oneDNN, see
:class:`_Packable`) or ``"wxt"`` (``W @ x.T`` with wide matrices blocked). Set
``CHATTERBOX_RT_CPU_DECODE=onednn|wxt|mkl`` to fix it; ``"mkl"`` (plain ``F.linear``, never
chosen by the probe) is the fastest single request on Intel CPUs with MKL, but batches poorly
(4-16 rows cost 2-3x two rows) and the engine then groups at most the rows it is invariant for.
``profiling/bench_linear.py`` prints every form on the machine at hand.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Largest row count that takes the decode-shaped product. The engine's batched decode steps use it
# too: on the 2-core Intel Xeon VM (torch 2.13, MKL) ``W @ x.T`` costs the same for 2 to 32 rows
# (memory-bound: 4096 x 1024 in ~3 ms) and a row's result is bit-identical for every row count
# from 2 to 56, so up to 32 rows share one read of the weights without changing any row.
DECODE_ROWS_MAX = 32
# Weights with an inner dimension above DECODE_WIDE_K are stored as contiguous column blocks
# of DECODE_BLOCK_K.
DECODE_WIDE_K = 1024
DECODE_BLOCK_K = 512

DECODE_KERNELS = ("onednn", "wxt", "mkl")
DECODE_KERNEL_ENV = "CHATTERBOX_RT_CPU_DECODE"
# The probe keeps oneDNN unless ``W @ x.T`` is faster than this fraction of its time: a near tie
# must not flip the choice (and so the last bits of the outputs) from one process to the next.
_WXT_MARGIN = 0.8
_PROBE_SHAPES = ((4096, 1024), (1024, 4096))
_PROBE_BYTES = 96 << 20  # per shape: more than a CPU's last-level cache
_decode_kernel: Optional[str] = None
_probe_lock = threading.Lock()

log = logging.getLogger(__name__)


def _onednn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _probe_decode_kernel() -> str:
    """Time oneDNN (packed weights) and ``W @ x.T`` at 2 and 16 rows over T3-sized fp32 matrices
    (~0.5 s), and check that oneDNN's rows are row-count invariant up to ``DECODE_ROWS_MAX``."""
    if not _onednn_linear_available():
        return "wxt"
    g = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")  # explicit: the first T3 may be built under `with torch.device("meta")`
    totals = {"onednn": 0.0, "wxt": 0.0}
    for n_out, n_in in _PROBE_SHAPES:
        count = max(2, _PROBE_BYTES // (n_out * n_in * 4))
        ws = [torch.empty(n_out, n_in, device=cpu).uniform_(-1, 1, generator=g) for _ in range(count)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 2) for w in ws]  # as _Packable runs them
        xs = torch.empty(DECODE_ROWS_MAX, n_in, device=cpu).uniform_(-1, 1, generator=g)
        ref = _onednn_linear(xs[:2], packed[0], None)
        for rows in range(3, DECODE_ROWS_MAX + 1):
            if not torch.equal(_onednn_linear(xs[:rows], packed[0], None)[:2], ref):
                log.info("oneDNN's linear is not row-count invariant at %d rows here; decode uses W @ x.T", rows)
                return "wxt"
        for rows in (2, 16):
            x = xs[:rows].contiguous()
            forms = {"onednn": (lambda w: _onednn_linear(x, w, None), packed), "wxt": (lambda w: w @ x.t(), ws)}
            for name, (fn, mats) in forms.items():
                fn(mats[0])
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    for w in mats:
                        fn(w)
                    best = min(best, time.perf_counter() - t0)
                totals[name] += best
    choice = "wxt" if totals["wxt"] < _WXT_MARGIN * totals["onednn"] else "onednn"
    log.info("CPU decode kernel: %s (probe: oneDNN %.1f ms, W @ x.T %.1f ms)", choice,
             totals["onednn"] * 1e3, totals["wxt"] * 1e3)
    return choice


def decode_kernel() -> str:
    """The product decode-sized fp32 CPU inputs use in this process: ``"onednn"``, ``"wxt"`` or ``"mkl"``.
    From ``$CHATTERBOX_RT_CPU_DECODE`` if set, else measured once (:func:`_probe_decode_kernel`)."""
    global _decode_kernel
    if _decode_kernel is not None:
        return _decode_kernel
    with _probe_lock:  # one probe per process, even when two threads build their first T3 at once
        if _decode_kernel is not None:
            return _decode_kernel
        env = os.environ.get(DECODE_KERNEL_ENV, "").strip().lower()
        if env and env != "auto":
            if env not in DECODE_KERNELS:
                raise ValueError(f"{DECODE_KERNEL_ENV}={env!r}: expected one of {', '.join(DECODE_KERNELS)} or auto")
            log.info("CPU decode kernel: %s (from %s)", env, DECODE_KERNEL_ENV)
            if env == "onednn" and not _onednn_linear_available():
                raise RuntimeError(f"{DECODE_KERNEL_ENV}=onednn, but this torch build has no oneDNN linear")
            _decode_kernel = env
        else:
            with torch.inference_mode():
                _decode_kernel = _probe_decode_kernel()
    return _decode_kernel


def _decode_shaped(x: Tensor, rows: int) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and 0 < rows <= DECODE_ROWS_MAX


def _rows_for_decode(x2: Tensor) -> Tensor:
    # NOTE: x must be row-major so that x.T is column-major; a transposed x (e.g. the output of
    # these very products) silently falls back to a path 4x slower.
    x2 = x2.contiguous()
    return torch.cat([x2, x2]) if x2.shape[0] == 1 else x2


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; decode-sized fp32 CPU inputs computed as ``(W @ x.T).T``."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if not _decode_shaped(x, rows) or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)):
        return F.linear(x, weight, bias)  # (oneDNN's op has no backward)
    x2 = _rows_for_decode(x.reshape(rows, K))
    kernel = decode_kernel()
    if kernel == "mkl":  # one row doubled too: MKL's one-row GEMV rounds unlike its two-row product
        y = F.linear(x2, weight, bias)[:rows]
    elif kernel == "onednn" and weight.is_contiguous():
        y = _onednn_linear(x2, weight, bias)[:rows]
    else:
        y = (weight @ x2.t()).t()[:rows].contiguous()
        if bias is not None:
            y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


_pack_lock = threading.Lock()


class _Packable:
    """oneDNN weight packing for :class:`Linear` and :class:`Conv1D`.

    When this process's decode kernel is oneDNN, the first fp32 CPU forward without autograd
    replaces the dense weight by oneDNN's packed copy (``torch.ops.mkldnn._reorder_linear_weight``,
    the same bytes in the layout its kernels stream fastest: ~20 % more decode speed on the Intel
    VM), so the weights are held once. Everything else sees the checkpoint layout:
    ``state_dict()`` and :meth:`dense_weight` give the dense tensor, loading and ``.to()`` /
    ``.half()`` / ``.cuda()`` restore the dense parameter first. While packed, ``weight`` is a
    oneDNN tensor of logical shape ``[out, in]``; code that needs the values calls
    :meth:`dense_weight`.
    """

    n_in: int
    n_out: int

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def _oi(self) -> Tensor:
        raise NotImplementedError  # the dense weight as [out, in]; defined by each layer class

    def _set_dense(self, w_oi: Tensor, requires_grad: bool) -> None:
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The weight in the checkpoint layout (``[out, in]``, or ``[in, out]`` for Conv1D)."""
        w = self.weight.to_dense() if self.packed else self._oi()
        return w.t() if isinstance(self, Conv1D) else w

    def _maybe_pack(self, x: Tensor) -> bool:
        if self.packed:
            return True
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.device.type != "cpu"
                or w.dtype != torch.float32 or (torch.is_grad_enabled() and w.requires_grad)
                or decode_kernel() != "onednn"):
            return False
        with _pack_lock:
            if not self.packed:
                with torch.inference_mode(False), torch.no_grad():
                    packed = torch.ops.mkldnn._reorder_linear_weight(self._oi().contiguous(), 2)
                self._requires_grad = w.requires_grad
                self.weight = nn.Parameter(packed, requires_grad=False)
        return True

    def _unpack(self) -> None:
        with _pack_lock:
            if self.packed:
                with torch.inference_mode(False), torch.no_grad():
                    w = self.weight.to_dense()
                self._set_dense(w, getattr(self, "_requires_grad", True))

    def _forward(self, x: Tensor) -> Tensor:
        if self._maybe_pack(x):
            K = self.n_in
            rows = x.numel() // K if K else 0
            x2 = x.reshape(rows, K)
            x2 = _rows_for_decode(x2) if 0 < rows <= DECODE_ROWS_MAX else x2.contiguous()
            y = _onednn_linear(x2, self.weight, self.bias)[:rows]
            return y.reshape(*x.shape[:-1], self.n_out)
        return linear(x, self._oi(), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.packed:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpack()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._unpack()
        return super()._apply(fn, *args, **kwargs)


class Linear(_Packable, nn.Linear):
    """``nn.Linear`` (same parameters) computed with :func:`linear`, or with oneDNN over a
    packed weight (see :class:`_Packable`)."""

    @property
    def n_in(self) -> int:
        return self.in_features

    @property
    def n_out(self) -> int:
        return self.out_features

    def _oi(self) -> Tensor:
        return self.weight

    def _set_dense(self, w_oi: Tensor, requires_grad: bool) -> None:
        self.weight = nn.Parameter(w_oi, requires_grad=requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)


class Conv1D(_Packable, nn.Module):
    """GPT-2's linear layer. The parameter has the checkpoints' shape [in, out] but is a transposed
    view of contiguous [out, in] storage, so :func:`linear` gets the row-major weight it is fast
    with; loading copies into it in place and ``.to()`` preserves the layout. Packed like
    :class:`Linear` (then ``weight`` is ``[out, in]``)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_out, n_in).t())
        self.bias = nn.Parameter(torch.zeros(n_out))

    def _oi(self) -> Tensor:
        return self.weight.t()

    def _set_dense(self, w_oi: Tensor, requires_grad: bool) -> None:
        self.weight = nn.Parameter(w_oi.contiguous().t(), requires_grad=requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)


def size_mismatch(key: str, got, want) -> str:
    """torch's load_state_dict message for a checkpoint tensor of the wrong shape."""
    return (f"size mismatch for {key}: copying a param with shape {list(got)} from checkpoint, "
            f"the shape in current model is {list(want)}.")


class BlockedLinear(nn.Module):
    """A linear layer whose weight is stored as contiguous column blocks ``[nb, out, kb]``.

    In ``state_dict()`` and when loading, the weight has the checkpoints' 2-D shape: ``[out, in]``
    like ``nn.Linear``, or ``[in, out]`` with ``conv1d=True`` (GPT-2's Conv1D); the blocks are
    packed on load. NOTE: low-precision inputs sum the block products in fp32, one rounding
    more than a plain matmul; GPU builds may prefer a plain layout (revisit with the GPU work).
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True, conv1d: bool = False,
                 block: int = DECODE_BLOCK_K):
        super().__init__()
        if n_in % block:
            raise ValueError(f"in_features {n_in} is not a multiple of the block width {block}")
        self.n_in, self.n_out, self.conv1d = n_in, n_out, conv1d
        self.weight = nn.Parameter(torch.empty(n_in // block, n_out, block))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    @property
    def key_shape(self) -> tuple:
        return (self.n_in, self.n_out) if self.conv1d else (self.n_out, self.n_in)

    def dense_weight(self) -> Tensor:
        """The weight in the checkpoint layout (a copy)."""
        w = self.weight.permute(1, 0, 2).reshape(self.n_out, self.n_in)
        return w.t() if self.conv1d else w

    def _pack(self, w: Tensor) -> Tensor:
        if self.conv1d:
            w = w.t()
        nb, _, kb = self.weight.shape
        return w.reshape(self.n_out, nb, kb).permute(1, 0, 2).contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.dense_weight()
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != self.key_shape:
                error_msgs.append(size_mismatch(key, w.shape, self.key_shape))
                state_dict = {k: v for k, v in state_dict.items() if k != key}
            else:
                state_dict[key] = self._pack(w)  # load_state_dict hands modules its own shallow copy
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        K = self.n_in
        rows = x.numel() // K
        nb, N, kb = self.weight.shape
        x2 = x.reshape(rows, K)
        if _decode_shaped(x, rows):
            xr = _rows_for_decode(x2)
            xb = xr.view(xr.shape[0], nb, kb).permute(1, 2, 0)  # [nb, kb, R], each block column-major
            y = torch.bmm(self.weight, xb).sum(0).t()[:rows].contiguous()
        else:
            xb = x2.reshape(rows, nb, kb).transpose(0, 1)  # [nb, rows, kb]
            y = torch.bmm(xb, self.weight.transpose(1, 2)).sum(0, dtype=torch.float32).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], N)


def make_linear(n_in: int, n_out: int, bias: bool = True, conv1d: bool = False) -> nn.Module:
    """The fastest layout for the shape: blocked when wider than ``DECODE_WIDE_K`` and the
    machine's decode kernel is ``W @ x.T``; plain otherwise."""
    if n_in > DECODE_WIDE_K and n_in % DECODE_BLOCK_K == 0 and decode_kernel() == "wxt":
        return BlockedLinear(n_in, n_out, bias=bias, conv1d=conv1d)
    return Conv1D(n_in, n_out) if conv1d else Linear(n_in, n_out, bias=bias)
