"""How far voice conversion moves the speaker: sweep ``VC.generate``'s controls and measure.

For every setting in a grid (the product of sweeps over ``chatterbox_rt.vc.VCControls``'
fields), convert the source, then embed the output with two speaker encoders and take cosines::

    output ─ 16 kHz ─┬─ voice encoder (ve.safetensors, T3's) ─┬─ cos to the target (its clips' mean)
                     └─ CAMPPlus (S3Gen's speaker_encoder) ───┘   cos to the source

The *margin* ``cos(target) - cos(source)`` says which speaker the output is closer to; a row's
*shift* is its margin less the default setting's (the reference's output), per encoder, so a
positive shift under both encoders means the setting moves the output toward the target. Two
encoders, because CAMPPlus is also what S3Gen is conditioned on: a setting can please it without
sounding more like the target, and the voice encoder is an independent opinion. Each row also
has the conversion's wall time (everything ``generate`` does but the watermark; the target is
prepared once, outside the timing).

Python::

    from chatterbox_rt import VC
    from chatterbox_rt.vc_eval import load_voice_encoder, sweep
    vc = VC.from_local(ckpt)
    result = sweep(vc, "source.wav", ["alice1.wav", "alice2.wav"],
                   {"prune_tokens": [0, 4, 8], "speaker_strength": [1.0, 1.3]},
                   ve=load_voice_encoder(ckpt), seed=0)
    print(result.table()); result.save_json("sweep.json"); result.plot("sweep.png")

CLI: ``chatterbox-rt vc-eval SOURCE --target CLIP [--target CLIP2 ...] --sweep prune_tokens=0,4,8
--sweep speaker_strength=1.0,1.3 [--json F] [--plot F.png] (--ckpt DIR | --dummy-weights)``.
With dummy weights the numbers are meaningless (random encoders, noise out); the table's format
and the timings are real.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .audio import load_audio, resample
from .models.s3gen.hift import S3GEN_SR
from .models.s3gen.s3gen import S3_SR
from .vc import VC, VCControls

# Controls a sweep may vary, and how a CLI value of each is read.
SWEEPABLE = ("prune_tokens", "speaker_strength", "flow_cfg_rate", "guidance_ramp", "speaker_ramp",
             "pitch_match", "pitch_tolerance", "max_pitch_shift", "post")
VE_FILE_NAMES = ("ve.safetensors", "ve.pt")
# A shift smaller than this (in cosine) is reported as no change: the encoders' own jitter
# between two draws of the same setting is of that order.
SHIFT_EPS = 0.005
RAMP_SEP = ":"


def _parse_value(name: str, text: str):
    text = text.strip()
    low = text.lower()
    if name == "prune_tokens":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--sweep {name}: {text!r} is not an integer") from None
    if name in ("guidance_ramp", "speaker_ramp"):
        if low == "none":
            return None
        parts = text.split(RAMP_SEP)
        if len(parts) != 2:
            raise ValueError(f"--sweep {name}: {text!r} is not START{RAMP_SEP}END (e.g. 1.0{RAMP_SEP}0.5)")
        try:
            return (float(parts[0]), float(parts[1]))
        except ValueError:
            raise ValueError(f"--sweep {name}: {text!r} is not START{RAMP_SEP}END of numbers") from None
    if name == "pitch_match":
        table = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}
        if low not in table:
            raise ValueError(f"--sweep pitch_match: {text!r} is not true/false")
        return table[low]
    if name == "post":
        return None if low == "none" else text
    if name in ("flow_cfg_rate", "pitch_tolerance", "max_pitch_shift") and low == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--sweep {name}: {text!r} is not a number") from None


def parse_sweep(text: str) -> tuple[str, list]:
    """``"prune_tokens=0,4,8"`` -> ``("prune_tokens", [0, 4, 8])``; ramps as ``start:end``
    (``guidance_ramp=1.0:0.5,0.7:0.3``), ``pitch_match=false,true``, ``post=none,clean``."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values.strip():
        raise ValueError(f"--sweep {text!r}: expected NAME=V1,V2,... (e.g. prune_tokens=0,4,8)")
    if name not in SWEEPABLE:
        raise ValueError(f"--sweep: {name!r} is not a voice-conversion control; sweepable: {', '.join(SWEEPABLE)}")
    return name, [_parse_value(name, v) for v in values.split(",")]


def make_grid(sweeps) -> list[VCControls]:
    """Sweeps -> every setting of their product, each checked (``VCControls``: a bad value or a
    bad combination raises here, before any work).

    ``sweeps``: a mapping ``{name: [values]}``, a sequence of ``(name, values)`` pairs (a name
    given twice is an error), or already a sequence of settings (``VCControls`` or dicts)."""
    if isinstance(sweeps, Mapping):
        pairs = list(sweeps.items())
    else:
        sweeps = list(sweeps)
        if sweeps and all(isinstance(s, (VCControls, Mapping)) for s in sweeps):
            return [s if isinstance(s, VCControls) else _controls(s) for s in sweeps]
        pairs = [tuple(p) for p in sweeps]
    names = [n for n, _ in pairs]
    for n in names:
        if n not in SWEEPABLE:
            raise ValueError(f"{n!r} is not a voice-conversion control; sweepable: {', '.join(SWEEPABLE)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"swept more than once: {', '.join(dup)} (give each control's values in one sweep)")
    for n, v in pairs:
        ramp_pair = n.endswith("_ramp") and isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable) or ramp_pair:
            raise ValueError(f"the sweep of {n} must be a list of values, got {v!r}"
                             + (" (a ramp is one value: [(start, end)])" if ramp_pair else ""))
    values = [list(v) for _, v in pairs]
    for n, v in zip(names, values, strict=True):
        if not v:
            raise ValueError(f"the sweep of {n} has no values")
    return [_controls(dict(zip(names, combo, strict=True))) for combo in itertools.product(*values)]


def _controls(setting: Mapping) -> VCControls:
    unknown = sorted(set(setting) - set(SWEEPABLE))
    if unknown:
        raise ValueError(f"unknown control(s) {unknown}; sweepable: {', '.join(SWEEPABLE)}")
    try:
        return VCControls(**setting)
    except (TypeError, ValueError) as e:
        raise ValueError(f"setting {_label(dict(setting))}: {e}") from None


def _label(setting: Mapping) -> str:
    def show(v):
        if isinstance(v, tuple):
            return RAMP_SEP.join(f"{x:g}" for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={show(v)}" for k, v in setting.items()) or "default"


# ----------------------------------------------------------------------------- encoders

def load_voice_encoder(ckpt_dir: Optional[Union[str, Path]] = None, *, dummy_seed: Optional[int] = None,
                       device="cpu"):
    """The voice encoder of a checkpoint directory (``ve.safetensors`` or ``ve.pt``), or with
    ``dummy_seed`` a seeded random one (as ``TTS.from_dummy`` builds it: seed + 2)."""
    from .checkpoint import CheckpointError, init_dummy_conv_, load_into, read_state_dict
    from .models.voice_encoder import VoiceEncoder

    if ckpt_dir is None:
        if dummy_seed is None:
            raise ValueError("give ckpt_dir (with ve.safetensors) or dummy_seed")
        return init_dummy_conv_(VoiceEncoder(), dummy_seed + 2).to(device).eval()
    ckpt_dir = Path(ckpt_dir)
    path = next((ckpt_dir / n for n in VE_FILE_NAMES if (ckpt_dir / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"no voice encoder in {ckpt_dir}: expected {' or '.join(VE_FILE_NAMES)} (vc-eval "
                              f"measures the output's speaker with it)")
    return load_into(VoiceEncoder(), read_state_dict(path), str(path)).to(device).eval()


class SpeakerEmbedder:
    """16 kHz waveforms -> unit speaker embeddings by the voice encoder and by CAMPPlus."""

    def __init__(self, ve, campplus):
        self.ve, self.campplus = ve, campplus

    @torch.inference_mode()
    def __call__(self, wavs16: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """One or more clips of one speaker -> (voice-encoder embedding ``[256]``, CAMPPlus ``[192]``),
        each the clips' mean (the voice encoder's as ``utt_to_spk_embed``), L2-normalised."""
        wavs16 = [np.ascontiguousarray(w, dtype=np.float32) for w in wavs16]
        ve = torch.from_numpy(self.ve.embeds_from_wavs(wavs16, sample_rate=S3_SR, as_spk=True)).float()
        dev = next(self.campplus.parameters()).device
        xv = torch.cat([self.campplus.inference(torch.from_numpy(w)[None].to(dev)).float().cpu() for w in wavs16])
        return F.normalize(ve.reshape(-1), dim=0), F.normalize(xv.mean(dim=0), dim=0)



def _cos(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a[None], b[None])[0])


# ----------------------------------------------------------------------------- the sweep

@dataclasses.dataclass
class SweepRow:
    """One setting's conversion and its speaker cosines (``ve_*``: voice encoder, ``campplus_*``)."""

    setting: dict  # the controls that differ from the defaults ({} for the default)
    vc_seconds: float  # wall time of the conversion
    audio_seconds: float  # the output's length
    ve_target: float
    ve_source: float
    campplus_target: float
    campplus_source: float
    ve_shift: float = 0.0  # margin - the default's margin (filled in by sweep)
    campplus_shift: float = 0.0

    @property
    def label(self) -> str:
        return _label(self.setting)

    @property
    def ve_margin(self) -> float:
        return self.ve_target - self.ve_source

    @property
    def campplus_margin(self) -> float:
        return self.campplus_target - self.campplus_source

    @property
    def verdict(self) -> str:
        """Which way the setting moves the output against the default: both encoders agree, or not."""
        if not self.setting:
            return "baseline"
        up = [s > SHIFT_EPS for s in (self.ve_shift, self.campplus_shift)]
        down = [s < -SHIFT_EPS for s in (self.ve_shift, self.campplus_shift)]
        if all(up):
            return "toward target"
        if all(down):
            return "toward source"
        if any(up) and not any(down):
            return "toward target (one encoder)"
        if any(down) and not any(up):
            return "toward source (one encoder)"
        return "mixed" if any(up) else "no change"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["setting"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.setting.items()}
        d.update(label=self.label, ve_margin=self.ve_margin, campplus_margin=self.campplus_margin,
                 verdict=self.verdict)
        return d


@dataclasses.dataclass
class SweepResult:
    rows: list  # SweepRow, the default setting first
    source: str
    targets: list
    model: str
    seed: Optional[int]
    n_steps: int
    ve_target_source: float  # cosine of the target's and the source's own embeddings (how far apart they start)
    campplus_target_source: float

    @property
    def baseline(self) -> SweepRow:
        return self.rows[0]

    def best(self) -> SweepRow:
        """The row with the largest mean margin over the two encoders."""
        return max(self.rows, key=lambda r: r.ve_margin + r.campplus_margin)

    def table(self) -> str:
        head = ("setting", "VC s", "VE tgt", "VE src", "VE shift", "CAM tgt", "CAM src", "CAM shift", "verdict")
        body = [(r.label, f"{r.vc_seconds:.2f}", f"{r.ve_target:+.3f}", f"{r.ve_source:+.3f}",
                 "" if not r.setting else f"{r.ve_shift:+.3f}", f"{r.campplus_target:+.3f}",
                 f"{r.campplus_source:+.3f}", "" if not r.setting else f"{r.campplus_shift:+.3f}", r.verdict)
                for r in self.rows]
        widths = [max(len(row[c]) for row in (head, *body)) for c in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        lines = [f"vc-eval: {self.source} -> {', '.join(self.targets)} ({self.model}, {self.n_steps} CFM steps, "
                 f"seed {self.seed})",
                 f"target vs source before conversion: VE cos {self.ve_target_source:+.3f}, "
                 f"CAMPPlus cos {self.campplus_target_source:+.3f}",
                 fmt(head), fmt(tuple("-" * w for w in widths)), *(fmt(b) for b in body)]
        best = self.best()
        lines.append(f"closest to the target (VE + CAMPPlus margin): {best.label} "
                     f"(margins VE {best.ve_margin:+.3f}, CAMPPlus {best.campplus_margin:+.3f})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}
        d["rows"] = [r.to_json() for r in self.rows]
        d["best"] = self.best().label
        return d

    def save_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    def plot(self, path: Union[str, Path]) -> Path:
        """A PNG: per setting, the cosines to the target and to the source under each encoder,
        and the VC time (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(f"--plot needs matplotlib (pip install matplotlib): {e}") from None
        labels = [r.label for r in self.rows]
        x = np.arange(len(labels))
        fig, (ax, at) = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(labels) + 2), 7), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
        w = 0.2
        for i, (vals, name) in enumerate((([r.ve_target for r in self.rows], "VE cos target"),
                                          ([r.ve_source for r in self.rows], "VE cos source"),
                                          ([r.campplus_target for r in self.rows], "CAMPPlus cos target"),
                                          ([r.campplus_source for r in self.rows], "CAMPPlus cos source"))):
            ax.bar(x + (i - 1.5) * w, vals, w, label=name)
        ax.set_ylabel("cosine")
        ax.set_title(f"vc-eval: {Path(self.source).name} -> {', '.join(Path(t).name for t in self.targets)}")
        ax.legend(fontsize="small")
        at.bar(x, [r.vc_seconds for r in self.rows], color="grey")
        at.set_ylabel("VC s")
        at.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _describe(clip) -> str:
    return str(clip) if isinstance(clip, (str, Path)) else f"array {tuple(np.shape(clip))}"


def sweep(vc: VC, source, target, grid, *, ve, sr: Optional[int] = None, target_sr: Optional[int] = None,
          seed: Optional[int] = 0, n_steps: Optional[int] = None, warmup: bool = True) -> SweepResult:
    """Convert ``source`` (a clip; ``sr`` with an array) into ``target`` (a clip or a list of clips;
    ``target_sr`` with arrays) for every setting of ``grid`` (see ``make_grid``) and measure each
    output's speaker (module docstring). The default setting is run first (added when the grid
    lacks it); every setting uses ``seed``, so only the controls differ. ``ve``: a
    ``VoiceEncoder`` (``load_voice_encoder``). ``warmup``: one untimed default conversion first,
    so that the first row's time holds no one-off start-up cost."""
    settings = make_grid(grid)
    default = VCControls()
    settings = [default] + [s for s in settings if s != default]
    for s in settings:
        s.check_meanflow(vc.s3gen.meanflow)
    clips = list(target) if isinstance(target, (list, tuple)) else [target]
    if not clips:
        raise ValueError("no target clips: give at least one")
    need_f0 = any(s.pitch_match for s in settings)
    ref = vc.prepare_target(clips, target_sr, f0=need_f0)  # once, outside the timing

    embed = SpeakerEmbedder(ve, vc.s3gen.speaker_encoder)
    src16, _ = load_audio(source, sr, target_sr=S3_SR)
    tgt16 = [load_audio(c, target_sr, target_sr=S3_SR)[0] for c in clips]
    ve_src, cam_src = embed([src16])
    ve_tgt, cam_tgt = embed(tgt16)
    steps = n_steps or vc.s3gen.default_steps

    def convert(controls: VCControls) -> tuple[Tensor, float]:
        t0 = time.perf_counter()
        wav = vc._convert(source, ref, controls, sr=sr, seed=seed, watermark=False, n_steps=steps)
        if vc.device.type == "cuda":
            torch.cuda.synchronize(vc.device)
        return wav, time.perf_counter() - t0

    if warmup:
        convert(default)
    rows = []
    for controls in settings:
        wav, seconds = convert(controls)
        out16 = resample(wav.reshape(-1).numpy(), S3GEN_SR, S3_SR)
        ve_out, cam_out = embed([out16])
        rows.append(SweepRow(setting=controls.changed(), vc_seconds=seconds, audio_seconds=wav.numel() / S3GEN_SR,
                             ve_target=_cos(ve_out, ve_tgt), ve_source=_cos(ve_out, ve_src),
                             campplus_target=_cos(cam_out, cam_tgt), campplus_source=_cos(cam_out, cam_src)))
    base = rows[0]
    for r in rows:
        r.ve_shift = r.ve_margin - base.ve_margin
        r.campplus_shift = r.campplus_margin - base.campplus_margin
    for r in rows:
        for k in ("ve_target", "ve_source", "campplus_target", "campplus_source"):
            if not math.isfinite(getattr(r, k)):
                raise ValueError(f"setting {r.label}: the {k} cosine is not finite (silent output?)")
    return SweepResult(rows=rows, source=_describe(source), targets=[_describe(c) for c in clips],
                       model=vc.source or repr(vc), seed=seed, n_steps=steps,
                       ve_target_source=_cos(ve_tgt, ve_src), campplus_target_source=_cos(cam_tgt, cam_src))


__all__ = ["sweep", "make_grid", "parse_sweep", "load_voice_encoder", "SweepResult", "SweepRow", "SpeakerEmbedder",
           "SWEEPABLE"]
