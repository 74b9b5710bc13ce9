"""Weight-only INT8 linear (kernels/int8_linear_op.int8_linear) against the fp32 oneDNN decode product, at
T3 decode shapes, 2 threads. Usage: python profiling/bench_int8_linear.py"""
import torch, time
from chatterbox_rt.kernels.int8_linear_op import quantize_int8, int8_linear
from chatterbox_rt.models.t3.linear import decode_kernel, _onednn_linear
torch.set_num_threads(2)
print("fp32 decode kernel:", decode_kernel())
for N,K in ((4096,1024),(1024,4096)):
    n = max(2, (96<<20)//(N*K*4))
    ws=[torch.randn(N,K) for _ in range(n)]
    qs=[quantize_int8(w) for w in ws]
    pk=[torch.ops.mkldnn._reorder_linear_weight(w,2) for w in ws]
    for rows in (2,16):
        x=torch.randn(rows,K)
        def t(fn, mats):
            fn(mats[0]); best=9
            for _ in range(5):
                t0=time.perf_counter()
                for m in mats: fn(m)
                best=min(best,time.perf_counter()-t0)
            return best/len(mats)*1e3
        a=t(lambda w:_onednn_linear(x,w,None),pk)
        b=t(lambda q:int8_linear(x,q[0],q[1]),qs)
        print(f"{N}x{K} rows={rows}: oneDNN fp32 {a:.3f} ms ({N*K*4/a/1e6:.1f} GB/s); ours int8 {b:.3f} ms ({N*K/b/1e6:.1f} GB/s of int8), {a/b:.2f}x")
