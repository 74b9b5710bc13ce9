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
transformers.js) read. export/README.md documents both layouts.

--triton-repo DIR writes a Triton Inference Server model repository (Python backend, decoupled
streaming; `tritonserver --model-repository DIR`). Alone it exports nothing and serves --ckpt (or
--dummy-weights) on torch, streaming chunks as they are made, on the GPU (--device cpu: a CPU
instance); with --out it serves the bundle just exported, on onnxruntime (one chunk per request)."""

ENGINES_DESCRIPTION = """\
TensorRT engines from an exported bundle, cached under --cache (default $CHATTERBOX_RT_ENGINES or
~/.cache/chatterbox-rt/engines) and keyed by the weights hash, graph, precision, shape profile, GPU
model and compute capability, TensorRT and CUDA versions: a stale or foreign engine is rebuilt,
never used."""


def add_parsers(sub, model_options) -> None:
    e = sub.add_parser("export", help="ONNX graphs of a model, checked against torch, with a manifest",
                       description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_options(e, t3=True, precision=False)
    e.add_argument("--out", default=None, metavar="DIR", help="bundle directory to write (required unless "
                                                              "--triton-repo is given)")
    e.add_argument("--components", default=None, metavar="LIST",
                   help="comma-separated: t3, s3gen (flow encoder, CFM, HiFT), frontends (voice encoder, CAMPPlus, "
                        "S3 tokenizer, prompt mel); default all")
    e.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4"),
                   help="graph precision; int8/int4: T3's weight matrices as weight-only MatMulNBits, and the CFM "
                        "estimator dynamic INT8 where it holds quality (--cfm-int8; default fp32)")
    e.add_argument("--cfm-int8", default="auto", choices=("auto", "on", "off"),
                   help="with --precision int8/int4: auto keeps the dynamic-INT8 CFM estimator where its mel stays "
                        "within the bound and it is faster here; on: wherever within the bound; off: never (the "
                        "measurement goes into manifest.json either way)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset, 14-20 (default 17)")
    e.add_argument("--layout", default="native", choices=("native", "onnx-community"),
                   help="native (this runtime's graphs) or onnx-community (existing ONNX clients' four graphs)")
    e.add_argument("--n-steps", type=int, default=None, help="CFM steps of the whole-loop graph (default: the "
                                                             "decoder's, 10; 2 for Turbo/Nano)")
    e.add_argument("--default-voice", metavar="CLIP", default=None,
                   help="onnx-community layout: a clip written as default_voice.wav (its clients' voice when given "
                        "none; a checkpoint's conds.pt holds no audio)")
    e.add_argument("--triton-repo", default=None, metavar="DIR",
                   help="also (or, without --out, only) write a Triton Inference Server model repository serving "
                        "the model (export/README.md)")
    e.add_argument("--force", action="store_true", help="write into a directory holding another bundle (--triton-repo: "
                                                        "add the model to a directory that is not ours)")
    e.set_defaults(func=cmd_export, export_parser=e)

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

    triton_repo = getattr(args, "triton_repo", None)
    if args.out is None:
        if triton_repo is None:
            args.export_parser.error("the following arguments are required: --out (or --triton-repo)")
        return _triton_repo_only(args)
    comps = parse_components(args.components)  # before anything loads
    if args.default_voice is not None:
        if args.layout != "onnx-community":
            raise ValueError("--default-voice applies to --layout onnx-community")
        if not __import__("pathlib").Path(args.default_voice).is_file():
            raise ValueError(f"--default-voice {args.default_voice}: no such file")
    opset = args.opset if args.opset is not None else DEFAULT_OPSET
    if args.cfm_int8 != "auto" and (args.precision not in ("int8", "int4") or args.layout != "native"):
        raise ValueError(f"--cfm-int8 {args.cfm_int8} applies to --precision int8 or int4 on the native layout "
                         f"(here: --precision {args.precision}, --layout {args.layout})")
    if args.n_steps is not None and args.n_steps < 1:
        raise ValueError(f"--n-steps must be >= 1, got {args.n_steps}")
    args.backend = "torch"
    serve_device = args.device
    if triton_repo is not None:
        from .triton_repo import check_repo_dir

        args.device = "cpu"  # the repository's --device is the server's, not checked against this machine
        _check_triton_target(args, serve_device)
        check_repo_dir(triton_repo, force=args.force)  # before the export, not after it
    _model_source(args)
    if args.device not in ("auto", "cpu"):
        _note("export traces on the CPU; --device is ignored")
    args.device = "cpu"
    tts = _load_tts(args)
    t0 = time.perf_counter()
    m = export(tts, args.out, components=comps, precision=args.precision, opset=opset, layout=args.layout,
               force=args.force, n_steps=args.n_steps, default_voice=args.default_voice, cfm_int8=args.cfm_int8)
    print(f"exported {m.variant} ({m.layout}, {m.precision}, opset {m.opset}) to {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    for name, g in m.graphs.items():
        chk = g.get("check") or {}
        err = chk.get("max_rel_error")
        err_s = f"max rel. error {err:.2e} over {chk.get('cases')} size sets" if err is not None else \
            chk.get("skipped", "not checked")
        print(f"  {g['file']:<28} {g.get('bytes', 0) / 1e6:9.1f} MB  {err_s}")
    if triton_repo is not None:
        from pathlib import Path

        _write_triton_repo(args, {"bundle": str(Path(args.out).resolve())}, serve_device)
    return 0


_ONNX_ONLY = (("components", None, "--components"), ("precision", "fp32", "--precision"), ("opset", None, "--opset"),
              ("layout", "native", "--layout"), ("n_steps", None, "--n-steps"), ("default_voice", None, "--default-voice"),
              ("cfm_int8", "auto", "--cfm-int8"))


def _check_triton_target(args, serve_device: str) -> None:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(serve_device)):
        raise ValueError(f"--device {serve_device!r}: with --triton-repo give the server's device: auto (the "
                         "default: a GPU instance on each GPU), cpu (a CPU instance), cuda or cuda:N")


def _triton_repo_only(args) -> int:
    """``export --triton-repo DIR`` without --out: a repository that loads --ckpt (or dummy weights)
    itself; nothing is exported or loaded here."""
    from pathlib import Path

    from ..cli import DUMMY_MAX_NEW_TOKENS, DUMMY_VARIANT, _model_source, _note

    for attr, default, option in _ONNX_ONLY:
        if getattr(args, attr) != default:
            raise ValueError(f"{option} applies to the ONNX export: give --out DIR too (the repository then serves "
                             f"that bundle)")
    serve_device = args.device
    _check_triton_target(args, serve_device)
    args.device = "cpu"  # the server's device: not checked against this machine
    _model_source(args)
    if args.ckpt:
        model = {"ckpt": str(Path(args.ckpt).resolve()), "variant": args.variant, "t3_file": args.t3_file,
                 "lora": str(Path(args.lora).resolve()) if args.lora else None, "behaviour": args.behaviour}
    else:
        model = {"dummy": True, "variant": args.variant or DUMMY_VARIANT, "seed": args.seed,
                 "t3_layers": args.t3_layers or None, "behaviour": args.behaviour,
                 "generate_defaults": {"max_new_tokens": DUMMY_MAX_NEW_TOKENS}}
        _note(f"--dummy-weights: random weights rarely emit end-of-speech, so each request stops after "
              f"{DUMMY_MAX_NEW_TOKENS} speech tokens unless it sets max_new_tokens")
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(args.dtype).lower(), str(args.dtype).lower())
    if dtype != "fp32":
        model["dtype"] = dtype
    _write_triton_repo(args, model, serve_device)
    return 0


def _write_triton_repo(args, model: dict, serve_device: str) -> None:
    from .triton_repo import write_triton_repo

    model = {k: v for k, v in model.items() if v is not None}
    model["device"] = serve_device
    if args.threads:
        model["threads"] = args.threads
    kind = "KIND_CPU" if serve_device == "cpu" else "KIND_GPU"
    path = write_triton_repo(args.triton_repo, model=model, instance_kind=kind, force=args.force)
    what = f"bundle {model['bundle']}" if "bundle" in model else \
        (f"checkpoint {model['ckpt']}" if "ckpt" in model else f"dummy {model['variant']} weights")
    print(f"wrote the Triton model {path.name!r} ({what}, {kind}) to {path.parent}; run: tritonserver "
          f"--model-repository {path.parent}")


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
