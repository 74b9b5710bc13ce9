"""T3's component runner for the engine: one KV cache with per-request slots, prefill into a
request's own rows, and batched decode steps over the rows of every running request.

Two decode modes, chosen once:

* ``"invariant"`` (default for fp32 on a CPU): a request's logits are bit-identical whatever
  runs beside it. Every op of a decode step is row-wise except the linear layers and attention;
  the linear layers run in groups of at most ``group_rows`` rows, a size range over which the
  product's per-row result was verified not to depend on the row count (``invariant_group_rows``,
  checked at start-up on this machine's kernels), and attention runs per request over exactly its
  own cache entries, with the very call a solo decode step makes (``backbone.Segment``). Weights
  are read once per group instead of once per request.
* ``"dense"`` (default on a GPU and for reduced precision): rows are cache slots ``0..n-1`` of a
  batch-size bucket, attention masked over a shared length; static shapes, so on CUDA each bucket
  is captured once as a CUDA graph and replayed. Rounding may differ between batch sizes, so a
  request's tokens can differ from its solo run where two candidates are within rounding.

The runner executes what the scheduler hands it; it decides nothing about who runs.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..models.t3.backbone import KVCache, Segment, Step
from ..models.t3.linear import BlockedLinear, Conv1D, Linear
from ..models.t3.quant import QuantLinear
from ..models.t3.request import T3Request
from ..models.t3.t3 import CACHE_LEN_QUANTUM, T3
from ..profiling import nvtx

log = logging.getLogger(__name__)

# Batch-size buckets of the dense mode (each one CUDA graph).
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Largest row count tried when checking which linear products are row-count invariant.
INVARIANCE_PROBE_ROWS = 32


def invariant_group_rows(t3: T3, limit: int = INVARIANCE_PROBE_ROWS, seed: int = 0) -> int:
    """The largest ``C`` such that, for every linear layer shape of ``t3``'s decode step, a row's
    output is bit-identical for every row count from 1 to ``C`` (and whatever the other rows
    hold). Measured on this machine's kernels with random inputs; at least 1."""
    g = torch.Generator().manual_seed(seed)
    shapes, mods = set(), []
    for m in t3.modules():
        if isinstance(m, (Linear, Conv1D, BlockedLinear, QuantLinear)):
            shape = m.key_shape if isinstance(m, QuantLinear) else tuple(m.weight.shape)
            key = (type(m).__name__, shape, getattr(m, "bias", None) is not None)
            if key not in shapes:
                shapes.add(key)
                mods.append(m)
    best = limit
    with torch.inference_mode():
        for m in mods:
            k = m.n_in
            dev, dt = (m.qweight.device, t3.dtype) if isinstance(m, QuantLinear) else (m.weight.device, m.weight.dtype)
            row = torch.randn(k, generator=g).to(dev, dt)
            ref = m(torch.stack([row, torch.randn(k, generator=g).to(dev, dt)]))[0]
            for rows in range(1, best + 1):
                x = torch.randn(rows, k, generator=g).to(dev, dt)
                x[rows - 1] = row
                if not torch.equal(m(x)[rows - 1], ref):
                    best = rows - 1
                    break
    return max(best, 1)


class T3Runner:
    """KV slots and the decode step for the engine (torch backend)."""

    def __init__(self, t3: T3, max_rows: int, max_len: int, *, mode: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None):
        self.t3 = t3
        dev = t3.device
        if mode is None:
            mode = "invariant" if dev.type == "cpu" and t3.dtype == torch.float32 else "dense"
        if mode not in ("invariant", "dense"):
            raise ValueError(f"mode must be 'invariant' or 'dense', got {mode!r}")
        self.mode = mode
        self.max_rows = int(max_rows)
        self.max_len = -(-int(max_len) // CACHE_LEN_QUANTUM) * CACHE_LEN_QUANTUM
        b = t3.config.backbone
        # The invariant mode never reads an entry it has not written, so its cache need not be
        # zeroed (on a CPU, untouched pages cost no memory); the dense mode masks stale entries,
        # which must be finite.
        self.cache = KVCache(b.num_layers, b.num_heads, b.head_dim, self.max_rows, self.max_len, t3.kv_dtype, dev,
                             zero=(mode == "dense"))
        self._free = [True] * self.max_rows
        self.group_rows = invariant_group_rows(t3) if mode == "invariant" else self.max_rows
        if mode == "invariant" and self.group_rows < 2:
            log.warning("this machine's linear kernels are not row-count invariant: the engine decodes "
                        "one request at a time to keep each request's tokens independent of the others")
        if cuda_graphs is None:
            cuda_graphs = dev.type == "cuda" and mode == "dense"
        if cuda_graphs and (dev.type != "cuda" or mode != "dense"):
            raise ValueError("cuda_graphs=True needs a CUDA device and the dense decode mode")
        self.graphs = _GraphPool(self) if cuda_graphs else None

    # ------------------------------------------------------------------ slots

    @property
    def slots_in_use(self) -> int:
        return self.max_rows - sum(self._free)

    def allocate(self, n: int) -> Optional[int]:
        """First free run of ``n`` adjacent rows (a request's CFG pair), or None if none is free."""
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == n:
                start = i - n + 1
                for j in range(start, start + n):
                    self._free[j] = False
                return start
        return None

    def release(self, slot: int, n: int) -> None:
        for j in range(slot, slot + n):
            self._free[j] = True

    def free(self) -> None:
        """Drop the cache (the engine is closing)."""
        self.cache = None
        self.graphs = None

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, req: T3Request, slot: int) -> Tensor:
        """Run ``req``'s prompt into its rows -> logits ``[rows, V]``."""
        with nvtx.range("t3_prefill"):
            logits = self.t3.prefill_rows(req.embeds(), self.cache.rows(slot, req.rows), req.prefill_probe())
        req.release_embeds()
        return logits

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode(self, items: Sequence[tuple[T3Request, int]]) -> list[Tensor]:
        """One decode step for each (request, slot) -> each request's logits ``[rows, V]``."""
        if self.mode == "invariant":
            return self._decode_invariant(items)
        return self._decode_dense(items)

    def groups(self, items: Sequence[tuple[T3Request, int]]) -> list[list[tuple[T3Request, int]]]:
        """Whole requests packed, in order, into groups of at most ``group_rows`` rows."""
        out, cur, rows = [], [], 0
        for req, slot in items:
            if cur and rows + req.rows > self.group_rows:
                out.append(cur)
                cur, rows = [], 0
            cur.append((req, slot))
            rows += req.rows
        if cur:
            out.append(cur)
        return out

    def _decode_invariant(self, items) -> list[Tensor]:
        dev = self.t3.device
        learned = self.t3.config.learned_pos_emb
        result = []
        for group in self.groups(items):
            tokens, pos, slots, spos, segments = [], [], [], [], []
            row = 0
            for req, slot in group:
                n, p = req.rows, req.input_pos
                tokens.append(req.last_token().expand(n))
                pos += [p] * n
                slots += list(range(slot, slot + n))
                spos += [req.speech_pos] * n
                pos_r = torch.full((n,), p, dtype=torch.long, device=dev)
                # The mask Step.decode builds for this request alone (all True): same call, same result.
                mask = (torch.arange(req.kv_len, device=dev)[None, :] <= pos_r[:, None])[:, None, None, :]
                segments.append(Segment(row, n, slot, req.kv_len, mask, req.current_probe()))
                row += n
            step = Step.per_request(torch.tensor(pos, device=dev), torch.tensor(slots, device=dev), segments)
            speech_pos = torch.tensor(spos, device=dev) if learned else None
            with nvtx.range("t3_decode_group"):
                logits = self.t3.decode_rows(torch.cat(tokens), speech_pos, step, self.cache)
            row = 0
            for req, _ in group:
                result.append(logits[row:row + req.rows])
                row += req.rows
        return result

    def _dense_inputs(self, items, n_rows: int):
        """Rows 0..n_rows-1 = slots: (tokens, positions, speech positions) ``[n_rows]``; free slots
        get token 0 at position 0. Positions are built on the host and copied once; the tokens
        (on the device) are gathered with one index_copy."""
        dev = self.t3.device
        pos, spos, slots = [0] * n_rows, [0] * n_rows, []
        for req, slot in items:
            for j in range(slot, slot + req.rows):
                pos[j], spos[j] = req.input_pos, req.speech_pos
                slots.append(j)
        last = torch.cat([req.last_token().expand(req.rows) for req, _ in items])
        tokens = torch.zeros(n_rows, dtype=torch.long, device=dev)
        tokens.index_copy_(0, torch.tensor(slots, device=dev), last)
        return tokens, torch.tensor(pos, device=dev), torch.tensor(spos, device=dev)

    def _decode_dense(self, items) -> list[Tensor]:
        # A request with an alignment probe (multilingual 0.1.7) reads attention of its own row:
        # it takes the per-request path (one segment), the others share the dense step.
        probed = [(r, s) for r, s in items if r.current_probe() is not None]
        plain = [(r, s) for r, s in items if r.current_probe() is None]
        out: dict[int, Tensor] = {}
        if plain:
            top = max(s + r.rows for r, s in items)
            n_rows = next((b for b in GRAPH_BUCKETS if b >= top), top) if self.graphs is not None else top
            n_rows = min(n_rows, self.max_rows)
            # Every running request's real input, probed ones included: a row of the step writes
            # its slot's cache entry at its position, which must be that request's own (the
            # per-request pass below then rewrites the probed requests' entries).
            tokens, pos, spos = self._dense_inputs(items, n_rows)
            logits = None
            if self.graphs is not None:
                logits = self.graphs.run(n_rows, tokens, pos, spos)
            if logits is None:
                kv_len = max(r.kv_len for r, _ in plain)
                logits = self._dense_forward(tokens, pos, spos, kv_len)
            for r, s in plain:
                out[id(r)] = logits[s:s + r.rows]
        for r, s in probed:
            out[id(r)] = self._decode_invariant([(r, s)])[0]
        return [out[id(r)] for r, _ in items]

    def _dense_forward(self, tokens: Tensor, pos: Tensor, spos: Tensor, kv_len: Optional[int]) -> Tensor:
        t3 = self.t3
        x = t3.embed_speech(tokens, spos if t3.config.learned_pos_emb else None)
        h = t3.tfmr(x, self.cache, pos=pos, kv_len=kv_len)
        return t3.speech_head(h[:, -1])


class _GraphPool:
    """CUDA graphs of the dense decode step, one per batch-size bucket, captured on first use.
    The graph attends over the whole cache (masked), so one capture serves every length. A
    capture that fails disables graphs with one warning; the step then runs eagerly."""

    def __init__(self, runner: T3Runner):
        self.runner = runner
        self.graphs: dict = {}
        self.failed = False

    def run(self, n_rows: int, tokens: Tensor, pos: Tensor, spos: Tensor) -> Optional[Tensor]:
        if self.failed:
            return None
        entry = self.graphs.get(n_rows)
        if entry is None:
            entry = self._capture(n_rows)
            if entry is None:
                return None
        graph, (t_in, p_in, s_in), out = entry
        t_in.copy_(tokens)
        p_in.copy_(pos)
        s_in.copy_(spos)
        graph.replay()
        return out

    def _capture(self, n_rows: int):
        r = self.runner
        dev = r.t3.device
        try:
            inputs = tuple(torch.zeros(n_rows, dtype=torch.long, device=dev) for _ in range(3))
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernels chosen, workspaces allocated
                    r._dense_forward(*inputs, None)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = r._dense_forward(*inputs, None)
            self.graphs[n_rows] = (graph, inputs, out)
            return self.graphs[n_rows]
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            self.failed = True
            log.warning("CUDA graph capture of the T3 decode step failed (%s: %s); running it eagerly",
                        type(e).__name__, e)
            return None

