"""The on-device multilingual EOS control against the reference's AlignmentStreamAnalyzer.

Both are fed the same attention maps, logits and tokens, step by step, through scenarios that
reach every branch: EOS suppression, false start, completion, long tail, alignment repetition
and token repetition. Outputs must be identical.
"""
import types

import pytest
import torch
from torch import nn

from _t3_pairs import build_pair, cond_tensors, our_cond, ref_cond, text_tokens
from chatterbox_rt.models.t3.alignment import AlignmentController
from chatterbox_rt.models.t3.config import ALIGNMENT_HEADS, STOP_SPEECH_TOKEN

V = 8194
BOS = 6561
I, J = 7, 27  # text columns [I, J): S = 20
T0 = J + 2  # conditioning + text + the two start-of-speech rows
STEPS = 70
# text positions whose successive differences straddle the reference's continuity window
JUMPS = [6, 13, 2, 3, 10, 9, 5, 6, 11, 18]


def scenario(kind: str, seed: int):
    """Per-step peak text column (or None for diffuse attention) and the sampled tokens."""
    g = torch.Generator().manual_seed(seed)
    S = J - I
    peaks, tokens = [], []
    for k in range(STEPS):
        if kind == "long_tail":  # walk to the end, then stay on the last columns
            peak = min(k // 2, S - 1)
        elif kind == "repeat_text":  # walk to the end, then jump back to the start
            peak = min(k // 2, S - 1) if k < 2 * S + 4 else (k % 6)
        elif kind == "jumps":  # deltas at and around the accepted range (-4, 7), then a tail
            peak = k // 3 if k < 20 else (JUMPS[k - 20] if k - 20 < len(JUMPS) else S - 3)
        elif kind == "diffuse":
            peak = None
        else:  # "random": erratic, with jumps
            peak = int(torch.randint(0, S, (1,), generator=g))
        peaks.append(peak)
        distinct = kind != "token_repeat" or k < 9
        tokens.append(int(torch.randint(0, 6561, (1,), generator=g)) if distinct else 42)
    return peaks, tokens


def attention(rows: int, cols: int, peak, g) -> torch.Tensor:
    """[3, rows, cols] row-stochastic maps with mass on text column I + peak."""
    a = torch.rand(3, rows, cols, generator=g)
    if peak is not None:
        a[..., I + peak] += 60.0 + 40.0 * torch.rand(3, rows, generator=g)
    return a / a.sum(-1, keepdim=True)


def ref_analyzer(ref):
    from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

    layers = [types.SimpleNamespace(self_attn=nn.Identity()) for _ in range(14)]
    tfmr = types.SimpleNamespace(layers=layers)
    return AlignmentStreamAnalyzer(tfmr, None, text_tokens_slice=(I, J), alignment_layer_idx=9,
                                   eos_idx=STOP_SPEECH_TOKEN)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["long_tail", "repeat_text", "token_repeat", "jumps", "diffuse", "random"])
@pytest.mark.parametrize("seed", [0, 1])
def test_alignment_controller_matches_reference(ref, kind, seed):
    peaks, tokens = scenario(kind, seed)
    g = torch.Generator().manual_seed(100 + seed)
    theirs = ref_analyzer(ref)
    ours = AlignmentController(I, J, STEPS, STOP_SPEECH_TOKEN, torch.device("cpu"))
    forced = suppressed = 0
    for k in range(STEPS):
        attn = attention(T0, T0, peaks[k], g) if k == 0 else attention(1, T0 + k, peaks[k], g)
        logits = torch.randn(1, V, generator=g)
        theirs.last_aligned_attns = [attn[h] for h in range(len(ALIGNMENT_HEADS))]
        last = BOS if k == 0 else tokens[k - 1]
        want = theirs.step(logits.clone(), next_token=last)
        ours_attn = attn[:, J:] if k == 0 else attn
        prev = torch.tensor(tokens[k - 2:k]) if k >= 2 else None
        got = ours.step(ours_attn, logits.clone(), prev)
        assert torch.equal(got, want), f"{kind} step {k}: logits differ"
        forced += int(want[0, STOP_SPEECH_TOKEN] == 2 ** 15)
        suppressed += int(want[0, STOP_SPEECH_TOKEN] == -2 ** 15)
    if kind in ("long_tail", "repeat_text", "token_repeat", "jumps"):
        assert forced > 0, f"scenario {kind} never forced EOS: it does not test what it claims"
    if kind in ("long_tail", "repeat_text"):
        assert suppressed > 0


@pytest.mark.parity
def test_multilingual_forced_eos_stops_like_reference(ref):
    """Without a repetition penalty, random weights repeat a token quickly: both sides must force
    EOS at the same step through the full generate loop."""
    from test_t3_parity import NEAR_GREEDY

    ref_model, ours = build_pair(ref, "multilingual", reduced=True, seed=3)
    tensors = cond_tensors(ours.config, seed=3)
    text = text_tokens(ours.config, n=12, seed=3)
    with torch.inference_mode():
        out = ref_model.inference(t3_cond=ref_cond(ref, tensors), text_tokens=torch.stack([text, text]),
                                  max_new_tokens=48, temperature=NEAR_GREEDY, cfg_weight=0.5,
                                  repetition_penalty=1.0, min_p=0.05, top_p=1.0)[0]
        got = ours.generate(our_cond(tensors), text, max_new_tokens=48, temperature=NEAR_GREEDY,
                            repetition_penalty=1.0)
    assert out[-1].item() == STOP_SPEECH_TOKEN, "reference did not stop early: pick another seed"
    assert got.tolist() == out[:-1].tolist()
