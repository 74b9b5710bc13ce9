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
from _cli import assert_user_error, run  # noqa: E402 - tests/ is on sys.path (conftest)

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


# --------------------------------------------------------------------------- issue 17: rough edges

@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the error under test must come before it."""
    from chatterbox_rt import tts as tts_mod
    from chatterbox_rt import vc as vc_mod
    from chatterbox_rt.models.t3 import T3

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the error")

    for cls, names in ((tts_mod.TTS, ("from_dummy", "from_local")), (vc_mod.VC, ("from_dummy", "from_local")),
                       (T3, ("from_dummy", "from_local"))):
        for name in names:
            monkeypatch.setattr(cls, name, classmethod(loaded))
    monkeypatch.setattr(cli, "_load_tts", loaded)


def fake_ckpt(root, files=("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors", "tokenizer.json",
                           "conds.pt")):
    """A directory with the official file names (empty files: for checks that only look at names)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).write_bytes(b"")
    return root


def write_clip(path, wav, sr=SR, subtype="PCM_16"):
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sr, subtype=subtype)
    return path


CUDA = pytest.importorskip("torch").cuda.is_available()
MODEL_COMMANDS = {
    "synth": ["synth", "Hi.", "-o", "{tmp}/x.wav"] + DUMMY,
    "vc": ["vc", str(CLIP3), "-o", "{tmp}/x.wav", "--dummy-weights", "--device", "cpu"],
    "voices add": ["voices", "add", "v", str(CLIP6), "--library", "{tmp}/lib"] + DUMMY,
    "demo": ["demo", "--variant", "nano", "--device", "cpu"],
    "bench": ["bench", "--dummy-weights", "--variant", "nano", "--device", "cpu"],
}


def _argv(argv, tmp_path):
    return [str(a).replace("{tmp}", str(tmp_path)) for a in argv]


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("extra, match", [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "meta"], "--device 'meta'"),
    (["--seed", "99999999999999999999"], "--seed must be an integer from 0 to 2^63-1"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2^63-1"),
])
def test_runtime_options_are_one_line_before_loading(command, extra, match, tmp_path, capsys, no_load):
    rc, _, err = run(_argv(MODEL_COMMANDS[command], tmp_path) + extra, capsys)
    assert_user_error(rc, err, match)
    assert "this machine has auto, cpu" in err or "--device" not in match


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7"])
def test_absent_devices_are_refused_with_what_works(device, tmp_path, capsys, no_load):
    if device in cli.available_devices():
        pytest.skip(f"{device} exists here")
    rc, _, err = run(_argv(MODEL_COMMANDS["synth"], tmp_path) + ["--device", device], capsys)
    assert_user_error(rc, err, f"--device {device!r}")
    assert "this machine has auto, cpu" in err


def test_device_names_are_case_insensitive(tmp_path, capsys, fast_load):
    out = tmp_path / "x.wav"
    rc, _, err = run(["synth", "Hi.", "-o", out, "--no-watermark"] + FAST + ["--device", "CPU", "--dtype", "FP32"],
                     capsys)
    assert rc == 0, err
    read_wav(out)


@pytest.mark.skipif(CUDA, reason="these backends can run here")
@pytest.mark.parametrize("value, match", [
    ("cuda", "CHATTERBOX_RT_KERNELS=cuda but"),
    ("triton", "CHATTERBOX_RT_KERNELS=triton but"),
    ("bogus", "is not a kernel backend"),
])
@pytest.mark.parametrize("command", ["synth", "vc", "bench"])
def test_kernel_override_that_cannot_run_is_one_line(value, match, command, tmp_path, capsys, monkeypatch, no_load):
    monkeypatch.setenv("CHATTERBOX_RT_KERNELS", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite's CPU stand-in for a GPU
    rc, _, err = run(_argv(MODEL_COMMANDS[command], tmp_path), capsys)
    assert_user_error(rc, err, match)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_full_disk_is_one_line(capsys, fast_load):
    rc, _, err = run(["synth", "Hi.", "-o", "/dev/full", "--no-watermark"] + FAST, capsys)
    assert_user_error(rc, err, "cannot write /dev/full: No space left on device")


# -o - : audio on standard output, every message on standard error

@pytest.mark.parametrize("target", ["-", "/dev/stdout"])
def test_synth_to_stdout_through_a_pipe(target, tmp_path):
    """The real command, its standard output redirected to a file: a valid WAV and nothing else."""
    import subprocess
    import sys

    if target != "-" and not Path(target).exists():
        pytest.skip(f"no {target}")
    out = tmp_path / "piped.wav"
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "chatterbox_rt.cli", "synth", "Hi there.", "-o", target,
                               "--dummy-weights", "--variant", "nano", "--t3-layers", "1", "--device", "cpu",
                               "--tokens", "4", "--seed", "0", "--no-watermark", "--threads", "1"],
                              stdout=f, stderr=subprocess.PIPE, timeout=600, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "RANDOM" in err and "wrote standard output" in err
    wav = read_wav(out)
    assert 0 < len(wav) <= 7 * 960
    assert out.stat().st_size == 44 + 2 * len(wav)  # the WAV and nothing after it


def test_synth_and_vc_stdout_in_process(tmp_path, capsysbinary, fast_load, monkeypatch):
    rc = main(["synth", "Hi.", "-o", "-", "--format", "pcm", "--no-watermark"] + FAST)
    out, err = capsysbinary.readouterr()
    assert rc == 0, err
    assert b"wrote standard output" in err and b"wrote" not in out
    assert out[:4] != b"RIFF" and len(out) % 2 == 0 and 0 < len(out) // 2 <= 9 * 960  # raw 16-bit samples

    import torch
    from chatterbox_rt import vc as vc_mod

    class StubVC:
        sr, source, target = SR, "stub", None

        def generate(self, audio, target_voice=None, **kw):
            return 0.1 * torch.ones(1, SR // 10)

    monkeypatch.setattr(vc_mod.VC, "from_dummy", classmethod(lambda cls, **kw: StubVC()))
    rc = main(["vc", str(CLIP3), "--target", str(CLIP3), "-o", "-", "--dummy-weights", "--no-watermark"])
    out, err = capsysbinary.readouterr()
    assert rc == 0, err
    assert b"wrote standard output" in err
    info = sf.info(io.BytesIO(out))
    assert info.format == "WAV" and info.frames == SR // 10


# formats by extension or --format

@pytest.mark.parametrize("name, fmt", [("out.mp3", "MP3"), ("out.flac", "FLAC"), ("out.ogg", "OGG"),
                                       ("out.opus", "OGG")])
def test_output_format_follows_the_extension(name, fmt, tmp_path, capsys, fast_load):
    out = tmp_path / name
    rc, _, err = run(["synth", "Hi.", "-o", out, "--no-watermark"] + FAST, capsys)
    assert rc == 0, err
    info = sf.info(str(out))
    assert info.format == fmt and info.samplerate == SR and info.channels == 1
    assert info.subtype == {"out.ogg": "VORBIS", "out.opus": "OPUS"}.get(name, info.subtype)


def test_format_option(tmp_path, capsys, fast_load, no_load):
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "out"] + FAST, capsys)  # no extension
    assert_user_error(rc, err, "--format")
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "out.txt"] + FAST, capsys)
    assert_user_error(rc, err, "'.txt', which is not an audio format")
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "out.wav", "--format", "mp3"] + FAST, capsys)
    assert_user_error(rc, err, "names a wav file but --format mp3")
    rc, _, err = run(["vc", str(CLIP3), "-o", tmp_path / "out.aiff", "--dummy-weights"], capsys)
    assert_user_error(rc, err, "cannot tell the audio format")
    assert not list(tmp_path.iterdir())


def test_format_option_without_extension(tmp_path, capsys, fast_load):
    out = tmp_path / "speech"
    rc, _, err = run(["synth", "Hi.", "-o", out, "--format", "flac", "--no-watermark"] + FAST, capsys)
    assert rc == 0, err
    assert sf.info(str(out)).format == "FLAC"


def test_synth_write_is_atomic(tmp_path, capsys, fast_load, monkeypatch):
    """An interrupt while the file is written leaves the previous file and no temporary file."""
    from chatterbox_rt import audio_out

    out = tmp_path / "keep.wav"
    out.write_bytes(b"previous")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(audio_out.os, "fsync", interrupted)
    rc, _, err = run(["synth", "Hi.", "-o", out, "--no-watermark"] + FAST, capsys)
    assert rc == 130 and "interrupted" in err
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["keep.wav"]


# the model's text limit

def test_fit_tokens():
    count = len  # one token per character
    assert cli.fit_tokens(["short", "also short"], count, 10) == ["short", "also short"]
    text = "one two, three four five six; seven eight"
    chunks = cli.fit_tokens([text], count, 16)
    assert all(len(c) <= 16 for c in chunks) and " ".join(chunks) == text
    assert chunks[0] == "one two,"  # the soft break wins over a later space
    assert cli.fit_tokens(["x" * 25], count, 10) == ["x" * 10, "x" * 10, "x" * 5]
    def plus_two(t):  # start/stop tokens, as the Llama variants count them
        return len(t) + 2

    assert all(plus_two(c) <= 12 for c in cli.fit_tokens(["word " * 20], plus_two, 12))
    with pytest.raises(ValueError, match="too few"):
        cli.fit_tokens(["abc"], plus_two, 2)


def test_synth_splits_chunks_over_the_token_limit(tmp_path, capsys, fast_load, monkeypatch):
    seen = []
    monkeypatch.setattr(type(fast_load), "max_text_tokens", lambda self, voice=None, max_new_tokens=None: 40)
    from chatterbox_rt.engine.engine import Engine

    real = Engine._job

    def job(self, text, *a, **k):  # one T3 request per segment
        seen.append(text)
        return real(self, text, *a, **k)

    monkeypatch.setattr(Engine, "_job", job)
    text = "This sentence is long enough, with a comma, to need more than forty tokens in one piece."
    out = tmp_path / "x.wav"
    rc, stdout, err = run(["synth", text, "-o", out, "--no-watermark"] + FAST, capsys)
    assert rc == 0, err
    assert len(seen) > 1 and f"from {len(seen)} chunk(s)" in stdout
    assert all(fast_load.text_tokens(c).numel() <= 40 for c in seen)
    assert " ".join(seen) == text


def test_no_room_for_text_is_cli_worded(tmp_path, capsys, fast_load, monkeypatch):
    monkeypatch.setattr(type(fast_load), "max_text_tokens", lambda self, voice=None, max_new_tokens=None: -3)
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--no-watermark"] + FAST, capsys)
    assert_user_error(rc, err, "--max-new-tokens 6 leaves no room for text")


# messages in CLI terms

def test_missing_builtin_voice_names_the_options(tmp_path, capsys, no_load):
    ckpt = fake_ckpt(tmp_path / "ckpt", files=("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors",
                                               "tokenizer.json"))
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--ckpt", ckpt, "--no-watermark"], capsys)
    assert_user_error(rc, err, "give --voice CLIP or --voice-id NAME")
    assert "prepare_conditionals" not in err
    rc, _, err = run(["vc", str(CLIP3), "-o", tmp_path / "x.wav", "--ckpt", ckpt, "--no-watermark"], capsys)
    assert_user_error(rc, err, "give --target CLIP or --target-id NAME")
    assert "target_voice" not in err


def test_loaded_model_without_builtin_voice(tmp_path, capsys, fast_load, monkeypatch):
    monkeypatch.setattr(fast_load, "builtin_voice", None)
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--no-watermark"] + FAST, capsys)
    assert_user_error(rc, err, "--voice CLIP")
    assert "voice=" not in err


def test_non_utf8_stdin_is_one_line(tmp_path, capsys, monkeypatch, no_load):
    class Stdin:
        buffer = io.BytesIO("caf\u00e9".encode("latin-1"))

        def isatty(self):
            return False

    monkeypatch.setattr("sys.stdin", Stdin())
    rc, _, err = run(["synth", "-", "-o", tmp_path / "x.wav"] + FAST, capsys)
    assert_user_error(rc, err, "standard input is not UTF-8 text")


def test_utf8_stdin_bytes(tmp_path, capsys, monkeypatch, fast_load):
    class Stdin:
        buffer = io.BytesIO("\ufeffCaf\u00e9 au lait.".encode("utf-8"))

        def isatty(self):
            return False

    monkeypatch.setattr("sys.stdin", Stdin())
    rc, _, err = run(["synth", "-", "-o", tmp_path / "x.wav", "--no-watermark"] + FAST, capsys)
    assert rc == 0, err


def test_seed_at_the_top_of_its_range_works(tmp_path, capsys, fast_load):
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--no-watermark"] + DUMMY
                     + ["--tokens", "4", "--seed", str(2**63 - 1)], capsys)
    assert rc == 0, err


def test_sampling_values_are_checked_before_loading(tmp_path, capsys, no_load):
    for extra, match in ((["--temperature", "0"], "--temperature 0.0 is invalid"),
                         (["--top-p", "1.5"], "--top-p 1.5 is invalid"),
                         (["--top-k", "-1"], "--top-k -1 is invalid"),
                         (["--exaggeration", "nan"], "--exaggeration must be a finite number"),
                         (["--language", "xx"], "English only")):
        rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav"] + FAST + extra, capsys)
        assert_user_error(rc, err, match)
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--language", "xx"] + FAST
                     + ["--variant", "multilingual"], capsys)
    assert_user_error(rc, err, "not one the multilingual model speaks")


# validation before loading

@pytest.mark.parametrize("variant, n, match", [
    ("nano", "0", "must be >= 1"),
    ("nano", "100000", "at most 7818 speech tokens"),
    ("chatterbox", "5000", "at most 4099 speech tokens"),
])
def test_tokens_out_of_range_before_loading(variant, n, match, tmp_path, capsys, no_load):
    from chatterbox_rt.models.t3 import T3Config

    cfg = T3Config.for_variant(variant)
    assert cli.max_new_tokens_limit(variant) == (cfg.speech_pos_len - 1 if cfg.learned_pos_emb else
                                                 cfg.backbone.n_positions - cfg.speech_cond_prompt_len - 3)
    argv = ["synth", "Hi.", "-o", tmp_path / "x.wav", "--dummy-weights", "--variant", variant, "--tokens", n]
    rc, _, err = run(argv, capsys)
    assert_user_error(rc, err, match)
    assert "max_new_tokens=" not in err
    rc, _, err = run(["demo", "--variant", variant, "--tokens", n], capsys)
    assert_user_error(rc, err, match)


@pytest.fixture(scope="module")
def bad_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    t = np.arange(2 * SR) / SR
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    nan = tone.copy()
    nan[100] = np.nan
    (d / "text.wav").write_text("not audio at all")
    return {
        "unreadable": (d / "text.wav", "cannot read as audio"),
        "empty": (write_clip(d / "empty.wav", np.zeros(0)), "contains no samples"),
        "silent": (write_clip(d / "silent.wav", np.zeros(2 * SR)), "silent"),
        "nan": (write_clip(d / "nan.wav", nan, subtype="FLOAT"), "NaN"),
        "short": (write_clip(d / "short.wav", tone[: SR // 2]), "at least 1 s"),
    }


@pytest.mark.parametrize("kind", ["unreadable", "empty", "silent", "nan", "short"])
@pytest.mark.parametrize("where", ["synth --voice", "vc --target", "vc SOURCE", "voices add CLIP"])
def test_bad_clips_are_refused_before_loading(kind, where, bad_clips, tmp_path, capsys, no_load):
    clip, match = bad_clips[kind]
    out = str(tmp_path / "x.wav")
    chatterbox = ["--dummy-weights", "--variant", "chatterbox", "--device", "cpu"]
    argv = {
        "synth --voice": ["synth", "Hi.", "-o", out, "--voice", clip] + chatterbox,
        "vc --target": ["vc", str(CLIP3), "--target", clip, "-o", out, "--dummy-weights"],
        "vc SOURCE": ["vc", clip, "-o", out, "--dummy-weights"],
        "voices add CLIP": ["voices", "add", "v", clip, "--library", tmp_path / "lib"] + chatterbox,
    }[where]
    if where == "vc SOURCE" and kind == "short":
        clip = write_clip(tmp_path / "tiny.wav", np.full(SR // 20, 0.1))  # VC's source needs 0.1 s
        argv[1], match = str(clip), "at least 0.1 s"
    rc, _, err = run(argv, capsys)
    assert_user_error(rc, err, match)
    assert str(clip) in err


def test_short_clip_for_the_variant_before_loading(tmp_path, capsys, no_load):
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--voice", CLIP3] + FAST, capsys)
    assert_user_error(rc, err, "at least 5 s")  # Nano's minimum
    rc, _, err = run(["voices", "add", "v", CLIP3, "--library", tmp_path / "lib"] + DUMMY, capsys)
    assert_user_error(rc, err, "at least 5 s")


# docs and help

def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and "synth" in out and "--dummy-weights" in out


def test_bench_help_describes_stream_and_concurrency(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--stream" in out and "first chunk" in out and "NOT AVAILABLE" not in out
    assert "--concurrency" in out and "engine" in out


def test_vc_has_no_variant_and_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["vc", "--help"])
    assert "no --variant" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:
        main(["vc", "x.wav", "-o", "y.wav", "--variant", "nano"])
    assert e.value.code == 2
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shared = readme[readme.index("Options shared by the model commands"):][:400]
    assert "not `vc`" in shared or "except `vc`" in shared


def test_ignored_options_warn_once_each(tmp_path, capsys, fast_load):
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "x.wav", "--no-watermark", "--exaggeration", "0.7",
                      "--cfg-weight", "0.3", "--min-p", "0.1"] + FAST, capsys)
    assert rc == 0, err
    for flag in ("--exaggeration", "--cfg-weight", "--min-p"):
        lines = [ln for ln in err.splitlines() if flag in ln]
        assert len(lines) == 1 and "not supported by nano" in lines[0], err
    assert "cfg_weight" not in err and "min_p" not in err  # no second warning from T3


def test_bench_missing_output_directory_is_refused(tmp_path, capsys, no_load):
    for option in ("--json", "--plot", "--profile"):
        target = tmp_path / "missing" / "dir" / "x.out"
        rc, _, err = run(["bench", "--dummy-weights", "--device", "cpu", option, target], capsys)
        assert_user_error(rc, err, f"cannot write {target}: directory {target.parent} does not exist")
        assert not (tmp_path / "missing").exists()
    rc, _, err = run(["synth", "Hi.", "-o", tmp_path / "missing" / "x.wav"] + FAST, capsys)
    assert_user_error(rc, err, "does not exist")


def test_bench_tokens_over_the_limit_is_bench_worded(capsys, no_load):
    rc, _, err = run(["bench", "--dummy-weights", "--device", "cpu", "--tokens", "100000"], capsys)
    assert_user_error(rc, err, "--tokens 100000: one chatterbox request can generate at most 4099")
    assert "max_new_tokens" not in err


# --t3-file and --lora

def test_t3_file_and_lora_need_a_checkpoint(tmp_path, capsys, no_load):
    (tmp_path / "adapter").mkdir()
    for argv in (["synth", "Hi.", "-o", tmp_path / "x.wav"] + FAST, ["voices", "add", "v", CLIP6, "--library",
                 tmp_path / "lib"] + DUMMY, ["demo", "--variant", "nano"]):
        for extra, option in ((["--t3-file", "t3_mtl23ls_v3.safetensors"], "--t3-file"),
                              (["--lora", tmp_path / "adapter"], "--lora")):
            rc, _, err = run(argv + extra, capsys)
            assert_user_error(rc, err, f"{option} applies to a checkpoint")


def test_t3_file_and_lora_must_exist(tmp_path, capsys, no_load):
    ckpt = fake_ckpt(tmp_path / "ckpt")
    base = ["synth", "Hi.", "-o", tmp_path / "x.wav", "--ckpt", ckpt, "--no-watermark"]
    rc, _, err = run(base + ["--t3-file", "t3_missing.safetensors"], capsys)
    assert_user_error(rc, err, f"--t3-file not found: {ckpt / 't3_missing.safetensors'}")
    rc, _, err = run(base + ["--lora", tmp_path / "no_adapter"], capsys)
    assert_user_error(rc, err, "--lora adapter directory not found")
    rc, _, err = run(["demo", "--ckpt", ckpt, "--lora", tmp_path / "no_adapter"], capsys)
    assert_user_error(rc, err, "--lora adapter directory not found")


def test_t3_file_and_lora_reach_the_loaders(tmp_path, capsys, monkeypatch):
    from chatterbox_rt import tts as tts_mod
    from chatterbox_rt.models.t3 import T3

    ckpt = fake_ckpt(tmp_path / "ckpt", files=("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors",
                                               "tokenizer.json", "conds.pt", "t3_mine.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    calls = []

    def capture(cls, ckpt_dir, **kw):
        calls.append(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(tts_mod.TTS, "from_local", classmethod(capture))
    monkeypatch.setattr(T3, "from_local", classmethod(capture))
    for argv in (["synth", "Hi.", "-o", tmp_path / "x.wav", "--no-watermark"],
                 ["voices", "add", "v", CLIP6, "--library", tmp_path / "lib"],
                 ["demo"]):
        rc, _, err = run(argv + ["--ckpt", ckpt, "--t3-file", "t3_mine.safetensors", "--lora", adapter,
                                 "--device", "cpu"], capsys)
        assert_user_error(rc, err, "stop here")
        assert calls[-1]["t3_file"] == "t3_mine.safetensors" and calls[-1]["lora"] == str(adapter)
    assert len(calls) == 3


@pytest.mark.slow
def test_behaviour_option(tmp_path, capsys, monkeypatch):
    """--behaviour reaches the model (dummy weights here; --ckpt passes it to TTS.from_local);
    with another variant a one-line error."""
    from chatterbox_rt.cli import main
    from chatterbox_rt.tts import TTS

    built = []
    real = TTS.from_dummy.__func__

    def spy(cls, *a, **k):
        built.append(real(cls, *a, **k))
        return built[-1]

    monkeypatch.setattr(TTS, "from_dummy", classmethod(spy))
    for behaviour in ("0.1.7", "upstream"):
        rc = main(["synth", "Hola.", "-o", str(tmp_path / "x.wav"), "--dummy-weights", "--variant", "multilingual",
                   "--language", "es", "--behaviour", behaviour, "--t3-layers", "1", "--tokens", "4", "--seed", "0",
                   "--no-watermark", "--device", "cpu"])
        assert rc == 0, capsys.readouterr().err
        cfg = built[-1].t3.config
        assert cfg.behaviour == behaviour and cfg.drop_last_token_audio == (behaviour == "upstream")
        assert cfg.sampling.repetition_penalty == (2.0 if behaviour == "0.1.7" else 1.2)
    rc = main(["synth", "Hi.", "-o", str(tmp_path / "x.wav"), "--dummy-weights", "--variant", "nano",
               "--behaviour", "upstream", "--t3-layers", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "only applies to the multilingual model" in err and "Traceback" not in err


def test_cfm_int8_outside_an_int8_native_export_is_refused_before_loading(tmp_path, capsys, no_load):
    for extra in ([], ["--precision", "fp32"], ["--precision", "int8", "--layout", "onnx-community"]):
        rc, _, err = run(["export", "--dummy-weights", "--variant", "nano", "--out", tmp_path / "x",
                          "--cfm-int8", "on", *extra], capsys)
        assert_user_error(rc, err, "--cfm-int8 on applies to --precision int8 or int4 on the native layout")
    assert not (tmp_path / "x").exists()


def test_bench_onnxruntime_from_a_reduced_precision_model_is_refused(capsys, no_load):
    rc, _, err = run(["bench", "--dummy-weights", "--variant", "nano", "--device", "cpu", "--backend", "onnxruntime",
                      "--precision", "auto"], capsys)
    assert_user_error(rc, err, "--backend onnxruntime exports from the fp32 model: leave out --precision auto")
