"""Each precision mode against fp32, with the same weights, seed and noise (the quality table).

    python -m chatterbox_rt.profiling.precision_quality --variant nano [--steps 200] [--json out.json]

For every mode (``--modes``, default fp32-relative bf16, fp16, int8 and the per-module
configurations of :data:`MODES`) the fp32 model and the mode's model are built from the same
seeded weights, then:

* **T3**, teacher-forced over the fp32 model's own greedy continuation of ``--steps`` tokens
  (conditional row, no sampling): ``logits_max_err`` (largest absolute difference over every
  step and row), ``logits_rel`` (that over the largest fp32 logit magnitude), ``kl`` (mean
  KL(fp32 || mode) of the softmax, nats) and ``top1_agree`` (the share of steps whose argmax is
  the same: the near-greedy token agreement); ``greedy_prefix``: how many tokens free-running
  greedy decoding keeps identical before the first difference.
* **S3Gen flow + CFM**: one utterance of ``--s3-tokens`` random speech tokens with the same CFM
  noise: ``mel_rel`` = ||mel - mel_fp32|| / ||mel_fp32||.
* **HiFT** (the same fp32 mel into both vocoders, the same source noise) and **end to end**
  (each model's own mel): ``lsd_db`` = the log-spectral distance of the waveforms (mean over
  frames of the RMS over frequency of the dB difference of their power spectra, floored 80 dB
  below the peak).
* **Front ends** (one random 8 s clip): ``ve_cos`` (voice-encoder speaker embedding cosine),
  ``xvec_cos`` (CAM++ x-vector cosine), ``s3tok_agree`` (share of equal S3 tokenizer tokens).

Weights are seeded random (no checkpoint can be downloaded here), so the figures measure how
each mode's rounding propagates through the real architecture at real shapes, not the audio
quality of trained weights. The random HiFT is tamed as in ``stream_quality`` (voiced,
band-limited, unclipped) so that its spectra are meaningful.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..precision import PrecisionConfig, apply_t3, cast_frontend
from ..tts import TTS
from .stream_quality import tame_dummy_hift_

# The modes of the table (name -> PrecisionConfig); "fp32" is the baseline.
MODES = {
    "bf16": PrecisionConfig.uniform("bf16"),
    "fp16": PrecisionConfig.uniform("fp16"),
    "int8": PrecisionConfig(t3_weights="int8"),
    "auto (cpu)": PrecisionConfig.auto("cpu"),
    "auto (cuda)": PrecisionConfig.auto("cuda"),
    "t3 bf16": PrecisionConfig(t3_activations="bf16"),
    "kv bf16": PrecisionConfig(kv_cache="bf16"),  # fp32 activations, the cache stored in bf16
    "kv fp16": PrecisionConfig(kv_cache="fp16"),
    "t3 fp16": PrecisionConfig(t3_activations="fp16"),
    "flow bf16": PrecisionConfig(flow_encoder="bf16"),
    "cfm bf16": PrecisionConfig(cfm="bf16"),
    "cfm fp16": PrecisionConfig(cfm="fp16"),
    "hift bf16": PrecisionConfig(hift="bf16"),
    "hift fp16": PrecisionConfig(hift="fp16"),
    "front ends bf16": PrecisionConfig(frontends="bf16"),
}


SENSITIVITY = 1e-3
SENSITIVITY_ROW = "fp32, mel +0.1 % noise"
HIGHER_IS_BETTER = ("top1_agree", "greedy_prefix", "ve_cos", "xvec_cos", "s3tok_agree")


def build(variant: str, config: PrecisionConfig, seed: int = 0, device="cpu", **t3_overrides) -> TTS:
    """The seeded dummy model in fp32 (HiFT tamed), then set to ``config`` the way ``from_dummy`` does."""
    tts = TTS.from_dummy(variant, seed=seed, device=device, precision="fp32", **t3_overrides)
    tame_dummy_hift_(tts.s3gen)
    if config != PrecisionConfig():
        apply_t3(tts.t3, config)
        tts.s3gen.to_precision(device, config=config)
        cast_frontend(tts.ve, config.dtype("frontends"))
        tts.precision, tts.dtype = config, tts.t3.dtype
    return tts


# ------------------------------------------------------------------------------------- T3


@torch.inference_mode()
def t3_logits(tts: TTS, voice, text: str, forced: Optional[Tensor], steps: int) -> tuple[Tensor, Tensor]:
    """Conditional-row speech logits ``[steps, V]`` (fp32) over ``forced`` tokens (None: greedy,
    the model's own argmax) -> (logits, the tokens fed)."""
    t3 = tts.t3
    ids = tts.text_tokens(text)
    embeds, _ = t3.prompt_embeds(voice.t3, ids, cfg=False)
    B, P, _ = embeds.shape
    logits = t3.prefill(embeds, max_len=P + steps + 1).float()
    out, fed = [logits[0]], []
    dev = t3.device
    pos = torch.full((B,), P, dtype=torch.long, device=dev)
    speech_pos = torch.ones(B, dtype=torch.long, device=dev) if t3.config.learned_pos_emb else None
    for i in range(steps - 1):
        tok = forced[i] if forced is not None else int(out[-1].argmax())
        fed.append(int(tok))
        logits = t3.decode_step(torch.tensor([int(tok)], device=dev), pos, speech_pos, kv_len=P + i + 1).float()
        pos += 1
        if speech_pos is not None:
            speech_pos += 1
        out.append(logits[0])
    fed.append(int(out[-1].argmax()) if forced is None else int(forced[steps - 1]))
    return torch.stack(out).cpu(), torch.tensor(fed)


def t3_metrics(ref: Tensor, got: Tensor) -> dict:
    d = (got - ref).abs()
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return dict(logits_max_err=float(d.max()), logits_rel=float(d.max() / ref.abs().max()),
                kl=float(kl.mean()), top1_agree=float((ref.argmax(-1) == got.argmax(-1)).double().mean()))


def greedy_prefix(a: Tensor, b: Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n


# ---------------------------------------------------------------------------------- S3Gen


def lsd_db(ref: Tensor, got: Tensor, n_fft: int = 1024, hop: int = 256, floor_db: float = -80.0) -> float:
    """Log-spectral distance in dB of ``got`` from ``ref`` (waveforms ``[N]``): power spectra floored
    at ``floor_db`` below the reference's peak bin, so bins silent in both count as equal."""
    win = torch.hann_window(n_fft, dtype=torch.float64)
    spec = [torch.stft(x.double().reshape(-1), n_fft, hop, window=win, return_complex=True).abs().pow(2)
            for x in (ref, got)]
    floor = float(spec[0].max()) * 10 ** (floor_db / 10)
    d = 10 * torch.log10((spec[0] + floor) / (spec[1] + floor))
    return float(d.pow(2).mean(0).sqrt().mean())


@torch.inference_mode()
def s3gen_outputs(tts: TTS, voice, tokens: Tensor, noise: Tensor, seed: int, mel_in: Optional[Tensor] = None):
    def gen():
        return torch.Generator(device=tts.device).manual_seed(seed)

    mel = tts.s3gen_mel(tokens, voice, noise=noise).float()
    wav = tts.s3gen_wav(mel, generator=gen()).float()[0].cpu()
    hift_wav = None
    if mel_in is not None:
        hift_wav = tts.s3gen_wav(mel_in.to(tts.device), generator=gen()).float()[0].cpu()
    return mel.cpu(), wav, hift_wav


# ------------------------------------------------------------------------------ front ends


@torch.inference_mode()
def frontend_outputs(tts: TTS, clip: np.ndarray):
    from ..audio import resample

    wav16 = resample(clip, 24000, 16000)
    ve = torch.from_numpy(tts.ve.embeds_from_wavs([wav16], sample_rate=16000)).float().reshape(-1)
    gen = tts.s3gen.embed_ref(clip)
    return ve, gen["embedding"].float().reshape(-1).cpu(), gen["prompt_token"].reshape(-1).cpu()


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# ------------------------------------------------------------------------------------ all


def measure(variant: str = "nano", modes=None, *, steps: int = 200, s3_tokens: int = 100, seed: int = 0,
            text: str = "The quick brown fox jumps over the lazy dog, twice.", clip_seconds: float = 8.0,
            parts=("t3", "s3gen", "frontends"), device="cpu", **t3_overrides) -> dict:
    """The quality table for ``modes`` (names of :data:`MODES`, or name -> PrecisionConfig) -> {mode: metrics}."""
    if modes is None:
        modes = MODES
    elif not isinstance(modes, dict):
        modes = {m: MODES[m] for m in modes}
    base = build(variant, PrecisionConfig(), seed, device, **t3_overrides)
    voice = base.builtin_voice
    g = torch.Generator().manual_seed(seed + 7)
    tokens = torch.randint(0, 6561, (s3_tokens,), generator=g)
    noise = torch.randn(1, 80, 2 * (s3_tokens + 400), generator=g)
    clip = (0.1 * torch.randn(int(clip_seconds * 24000), generator=g)).numpy()
    ref = {}
    if "t3" in parts:
        ref["logits"], ref["tokens"] = t3_logits(base, voice, text, None, steps)
    table = {}
    if "s3gen" in parts:
        ref["mel"], ref["wav"], _ = s3gen_outputs(base, voice, tokens, noise, seed)
        # How much the vocoder alone amplifies a small change of its input (random weights are
        # chaotic here; trained ones are not): fp32 HiFT on the fp32 mel times (1 + 1e-3 noise).
        bumped = ref["mel"] * (1 + SENSITIVITY * torch.randn(ref["mel"].shape, generator=g))
        _, _, w = s3gen_outputs(base, voice, tokens, noise, seed, mel_in=bumped)
        table[SENSITIVITY_ROW] = {"config": "fp32, the fp32 mel perturbed by 1e-3 (relative)",
                                  "mel_rel": float((bumped - ref["mel"]).norm() / ref["mel"].norm()),
                                  "hift_lsd_db": lsd_db(ref["wav"], w)}
    if "frontends" in parts:
        ref["fe"] = frontend_outputs(base, clip)
    del base
    for name, config in modes.items():
        tts = build(variant, config, seed, device, **t3_overrides)
        row = {"config": config.describe()}
        if "t3" in parts:
            logits, _ = t3_logits(tts, voice, text, ref["tokens"], steps)
            row.update(t3_metrics(ref["logits"], logits))
            _, own = t3_logits(tts, voice, text, None, steps)
            row["greedy_prefix"] = greedy_prefix(ref["tokens"], own)
        if "s3gen" in parts:
            mel, wav, hift_wav = s3gen_outputs(tts, voice, tokens, noise, seed, mel_in=ref["mel"])
            row["mel_rel"] = float((mel - ref["mel"]).norm() / ref["mel"].norm())
            row["hift_lsd_db"] = lsd_db(ref["wav"], hift_wav)
            row["e2e_lsd_db"] = lsd_db(ref["wav"], wav)
        if "frontends" in parts:
            ve, xv, tok = frontend_outputs(tts, clip)
            row["ve_cos"] = cosine(ref["fe"][0], ve)
            row["xvec_cos"] = cosine(ref["fe"][1], xv)
            n = min(len(tok), len(ref["fe"][2]))
            row["s3tok_agree"] = float((tok[:n] == ref["fe"][2][:n]).double().mean())
        table[name] = row
        del tts
    return table


COLUMNS = ("logits_max_err", "logits_rel", "kl", "top1_agree", "greedy_prefix", "mel_rel", "hift_lsd_db",
           "e2e_lsd_db", "ve_cos", "xvec_cos", "s3tok_agree")


def markdown(table: dict) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in table.values())]
    lines = ["| mode | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in table.items():
        cells = []
        for c in cols:
            v = row.get(c)
            if v is None:
                cells.append("")
            elif isinstance(v, int):
                cells.append(str(v))
            elif c.endswith("_cos"):
                cells.append(f"{v:.6f}")
            else:
                cells.append(f"{v:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="nano")
    p.add_argument("--modes", default=None, help="comma-separated names of MODES (default: all)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--s3-tokens", type=int, default=100)
    p.add_argument("--parts", default="t3,s3gen,frontends")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    modes = None if a.modes is None else [m.strip() for m in a.modes.split(",")]
    t0 = time.time()
    table = measure(a.variant, modes, steps=a.steps, s3_tokens=a.s3_tokens, seed=a.seed,
                    parts=tuple(a.parts.split(",")), device=a.device)
    print(f"variant {a.variant}, {a.steps} T3 steps, {a.s3_tokens} S3Gen tokens, seed {a.seed}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads, "
          f"{time.time() - t0:.0f} s")
    print(markdown(table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(variant=a.variant, steps=a.steps, s3_tokens=a.s3_tokens, seed=a.seed, table=table), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
