"""The ``chatterbox-rt`` command run in-process: synth, vc, voices, and one-line user errors.

Models are dummy weights with a 2-layer T3 (the hidden ``--t3-layers`` testing aid) of the Nano
variant; S3Gen is full size. To keep the suite fast, most tests share one loaded TTS (``_load_tts``
is patched); ``test_synth_end_to_end`` goes through the real loading path.
"""
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chatterbox_rt import cli
from chatterbox_rt.cli import main, split_text

DATA = Path(__file__).resolve().parents[1] / "data"
CLIP6 = DATA / "speech_en_6s.wav"  # Nano needs a clip of at least 5 s
CLIP3 = DATA / "speech_en_3s.wav"
SR = 24000
DUMMY = ["--dummy-weights", "--variant", "nano", "--t3-layers", "2", "--device", "cpu"]
FAST = DUMMY + ["--tokens", "6", "--seed", "0"]


@pytest.fixture(scope="module")
def shared_tts(one_thread):
    import torch

    from chatterbox_rt import TTS
    from chatterbox_rt.models.t3 import T3Config

    cfg = T3Config.for_variant("nano")
    return TTS.from_dummy("nano", backbone=dataclasses.replace(cfg.backbone, num_layers=2), device="cpu",
                          dtype=torch.float32)


@pytest.fixture
def fast_load(shared_tts, monkeypatch):
    """Dummy-weight runs get the shared TTS; checkpoint runs and option checks stay real."""
    real = cli._load_tts

    def load(args):
        if args.ckpt:
            return real(args)
        cli._dtype(args.dtype), cli._device(args.device)
        return shared_tts

    monkeypatch.setattr(cli, "_load_tts", load)
    return shared_tts


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, match):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert errors[0].startswith("chatterbox-rt: error: ") and match in errors[0], err


def read_wav(path):
    info = sf.info(str(path))
    assert info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16" and info.format == "WAV"
    wav, _ = sf.read(str(path), dtype="float32")
    assert wav.size > 0 and np.isfinite(wav).all()
    return wav


# --------------------------------------------------------------------------- splitter

def test_split_text():
    assert split_text("Hello there. How are you?", max_chars=12) == ["Hello there.", "How are you?"]
    assert split_text("Hello there. How are you?") == ["Hello there. How are you?"]  # packed
    assert split_text("Pi is 3.14 today!  Yes.\n\nNext line", max_chars=18) == ["Pi is 3.14 today!", "Yes. Next line"]
    assert split_text('"Stop!" she said. Fine', max_chars=10) == ['"Stop!"', "she said.", "Fine"]
    assert split_text("one\ntwo", max_chars=3) == ["one", "two"]
    long = "word, " * 80 + "end."
    chunks = split_text(long, max_chars=100)
    assert all(len(c) <= 100 for c in chunks) and " ".join(chunks) == " ".join(long.split())
    assert all(c.endswith(",") for c in chunks[:-1])
    assert split_text("x" * 250, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50]
    assert split_text("  \n \n") == []


# --------------------------------------------------------------------------- synth

def test_synth_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "out.wav"
    rc, stdout, err = run(["synth", "Hello there. How are you today?", "-o", out, "--voice", CLIP6] + FAST, capsys)
    assert rc == 0, err
    assert "RANDOM" in err and "noise" in err
    assert f"wrote {out}" in stdout and "watermarked" in stdout
    wav = read_wav(out)
    # One chunk: at most 6 + 3 (Turbo/Nano's appended silence) tokens of 40 ms.
    assert len(wav) <= 9 * 960


def test_synth_long_text_joins_chunks(tmp_path, capsys, fast_load):
    out = tmp_path / "long.wav"
    text = "First sentence here. " * 14 + "\nSecond paragraph!"  # > 300 characters: two chunks
    assert len(split_text(text)) == 2
    rc, stdout, err = run(["synth", text, "-o", out, "--no-watermark"] + FAST, capsys)
    assert rc == 0, err
    assert "from 2 chunk(s)" in stdout and "watermarked" not in stdout
    wav = read_wav(out)
    gap = int(cli.SENTENCE_GAP_S * SR)
    assert len(wav) > gap
    nonzero = np.flatnonzero(np.abs(wav) > 0)
    # The silence between the chunks is there (exact zeros of at least gap samples).
    runs = np.diff(nonzero)
    assert runs.max() >= gap


def test_synth_stdin(tmp_path, capsys, fast_load, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Read from standard input.\n"))
    out = tmp_path / "stdin.wav"
    rc, _, err = run(["synth", "-", "-o", out, "--no-watermark"] + FAST, capsys)
    assert rc == 0, err
    read_wav(out)


def test_synth_text_file(tmp_path, capsys, fast_load):
    text = tmp_path / "t.txt"
    text.write_text("Read from a file.\nA second line.", encoding="utf-8")
    out = tmp_path / "file.wav"
    rc, stdout, err = run(["synth", "--text-file", text, "-o", out, "--no-watermark"] + FAST, capsys)
    assert rc == 0, err
    read_wav(out)


def test_voices_round_trip(tmp_path, capsys, fast_load):
    lib = tmp_path / "lib"
    rc, _, err = run(["voices", "list", "--library", lib], capsys)
    assert rc == 0
    rc, stdout, err = run(["voices", "add", "alice", CLIP6, "--library", lib, "--exaggeration", "0.6"] + DUMMY, capsys)
    assert rc == 0, err
    assert "added voice 'alice'" in stdout and (lib / "alice.pt").is_file() and (lib / "alice.json").is_file()

    rc, stdout, _ = run(["voices", "list", "--library", lib], capsys)
    assert rc == 0
    header, row = stdout.splitlines()[1:3]
    assert header.split() == ["NAME", "VARIANT", "DURATION", "CREATED"]
    assert row.split()[:3] == ["alice", "nano", f"{sf.info(str(CLIP6)).duration:.1f}"]

    rc, _, err = run(["voices", "add", "alice", CLIP6, "--library", lib] + DUMMY, capsys)
    assert_user_error(rc, err, "--overwrite")
    rc, _, err = run(["voices", "add", "alice", CLIP6, "--library", lib, "--overwrite"] + DUMMY, capsys)
    assert rc == 0, err

    out = tmp_path / "id.wav"
    rc, _, err = run(["synth", "Hi.", "-o", out, "--voice-id", "alice", "--library", lib, "--no-watermark"] + FAST,
                     capsys)
    assert rc == 0, err
    read_wav(out)

    rc, stdout, _ = run(["voices", "remove", "alice", "--library", lib], capsys)
    assert rc == 0 and "removed" in stdout
    rc, stdout, _ = run(["voices", "list", "--library", lib], capsys)
    assert "no voices" in stdout
    rc, _, err = run(["voices", "remove", "alice", "--library", lib], capsys)
    assert_user_error(rc, err, "no voice named 'alice'")


def test_library_from_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHATTERBOX_RT_VOICES", str(tmp_path / "envlib"))
    rc, stdout, _ = run(["voices", "list"], capsys)
    assert rc == 0 and str(tmp_path / "envlib") in stdout


# --------------------------------------------------------------------------- vc

def test_vc_writes_wav(tmp_path, capsys, one_thread):
    wav, sr = sf.read(str(CLIP3), dtype="float32")
    # Short clips keep the full-size CFM quick (its cost grows with prompt + source frames).
    source, target = tmp_path / "source.wav", tmp_path / "target.wav"
    sf.write(str(source), wav[: sr // 2], sr)
    sf.write(str(target), wav[sr: sr + 6 * sr // 5], sr)  # 1.2 s: VC needs at least 1 s
    out = tmp_path / "vc.wav"
    rc, stdout, err = run(["vc", source, "--target", target, "-o", out, "--dummy-weights", "--device", "cpu",
                           "--seed", "0", "--no-watermark"], capsys)
    assert rc == 0, err
    assert "RANDOM" in err and f"wrote {out}" in stdout
    out_wav = read_wav(out)
    assert abs(len(out_wav) - SR // 2) <= 2 * 960  # the source's length, to a speech token or two


def test_vc_target_id_uses_library_voice(tmp_path, capsys, monkeypatch):
    import torch

    from chatterbox_rt import vc as vc_mod

    lib = _voice_lib_with(tmp_path, "turbo")  # any variant's voice fits VC (it reads the S3Gen part)
    seen = {}

    class StubVC:
        sr, source = SR, "stub"

        def generate(self, audio, target_voice=None, **kw):
            seen["target"] = target_voice
            return torch.zeros(1, SR // 10)

    monkeypatch.setattr(vc_mod.VC, "from_dummy", classmethod(lambda cls, **kw: StubVC()))
    out = tmp_path / "vc.wav"
    rc, _, err = run(["vc", CLIP3, "--target-id", "llama", "--library", lib, "-o", out, "--dummy-weights",
                      "--no-watermark"], capsys)
    assert rc == 0, err
    assert seen["target"].gen["prompt_feat"].shape[-1] == 80
    assert sf.info(str(out)).frames == SR // 10


# --------------------------------------------------------------------------- user errors

def _voice_lib_with(tmp_path, variant):
    from chatterbox_rt.tts import dummy_voice
    from chatterbox_rt.voices import VoiceLibrary

    class Fake:
        def __init__(self):
            self.variant = variant

        def prepare_conditionals(self, wav, sr=None, exaggeration=0.5):
            return dummy_voice(150 if variant in ("chatterbox", "multilingual") else 375)

    lib = VoiceLibrary(tmp_path / "lib")
    lib.add("llama", CLIP3, Fake())
    return lib.root


ERROR_CASES = {
    "missing voice clip": (["synth", "Hi.", "-o", "{tmp}/x.wav", "--voice", "{tmp}/nope.wav"] + FAST,
                           "voice clip not found"),
    "missing source": (["vc", "{tmp}/nope.wav", "-o", "{tmp}/x.wav", "--dummy-weights"], "source audio not found"),
    "missing target": (["vc", str(CLIP3), "--target", "{tmp}/nope.wav", "-o", "{tmp}/x.wav", "--dummy-weights"],
                       "target clip not found"),
    "missing text file": (["synth", "--text-file", "{tmp}/nope.txt", "-o", "{tmp}/x.wav"] + FAST,
                          "text file not found"),
    "empty text": (["synth", "   ", "-o", "{tmp}/x.wav"] + FAST, "the text is empty"),
    "no text": (["synth", "-o", "{tmp}/x.wav"] + FAST, "no text"),
    "text twice": (["synth", "Hi", "--text-file", str(CLIP3), "-o", "{tmp}/x.wav"] + FAST, "not both"),
    "no model": (["synth", "Hi.", "-o", "{tmp}/x.wav"], "--ckpt DIR"),
    "missing checkpoint dir": (["synth", "Hi.", "-o", "{tmp}/x.wav", "--ckpt", "{tmp}/nockpt"],
                               "checkpoint directory not found"),
    "missing checkpoint file": (["synth", "Hi.", "-o", "{tmp}/x.wav", "--ckpt", "{tmp}"], "no T3 checkpoint"),
    "vc missing checkpoint file": (["vc", str(CLIP3), "-o", "{tmp}/x.wav", "--ckpt", "{tmp}"], "no S3Gen checkpoint"),
    "output dir missing": (["synth", "Hi.", "-o", "{tmp}/no/dir/x.wav"] + FAST, "does not exist"),
    "bad name": (["voices", "add", "../evil", str(CLIP3), "--library", "{tmp}"] + DUMMY, "invalid voice name"),
    "missing voice id": (["synth", "Hi.", "-o", "{tmp}/x.wav", "--voice-id", "ghost", "--library", "{tmp}"] + FAST,
                         "no voice named 'ghost'"),
    "missing target id": (["vc", str(CLIP3), "--target-id", "ghost", "--library", "{tmp}", "-o", "{tmp}/x.wav",
                           "--dummy-weights"], "no voice named 'ghost'"),
    "remove missing": (["voices", "remove", "ghost", "--library", "{tmp}"], "no voice named 'ghost'"),
    "layers without dummy": (["synth", "Hi.", "-o", "{tmp}/x.wav", "--ckpt", "{tmp}", "--t3-layers", "2"],
                             "testing aid"),
    "bad dtype": (["synth", "Hi.", "-o", "{tmp}/x.wav", "--dtype", "int3"] + FAST, "unknown --dtype"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line(case, tmp_path, capsys, fast_load):
    argv, match = ERROR_CASES[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, err = run(argv, capsys)
    assert_user_error(rc, err, match)


def test_bad_audio_is_one_line(tmp_path, capsys, fast_load):
    bad = tmp_path / "bad.wav"
    bad.write_text("this is not audio")
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--voice", bad] + FAST, capsys)
    assert_user_error(rc, err, "cannot read as audio")
    rc, _, err = run(["voices", "add", "v", bad, "--library", tmp_path / "lib"] + DUMMY, capsys)
    assert_user_error(rc, err, "cannot read as audio")
    assert not (tmp_path / "lib" / "v.json").exists()


def test_short_clip_is_one_line(tmp_path, capsys, fast_load):
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--voice", CLIP3] + FAST, capsys)
    assert_user_error(rc, err, "at least 5 s")


def test_variant_mismatch_is_one_line(tmp_path, capsys, fast_load):
    lib = _voice_lib_with(tmp_path, "chatterbox")
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--voice-id", "llama", "--library", lib] + FAST,
                     capsys)
    assert_user_error(rc, err, "prepared for chatterbox")


def test_watermark_unavailable_is_one_line(tmp_path, capsys, fast_load, monkeypatch):
    from chatterbox_rt import watermark

    def unavailable(device="cpu"):
        raise watermark._unavailable("resemble-perth is not installed")

    monkeypatch.setattr(watermark, "get_watermarker", unavailable)
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav"] + FAST, capsys)
    assert_user_error(rc, err, "--no-watermark")
    assert not (tmp_path / "x.wav").exists()
