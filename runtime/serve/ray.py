"""chatterbox_rt.serve.ray: the speech server as a Ray Serve deployment, scaled out over replicas.

Each replica is a Ray actor that loads its own TTS, runs its own ``Engine`` and serves its own
``create_app`` app (the same routes, limits and errors as ``chatterbox-rt serve``) through Ray
Serve's ASGI ingress; Ray's HTTP proxy spreads requests over the replicas. Needs the ``ray``
extra (``pip install 'chatterbox-rt[ray]'``: Ray Serve >= 2.56, whose ``@serve.ingress()`` can
take the app from each replica after its constructor).

From the command line (a local Ray instance, or the cluster ``RAY_ADDRESS`` names)::

    chatterbox-rt serve --ray --ckpt ckpt/ --library /shared/voices --replicas 4 --gpus-per-replica 1
    chatterbox-rt serve --ray --ckpt ckpt/ --min-replicas 1 --max-replicas 8 --target-ongoing-requests 16

From Python::

    import ray
    from ray import serve
    from chatterbox_rt.serve.ray import build_deployment

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_deployment({"ckpt": "/models/chatterbox"}, replicas=2, gpus_per_replica=1,
                               app_kw={"library": "/shared/voices"}), name="chatterbox-rt", route_prefix="/")

Shared between replicas: only the voice library directory (``app_kw["library"]``), which is safe
for many processes (``chatterbox_rt.voices``): a voice uploaded through one replica is usable on
every other from its next request. On a cluster of several machines it must be a shared file
system mounted at the same path on each. Everything else is per replica: the model, the engine
and its KV cache, the request queue and its limits (``max_batch + max_queue`` in flight), the
warm-up and ``/ready``, the Prometheus registry.

Start-up and shutdown: a replica answers one warm-up request before Ray routes it any, so
``serve.run`` returns (and autoscaling adds replicas) warm; Ray's ingress runs the app's lifespan
(ready at start, then at shutdown not ready and the engine closed). Stopping a replica (scaling
down, ``serve.delete``) is Ray Serve's graceful shutdown: no new requests, the ones in flight run
to the end for at most ``drain_timeout`` seconds, then the lifespan's shutdown.

Devices: ``gpus_per_replica > 0`` reserves that many GPUs per replica (fractions share one) and
each replica then runs on ``cuda`` (the GPUs Ray gives it); otherwise on ``cpu``, with
``cpus_per_replica`` CPUs (Ray's default 1), which Ray also makes torch's thread count unless the
model spec sets ``threads``.

Limits: ``/metrics``, ``/ready`` and ``/health`` answer for whichever replica Ray routes the
request to (the ``x-chatterbox-replica`` response header names it): a scrape through the proxy
sees one replica's registry, so use Ray Serve's own metrics for the deployment as a whole, and
``serve.status()`` (``serve status``) for its replicas. Ray admits at most ``max_batch +
max_queue`` requests to a replica (``max_ongoing_requests``) and holds the rest in its proxy's
queue, unbounded, rather than answering 429.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

try:
    import ray as _ray
    from ray import serve
except ImportError as e:  # pragma: no cover - the ray extra
    raise ImportError(f"chatterbox_rt.serve.ray needs Ray Serve: pip install 'chatterbox-rt[ray]' ({e})") from None

MIN_RAY = (2, 56)  # the first Ray whose @serve.ingress() takes the app from __serve_build_asgi_app__
if tuple(int(p) for p in _ray.__version__.split(".")[:2]) < MIN_RAY:  # pragma: no cover - old Ray
    raise ImportError(f"chatterbox_rt.serve.ray needs Ray Serve >= 2.56; this is Ray {_ray.__version__}: "
                      "pip install -U 'ray[serve]>=2.56'")

DEFAULT_NAME = "chatterbox-rt"
REPLICA_HEADER = "x-chatterbox-replica"
# The one source of weights a model spec names, and the other keys it may hold.
MODEL_SOURCES = ("ckpt", "dummy", "bundle")
MODEL_OPTIONS = ("variant", "seed", "t3_layers", "t3_file", "lora", "behaviour", "device", "dtype", "threads",
                 "backend")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}  # a spec's dtype -> the torch dtype's name
DUMMY_VARIANT = "chatterbox"
# create_app keywords each replica sets itself: warm-up before admission, a registry per replica,
# the engine closed with the replica.
REPLICA_APP_KW = ("warmup", "metrics_registry", "close_engine")


# ---------------------------------------------------------------------------------------------- model spec


def check_model(model: Mapping[str, Any]) -> dict:
    """A model spec, checked, with its paths made absolute (replicas may start in another
    directory): exactly one of ``ckpt`` (a checkpoint directory), ``dummy`` (True: seeded random
    weights) or ``bundle`` (an exported bundle), plus any of ``variant``, ``seed``, ``t3_layers``
    (dummy only: a T3 cut to N layers), ``t3_file``, ``lora``, ``behaviour`` (ckpt only),
    ``device``, ``dtype`` ("fp32", "bf16", "fp16"; not for a bundle), ``threads``, ``backend``."""
    if not isinstance(model, Mapping):
        raise ValueError(f"the model spec must be a dict, got {type(model).__name__}")
    unknown = sorted(set(model) - set(MODEL_SOURCES) - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model spec key(s) {', '.join(map(repr, unknown))}; the keys are "
                         f"{', '.join(MODEL_SOURCES + MODEL_OPTIONS)}")
    spec = {k: v for k, v in model.items() if v is not None}
    if not spec.get("dummy"):
        spec.pop("dummy", None)
    sources = [k for k in MODEL_SOURCES if k in spec]
    if len(sources) != 1:
        raise ValueError("the model spec needs exactly one of 'ckpt' (a checkpoint directory), 'dummy': True "
                         f"(random weights) or 'bundle' (an exported bundle); got {sources or 'none'}")
    for key in ("ckpt", "bundle", "lora"):
        if key in spec:
            path = Path(spec[key]).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"model spec {key!r}: {path} is not a directory")
            spec[key] = str(path)
    if "t3_file" in spec and ("/" in str(spec["t3_file"]) or os.sep in str(spec["t3_file"])):
        spec["t3_file"] = str(Path(spec["t3_file"]).expanduser().resolve())
    if "t3_layers" in spec:
        if "dummy" not in spec:
            raise ValueError("model spec 't3_layers' (a testing aid) only applies with 'dummy': True")
        if not isinstance(spec["t3_layers"], int) or spec["t3_layers"] < 1:
            raise ValueError(f"model spec 't3_layers' must be an integer >= 1, got {spec['t3_layers']!r}")
    if "ckpt" not in spec:
        for key in ("t3_file", "lora"):
            if key in spec:
                raise ValueError(f"model spec {key!r} applies to a checkpoint ('ckpt')")
    backend = spec.setdefault("backend", "onnxruntime" if "bundle" in spec else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"model spec 'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if "bundle" in spec:
        if backend == "torch":
            raise ValueError("a 'bundle' runs on onnxruntime or tensorrt, not the torch backend")
        for key in ("variant", "seed", "behaviour"):
            if key in spec:
                raise ValueError(f"model spec {key!r} does not apply to a 'bundle' (it was fixed at export)")
        if str(spec.get("dtype", "fp32")).lower() not in ("fp32", "float32"):
            raise ValueError("a 'bundle' runs the precision it was exported in; drop 'dtype'")
    if str(spec.get("dtype", "fp32")).lower() not in DTYPES:
        raise ValueError(f"model spec 'dtype' must be fp32, bf16 or fp16, got {spec['dtype']!r}")
    threads = spec.get("threads", 0)
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"model spec 'threads' must be an integer >= 0 (0: Ray's choice), got {threads!r}")
    return spec


def load_tts(model: Mapping[str, Any]):
    """The TTS a model spec (``check_model``) names, loaded in this process."""
    import torch

    from ..tts import TTS

    spec = check_model(model)
    device, backend, threads = spec.get("device"), spec["backend"], spec.get("threads") or None
    if device == "auto":
        device = None  # the library's choice: cuda where there is one
    if threads:
        torch.set_num_threads(threads)
    if "bundle" in spec:
        return TTS.from_exported(spec["bundle"], device=device, threads=threads, backend=backend)
    dtype = getattr(torch, DTYPES[str(spec.get("dtype", "fp32")).lower()])
    if "ckpt" in spec:
        return TTS.from_local(spec["ckpt"], variant=spec.get("variant"), device=device, dtype=dtype,
                              t3_file=spec.get("t3_file"), lora=spec.get("lora"), behaviour=spec.get("behaviour"),
                              backend=backend, threads=threads)
    variant, behaviour = spec.get("variant", DUMMY_VARIANT), spec.get("behaviour")
    overrides = {} if behaviour is None else dict(behaviour=behaviour)
    if "t3_layers" in spec:
        from ..models.t3.config import smaller_backbone

        overrides = smaller_backbone(variant, behaviour=behaviour, num_layers=spec["t3_layers"])
    return TTS.from_dummy(variant, seed=spec.get("seed", 0), device=device, dtype=dtype, backend=backend,
                          threads=threads, **overrides)


# ---------------------------------------------------------------------------------------------- the replica


@serve.ingress()
class SpeechReplica:
    """One replica: its own TTS, Engine and app; Ray runs the app's lifespan around it."""

    async def __init__(self, model: dict, max_batch: int, app_kw: dict):
        # Loading takes seconds to minutes: in a thread, so the replica's event loop stays free.
        tts = await asyncio.to_thread(load_tts, model)
        self._engine = tts.engine(max_batch=max_batch)
        self._app_kw = app_kw
        self._replica = serve.get_replica_context().replica_tag

    async def __serve_build_asgi_app__(self):
        """The app, after one warm-up request: Ray routes to a replica only once this returns,
        so a replica that is up is warm (a failed warm-up fails the replica, and Ray retries)."""
        from .app import create_app

        app = create_app(self._engine, warmup=False, close_engine=True, **self._app_kw)
        state = app.state.chatterbox
        await asyncio.to_thread(state.warm_up)
        if state.warmup_error is not None:
            self._engine.close(wait=False)
            raise RuntimeError(f"replica {self._replica}: the warm-up request failed") from state.warmup_error
        app.add_middleware(_ReplicaHeader, replica=self._replica)
        return app


class _ReplicaHeader:
    """ASGI middleware: every response names the replica that made it (``x-chatterbox-replica``)."""

    def __init__(self, app, *, replica: str):
        self.app, self.value = app, replica.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, sending)


# ---------------------------------------------------------------------------------------------- deployment


def build_deployment(model: Mapping[str, Any], *, replicas: int = 1, gpus_per_replica: float = 0.0,
                     cpus_per_replica: Optional[float] = None, autoscaling: Optional[Mapping[str, Any]] = None,
                     max_batch: int = 16, app_kw: Optional[Mapping[str, Any]] = None, name: str = DEFAULT_NAME,
                     drain_timeout: Optional[float] = None):
    """The Ray Serve application (``serve.run`` it, with ``route_prefix="/"``): ``replicas``
    copies of the model spec ``model`` (``check_model``), each an Engine of ``max_batch``.

    ``gpus_per_replica``: GPUs each replica reserves (``ray_actor_options["num_gpus"]``); above 0
    the replicas run on ``cuda``, else on ``cpu`` (a spec's ``device`` must agree).
    ``cpus_per_replica``: CPUs each reserves (default: Ray's 1). ``autoscaling``: Ray Serve's
    ``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, which
    defaults to ``max_batch`` here, or any other key Ray takes), starting from ``replicas``.
    ``app_kw``: ``create_app`` keywords for every replica (``library``: the shared voice
    directory, ``api_key``, ``max_queue``, ``request_timeout``, ``generate_defaults``, ...).
    ``drain_timeout``: seconds a stopping replica waits for its requests (Ray's
    ``graceful_shutdown_timeout_s``; default: ``request_timeout``, which no request outlives)."""
    from .app import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S, create_app

    spec = check_model(model)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    gpus = float(gpus_per_replica)
    if not gpus >= 0:
        raise ValueError(f"gpus_per_replica must be >= 0, got {gpus_per_replica!r}")
    if cpus_per_replica is not None and not float(cpus_per_replica) >= 0:
        raise ValueError(f"cpus_per_replica must be >= 0, got {cpus_per_replica!r}")
    device = str(spec.get("device", "auto")).lower()
    if device == "auto":
        spec["device"] = "cuda" if gpus > 0 else "cpu"
    elif device.startswith("cuda") and gpus == 0:
        raise ValueError(f"device {device!r} needs gpus_per_replica > 0: Ray shows a replica only the GPUs it "
                         "reserves")
    elif device == "cpu" and gpus > 0:
        raise ValueError("gpus_per_replica > 0 reserves GPUs that replicas on device 'cpu' would not use")

    kw = dict(app_kw or {})
    allowed = set(inspect.signature(create_app).parameters) - {"engine", *REPLICA_APP_KW}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"app_kw {', '.join(map(repr, bad))}: not a create_app keyword a replica takes (it sets "
                         f"{', '.join(REPLICA_APP_KW)} itself; the others are {', '.join(sorted(allowed))})")
    library = kw.get("library")
    if library is not None:
        # Every replica opens the same directory itself: a path, never a VoiceLibrary object.
        root = library if isinstance(library, (str, os.PathLike)) else library.root
        kw["library"] = str(Path(root).expanduser().resolve())
    max_queue = int(kw.get("max_queue", DEFAULT_MAX_QUEUE))
    request_timeout = float(kw.get("request_timeout", DEFAULT_TIMEOUT_S))
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")

    actor = {"num_gpus": gpus}
    if cpus_per_replica is not None:
        actor["num_cpus"] = float(cpus_per_replica)
    # Ray admits to a replica what its app would take (running + queued), so the replica never
    # answers 429 while another has room; Ray's proxy queues the rest.
    opts = dict(name=name, ray_actor_options=actor, max_ongoing_requests=max_batch + max_queue,
                graceful_shutdown_timeout_s=float(drain_timeout) if drain_timeout else request_timeout)
    if autoscaling is not None:
        opts["autoscaling_config"] = _autoscaling(autoscaling, replicas, max_batch)
    else:
        opts["num_replicas"] = replicas
    return serve.deployment(SpeechReplica, **opts).bind(spec, max_batch, kw)


def _autoscaling(autoscaling: Mapping[str, Any], replicas: int, max_batch: int) -> dict:
    cfg = dict(autoscaling)
    lo, hi = cfg.get("min_replicas", 1), cfg.get("max_replicas")
    if hi is None:
        raise ValueError("autoscaling needs max_replicas")
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
        raise ValueError(f"autoscaling needs integers 0 <= min_replicas <= max_replicas (>= 1), got "
                         f"min_replicas={lo!r}, max_replicas={hi!r}")
    if not lo <= replicas <= hi:
        raise ValueError(f"the initial replicas ({replicas}) must lie from min_replicas ({lo}) to max_replicas "
                         f"({hi})")
    target = cfg.get("target_ongoing_requests")
    if target is not None and not float(target) > 0:
        raise ValueError(f"target_ongoing_requests must be > 0, got {target!r}")
    cfg.update(min_replicas=lo, max_replicas=hi, initial_replicas=replicas)
    # Ray's default target (2) suits one request at a time; an engine batches max_batch at once.
    cfg.setdefault("target_ongoing_requests", max_batch)
    return cfg


# ---------------------------------------------------------------------------------------------- CLI


def model_from_args(args) -> dict:
    """``chatterbox-rt serve``'s model options -> a model spec (``--device auto``: decided by
    ``--gpus-per-replica``)."""
    spec: dict = {"device": None if args.device == "auto" else args.device, "dtype": args.dtype,
                  "threads": args.threads or None}
    if getattr(args, "bundle", None):
        spec.update(bundle=args.bundle, backend="tensorrt" if args.backend == "tensorrt" else "onnxruntime")
        spec.pop("dtype")
        return spec
    spec.update(variant=args.variant, backend=args.backend, behaviour=getattr(args, "behaviour", None))
    if args.ckpt:
        spec.update(ckpt=args.ckpt, t3_file=getattr(args, "t3_file", None), lora=getattr(args, "lora", None))
    else:
        spec.update(dummy=True, seed=args.seed or 0, t3_layers=args.t3_layers or None)
    return spec


def check_args(args) -> None:
    """``serve --ray``'s own options, in the CLI's words, before anything loads or Ray starts."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if not args.gpus_per_replica >= 0:
        raise ValueError(f"--gpus-per-replica must be >= 0, got {args.gpus_per_replica}")
    if args.cpus_per_replica is not None and not args.cpus_per_replica >= 0:
        raise ValueError(f"--cpus-per-replica must be >= 0, got {args.cpus_per_replica}")
    if args.device != "auto" and args.device.startswith("cuda") and args.gpus_per_replica == 0:
        raise ValueError(f"--device {args.device} needs --gpus-per-replica > 0: Ray shows a replica only the GPUs "
                         "it reserves (leave --device auto: cuda exactly when --gpus-per-replica > 0)")
    if args.device == "cpu" and args.gpus_per_replica > 0:
        raise ValueError("--gpus-per-replica > 0 reserves GPUs that replicas on --device cpu would not use")
    if args.max_replicas is None:
        if args.min_replicas is not None or args.target_ongoing_requests is not None:
            raise ValueError("--min-replicas and --target-ongoing-requests configure autoscaling: give "
                             "--max-replicas too")
        return
    lo = _min_replicas(args)
    if args.max_replicas < 1 or not 0 <= lo <= args.max_replicas:
        raise ValueError(f"autoscaling needs 0 <= --min-replicas ({lo}) <= --max-replicas ({args.max_replicas}) "
                         "and --max-replicas >= 1")
    if not lo <= args.replicas <= args.max_replicas:
        raise ValueError(f"--replicas {args.replicas} (the initial count when autoscaling) must lie from "
                         f"--min-replicas ({lo}) to --max-replicas ({args.max_replicas})")
    if args.target_ongoing_requests is not None and not args.target_ongoing_requests > 0:
        raise ValueError(f"--target-ongoing-requests must be > 0, got {args.target_ongoing_requests}")


def _min_replicas(args) -> int:
    return 1 if args.min_replicas is None else args.min_replicas


def run_ray(args, *, api_key: Optional[str] = None, generate_defaults: Optional[Mapping[str, Any]] = None) -> int:
    """``chatterbox-rt serve --ray``: deploy on Ray (the cluster ``RAY_ADDRESS`` names, else a new
    local instance), print the URL, serve until SIGTERM / SIGINT.

    On the signal the application is deleted (Ray Serve's graceful shutdown of its replicas): the
    proxy stops routing to it (a new request gets Ray's 404), each replica waits for its requests
    in flight, the proxy relaying their responses to the end (at most ``--drain-timeout`` seconds,
    default ``--request-timeout``), then runs the app's shutdown (not ready, engine closed) and
    exits. Serve and Ray themselves are shut down after that when this command started them; on an
    existing cluster they keep running for its other applications. A second signal stops at once."""
    import ray

    check_args(args)
    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = {"min_replicas": _min_replicas(args), "max_replicas": args.max_replicas}
        if args.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = args.target_ongoing_requests
    app_kw = dict(library=args.library or None, api_key=api_key, max_queue=args.max_queue,
                  request_timeout=args.request_timeout, generate_defaults=dict(generate_defaults or {}))
    app = build_deployment(model_from_args(args), replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica, autoscaling=autoscaling,
                           max_batch=args.max_batch, app_kw=app_kw, drain_timeout=args.drain_timeout or None)

    # RAY_ADDRESS (e.g. "auto" for the cluster `ray start` made here): join it; else a Ray instance of
    # our own, even where another runs on this machine, so that stopping never touches someone else's.
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address or "local")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=DEFAULT_NAME, route_prefix="/", logging_config={"log_level": args.log_level.upper()})
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"chatterbox-rt: serving on http://{host}:{args.port} ({_replicas_text(args)} on Ray; SIGTERM or "
              f"Ctrl-C drains and stops)", flush=True)
        _wait_for_signal()
        print("chatterbox-rt: stopping: the replicas finish their requests in flight, then exit", file=sys.stderr,
              flush=True)
        # Deleting the application first drains it behind a proxy that is still up (serve.shutdown
        # alone stops the proxies at once, cutting the responses they are relaying).
        serve.delete(DEFAULT_NAME)
        if address is None:
            serve.shutdown()
    finally:
        if address is None:
            ray.shutdown()
    return 0


def _replicas_text(args) -> str:
    if args.max_replicas is not None:
        return f"{args.replicas} replica(s) now, autoscaling {_min_replicas(args)}-{args.max_replicas}"
    return f"{args.replicas} replica(s)"


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT; the handlers then go back to what they were (SIGINT:
    KeyboardInterrupt), so a second signal interrupts the drain."""
    stop = threading.Event()
    previous = {}

    def on_signal(signum, frame):
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, on_signal)
    while not stop.wait(1.0):  # a timed wait: the handler runs between waits on every platform
        pass


__all__ = ["build_deployment", "load_tts", "check_model", "check_args", "run_ray", "SpeechReplica", "REPLICA_HEADER"]
