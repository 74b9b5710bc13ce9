"""Achieved weight-read bandwidth of the matmul forms T3 decode can use on the CPU.

    .venv/bin/python profiling/bench_linear.py [--threads 2]

Decode multiplies 1 or 2 rows by each weight matrix, so its speed is the rate at which the
weights stream from memory. For T3's weight shapes this prints GB/s for: ``F.linear`` (what the
reference's Llama path uses), GPT-2's Conv1D ``x @ W[in, out]`` (the reference's Turbo/Nano
path), ``W @ x.T`` with a column-major ``x.T`` (the ``"wxt"`` decode kernel), 512-column blocks
(our :class:`BlockedLinear`, wide matrices under ``"wxt"``), oneDNN's linear on the plain weight
and on its packed copy (the ``"onednn"`` kernel); plus a plain read (``sum``). Enough distinct
matrices are used that they do not fit in cache. Also prints which kernel
:func:`~chatterbox_rt.models.t3.linear.decode_kernel` picks here.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 1024), (1024, 4096), (3072, 1024), (8194, 1024), (3072, 768), (768, 3072)]
BUDGET_BYTES = 256 * 1024 * 1024
BLOCK = 512


def _gbps(fn, nbytes: float, repeats: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return nbytes * repeats / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    big = torch.randn(BUDGET_BYTES // 4)
    print(f"# CPU fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"plain read (sum over {BUDGET_BYTES >> 20} MiB): {_gbps(lambda: big.sum(), BUDGET_BYTES):.1f} GB/s")
    from chatterbox_rt.models.t3.linear import _onednn_linear_available, decode_kernel

    onednn = _onednn_linear_available()
    print(f"decode kernel chosen here: {decode_kernel()}")
    print(f"{'out x in':>12} {'rows':>4} {'F.linear':>9} {'x@W[in,out]':>12} {'W@x.T':>7} {'blocked':>8} "
          f"{'oneDNN':>7} {'packed':>7}   (GB/s)")
    for n_out, n_in in SHAPES:
        count = max(1, BUDGET_BYTES // (n_out * n_in * 4))
        ws = [torch.randn(n_out, n_in) for _ in range(count)]
        wt = [w.t().contiguous() for w in ws]
        blocked = [w.view(n_out, n_in // BLOCK, BLOCK).permute(1, 0, 2).contiguous() for w in ws] \
            if n_in % BLOCK == 0 else None
        nbytes = count * n_out * n_in * 4
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 2) for w in ws] if onednn else None
        for rows in (1, 2, 16):
            x = torch.randn(rows, n_in)
            x2 = torch.cat([x, x]) if rows == 1 else x
            cols = [
                _gbps(lambda: [F.linear(x, w) for w in ws], nbytes),
                _gbps(lambda: [x @ w for w in wt], nbytes),
                _gbps(lambda: [w @ x2.t() for w in ws], nbytes),
            ]
            if blocked is not None:
                xb = x2.reshape(x2.shape[0], n_in // BLOCK, BLOCK).permute(1, 2, 0)
                cols.append(_gbps(lambda: [torch.bmm(w, xb).sum(0) for w in blocked], nbytes))
            else:
                cols.append(float("nan"))
            if packed is not None:
                pw = lambda w: torch.ops.mkldnn._linear_pointwise(x2, w, None, "none", [], "")  # noqa: E731
                cols.append(_gbps(lambda: [pw(w) for w in ws], nbytes))
                cols.append(_gbps(lambda: [pw(w) for w in packed], nbytes))
            cells = " ".join(f"{c:>{w}.1f}" for c, w in zip(cols, (9, 12, 7, 8, 7, 7)))
            print(f"{n_out:>5} x {n_in:<5} {rows:>4} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
