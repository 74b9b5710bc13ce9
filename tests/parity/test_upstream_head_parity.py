"""Multilingual V3 and the Single Language Pack against upstream HEAD (resemble-ai/chatterbox
5de7a54, installed as ``chatterbox_head`` by the test set-up), which is what upstream runs for every
multilingual file: no alignment analyzer, repetition penalty 1.2, the final token's audio dropped.

(a) T3 tokens identical at near-greedy for ``multilingual-v3`` and for V2 with
``behaviour="upstream"``, with our defaults (the penalty is not passed) against HEAD's generate
defaults; (b) end to end, HEAD's ``ChatterboxMultilingualTTS.generate`` (voice preparation
included, watermarked) against ``TTS.generate``'s pipeline with the same weights. V2's default,
0.1.7's behaviour, is compared with PyPI 0.1.7 in test_t3_parity.py and test_alignment_parity.py.
"""
import inspect

import pytest
import torch

from _s3gen_pairs import DATA, assert_close_rel, build_s3gen_pair, zero_noise
from _t3_pairs import build_pair, cond_tensors, our_cond, ref_cond, text_tokens
from chatterbox_rt.checkpoint import load_into
from chatterbox_rt.models.voice_encoder import VoiceEncoder
from chatterbox_rt.profiling.upstream import load_upstream_head, upstream_head_available
from chatterbox_rt.text import MultilingualTokenizer, TextFrontEnd, dummy_text_frontend
from chatterbox_rt.tts import SAMPLES_PER_TOKEN, TTS

pytestmark = pytest.mark.parity
STEPS = 48
NEAR_GREEDY = 1e-5
N_TOKENS = 20


@pytest.fixture(scope="module")
def head(ref):
    if not upstream_head_available():
        pytest.skip("upstream chatterbox HEAD not installed as chatterbox_head (make test's set-up installs it "
                    "from tests/oracle/)")
    return load_upstream_head()


def head_generate_defaults(head) -> dict:
    sig = inspect.signature(head.mtl_tts.ChatterboxMultilingualTTS.generate)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def test_head_is_what_we_think(head):
    """The oracle is the commit the issue names, with upstream's changes in it."""
    from pathlib import Path

    assert (Path(head.__file__).parent / "UPSTREAM_COMMIT").read_text().startswith("5de7a54")
    assert head_generate_defaults(head)["repetition_penalty"] == 1.2
    assert not hasattr(head.models.t3.t3, "AlignmentStreamAnalyzer")


@pytest.mark.parametrize("variant, behaviour", [("multilingual-v3", None), ("multilingual-v2", "upstream"),
                                                ("multilingual", "upstream")])
def test_t3_tokens_match_upstream_head(head, variant, behaviour):
    ref_model, ours = build_pair(head, variant, reduced=True, seed=11, behaviour=behaviour)
    cfg = ours.config
    assert cfg.behaviour == "upstream" and not cfg.alignment_heads and cfg.sampling.repetition_penalty == 1.2
    tensors = cond_tensors(cfg, seed=11)
    text = text_tokens(cfg, n=30, seed=11)
    d = head_generate_defaults(head)
    with torch.inference_mode():
        out = ref_model.inference(t3_cond=ref_cond(head, tensors), text_tokens=torch.stack([text, text]),
                                  max_new_tokens=STEPS, temperature=NEAR_GREEDY, cfg_weight=d["cfg_weight"],
                                  repetition_penalty=d["repetition_penalty"], min_p=d["min_p"], top_p=d["top_p"])[0]
        want = out[out != cfg.stop_speech_token]
        got = ours.generate(our_cond(tensors), text, max_new_tokens=STEPS, temperature=NEAR_GREEDY,
                            generator=torch.Generator().manual_seed(0))
    assert got.tolist() == want.tolist(), f"{variant}: ours {got.tolist()}\n  HEAD {want.tolist()}"
    assert len(got) == STEPS  # no alignment control cutting it short


@pytest.fixture(scope="module")
def tts_pair(ref, head, tmp_path_factory):
    """HEAD's ChatterboxMultilingualTTS and ours over the same random weights: reduced T3 (2
    layers), full-size S3Gen and voice encoder, a character-level grapheme tokenizer file."""
    from chatterbox.models.voice_encoder import VoiceEncoder as RefVE

    ref_s3gen, our_s3gen = build_s3gen_pair(ref, meanflow=False, seed=5)
    torch.manual_seed(7)
    ref_ve = RefVE().eval()
    our_ve = load_into(VoiceEncoder(), ref_ve.state_dict(), "reference VE").eval()
    ref_t3, our_t3 = build_pair(head, "multilingual-v3", reduced=True, seed=2)
    vocab_dir = tmp_path_factory.mktemp("mtl-tok")
    dummy_text_frontend("multilingual").tokenizer.tokenizer.save(str(vocab_dir / "grapheme_mtl_merged_expanded_v1.json"))
    head_tts = head.mtl_tts.ChatterboxMultilingualTTS(
        ref_t3, ref_s3gen, ref_ve, head.models.tokenizers.MTLTokenizer(str(vocab_dir / "grapheme_mtl_merged_expanded_v1.json")),
        "cpu")
    ours = TTS("multilingual", our_t3, our_s3gen, our_ve,
               TextFrontEnd("multilingual", MultilingualTokenizer.from_dir(vocab_dir)))
    return head_tts, ours


def test_generate_matches_upstream_head_end_to_end(tts_pair, monkeypatch):
    """Voice preparation, T3 with HEAD's defaults (penalty 1.2, no analyzer), S3Gen, the final
    token's audio dropped, the watermark: HEAD's waveform from ours."""
    head_tts, ours = tts_pair
    clip = DATA / "speech_en_6s.wav"
    seen = {}
    real_inference = head_tts.t3.inference

    def capped(**kw):  # random weights rarely emit EOS: stop after N_TOKENS (the only change)
        seen["kw"] = kw
        seen["tokens"] = real_inference(**dict(kw, max_new_tokens=N_TOKENS))
        return seen["tokens"]

    real_drop = __import__(type(head_tts).__module__, fromlist=["x"]).drop_invalid_tokens

    def drop_and_filter(x):
        # Random weights draw ids 6563..8193 too; HEAD's multilingual generate passes them to the
        # flow, whose embedding then raises IndexError. Ours drops them, as English/Turbo do.
        x = real_drop(x)
        return x[x < 6561]

    with monkeypatch.context() as m:
        m.setattr(head_tts.t3, "inference", capped)
        m.setattr(type(head_tts).__module__ + ".drop_invalid_tokens", drop_and_filter)
        zero_noise(m)
        with torch.inference_mode():
            want = head_tts.generate("Hola, esto es una prueba.", language_id="es", audio_prompt_path=str(clip),
                                     temperature=NEAR_GREEDY)
    assert seen["kw"]["repetition_penalty"] == 1.2

    voice = ours.prepare_conditionals(clip, exaggeration=0.5)
    tokens = ours.t3_tokens("Hola, esto es una prueba.", voice, language_id="es", max_new_tokens=N_TOKENS,
                            temperature=NEAR_GREEDY)
    ref_tokens = seen["tokens"][0]
    assert tokens.tolist() == ref_tokens[ref_tokens < 6561].tolist()

    # TTS.generate's S3Gen half with zero noise (what zero_noise gives the reference)
    L = 2 * (voice.gen["prompt_token"].shape[1] + tokens.numel())
    captured = {}
    real_mel = ours.s3gen_mel

    def zero_noise_mel(toks, v=None, **kw):
        return real_mel(toks, v, n_steps=kw.get("n_steps"), noise=torch.zeros(1, 80, L))

    real_wav = ours.s3gen_wav

    def noise_free_wav(mel, **kw):
        captured["full"] = real_wav(mel, noise_free=True)
        return captured["full"]

    monkeypatch.setattr(ours, "s3gen_mel", zero_noise_mel)
    monkeypatch.setattr(ours, "s3gen_wav", noise_free_wav)
    monkeypatch.setattr(ours, "t3_tokens", lambda *a, **k: tokens)
    got = ours.generate("Hola, esto es una prueba.", voice, language_id="es")
    n = tokens.numel()
    assert got.shape[1] == (n - 1) * SAMPLES_PER_TOKEN < captured["full"].shape[1]  # the last token's audio dropped
    assert want.shape == got.shape and want.std() > 1e-3
    assert_close_rel(got, want, "watermarked waveform (V3, upstream HEAD)")
