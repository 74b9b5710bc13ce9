"""A Triton Inference Server model repository for Chatterbox: Python backend, decoupled streaming.

``chatterbox-rt export --triton-repo DIR`` (or :func:`write_triton_repo`) writes::

    DIR/
      chatterbox/                     the model (``model_name``)
        config.pbtxt                  backend "python", max_batch_size 0, decoupled, inputs/outputs below
        1/
          model.py                    TritonPythonModel: a few lines over :class:`TritonModel` here
          chatterbox_model.json       what to load at ``initialize``: the model spec (below)

Launch it with ``tritonserver --model-repository DIR``. The Python backend runs ``model.py`` in
its own stub process with the Python it was built for (3.12 in NGC's containers); that
interpreter must import ``chatterbox_rt`` (and torch): pip-install it into the container, or
pack an environment and pass ``execution_env=`` (``EXECUTION_ENV_PATH`` in ``config.pbtxt``).
Each instance (``instance_group``: ``KIND_GPU`` runs one per visible GPU, on ``cuda:<id>``;
``KIND_CPU`` one on the CPU) loads its own model and runs one :class:`chatterbox_rt.Engine`
in-process (continuous batching of up to ``max_batch`` requests; more wait in its queue).

**Model spec** (``chatterbox_model.json``, ``"model"``): exactly one of ``"ckpt": DIR`` (a
checkpoint, ``TTS.from_local``), ``"bundle": DIR`` (an exported bundle, ``TTS.from_exported``,
onnxruntime) or ``"dummy": true`` (seeded random weights, ``TTS.from_dummy``: noise, for tests);
optionally ``variant``, ``device`` ("auto", the default, follows the instance kind: ``cuda:<id>``
or ``cpu``), ``dtype``, ``backend``, ``threads``, ``library`` (the voice library directory;
default ``$CHATTERBOX_RT_VOICES`` or ``~/.cache/chatterbox-rt/voices`` on the server),
``t3_file``/``lora``/``behaviour`` (checkpoints), ``seed``/``t3_layers`` (dummy weights),
``generate_defaults`` (``Engine.submit`` keywords applied to every request, e.g.
``max_new_tokens``, ``n_steps``, ``watermark``, ``chunk_tokens``) and ``engine`` (``Engine``
keywords: ``max_len``, ``chunk_tokens``, ...). Paths are absolute (relative ones are resolved
when the repository is written, and must exist there).

**Inputs** (each shape ``[1]``; all but ``text`` optional): ``text`` (TYPE_STRING, UTF-8),
``voice`` (TYPE_STRING: a voice library id; empty or "default": the model's built-in voice),
``language`` (TYPE_STRING: the multilingual model's language id), ``seed`` (TYPE_INT64),
``temperature``, ``exaggeration``, ``cfg_weight`` (TYPE_FP32), ``max_new_tokens`` (TYPE_INT32).

**Outputs**, per request a stream of responses: each audio response carries ``audio``
(TYPE_FP32 ``[n]``: the next chunk of 24 kHz mono samples, in [-1, 1]) and ``sample_rate``
(TYPE_INT32 ``[1]``: 24000, in every audio response); then one empty response flagged
``TRITONSERVER_RESPONSE_COMPLETE_FINAL``. The chunks joined are the whole utterance: exactly
``Engine.submit(..., stream=True).result()`` for the same model, arguments and seed (a bundle on
onnxruntime cannot stream yet: its whole utterance comes as one chunk). Bad input (empty text,
an unknown voice, an out-of-range value) and failures come back as one response with a
``TritonError`` (the message only, ``INVALID_ARG`` for bad input), flagged final. A request
cancelled by its client (``is_cancelled()``, polled every 50 ms and before each chunk) cancels
its engine request (its KV rows are freed before the next decode step); it then gets a
``CANCELLED`` error flagged final. ``finalize`` cancels what is still running, waits for those
requests to send their final response, and closes the engine.

**What was verified, and what was not.** tritonserver and tritonclient cannot be installed where
this was written. ``tests/export/test_triton_repo.py`` parses ``config.pbtxt`` with protobuf's
text-format parser against the fields of Triton's ``ModelConfig`` it uses (their names, numbers
and enums copied from ``triton-inference-server/common``'s ``model_config.proto``), checks its
contract, and runs the generated ``model.py`` in-process with a stand-in for
``triton_python_backend_utils`` (the calls this module makes: ``Tensor``,
``get_input_tensor_by_name``, ``InferenceResponse``, ``TritonError`` with its codes, the response
sender and its flags, ``is_cancelled``): concurrent streams, their audio against the engine's,
cancellation, bad input, finalize. Not run: a real tritonserver loading the repository (its own
config validation, the stub process and its Python, shared-memory tensor transport, the GPU
instance kind), a client (tritonclient's gRPC streaming against the decoupled model), and
Triton's behaviour on cancellation and unload timing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Optional, Union

FORMAT = "chatterbox-rt-triton-model"
FORMAT_VERSION = 1
SPEC_FILE = "chatterbox_model.json"
MODEL_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
VERSION_DIR = "1"
SAMPLE_RATE = 24000
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")
BUILTIN_VOICE = "default"
# The cancellation poll (seconds), and how long finalize waits for the requests it cancelled.
CANCEL_POLL_S = 0.05
FINALIZE_WAIT_S = 30.0

# (name, Triton data type, optional); every input has shape [1].
INPUTS = (
    ("text", "TYPE_STRING", False),
    ("voice", "TYPE_STRING", True),
    ("language", "TYPE_STRING", True),
    ("seed", "TYPE_INT64", True),
    ("temperature", "TYPE_FP32", True),
    ("exaggeration", "TYPE_FP32", True),
    ("cfg_weight", "TYPE_FP32", True),
    ("max_new_tokens", "TYPE_INT32", True),
)
OUTPUTS = (("audio", "TYPE_FP32", (-1,)), ("sample_rate", "TYPE_INT32", (1,)))

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_STAGING = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9_.-]*\.[^/]*\.(tmp|old)")  # ours, left by an interrupted write
_SOURCES = ("ckpt", "bundle", "dummy")
_MODEL_KEYS = frozenset(_SOURCES + ("variant", "device", "dtype", "backend", "threads", "library", "t3_file", "lora",
                                    "behaviour", "seed", "t3_layers", "generate_defaults", "engine"))
_DTYPES = ("fp32", "bf16", "fp16")
_ENGINE_KEYS = frozenset(("max_len", "memory_budget", "cuda_graphs", "mode", "chunk_tokens", "first_chunk_tokens",
                          "s3gen_batch"))
_SUBMIT_EXTRA = ("chunk_tokens", "first_chunk_tokens")
DUMMY_VARIANT = "chatterbox"  # as the CLI's --dummy-weights

log = logging.getLogger(__name__)

MODEL_PY = '''\
"""Chatterbox text-to-speech for Triton Inference Server's Python backend (decoupled streaming).

Written by chatterbox-rt {version} (`chatterbox-rt export --triton-repo`). The model this loads is
described in {spec} next to this file; the serving code is
chatterbox_rt.export.triton_repo.TritonModel (its docstring has the input/output contract).
"""
import triton_python_backend_utils as pb_utils

from chatterbox_rt.export.triton_repo import TritonModel


class TritonPythonModel(TritonModel):
    pb_utils = pb_utils
    model_file = __file__
'''


class TritonRepoError(ValueError):
    """A model repository that cannot be written (bad spec, a directory that is not ours)."""


# ----------------------------------------------------------------------------------------------
# Writing the repository
# ----------------------------------------------------------------------------------------------


def _abs_dir(value, key: str, must_exist: bool = True) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TritonRepoError(f"model[{key!r}] must be a directory path, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else path.resolve()
    if must_exist and not path.is_dir():
        raise TritonRepoError(f"model[{key!r}]: no such directory {path}")
    if path.exists() and not path.is_dir():
        raise TritonRepoError(f"model[{key!r}]: {path} is a file, not a directory")
    return str(path)


def _check_int(model: dict, key: str, minimum: int) -> None:
    v = model.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
        raise TritonRepoError(f"model[{key!r}] must be an integer >= {minimum}, got {v!r}")


def _check_json_dict(model: dict, key: str, allowed) -> dict:
    d = model.get(key) or {}
    if not isinstance(d, dict):
        raise TritonRepoError(f"model[{key!r}] must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise TritonRepoError(f"model[{key!r}]: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    for k, v in d.items():
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise TritonRepoError(f"model[{key!r}][{k!r}] must be a number, string or bool, got {v!r}")
    return dict(d)


def check_model_spec(model: dict) -> dict:
    """``model`` (see the module docstring) validated and normalised: paths absolute, defaults
    filled in. TritonRepoError names what is wrong."""
    from ..models.t3.config import canonical_variant

    if not isinstance(model, dict):
        raise TritonRepoError(f"model must be a dict, got {type(model).__name__}")
    unknown = sorted(set(model) - _MODEL_KEYS)
    if unknown:
        raise TritonRepoError(f"model: unknown key(s) {unknown}; expected some of {sorted(_MODEL_KEYS)}")
    sources = [k for k in _SOURCES if model.get(k) not in (None, False)]
    if len(sources) != 1:
        raise TritonRepoError("model needs exactly one of 'ckpt' (a checkpoint directory), 'bundle' (an exported "
                              f"bundle) or 'dummy': True, got {sources or 'none'}")
    source = sources[0]
    out: dict[str, Any] = {}
    if source == "dummy":
        if model["dummy"] is not True:
            raise TritonRepoError(f"model['dummy'] must be True, got {model['dummy']!r}")
        out["dummy"] = True
    else:
        out[source] = _abs_dir(model[source], source)
    variant = model.get("variant")
    if variant is not None:
        from .. import VARIANTS

        if not isinstance(variant, str) or canonical_variant(variant) not in VARIANTS:
            raise TritonRepoError(f"model['variant'] must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if source == "bundle":
            raise TritonRepoError("model['variant'] does not apply to a bundle (its manifest names it)")
        out["variant"] = variant
    elif source == "dummy":
        out["variant"] = DUMMY_VARIANT
    device = model.get("device") or "auto"
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise TritonRepoError(f"model['device'] must be auto, cpu, cuda or cuda:N, got {device!r}")
    out["device"] = device
    dtype = model.get("dtype") or "fp32"
    if dtype not in _DTYPES:
        raise TritonRepoError(f"model['dtype'] must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if dtype != "fp32":
        if source == "bundle":
            raise TritonRepoError("model['dtype'] does not apply to a bundle (it runs its graphs' precision)")
        out["dtype"] = dtype
    backends = ("onnxruntime", "tensorrt") if source == "bundle" else ("torch", "onnxruntime", "tensorrt")
    backend = model.get("backend") or backends[0]
    if backend not in backends:
        raise TritonRepoError(f"model['backend'] must be one of {', '.join(backends)} for a {source}, got {backend!r}")
    out["backend"] = backend
    _check_int(model, "threads", 0)
    if model.get("threads"):
        out["threads"] = model["threads"]
    if model.get("library") is not None:
        out["library"] = _abs_dir(model["library"], "library", must_exist=False)
    for key, allowed in (("t3_file", "ckpt"), ("lora", "ckpt"), ("behaviour", ("ckpt", "dummy")),
                         ("seed", "dummy"), ("t3_layers", "dummy")):
        if model.get(key) is None:
            continue
        if source not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise TritonRepoError(f"model[{key!r}] applies to {' or '.join(allowed) if isinstance(allowed, tuple) else allowed}"
                                  f" models, not a {source}")
        out[key] = model[key]
    if "lora" in out:
        out["lora"] = _abs_dir(out["lora"], "lora")
    if "t3_file" in out:
        t3f = out["t3_file"]
        if not isinstance(t3f, (str, os.PathLike)):
            raise TritonRepoError(f"model['t3_file'] must be a file name or path, got {t3f!r}")
        p = Path(t3f).expanduser()
        out["t3_file"] = str(p.resolve()) if (p.is_absolute() or p.is_file()) else str(t3f)
    if "behaviour" in out and out["behaviour"] not in ("0.1.7", "upstream"):
        raise TritonRepoError(f"model['behaviour'] must be 0.1.7 or upstream, got {out['behaviour']!r}")
    _check_int(out, "seed", 0)
    _check_int(out, "t3_layers", 1)
    from ..engine.engine import ENGINE_ARGS
    from ..tts import SAMPLING_ARGS

    gd = _check_json_dict(model, "generate_defaults", SAMPLING_ARGS + ENGINE_ARGS + _SUBMIT_EXTRA)
    if gd:
        out["generate_defaults"] = gd
    eng = _check_json_dict(model, "engine", _ENGINE_KEYS)
    if eng:
        out["engine"] = eng
    if source == "ckpt" and "t3_file" not in out:  # every missing file named now, not at the server's load
        from ..checkpoint import check_files, detect_variant

        check_files(out["ckpt"], out.get("variant") or detect_variant(out["ckpt"]))
    if source == "bundle":
        from .manifest import Manifest

        m = Manifest.read(out["bundle"])
        if m.layout != "native":
            raise TritonRepoError(f"{out['bundle']} is an {m.layout} bundle; the Triton model runs the native layout "
                                  "(`chatterbox-rt export` without --layout)")
    return out


def config_pbtxt(model_name: str = "chatterbox", *, instance_kind: str = "KIND_GPU", instance_count: int = 1,
                 execution_env: Optional[str] = None, version: str = "") -> str:
    """The model's ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    lines = [f"# Chatterbox text-to-speech (chatterbox-rt {version}): Triton's Python backend, streaming (decoupled).",
             f"# Written by `chatterbox-rt export --triton-repo`; the model it loads: {VERSION_DIR}/{SPEC_FILE}.",
             "# Responses per request: audio chunks (24 kHz float32) as they are made, then an empty final one.",
             f'name: "{model_name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy {", "  decoupled: true", "}", "input ["]
    for i, (name, dtype, optional) in enumerate(INPUTS):
        lines += ["  {", f'    name: "{name}"', f"    data_type: {dtype}", "    dims: [ 1 ]"]
        if optional:
            lines.append("    optional: true")
        lines.append("  }," if i < len(INPUTS) - 1 else "  }")
    lines += ["]", "output ["]
    for i, (name, dtype, dims) in enumerate(OUTPUTS):
        lines += ["  {", f'    name: "{name}"', f"    data_type: {dtype}",
                  f"    dims: [ {', '.join(str(d) for d in dims)} ]", "  }," if i < len(OUTPUTS) - 1 else "  }"]
    lines += ["]", "instance_group [", "  {", f"    count: {instance_count}", f"    kind: {instance_kind}", "  }", "]"]
    if execution_env:
        lines += ["parameters {", '  key: "EXECUTION_ENV_PATH"', f"  value: {{ string_value: {json.dumps(execution_env)} }}",
                  "}"]
    return "\n".join(lines) + "\n"


def read_spec(path: Union[str, os.PathLike]) -> dict:
    """A ``chatterbox_model.json`` (the file, or the version directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TritonRepoError(f"cannot read the Chatterbox model spec {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TritonRepoError(f"{path} is not a Chatterbox model spec (format {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise TritonRepoError(f"{path} has format version {data.get('format_version')!r}; this chatterbox_rt reads "
                              f"version {FORMAT_VERSION}: write the repository again with this version")
    return data


def _is_our_model_dir(path: Path) -> bool:
    try:
        read_spec(path / VERSION_DIR / SPEC_FILE)
    except TritonRepoError:
        return False
    return (path / CONFIG_FILE).is_file()


def check_repo_dir(out_dir: Union[str, os.PathLike], model_name: str = "chatterbox", *, force: bool = False) -> Path:
    """``out_dir`` as a Path if :func:`write_triton_repo` may write ``model_name`` there (see
    there), else TritonRepoError saying why. Reads only."""
    if not isinstance(model_name, str) or not _NAME.fullmatch(model_name) or model_name in (".", ".."):
        raise TritonRepoError(f"model_name must be 1-128 letters, digits, '_', '.' or '-' (not starting with '.' "
                              f"or '-'), got {model_name!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TritonRepoError(f"{out} is a file, not a directory: give --triton-repo a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    foreign = [e.name for e in entries if not (e.is_dir() and (_is_our_model_dir(e) or _STAGING.fullmatch(e.name)))]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TritonRepoError(f"{out} is not empty and is not a Chatterbox model repository written by chatterbox-rt "
                              f"(it holds {shown}); give an empty or new directory, or force=True (CLI: --force) to "
                              f"add the model {model_name!r} to it (nothing else there is removed)")
    target = out / model_name
    if (target.exists() or target.is_symlink()) and not (target.is_dir() and _is_our_model_dir(target)):
        raise TritonRepoError(f"{target} exists and is not a Chatterbox model written by chatterbox-rt: it is never "
                              f"replaced (not even with force); remove it, or choose another model_name")
    return out


def write_triton_repo(out_dir: Union[str, os.PathLike], *, model: dict, model_name: str = "chatterbox",
                      max_batch: int = 16, instance_kind: str = "KIND_GPU", instance_count: int = 1,
                      execution_env: Optional[str] = None, force: bool = False) -> Path:
    """Write a Triton model repository at ``out_dir`` serving one Chatterbox model as
    ``model_name`` (layout, contract and launch: the module docstring). ``model``: what the
    Triton model loads at ``initialize`` (``{"ckpt": DIR}``, ``{"bundle": DIR}`` or ``{"dummy": True,
    "variant": V}``, plus the optional keys there). ``max_batch``: the engine's concurrent requests
    per instance. ``instance_kind``: ``KIND_GPU`` (one instance per visible GPU) or ``KIND_CPU``;
    ``instance_count`` instances per GPU (or in all, on the CPU). ``execution_env``: a packed
    Python environment for the backend (``EXECUTION_ENV_PATH``).

    ``out_dir`` may be missing, empty, or a repository of Chatterbox models written here (the
    model ``model_name`` is replaced); anything else (another Triton repository, other files) is
    refused unless ``force=True``, which writes ``model_name`` into it and removes nothing else.
    Returns the model's directory."""
    from .. import __version__

    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise TritonRepoError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise TritonRepoError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if not isinstance(instance_count, int) or isinstance(instance_count, bool) or instance_count < 1:
        raise TritonRepoError(f"instance_count must be an integer >= 1, got {instance_count!r}")
    if execution_env is not None and (not isinstance(execution_env, str) or not execution_env or '\n' in execution_env):
        raise TritonRepoError(f"execution_env must be a path, got {execution_env!r}")
    spec_model = check_model_spec(model)
    if spec_model["device"].startswith("cuda") and instance_kind == "KIND_CPU":
        raise TritonRepoError(f"model['device'] is {spec_model['device']} but instance_kind is KIND_CPU")
    if spec_model["device"] == "cpu" and instance_kind == "KIND_GPU":
        raise TritonRepoError("model['device'] is cpu but instance_kind is KIND_GPU: use instance_kind='KIND_CPU'")

    out = check_repo_dir(out_dir, model_name, force=force)
    target = out / model_name

    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "chatterbox_rt": __version__,
            "model_name": model_name, "max_batch": max_batch, "instance_kind": instance_kind, "model": spec_model}
    out.mkdir(parents=True, exist_ok=True)
    # Staged outside the repository where it can be (a Triton polling it must not see a half-written
    # or temporary model), on the same file system, and moved into place.
    tmp_root = out.resolve().parent
    if tmp_root.stat().st_dev != out.stat().st_dev or not os.access(tmp_root, os.W_OK):
        tmp_root = out
    stage = tmp_root / f".{model_name}.{uuid.uuid4().hex[:12]}.tmp"
    stage.mkdir()  # the usual mode of a directory the user makes (0777 & ~umask), unlike mkdtemp's 0700
    try:
        (stage / VERSION_DIR).mkdir()
        (stage / VERSION_DIR / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        (stage / VERSION_DIR / MODEL_FILE).write_text(MODEL_PY.format(version=__version__, spec=SPEC_FILE),
                                                      encoding="utf-8")
        (stage / CONFIG_FILE).write_text(config_pbtxt(model_name, instance_kind=instance_kind,
                                                      instance_count=instance_count, execution_env=execution_env,
                                                      version=__version__), encoding="utf-8")
        old = None
        if target.exists():
            old = stage.with_name(stage.name[:-len(".tmp")] + ".old")
            os.replace(target, old)
        os.replace(stage, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Serving (runs inside Triton's Python backend stub)
# ----------------------------------------------------------------------------------------------


def serving_device(model: dict, instance_kind: Optional[str], device_id: Optional[str]) -> Optional[str]:
    """The device a Triton instance loads the model on: ``model['device']``, where "auto" follows
    the instance kind (GPU -> ``cuda:<device_id>``, CPU -> ``cpu``; neither: the loader's default),
    and a bare "cuda" on a GPU instance becomes that instance's GPU."""
    device = model.get("device") or "auto"
    kind = (instance_kind or "").upper()
    if device == "auto":
        device = "cuda" if kind == "GPU" else ("cpu" if kind == "CPU" else None)
    if device == "cuda" and kind == "GPU" and str(device_id or "").isdigit():
        device = f"cuda:{device_id}"
    return device


def load_tts(model: dict, device: Optional[str]):
    """The ``TTS`` a model spec describes, on ``device``."""
    import torch

    from ..tts import TTS

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[model.get("dtype", "fp32")]
    threads = model.get("threads") or None
    if threads:
        torch.set_num_threads(threads)
    if model.get("bundle"):
        return TTS.from_exported(model["bundle"], device=device, threads=threads,
                                 backend=model.get("backend", "onnxruntime"))
    backend = model.get("backend", "torch")
    if model.get("ckpt"):
        return TTS.from_local(model["ckpt"], variant=model.get("variant"), device=device, dtype=dtype,
                              t3_file=model.get("t3_file"), lora=model.get("lora"), behaviour=model.get("behaviour"),
                              backend=backend, threads=threads)
    variant = model.get("variant") or DUMMY_VARIANT
    behaviour = model.get("behaviour")
    overrides: dict = {}
    if model.get("t3_layers"):
        from ..models.t3.config import smaller_backbone

        overrides = smaller_backbone(variant, behaviour=behaviour, num_layers=model["t3_layers"])
    elif behaviour is not None:
        overrides = dict(behaviour=behaviour)
    return TTS.from_dummy(variant, seed=model.get("seed") or 0, device=device, dtype=dtype, backend=backend,
                          threads=threads, **overrides)


class BadInput(ValueError):
    """A request input that cannot be used (sent back as INVALID_ARG)."""


def _message(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Stream:
    """One Triton request being served: its request and sender, and the engine request."""

    __slots__ = ("request", "sender", "engine_request", "thread", "cancelled_by_client")

    def __init__(self, request, sender):
        self.request, self.sender = request, sender
        self.engine_request = None
        self.thread: Optional[threading.Thread] = None
        self.cancelled_by_client = False


class TritonModel:
    """The body of the generated ``model.py``'s ``TritonPythonModel`` (which sets ``pb_utils``, the
    backend's ``triton_python_backend_utils``, and ``model_file``, its own path, as class attributes).

    ``initialize`` loads the model the spec next to ``model.py`` describes and starts its Engine;
    ``execute`` reads each request's inputs, starts a thread per request that submits it
    (``stream=True``) and sends every chunk as a response as soon as the engine has it, then the
    final flag, and returns at once (decoupled: Triton may call it again while those run, and the
    engine batches them); ``finalize`` cancels what runs, waits for the final responses and closes
    the engine. See the module docstring for the contract."""

    pb_utils = None
    model_file: Optional[str] = None

    # ------------------------------------------------------------------ Triton's entry points

    def initialize(self, args: dict) -> None:
        pb = self._pb()
        args = dict(args or {})
        config = json.loads(args["model_config"]) if args.get("model_config") else {}
        if config:
            decoupled = (pb.using_decoupled_model_transaction_policy(config)
                         if hasattr(pb, "using_decoupled_model_transaction_policy")
                         else bool((config.get("model_transaction_policy") or {}).get("decoupled")))
            if not decoupled:
                raise self._model_exception("this model streams several responses per request: set "
                                            "model_transaction_policy { decoupled: true } in config.pbtxt")
        self.spec = read_spec(self._spec_path(args))
        from .. import __version__

        if self.spec.get("chatterbox_rt") != __version__:
            self._log("warn", f"the repository was written by chatterbox_rt {self.spec.get('chatterbox_rt')}; this is "
                              f"{__version__}")
        model = self.spec["model"]
        device = serving_device(model, args.get("model_instance_kind"), args.get("model_instance_device_id"))
        self.tts = load_tts(model, device)
        lib = model.get("library")
        from ..voices import VoiceLibrary

        self.library = VoiceLibrary(lib)  # None: $CHATTERBOX_RT_VOICES or ~/.cache/chatterbox-rt/voices
        self.engine = self.tts.engine(max_batch=int(self.spec.get("max_batch", 16)), **(model.get("engine") or {}))
        self.generate_defaults = dict(model.get("generate_defaults") or {})
        self.streaming = bool(self.tts.can_stream)
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        self._closing = False
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_cancellations, name="chatterbox-triton-cancel",
                                         daemon=True)
        self._watcher.start()
        self._log("info", f"chatterbox: {self.tts!r}, {self.engine!r}, library {self.library.root}"
                          + ("" if self.streaming else "; this bundle cannot stream (exported without HiFT's "
                                                         "streaming graphs): one chunk per request"))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._read_inputs(request)
            except BadInput as e:
                self._send_error(sender, _message(e), "INVALID_ARG")
                continue
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                self._send_error(sender, _message(e), "INTERNAL")
                continue
            stream = _Stream(request, sender)
            stream.thread = threading.Thread(target=self._serve, args=(stream, job), daemon=True,
                                             name="chatterbox-triton-request")
            with self._lock:
                if self._closing:
                    stream = None
                else:
                    self._streams[id(stream)] = stream
            if stream is None:
                self._send_error(sender, "the model is being unloaded", "UNAVAILABLE")
                continue
            stream.thread.start()
        # Decoupled: nothing to return; the responses go through each request's sender.

    def finalize(self) -> None:
        if not hasattr(self, "_lock"):  # initialize did not get that far
            return
        with self._lock:
            self._closing = True
            streams = list(self._streams.values())
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(wait=False, timeout=FINALIZE_WAIT_S)  # cancels what runs; each thread sends its final
        for s in streams:
            if s.thread is not None and s.thread.is_alive():
                s.thread.join(FINALIZE_WAIT_S)
        self._stop.set()
        if getattr(self, "_watcher", None) is not None:
            self._watcher.join(1.0)
        tts = getattr(self, "tts", None)
        if tts is not None:
            tts.close()

    # ------------------------------------------------------------------ requests

    def _read_inputs(self, request) -> dict:
        text = self._input(request, "text", str)
        if text is None:
            raise BadInput("the input 'text' is required")
        job: dict[str, Any] = {"text": text, "kw": dict(self.generate_defaults)}
        job["voice"] = self._input(request, "voice", str)
        language = self._input(request, "language", str)
        job["language"] = (language.strip() or None) if language is not None else None
        seed = self._input(request, "seed", int)
        job["seed"] = seed
        for name in ("temperature", "exaggeration", "cfg_weight"):
            v = self._input(request, name, float)
            if v is not None:
                if not math.isfinite(v):
                    raise BadInput(f"{name} must be a finite number, got {v}")
                job["kw"][name] = v
        n = self._input(request, "max_new_tokens", int)
        if n is not None:
            job["kw"]["max_new_tokens"] = n
        return job

    def _input(self, request, name: str, kind):
        import numpy as np

        t = self._pb().get_input_tensor_by_name(request, name)
        if t is None:
            return None
        arr = np.asarray(t.as_numpy())
        if arr.size != 1:
            raise BadInput(f"the input {name!r} must hold one element (shape [1]), got shape {list(arr.shape)}")
        v = arr.reshape(-1)[0]
        if kind is str:
            if isinstance(v, (bytes, np.bytes_)):
                try:
                    return bytes(v).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadInput(f"the input {name!r} is not UTF-8 text ({e})") from None
            if isinstance(v, str):
                return v
            raise BadInput(f"the input {name!r} must be a string (TYPE_STRING), got {arr.dtype}")
        if kind is int:
            if not np.issubdtype(arr.dtype, np.integer):
                raise BadInput(f"the input {name!r} must be an integer, got {arr.dtype}")
            return int(v)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise BadInput(f"the input {name!r} must be a number, got {arr.dtype}")
        return float(v)

    def _voice(self, name: Optional[str]):
        from ..voices import check_name

        name = (name or "").strip()
        if name in ("", BUILTIN_VOICE):
            if self.tts.builtin_voice is None:
                raise BadInput("this model has no built-in voice: give a voice library id as 'voice'")
            return None
        check_name(name)  # a library name never reaches a path outside the library
        return self.library.get(name, device=self.tts.device, variant=self.tts.variant)

    def _serve(self, stream: _Stream, job: dict) -> None:
        from ..engine.engine import EngineClosed
        from ..engine.request import RequestCancelled, RequestFailed
        from ..voice import VoiceError

        sender = stream.sender
        try:
            if self._is_cancelled(stream):  # before it was even submitted
                self._send_error(sender, "the request was cancelled", "CANCELLED")
                return
            try:
                voice = self._voice(job["voice"])
                req = self.engine.submit(job["text"], voice, seed=job["seed"], language_id=job["language"],
                                         stream=self.streaming, **job["kw"])
            except EngineClosed:
                self._send_error(sender, "the model is being unloaded", "UNAVAILABLE")
                return
            except (ValueError, TypeError, VoiceError) as e:
                self._send_error(sender, _message(e), "INVALID_ARG")
                return
            except Exception as e:  # noqa: BLE001 - any failure goes back as the request's error
                self._send_error(sender, _message(e), "INTERNAL")
                return
            stream.engine_request = req
            if self._is_cancelled(stream):
                req.cancel()
            try:
                for chunk in req.chunks():
                    if self._is_cancelled(stream):
                        req.cancel()
                        continue  # drain: chunks() ends with RequestCancelled
                    if not self._send_audio(sender, chunk):
                        req.cancel()
                        stream.cancelled_by_client = True
            except RequestCancelled:
                if stream.cancelled_by_client:
                    self._send_error(sender, "the request was cancelled", "CANCELLED")
                else:
                    self._send_error(sender, "the request was cancelled: the model is being unloaded", "UNAVAILABLE")
                return
            except RequestFailed as e:
                self._send_error(sender, _message(e.__cause__ or e), "INTERNAL")
                return
            except Exception as e:  # noqa: BLE001
                req.cancel()
                self._send_error(sender, _message(e), "INTERNAL")
                return
            self._send_final(sender)
        finally:
            with self._lock:
                self._streams.pop(id(stream), None)

    def _is_cancelled(self, stream: _Stream) -> bool:
        if stream.cancelled_by_client:
            return True
        # The sender's is_cancelled (Triton >= 23.10) is meant for use after execute has returned; the
        # request's is the fallback.
        check = getattr(stream.sender, "is_cancelled", None) or getattr(stream.request, "is_cancelled", None)
        if check is None:
            return False
        try:
            cancelled = bool(check())
        except Exception:  # noqa: BLE001 - a request Triton has already released
            return False
        if cancelled:
            stream.cancelled_by_client = True
        return cancelled

    def _watch_cancellations(self) -> None:
        """Cancel the engine request of every Triton request its client cancelled, also while it waits
        for its first (or next) chunk."""
        while not self._stop.wait(CANCEL_POLL_S):
            with self._lock:
                streams = list(self._streams.values())
            for s in streams:
                req = s.engine_request
                if req is not None and not req.done() and self._is_cancelled(s):
                    req.cancel()

    # ------------------------------------------------------------------ responses

    def _send_audio(self, sender, chunk) -> bool:
        import numpy as np

        pb = self._pb()
        audio = np.ascontiguousarray(chunk.detach().cpu().reshape(-1).numpy(), dtype=np.float32)
        response = pb.InferenceResponse(output_tensors=[pb.Tensor("audio", audio),
                                                        pb.Tensor("sample_rate", np.array([SAMPLE_RATE], np.int32))])
        try:
            sender.send(response)
            return True
        except Exception as e:  # noqa: BLE001 - the client is gone; stop the work
            self._log("warn", f"chatterbox: sending a chunk failed ({_message(e)}); cancelling the request")
            return False

    def _send_final(self, sender) -> None:
        try:
            sender.send(flags=self._pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001
            self._log("warn", f"chatterbox: sending the final flag failed: {_message(e)}")

    def _send_error(self, sender, message: str, code: str = "INTERNAL") -> None:
        pb = self._pb()
        code_value = getattr(pb.TritonError, code, None)
        error = pb.TritonError(message) if code_value is None else pb.TritonError(message, code_value)
        try:
            sender.send(pb.InferenceResponse(output_tensors=[], error=error),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001
            self._log("warn", f"chatterbox: sending an error response failed: {_message(e)}")

    # ------------------------------------------------------------------ helpers

    def _pb(self):
        pb = type(self).pb_utils
        if pb is None:
            import triton_python_backend_utils as pb  # only inside Triton's Python backend

            type(self).pb_utils = pb
        return pb

    def _spec_path(self, args: dict) -> Path:
        if self.model_file:
            return Path(self.model_file).resolve().parent / SPEC_FILE
        return Path(args["model_repository"]) / str(args.get("model_version") or VERSION_DIR) / SPEC_FILE

    def _model_exception(self, message: str) -> Exception:
        exc = getattr(self._pb(), "TritonModelException", None)
        return exc(message) if exc is not None else RuntimeError(message)

    def _log(self, level: str, message: str) -> None:
        logger = getattr(self._pb(), "Logger", None)
        fn = getattr(logger, f"log_{level}", None) if logger is not None else None
        if fn is not None:
            try:
                fn(message)
                return
            except Exception:  # noqa: BLE001 - outside a running stub
                pass
        getattr(log, "warning" if level == "warn" else level, log.info)(message)


__all__ = ["write_triton_repo", "check_model_spec", "config_pbtxt", "read_spec", "load_tts", "serving_device",
           "TritonModel", "TritonRepoError", "INPUTS", "OUTPUTS", "SPEC_FILE", "SAMPLE_RATE"]
