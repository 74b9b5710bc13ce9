"""T3 parity with the reference (chatterbox-tts 0.1.7) for every variant.

(a) prefill logits within 1e-4 (fp32), (b) identical tokens for 48 near-greedy steps
(temperature 1e-5), (c) identical processed probabilities for the same logits and history.
Reduced depth everywhere; (a) and (b) also once per variant at full size.
"""
import pytest
import torch

from _t3_pairs import (build_pair, cond_tensors, our_cond, our_prefill_logits, ref_cond, ref_prefill_logits,
                       text_tokens)
from chatterbox_rt.models.t3 import T3Config
from chatterbox_rt.models.t3.sampling import SamplingParams, cfg_combine, process_gpt, process_llama

VARIANTS = ["chatterbox", "multilingual", "turbo", "nano"]
PREFILL_ATOL = 1e-4
GREEDY_STEPS = 48
NEAR_GREEDY = 1e-5


def report(a, b, what):
    diff = (a - b).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return f"{what}: max abs error {diff.max().item():.3g} at {idx} (ours {a[idx].item():.6g}, ref {b[idx].item():.6g})"


def ref_generate(ref_model, cond, text, steps):
    cfg_defaults = {"chatterbox": 1.2, "multilingual": 2.0}
    if ref_model.is_gpt:
        out = ref_model.inference_turbo(cond, text[None], temperature=NEAR_GREEDY, top_k=1000, top_p=0.95,
                                        repetition_penalty=1.2, max_gen_len=steps - 1)
        return out[0]
    variant = "multilingual" if ref_model.hp.is_multilingual else "chatterbox"
    out = ref_model.inference(t3_cond=cond, text_tokens=torch.stack([text, text]), max_new_tokens=steps,
                              temperature=NEAR_GREEDY, cfg_weight=0.5, repetition_penalty=cfg_defaults[variant],
                              min_p=0.05, top_p=1.0)
    tokens = out[0]
    return tokens[tokens != ref_model.hp.stop_speech_token]


def _check_prefill(ref, variant, reduced):
    ref_model, ours = build_pair(ref, variant, reduced=reduced, seed=1)
    cfg = ours.config
    tensors = cond_tensors(cfg, seed=1)
    text = text_tokens(cfg, n=30, seed=1)
    with torch.inference_mode():
        want = ref_prefill_logits(ref_model, ref_cond(ref, tensors), text)
        got = our_prefill_logits(ours, tensors, text)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= PREFILL_ATOL, report(got, want, f"{variant} prefill logits")
    return ref_model, ours, tensors, text


def _check_greedy(ref, variant, ref_model, ours, tensors, text):
    with torch.inference_mode():
        want = ref_generate(ref_model, ref_cond(ref, tensors), text, GREEDY_STEPS)
        got = ours.generate(our_cond(tensors), text, max_new_tokens=GREEDY_STEPS, temperature=NEAR_GREEDY,
                            generator=torch.Generator().manual_seed(0))
    assert got.tolist() == want.tolist(), f"{variant}: ours {got.tolist()}\n ref {want.tolist()}"
    return got


@pytest.mark.parity
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_greedy_reduced(ref, variant):
    ref_model, ours, tensors, text = _check_prefill(ref, variant, reduced=True)
    got = _check_greedy(ref, variant, ref_model, ours, tensors, text)
    if variant != "multilingual":  # multilingual may legitimately stop early (forced EOS on repeats)
        assert len(got) == GREEDY_STEPS


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_greedy_full_size(ref, variant):
    ref_model, ours, tensors, text = _check_prefill(ref, variant, reduced=False)
    _check_greedy(ref, variant, ref_model, ours, tensors, text)


# ------------------------------------------------------------------------ (c) probabilities

# The Llama variants share one chain (multilingual adds the alignment control before it, tested in
# test_alignment_parity.py), Turbo and Nano the other; each variant runs at its own vocabulary.
CHAIN = {"chatterbox": "llama", "multilingual": "llama", "turbo": "gpt", "nano": "gpt"}
SETTINGS = {
    "llama": [dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5),
                   dict(temperature=1.3, top_p=0.9, min_p=0.0, repetition_penalty=1.0, cfg_weight=0.0),
                   dict(temperature=0.5, top_p=0.5, min_p=0.2, repetition_penalty=2.0, cfg_weight=1.5)],
    "gpt": [dict(temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2),
              dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
              dict(temperature=0.3, top_k=7, top_p=0.5, repetition_penalty=3.0)],
}


def ref_probs_llama(logits2, history, s):
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TopPLogitsWarper)

    cond, uncond = logits2[0:1], logits2[1:2]
    cfg = torch.as_tensor(s["cfg_weight"], device=cond.device, dtype=cond.dtype)
    logits = cond + cfg * (cond - uncond)
    logits = RepetitionPenaltyLogitsProcessor(penalty=float(s["repetition_penalty"]))(history, logits)
    if s["temperature"] != 1.0:
        logits = logits / s["temperature"]
    logits = MinPLogitsWarper(min_p=s["min_p"])(history, logits)
    logits = TopPLogitsWarper(top_p=s["top_p"])(history, logits)
    return torch.softmax(logits, dim=-1)


def ref_probs_gpt(logits, history, s):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if s["temperature"] > 0 and s["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(s["temperature"]))
    if s["top_k"] > 0:
        procs.append(TopKLogitsWarper(s["top_k"]))
    if s["top_p"] < 1.0:
        procs.append(TopPLogitsWarper(s["top_p"]))
    if s["repetition_penalty"] != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]))
    return torch.softmax(procs(history, logits), dim=-1)


@pytest.mark.parity
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("setting", range(3))
@pytest.mark.parametrize("seed", range(4))
def test_processed_probabilities_equal(ref, variant, setting, seed):
    cfg = T3Config.for_variant(variant)
    s = SETTINGS[CHAIN[variant]][setting]
    g = torch.Generator().manual_seed(seed)
    V = cfg.speech_vocab_size
    # Peaked logits with exact ties, negative and positive values, and repeats in the history.
    logits = torch.randn(2 if cfg.uses_cfg else 1, V, generator=g) * 3
    logits[:, :5] = logits[:, 5:6]
    history = torch.randint(0, V, (1, 40), generator=g)
    history[0, 10:20] = history[0, 0]
    seen = torch.zeros(1, V, dtype=torch.bool).scatter_(1, history, True)
    if cfg.uses_cfg:
        want = ref_probs_llama(logits, history, s)
        params = SamplingParams(top_k=0, **s).validate()
        got = torch.softmax(process_llama(cfg_combine(logits, s["cfg_weight"]), seen, params), dim=-1)
    else:
        want = ref_probs_gpt(logits, history, s)
        params = SamplingParams(min_p=0.0, cfg_weight=0.0, **s).validate()
        got = torch.softmax(process_gpt(logits, seen, params), dim=-1)
    assert torch.equal(got, want), report(got, want, f"{variant} processed probabilities")
