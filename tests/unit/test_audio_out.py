"""``chatterbox_rt.audio_out``: every format round-trips through soundfile, raw PCM is the WAV's
data chunk, samples are clipped, and writes are atomic (a failure leaves the old file and no
temporary file), with the umask's permission bits; ``-`` is standard output."""
import io
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox_rt import audio_out
from chatterbox_rt.audio_out import FORMATS, encode, format_for_path, write

SR = 24000


def speechlike(seconds=1.0, sr=SR):
    """A deterministic voiced signal (gliding harmonics under a syllable envelope)."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t))
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def decode(data: bytes, fmt: str):
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, SR
    return sf.read(io.BytesIO(data), dtype="float32")


def best_correlation(x, y, max_lag=1200):
    """Peak normalised cross-correlation over small lags (lossy codecs may shift by a few samples)."""
    n = min(len(x), len(y))
    best = -1.0
    for lag in range(-max_lag, max_lag + 1, 1):
        a, b = (x[: n - lag], y[lag:n]) if lag >= 0 else (x[-lag:n], y[: n + lag])
        c = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b) + 1e-30))
        best = max(best, c)
    return best


def test_formats_and_extensions():
    assert set(FORMATS) == {"wav", "flac", "mp3", "ogg", "opus", "pcm"}
    for name, fmt in [("a.wav", "wav"), ("b.FLAC", "flac"), ("c.mp3", "mp3"), ("d.ogg", "ogg"), ("d.oga", "ogg"),
                      ("e.opus", "opus"), ("f.pcm", "pcm"), ("g.raw", "pcm"), ("dir.x/h.Wav", "wav")]:
        assert format_for_path(name) == fmt, name
    for bad in ("out", "out.txt", "out.wav.bak"):
        with pytest.raises(ValueError, match="--format") as e:
            format_for_path(bad)
        assert "wav, flac, mp3, ogg, opus, pcm" in str(e.value)
    with pytest.raises(ValueError, match="unknown audio format 'aiff'"):
        encode(np.zeros(10, np.float32), SR, "aiff")
    assert audio_out.media_type("pcm", SR) == "audio/L16; rate=24000; channels=1"
    assert audio_out.media_type("MP3") == "audio/mpeg"


@pytest.mark.parametrize("fmt", ["wav", "flac", "pcm"])
def test_lossless_round_trip_is_exact_at_16_bit(fmt):
    x = speechlike()
    data = encode(torch.from_numpy(x)[None], SR, fmt)  # a [1, N] tensor, as TTS.generate returns
    y, sr = decode(data, fmt)
    assert sr == SR and y.shape == x.shape
    reference, _ = decode(encode(x, SR, "wav"), "wav")
    np.testing.assert_array_equal(y, reference)  # the same 16-bit samples in every lossless format
    assert np.abs(y - x).max() <= 0.5 / 32768 + 1e-7  # rounding to the nearest 16-bit step only


@pytest.mark.parametrize("fmt, min_corr", [("mp3", 0.99), ("ogg", 0.99), ("opus", 0.97)])
def test_lossy_round_trip_correlates(fmt, min_corr):
    x = speechlike()
    data = encode(x, SR, fmt)
    y, sr = decode(data, fmt)
    assert sr == SR and abs(len(y) - len(x)) <= 2 * 1152  # at most a frame or two of padding
    assert best_correlation(x, y) > min_corr
    info = sf.info(io.BytesIO(data))
    assert info.channels == 1 and info.format == FORMATS[fmt][0] and info.subtype == FORMATS[fmt][1]


def test_pcm_is_the_wav_data_chunk_little_endian():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1 / 32768], dtype=np.float32)
    pcm = encode(x, SR, "pcm")
    wav = encode(x, SR, "wav")
    assert len(pcm) == 2 * len(x)
    assert wav.endswith(pcm) and wav[:4] == b"RIFF" and wav[36:40] == b"data"
    samples = np.frombuffer(pcm, dtype="<i2")
    assert samples[0] == 0 and samples[1] > 16000 and samples[2] < -16000 and samples[3] > 32000
    assert pcm[2:4] == int(samples[1]).to_bytes(2, "little", signed=True)


def test_clipping_instead_of_wrapping():
    x = np.array([0.0, 1.7, -3.0, np.inf, -np.inf, 0.25], dtype=np.float32)
    for fmt in ("wav", "flac", "pcm"):
        y, _ = decode(encode(x, SR, fmt), fmt)
        ref, _ = decode(encode(np.clip(x, -1, 1), SR, fmt), fmt)
        np.testing.assert_array_equal(y, ref)
        assert y[1] > 0.99 and y[2] <= -0.99 and y[3] > 0.99 and y[4] <= -0.99  # no sign flip


def test_bad_waveforms():
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([0.0, np.nan], np.float32), SR, "wav")
    with pytest.raises(ValueError, match="mono"):
        encode(np.zeros((2, 100), np.float32), SR, "wav")
    with pytest.raises(ValueError, match="float samples"):
        encode(np.zeros(100, np.int16), SR, "wav")
    with pytest.raises(ValueError, match="Opus takes"):
        encode(np.zeros(100, np.float32), 22050, "opus")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_empty_waveform_gives_a_valid_file(fmt):
    data = encode(np.zeros(0, np.float32), SR, fmt)
    if fmt == "pcm":
        assert data == b""
    else:
        y, _ = decode(data, fmt)
        assert len(y) <= 2 * 1152 and np.abs(y).max(initial=0.0) < 1e-4


def test_write_by_extension_and_explicit_format(tmp_path):
    x = speechlike(0.3)
    for name in ("a.wav", "a.flac", "a.mp3", "a.ogg", "a.opus"):
        n = write(tmp_path / name, x, SR)
        assert n == (tmp_path / name).stat().st_size
        assert sf.info(str(tmp_path / name)).format == FORMATS[format_for_path(name)][0]
    write(tmp_path / "noext", x, SR, "flac")
    assert sf.info(str(tmp_path / "noext")).format == "FLAC"
    with pytest.raises(ValueError, match="no file extension"):
        write(tmp_path / "noext2", x, SR)
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / 'a.opus'}: Opus takes"):
        write(tmp_path / "a.opus", x, 22050)
    assert not (tmp_path / "noext2").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "out.wav"
    write(out, speechlike(0.2), SR)
    before = out.read_bytes()

    real_write = os.write
    calls = []

    def failing_write(fd, data):  # the disk fills up half-way through the new file
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audio_out.os, "write", failing_write)
    with pytest.raises(OSError, match=f"cannot write {out}: No space left on device") as e:
        write(out, speechlike(0.5), SR)
    assert e.value.errno == 28
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]


def test_interrupt_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "out.flac"
    write(out, speechlike(0.2), SR)
    before = out.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(audio_out.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(out, speechlike(0.4), SR)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.flac"]


def test_new_file_mode_follows_umask_and_replaced_file_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write(tmp_path / "new.wav", speechlike(0.1), SR)
        assert stat.S_IMODE((tmp_path / "new.wav").stat().st_mode) == 0o640  # not mkstemp's 0600
        os.umask(0o022)
        write(tmp_path / "new2.wav", speechlike(0.1), SR)
        assert stat.S_IMODE((tmp_path / "new2.wav").stat().st_mode) == 0o644
        (tmp_path / "new2.wav").chmod(0o600)
        write(tmp_path / "new2.wav", speechlike(0.1), SR)
        assert stat.S_IMODE((tmp_path / "new2.wav").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_write_through_symlink_replaces_the_target(tmp_path):
    target = tmp_path / "real.wav"
    write(target, speechlike(0.1), SR)
    link = tmp_path / "link.wav"
    link.symlink_to(target)
    write(link, speechlike(0.2), SR)
    assert link.is_symlink() and sf.info(str(target)).frames == int(0.2 * SR)


def test_special_files_are_written_directly(tmp_path):
    with pytest.raises(OSError, match="cannot write /dev/full: No space left on device"):
        write("/dev/full", speechlike(0.1), SR)  # a device without extension: WAV
    write("/dev/null", speechlike(0.1), SR, "mp3")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    script = f"import sys; sys.stdout.buffer.write(open({str(fifo)!r}, 'rb').read())"
    reader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    write(fifo, speechlike(0.1), SR)
    got, _ = reader.communicate(timeout=60)
    assert got[:4] == b"RIFF" and sf.info(io.BytesIO(got)).frames == int(0.1 * SR)


def test_missing_directory_and_directory_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write(tmp_path / "no" / "x.wav", speechlike(0.1), SR)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write(tmp_path, speechlike(0.1), SR, "wav")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        audio_out.check_output_path(tmp_path / "no" / "x.wav")


def test_unwritable_directory(tmp_path, monkeypatch):
    """A directory where no file can be created (simulated: the tests may run as root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "existing.wav").write_bytes(b"old")
    real_access = os.access

    def access(path, mode):
        if os.fspath(path) == os.fspath(ro):
            return False
        return real_access(path, mode)

    def mkstemp(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(audio_out.os, "access", access)
    monkeypatch.setattr(audio_out.tempfile, "mkstemp", mkstemp)
    with pytest.raises(PermissionError, match="not writable"):
        audio_out.check_output_path(ro / "x.wav")
    with pytest.raises(OSError, match=f"cannot write {ro / 'x.wav'}: Permission denied"):
        write(ro / "x.wav", speechlike(0.1), SR)
    # An existing writable file in such a directory is written in place.
    audio_out.check_output_path(ro / "existing.wav")
    write(ro / "existing.wav", speechlike(0.1), SR)
    assert (ro / "existing.wav").read_bytes()[:4] == b"RIFF"
    assert sorted(p.name for p in ro.iterdir()) == ["existing.wav"]


def test_dash_writes_to_standard_output(capsysbinary):
    x = speechlike(0.1)
    write("-", x, SR)
    out = capsysbinary.readouterr().out
    assert out == encode(x, SR, "wav")
    write("-", x, SR, "pcm")
    assert capsysbinary.readouterr().out == encode(x, SR, "pcm")
    buf = io.BytesIO()
    write(buf, x, SR, "flac")
    assert buf.getvalue() == encode(x, SR, "flac")
