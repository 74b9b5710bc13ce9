"""``--layout onnx-community`` for Turbo/Nano: the bundle of ResembleAI/chatterbox-turbo-ONNX,
checked against the published layout (names, dtypes, shapes), against torch, and run end to end
by that bundle's own client.

The client is the generation loop of the bundle's model card (the "Usage" script of
ResembleAI/chatterbox-turbo-ONNX, copied in babybirdprd/ort-chatterbox ``PYTHON_README.md``),
re-implemented here line for line with onnxruntime + numpy and ``transformers.AutoTokenizer``
on the bundle directory, as the card does: no pip package runs this bundle offline on a plain
directory (``chatterboxsynth``/``onnxvoice`` need their own install manifest and pinned revision).

Fast tests use a 2-layer Turbo T3 (1024 wide, 16 heads of 64 as published) and the decoder's own
2 meanflow steps; ``test_full_size_nano_client`` (slow) runs full-size Nano.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _onnx_layout import assert_io_as_published
import torch

from chatterbox_rt import TTS
from chatterbox_rt.export.manifest import Manifest
from chatterbox_rt.models.t3.config import smaller_backbone

oc = pytest.importorskip("chatterbox_rt.export.onnx_community")
oct_ = pytest.importorskip("chatterbox_rt.export.onnx_community_turbo")
ort = pytest.importorskip("onnxruntime")

DATA = Path(__file__).resolve().parents[1] / "data"
VOICE = DATA / "speech_en_3s.wav"
TEXT = "Oh, that's hilarious! Um anyway, how are you doing today?"
LAYERS = 2
START, STOP, SILENCE = 6561, 6562, 4299

# The published Turbo layout (ResembleAI/chatterbox-turbo-ONNX, from its clients: the model card,
# onnxvoice systems/chatterbox.py, langfod/chatterbox-onnx): (name, ONNX type, rank, {axis: size}).
PUBLISHED = {
    "speech_encoder": (
        [("audio_values", "tensor(float)", 2, {})],
        [("cond_emb", "tensor(float)", 3, {2: 1024}), ("prompt_token", "tensor(int64)", 2, {}),
         ("speaker_embeddings", "tensor(float)", 2, {1: 192}), ("speaker_features", "tensor(float)", 3, {2: 80})]),
    "embed_tokens": (
        [("input_ids", "tensor(int64)", 2, {})],
        [("inputs_embeds", "tensor(float)", 3, {2: 1024})]),
    "conditional_decoder": (
        [("speech_tokens", "tensor(int64)", 2, {}), ("speaker_embeddings", "tensor(float)", 2, {1: 192}),
         ("speaker_features", "tensor(float)", 3, {2: 80})],
        [("waveform", "tensor(float)", 2, {})]),
}


def _lm_layout(layers: int, heads: int = 16, head_dim: int = 64, width: int = 1024):
    kv = lambda p: [(f"{p}.{i}.{w}", "tensor(float)", 4, {1: heads, 3: head_dim}) for i in range(layers)
                    for w in ("key", "value")]
    return ([("inputs_embeds", "tensor(float)", 3, {2: width}), ("attention_mask", "tensor(int64)", 2, {}),
             ("position_ids", "tensor(int64)", 2, {})] + kv("past_key_values"),
            [("logits", "tensor(float)", 3, {2: 6563})] + kv("present"))


@pytest.fixture(scope="module")
def tts():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TTS.from_dummy("turbo", seed=0, device="cpu", **smaller_backbone("turbo", num_layers=LAYERS))
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundle(tts, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_community_turbo") / "bundle"
    manifest = oc.export_onnx_community(tts, out, check_seconds=(2.3,), threads=1)
    return out, manifest


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


# ---------------------------------------------------------------------------------- layout


def test_bundle_files_and_manifest(bundle):
    out, _ = bundle
    for name in oc.GRAPHS:
        assert (out / "onnx" / f"{name}.onnx").is_file()
        assert (out / "onnx" / f"{name}.onnx_data").is_file()  # the model card downloads f"{file}_data"
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "manifest.json"):
        assert (out / f).is_file(), f
    m = Manifest.read(out, verify=True)
    assert m.layout == "onnx-community" and m.variant == "turbo" and m.precision == "fp32"
    assert set(m.graphs) == set(oc.GRAPHS)
    for name, g in m.graphs.items():
        assert g["file"] == f"onnx/{name}.onnx"
        assert g["check"]["cases"] >= (1 if name == "speech_encoder" else 2), name  # one clip length here
        assert g["check"]["max_rel_error"] <= g["check"]["tolerance"], name
        assert g["bytes"] > 0 and g["inputs"] and g["outputs"] and g["profile"]
    assert m.data["components"]["onnx-community"]["config"]["n_steps"] == 2  # meanflow
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "gpt2" and cfg["text_config"]["n_layer"] == LAYERS
    assert cfg["text_config"]["n_head"] == 16 and cfg["text_config"]["head_dim"] == 64
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == STOP and gen["repetition_penalty"] == 1.2


@pytest.mark.parametrize("name", list(oc.GRAPHS))
def test_io_names_dtypes_shapes_as_published(bundle, name):
    out, _ = bundle
    sess = _session(out / "onnx" / f"{name}.onnx")
    want_in, want_out = _lm_layout(LAYERS) if name == "language_model" else PUBLISHED[name]
    assert_io_as_published(sess, want_in, want_out)


def test_tokenizer_appends_two_end_of_text(bundle, tts):
    from tokenizers import Tokenizer

    out, _ = bundle
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode(TEXT).ids == tts.frontend.token_ids(TEXT) + [50256, 50256]


def test_embed_tokens_routes_the_last_two_ids_to_speech(bundle, tts):
    """Slice(-2) / Where(50256 -> 6561): a prompt's two trailing ids are start-of-speech, a single
    id is a speech token, ``[pad, id, id]`` is one text and two speech rows."""
    out, _ = bundle
    et = _session(out / "onnx" / "embed_tokens.onnx")
    t3 = tts.t3
    with torch.inference_mode():
        text, speech = t3.text_emb.weight.numpy(), t3.speech_emb.weight.numpy()
    got = et.run(None, {"input_ids": np.array([[5, 70, 50256, 50256]])})[0][0]
    np.testing.assert_array_equal(got, np.stack([text[5], text[70], speech[START], speech[START]]))
    got = et.run(None, {"input_ids": np.array([[70]])})[0][0]
    np.testing.assert_array_equal(got, speech[70:71])
    got = et.run(None, {"input_ids": np.array([[50256, 70, 70]])})[0][0]
    np.testing.assert_array_equal(got, np.stack([text[50256], speech[70], speech[70]]))


def test_refuses_multilingual(tmp_path):
    from types import SimpleNamespace

    with pytest.raises(NotImplementedError, match="multilingual"):
        oc.export_onnx_community(SimpleNamespace(variant="multilingual", backend="torch"), tmp_path / "m")


# ---------------------------------------------------------------------------------- the client


class RepetitionPenaltyLogitsProcessor:
    """The model card's processor (HF's rule over every token in ``input_ids``)."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        score = np.take_along_axis(scores, input_ids, axis=1)
        score = np.where(score < 0, score * self.penalty, score / self.penalty)
        out = scores.copy()
        np.put_along_axis(out, input_ids, score, axis=1)
        return out


def model_card_generate(bundle_dir: Path, audio_values: np.ndarray, text: str, max_new_tokens: int,
                        repetition_penalty: float = 1.2, suffix: str = "") -> dict:
    """The ResembleAI/chatterbox-turbo-ONNX model card's generation loop, unchanged but for the
    sessions (one thread) and what it returns (everything it fed and got, for the checks).
    ``suffix``: the file set a dtype picks ("_q4", "_quantized"), for every graph as the card does."""
    from transformers import AutoTokenizer

    d = Path(bundle_dir) / "onnx"
    speech_encoder_session = _session(d / f"speech_encoder{suffix}.onnx")
    embed_tokens_session = _session(d / f"embed_tokens{suffix}.onnx")
    language_model_session = _session(d / f"language_model{suffix}.onnx")
    cond_decoder_session = _session(d / f"conditional_decoder{suffix}.onnx")
    num_kv_heads = language_model_session.get_inputs()[3].shape[1]  # the card hard-codes 16 / 64
    head_dim = language_model_session.get_inputs()[3].shape[3]

    tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir))
    input_ids = tokenizer(text, return_tensors="np")["input_ids"].astype(np.int64)
    rec = {"input_ids": input_ids.copy(), "lm_calls": 0}

    processor = RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty)
    generate_tokens = np.array([[START]], dtype=np.int64)
    for i in range(max_new_tokens):
        inputs_embeds = embed_tokens_session.run(None, {"input_ids": input_ids})[0]
        if i == 0:
            cond_emb, prompt_token, speaker_embeddings, speaker_features = speech_encoder_session.run(
                None, {"audio_values": audio_values})
            inputs_embeds = np.concatenate((cond_emb, inputs_embeds), axis=1)
            rec.update(cond_emb=cond_emb, prompt_token=prompt_token, speaker_embeddings=speaker_embeddings,
                       speaker_features=speaker_features, prompt_embeds=inputs_embeds)
            batch_size, seq_len, _ = inputs_embeds.shape
            past_key_values = {
                i.name: np.zeros([batch_size, num_kv_heads, 0, head_dim],
                                 dtype=np.float16 if i.type == "tensor(float16)" else np.float32)
                for i in language_model_session.get_inputs() if "past_key_values" in i.name}
            attention_mask = np.ones((batch_size, seq_len), dtype=np.int64)
            position_ids = np.arange(seq_len, dtype=np.int64).reshape(1, -1).repeat(batch_size, axis=0)
        logits, *present_key_values = language_model_session.run(None, dict(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            **past_key_values))
        rec["lm_calls"] += 1
        if i == 0:
            rec["logits0"] = logits[:, -1, :].copy()
        logits = logits[:, -1, :]
        next_token_logits = processor(generate_tokens, logits)
        input_ids = np.argmax(next_token_logits, axis=-1, keepdims=True).astype(np.int64)
        generate_tokens = np.concatenate((generate_tokens, input_ids), axis=-1)
        if (input_ids.flatten() == STOP).all():
            break
        attention_mask = np.concatenate([attention_mask, np.ones((batch_size, 1), dtype=np.int64)], axis=1)
        position_ids = position_ids[:, -1:] + 1
        for j, key in enumerate(past_key_values):
            past_key_values[key] = present_key_values[j]

    speech_tokens = generate_tokens[:, 1:-1]
    silence_tokens = np.full((speech_tokens.shape[0], 3), SILENCE, dtype=np.int64)
    speech_tokens = np.concatenate([prompt_token, speech_tokens, silence_tokens], axis=1)
    wav = cond_decoder_session.run(None, dict(speech_tokens=speech_tokens, speaker_embeddings=speaker_embeddings,
                                              speaker_features=speaker_features))[0]
    rec.update(generate_tokens=generate_tokens, speech_tokens=speech_tokens, wav=wav)
    return rec


@torch.inference_mode()
def _torch_greedy(t3, embeds: torch.Tensor, max_new_tokens: int, penalty: float = 1.2) -> list:
    """The card's decoding in torch: greedy, HF repetition penalty over [start, generated...]."""
    logits = t3.prefill(embeds)
    P = embeds.shape[1]
    toks = [START]
    for i in range(max_new_tokens):
        l_ = logits.clone()[0]
        seen = torch.tensor(sorted(set(toks)))
        s = l_[seen]
        l_[seen] = torch.where(s < 0, s * penalty, s / penalty)
        nxt = int(l_.argmax())
        toks.append(nxt)
        if nxt == STOP:
            break
        logits = t3.decode_step(torch.tensor([nxt]), torch.tensor([P + i]), None, kv_len=P + i + 1)
    return toks


def _client_vs_torch(out: Path, tts, max_new: int, tol: float = 1e-4):
    from chatterbox_rt.audio import load_audio
    from chatterbox_rt.export.s3gen_onnx import HiftGraph

    wav, _ = load_audio(VOICE, target_sr=24000)  # librosa.load(sr=24000) in the card: soxr_hq, as ours
    audio = wav[None].astype(np.float32)
    rec = model_card_generate(out, audio, TEXT, max_new)

    # the voice == our speech-encoder reference (TTS.prepare_conditionals without loudness normalisation)
    (cond, tok, xvec, feat), _ = oc.reference_speech_encoder(tts, torch.from_numpy(audio))
    assert _rel(rec["cond_emb"], cond.numpy()) < tol
    np.testing.assert_array_equal(rec["prompt_token"], tok.numpy())
    assert _rel(rec["speaker_embeddings"], xvec.numpy()) < tol and _rel(rec["speaker_features"], feat.numpy()) < tol

    # the prompt the client built == [cond; text; start; start] from our modules and front end
    assert rec["input_ids"][0].tolist() == tts.frontend.token_ids(TEXT) + [50256, 50256]
    want_prompt = oct_.reference_prompt(tts.t3, cond, tts.frontend.token_ids(TEXT))
    assert _rel(rec["prompt_embeds"], want_prompt.numpy()) < tol
    with torch.inference_mode():
        want0 = tts.t3.prefill(want_prompt)
    assert _rel(rec["logits0"], want0.numpy()) < tol

    # greedy speech tokens == the same decoding in torch
    toks = _torch_greedy(tts.t3, want_prompt, max_new)
    assert rec["generate_tokens"][0].tolist() == toks
    assert rec["lm_calls"] == len(toks) - 1

    # the waveform: the decoder's length rule, finite, == S3Gen in torch with the same draws
    speech = rec["speech_tokens"]
    assert speech[0, -3:].tolist() == [SILENCE] * 3
    wave = rec["wav"]
    assert wave.shape == (1, 480 * (2 * speech.shape[1] - rec["speaker_features"].shape[1]))
    assert np.isfinite(wave).all() and np.abs(wave).max() > 0
    with torch.inference_mode():
        want = oc.reference_decoder(tts.s3gen, HiftGraph(tts.s3gen.mel2wav), torch.from_numpy(speech),
                                    torch.from_numpy(rec["speaker_embeddings"]),
                                    torch.from_numpy(rec["speaker_features"]))
    assert _rel(wave, want.numpy()) < 2e-3
    return rec


def test_model_card_client_runs_the_bundle(bundle, tts):
    out, _ = bundle
    rec = _client_vs_torch(out, tts, max_new=10)
    assert rec["lm_calls"] >= 1


def test_quantised_file_set_loads_as_a_dtype_client_asks(tts, tmp_path):
    """``precision="int4"``: a client that picks the ``q4`` file set loads all four graphs as
    ``<name>_q4.onnx`` (+ ``_data``). The language model is the 4-bit one; the other three are the
    fp32 graphs under that name, so the voice and the decoder give what the fp32 set gives."""
    import filecmp

    from chatterbox_rt.audio import load_audio

    out = tmp_path / "q4"
    m = oc.export_onnx_community(tts, out, precision="int4", check_seconds=(2.3,), threads=1)
    d = out / "onnx"
    for name in oc.GRAPHS:
        assert (d / f"{name}_q4.onnx").is_file() and (d / f"{name}_q4.onnx_data").is_file(), name
        assert m.graphs[f"{name}_q4"]["file"] == f"onnx/{name}_q4.onnx"
    assert m.graphs["language_model_q4"]["precision"] == "int4"
    for name in ("speech_encoder", "embed_tokens", "conditional_decoder"):
        g = m.graphs[f"{name}_q4"]
        assert g["precision"] == "fp32" and g["check"]["same_as"] == name
        assert filecmp.cmp(d / f"{name}_q4.onnx_data", d / f"{name}.onnx_data", shallow=False)
    Manifest.read(out, verify=True)  # every file, the hard-linked ones too, recorded with its digest
    wav, _ = load_audio(VOICE, target_sr=24000)
    audio = wav[None].astype(np.float32)
    q4 = model_card_generate(out, audio, TEXT, max_new_tokens=6, suffix="_q4")
    fp32 = model_card_generate(out, audio, TEXT, max_new_tokens=6)
    for k in ("cond_emb", "prompt_token", "speaker_embeddings", "speaker_features", "prompt_embeds"):
        np.testing.assert_array_equal(q4[k], fp32[k])
    assert 0 < _rel(q4["logits0"], fp32["logits0"]) < 0.5  # 4-bit weights: close, not equal
    assert np.isfinite(q4["wav"]).all() and q4["wav"].shape[1] > 0


# ---------------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_nano_client(tmp_path):
    """Full-size (12-layer, 768-wide) dummy Nano: exported, then run by the model card's loop."""
    tts = TTS.from_dummy("nano", seed=0, device="cpu")
    out = tmp_path / "bundle"
    m = oc.export_onnx_community(tts, out, check_seconds=(2.3,))
    assert m.variant == "nano"
    lm = _session(out / "onnx" / "language_model.onnx")
    names = [(a.name, a.shape[1], a.shape[3]) for a in lm.get_inputs()[3:]]
    assert len(names) == 24 and all(h == 12 and d == 64 for _, h, d in names)
    _client_vs_torch(out, tts, max_new=6)
