"""``chatterbox_rt.vc_eval`` (sweeps of VC's controls, speaker cosines by two encoders) and the
``vc-eval`` command.

Parsing and grids are checked on their own; the sweep runs a full-size dummy S3Gen (one per
module) on short clips (0.5 s of source, 1.2 s of target) with 2 CFM steps, and one row is
recomputed here from ``VC.generate`` and the two encoders directly. With random weights the
cosines mean nothing about speakers, but they are real functions of the output: equal outputs
give equal cosines, and a control that reaches the model moves them."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_rt.audio import resample
from chatterbox_rt.cli import main
from _cli import assert_user_error, run  # noqa: E402 - tests/ is on sys.path (conftest)
from chatterbox_rt.vc import VC, VCControls
from chatterbox_rt.vc_eval import (SWEEPABLE, SweepRow, load_voice_encoder, make_grid, parse_sweep,
                                   sweep)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
CLIP3 = DATA / "speech_en_3s.wav"
SR24, SR16 = 24000, 16000
STEPS = 2
GRID = {"prune_tokens": [0, 4], "speaker_strength": [1.0, 1.3]}
COSINES = ("ve_target", "ve_source", "campplus_target", "campplus_source")


# --------------------------------------------------------------------------- helpers

def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    wav, sr = sf.read(str(CLIP3), dtype="float32")
    d = tmp_path_factory.mktemp("vc_eval_clips")
    parts = {"source": wav[: sr // 2],  # 0.5 s
             "target": wav[sr: sr + 6 * sr // 5],  # 1.2 s: VC needs at least 1 s
             "target2": wav[2 * sr // 5: 2 * sr],  # 1.6 s
             "short": wav[: sr // 2]}  # too short for a target
    out = {}
    for name, w in parts.items():
        out[name] = d / f"{name}.wav"
        sf.write(str(out[name]), w, sr)
    return out


@pytest.fixture(scope="module")
def vc():
    return VC.from_dummy(seed=0, device="cpu")


@pytest.fixture(scope="module")
def ve():
    return load_voice_encoder(dummy_seed=0)


@pytest.fixture(scope="module")
def result(vc, ve, clips):
    return sweep(vc, str(clips["source"]), str(clips["target"]), GRID, ve=ve, seed=0, n_steps=STEPS, warmup=False)


# --------------------------------------------------------------------------- parse_sweep

def test_parse_sweep_values():
    assert parse_sweep("prune_tokens=0,4,8") == ("prune_tokens", [0, 4, 8])
    name, values = parse_sweep("prune_tokens=0,4")
    assert all(type(v) is int for v in values)
    assert parse_sweep("speaker_strength=1.0, 1.3") == ("speaker_strength", [1.0, 1.3])
    assert parse_sweep("speaker-strength=2") == ("speaker_strength", [2.0])  # CLI spelling of the name
    assert parse_sweep("flow_cfg_rate=none,0.5") == ("flow_cfg_rate", [None, 0.5])
    assert parse_sweep("guidance_ramp=1.0:0.5,0.7:0.3") == ("guidance_ramp", [(1.0, 0.5), (0.7, 0.3)])
    assert parse_sweep("speaker_ramp=none,1:1.5") == ("speaker_ramp", [None, (1.0, 1.5)])
    assert parse_sweep("pitch_match=false,true") == ("pitch_match", [False, True])
    assert parse_sweep("pitch_match=0,1,no,yes,off,ON") == ("pitch_match", [False, True, False, True, False, True])
    assert parse_sweep("post=none,clean") == ("post", [None, "clean"])
    assert parse_sweep("max_pitch_shift=none,6") == ("max_pitch_shift", [None, 6.0])


@pytest.mark.parametrize("text, match", [
    ("prune_tokens", "expected NAME=V1,V2"),
    ("prune_tokens=", "expected NAME=V1,V2"),
    ("prune_tokens=  ", "expected NAME=V1,V2"),
    ("loudness=1,2", "'loudness' is not a voice-conversion control"),
    ("prune_tokens=1.5", "is not an integer"),
    ("prune_tokens=four", "is not an integer"),
    ("speaker_strength=big", "is not a number"),
    ("guidance_ramp=1.0", "START:END"),
    ("guidance_ramp=1:2:3", "START:END"),
    ("speaker_ramp=a:b", "START:END of numbers"),
    ("pitch_match=maybe", "not true/false"),
])
def test_parse_sweep_errors(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_sweep(text)
    assert "\n" not in str(e.value)
    if "control" in match:
        assert all(n in str(e.value) for n in SWEEPABLE)  # says what can be swept


# --------------------------------------------------------------------------- make_grid

def test_make_grid_is_the_product_in_order():
    grid = make_grid({"prune_tokens": [0, 4, 8], "speaker_strength": [1.0, 1.3]})
    assert all(isinstance(s, VCControls) for s in grid)
    assert [(s.prune_tokens, s.speaker_strength) for s in grid] == [
        (0, 1.0), (0, 1.3), (4, 1.0), (4, 1.3), (8, 1.0), (8, 1.3)]
    # pairs (what the CLI builds from --sweep) give the same, last name fastest
    pairs = make_grid([parse_sweep("prune_tokens=0,4,8"), parse_sweep("speaker_strength=1.0,1.3")])
    assert pairs == grid
    assert make_grid([("post", [None, "clean"])]) == [VCControls(), VCControls(post="clean")]
    ramps = make_grid({"guidance_ramp": [(1.0, 0.5), [0.7, 0.3]]})  # a list is normalised to a tuple
    assert [s.guidance_ramp for s in ramps] == [(1.0, 0.5), (0.7, 0.3)]


def test_make_grid_takes_settings():
    settings = [VCControls(prune_tokens=2), {"speaker_strength": 1.3}, {"speaker_ramp": [1.0, 1.5]}]
    assert make_grid(settings) == [VCControls(prune_tokens=2), VCControls(speaker_strength=1.3),
                                   VCControls(speaker_ramp=(1.0, 1.5))]
    with pytest.raises(ValueError, match="unknown control"):
        make_grid([{"loudness": 2}])


def test_make_grid_errors():
    with pytest.raises(ValueError, match="swept more than once: prune_tokens"):
        make_grid([("prune_tokens", [0]), ("speaker_strength", [1.0]), ("prune_tokens", [4])])
    with pytest.raises(ValueError, match="not a voice-conversion control"):
        make_grid({"n_steps": [2, 4]})
    with pytest.raises(ValueError, match="speaker_strength has no values"):
        make_grid({"speaker_strength": []})
    # a bad combination names the setting it found in the product
    with pytest.raises(ValueError, match=r"setting flow_cfg_rate=0\.5 guidance_ramp=1:0\.5: .*not both"):
        make_grid({"flow_cfg_rate": [0.5], "guidance_ramp": [None, (1.0, 0.5)]})
    with pytest.raises(ValueError, match="setting speaker_strength=nan: .*finite"):
        make_grid([parse_sweep("speaker_strength=1,nan")])
    with pytest.raises(ValueError, match="setting post=loud: .*unknown post-processing"):
        make_grid([parse_sweep("post=none,loud")])
    with pytest.raises(ValueError, match="setting prune_tokens=-1"):
        make_grid({"prune_tokens": [-1]})
    with pytest.raises(ValueError, match="pitch_tolerance applies only with pitch_match"):
        make_grid({"pitch_tolerance": [2.0]})


# --------------------------------------------------------------------------- rows and verdicts

def _row(setting, ve_shift=0.0, cam_shift=0.0, **kw):
    vals = dict(vc_seconds=1.0, audio_seconds=0.5, ve_target=0.5, ve_source=0.4, campplus_target=0.3,
                campplus_source=0.2)
    vals.update(kw)
    return SweepRow(setting=setting, ve_shift=ve_shift, campplus_shift=cam_shift, **vals)


@pytest.mark.parametrize("shifts, verdict", [
    ((0.01, 0.01), "toward target"),
    ((-0.01, -0.01), "toward source"),
    ((0.01, 0.0), "toward target (one encoder)"),
    ((0.0, -0.01), "toward source (one encoder)"),
    ((0.01, -0.01), "mixed"),
    ((0.001, -0.001), "no change"),  # within SHIFT_EPS
])
def test_verdict(shifts, verdict):
    assert _row({"prune_tokens": 4}, *shifts).verdict == verdict
    assert _row({}, *shifts).verdict == "baseline"


def test_row_json_lists_ramps():
    r = _row({"guidance_ramp": (1.0, 0.5), "prune_tokens": 4}, 0.02, 0.03)
    d = json.loads(json.dumps(r.to_json()))
    assert d["setting"] == {"guidance_ramp": [1.0, 0.5], "prune_tokens": 4}
    assert d["label"] == "guidance_ramp=1:0.5 prune_tokens=4"
    assert d["verdict"] == "toward target"
    assert d["ve_margin"] == pytest.approx(0.1) and d["campplus_margin"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- the sweep

def test_sweep_rows(result):
    labels = [r.label for r in result.rows]
    assert labels == ["default", "speaker_strength=1.3", "prune_tokens=4", "prune_tokens=4 speaker_strength=1.3"]
    assert [r.setting for r in result.rows].count({}) == 1  # the grid's (0, 1.0) is the default: run once
    base = result.baseline
    assert base is result.rows[0] and base.setting == {} and base.verdict == "baseline"
    assert base.ve_shift == 0.0 and base.campplus_shift == 0.0
    for r in result.rows:
        for k in COSINES:
            v = getattr(r, k)
            assert math.isfinite(v) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6, (r.label, k, v)
        assert r.ve_shift == pytest.approx(r.ve_margin - base.ve_margin, abs=1e-12)
        assert r.campplus_shift == pytest.approx(r.campplus_margin - base.campplus_margin, abs=1e-12)
        assert r.vc_seconds > 0 and r.audio_seconds > 0
    assert result.n_steps == STEPS and result.seed == 0
    assert -1.0 - 1e-6 <= result.ve_target_source <= 1.0 + 1e-6
    assert -1.0 - 1e-6 <= result.campplus_target_source <= 1.0 + 1e-6


def test_sweep_row_matches_generate(vc, ve, clips, result):
    """The baseline row, recomputed: VC.generate with the same seed, 16 kHz, each encoder, cosines."""
    wav = vc.generate(str(clips["source"]), target_voice=str(clips["target"]), seed=0, watermark=False,
                      n_steps=STEPS)
    assert wav.numel() / SR24 == result.baseline.audio_seconds  # the same conversion (its length)

    def at16(path):
        w, sr = sf.read(str(path), dtype="float32")
        return resample(w, sr, SR16)

    out16 = resample(wav.reshape(-1).numpy(), SR24, SR16)
    src16, tgt16 = at16(clips["source"]), at16(clips["target"])
    with torch.inference_mode():
        ve_emb = {k: ve.embeds_from_wavs([w], sample_rate=SR16, as_spk=True)
                  for k, w in (("out", out16), ("src", src16), ("tgt", tgt16))}
        cam = vc.s3gen.speaker_encoder
        cam_emb = {k: cam.inference(torch.from_numpy(np.ascontiguousarray(w))[None]).numpy()
                   for k, w in (("out", out16), ("src", src16), ("tgt", tgt16))}
    base = result.baseline
    assert base.ve_target == pytest.approx(cos(ve_emb["out"], ve_emb["tgt"]), abs=1e-5)
    assert base.ve_source == pytest.approx(cos(ve_emb["out"], ve_emb["src"]), abs=1e-5)
    assert base.campplus_target == pytest.approx(cos(cam_emb["out"], cam_emb["tgt"]), abs=1e-5)
    assert base.campplus_source == pytest.approx(cos(cam_emb["out"], cam_emb["src"]), abs=1e-5)
    assert result.campplus_target_source == pytest.approx(cos(cam_emb["tgt"], cam_emb["src"]), abs=1e-5)
    assert result.ve_target_source == pytest.approx(cos(ve_emb["tgt"], ve_emb["src"]), abs=1e-5)


def test_controls_reach_the_model(result):
    by = {r.label: r for r in result.rows}
    base, strong, pruned = by["default"], by["speaker_strength=1.3"], by["prune_tokens=4"]
    # a stronger speaker embedding changes the mel, hence what CAMPPlus hears
    assert abs(strong.campplus_target - base.campplus_target) > 1e-5
    assert strong.audio_seconds == base.audio_seconds
    # 4 tokens of 40 ms fewer: 0.16 s shorter (to a mel frame)
    assert base.audio_seconds - pruned.audio_seconds == pytest.approx(4 * 0.04, abs=0.02)
    assert pruned.campplus_target != base.campplus_target


def test_table(result):
    table = result.table()
    lines = table.splitlines()
    assert lines[0].startswith("vc-eval: ") and "2 CFM steps" in lines[0] and "seed 0" in lines[0]
    assert "target vs source before conversion" in lines[1]
    header = lines[2].split()
    assert header[0] == "setting" and "verdict" in header and "shift" in header
    assert set(lines[3]) <= {"-", " "}
    body = lines[4: 4 + len(result.rows)]
    for line, r in zip(body, result.rows, strict=True):
        assert line.startswith(r.label) and line.rstrip().endswith(r.verdict)
    best = result.best()
    assert lines[-1].startswith("closest to the target (VE + CAMPPlus margin): ") and best.label in lines[-1]
    assert len(lines) == 5 + len(result.rows)


def test_json(result, tmp_path):
    d = json.loads(json.dumps(result.to_json()))
    assert [r["label"] for r in d["rows"]] == [r.label for r in result.rows]
    assert d["rows"][0]["setting"] == {} and d["rows"][0]["verdict"] == "baseline"
    assert d["rows"][3]["setting"] == {"prune_tokens": 4, "speaker_strength": 1.3}
    assert d["best"] == result.best().label
    assert d["n_steps"] == STEPS and d["seed"] == 0 and d["targets"] == result.targets
    for row, r in zip(d["rows"], result.rows, strict=True):
        assert row["campplus_shift"] == r.campplus_shift and row["ve_target"] == r.ve_target
    path = result.save_json(tmp_path / "sweep.json")
    assert json.loads(path.read_text(encoding="utf-8")) == d


def test_plot(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = result.plot(tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_of_a_ramp_and_several_target_clips(vc, ve, clips, tmp_path):
    targets = [str(clips["target"]), str(clips["target2"])]
    res = sweep(vc, str(clips["source"]), targets, [VCControls(guidance_ramp=(1.0, 0.5))], ve=ve, seed=0,
                n_steps=STEPS, warmup=False)
    assert res.targets == targets
    assert [r.label for r in res.rows] == ["default", "guidance_ramp=1:0.5"]
    d = json.loads(res.save_json(tmp_path / "r.json").read_text(encoding="utf-8"))
    assert d["targets"] == targets
    assert d["rows"][1]["setting"] == {"guidance_ramp": [1.0, 0.5]}
    assert all(math.isfinite(getattr(r, k)) for r in res.rows for k in COSINES)
    assert ", ".join(targets) in res.table().splitlines()[0]


def test_rows_do_not_leak_into_each_other(vc, ve, clips, result):
    """The target is prepared once and shared by every row: no control may change it for the next.
    flow_cfg_rate=0.7 is the decoder's own rate, so that row, run last, is the default conversion
    again; with pitch_match in the grid the shared target also carries its median F0, which the
    other rows must ignore."""
    settings = [VCControls(speaker_strength=1.3), VCControls(speaker_ramp=(1.0, 1.5)), VCControls(post="clean")]
    try:
        import parselmouth  # noqa: F401

        settings.append(VCControls(pitch_match=True))
    except ImportError:
        pass
    settings.append(VCControls(flow_cfg_rate=0.7))
    res = sweep(vc, str(clips["source"]), str(clips["target"]), settings, ve=ve, seed=0, n_steps=STEPS, warmup=False)
    assert [r.setting for r in res.rows] == [{}] + [s.changed() for s in settings]
    last = res.rows[-1]
    assert last.label == "flow_cfg_rate=0.7"
    for k in COSINES:
        assert getattr(res.baseline, k) == pytest.approx(getattr(result.baseline, k), abs=1e-6), k
        assert getattr(last, k) == pytest.approx(getattr(result.baseline, k), abs=1e-6), k
    assert last.ve_shift == pytest.approx(0.0, abs=1e-6) and last.campplus_shift == pytest.approx(0.0, abs=1e-6)
    by = {r.label: r for r in res.rows}
    assert by["post=clean"].campplus_target != res.baseline.campplus_target  # post reaches the output


def test_sweep_of_arrays(vc, ve, clips, result):
    """Arrays with their rates give what their files give (one row: the default)."""
    src, sr = sf.read(str(clips["source"]), dtype="float32")
    tgt, tsr = sf.read(str(clips["target"]), dtype="float32")
    res = sweep(vc, src, tgt, [VCControls()], ve=ve, sr=sr, target_sr=tsr, seed=0, n_steps=STEPS, warmup=False)
    assert len(res.rows) == 1 and res.source.startswith("array")
    for k in COSINES:
        assert getattr(res.rows[0], k) == pytest.approx(getattr(result.baseline, k), abs=1e-6)


def test_sweep_errors_before_work(vc, ve, clips, monkeypatch):
    def convert(*a, **k):
        raise AssertionError("converted before the error")

    monkeypatch.setattr(vc, "_convert", convert)
    with pytest.raises(ValueError, match="no target clips"):
        sweep(vc, str(clips["source"]), [], GRID, ve=ve, n_steps=STEPS)
    with pytest.raises(ValueError, match="not both"):
        sweep(vc, str(clips["source"]), str(clips["target"]), {"flow_cfg_rate": [0.5], "guidance_ramp": [(1, 0.5)]},
              ve=ve, n_steps=STEPS)


def test_meanflow_refuses_guidance(ve, clips):
    mf = VC.from_dummy(seed=0, meanflow=True, device="cpu")
    assert mf.s3gen.meanflow
    with pytest.raises(ValueError, match="meanflow"):
        sweep(mf, str(clips["source"]), str(clips["target"]), {"flow_cfg_rate": [0.5]}, ve=ve, n_steps=STEPS)
    with pytest.raises(ValueError, match="meanflow"):
        sweep(mf, str(clips["source"]), str(clips["target"]), {"guidance_ramp": [(1.0, 0.5)]}, ve=ve)


def test_load_voice_encoder_needs_a_source(tmp_path):
    with pytest.raises(ValueError, match="dummy_seed"):
        load_voice_encoder()
    from chatterbox_rt.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no voice encoder"):
        load_voice_encoder(tmp_path)


# --------------------------------------------------------------------------- the CLI

def test_cli_vc_eval(clips, result, tmp_path, capsys):
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["vc-eval", clips["source"], "--target", clips["target"], "--sweep", "prune_tokens=0,2", "--json", js,
            "--n-steps", STEPS, "--no-warmup", "--dummy-weights", "--device", "cpu", "--seed", "0"]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", png]
    except ImportError:
        png = None
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "RANDOM" in err and "meaningless" in err
    assert "closest to the target" in out and "prune_tokens=2" in out
    assert f"wrote {js}" in out
    d = json.loads(js.read_text(encoding="utf-8"))
    assert [r["label"] for r in d["rows"]] == ["default", "prune_tokens=2"]
    assert d["targets"] == [str(clips["target"])] and d["n_steps"] == STEPS
    # the same seeded models, clips and seed as the Python sweep: the same baseline
    for k in COSINES:
        assert d["rows"][0][k] == pytest.approx(getattr(result.baseline, k), abs=1e-6), k
    if png is not None:
        assert f"wrote {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the error under test must come before it."""
    from chatterbox_rt import vc as vc_mod
    from chatterbox_rt import vc_eval

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the error")

    for name in ("from_dummy", "from_local"):
        monkeypatch.setattr(vc_mod.VC, name, classmethod(loaded))
    monkeypatch.setattr(vc_eval, "load_voice_encoder", loaded)


CLI_ERRORS = {
    "unknown sweep name": (["--sweep", "loudness=1,2"], "'loudness' is not a voice-conversion control"),
    "bad value": (["--sweep", "prune_tokens=0,1.5"], "is not an integer"),
    "bad ramp": (["--sweep", "guidance_ramp=1.0"], "START:END"),
    "no '='": (["--sweep", "prune_tokens"], "expected NAME=V1,V2"),
    "swept twice": (["--sweep", "prune_tokens=0", "--sweep", "prune_tokens=4"], "swept more than once"),
    "bad combination": (["--sweep", "flow_cfg_rate=0.5", "--sweep", "guidance_ramp=1:0.5"], "not both"),
    "json dir missing": (["--json", "{tmp}/no/dir/out.json"], "is not a directory"),
    "plot dir missing": (["--plot", "{tmp}/no/dir/out.png"], "is not a directory"),
    "missing source": (["SOURCE={tmp}/nope.wav"], "source audio not found"),
    "missing target": (["TARGET={tmp}/nope.wav"], "target clip not found"),
    "short target": (["TARGET={short}"], "at least 1 s"),
    "bad n-steps": (["--n-steps", "0"], "--n-steps must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_are_one_line_before_loading(case, clips, tmp_path, capsys, no_load):
    extra, match = CLI_ERRORS[case]
    source, target = str(clips["source"]), str(clips["target"])
    opts = []
    for a in extra:
        a = a.replace("{tmp}", str(tmp_path)).replace("{short}", str(clips["short"]))
        if a.startswith("SOURCE="):
            source = a[len("SOURCE="):]
        elif a.startswith("TARGET="):
            target = a[len("TARGET="):]
        else:
            opts.append(a)
    if "--sweep" not in opts:
        opts += ["--sweep", "prune_tokens=0,2"]
    rc, _, err = run(["vc-eval", source, "--target", target, *opts, "--dummy-weights", "--device", "cpu"], capsys)
    assert_user_error(rc, err, match)
    assert not any(tmp_path.glob("*.json"))


def test_cli_needs_a_target(clips, capsys, no_load):
    with pytest.raises(SystemExit) as e:
        main(["vc-eval", str(clips["source"]), "--sweep", "prune_tokens=0,2", "--dummy-weights"])
    assert e.value.code == 2
    assert "--target" in capsys.readouterr().err


@pytest.mark.parametrize("grid, match", [
    ({"post": "clean"}, "must be a list of values"),
    ({"prune_tokens": 4}, "must be a list of values"),
    ({"guidance_ramp": (1.0, 0.5)}, r"a ramp is one value"),
])
def test_make_grid_wants_lists(grid, match):
    with pytest.raises(ValueError, match=match):
        make_grid(grid)
    assert len(make_grid({"prune_tokens": (0, 4)})) == 2  # any other sequence of values is fine
