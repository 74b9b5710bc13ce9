"""A whole exported bundle: export -> manifest -> TTS.from_exported on onnxruntime, against the
torch backend (same tokens at near-greedy, audio within 1e-3), and every bad-input path the
issue names (another model's bundle, a truncated or corrupt file, no manifest)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from chatterbox_rt import TTS
from chatterbox_rt.audio_out import _umask
from chatterbox_rt.export import BundleError, Manifest, export
from chatterbox_rt.models.t3.config import smaller_backbone

pytest.importorskip("onnxruntime")

NEAR_GREEDY = dict(temperature=0.05, top_k=1)


def _tts(variant="nano", seed=0):
    return TTS.from_dummy(variant, seed=seed, device="cpu", **smaller_backbone(variant, num_layers=2))


@pytest.fixture(scope="module")
def nano(tmp_path_factory, one_thread):
    tts = _tts("nano")
    out = tmp_path_factory.mktemp("bundle") / "nano"
    m = export(tts, out)
    return tts, out, m


@pytest.fixture(scope="module")
def ort(nano):
    """The bundle on onnxruntime, loaded once (opening the CFM loop graph takes seconds)."""
    return TTS.from_exported(nano[1])


def test_manifest_records_every_graph(nano):
    tts, out, m = nano
    data = json.loads((out / "manifest.json").read_text())
    assert data["variant"] == "nano" and data["layout"] == "native" and data["precision"] == "fp32"
    assert data["opset"] == 17 and data["versions"]["torch"] == torch.__version__
    for comp in ("t3", "s3gen", "frontends"):
        assert comp in data["components"]
    assert {"t3_prefill", "t3_decode", "s3gen_hift", "s3gen_flow_encoder", "campplus"} <= set(data["graphs"])
    for name, g in data["graphs"].items():
        assert (out / g["file"]).is_file(), name
        assert g["inputs"] and g["outputs"] and g["shapes"]["min"] and g["shapes"]["max"], name
        assert g["check"]["cases"] >= 2 and g["check"]["max_rel_error"] <= g["check"]["tolerance"], name
        assert g["weights_hash"] and g["opset"] == 17 and g["precision"] == "fp32"
    for name, rec in data["files"].items():
        assert (out / name).stat().st_size == rec["bytes"]
        assert (out / name).stat().st_mode & 0o044 == 0o044 & ~_umask(), name  # readable as the umask allows
    assert Manifest.read(out, verify=True).model_hash == m.model_hash


def test_onnxruntime_backend_matches_torch(nano, ort):
    tts, out, _ = nano
    assert ort.backend == "onnxruntime" and ort.variant == "nano"
    kw = dict(seed=3, max_new_tokens=12, stop_on_eos=False, watermark=False, **NEAR_GREEDY)
    want_tok = tts.t3_tokens("Hello there.", seed=3, max_new_tokens=12, stop_on_eos=False, **NEAR_GREEDY)
    got_tok = ort.t3_tokens("Hello there.", seed=3, max_new_tokens=12, stop_on_eos=False, **NEAR_GREEDY)
    assert torch.equal(got_tok.cpu(), want_tok.cpu())
    want = tts.generate("Hello there.", **kw)
    got = ort.generate("Hello there.", **kw)
    assert got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max()) < 1e-3


def test_t3_weights_are_packed_once(ort):
    """The prefill session runs from the mapped weights file; only the decode session packs its own
    copy (onnxruntime would otherwise hold the matrices twice)."""
    pre, dec = ort.t3._prefill_sess.get_session_options(), ort.t3._decode_sess.get_session_options()
    assert pre.get_session_config_entry("session.disable_prepacking") == "1"
    for so in (pre, dec):  # no spin-waiting workers (export/_onnx.py SESSION_DEFAULTS)
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: onnxruntime's default (on)
        dec.get_session_config_entry("session.disable_prepacking")


def test_engine_runs_on_the_onnxruntime_backend(ort):
    kw = dict(seed=5, max_new_tokens=10, stop_on_eos=False, watermark=False, **NEAR_GREEDY)
    solo = ort.generate("One two.", **kw)
    with ort.engine(max_batch=2) as eng:
        reqs = [eng.submit("One two.", **kw), eng.submit("Three four five.", **kw)]
        outs = [r.result(timeout=300) for r in reqs]
    assert outs[0].shape == solo.shape
    assert float((outs[0] - solo).abs().max() / solo.abs().max()) < 2e-3


def test_voice_prepared_on_onnxruntime(nano, ort):
    tts, out, _ = nano
    import numpy as np

    wav = np.random.default_rng(0).standard_normal(24000 * 6).astype(np.float32) * 0.1
    v_ort = ort.prepare_conditionals(wav, sr=24000)
    v_pt = tts.prepare_conditionals(wav, sr=24000)
    assert torch.equal(v_ort.t3.cond_prompt_speech_tokens.cpu(), v_pt.t3.cond_prompt_speech_tokens.cpu())
    for key in ("prompt_feat", "embedding"):
        a, b = v_ort.gen[key].cpu(), v_pt.gen[key].cpu()
        assert float((a - b).abs().max() / b.abs().max()) < 1e-3, key


def test_other_models_bundle_is_not_overwritten(nano, tmp_path):
    _, out, _ = nano
    other = _tts("nano", seed=7)
    dest = tmp_path / "b"
    shutil.copytree(out, dest)
    with pytest.raises(BundleError, match="another model"):
        export(other, dest, components=["t3"])
    assert Manifest.read(dest).model_hash != ""  # still the old, complete bundle


def test_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        export(_tts("nano"), tmp_path, components=["t3"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_truncated_file_is_named(nano, tmp_path):
    _, out, _ = nano
    dest = tmp_path / "b"
    shutil.copytree(out, dest)
    victim = dest / "s3gen_hift.onnx"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(BundleError, match="s3gen_hift.onnx is 1000 bytes"):
        TTS.from_exported(dest)


def test_corrupt_file_is_named_with_verify(nano, tmp_path):
    _, out, _ = nano
    dest = tmp_path / "b"
    shutil.copytree(out, dest)
    victim = dest / "s3gen_hift.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="s3gen_hift.onnx does not match"):
        TTS.from_exported(dest, verify=True)


def test_incomplete_bundle_is_refused(nano, tmp_path):
    _, out, _ = nano
    dest = tmp_path / "b"
    shutil.copytree(out, dest)
    (dest / "manifest.json").unlink()
    with pytest.raises(BundleError, match="did not finish"):
        TTS.from_exported(dest)
    with pytest.raises(BundleError, match="not a directory"):
        TTS.from_exported(tmp_path / "nowhere")


def test_cli_export_then_synth(tmp_path):
    out = tmp_path / "x"
    cli = [sys.executable, "-m", "chatterbox_rt.cli"]
    r = subprocess.run(cli + ["export", "--dummy-weights", "--variant", "nano", "--t3-layers", "1", "--out", str(out),
                              "--components", "t3,s3gen", "--threads", "1"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    assert "t3_decode.onnx" in r.stdout and (out / "manifest.json").is_file()
    wav = tmp_path / "a.wav"
    r = subprocess.run(cli + ["synth", "Hi.", "-o", str(wav), "--bundle", str(out), "--max-new-tokens", "8",
                              "--seed", "1", "--threads", "1", "--no-watermark"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert wav.stat().st_size > 44
    r = subprocess.run(cli + ["export", "--dummy-weights", "--variant", "nano", "--seed", "9", "--t3-layers", "1",
                              "--out", str(out), "--components", "t3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another model" in r.stderr


def test_onnxruntime_backend_streams_as_torch(nano, ort):
    """``stream=True`` on the bundle: the engine streams chunk by chunk through the bundle's graphs,
    with the torch backend's chunk sizes and tokens, the audio within the waveform bound, and the
    chunks adding up to the whole request's result."""
    tts, _, _ = nano
    assert ort.can_stream and tts.can_stream
    kw = dict(seed=4, max_new_tokens=36, stop_on_eos=False, watermark=False, chunk_tokens=10, first_chunk_tokens=6,
              **NEAR_GREEDY)
    got_chunks, want_chunks = [], []
    for model, out in ((ort, got_chunks), (tts, want_chunks)):
        with model.engine(max_batch=1) as eng:
            req = eng.submit("Stream it.", stream=True, **kw)
            out.extend(req.chunks(timeout=600))
            assert req.status == "done"
            if model is ort:
                assert torch.equal(req.result(), torch.cat(out)[None])
                ort_tokens = req.tokens
            else:
                assert torch.equal(ort_tokens, req.tokens)
    assert len(got_chunks) >= 3 and [c.numel() for c in got_chunks] == [c.numel() for c in want_chunks]
    got, want = torch.cat(got_chunks), torch.cat(want_chunks)
    assert float((got - want).abs().max() / want.abs().max()) < 3e-3  # tests/export/test_s3gen_onnx.py WAV_RTOL


@pytest.mark.slow
def test_backend_onnxruntime_exports_once_into_the_cache(tmp_path, monkeypatch):
    """TTS.from_dummy/from_local(..., backend="onnxruntime"): exported once into the export cache
    (keyed by the weights' hash), then loaded from it; the same weights are not exported again."""
    import chatterbox_rt.export.exporter as exporter

    monkeypatch.setenv("CHATTERBOX_RT_EXPORTS", str(tmp_path / "cache"))
    calls = []
    real = exporter.export
    monkeypatch.setattr(exporter, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    over = smaller_backbone("nano", num_layers=1)
    a = TTS.from_dummy("nano", seed=0, backend="onnxruntime", threads=1, **over)
    b = TTS.from_dummy("nano", seed=0, backend="onnxruntime", threads=1, **over)
    assert a.backend == b.backend == "onnxruntime" and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [a.bundle.root.name]
    kw = dict(seed=2, max_new_tokens=6, stop_on_eos=False, watermark=False, temperature=0.05, top_k=1)
    assert torch.equal(a.generate("Hi.", **kw), b.generate("Hi.", **kw))
    with pytest.raises(ValueError, match="dtype=float32"):
        TTS.from_dummy("nano", backend="onnxruntime", dtype=torch.bfloat16)


def test_a_server_on_the_bundle_streams_to_the_openai_client(ort):
    """``chatterbox-rt serve --bundle``'s app over the onnxruntime backend: the openai client's
    streamed PCM is the engine's streamed audio for that seed, and SSE carries it in several deltas."""
    import base64

    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    np = pytest.importorskip("numpy")
    from _server import Running  # tests/ is on sys.path

    defaults = dict(max_new_tokens=30, stop_on_eos=False, watermark=False, chunk_tokens=8, first_chunk_tokens=6)
    with ort.engine(max_batch=2) as eng:
        srv = Running(eng, generate_defaults=defaults)
        url = srv.url
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
            with client.audio.speech.with_streaming_response.create(
                    model="chatterbox", voice="default", input="Streamed from the bundle.", response_format="pcm",
                    extra_body={"seed": 7}) as resp:
                got = b"".join(resp.iter_bytes())
            want = eng.submit("Streamed from the bundle.", seed=7, stream=True, **defaults)
            want = torch.cat(list(want.chunks(timeout=300))).numpy()
            want16 = np.clip(np.rint(np.clip(want, -1, 1) * 32768.0), -32768, 32767).astype("<i2")
            assert np.array_equal(np.frombuffer(got, dtype="<i2"), want16)
            deltas = 0
            body = dict(model="m", voice="default", input="Streamed from the bundle.", response_format="pcm",
                        stream_format="sse", seed=7)
            audio = b""
            with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=300) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"speech.audio.delta"' in line:
                        deltas += 1
                        audio += base64.b64decode(json.loads(line[6:])["audio"])
            assert deltas >= 3 and audio == got
        finally:
            srv.stop()
