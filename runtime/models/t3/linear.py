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
"""
from __future__ import annotations

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
    if not _decode_shaped(x, rows):
        return F.linear(x, weight, bias)
    y = (weight @ _rows_for_decode(x.reshape(rows, K)).t()).t()[:rows].contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) computed with :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv1D(nn.Module):
    """GPT-2's linear layer. The parameter has the checkpoints' shape [in, out] but is a transposed
    view of contiguous [out, in] storage, so :func:`linear` gets the row-major weight it is fast
    with; loading copies into it in place and ``.to()`` preserves the layout."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in).t())
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight.t(), self.bias)


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
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {list(w.shape)} from "
                                  f"checkpoint, the shape in current model is {list(self.key_shape)}.")
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
    """The fastest layout for the shape: blocked when wider than ``DECODE_WIDE_K``."""
    if n_in > DECODE_WIDE_K and n_in % DECODE_BLOCK_K == 0:
        return BlockedLinear(n_in, n_out, bias=bias, conv1d=conv1d)
    return Conv1D(n_in, n_out) if conv1d else Linear(n_in, n_out, bias=bias)
