"""Merging a PEFT LoRA adapter into T3's weights at load time.

Fine-tuned voices often come as a LoRA adapter directory written by PEFT's
``PeftModel.save_pretrained``: ``adapter_config.json`` plus ``adapter_model.safetensors`` (older
PEFT: ``adapter_model.bin``, read here only with ``torch.load(weights_only=True)``). ``merge_lora``
folds such an adapter into a T3 state dict (the official checkpoint keys) and computes what PEFT's
``merge_and_unload()`` computes, so the runtime itself never sees an adapter:

* every adapted weight gets ``W += scale * (B @ A)``, transposed for GPT-2's ``Conv1D`` weights
  (stored ``[in, out]``; PEFT sets ``fan_in_fan_out`` per module from the layer type, and so do we,
  whatever the config says) and for embeddings (``lora_embedding_A/B``); with ``lora_bias`` the bias
  also gets ``b += scale * lora_B.bias``. ``scale`` is ``lora_alpha / r``, or ``lora_alpha /
  sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha``
  per module with PEFT's rule (the first pattern ``p`` for which ``re.match(rf"(.*\\.)?({p})$",
  module)`` holds);
* every other tensor in the adapter file is a full replacement, applied before the deltas as PEFT
  loads it into the model before merging: biases trained with ``bias="all"`` / ``"lora_only"``
  (saved as ``<module>.base_layer.bias`` or ``<module>.bias``), ``modules_to_save`` copies (saved
  under the module's own parameter names; ``.modules_to_save[.<adapter>]`` segments are accepted
  too), embeddings saved with ``save_embedding_layers``;
* arithmetic is float32 (float64 for float64 weights) and the result is cast back to each
  weight's dtype. ``lora_dropout`` does nothing at inference.

Module names in the adapter are those of whatever the user wrapped with ``get_peft_model``: the
reference ``chatterbox.models.t3.T3`` (``tfmr.layers.0.self_attn.q_proj``, ``speech_head``) or its
backbone ``t3.tfmr`` (``layers.0.self_attn.q_proj``, ``h.0.attn.c_attn``). Each must name exactly
one weight of the state dict, as it is or under ``tfmr.``.

Refused with a ``CheckpointError`` that says what is wrong: a missing directory, config or weights
file; a config that is not LoRA, or a LoRA variant that is no plain low-rank delta (DoRA and the
other ``LoraConfig`` variants, PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapters whose base is a residual
model, trainable tokens, layer replication, ``target_parameters``); adapter modules that match no
T3 weight; shape mismatches (an adapter trained for another variant); ``lora_A`` without
``lora_B``; ranks, biases or module names that disagree with the config.

Only ``torch`` and ``safetensors`` are used: PEFT and transformers are not needed here.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_tensors

log = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# GPT-2 (Turbo, Nano) weights stored as transformers' Conv1D, i.e. [in, out]; PEFT merges these
# with fan_in_fan_out=True whatever the saved config says.
_CONV1D_KEY = re.compile(r"^tfmr\.h\.\d+\.(attn\.(c_attn|c_proj|q_attn)|mlp\.(c_fc|c_proj))\.weight$")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_LORA_EMB_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")

# LoraConfig fields that select a LoRA variant whose merge is not W + scale * B @ A (or that
# PEFT cannot merge at all); any truthy value is refused.
_VARIANT_FIELDS = {
    "use_dora": "DoRA",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable tokens",
}
# init_lora_weights values after which the adapter belongs to a modified ("residual") base model,
# unless converted with save_pretrained(path_initial_model_for_weight_conversion=...), which
# rewrites init_lora_weights to True; "mica" is a LoRA variant.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass
class _Module:
    """The LoRA tensors of one adapted module, as found in the adapter file."""

    path: str
    A: Optional[Tensor] = None
    B: Optional[Tensor] = None
    B_bias: Optional[Tensor] = None
    embedding: bool = False
    kinds: set = field(default_factory=set)


# ------------------------------------------------------------------------------ reading

def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"LoRA adapter {adapter_dir} has no {ADAPTER_CONFIG_FILE} "
                              "(expected a directory written by PEFT's save_pretrained)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read LoRA adapter config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"LoRA adapter config {path} is not a JSON object")
    return cfg


def _read_weights(adapter_dir: Path) -> tuple[dict, Path]:
    for name in ADAPTER_WEIGHT_FILES:
        path = adapter_dir / name
        if path.is_file():
            break
    else:
        raise CheckpointError(f"LoRA adapter {adapter_dir} has no weights file: expected "
                              f"{' or '.join(ADAPTER_WEIGHT_FILES)}")
    sd = load_tensors(path, "LoRA adapter weights")
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"LoRA adapter weights {path} are not a state dict of tensors")
    if not sd:
        raise CheckpointError(f"LoRA adapter weights {path} hold no tensors")
    return dict(sd), path


def _check_config(cfg: dict, where: str) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise CheckpointError(f"{where} has no peft_type: not a PEFT adapter config")
    if str(peft_type).upper() != "LORA":
        raise CheckpointError(f"{where} is a {peft_type} adapter; only LoRA (peft_type LORA) can be merged")
    for name, what in _VARIANT_FIELDS.items():
        if cfg.get(name):
            raise CheckpointError(
                f"{where}: {what} adapters are not supported ({name}={json.dumps(cfg[name])}); merge it "
                "with PEFT (model.merge_and_unload()) and load the merged T3 checkpoint instead")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r} adapters are not supported: they belong to a modified "
            "(residual) base model. Convert the adapter with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) or merge it with PEFT's merge_and_unload()")
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pat = cfg.get(name) or {}
        if not isinstance(pat, dict) or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in pat.values()):
            raise CheckpointError(f"{where}: {name} must map module patterns to numbers, got {pat!r}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{where}: unknown bias setting {cfg.get('bias')!r} "
                              "(expected 'none', 'all' or 'lora_only')")


# ------------------------------------------------------------------------------ PEFT's rules

def _pattern_value(patterns: dict, module: str, default):
    """``rank_pattern`` / ``alpha_pattern`` lookup as PEFT's ``get_pattern_key``: the first key,
    in file order, that matches the end of the module name at a dot boundary (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_targeted(cfg: dict, module: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a module name of the wrapped model."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    found = any(module.endswith(f".{t}") for t in targets)
    indexes = cfg.get("layers_to_transform")
    if found and indexes is not None and (not isinstance(indexes, list) or len(indexes) != 0):
        patterns = cfg.get("layers_pattern")
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            for p in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == indexes if isinstance(indexes, int) else idx in indexes
    return found


def _checks_targets(cfg: dict) -> bool:
    t = cfg.get("target_modules")
    if t is None or (isinstance(t, str) and t.lower() == "all-linear"):
        return False
    return isinstance(t, (str, list))


# ------------------------------------------------------------------------------ key handling

def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _resolve(name: str, sd: Mapping) -> list[str]:
    """State-dict keys a module or parameter name of the wrapped model may stand for."""
    cands = [name] if name.startswith("tfmr.") else [name, f"tfmr.{name}"]
    return [c for c in cands if c in sd]


def _replacement_candidates(rest: str) -> list[str]:
    """A full tensor's key with PEFT's wrapper segments (``base_layer``, ``modules_to_save[.name]``)
    removed; several spellings when the adapter name may or may not be there."""
    parts = [p for p in rest.split(".") if p != "base_layer"]
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        return [".".join(parts[:i] + parts[i + 1:]), ".".join(parts[:i] + parts[i + 2:])]
    return [".".join(parts)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: Optional[Tensor]) -> str:
    return "missing" if t is None else str(list(t.shape))


# ------------------------------------------------------------------------------ merging

def merge_lora(state_dict: Mapping[str, Tensor], adapter_dir: Union[str, Path], *,
               source: str = "") -> dict[str, Tensor]:
    """``state_dict`` (a T3 checkpoint's tensors) with the PEFT LoRA adapter in ``adapter_dir``
    merged in, as PEFT's ``merge_and_unload()`` would. Returns a new dict: the input and its
    tensors are left unchanged; untouched tensors are shared. ``source`` names the state dict in
    error messages (e.g. its file). Raises ``CheckpointError`` naming what does not fit."""
    adapter_dir = Path(adapter_dir)
    target = source or "the T3 state dict"
    if not adapter_dir.is_dir():
        raise CheckpointError(f"LoRA adapter directory not found: {adapter_dir}")
    cfg = _read_config(adapter_dir)
    where = f"LoRA adapter {adapter_dir}"
    _check_config(cfg, where)
    tensors, weights_path = _read_weights(adapter_dir)

    # Sort the adapter's tensors into LoRA factors per module and full replacements.
    modules: dict[str, _Module] = {}
    replacements: dict[str, Tensor] = {}
    adapter_names: set = set()
    unsupported: list[str] = []
    for key, t in tensors.items():
        rest = _strip_prefix(key)
        m = _LORA_KEY.match(rest) or _LORA_EMB_KEY.match(rest)
        if m is not None:
            if m.group("adapter") is not None:
                adapter_names.add(m.group("adapter"))
            kind = m.group("kind")
            mod = modules.setdefault(m.group("path"), _Module(m.group("path")))
            mod.kinds.add("embedding" if kind.startswith("lora_embedding") else "linear")
            if kind == "lora_A" and m.group("param") == "bias":
                unsupported.append(key)
            elif kind == "lora_B" and m.group("param") == "bias":
                mod.B_bias = t
            elif kind in ("lora_A", "lora_embedding_A"):
                mod.A = t
            else:
                mod.B = t
        elif any(seg.startswith("lora_") for seg in rest.split(".")):
            unsupported.append(key)  # DoRA magnitudes, AdaLoRA's lora_E, ...
        else:
            replacements[key] = t
    if unsupported:
        raise CheckpointError(f"{where}: {weights_path.name} holds tensors that are no plain LoRA factors "
                              f"(not supported): {', '.join(sorted(unsupported))}")
    if len(adapter_names) > 1:
        raise CheckpointError(f"{where}: {weights_path.name} holds several adapters "
                              f"({', '.join(sorted(adapter_names))}); save one adapter per directory")
    if not modules and not replacements:
        raise CheckpointError(f"{where}: {weights_path.name} holds no LoRA weights")

    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    lora_bias = bool(cfg.get("lora_bias", False))

    problems: list[str] = []
    unmatched: list[str] = []
    untargeted: list[str] = []
    shape_errors: list[str] = []
    plan: list[tuple[str, _Module, float, bool]] = []  # (weight key, module, scale, transposed)
    claimed: dict[str, str] = {}
    for path in sorted(modules):
        mod = modules[path]
        if len(mod.kinds) > 1:
            problems.append(f"{path}: both linear (lora_A/lora_B) and embedding (lora_embedding_A/B) factors")
            continue
        mod.embedding = "embedding" in mod.kinds
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if mod.embedding else ("lora_A", "lora_B")
        if mod.A is None or mod.B is None:
            have, lack = (a_name, b_name) if mod.B is None else (b_name, a_name)
            problems.append(f"{path}: {have} without {lack}")
            continue
        if mod.A.dim() != 2 or mod.B.dim() != 2:
            problems.append(f"{path}: {a_name} {_shape(mod.A)} and {b_name} {_shape(mod.B)} must be matrices")
            continue
        if _checks_targets(cfg) and not _is_targeted(cfg, path):
            untargeted.append(path)
        r = _pattern_value(rank_pattern, path, r_default)
        alpha = _pattern_value(alpha_pattern, path, alpha_default)
        if mod.A.shape[0] != r or mod.B.shape[1] != r:
            problems.append(f"{path}: rank in the weights ({a_name} {_shape(mod.A)}, {b_name} {_shape(mod.B)}) "
                            f"disagrees with the config's r={r}")
            continue
        if mod.B_bias is not None and not lora_bias:
            problems.append(f"{path}: weights hold lora_B.bias but the config has lora_bias=false")
            continue
        keys = _resolve(f"{path}.weight", state_dict)
        if len(keys) != 1:
            unmatched.append(path if not keys else f"{path} (ambiguous: {', '.join(keys)})")
            continue
        key = keys[0]
        if key in claimed:
            problems.append(f"{path} and {claimed[key]} both adapt {key}")
            continue
        claimed[key] = path
        W = state_dict[key]
        transposed = mod.embedding or bool(_CONV1D_KEY.match(key))
        out_f, in_f = mod.B.shape[0], mod.A.shape[1]
        want = (in_f, out_f) if transposed else (out_f, in_f)
        if tuple(W.shape) != want:
            shape_errors.append(f"{path}: {a_name} {_shape(mod.A)}, {b_name} {_shape(mod.B)} give a "
                                f"{list(want)} update, but {key} is {list(W.shape)}")
            continue
        if mod.B_bias is not None:
            bias_key = key[: -len("weight")] + "bias"
            if bias_key not in state_dict:
                problems.append(f"{path}: lora_B.bias given but {target} has no {bias_key}")
                continue
            if tuple(mod.B_bias.shape) != tuple(state_dict[bias_key].shape):
                shape_errors.append(f"{path}: lora_B.bias {_shape(mod.B_bias)}, but {bias_key} is "
                                    f"{list(state_dict[bias_key].shape)}")
                continue
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        plan.append((key, mod, scale, transposed))

    replace_plan: dict[str, Tensor] = {}
    for key in sorted(replacements):
        t = replacements[key]
        found = sorted({k for c in _replacement_candidates(_strip_prefix(key)) for k in _resolve(c, state_dict)})
        if len(found) != 1:
            unmatched.append(key if not found else f"{key} (ambiguous: {', '.join(found)})")
            continue
        k = found[0]
        if tuple(t.shape) != tuple(state_dict[k].shape):
            shape_errors.append(f"{key}: {list(t.shape)}, but {k} is {list(state_dict[k].shape)}")
            continue
        if k in replace_plan:
            problems.append(f"{key}: a second replacement for {k}")
            continue
        replace_plan[k] = t

    msgs = list(problems)
    if unmatched:
        msgs.append(f"adapter modules/tensors that match no weight of {target} ({len(unmatched)}): "
                    f"{', '.join(unmatched)}")
    if shape_errors:
        msgs.append(f"shape mismatches ({len(shape_errors)}; was the adapter trained for another "
                    "Chatterbox variant?):\n    " + "\n    ".join(shape_errors))
    if untargeted:
        msgs.append(f"adapter modules not in the config's target_modules {cfg.get('target_modules')!r} "
                    f"({len(untargeted)}): {', '.join(untargeted)}")
    if msgs:
        raise CheckpointError(f"{where} does not fit {target}:\n  " + "\n  ".join(msgs))

    out = dict(state_dict)
    for k, t in replace_plan.items():
        out[k] = t.to(device=state_dict[k].device, dtype=state_dict[k].dtype)
    with torch.no_grad():
        for key, mod, scale, transposed in plan:
            W = out[key]
            cd = _compute_dtype(W.dtype)
            A = mod.A.to(device=W.device, dtype=cd)
            B = mod.B.to(device=W.device, dtype=cd)
            delta = B @ A
            if transposed:
                delta = delta.T
            out[key] = (W.to(cd) + delta * scale).to(W.dtype)
            if mod.B_bias is not None:
                bias_key = key[: -len("weight")] + "bias"
                b = out[bias_key]
                out[bias_key] = (b.to(cd) + mod.B_bias.to(device=b.device, dtype=cd) * scale).to(b.dtype)
    log.info("merged LoRA adapter %s into %s: %d weights adapted, %d tensors replaced",
             adapter_dir, target, len(plan), len(replace_plan))
    return out
