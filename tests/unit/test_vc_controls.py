"""Voice conversion's controls (``VC.generate``'s prune_tokens, speaker_strength, flow_cfg_rate,
guidance/speaker ramps, several target clips, pitch_match, post), compat ``ChatterboxVC.generate``
and the CLI's flags.

The CFM's per-step rates and speaker inputs are checked against a plain Euler-CFG loop written
here; the VC-level tests use a full-size dummy S3Gen on short clips with 2 CFM steps. At their
defaults the controls must leave the output bit for bit as it was (the reference's parity tests
cover that output against ``ChatterboxVC``)."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_rt.models.s3gen.cfm import CausalCFM, FlowConfig, linear_ramp, time_span
from chatterbox_rt.vc import VC, VCControls

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
SR = 24000
STEPS = 2
# Two float paths through the same arithmetic (a strength folded into spks once vs per step).
CLOSE = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the CFM

SMALL = FlowConfig(num_mid_blocks=1, n_blocks=1)


@pytest.fixture(scope="module")
def cfm():
    torch.manual_seed(0)
    return CausalCFM(SMALL).eval()


def cfm_inputs(T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, cond, noise = (torch.randn(1, 80, T, generator=g) for _ in range(3))
    return mu, torch.randn(1, 80, generator=g), cond, noise


@torch.inference_mode()
def euler_cfg_oracle(cfm, mu, spks_per_step, cond, noise, rates):
    """The reference's solve_euler, one rate and one speaker input per step."""
    n = len(rates)
    t_span = time_span(n, SMALL.t_scheduler)
    x = noise.clone()
    zeros = torch.zeros_like
    for i in range(n):
        t, dt = t_span[i], t_span[i + 1] - t_span[i]
        spks = spks_per_step[i]
        v = cfm.estimator(torch.cat([x, x]), None, torch.cat([mu, zeros(mu)]), t[None],
                          torch.cat([spks, zeros(spks)]), torch.cat([cond, zeros(cond)]))
        x = x + dt * ((1 + rates[i]) * v[:1] - rates[i] * v[1:])
    return x


def test_linear_ramp():
    assert linear_ramp(1.0, 0.5, 1) == [1.0]
    assert linear_ramp(1.0, 0.5, 2) == [1.0, 0.5]
    assert linear_ramp(0.0, 1.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_cfm_per_step_rates_match_the_oracle(cfm):
    mu, spks, cond, noise = cfm_inputs()
    rates = linear_ramp(1.2, 0.3, 4)
    got = cfm(mu, None, spks, cond, n_steps=4, noise=noise, cfg_rates=rates)
    want = euler_cfg_oracle(cfm, mu, [spks] * 4, cond, noise, rates)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the oracle is sensitive to the rates: the default 0.7 everywhere is elsewhere
    assert (got - cfm(mu, None, spks, cond, n_steps=4, noise=noise)).abs().max() > 1e-3


def test_cfm_default_rate_per_step_is_bit_identical(cfm):
    mu, spks, cond, noise = cfm_inputs()
    base = cfm(mu, None, spks, cond, n_steps=3, noise=noise)
    assert torch.equal(cfm(mu, None, spks, cond, n_steps=3, noise=noise, cfg_rates=[SMALL.cfg_rate] * 3), base)
    assert torch.equal(cfm(mu, None, spks, cond, n_steps=3, noise=noise, step_spks=spks.expand(3, 1, 80)), base)


def test_cfm_per_step_speaker_matches_the_oracle(cfm):
    mu, spks, cond, noise = cfm_inputs()
    per_step = [spks * s for s in (0.5, 1.0, 2.0)]
    got = cfm(mu, None, spks, cond, n_steps=3, noise=noise, step_spks=torch.stack(per_step))
    want = euler_cfg_oracle(cfm, mu, per_step, cond, noise, [SMALL.cfg_rate] * 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cfm_control_errors(cfm):
    mu, spks, cond, noise = cfm_inputs()
    with pytest.raises(ValueError, match="3 rates for 2 steps"):
        cfm(mu, None, spks, cond, n_steps=2, noise=noise, cfg_rates=[0.7] * 3)
    with pytest.raises(ValueError, match="meanflow"):
        cfm(mu, None, spks, cond, n_steps=2, noise=noise, cfg_rates=[0.7] * 2, meanflow=True)
    with pytest.raises(ValueError, match="step_spks"):
        cfm(mu, None, spks, cond, n_steps=2, noise=noise, step_spks=spks.expand(3, 1, 80))
    assert cfm.config.cfg_rate == 0.7  # nothing per call touches the shared config


# --------------------------------------------------------------------------- VC

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    wav, sr = sf.read(str(DATA / "speech_en_3s.wav"), dtype="float32")
    d = tmp_path_factory.mktemp("vc_clips")
    # 0.5 s of source; targets of 1.2 s and 1.6 s (VC needs at least 1 s)
    paths = {"source": (wav[: sr // 2]), "target": wav[sr: sr + 6 * sr // 5], "target2": wav[2 * sr // 5: 2 * sr]}
    out = {}
    for name, w in paths.items():
        out[name] = d / f"{name}.wav"
        sf.write(str(out[name]), w, sr)
    return out


@pytest.fixture(scope="module")
def vc():
    return VC.from_dummy(seed=0, device="cpu")


@pytest.fixture(scope="module")
def target(vc, clips):
    return vc.prepare_target(str(clips["target"]))


def convert(vc, clips, target, **controls):
    return vc.generate(str(clips["source"]), target, seed=0, watermark=False, n_steps=STEPS, **controls)


@pytest.fixture(scope="module")
def base(vc, clips, target):
    return convert(vc, clips, target)


@pytest.mark.parametrize("controls", [
    dict(prune_tokens=0, speaker_strength=1.0, flow_cfg_rate=0.7),
    dict(guidance_ramp=(0.7, 0.7)),  # through the per-step rate path
    dict(speaker_ramp=(1.0, 1.0)),  # through the per-step speaker path
    dict(pitch_match=False, post=None),
], ids=["explicit-defaults", "flat-guidance-ramp", "flat-speaker-ramp", "off-switches"])
def test_defaults_leave_the_output_bit_identical(vc, clips, target, base, controls):
    assert torch.equal(convert(vc, clips, target, **controls), base)


def test_default_is_the_plain_s3gen_path(vc, clips, target, base):
    """What VC.generate did before the controls existed: tokens -> s3gen_mel -> s3gen_wav."""
    from chatterbox_rt.tts import make_generator

    tokens = vc.source_tokens(str(clips["source"]))
    g = make_generator(0, vc.device)
    wav = vc.s3gen_wav(vc.s3gen_mel(tokens, target, n_steps=STEPS, generator=g), generator=g)
    assert torch.equal(vc._finish(wav, watermark=False), base)


def test_prune_tokens_drops_the_first_source_tokens(vc, clips, target, base, monkeypatch):
    seen = []
    real = type(vc).s3gen_mel

    def spy(self, tokens, *a, **k):
        seen.append(tokens.clone())
        return real(self, tokens, *a, **k)

    monkeypatch.setattr(type(vc), "s3gen_mel", spy)
    full = vc.source_tokens(str(clips["source"]))
    T = full.size(1)
    out = convert(vc, clips, target, prune_tokens=4)
    assert torch.equal(seen[-1], full[:, 4:])
    # 4 tokens (40 ms each) shorter: 4 x 2 mel frames x 480 samples
    assert out.shape[1] == base.shape[1] - 4 * 960
    out = convert(vc, clips, target, prune_tokens=T)  # not more than N remain: nothing is pruned
    assert torch.equal(seen[-1], full) and torch.equal(out, base)


def test_speaker_strength_scales_the_normalised_xvector(vc, clips, target, base):
    e = target["embedding"]
    affine = vc.s3gen.flow.spk_embed_affine_layer
    want = affine(torch.nn.functional.normalize(e, dim=1) * 1.3)
    torch.testing.assert_close(vc.s3gen.flow.embed_speaker(e, 1.3), want)
    strong = convert(vc, clips, target, speaker_strength=1.3)
    assert strong.shape == base.shape and (strong - base).abs().max() > 1e-4
    ramp = convert(vc, clips, target, speaker_ramp=(1.3, 1.3))  # the per-step path, same values
    torch.testing.assert_close(ramp, strong, **CLOSE)
    assert not torch.allclose(convert(vc, clips, target, speaker_ramp=(1.0, 1.6)), strong, **CLOSE)


def test_flow_cfg_rate_and_guidance_ramp(vc, clips, target, base, monkeypatch):
    w = convert(vc, clips, target, flow_cfg_rate=0.3)
    assert (w - base).abs().max() > 1e-4
    assert torch.equal(convert(vc, clips, target, guidance_ramp=(0.3, 0.3)), w)
    seen = {}
    real = type(vc.s3gen.flow.decoder).forward

    def spy(self, *a, **k):
        seen.update(k)
        return real(self, *a, **k)

    monkeypatch.setattr(type(vc.s3gen.flow.decoder), "forward", spy)
    convert(vc, clips, target, guidance_ramp=(1.0, 0.5))
    assert seen["cfg_rates"] == [1.0, 0.5]
    assert vc.s3gen.flow.decoder.config.cfg_rate == 0.7


def test_several_target_clips(vc, clips, target):
    one = vc.prepare_target([str(clips["target"])])
    assert all(torch.equal(one[k], target[k]) for k in ("prompt_token", "prompt_feat", "embedding"))
    both = vc.prepare_target([str(clips["target"]), str(clips["target2"])])
    longest = vc.prepare_target(str(clips["target2"]))  # 1.6 s against 1.2 s
    assert torch.equal(both["prompt_token"], longest["prompt_token"])
    assert torch.equal(both["prompt_feat"], longest["prompt_feat"])
    torch.testing.assert_close(both["embedding"], (target["embedding"] + longest["embedding"]) / 2)
    out = vc.generate(str(clips["source"]), [str(clips["target"]), str(clips["target2"])], seed=0,
                      watermark=False, n_steps=STEPS)
    assert torch.equal(out, convert(vc, clips, both))
    with pytest.raises(ValueError, match="empty list"):
        vc.prepare_target([])


def test_post_clean_before_the_watermark(vc, clips, target, base):
    from chatterbox_rt.post import apply_post

    assert torch.equal(convert(vc, clips, target, post="clean"), apply_post(base, SR, "clean"))


@pytest.fixture
def no_work(vc, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a bad control must be refused before any work")

    monkeypatch.setattr(type(vc), "source_tokens", fail)
    monkeypatch.setattr(type(vc), "prepare_target", fail)


@pytest.mark.parametrize("controls, error, match", [
    (dict(prune_tokens=-1), ValueError, "prune_tokens must be >= 0"),
    (dict(prune_tokens=1.5), TypeError, "prune_tokens must be an integer"),
    (dict(prune_tokens=True), TypeError, "prune_tokens"),
    (dict(speaker_strength="1.3"), TypeError, "speaker_strength must be a number"),
    (dict(speaker_strength=float("nan")), ValueError, "finite"),
    (dict(speaker_strength=-1.0), ValueError, "speaker_strength must be >= 0"),
    (dict(flow_cfg_rate=float("inf")), ValueError, "finite"),
    (dict(guidance_ramp=(1.0,)), ValueError, r"\(start, end\) pair"),
    (dict(guidance_ramp="1,2"), ValueError, "pair"),
    (dict(flow_cfg_rate=0.5, guidance_ramp=(1.0, 0.5)), ValueError, "not both"),
    (dict(speaker_strength=1.2, speaker_ramp=(1.0, 1.5)), ValueError, "not both"),
    (dict(pitch_tolerance=2.0), ValueError, "only with pitch_match=True"),
    (dict(pitch_match="yes"), TypeError, "pitch_match must be True or False"),
    (dict(post="loud"), ValueError, "clean"),
])
def test_bad_controls_are_refused_before_any_work(vc, clips, target, no_work, controls, error, match):
    with pytest.raises(error, match=match):
        vc.generate(str(clips["source"]), str(clips["target"]), **controls)


@pytest.fixture(scope="module")
def vc_meanflow():
    return VC.from_dummy(seed=0, meanflow=True, device="cpu")


def test_meanflow_has_no_guidance_controls(vc_meanflow, clips):
    target = vc_meanflow.prepare_target(str(clips["target"]))
    src = str(clips["source"])
    for bad in (dict(flow_cfg_rate=0.5), dict(guidance_ramp=(1.0, 0.5))):
        with pytest.raises(ValueError, match="meanflow"):
            vc_meanflow.generate(src, target, **bad)
    base = vc_meanflow.generate(src, target, seed=0, watermark=False)
    assert torch.equal(vc_meanflow.generate(src, target, seed=0, watermark=False, flow_cfg_rate=0.7), base)
    strong = vc_meanflow.generate(src, target, seed=0, watermark=False, speaker_ramp=(1.0, 1.5))
    assert strong.shape == base.shape and (strong - base).abs().max() > 1e-4


def test_engine_cfm_path_takes_no_controls(vc, target):
    tokens = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="cfm= cannot take them"):
        vc.s3gen.flow_mel(tokens, None, target, n_steps=STEPS, cfm=vc.s3gen.flow.decoder, cfg_rate=0.5)


# --------------------------------------------------------------------------- pitch matching

def test_pitch_match_shifts_the_source_toward_the_target(vc, clips, target, base, monkeypatch):
    pytest.importorskip("parselmouth")
    from chatterbox_rt import pitch

    calls = []
    real = pitch.match_pitch

    def spy(wav, sr, f0, **k):
        out = real(wav, sr, f0, **k)
        calls.append((sr, f0, k, out[1]))
        return out

    monkeypatch.setattr(pitch, "match_pitch", spy)
    src, tgt = str(clips["source"]), str(clips["target"])
    out = vc.generate(src, tgt, seed=0, watermark=False, n_steps=STEPS, pitch_match=True, pitch_tolerance=0.0,
                      max_pitch_shift=3.0)
    from chatterbox_rt.audio import load_audio

    want_f0 = pitch.median_f0(load_audio(tgt, target_sr=SR)[0], SR)
    (sr, f0, k, shift), = calls
    assert sr == 16000 and f0 == pytest.approx(want_f0) and k == dict(tolerance=0.0, max_shift=3.0)
    assert out.shape == base.shape  # same length: PSOLA keeps the timing
    # The source and the target are cut from one clip, so only a little shift is planned. A huge
    # tolerance plans none: the source is then tokenised as it is, bit for bit.
    assert abs(shift) <= 3.0
    same = vc.generate(src, tgt, seed=0, watermark=False, n_steps=STEPS, pitch_match=True, pitch_tolerance=48.0)
    assert torch.equal(same, base) and calls[-1][3] == 0.0


def test_pitch_match_needs_the_target_f0(vc, clips, target):
    pytest.importorskip("parselmouth")
    with pytest.raises(ValueError, match="median F0"):
        vc.generate(str(clips["source"]), target, pitch_match=True)  # a dict prepared without f0=True
    with_f0 = vc.prepare_target(str(clips["target"]), f0=True)
    assert with_f0["median_f0"] > 50
    vc.generate(str(clips["source"]), with_f0, n_steps=STEPS, watermark=False, pitch_match=True)
    # a Voice carries it as median_f0 (the voice library's record keeps it)
    from chatterbox_rt.voice import Voice

    gen = {k: v for k, v in target.items() if k != "median_f0"}
    voice = Voice(dummy_t3(), gen, median_f0=with_f0["median_f0"])
    vc.generate(str(clips["source"]), voice, n_steps=STEPS, watermark=False, pitch_match=True)
    with pytest.raises(ValueError, match="median F0"):
        vc.generate(str(clips["source"]), Voice(dummy_t3(), gen), pitch_match=True)


def dummy_t3():
    from chatterbox_rt.tts import dummy_voice

    return dummy_voice(1, seed=0).t3


def test_pitch_match_without_the_extra_says_how_to_install(vc, clips, no_work, monkeypatch):
    from chatterbox_rt import pitch

    def missing():
        raise ImportError("No module named 'parselmouth'")

    monkeypatch.setattr(pitch, "_parselmouth", missing)
    with pytest.raises(ImportError, match=r"pip install 'chatterbox-rt\[vc\]'"):
        vc.generate(str(clips["source"]), str(clips["target"]), pitch_match=True)


# --------------------------------------------------------------------------- compat and CLI

def test_compat_generate_takes_the_controls(vc, clips, monkeypatch):
    from chatterbox_rt.compat import ChatterboxVC

    cvc = ChatterboxVC(vc.s3gen, "cpu")
    seen = []
    monkeypatch.setattr(type(cvc._vc), "_convert", lambda self, audio, ref, controls, **k: seen.append(
        (controls, k)) or torch.zeros(1, 10))
    cvc.generate(str(clips["source"]), str(clips["target"]), prune_tokens=3, speaker_ramp=(1.0, 1.4), post="clean")
    controls, k = seen[-1]
    assert controls == VCControls(prune_tokens=3, speaker_ramp=(1.0, 1.4), post="clean") and k["n_steps"] is None
    cvc.generate(str(clips["source"]))
    assert seen[-1][0] == VCControls()
    with pytest.raises(ValueError, match="prune_tokens"):
        cvc.generate(str(clips["source"]), prune_tokens=-2)


def _run(argv, capsys):
    from chatterbox_rt.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_vc_passes_the_controls(tmp_path, clips, capsys, monkeypatch):
    from chatterbox_rt import vc as vc_mod

    seen = {}

    class StubVC:
        sr, target, source = SR, None, "stub"

        def generate(self, audio, target_voice=None, **kw):
            seen.update(kw, target_voice=target_voice)
            return torch.zeros(1, SR // 10)

    monkeypatch.setattr(vc_mod.VC, "from_dummy", classmethod(lambda cls, **kw: StubVC()))
    out = tmp_path / "o.wav"
    rc, stdout, err = _run(["vc", clips["source"], "--target", clips["target"], "--target", clips["target2"],
                            "-o", out, "--dummy-weights", "--device", "cpu", "--prune-tokens", "4",
                            "--speaker-ramp", "1.0", "1.5", "--flow-cfg-rate", "0.5", "--post", "clean"], capsys)
    assert rc == 0, err
    assert seen["target_voice"] == [str(clips["target"]), str(clips["target2"])]
    assert (seen["prune_tokens"], seen["speaker_ramp"], seen["flow_cfg_rate"], seen["post"]) == \
        (4, (1.0, 1.5), 0.5, "clean")
    assert "speaker_strength" not in seen  # defaults are not passed: generate's own apply
    assert "prune_tokens=4" in stdout


@pytest.mark.parametrize("flags, match", [
    (["--prune-tokens", "-3"], "--prune-tokens must be >= 0"),
    (["--flow-cfg-rate", "0.5", "--guidance-ramp", "1", "0.5"], "--flow-cfg-rate or --guidance-ramp"),
    (["--pitch-tolerance", "2"], "only with --pitch-match"),
])
def test_cli_vc_bad_controls_are_one_line(tmp_path, clips, capsys, monkeypatch, flags, match):
    from chatterbox_rt import vc as vc_mod

    monkeypatch.setattr(vc_mod.VC, "from_dummy", classmethod(lambda cls, **kw: pytest.fail("loaded a model")))
    rc, _, err = _run(["vc", clips["source"], "--target", clips["target"], "-o", tmp_path / "o.wav",
                       "--dummy-weights", "--device", "cpu", *flags], capsys)
    assert rc != 0 and match in err and len(err.strip().splitlines()) == 1, err


def test_voices_add_several_clips(tmp_path, clips, capsys, monkeypatch):
    """``voices add NAME clip1 clip2``: embeddings averaged, the longest clip's prompt, both clips recorded."""
    from chatterbox_rt.voices import VoiceLibrary

    from test_voices import FakeTTS

    lib = VoiceLibrary(tmp_path / "lib")
    a, b = str(clips["target"]), str(clips["target2"])
    voice = lib.add("alice", [a, b], FakeTTS())
    again = FakeTTS()  # a new voice per call: the same two, in order
    va, vb = again.prepare_conditionals(a), again.prepare_conditionals(b)
    spk = (va.t3.speaker_emb + vb.t3.speaker_emb) / 2
    torch.testing.assert_close(voice.t3.speaker_emb, spk / spk.norm())
    torch.testing.assert_close(voice.gen["embedding"], (va.gen["embedding"] + vb.gen["embedding"]) / 2)
    assert torch.equal(voice.gen["prompt_feat"], vb.gen["prompt_feat"])  # target2 is the longer
    info = lib.info("alice")
    assert [Path(c["source"]).name for c in info.clips] == ["target.wav", "target2.wav"]
    assert Path(info.source).name == "target2.wav"
    assert info.duration_s == pytest.approx(1.6, abs=1e-3)
    loaded = lib.get("alice")
    torch.testing.assert_close(loaded.gen["embedding"], voice.gen["embedding"])
    if info.median_f0 is not None:  # measured when the vc extra is installed
        assert loaded.median_f0 == pytest.approx(info.median_f0)
