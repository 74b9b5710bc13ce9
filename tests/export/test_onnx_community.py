"""``--layout onnx-community``: the four-graph bundle of onnx-community/chatterbox-ONNX, checked
against the published layout (names, dtypes, shapes), against torch, and run by the real
``chatterbox_onnx.ChatterboxOnnx`` client (PyPI chatterbox-onnx, a test-only dependency) offline
on the exported bundle.

The fast tests use a 2-layer T3 (the client hard-codes 30 layers for its empty cache; the test
sets the client's public ``num_hidden_layers`` to 2, nothing else) and 2 CFM steps (the decoder's
steps are unrolled; 10 triple its export time). ``test_full_size_client_unchanged`` (slow) runs
the client with nothing changed on a full-size (dummy-weight) export.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from _onnx_layout import assert_io_as_published
import torch

from chatterbox_rt import TTS
from chatterbox_rt.export.manifest import Manifest
from chatterbox_rt.models.t3.config import smaller_backbone

oc = pytest.importorskip("chatterbox_rt.export.onnx_community")
ort = pytest.importorskip("onnxruntime")

DATA = Path(__file__).resolve().parents[1] / "data"
VOICE = DATA / "speech_en_3s.wav"
TEXT = "Hello there, how are you?"  # unchanged by the English punc_norm: the client skips it
N_STEPS = 2
LAYERS = 2

# The published English layout (onnx-community/chatterbox-ONNX, from its export script and the
# chatterbox-onnx / transformers.js clients): (name, ONNX type, rank, {axis: fixed size}).
PUBLISHED = {
    "speech_encoder": (
        [("audio_values", "tensor(float)", 2, {})],
        [("audio_features", "tensor(float)", 3, {2: 1024}), ("audio_tokens", "tensor(int64)", 2, {}),
         ("speaker_embeddings", "tensor(float)", 2, {1: 192}), ("speaker_features", "tensor(float)", 3, {2: 80})]),
    "embed_tokens": (
        [("input_ids", "tensor(int64)", 2, {}), ("position_ids", "tensor(int64)", 2, {}),
         ("exaggeration", "tensor(float)", 1, {})],
        [("inputs_embeds", "tensor(float)", 3, {2: 1024})]),
    "conditional_decoder": (
        [("speech_tokens", "tensor(int64)", 2, {}), ("speaker_embeddings", "tensor(float)", 2, {1: 192}),
         ("speaker_features", "tensor(float)", 3, {2: 80})],
        [("waveform", "tensor(float)", 2, {})]),
}


def _lm_layout(layers: int):
    kv = lambda p: [(f"{p}.{i}.{w}", "tensor(float)", 4, {1: 16, 3: 64}) for i in range(layers)
                    for w in ("key", "value")]
    return ([("inputs_embeds", "tensor(float)", 3, {2: 1024}), ("attention_mask", "tensor(int64)", 2, {})]
            + kv("past_key_values"), [("logits", "tensor(float)", 3, {2: 8194})] + kv("present"))


@pytest.fixture(scope="module")
def tts():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TTS.from_dummy("chatterbox", seed=0, device="cpu", **smaller_backbone("chatterbox", num_layers=LAYERS))
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundle(tts, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_community") / "bundle"
    t0 = time.perf_counter()
    manifest = oc.export_onnx_community(tts, out, default_voice=VOICE, n_steps=N_STEPS, check_seconds=(2.3,),
                                        threads=1)
    print(f"onnx-community export: {time.perf_counter() - t0:.1f} s")
    return out, manifest


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------- layout


def test_bundle_files_and_manifest(bundle):
    out, _ = bundle
    for name in oc.GRAPHS:
        assert (out / "onnx" / f"{name}.onnx").is_file()
        assert (out / "onnx" / f"{name}.onnx_data").is_file()  # what the clients download beside each graph
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
              "preprocessor_config.json", "default_voice.wav", "manifest.json"):
        assert (out / f).is_file(), f
    m = Manifest.read(out, verify=True)
    assert m.layout == "onnx-community" and m.variant == "chatterbox" and m.precision == "fp32"
    assert set(m.graphs) == set(oc.GRAPHS)
    for name, g in m.graphs.items():
        assert g["file"] == f"onnx/{name}.onnx"
        assert g["check"]["max_rel_error"] <= g["check"]["tolerance"], name
        assert g["bytes"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "chatterbox" and cfg["text_config"]["num_hidden_layers"] == LAYERS
    assert cfg["text_config"]["num_key_value_heads"] == 16 and cfg["text_config"]["head_dim"] == 64
    assert cfg["transformers.js_config"]["use_external_data_format"]["language_model.onnx"] == 1
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 6562


@pytest.mark.parametrize("name", list(oc.GRAPHS))
def test_io_names_dtypes_shapes_as_published(bundle, name):
    out, _ = bundle
    sess = _session(out / "onnx" / f"{name}.onnx")
    want_in, want_out = _lm_layout(LAYERS) if name == "language_model" else PUBLISHED[name]
    assert_io_as_published(sess, want_in, want_out)


def test_tokenizer_frames_ids_as_embed_tokens_expects(bundle, tts):
    from tokenizers import Tokenizer

    out, _ = bundle
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tts.frontend.token_ids(TEXT)  # [255, ..., 0], with the runtime's normalisation
    assert tok.encode(TEXT).ids == [oc.EXAGGERATION_TOKEN] + ids + [6561, 6561]


# ---------------------------------------------------------------------------------- vs torch


def test_embed_and_language_model_match_t3_prefill(bundle, tts):
    """[audio_features; embed_tokens(prompt)] through language_model == T3.prompt_embeds + prefill
    (no CFG) for a random voice, then one step == T3.decode_step."""
    from chatterbox_rt.models.t3 import T3Cond

    out, _ = bundle
    t3 = tts.t3
    g = torch.Generator().manual_seed(3)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 37), generator=g), emotion_adv=0.8)
    text = torch.tensor(tts.frontend.token_ids(TEXT))
    with torch.inference_mode():
        embeds, _ = t3.prompt_embeds(cond, text, cfg=False)
        want0 = t3.prefill(embeds)
        cond_emb = t3.embed_cond(cond)[:, :-1]
    ids = np.array([[oc.EXAGGERATION_TOKEN] + text.tolist() + [6561, 6561]])
    pos = np.where(ids >= 6561, 0, np.arange(ids.shape[1])[None] - 1)
    et = _session(out / "onnx" / "embed_tokens.onnx")
    lm = _session(out / "onnx" / "language_model.onnx")
    e = et.run(None, {"input_ids": ids, "position_ids": pos, "exaggeration": np.array([0.8], np.float32)})[0]
    x = np.concatenate([cond_emb.numpy(), e], axis=1)
    np.testing.assert_allclose(x, embeds.numpy(), rtol=0, atol=1e-6)
    P = x.shape[1]
    past = {f"past_key_values.{i}.{w}": np.zeros((1, 16, 0, 64), np.float32) for i in range(LAYERS)
            for w in ("key", "value")}
    logits, *present = lm.run(None, {"inputs_embeds": x, "attention_mask": np.ones((1, P), np.int64), **past})
    assert logits.shape == (1, P, 8194)
    assert _rel(logits[:, -1], want0.numpy()) < 1e-4
    tok = int(want0.argmax())
    e1 = et.run(None, {"input_ids": np.array([[tok]]), "position_ids": np.array([[1]]),
                       "exaggeration": np.array([0.8], np.float32)})[0]
    past = dict(zip(past, present))
    logits1, *_ = lm.run(None, {"inputs_embeds": e1, "attention_mask": np.ones((1, P + 1), np.int64), **past})
    with torch.inference_mode():
        want1 = t3.decode_step(torch.tensor([tok]), torch.tensor([P]), torch.tensor([1]), kv_len=P + 1)
    assert _rel(logits1[:, -1], want1.numpy()) < 1e-4


def test_speech_encoder_is_prepare_conditionals(bundle, tts):
    """The speech encoder on a real clip == TTS.prepare_conditionals (soxr resampling, as the
    runtime) for T3's conditioning, and == its S3Gen reference exactly computed."""
    from chatterbox_rt.audio import load_audio

    out, _ = bundle
    wav, _ = load_audio(VOICE, target_sr=24000)
    got = _session(out / "onnx" / "speech_encoder.onnx").run(None, {"audio_values": wav[None]})
    voice = tts.prepare_conditionals(VOICE)
    with torch.inference_mode():
        cond = tts.t3.embed_cond(voice.t3)[:, :-1]
    assert _rel(got[0], cond.numpy()) < 1e-4
    np.testing.assert_array_equal(got[1], voice.gen["prompt_token"].numpy())
    assert _rel(got[2], voice.gen["embedding"].numpy()) < 1e-4
    assert _rel(got[3], voice.gen["prompt_feat"].numpy()) < 1e-4


def test_refusals(tts, tmp_path):
    with pytest.raises(ValueError, match="fp32"):
        oc.export_onnx_community(tts, tmp_path / "a", precision="fp16")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "something").write_text("x")
    with pytest.raises(Exception, match="not empty"):
        oc.export_onnx_community(tts, tmp_path / "b")
    from types import SimpleNamespace

    with pytest.raises(NotImplementedError, match="English"):
        oc.export_onnx_community(SimpleNamespace(variant="multilingual", backend="torch"), tmp_path / "c")


# ---------------------------------------------------------------------------------- the client


class Recorder:
    """An onnxruntime session that remembers what it was run on and what it returned."""

    def __init__(self, sess):
        self.sess, self.calls = sess, []

    def run(self, output_names, feeds, *args):
        outs = self.sess.run(output_names, feeds, *args)
        self.calls.append(({k: np.array(v) for k, v in feeds.items()}, [np.array(o) for o in outs]))
        return outs

    def __getattr__(self, name):
        return getattr(self.sess, name)


def _client(bundle_dir, monkeypatch, layers=None, quantized=False):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chatterbox_onnx = pytest.importorskip("chatterbox_onnx")
    # Offline, hf_hub_download finds every file in local_dir (= the client's cache_dir) itself.
    client = chatterbox_onnx.ChatterboxOnnx(quantized=quantized, cache_dir=str(bundle_dir))
    if layers is not None:
        client.num_hidden_layers = layers  # the client hard-codes 30; a public attribute
    client.speech_encoder_session = Recorder(client.speech_encoder_session)
    client.llama_with_past_session = Recorder(client.llama_with_past_session)
    client.cond_decoder_session = Recorder(client.cond_decoder_session)
    return client


@torch.inference_mode()
def _torch_greedy(t3, embeds, max_new_tokens, penalty=1.2):
    """The client's decoding in torch: greedy, repetition penalty on the last token only, speech
    positions i + 1 -> the drawn tokens, start token first."""
    logits = t3.prefill(embeds)
    P = embeds.shape[1]
    toks = [6561]
    for i in range(max_new_tokens):
        l_ = logits.clone()
        s = l_[0, toks[-1]]
        l_[0, toks[-1]] = s * penalty if s < 0 else s / penalty
        nxt = int(l_.argmax())
        toks.append(nxt)
        if nxt == 6562:
            break
        logits = t3.decode_step(torch.tensor([nxt]), torch.tensor([P + i]), torch.tensor([i + 1]), kv_len=P + i + 1)
    return toks


def test_chatterbox_onnx_client_runs_the_bundle(bundle, tts, monkeypatch, tmp_path):
    from chatterbox_rt.export.s3gen_onnx import HiftGraph
    from chatterbox_rt.models.t3 import T3Cond

    out, _ = bundle
    client = _client(out, monkeypatch, layers=LAYERS)
    max_new, exaggeration = 12, 0.7
    wav_path = tmp_path / "out.wav"
    client.synthesize(TEXT, max_new_tokens=max_new, exaggeration=exaggeration, output_file_name=str(wav_path))
    assert wav_path.is_file()

    (se_in, se_out), = client.speech_encoder_session.calls
    cond_emb, prompt_token, xvec, feat = se_out
    # ours, from the same clip as the client read it (librosa soxr_hq == chatterbox_rt.audio)
    (want_cond, want_tok, want_x, want_feat), cond = oc.reference_speech_encoder(tts, torch.from_numpy(se_in[
        "audio_values"]))
    assert _rel(cond_emb, want_cond.numpy()) < 1e-4
    np.testing.assert_array_equal(prompt_token, want_tok.numpy())
    assert _rel(xvec, want_x.numpy()) < 1e-4 and _rel(feat, want_feat.numpy()) < 1e-4

    # the language model's logits on the client's first step == T3's prefill on our prompt
    lm_calls = client.llama_with_past_session.calls
    feeds0, outs0 = lm_calls[0]
    cond = T3Cond(speaker_emb=cond.speaker_emb, cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens,
                  emotion_adv=exaggeration)
    with torch.inference_mode():
        embeds, _ = tts.t3.prompt_embeds(cond, torch.tensor(tts.frontend.token_ids(TEXT)), cfg=False)
        want0 = tts.t3.prefill(embeds)
    assert feeds0["inputs_embeds"].shape == tuple(embeds.shape)
    assert _rel(feeds0["inputs_embeds"], embeds.numpy()) < 1e-4
    assert _rel(outs0[0][:, -1], want0.numpy()) < 1e-4

    # greedy speech tokens == the same decoding in torch
    toks = _torch_greedy(tts.t3, embeds, max_new)
    (dec_in, dec_out), = client.cond_decoder_session.calls
    np.testing.assert_array_equal(dec_in["speech_tokens"], np.concatenate([prompt_token, [toks[1:-1]]], axis=1))
    assert len(lm_calls) == len(toks) - 1

    # the waveform: expected length, finite, == S3Gen in torch with the same draws
    wave = dec_out[0]
    n_tok = dec_in["speech_tokens"].shape[1]
    assert wave.shape == (1, 480 * (2 * n_tok - feat.shape[1]))
    assert np.isfinite(wave).all() and np.abs(wave).max() > 0
    with torch.inference_mode():
        want = oc.reference_decoder(tts.s3gen, HiftGraph(tts.s3gen.mel2wav), torch.from_numpy(dec_in["speech_tokens"]),
                                    torch.from_numpy(xvec), torch.from_numpy(feat), n_steps=N_STEPS)
    assert _rel(wave, want.numpy()) < 2e-3


def test_chatterbox_onnx_voice_conversion(bundle, monkeypatch, tmp_path):
    out, _ = bundle
    client = _client(out, monkeypatch, layers=LAYERS)
    client.voice_convert(str(VOICE), str(out / "default_voice.wav"), output_file_name=str(tmp_path / "vc.wav"))
    (_, dec_out), = client.cond_decoder_session.calls
    assert np.isfinite(dec_out[0]).all() and dec_out[0].shape[1] > 0


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


# ---------------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_client_unchanged(monkeypatch, tmp_path):
    """Full-size (30-layer) dummy weights, int4 language model: ChatterboxOnnx() exactly as a user
    runs it (quantized=True loads language_model_q4.onnx; 30 layers, 16 heads, 64 dims)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tts = TTS.from_dummy("chatterbox", seed=0, device="cpu")
    out = tmp_path / "bundle"
    m = oc.export_onnx_community(tts, out, precision="int4", default_voice=VOICE, n_steps=N_STEPS,
                                 check_seconds=(2.3,))
    assert "language_model_q4" in m.graphs
    client = _client(out, monkeypatch, quantized=True)
    client.synthesize(TEXT, max_new_tokens=8, output_file_name=str(tmp_path / "out.wav"))
    (_, dec_out), = client.cond_decoder_session.calls
    assert np.isfinite(dec_out[0]).all() and dec_out[0].shape[1] > 0
    client = _client(out, monkeypatch, quantized=False)
    client.synthesize(TEXT, max_new_tokens=4, output_file_name=str(tmp_path / "out32.wav"))
    feeds0, outs0 = client.llama_with_past_session.calls[0]
    with torch.inference_mode():
        want0 = tts.t3.prefill(torch.from_numpy(feeds0["inputs_embeds"]))
    assert _rel(outs0[0][:, -1], want0.numpy()) < 1e-4
