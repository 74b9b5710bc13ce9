"""How streamed S3Gen audio differs from decoding the whole utterance at once (``engine/stream.py``).

    python -m chatterbox_rt.profiling.stream_quality --variant chatterbox --tokens 250 \\
        --chunk-tokens 25 --first-chunk-tokens 10 [--json out.json]

One request of ``--tokens`` random speech tokens and a random voice (``--prompt-seconds`` of
prompt) goes through ``S3GenStream`` the way the engine feeds it: a push after the first
``--first-chunk-tokens`` tokens, then every ``--chunk-tokens``, then a final push. The same
tokens are decoded at once with the same CFM noise buffer (``whole_utterance``). Printed:

* per chunk: its frames, ``mel_rel`` = ||chunk mel - whole mel|| / ||whole mel|| over the frames
  the chunk emitted (the flow's price: a chunk is decoded without the tokens after it);
* per join (where two HiFT pieces meet): ``step_ratio`` = the largest sample-to-sample step in
  the join's window (the cross-fade frames and 2 frames either side) over the largest step
  anywhere else in the stream's output (a click would show as a ratio well above 1); and
  ``seam_dev`` = the largest deviation there from a one-pass vocode, with the flow's part taken
  out: the stream is re-run on prefixes of the whole mel, noise-free, and compared with one HiFT
  pass over that mel driven by the stream's own excitation, relative to the peak;
* a summary line (max and mean of each).

Weights are seeded random at full size (``--s3gen PATH`` loads a real ``s3gen*.safetensors``).
Random HiFT weights give clipped noise at the Nyquist rate (every step is the largest possible,
so every ratio is 1) and near-zero F0 (the harmonic source is silent). Unless ``--raw-hift``,
the dummy vocoder is therefore "tamed" first (``tame_dummy_hift_``): F0 scaled into the voiced
range and the magnitude bins above 3 kHz switched off, so the waveform is unclipped, voiced and
band-limited and a discontinuity can stand out. Dummy figures show the mechanism, not the
quality of real weights.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from typing import List, Optional, Sequence

import torch
from torch import Tensor

JOIN_MARGIN_FRAMES = 2  # frames either side of a cross-fade that count as "at the join"
TAME_F0_GAIN = 400.0  # random F0 heads give ~0.3 Hz; x400 puts it at ~100-150 Hz (voiced)
TAME_MAG_GAIN = 0.5  # scales the log-magnitude head's weights: a narrower spread of exp(x), no clipping
TAME_MAG_BIAS = (-1.0, -2.5)  # log-magnitude biases of bins 0-1 (0 and 1.5 kHz)
TAME_MAG_OFF = -30.0  # log-magnitude bias that switches bins 2-8 (3-12 kHz) off


@torch.no_grad()
def tame_dummy_hift_(s3gen) -> None:
    """Make a random-weight HiFT give a voiced, band-limited, unclipped waveform (in place)."""
    hift = s3gen.mel2wav
    hift.f0_predictor.classifier.weight.mul_(TAME_F0_GAIN)
    n = hift.config.n_freq
    hift.conv_post.weight[:n].mul_(TAME_MAG_GAIN)
    bias = torch.full((n,), TAME_MAG_OFF)
    bias[: len(TAME_MAG_BIAS)] = torch.tensor(TAME_MAG_BIAS)
    hift.conv_post.bias[:n] = bias.to(hift.conv_post.bias)


def push_schedule(n_tokens: int, chunk_tokens: int, first_chunk_tokens: int) -> List[int]:
    """Token counts at the non-final pushes: the first chunk, then every ``chunk_tokens``."""
    cuts, n = [], first_chunk_tokens
    while n < n_tokens:
        cuts.append(n)
        n += chunk_tokens
    return cuts


def run_stream(stream, tokens: Tensor, cuts: Sequence[int]) -> tuple[List[Tensor], List[int]]:
    """Push ``tokens[:c]`` for each cut, then all of them as final -> (chunks, frame at each chunk's end)."""
    chunks, ends = [], []
    for c in list(cuts) + [None]:
        w = stream.push(tokens if c is None else tokens[:c], final=c is None)
        if w.numel():
            chunks.append(w)
            ends.append(stream.frames_emitted)
    return chunks, ends


def join_windows(joins: Sequence[int], crossfade: int, hop: int, n: int) -> List[tuple[int, int]]:
    """Sample ranges [lo, hi) around each join (frame where a piece starts emitting)."""
    return [(max(0, (j - JOIN_MARGIN_FRAMES) * hop), min(n, (j + crossfade + JOIN_MARGIN_FRAMES) * hop))
            for j in joins]


def step_ratios(wav: Tensor, windows: Sequence[tuple[int, int]]) -> tuple[List[float], float]:
    """Largest |x[n+1] - x[n]| in each window over the largest outside all windows -> (ratios, that max)."""
    d = wav.diff().abs()
    away = torch.ones_like(d, dtype=torch.bool)
    for lo, hi in windows:
        away[lo: max(lo, hi - 1)] = False
    ref = float(d[away].max()) if bool(away.any()) else float(d.max())
    return [float(d[lo: max(lo + 1, hi - 1)].max()) / max(ref, 1e-12) for lo, hi in windows], ref


def mel_errors(stream_mels: Sequence[Tensor], whole: Tensor) -> List[float]:
    """Relative error of each chunk's mel against the whole-utterance mel over the same frames."""
    out, f = [], 0
    for m in stream_mels:
        ref = whole[:, f: f + m.shape[-1]].float().cpu()
        out.append(float((m.cpu() - ref).norm() / ref.norm().clamp_min(1e-12)))
        f += m.shape[-1]
    return out


def seam_deviation(s3gen, ref, mel: Tensor, tokens: Tensor, cuts: Sequence[int], **stream_kw) -> List[float]:
    """HiFT's part of the join error: stream prefixes of a fixed mel ``[80, M]`` (noise-free) and
    compare with one pass over it driven by the stream's own excitation -> per join, max |dev| / peak."""
    from ..engine.stream import S3GenStream
    from ..models.s3gen.hift import trim_fade

    class _FixedMel(S3GenStream):
        def _flow(self, tokens, finalize):  # the whole mel's prefix instead of a re-decode
            return mel[None, :, : self.frames_available(tokens.shape[0], finalize)]

    st = _FixedMel(s3gen, ref, noise_free=True, keep_source=True, **stream_kw)
    chunks, ends = run_stream(st, tokens, cuts)
    out = torch.cat(chunks)
    src = torch.cat(st.chunk_sources)[None, None].to(s3gen.device, s3gen.mel2wav.conv_pre.weight.dtype)
    with torch.inference_mode():
        one = trim_fade(s3gen.mel2wav.decode(mel[None].to(src), src))[0].float().cpu()
    peak = float(one.abs().max())
    dev = (out - one).abs()
    wins = join_windows(ends[:-1], st.X, st.hop, out.shape[0])
    # The whole left reach of a join: the previous piece's right edge as well as the cross-fade.
    wins = [(max(0, lo - (st.R + st.X) * st.hop), hi) for lo, hi in wins]
    return [float(dev[lo:hi].max()) / peak for lo, hi in wins]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ..engine.stream import (CONTEXT_FRAMES, CROSSFADE_FRAMES, HOLDBACK_FRAMES, S3GenStream, noise_buffer,
                                 whole_utterance)
    from ..models.s3gen.s3gen import S3Gen
    from ..tts import dummy_voice

    p = argparse.ArgumentParser(prog="python -m chatterbox_rt.profiling.stream_quality", description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["chatterbox", "turbo"], default="chatterbox",
                   help="chatterbox: 10-step CFG CFM; turbo: 2-step meanflow")
    p.add_argument("--tokens", type=int, default=250)
    p.add_argument("--chunk-tokens", type=int, default=25)
    p.add_argument("--first-chunk-tokens", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="CFM steps (default: the variant's)")
    p.add_argument("--prompt-seconds", type=float, default=4.0, help="length of the random voice's prompt")
    p.add_argument("--crossfade-frames", type=int, default=CROSSFADE_FRAMES)
    p.add_argument("--context-frames", type=int, default=CONTEXT_FRAMES)
    p.add_argument("--holdback-frames", type=int, default=HOLDBACK_FRAMES)
    p.add_argument("--no-mel-blend", action="store_true")
    p.add_argument("--raw-hift", action="store_true", help="keep the random vocoder as it is (see the docstring)")
    p.add_argument("--s3gen", default=None, help="a real s3gen*.safetensors instead of dummy weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the figures to this path")
    a = p.parse_args(argv)

    meanflow = a.variant == "turbo"
    torch.manual_seed(a.seed)
    if a.s3gen:
        s3gen = S3Gen.from_file(a.s3gen, meanflow=meanflow, device=a.device)
    else:
        s3gen = S3Gen.from_dummy(meanflow=meanflow, seed=a.seed, device=a.device)
        if not a.raw_hift:
            tame_dummy_hift_(s3gen)
    ref = dummy_voice(10, seed=a.seed + 1, prompt_seconds=a.prompt_seconds).gen
    g = torch.Generator().manual_seed(a.seed + 2)
    tokens = torch.randint(0, 6561, (a.tokens,), generator=g)
    noise = noise_buffer(s3gen, ref, a.tokens, generator=g)
    kw = dict(crossfade_frames=a.crossfade_frames, context_frames=a.context_frames,
              holdback_frames=a.holdback_frames, mel_blend=not a.no_mel_blend)
    cuts = push_schedule(a.tokens, a.chunk_tokens, a.first_chunk_tokens)

    t0 = time.perf_counter()
    st = S3GenStream(s3gen, ref, n_steps=a.steps, noise=noise, max_tokens=a.tokens,
                     generator=torch.Generator(device=a.device).manual_seed(a.seed + 3), **kw)
    chunks, ends = run_stream(st, tokens, cuts)
    t_stream = time.perf_counter() - t0
    t0 = time.perf_counter()
    mel, wav_whole = whole_utterance(s3gen, ref, tokens, n_steps=a.steps, noise=noise)
    t_whole = time.perf_counter() - t0
    out = torch.cat(chunks)
    assert out.shape == wav_whole.shape, (out.shape, wav_whole.shape)

    rel = mel_errors(st.chunk_mels, mel)
    joins = ends[:-1]
    wins = join_windows(joins, st.X, st.hop, out.shape[0])
    ratios, away = step_ratios(out, wins)
    seam = seam_deviation(s3gen, ref, mel, tokens, cuts, **kw)
    _, away_whole = step_ratios(wav_whole, wins)

    print(f"# {a.variant}: {a.tokens} tokens, pushes at {cuts[:3]}{'...' if len(cuts) > 3 else ''} + final; "
          f"{'real weights' if a.s3gen else 'dummy weights' + ('' if a.raw_hift else ', tamed HiFT')}; "
          f"X={st.X} C={st.C} R={st.R} mel_blend={st.mel_blend}; {st.n_steps} CFM steps")
    print(f"# stream {t_stream:.1f} s ({len(cuts) + 1} pushes), whole {t_whole:.1f} s; "
          f"largest step away from joins {away:.4f} (whole-utterance output: {away_whole:.4f}), peak {float(out.abs().max()):.3f}")
    print(f"{'chunk':>5} {'frames':>11} {'samples':>8} {'mel_rel':>8} | {'join@frame':>10} {'step_ratio':>10} {'seam_dev':>8}")
    start = 0
    for i, (c, e) in enumerate(zip(chunks, ends, strict=True)):
        line = f"{i:>5} {f'{start}-{e}':>11} {c.numel():>8} {rel[i]:>8.4f} |"
        if i < len(joins):
            line += f" {joins[i]:>10} {ratios[i]:>10.3f} {seam[i]:>8.4f}"
        print(line)
        start = e

    def stats(x):
        return (max(x), sum(x) / len(x)) if x else (math.nan, math.nan)

    summary = dict(mel_rel_max=stats(rel)[0], mel_rel_mean=stats(rel)[1],
                   mel_rel_after_first_max=stats(rel[1:])[0],
                   step_ratio_max=stats(ratios)[0], step_ratio_mean=stats(ratios)[1],
                   seam_dev_max=stats(seam)[0], seam_dev_mean=stats(seam)[1])
    print(f"summary: {len(chunks)} chunks, {len(joins)} joins, total {out.numel()} samples (= whole); "
          f"mel_rel max {summary['mel_rel_max']:.4f} mean {summary['mel_rel_mean']:.4f} "
          f"(after the first chunk max {summary['mel_rel_after_first_max']:.4f}); "
          f"step_ratio max {summary['step_ratio_max']:.3f} mean {summary['step_ratio_mean']:.3f}; "
          f"seam_dev max {summary['seam_dev_max']:.4f} mean {summary['seam_dev_mean']:.4f}")
    result = dict(config=dict(vars(a), cuts=cuts, n_steps=st.n_steps, crossfade_frames=st.X, context_frames=st.C,
                              holdback_frames=st.R, torch=torch.__version__, python=platform.python_version()),
                  chunks=[dict(frames=[s, e], samples=c.numel(), mel_rel=r)
                          for s, e, c, r in zip([0] + ends[:-1], ends, chunks, rel, strict=True)],
                  joins=[dict(frame=j, step_ratio=r, seam_dev=d) for j, r, d in zip(joins, ratios, seam, strict=True)],
                  away_step=away, away_step_whole=away_whole, stream_s=t_stream, whole_s=t_whole, summary=summary)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
