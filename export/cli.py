"""``chatterbox-rt export`` and ``chatterbox-rt engines build|list|clean``."""
from __future__ import annotations

import argparse
import json
import sys
import time

EXPORT_DESCRIPTION = """\
Export a model's components as ONNX graphs into --out DIR, run each graph against torch at several
dynamic sizes right away, and write manifest.json (names, dtypes, min/opt/max shapes, weights hash,
versions, the error measured). The native layout runs with --bundle DIR / TTS.from_exported on
onnxruntime and is what `chatterbox-rt engines build` turns into TensorRT engines; --layout
onnx-community writes the four-graph bundle that existing ONNX clients (chatterbox-onnx,
transformers.js) read. export/README.md documents both layouts."""

ENGINES_DESCRIPTION = """\
TensorRT engines from an exported bundle, cached under --cache (default $CHATTERBOX_RT_ENGINES or
~/.cache/chatterbox-rt/engines) and keyed by the weights hash, graph, precision, shape profile, GPU
model and compute capability, TensorRT and CUDA versions: a stale or foreign engine is rebuilt,
never used."""


def add_parsers(sub, model_options) -> None:
    e = sub.add_parser("export", help="ONNX graphs of a model, checked against torch, with a manifest",
                       description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_options(e, t3=True)
    e.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    e.add_argument("--components", default=None, metavar="LIST",
                   help="comma-separated: t3, s3gen (flow encoder, CFM, HiFT), frontends (voice encoder, CAMPPlus, "
                        "S3 tokenizer, prompt mel); default all")
    e.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4"),
                   help="graph precision; int8/int4: T3's weight matrices as weight-only MatMulNBits (default fp32)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset, 14-20 (default 17)")
    e.add_argument("--layout", default="native", choices=("native", "onnx-community"),
                   help="native (this runtime's graphs) or onnx-community (existing ONNX clients' four graphs)")
    e.add_argument("--n-steps", type=int, default=None, help="CFM steps of the whole-loop graph (default: the "
                                                             "decoder's, 10; 2 for Turbo/Nano)")
    e.add_argument("--default-voice", metavar="CLIP", default=None,
                   help="onnx-community layout: a clip written as default_voice.wav (its clients' voice when given "
                        "none; a checkpoint's conds.pt holds no audio)")
    e.add_argument("--force", action="store_true", help="write into a directory holding another bundle")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("engines", help="TensorRT engines from an exported bundle: build, list, clean",
                       description=ENGINES_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    gs = g.add_subparsers(dest="engines_command", required=True)
    b = gs.add_parser("build", help="build (or find) the engines of a bundle for this GPU")
    b.add_argument("bundle", metavar="BUNDLE", help="an exported bundle directory (native layout)")
    b.add_argument("--graphs", default=None, help="comma-separated graph names (default: all)")
    b.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                   help="engine precision (default: the graphs'; TensorRT 11 builds only the graphs' own)")
    b.add_argument("--rebuild", action="store_true", help="build even when a valid engine is cached")
    b.add_argument("--cache", default=None, metavar="DIR")
    b.set_defaults(func=cmd_engines_build)
    ls = gs.add_parser("list", help="cached engines and their keys")
    ls.add_argument("--cache", default=None, metavar="DIR")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_engines_list)
    c = gs.add_parser("clean", help="remove cached engines")
    c.add_argument("--cache", default=None, metavar="DIR")
    c.add_argument("--graph", default=None, help="only engines of this graph")
    c.add_argument("--other-gpus", action="store_true",
                   help="only engines built for another GPU or TensorRT version than this machine's")
    c.set_defaults(func=cmd_engines_clean)


def cmd_export(args) -> int:
    from ..cli import _load_tts, _model_source, _note
    from ._onnx import DEFAULT_OPSET
    from .exporter import export, parse_components

    comps = parse_components(args.components)  # before anything loads
    if args.default_voice is not None:
        if args.layout != "onnx-community":
            raise ValueError("--default-voice applies to --layout onnx-community")
        if not __import__("pathlib").Path(args.default_voice).is_file():
            raise ValueError(f"--default-voice {args.default_voice}: no such file")
    opset = args.opset if args.opset is not None else DEFAULT_OPSET
    if args.n_steps is not None and args.n_steps < 1:
        raise ValueError(f"--n-steps must be >= 1, got {args.n_steps}")
    args.backend = "torch"
    _model_source(args)
    if args.device not in ("auto", "cpu"):
        _note("export traces on the CPU; --device is ignored")
    args.device = "cpu"
    tts = _load_tts(args)
    t0 = time.perf_counter()
    m = export(tts, args.out, components=comps, precision=args.precision, opset=opset, layout=args.layout,
               force=args.force, n_steps=args.n_steps, default_voice=args.default_voice)
    print(f"exported {m.variant} ({m.layout}, {m.precision}, opset {m.opset}) to {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    for name, g in m.graphs.items():
        chk = g.get("check") or {}
        err = chk.get("max_rel_error")
        err_s = f"max rel. error {err:.2e} over {chk.get('cases')} size sets" if err is not None else \
            chk.get("skipped", "not checked")
        print(f"  {g['file']:<28} {g.get('bytes', 0) / 1e6:9.1f} MB  {err_s}")
    return 0


def _device_or_none():
    from .tensorrt import DeviceInfo, EngineError, TensorRTUnavailable

    try:
        return DeviceInfo.current()
    except (EngineError, TensorRTUnavailable):
        return None


def cmd_engines_build(args) -> int:
    from .tensorrt import build_bundle_engines

    graphs = [g for g in (args.graphs or "").split(",") if g] or None
    out = build_bundle_engines(args.bundle, graphs=graphs, precision=args.precision, cache=args.cache,
                               rebuild=args.rebuild)
    for name, path in out.items():
        print(f"{name}: {path}")
    return 0


def cmd_engines_list(args) -> int:
    from .tensorrt import EngineCache

    entries = EngineCache(args.cache).entries()
    if args.json:
        json.dump(entries, sys.stdout, indent=2)
        print()
        return 0
    if not entries:
        print(f"no engines in {EngineCache(args.cache).root}")
    for e in entries:
        k = e.get("key", {})
        state = "incomplete" if e.get("incomplete") else ("broken" if e.get("broken") else f"{e.get('bytes', 0) / 1e6:.1f} MB")
        print(f"{k.get('graph', '?'):<16} {k.get('precision', '?'):<5} {k.get('gpu_name', '?')} "
              f"sm{k.get('compute_capability', '?')} TensorRT {k.get('tensorrt', '?')} CUDA {k.get('cuda', '?')}  "
              f"{state}  {e['dir']}")
    return 0


def cmd_engines_clean(args) -> int:
    from .tensorrt import EngineCache

    here = _device_or_none() if args.other_gpus else None
    if args.other_gpus and here is None:
        raise ValueError("--other-gpus needs TensorRT and a GPU here to compare against")

    def keep(rec) -> bool:
        k = rec.get("key", {})
        if args.graph and k.get("graph") != args.graph:
            return True
        if here is not None:
            return (k.get("gpu_name"), k.get("compute_capability"), k.get("tensorrt")) == \
                (here.gpu_name, here.compute_capability, here.tensorrt)
        return False

    removed = EngineCache(args.cache).clean(keep=keep)
    print(f"removed {len(removed)} engine(s)")
    return 0
