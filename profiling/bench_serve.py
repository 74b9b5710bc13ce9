"""What HTTP and encoding cost: first audio and aggregate x real time over the server, against the
in-process engine, same model, same requests, same run.

    .venv/bin/python profiling/bench_serve.py --variant nano [--concurrency 1,4,16] [--tokens 50]
        [--format pcm] [--steps N] [--t3-layers N] [--json out.json] [--url http://HOST:PORT]

Each level runs ``c`` streamed requests at once, first through ``Engine.submit(stream=True)``
(first audio = the first chunk), then as ``c`` concurrent HTTP clients against the server
(first audio = the first response byte; the body is the ``--format`` stream). The server is
started here, in this process, over the same engine on 127.0.0.1, unless ``--url`` names one
(then that server's model should be the one built here, or the comparison means nothing).
Dummy weights at full size (S3Gen) and EOS off: every request draws ``--tokens`` tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from chatterbox_rt.profiling.bench import p90

SR = 24000
TEXT = "The quick brown fox jumps over the lazy dog, number {i}."


def _engine_level(engine, c: int, kw: dict) -> dict:
    def one(i):
        t0 = time.perf_counter()
        req = engine.submit(TEXT.format(i=i), seed=i, stream=True, **kw)
        first, n = None, 0
        for chunk in req.chunks():
            if first is None:
                first = time.perf_counter() - t0
            n += chunk.numel()
        return first, time.perf_counter() - t0, n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        res = list(pool.map(one, range(c)))
    wall = time.perf_counter() - t0
    return _summary(res, wall)  # units: samples


def _http_level(url: str, c: int, fmt: str, extra: dict) -> dict:
    import httpx

    def one(i):
        body = dict(model="chatterbox", input=TEXT.format(i=i), voice="default", response_format=fmt, seed=i,
                    **extra)
        t0 = time.perf_counter()
        first, n = None, 0
        with httpx.Client(timeout=3600) as client, client.stream("POST", url + "/v1/audio/speech", json=body) as r:
            r.raise_for_status()
            for piece in r.iter_bytes():
                if first is None and piece:
                    first = time.perf_counter() - t0
                n += len(piece)
        return first, time.perf_counter() - t0, n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        res = list(pool.map(one, range(c)))
    wall = time.perf_counter() - t0
    return _summary(res, wall)  # units: bytes of the response bodies


def _summary(res, wall: float) -> dict:
    firsts = [r[0] for r in res]
    totals = [r[1] for r in res]
    return {"first_audio_ms_p50": 1e3 * statistics.median(firsts), "first_audio_ms_p90": 1e3 * p90(firsts),
            "latency_ms_p50": 1e3 * statistics.median(totals), "wall_s": wall, "units": sum(r[2] for r in res)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="nano")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--steps", type=int, default=None, help="CFM steps (default: the decoder's)")
    p.add_argument("--format", default="pcm", choices=("pcm", "wav", "mp3", "opus", "aac", "flac"))
    p.add_argument("--t3-layers", type=int, default=0, help="a smaller T3 (testing aid, not for reporting)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--url", default=None, help="an already running server instead of one started here")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from chatterbox_rt import TTS
    from chatterbox_rt.models.t3.config import smaller_backbone

    over = smaller_backbone(args.variant, num_layers=args.t3_layers) if args.t3_layers else {}
    tts = TTS.from_dummy(args.variant, seed=0, device=args.device, **over)
    levels = [int(x) for x in args.concurrency.split(",")]
    engine = tts.engine(max_batch=max(levels))
    kw = dict(max_new_tokens=args.tokens, stop_on_eos=False, watermark=False)
    if args.steps:
        kw["n_steps"] = args.steps
    server = None
    url = args.url
    if url is None:
        from chatterbox_rt.serve import make_server

        port = _free_port()
        server = make_server(engine, port=port, log_level="warning", close_engine=False,
                             max_queue=max(levels), generate_defaults=dict(kw, stop_on_eos=False))
        threading.Thread(target=server.run, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        import httpx

        while True:
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    extra = {} if args.url is None else {"max_new_tokens": args.tokens}
    _engine_level(engine, 1, kw)  # warm-up
    rows = []
    for c in levels:
        e = _engine_level(engine, c, kw)
        h = _http_level(url, c, args.format, extra)
        # the same requests (texts, seeds, token counts) give the same audio on both sides
        audio_s = e["units"] / SR
        e["x_real_time"], h["x_real_time"] = audio_s / e["wall_s"], audio_s / h["wall_s"]
        if args.format == "pcm" and h["units"] != 2 * e["units"]:
            print(f"note: {h['units'] // 2} samples over HTTP against {e['units']} in process at c={c}")
        rows.append({"concurrency": c, "audio_s": audio_s, "engine": e, "http": h,
                     "first_audio_overhead": h["first_audio_ms_p50"] / e["first_audio_ms_p50"] - 1.0,
                     "throughput_ratio": h["x_real_time"] / e["x_real_time"]})
    print(f"# {args.variant}, {args.tokens} tokens per request, {args.format} over HTTP, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'c':>3} {'engine 1st p50':>14} {'p90':>7} {'http 1st p50':>12} {'p90':>7} {'1st +%':>7} "
          f"{'engine xRT':>10} {'http xRT':>9} {'ratio':>6}")
    for r in rows:
        e, h = r["engine"], r["http"]
        print(f"{r['concurrency']:>3} {e['first_audio_ms_p50']:>14.0f} {e['first_audio_ms_p90']:>7.0f} "
              f"{h['first_audio_ms_p50']:>12.0f} {h['first_audio_ms_p90']:>7.0f} "
              f"{100 * r['first_audio_overhead']:>6.1f}% {e['x_real_time']:>10.3f} {h['x_real_time']:>9.3f} "
              f"{r['throughput_ratio']:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variant": args.variant, "tokens": args.tokens, "format": args.format, "rows": rows}, f,
                      indent=1)
    if server is not None:
        server.should_exit = True
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
