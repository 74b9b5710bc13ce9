"""Weight-only INT8 linear (kernels/int8_linear_op.int8_linear) against the fp32 oneDNN decode product, at
T3 decode shapes, 2 threads. Both weight sets are larger than the LLC (fp32 >= 96 MB, int8 >= 128 MB),
so every call streams its weights from memory; the two are timed interleaved, min over REPS passes
(the CI VM is shared: a busy neighbour only makes a pass slower).
Usage: python profiling/bench_int8_linear.py [rows ...]   (default 1 2 4 16; REPS=... to change 10)"""
import os
import sys
import time

import torch

from chatterbox_rt.kernels.int8_linear_op import int8_linear, quantize_int8
from chatterbox_rt.models.t3.linear import _onednn_linear, decode_kernel

torch.set_num_threads(2)
ROWS = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 16]
REPS = int(os.environ.get("REPS", "10"))
print("fp32 decode kernel:", decode_kernel(), "| threads:", torch.get_num_threads())
for N, K in ((4096, 1024), (1024, 4096), (3072, 1024), (1024, 3072)):
    ws = [torch.randn(N, K) for _ in range(max(2, (96 << 20) // (N * K * 4)))]
    pk = [torch.ops.mkldnn._reorder_linear_weight(w, 2) for w in ws]
    qs = [quantize_int8(torch.randn(N, K)) for _ in range(max(2, (128 << 20) // (N * K)))]
    del ws
    for rows in ROWS:
        x = torch.randn(rows, K)
        fns = {"fp32": (lambda w: _onednn_linear(x, w, None), pk), "int8": (lambda q: int8_linear(x, q[0], q[1]), qs)}
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(REPS):
            for name, (fn, mats) in fns.items():
                fn(mats[-1])
                t0 = time.perf_counter()
                for m in mats:
                    fn(m)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(mats) * 1e3)
        a, b = best["fp32"], best["int8"]
        print(f"{N}x{K} rows={rows}: oneDNN fp32 {a:.3f} ms ({N*K*4/a/1e6:.1f} GB/s); "
              f"ours int8 {b:.3f} ms ({N*K/b/1e6:.1f} GB/s of int8), {a/b:.2f}x", flush=True)
    del pk, qs
