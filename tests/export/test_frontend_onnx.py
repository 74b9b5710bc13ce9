"""The voice front ends exported to ONNX (chatterbox_rt.export.frontend_onnx) and run on onnxruntime
(chatterbox_rt.export.ort_frontends), against the torch modules, on seeded random weights.

Tolerances are the parity tests': voice-encoder embeddings atol 1e-5, x-vector relative (norm)
error 1e-4, log-mels atol 1e-4 (prompt mel, fbank) and 1e-5 (tokenizer), speech tokens identical
except where torch itself sits within FSQ_BOUNDARY_MARGIN of an FSQ rounding boundary.
The tokenizer is a small one (2 layers, width 128; the graph code is the same at full size).
"""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from _assert import assert_close  # noqa: E402
from chatterbox_rt.audio import load_audio, resample  # noqa: E402
from chatterbox_rt.export._onnx import ExportError, check_graph, export_graph, open_session, save_model  # noqa: E402
from chatterbox_rt.export.frontend_onnx import (  # noqa: E402
    DFT_DTYPES, FRONTEND_GRAPHS, FSQ_BOUNDARY_MARGIN, TOL, KaldiFbank, PromptMelGraph, S3TokenizerGraph,
    VoiceEncoderGraph, check_signal, compare_tokens, export_frontends, fsq_margins, prompt_mel_spec,
    voice_encoder_spec)
from chatterbox_rt.export.ort_frontends import (  # noqa: E402
    OrtFrontEnds, OrtFrontEndsMixin, OrtVoiceEncoder, load_frontends_config)
from chatterbox_rt.export.spec import Dim, GraphSpec, T  # noqa: E402
from chatterbox_rt.models.campplus import CAMPPlus, kaldi_fbank  # noqa: E402
from chatterbox_rt.models.resample import sinc_resample  # noqa: E402
from chatterbox_rt.models.s3gen.mel import mel_spectrogram  # noqa: E402
from chatterbox_rt.models.s3gen.s3gen import S3Gen  # noqa: E402
from chatterbox_rt.models.s3tokenizer import S3Tokenizer, S3TokenizerConfig  # noqa: E402
from chatterbox_rt.models.voice_encoder import VoiceEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SR16, SR24 = 16000, 24000
SPEECH = Path(__file__).parent.parent / "data" / "speech_en_3s.wav"
SMALL_TOK = S3TokenizerConfig(n_state=128, n_head=2, n_layer=2)
# Odd lengths off every hop (160, 480, 640 samples).
SECONDS = [1.3, 3.7]
ATOL_EMBED = 1e-5  # test_voice_encoder_parity
XVEC_RTOL = 1e-4  # test_campplus_parity (norm of the difference / norm)
ATOL_LOG_MEL = 1e-4  # test_audio_parity / test_s3gen_parity (prompt mel), test_campplus_parity (fbank)
ATOL_TOK_MEL = 1e-5  # test_s3tokenizer_parity


def n_samples(seconds, sr):
    return int(seconds * sr) | 1


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models():
    """Voice encoder (uniform +-0.15, as its parity test), CAM++ (moderate weights and BatchNorm
    statistics, as its unit test), a small tokenizer (fan-in scaled, as its unit test)."""
    torch.manual_seed(1234)
    ve = VoiceEncoder().eval()
    with torch.no_grad():
        for p in ve.parameters():
            p.uniform_(-0.15, 0.15)
    g = torch.Generator().manual_seed(0)
    camp = CAMPPlus()
    with torch.no_grad():
        for name, p in camp.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in camp.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    tok = S3Tokenizer(SMALL_TOK)
    with torch.no_grad():
        for p in tok.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    s3gen = SimpleNamespace(tokenizer=tok.eval(), speaker_encoder=camp.eval(), device=torch.device("cpu"))
    return ve, s3gen


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory):
    ve, s3gen = models
    out = tmp_path_factory.mktemp("frontends")
    res = export_frontends(ve, s3gen, out, opset=17, threads=1)
    return out, res


@pytest.fixture(scope="module")
def fe(bundle):
    out, res = bundle
    return OrtFrontEnds.load(out, res.config, threads=1)


@pytest.fixture(scope="module")
def speech24():
    wav, _ = load_audio(SPEECH, target_sr=SR24)
    return wav


def torch_embed_ref(s3gen, wav24, wav16=None):
    """S3Gen.embed_ref on the test's parts (its method, without building the flow and HiFT)."""
    return S3Gen.embed_ref(s3gen, wav24, wav16)


def assert_tokens(got, want, margins, what):
    cmp = compare_tokens(got, want, margins)
    print(f"{what}: {cmp}")
    assert cmp["unexplained"] == 0, f"{what}: tokens differ away from an FSQ boundary: {cmp}"
    return cmp


# ------------------------------------------------------------------------------------- export


def test_export_writes_and_checks_every_graph(bundle):
    out, res = bundle
    assert res.component == "frontends" and res.extras == {}
    assert [g.spec.name for g in res.graphs] == list(FRONTEND_GRAPHS)
    for g in res.graphs:
        assert (out / g.spec.file).is_file()
        print(g.spec.name, g.check)
        assert g.check["cases"] >= 3, g.spec.name
        assert g.check["max_rel_error"] <= TOL[g.spec.name]
    tok = res.graphs[FRONTEND_GRAPHS.index("s3_tokenizer")].check["tokens"]
    assert tok["unexplained"] == 0 and tok["compared"] > 100
    json.dumps(res.config)  # the manifest stores it
    assert res.config["graphs"] == {n: f"{n}.onnx" for n in FRONTEND_GRAPHS}


def test_graph_names_and_dynamic_axes(bundle):
    import onnx

    out, res = bundle
    for g in res.graphs:
        model = onnx.load(str(out / g.spec.file), load_external_data=False)
        got = {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}
        assert got == {"inputs": g.spec.input_names, "outputs": g.spec.output_names}, g.spec.name
        values, specs = list(model.graph.input) + list(model.graph.output), list(g.spec.inputs) + list(g.spec.outputs)
        for vi, ts in zip(values, specs, strict=True):
            dims = vi.type.tensor_type.shape.dim
            assert len(dims) == len(ts.axes), f"{g.spec.name}.{ts.name}"
            for d, a in zip(dims, ts.axes):
                if isinstance(a, str):
                    assert d.dim_param == a, f"{g.spec.name}.{ts.name}: axis {a} is not dynamic"
                elif vi in model.graph.input:  # (output sizes the exporter computes may stay symbolic)
                    assert d.dim_value == a, f"{g.spec.name}.{ts.name}: {d} != {a}"


def test_check_catches_a_wrong_graph(models, tmp_path):
    """The export check compares for real: a graph of other weights fails it."""
    ve, _ = models
    spec = voice_encoder_spec()
    other = VoiceEncoder().eval()
    with torch.no_grad():
        for p, q in zip(other.parameters(), ve.parameters()):
            p.copy_(q * 1.01)
    path = save_model(export_graph(VoiceEncoderGraph(other), (torch.rand(2, 160, 40),), spec, tmp_path),
                      tmp_path / spec.file)
    with pytest.raises(ExportError, match="partial_embeds differs from torch"):
        check_graph(path, spec, lambda mel_partials: ve(mel_partials), [{"mel_partials": torch.rand(3, 160, 40)}],
                    tol=TOL["voice_encoder"], threads=1)


# ------------------------------------------------------------------------- DFT products vs FFTs


def _subgraph(module, example, name, out_axes, tmp_path):
    spec = GraphSpec(name, "frontend", inputs=[T("wav", "float32", 1, "n")],
                     outputs=[T("out", "float32", *out_axes)], dims={"n": Dim(8000, 16000, 480000)})
    save_model(export_graph(module, (example,), spec, tmp_path), tmp_path / spec.file)
    return open_session(tmp_path / spec.file, threads=1)


class _TokMel(torch.nn.Module):
    def __init__(self, tok):
        super().__init__()
        self.g = S3TokenizerGraph(tok)

    def forward(self, wav):
        return self.g.log_mel(wav)


def tokenizer_log_mel_f64(tok, wav):
    """S3Tokenizer.log_mel_spectrogram computed in float64 throughout (the exact value to ~1e-12)."""
    c = tok.config
    x = torch.from_numpy(wav).double()
    stft = torch.stft(x, c.n_fft, c.hop, window=tok.window.double(), return_complex=True)
    mel = tok._mel_filters.double() @ stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(mel, min=c.log_floor).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - c.dynamic_range)
    return (log_spec + c.log_offset) / c.log_scale


@pytest.mark.parametrize("seconds", SECONDS)
def test_tokenizer_log_mel_graph_matches_torch(models, tmp_path, seconds):
    """Within ATOL_TOK_MEL of torch, or, on quiet frames where torch's own float32 FFT is off by
    more than that, no further from the exact value than torch (the STYLE rule: at most twice)."""
    tok = models[1].tokenizer
    sess = _subgraph(_TokMel(tok), torch.randn(1, 16000) * 0.1, "tok_mel", (1, 128, "t"), tmp_path)
    wav = check_signal(n_samples(seconds, SR16), SR16, seed=int(seconds * 10))
    got = sess.run(None, {"wav": wav[None]})[0][0]
    want = tok.log_mel_spectrogram(torch.from_numpy(wav)).numpy()
    exact = tokenizer_log_mel_f64(tok, wav).numpy()
    torch_err, ort_err = np.abs(want - exact).max(), np.abs(got - exact).max()
    print(f"tokenizer log-mel {seconds}s: max abs error vs float64: torch {torch_err:.3g}, onnxruntime {ort_err:.3g}")
    assert ort_err <= 2 * torch_err + 1e-6
    assert_close(f"tokenizer log-mel {seconds}s", got, want, rtol=0, atol=max(ATOL_TOK_MEL, 2 * torch_err))


@pytest.mark.parametrize("seconds", SECONDS)
def test_kaldi_fbank_graph_matches_torch(tmp_path, seconds):
    sess = _subgraph(KaldiFbank(), torch.randn(1, 16000) * 0.1, "fbank", (1, "t", 80), tmp_path)
    wav = check_signal(n_samples(seconds, SR16), SR16, seed=int(seconds * 10)) + 0.02  # a DC offset: Kaldi removes it
    got = sess.run(None, {"wav": wav[None]})[0][0]
    want = kaldi_fbank(torch.from_numpy(wav)).numpy()
    assert_close(f"kaldi fbank {seconds}s", got, want, rtol=0, atol=ATOL_LOG_MEL)


def test_float32_dft_is_as_accurate_as_torch_fft(speech24, tmp_path):
    """dft_dtype="float32" (for TensorRT): its distance from the exact (float64) prompt mel is at
    most twice torch's float32 FFT's, on speech with quiet frames; the float64 default is closer."""
    wav = torch.from_numpy(speech24)[None]
    exact = mel_spectrogram(wav.double()).transpose(1, 2)
    torch_err = float((mel_spectrogram(wav).transpose(1, 2) - exact).abs().max())
    errs = {}
    for name, dtype in DFT_DTYPES.items():
        spec = prompt_mel_spec()
        spec.name = f"prompt_mel_{name}"
        save_model(export_graph(PromptMelGraph(dft_dtype=dtype), (wav[:, :24000],), spec, tmp_path),
                   tmp_path / spec.file)
        got = open_session(tmp_path / spec.file, threads=1).run(None, {"wav_24k": wav.numpy()})[0]
        errs[name] = float((torch.from_numpy(got).double() - exact).abs().max())
    print(f"prompt mel, max abs error vs float64: torch {torch_err:.3g}, graphs {errs}")
    assert errs["float32"] <= 2 * torch_err + 1e-6
    assert errs["float64"] <= 0.5 * torch_err


# ------------------------------------------------------------------------- onnxruntime front ends


@pytest.mark.parametrize("kwargs", [{}, {"batch_size": 3}, {"rate": None, "overlap": 0.25}, {"trim_top_db": None},
                                    {"as_spk": True}])
def test_voice_encoder_embeddings(models, fe, kwargs):
    ve, _ = models
    wavs = [check_signal(n_samples(s, SR16), SR16, seed=10 + i) for i, s in enumerate([1.3, 3.7, 7.0])]
    want = ve.embeds_from_wavs(wavs, SR16, **kwargs)
    got = fe.ve.embeds_from_wavs(wavs, SR16, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(f"voice encoder {kwargs}", got, want, rtol=0, atol=ATOL_EMBED)


def test_voice_encoder_loads_from_bundle_dir(models, bundle):
    ve, _ = models
    out, res = bundle
    ort_ve = OrtVoiceEncoder.load(out, res.config, threads=1)  # as chatterbox_rt.export.ort_backend loads it
    wav = check_signal(n_samples(2.2, SR16), SR16, seed=5)
    assert_close("voice encoder (bundle dir)", ort_ve.embeds_from_wavs([wav], SR16), ve.embeds_from_wavs([wav], SR16),
                 rtol=0, atol=ATOL_EMBED)


@pytest.mark.parametrize("seconds", SECONDS)
def test_xvector(models, fe, seconds):
    camp = models[1].speaker_encoder
    wav = torch.from_numpy(check_signal(n_samples(seconds, SR16), SR16, seed=6))[None]
    want = camp.inference(wav)
    got = fe.speaker_encoder.inference(wav)
    assert want.std() > 1e-2, "degenerate random weights"
    err = rel_err(got, want)
    print(f"x-vector {seconds}s: rel err {err:.3e}")
    assert got.shape == (1, 192) and err <= XVEC_RTOL


def test_xvector_batch_of_equal_lengths(models, fe):
    camp = models[1].speaker_encoder
    wavs = torch.stack([torch.from_numpy(check_signal(n_samples(1.3, SR16), SR16, seed=s)) for s in (7, 8)])
    got, want = fe.speaker_encoder.inference(wavs), camp.inference(wavs)
    assert got.shape == (2, 192) and rel_err(got, want) <= XVEC_RTOL
    with pytest.raises(ValueError, match="one length"):
        fe.speaker_encoder.inference([wavs[0], wavs[1, :-100]])


@pytest.mark.parametrize("seconds, max_len", [(1.3, None), (3.7, None), (3.7, 40), (2.0, 1)])
def test_tokens(models, fe, seconds, max_len):
    tok = models[1].tokenizer
    wav = torch.from_numpy(check_signal(n_samples(seconds, SR16) + 36, SR16, seed=9))
    want, want_lens = tok([wav], max_len=max_len)
    got, got_lens = fe.tokenizer([wav], max_len=max_len)
    assert got.dtype == got_lens.dtype == torch.long
    assert got_lens.tolist() == want_lens.tolist() and got.shape == want.shape
    assert_tokens(got.numpy(), want, fsq_margins(tok, wav, max_len), f"tokens {seconds}s max_len={max_len}")
    if max_len is None:
        assert len(set(want[0].tolist())) > 5, "degenerate random weights: tokens barely vary"


def test_tokens_batch_is_padded_single_runs(models, fe):
    tok = models[1].tokenizer
    wavs = [torch.from_numpy(check_signal(n, SR16, seed=20 + i)) for i, n in enumerate([20837, 32001, 9001])]
    want, want_lens = tok(wavs)
    got, got_lens = fe.tokenizer(wavs)
    assert got_lens.tolist() == want_lens.tolist() and got.shape == want.shape
    for b, n in enumerate(want_lens.tolist()):
        assert_tokens(got[b: b + 1, :n].numpy(), want[b: b + 1, :n], fsq_margins(tok, wavs[b]), f"batch row {b}")
        assert (got[b, n:] == 0).all()


def test_tokenizer_refuses_what_it_cannot_do(fe):
    with pytest.raises(ValueError, match="at most 3000 mel frames"):
        fe.tokenizer([np.zeros(16000 * 30 + 160, np.float32)])
    with pytest.raises(ValueError, match="too short"):
        fe.tokenizer([np.zeros(200, np.float32)])
    with pytest.raises(ValueError, match="max_len"):
        fe.tokenizer([np.zeros(16000, np.float32)], max_len=0)


@pytest.mark.parametrize("seconds", SECONDS)
def test_prompt_mel(fe, seconds):
    wav = torch.from_numpy(check_signal(n_samples(seconds, SR24), SR24, seed=int(seconds * 10)))
    want = mel_spectrogram(wav).transpose(1, 2)
    got = fe.prompt_mel(wav)
    assert got.shape == want.shape == (1, wav.numel() // 480, 80)
    assert_close(f"prompt mel {seconds}s", got.numpy(), want.numpy(), rtol=0, atol=ATOL_LOG_MEL)


@pytest.mark.parametrize("given_16k", [False, True])
def test_embed_ref_dict(models, fe, speech24, given_16k):
    _, s3gen = models
    wav16 = sinc_resample(torch.from_numpy(speech24)[None], SR24, SR16)[:, :-77] if given_16k else None
    want = torch_embed_ref(s3gen, speech24, wav16)
    got = fe.embed_ref(speech24, wav16)
    assert set(got) == set(want) and got["prompt_feat_len"] is None
    for k in ("prompt_token", "prompt_token_len", "prompt_feat", "embedding"):
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
    assert got["prompt_token_len"].tolist() == want["prompt_token_len"].tolist()
    assert got["prompt_feat"].shape[1] // 2 == got["prompt_token"].shape[1]
    assert_close("prompt_feat", got["prompt_feat"].numpy(), want["prompt_feat"].numpy(), rtol=0, atol=ATOL_LOG_MEL)
    assert rel_err(got["embedding"], want["embedding"]) <= XVEC_RTOL
    w16 = wav16[0] if given_16k else sinc_resample(torch.from_numpy(speech24)[None], SR24, SR16)[0]
    margins = fsq_margins(s3gen.tokenizer, w16)[:, : want["prompt_token"].shape[1]]
    assert_tokens(got["prompt_token"].numpy(), want["prompt_token"], margins, "embed_ref tokens")
    with pytest.raises(ValueError, match="one clip"):
        fe.embed_ref(np.zeros((2, 24000), np.float32))


def test_prepare_conditionals_on_onnxruntime(models, fe, speech24):
    """TTS.prepare_conditionals with the onnxruntime front ends in place of S3Gen's and the voice
    encoder gives the torch voice (speaker embedding, T3 prompt tokens, S3Gen dict)."""
    from chatterbox_rt.tts import TTS

    ve, s3gen = models
    t3 = SimpleNamespace(config=SimpleNamespace(speech_cond_prompt_len=150))

    class OrtS3GenStandIn(OrtFrontEndsMixin):
        frontends = fe

    torch_voice = SimpleNamespace(variant="chatterbox", t3=t3, ve=ve, device=torch.device("cpu"),
                                  s3gen=SimpleNamespace(embed_ref=lambda w, w16=None: torch_embed_ref(s3gen, w, w16),
                                                        tokenizer=s3gen.tokenizer))
    ort_voice = SimpleNamespace(variant="chatterbox", t3=t3, ve=fe.ve, device=torch.device("cpu"),
                                s3gen=OrtS3GenStandIn())
    want = TTS.prepare_conditionals(torch_voice, speech24, SR24)
    got = TTS.prepare_conditionals(ort_voice, speech24, SR24)
    assert_close("speaker_emb", got.t3.speaker_emb.numpy(), want.t3.speaker_emb.numpy(), rtol=0, atol=ATOL_EMBED)
    wt, gt = want.t3.cond_prompt_speech_tokens, got.t3.cond_prompt_speech_tokens
    assert gt.shape == wt.shape and gt.dtype == wt.dtype
    wav16 = torch.from_numpy(resample(speech24, SR24, SR16))  # as prepare_conditionals makes it
    assert (gt != wt).sum() <= (fsq_margins(s3gen.tokenizer, wav16[: 6 * SR16], 150) < FSQ_BOUNDARY_MARGIN).sum()
    assert_close("voice prompt_feat", got.gen["prompt_feat"].numpy(), want.gen["prompt_feat"].numpy(), rtol=0,
                 atol=ATOL_LOG_MEL)
    assert rel_err(got.gen["embedding"], want.gen["embedding"]) <= XVEC_RTOL


# ------------------------------------------------------------------------------------- loading


def test_load_config_forms(bundle, tmp_path):
    out, res = bundle
    assert load_frontends_config(out, res.config)["graphs"] == res.config["graphs"]
    manifest = {"components": {"frontends": {"config": res.config, "graphs": list(FRONTEND_GRAPHS)}}}
    assert load_frontends_config(out, manifest)["voice_encoder"] == res.config["voice_encoder"]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    assert load_frontends_config(out, tmp_path / "m.json")["s3_tokenizer"] == res.config["s3_tokenizer"]
    assert load_frontends_config(tmp_path)["graphs"] == res.config["graphs"]  # no file: the defaults
    with pytest.raises(FileNotFoundError, match="campplus"):
        OrtFrontEnds.load(tmp_path, res.config)
