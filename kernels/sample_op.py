"""T3's per-step token sampling for R requests in one kernel launch: logits -> processed
probabilities -> one token per request, with no host sync (CUDA-graph safe). The Triton launcher is
``sample_triton``, the plain-torch forms ``sample_ref`` / ``processed_probs_ref``; the dispatched op
(Triton where it can run, else ``sample_ref``) is ``chatterbox_rt.kernels.sample``.

The chain is ``runtime/models/t3/sampling.py``'s (the reference's transformers 5.2.0 logits
processors, op for op), after an optional CFG combine ``cond + w * (cond - uncond)``:

* ``order="llama"`` (``process_llama``): repetition penalty -> temperature -> min-p -> top-p
  [-> top-k when > 0].
* ``order="gpt"`` (``process_gpt``): temperature -> top-k -> top-p -> repetition penalty
  (``min_p`` is not part of this chain and is ignored, as there).

Each stage is compiled out where it is an exact no-op (penalty 1, temperature 1, min-p 0,
top-p 1, top-k 0), which is what the reference does or is bit-identical to it.

* repetition penalty: ``seen ? (x < 0 ? x * pen : x / pen) : x``.
* min-p: ``p = softmax(x)``; drop ``p < min_p * max(p)``.
* top-k: keep ``x >= kth largest`` (ties kept, as HF). The k-th largest value is found by
  bisection over the ordered integer image of the fp32 logits (``bits ^ 0x7fffffff`` for negative
  floats makes integer order equal float order): 33 steps of ``count(key >= mid) >= k`` pin it
  exactly, since the key range spans at most 2**32 values.
* top-p: HF sorts ascending, takes the running sum of the softmax and removes every token whose
  running sum (itself included) is ``<= 1 - top_p``, always keeping the last (largest). With
  ``f(t) = sum(p[key <= t])``, a token with no equal-valued neighbour is removed exactly when
  ``f(key) <= 1 - top_p``, and ``f`` is non-decreasing, so the removed set is ``key <= T`` with
  ``T`` the largest key below the row's maximum with ``f(T) <= 1 - top_p``: the same 33-step
  bisection finds it, with no sort. The only difference from the sorted form is at ties: HF
  removes some of a group of equal logits straddling the cut (in whatever order its unstable
  sort left them) and keeps the rest; here the whole group is kept as soon as HF keeps any of it
  (in particular all tokens tied at the maximum survive). The sums are tree reductions, not a
  sequential cumsum: a token whose running sum is within fp32 rounding (~1e-7) of the cut can
  land on the other side, as it can between two torch builds.

The draw is the exponential race (gpt-fast's ``multinomial_sample_one_no_sync``): with
``E_i = -log(U_i) ~ Exp(1)`` independent, ``argmax_i p_i / E_i`` is distributed as ``p``. ``U`` comes
from Triton's Philox (``tl.rand``) keyed by ``seed`` with the 64-bit counter
``offset << 32 | (row * V + col)``: every (seed, offset) pair gives R*V fresh uniforms, and
``offset + 1`` gives the next, non-overlapping, set (offsets count modulo 2**32: the stream
repeats after four billion steps). ``seed`` and ``offset`` are Python ints or
int64 device tensors of 1 or R elements (per-request streams); the kernel loads tensors itself.

The T3 loop should pass ``seed`` as a Python int (fixed per request) and ``offset`` as a one-
element int64 device tensor that it advances with ``offset.add_(1)`` after each step: a CUDA
graph captured once then replays with fresh randomness, and no step reads anything on the host.

NOTE: a logit that is -inf in both CFG halves combines to NaN (``-inf - -inf``), in torch as here;
masks such as the multilingual alignment control's belong after the combine, so a T3 loop that
uses one combines in torch and passes ``[R, V]`` rows.

Rows whose processed logits are all ``-inf`` (cannot happen for valid parameters and finite
logits, but T3's Turbo chain can produce them from ``-inf`` inputs) get probabilities 0 (not NaN)
and token ``-1``; the T3 loop maps that to EOS, as it does for its own ``dead`` rows.

One program per row, the whole row in registers (``BLOCK_V = next_power_of_2(V)``): a load of
the logits (both CFG halves) and of ``seen``, one softmax per filtering stage, 33 reductions per
bisection, the final softmax and the race. One launch per step, grid ``(R,)``.
NOTE: at T3's sizes (R <= 8, V = 8194 -> BLOCK_V = 16384, 16 warps) that is a handful of CTAs,
each latency-bound on up to 66 sequential block reductions; splitting a row over CTAs or a radix
select (fewer, wider passes) are the next steps if it shows up in a profile.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._common import interpreting

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the T3 loop falls back to sampling.py
    triton = tl = None
    HAS_TRITON = False

ORDERS = ("llama", "gpt")
MAX_V = 65536  # the row lives in one block's registers
_BISECT_STEPS = 33  # the fp32 key range spans <= 2**32 + 1 values

IntOrTensor = Union[int, Tensor]


def _params(temperature, top_p, min_p, top_k, repetition_penalty, cfg_weight):
    from chatterbox_rt.models.t3.sampling import SamplingParams

    return SamplingParams(temperature=float(temperature), top_p=float(top_p), min_p=float(min_p), top_k=top_k,
                          repetition_penalty=float(repetition_penalty),
                          cfg_weight=0.0 if cfg_weight is None else float(cfg_weight)).validate()


def processed_probs_ref(logits: Tensor, seen: Tensor, order: str, *, temperature: float, top_p: float,
                        min_p: float, top_k: int, repetition_penalty: float, cfg_weight: Optional[float],
                        upcast: bool = True) -> Tensor:
    """The reference chain's probabilities ``[R, V]`` (sampling.py's processors, then softmax).

    ``logits`` ``[2R, V]`` are CFG-combined first (``cfg_weight`` required), ``[R, V]`` are used as
    they are. ``upcast`` runs the chain in fp32 (what the kernel does) instead of ``logits.dtype``."""
    from chatterbox_rt.models.t3.sampling import cfg_combine, process_gpt, process_llama

    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    p = _params(temperature, top_p, min_p, top_k, repetition_penalty, cfg_weight)
    x = logits.float() if upcast else logits
    if x.shape[0] == 2 * seen.shape[0]:
        x = cfg_combine(x, p.cfg_weight)
    x = process_llama(x, seen, p) if order == "llama" else process_gpt(x, seen, p)
    return torch.softmax(x, dim=-1)


def sample_ref(logits: Tensor, seen: Tensor, *, order: str, temperature: float, top_p: float, min_p: float,
               top_k: int, repetition_penalty: float, cfg_weight: Optional[float], seed: IntOrTensor,
               offset: IntOrTensor, out_probs: Optional[Tensor] = None, upcast: bool = True) -> Tensor:
    """Plain torch: the reference chain, then torch's exponential race from a generator seeded by
    (seed, offset). Same distribution as ``sample_triton``, not the same stream. Reads tensor seeds on the
    host (syncs). Dead rows (all filtered) give token -1, as the kernel."""
    from chatterbox_rt.models.t3.sampling import sample_no_sync

    probs = processed_probs_ref(logits, seen, order, temperature=temperature, top_p=top_p, min_p=min_p,
                                top_k=top_k, repetition_penalty=repetition_penalty, cfg_weight=cfg_weight,
                                upcast=upcast).float()
    s = int(seed.reshape(-1)[0]) if isinstance(seed, Tensor) else int(seed)
    o = int(offset.reshape(-1)[0]) if isinstance(offset, Tensor) else int(offset)
    gen = torch.Generator(device=probs.device).manual_seed((s * 0x9E3779B1 + o) % (2 ** 63))
    dead = ~(probs > 0).any(dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    tok = sample_no_sync(probs, gen)
    if out_probs is not None:
        out_probs.copy_(probs)
    return torch.where(dead, torch.full_like(tok, -1), tok)


if HAS_TRITON:

    @triton.jit
    def _softmax(x):
        """Softmax of a row that may be all -inf: then zeros, not NaN."""
        m = tl.max(x, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m)
        s = tl.sum(e, 0)
        return e / tl.where(s > 0.0, s, 1.0)

    @triton.jit
    def _ordered_key(x):
        """int32 image of fp32 x (not NaN) with the same order: -inf lowest, -0.0 just below +0.0.

        NOTE: keys stay int32 (registers: the row is in one block); the bisection bounds are int64
        scalars because their difference spans up to 2**32, but every probe ``mid`` lies in
        [min key - 1, max key], which int32 holds for any non-NaN row."""
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _kth_largest_key(key, valid, k, STEPS: tl.constexpr):
        """Largest t with count(key >= t) >= k, i.e. the k-th largest key (1 <= k <= #valid)."""
        lo = tl.min(tl.where(valid, key, 2 ** 31 - 1), 0).to(tl.int64)  # count(key >= lo) = #valid >= k
        hi = tl.max(tl.where(valid, key, -(2 ** 31)), 0).to(tl.int64) + 1  # count(key >= hi) = 0 < k
        for _ in range(STEPS):
            mid = lo + (hi - lo) // 2
            ok = tl.sum(tl.where(valid & (key >= mid.to(tl.int32)), 1, 0), 0) >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        return lo.to(tl.int32)

    @triton.jit
    def _top_p_cut_key(key, p, valid, remove_mass, STEPS: tl.constexpr):
        """Largest t below max(key) with sum(p[key <= t]) <= remove_mass: remove key <= t."""
        lo = tl.min(tl.where(valid, key, 2 ** 31 - 1), 0).to(tl.int64) - 1  # removes nothing
        hi = tl.max(tl.where(valid, key, -(2 ** 31)), 0).to(tl.int64)  # never removed (HF keeps the last)
        for _ in range(STEPS):
            mid = lo + (hi - lo) // 2
            ok = tl.sum(tl.where(key <= mid.to(tl.int32), p, 0.0), 0) <= remove_mass
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        return lo.to(tl.int32)

    @triton.jit(do_not_specialize=["seed_val", "offset_val"])
    def _sample_kernel(
        # pointers
        logits_ptr,  # [R or 2R, V] (cond rows first when CFG), any float dtype, unit column stride
        seen_ptr,  # [R, V] uint8 view of the bool history
        tok_ptr,  # [R, num_samples] int64 out
        probs_ptr,  # [R, V] fp32 out, written when WRITE_PROBS
        seed_ptr,  # int64 [1] or [R], read when SEED_IS_PTR
        offset_ptr,  # int64 [1] or [R], read when OFFSET_IS_PTR
        # strides and sizes
        stride_logits, stride_seen, stride_probs, seed_stride, offset_stride,
        R, V, num_samples,
        # scalars
        seed_val, offset_val,  # used when not *_IS_PTR
        cfg_weight, temperature, remove_mass,  # remove_mass = 1 - top_p
        min_p, top_k, penalty,
        # meta-parameters
        LLAMA: tl.constexpr,
        CFG: tl.constexpr,
        PENALTY: tl.constexpr,
        TEMPERATURE: tl.constexpr,
        MIN_P: tl.constexpr,
        TOP_P: tl.constexpr,
        TOP_K: tl.constexpr,
        WRITE_PROBS: tl.constexpr,
        SEED_IS_PTR: tl.constexpr,
        OFFSET_IS_PTR: tl.constexpr,
        STEPS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        SAMPLE_BLOCK: tl.constexpr,  # draws per iteration: 1 on a GPU, many under the interpreter
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        valid = cols < V
        NEG_INF: tl.constexpr = float("-inf")

        x = tl.load(logits_ptr + row * stride_logits + cols, mask=valid, other=0.0).to(tl.float32)
        if CFG:
            u = tl.load(logits_ptr + (row + R) * stride_logits + cols, mask=valid, other=0.0).to(tl.float32)
            x = x + cfg_weight * (x - u)
        x = tl.where(valid, x, NEG_INF)
        if PENALTY:
            seen = tl.load(seen_ptr + row * stride_seen + cols, mask=valid, other=0) != 0

        if LLAMA:
            if PENALTY:
                x = tl.where(seen, tl.where(x < 0.0, x * penalty, x / penalty), x)
            if TEMPERATURE:
                x = x / temperature
            if MIN_P:
                p = _softmax(x)
                x = tl.where(p < min_p * tl.max(p, 0), NEG_INF, x)
            if TOP_P:
                key = _ordered_key(x)
                cut = _top_p_cut_key(key, _softmax(x), valid, remove_mass, STEPS)
                x = tl.where(key <= cut, NEG_INF, x)
            if TOP_K:
                key = _ordered_key(x)
                x = tl.where(key < _kth_largest_key(key, valid, top_k, STEPS), NEG_INF, x)
        else:
            if TEMPERATURE:
                x = x / temperature
            if TOP_K:
                key = _ordered_key(x)
                x = tl.where(key < _kth_largest_key(key, valid, top_k, STEPS), NEG_INF, x)
            if TOP_P:
                key = _ordered_key(x)
                cut = _top_p_cut_key(key, _softmax(x), valid, remove_mass, STEPS)
                x = tl.where(key <= cut, NEG_INF, x)
            if PENALTY:  # after the filters: -inf stays -inf
                x = tl.where(seen, tl.where(x < 0.0, x * penalty, x / penalty), x)

        p = _softmax(x)
        if WRITE_PROBS:
            tl.store(probs_ptr + row * stride_probs + cols, p, mask=valid)

        if SEED_IS_PTR:
            seed = tl.load(seed_ptr + row * seed_stride)
        else:
            seed = seed_val
        if OFFSET_IS_PTR:
            offset = tl.load(offset_ptr + row * offset_stride).to(tl.int64)
        else:
            offset = offset_val.to(tl.int64)
        alive = tl.max(p, 0) > 0.0
        lane = row * V + cols.to(tl.int64)
        for d0 in range(0, num_samples, SAMPLE_BLOCK):
            # draw d uses offset + d: the same token a call with that offset would give
            d = d0 + tl.arange(0, SAMPLE_BLOCK)
            counter = ((offset + d.to(tl.int64)) << 32)[:, None] + lane[None, :]  # [SAMPLE_BLOCK, BLOCK_V]
            uniform = tl.rand(seed, counter)
            # U = 0 gives E = inf and a score of 0 (never NaN: p is finite); U < 1 always, so E > 0.
            score = p[None, :] / -tl.log(uniform)
            tok = tl.argmax(score, 1).to(tl.int64)
            tok = tl.where(alive, tok, -1)
            tl.store(tok_ptr + row * num_samples + d, tok, mask=d < num_samples)


_interpreting = interpreting


def _rng_arg(name: str, value: IntOrTensor, R: int, device: torch.device):
    """-> (tensor or None, python int, stride) for seed/offset."""
    if isinstance(value, Tensor):
        if value.dtype != torch.int64 or value.device != device or value.numel() not in (1, R):
            raise ValueError(f"{name} as a tensor must be int64 on {device} with 1 or R={R} elements, got "
                             f"{value.dtype} on {value.device} with {value.numel()} elements")
        if value.numel() > 1 and not value.is_contiguous():
            raise ValueError(f"{name} with R elements must be contiguous")
        return value, 0, 0 if value.numel() == 1 else 1
    if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value < 2 ** 63):
        raise ValueError(f"{name} must be an int in [0, 2**63) or an int64 device tensor, got {value!r}")
    return None, value, 0


def check_inputs(logits: Tensor, seen: Tensor, order: str, cfg_weight: Optional[float]) -> tuple[int, int, bool]:
    """The argument rules every form of ``sample`` shares -> (R, V, whether the logits carry CFG rows)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if seen.dim() != 2 or seen.dtype != torch.bool:
        raise ValueError(f"seen must be a bool [R, V] tensor, got {seen.dtype} {tuple(seen.shape)}")
    R, V = seen.shape
    if logits.dim() != 2 or logits.shape[1] != V or logits.shape[0] not in (R, 2 * R):
        raise ValueError(f"logits must be [R, V] or [2R, V] (CFG: conditional rows first) for seen [R={R}, V={V}], "
                         f"got {tuple(logits.shape)}")
    use_cfg = logits.shape[0] == 2 * R and R > 0
    if use_cfg and cfg_weight is None:
        raise ValueError(f"logits have 2R={2 * R} rows (CFG) but cfg_weight is None")
    if not use_cfg and cfg_weight not in (None, 0, 0.0):
        raise ValueError(f"cfg_weight={cfg_weight} needs [2R, V] logits (conditional rows first), got [R, V]")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    return R, V, use_cfg


def sample_triton(logits: Tensor, seen: Tensor, *, order: str, temperature: float, top_p: float, min_p: float,
                  top_k: int, repetition_penalty: float, cfg_weight: Optional[float], seed: IntOrTensor,
                  offset: IntOrTensor, out_probs: Optional[Tensor] = None, out: Optional[Tensor] = None,
                  num_samples: int = 1) -> Tensor:
    """The Triton launcher of ``chatterbox_rt.kernels.sample``: one token per request -> int64 ``[R]``
    (``-1`` for a row with nothing left), no host sync.

    logits: ``[2R, V]`` (conditional rows, then unconditional; combined with ``cfg_weight``) or
    ``[R, V]`` (``cfg_weight`` None or 0). seen: bool ``[R, V]``. order: "llama" or "gpt" (see the
    module docstring). seed, offset: Python ints or int64 device tensors of 1 or R elements.
    out_probs: optional fp32 ``[R, V]`` that receives the processed probabilities. out: optional
    int64 ``[R]`` for the tokens (graph capture with a fixed output buffer).

    ``num_samples > 1`` returns ``[R, num_samples]`` independent draws from the same processed
    probabilities; draw ``d`` is exactly the token a call with ``offset + d`` returns (tests use it
    for thousands of draws in one program under the interpreter; also best-of-n)."""
    if not HAS_TRITON:
        raise RuntimeError("sample needs Triton, which failed to import: `pip install triton` "
                           "(or use the dispatched chatterbox_rt.kernels.sample / sample_ref)")
    R, V, use_cfg = check_inputs(logits, seen, order, cfg_weight)
    p = _params(temperature, top_p, min_p, top_k, repetition_penalty, cfg_weight)
    if V > MAX_V or V < 1:
        raise ValueError(f"V={V} is outside [1, {MAX_V}]: the kernel keeps a row in one block")
    if R * V >= 2 ** 32:
        raise ValueError(f"R*V={R * V} must be < 2**32 (the Philox counter's low word)")
    dev = logits.device
    for name, t in (("logits", logits), ("seen", seen)):
        if t.device.type != "cuda" and not (t.device.type == "cpu" and _interpreting()):
            raise ValueError(f"{name} is on {t.device}: the Triton kernel takes CUDA tensors, or CPU tensors "
                             "only under the interpreter (TRITON_INTERPRET=1 set before triton is imported)")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but logits are on {dev}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along V, got strides {tuple(t.stride())}")
    if out_probs is not None:
        if (tuple(out_probs.shape) != (R, V) or out_probs.dtype != torch.float32 or out_probs.device != dev
                or out_probs.stride(1) != 1):
            raise ValueError(f"out_probs must be fp32 [R={R}, V={V}] on {dev} with unit stride along V, got "
                             f"{out_probs.dtype} {tuple(out_probs.shape)} on {out_probs.device}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    tok_shape = (R,) if num_samples == 1 else (R, num_samples)
    if out is None:
        out = torch.empty(tok_shape, dtype=torch.int64, device=dev)
    elif tuple(out.shape) != tok_shape or out.dtype != torch.int64 or out.device != dev or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int64 {list(tok_shape)} tensor on {dev}")
    seed_t, seed_v, seed_stride = _rng_arg("seed", seed, R, dev)
    offset_t, offset_v, offset_stride = _rng_arg("offset", offset, R, dev)
    if R == 0:
        return out

    llama = order == "llama"
    block = max(triton.next_power_of_2(V), 16)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    # The interpreter pays per op, not per element: draw many at once there (<= 2**20 uniforms).
    sample_block = min(triton.next_power_of_2(num_samples), max(1, 2 ** 20 // block)) if _interpreting() else 1
    _sample_kernel[(R,)](
        logits, seen.view(torch.uint8), out, out_probs if out_probs is not None else logits,
        seed_t if seed_t is not None else out, offset_t if offset_t is not None else out,
        logits.stride(0), seen.stride(0), out_probs.stride(0) if out_probs is not None else 0,
        seed_stride, offset_stride,
        R, V, num_samples,
        seed_v, offset_v,
        p.cfg_weight, p.temperature, float(1.0 - p.top_p),
        p.min_p, min(max(p.top_k, 1), V), p.repetition_penalty,
        LLAMA=llama, CFG=use_cfg,
        PENALTY=p.repetition_penalty != 1.0,
        TEMPERATURE=p.temperature != 1.0,
        MIN_P=llama and p.min_p > 0.0,
        TOP_P=p.top_p < 1.0,
        TOP_K=p.top_k > 0,
        WRITE_PROBS=out_probs is not None,
        SEED_IS_PTR=seed_t is not None, OFFSET_IS_PTR=offset_t is not None,
        STEPS=_BISECT_STEPS, BLOCK_V=block, SAMPLE_BLOCK=sample_block, num_warps=num_warps,
    )
    return out


__all__ = ["HAS_TRITON", "ORDERS", "sample_triton", "sample_ref", "processed_probs_ref"]
