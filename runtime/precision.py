"""Numeric precision per module: ``chatterbox_rt.PrecisionConfig`` and the ``precision=`` argument.

``TTS.from_local(..., precision=...)`` / ``TTS.from_dummy(..., precision=...)`` (and the CLI's
``--precision``) take one of

* ``"auto"``: the defaults measured for the device (:data:`AUTO`; BENCHMARKS.md, "Precision");
* ``"fp32"``, ``"bf16"``, ``"fp16"``: T3, its KV cache, the flow encoder, the CFM estimator and
  HiFT in that dtype (the voice front ends stay fp32: they run once per voice);
* ``"int8"`` / ``"fp8"``: T3's transformer weights in 8 bits (INT8 weight-only: any device; FP8
  e4m3: Ada/Hopper GPUs), everything else as ``"auto"``;
* a :class:`PrecisionConfig`, field by field.

Whatever the dtype of a module, some ops always run in fp32 (the fp32 islands, kept where the
quality table showed they matter or where a half-precision op does not exist): T3's RMS/layer
norms, softmax inside attention and the sampling chain (logits are fp32); the CFM's Euler grid
and time embedding; HiFT's F0 predictor, its sine source (phase summed in fp32), the source STFT
and the inverse STFT; the front ends' feature extraction (mel, fbank, log-mel).

The legacy ``dtype=`` keeps working: it is ``PrecisionConfig.uniform(dtype)``. Giving both a
``precision`` and a ``dtype`` other than fp32 is an error (they would disagree).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
WEIGHT_MODES = ("int8", "fp8")  # T3's 8-bit weight forms (chatterbox_rt.models.t3.quant)
MODES = ("auto",) + tuple(DTYPES) + WEIGHT_MODES
FIELDS = ("t3_weights", "t3_activations", "kv_cache", "flow_encoder", "cfm", "hift", "frontends")


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """"fp32" / "bf16" / "fp16" for a torch dtype or any accepted spelling; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        for k, v in DTYPES.items():
            if v == dtype:
                return k
        raise ValueError(f"unsupported dtype {dtype}; expected one of torch.float32, torch.bfloat16, torch.float16")
    key = str(dtype).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return key


@dataclass(frozen=True)
class PrecisionConfig:
    """The precision of each module (values "fp32" | "bf16" | "fp16"; torch dtypes are accepted).

    ``t3_weights``: None (dense, in ``t3_activations``' dtype), "int8" (weight-only INT8,
    per-output-channel scales) or "fp8" (e4m3 with per-channel scales, ``torch._scaled_mm``; Ada
    and Hopper GPUs only). ``kv_cache``: None (``t3_activations``) or a dtype: the keys and values
    are stored in it and read back into the activation dtype."""

    t3_weights: Optional[str] = None
    t3_activations: str = "fp32"
    kv_cache: Optional[str] = None
    flow_encoder: str = "fp32"
    cfm: str = "fp32"
    hift: str = "fp32"
    frontends: str = "fp32"

    def __post_init__(self):
        for f in FIELDS:
            v = getattr(self, f)
            if f in ("t3_weights", "kv_cache") and v is None:
                continue
            if f == "t3_weights":
                key = str(v).strip().lower() if not isinstance(v, torch.dtype) else v
                if key in WEIGHT_MODES:
                    object.__setattr__(self, f, key)
                    continue
                try:
                    name = dtype_name(v)
                except ValueError:
                    raise ValueError(f"PrecisionConfig.t3_weights={v!r}: expected None, 'int8', 'fp8' or a dtype "
                                     f"({', '.join(DTYPES)})") from None
                object.__setattr__(self, f, name)
                continue
            try:
                object.__setattr__(self, f, dtype_name(v))
            except ValueError as e:
                raise ValueError(f"PrecisionConfig.{f}: {e}") from None
        if self.t3_weights in DTYPES:
            if self.t3_weights != self.t3_activations:
                raise ValueError(f"PrecisionConfig: dense T3 weights are held in the activation dtype; "
                                 f"t3_weights={self.t3_weights!r} with t3_activations={self.t3_activations!r} "
                                 f"(use t3_weights=None, 'int8' or 'fp8')")
            object.__setattr__(self, "t3_weights", None)

    # ------------------------------------------------------------------ views

    def dtype(self, field: str) -> torch.dtype:
        """The torch dtype of a module field ("kv_cache" resolves None to the activations')."""
        if field == "kv_cache":
            return DTYPES[self.kv_cache or self.t3_activations]
        if field == "t3_weights":
            raise ValueError("t3_weights is a weight form, not a dtype")
        return DTYPES[getattr(self, field)]

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A short label, e.g. "int8 (T3 int8/fp32, KV fp32, flow fp32, CFM fp32, HiFT fp32, front ends fp32)"."""
        t3 = f"{self.t3_weights}/{self.t3_activations}" if self.t3_weights else self.t3_activations
        return (f"T3 {t3}, KV {self.kv_cache or self.t3_activations}, flow {self.flow_encoder}, CFM {self.cfm}, "
                f"HiFT {self.hift}, front ends {self.frontends}")

    @property
    def is_uniform_fp32(self) -> bool:
        return self == PrecisionConfig()

    def with_(self, **changes) -> "PrecisionConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ construction

    @classmethod
    def uniform(cls, dtype: Union[str, torch.dtype]) -> "PrecisionConfig":
        """Every model module in ``dtype`` (front ends fp32): what the legacy ``dtype=`` means."""
        d = dtype_name(dtype)
        return cls(t3_activations=d, flow_encoder=d, cfm=d, hift=d)

    @classmethod
    def auto(cls, device) -> "PrecisionConfig":
        """The measured default for ``device`` (:data:`AUTO`)."""
        kind = torch.device(device).type
        return AUTO.get(kind, AUTO["cpu"])

    @classmethod
    def resolve(cls, precision=None, dtype=None, device="cpu") -> "PrecisionConfig":
        """``precision`` (None, a mode string or a PrecisionConfig) and the legacy ``dtype``
        (None or a dtype) -> one PrecisionConfig for ``device``."""
        legacy = None if dtype is None else dtype_name(dtype)
        if precision is None:
            return cls.uniform(legacy or "fp32")
        if legacy not in (None, "fp32"):
            raise ValueError(f"give either precision= or dtype=, not both (precision={precision!r}, "
                             f"dtype={legacy}); precision=PrecisionConfig(...) sets each module")
        if isinstance(precision, PrecisionConfig):
            config = precision
        elif isinstance(precision, (str, torch.dtype)):
            key = precision if isinstance(precision, torch.dtype) else _ALIASES.get(str(precision).strip().lower(),
                                                                                    str(precision).strip().lower())
            if isinstance(key, torch.dtype) or key in DTYPES:
                config = cls.uniform(key)
            elif key == "auto":
                config = cls.auto(device)
            elif key in WEIGHT_MODES:
                config = replace(cls.auto(device), t3_weights=key)
            else:
                raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(MODES)} "
                                 f"or a chatterbox_rt.PrecisionConfig")
        else:
            raise TypeError(f"precision must be a string ({', '.join(MODES)}) or a PrecisionConfig, "
                            f"got {type(precision).__name__}")
        config.check_device(device)
        return config

    def check_device(self, device) -> None:
        """Refuse, with the reason, a configuration the device cannot run."""
        dev = torch.device(device)
        if self.t3_weights == "fp8":
            from .models.t3.quant import fp8_supported

            why = fp8_supported(dev)
            if why:
                raise ValueError(f"precision: t3_weights='fp8' cannot run here: {why}; use 'int8'")


# The documented quality bound of each mode against fp32 (profiling/precision_quality.py's metrics;
# tests/unit/test_precision.py asserts them; BENCHMARKS.md has the measured table). A mode outside
# its bound is not a default anywhere.
# The front ends stay fp32 in these modes: their embeddings are equal, and the cosine of a vector with
# itself may round to 1 - 2^-53 in float64 (seen at one torch thread), so "equal" is 1 - 1e-12.
FP32_COS = 1.0 - 1e-12
QUALITY_BOUNDS = {
    # T3: logits_rel (largest logit error / largest logit), kl (mean, nats), top1_agree (near-greedy
    # token agreement over the fp32 continuation); S3Gen: mel_rel; HiFT: hift_lsd_db (dB; 0 where
    # HiFT runs fp32 on the same mel); front ends: ve_cos. Set from the full-size English and Nano
    # measurements (BENCHMARKS.md) with a margin; English is the worst case everywhere.
    "bf16": dict(logits_rel=0.04, kl=5e-4, top1_agree=0.85, mel_rel=0.02),
    "fp16": dict(logits_rel=0.006, kl=1e-5, top1_agree=0.95, mel_rel=0.003),
    "int8": dict(logits_rel=0.06, kl=1e-3, top1_agree=0.88, mel_rel=0.0, hift_lsd_db=0.0, ve_cos=FP32_COS),
    "auto (cpu)": dict(logits_rel=0.06, kl=1e-3, top1_agree=0.88, mel_rel=0.02, hift_lsd_db=0.0, ve_cos=FP32_COS),
    "auto (cuda)": dict(logits_rel=0.04, kl=5e-4, top1_agree=0.85, mel_rel=0.02, hift_lsd_db=0.0, ve_cos=FP32_COS),
}

# The measured defaults per device type (BENCHMARKS.md, "Precision": the quality table and the speed
# per mode): the fastest configuration whose every module stays inside its quality bound.
# CPU (2-core AMD EPYC, torch 2.13): INT8 T3 weights decode 2.3-2.9x faster than fp32 (KL 8e-5 to
# 4e-4 nats, 91-97 % near-greedy agreement: the order of bf16's 1e-4 and 88-96 %); the flow encoder
# and the CFM in bf16 run 1.2-1.6x faster (mel within 1 %); HiFT stays fp32 (with random weights its bf16 output cannot be judged: that vocoder turns
# a 0.1 % input change into a different waveform); fp16 is emulated on a CPU (5-50x slower).
# CUDA: no GPU was available to measure speed; bf16 T3, flow and CFM (the bf16 rows of the quality
# table hold, and bf16 is what GPUs serve at), HiFT and the front ends fp32. The GPU check
# (scripts/gpu_check.sh) measures it.
AUTO = {"cpu": PrecisionConfig(t3_weights="int8", flow_encoder="bf16", cfm="bf16"),
        "cuda": PrecisionConfig(t3_activations="bf16", flow_encoder="bf16", cfm="bf16")}


# ---------------------------------------------------------------------------------- applying


def apply_t3(t3, config: PrecisionConfig):
    """Set a T3 (loaded in fp32, or already in the activation dtype when its weights stay dense)
    to ``config``: 8-bit transformer weights quantised from the loaded values, the rest cast to
    ``t3_activations``, the KV cache's dtype. Returns ``t3``."""
    act = config.dtype("t3_activations")
    if config.t3_weights:
        from .models.t3.quant import quantize_t3_

        if t3.dtype != torch.float32:
            raise ValueError("8-bit T3 weights are quantised from the fp32 checkpoint; load T3 in fp32 first")
        quantize_t3_(t3, config.t3_weights)  # the per-channel scales come from the full-precision values
    t3.to(dtype=act)  # 8-bit weights and their scales are integer buffers: left as they are
    kv = config.dtype("kv_cache")
    t3.kv_cache_dtype = None if kv == act else kv
    t3._cache = None  # any cache allocated before is of the old dtype
    t3.precision = config
    return t3


def t3_load_dtype(config: PrecisionConfig) -> torch.dtype:
    """The dtype to load T3's checkpoint in: fp32 when its weights are then quantised."""
    return torch.float32 if config.t3_weights else config.dtype("t3_activations")


def _cast_tree(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return tuple(_cast_tree(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_tree(o, dtype) for o in obj]
    return obj


def _to_own_dtype(module, args):
    p = next(module.parameters(), None)
    return args if p is None else _cast_tree(args, p.dtype)


def _to_fp32(module, args, out):
    return _cast_tree(out, torch.float32)


def cast_frontend(module: "torch.nn.Module", dtype: torch.dtype) -> "torch.nn.Module":
    """Run a voice front end's networks (its direct children with parameters) in ``dtype``; its
    feature extraction (buffers of filterbanks and windows, and the code around the networks)
    stays fp32: each network casts its floating inputs to its dtype and its outputs back to fp32."""
    for child in module.children():
        if next(child.parameters(), None) is None:
            continue
        child.to(dtype=dtype)
        if dtype != torch.float32 and not hasattr(child, "_precision_hooks"):
            child._precision_hooks = (child.register_forward_pre_hook(_to_own_dtype),
                                      child.register_forward_hook(_to_fp32))
    return module
