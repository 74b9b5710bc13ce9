"""``chatterbox_rt.serve.encode``: every response format streamed in uneven chunks decodes to the
whole audio (lossless ones bit for bit, lossy ones within their codec's padding, at 440 Hz and a
measured SNR), bytes come out before ``close``, bad input is refused without breaking the stream,
and ``encode_whole`` gives complete files.

Measured with soundfile 0.14 (libsndfile 1.2.2) and PyAV 18.1 (libavcodec 62) at 24 kHz; the
decoded length minus the input's: mp3 1728..2303 (1681 of it before the audio), aac 1024..2047
(1024 before), opus 0. SNR after alignment on the test signal: mp3 25.8 dB, opus 19.7, aac 31.5.
"""
import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from chatterbox_rt import audio_out
from chatterbox_rt.audio_out import to_int16
from chatterbox_rt.serve.encode import SERVE_FORMATS, StreamEncoder, encode_chunks, encode_whole, media_type

SR = 24000
LOSSLESS = ("pcm", "wav", "flac")
LOSSY = ("mp3", "opus", "aac")
# decoded length - input length, measured over many lengths (see the module docstring)
EXTRA = {"mp3": (1600, 2400), "aac": (1024, 2047), "opus": (0, 0)}
LEAD = {"mp3": 1681, "aac": 1024, "opus": 0}  # samples before the audio starts
MIN_SNR_DB = {"mp3": 22.0, "opus": 16.0, "aac": 27.0}


def _av():
    return pytest.importorskip("av", reason="PyAV (pip install av) decodes AAC and streamed FLAC")


def need(fmt):
    """Skip an AAC test, with the reason, where PyAV or its AAC encoder is missing."""
    if fmt != "aac":
        return
    av = _av()
    try:
        av.codec.Codec("aac", "w")
    except ValueError as e:  # an ffmpeg build without the encoder
        pytest.skip(f"this PyAV has no AAC encoder: {e}")


def signal(seconds=1.3, seed=0):
    """440 Hz at 0.5 plus a little seeded noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / SR) + 0.01 * rng.standard_normal(n)
    return x.astype(np.float32)


def uneven_chunks(x):
    """Empty, 1-sample, odd-sized and torch [1, n] chunks, then the rest in 3001-sample pieces."""
    sizes = [0, 1, 7, 480, 1, 0, 1000, 4095, 4097, 2400]
    chunks, at = [], 0
    for i, k in enumerate(sizes):
        piece = x[at:at + k]
        chunks.append(torch.from_numpy(piece.copy())[None, :] if i % 3 == 2 else piece)
        at += k
    chunks += [x[i:i + 3001] for i in range(at, len(x), 3001)]
    assert sum(len(c.reshape(-1)) for c in chunks) == len(x)
    return chunks


def stream(fmt, chunks, sr=SR):
    """Encode chunk by chunk: (the pieces from write, the tail from close)."""
    enc = StreamEncoder(fmt, sr)
    pieces = [enc.write(c) for c in chunks]
    return pieces, enc.close()


def decode(fmt, data: bytes):
    """(samples, rate): int16 for the lossless formats, float32 for the lossy ones."""
    if fmt == "pcm":
        return sf.read(io.BytesIO(data), format="RAW", subtype="PCM_16", samplerate=SR, channels=1,
                       dtype="int16")
    if fmt in ("flac", "aac"):
        # libsndfile cannot read a streamed FLAC to its end (its length is "unknown"); ffmpeg can.
        # "aac" is ffmpeg's ADTS demuxer: named, so that a stream too short for its probe still opens.
        with _av().open(io.BytesIO(data), format="aac" if fmt == "aac" else None) as c:
            frames = list(c.decode(audio=0))
        assert all(f.layout.nb_channels == 1 for f in frames)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), frames[0].sample_rate
    return sf.read(io.BytesIO(data), dtype="int16" if fmt == "wav" else "float32")


def align(y, x, max_lag=2500):
    """The lag (0..max_lag) at which ``y`` best matches ``x``, and the SNR (dB) there."""
    y, x = y.astype(np.float64), x.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(y) + len(x))))
    corr = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(x, n)), n)[:max_lag + 1]
    lag = int(np.argmax(corr))
    seg = y[lag:lag + len(x)]
    ref = x[:len(seg)]
    return lag, 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - seg) ** 2))


def dominant_hz(y):
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.argmax(spectrum) * SR / len(y)


def check_decodes(fmt, data, x):
    """``data`` is a ``fmt`` stream of ``x``: exact for the lossless formats, close for the lossy."""
    y, sr = decode(fmt, data)
    assert sr == SR
    if fmt in LOSSLESS:
        assert y.dtype == np.int16 and np.array_equal(y, to_int16(x)), fmt
        return
    lo, hi = EXTRA[fmt]
    assert lo <= len(y) - len(x) <= hi, (fmt, len(y) - len(x))
    assert abs(dominant_hz(y) - 440) < 2, (fmt, dominant_hz(y))
    lag, snr = align(y, x)
    assert snr > MIN_SNR_DB[fmt], (fmt, lag, snr)


@pytest.mark.parametrize("fmt", SERVE_FORMATS)
def test_uneven_chunks_decode_to_the_whole(fmt):
    need(fmt)
    x = signal()
    pieces, tail = stream(fmt, uneven_chunks(x))
    check_decodes(fmt, b"".join(pieces) + tail, x)


def test_pcm_and_wav_bytes():
    x = signal()
    pcm = b"".join(encode_chunks(uneven_chunks(x), "pcm"))
    assert pcm == audio_out.encode(x, SR, "pcm")
    wav = b"".join(encode_chunks(uneven_chunks(x), "wav"))
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and wav[36:40] == b"data"
    assert wav[4:8] == wav[40:44] == b"\xff\xff\xff\xff"  # sizes unknown while streaming
    assert wav[44:] == pcm
    with sf.SoundFile(io.BytesIO(wav)) as f:
        assert (f.samplerate, f.channels, f.subtype, f.frames) == (SR, 1, "PCM_16", len(x))


def test_flac_is_audio_outs_file_but_for_streaminfo_fields():
    """The only bytes libsndfile could not fix up at close: min/max frame size (12..17), total
    samples (22..25; the 4 bits in byte 21 are 0 for short audio either way) and the MD5 (26..41)."""
    x = signal()
    pieces, tail = stream("flac", uneven_chunks(x))
    streamed = b"".join(pieces) + tail
    whole = audio_out.encode(x, SR, "flac")
    assert len(streamed) == len(whole)
    assert streamed[:12] == whole[:12] and streamed[18:22] == whole[18:22] and streamed[42:] == whole[42:]
    assert streamed[12:18] == bytes(6) and streamed[22:42] == bytes(20)
    y, sr = sf.read(io.BytesIO(whole), dtype="int16")  # the fields filled in, soundfile reads it
    assert sr == SR and np.array_equal(y, to_int16(x))


@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_delay(fmt):
    """A chirp (no period to confuse the alignment) starts exactly LEAD samples into the decode."""
    need(fmt)
    t = np.arange(int(0.8 * SR)) / SR
    x = (0.5 * np.sin(2 * np.pi * (200 * t + 900 * t * t))).astype(np.float32)
    pieces, tail = stream(fmt, [x[i:i + 1000] for i in range(0, len(x), 1000)])
    y, _ = decode(fmt, b"".join(pieces) + tail)
    assert align(y, x)[0] == LEAD[fmt]


@pytest.mark.parametrize("fmt", SERVE_FORMATS)
def test_bytes_come_out_before_close(fmt):
    """3 s in 0.1 s chunks: after the first chunk (headers and the codecs' start-up), every 0.2 s
    of audio brings bytes (FLAC frames are 4096 samples, Ogg pages 100 ms), and over 90 % of the
    stream is out before close."""
    need(fmt)
    x = signal(3.0)
    pieces, tail = stream(fmt, [x[i:i + 2400] for i in range(0, len(x), 2400)])
    sizes = [len(p) for p in pieces]
    assert all(sizes[i] + sizes[i + 1] for i in range(1, len(sizes) - 1, 2)), sizes
    assert sum(sizes) > 0.9 * (sum(sizes) + len(tail)), (sum(sizes), len(tail))


@pytest.mark.parametrize("fmt", SERVE_FORMATS)
def test_nan_chunk_is_refused_and_the_stream_goes_on(fmt):
    need(fmt)
    x = signal(0.5)
    bad = x[:100].copy()
    bad[50] = np.nan
    enc = StreamEncoder(fmt)
    out = enc.write(x[:5000])
    with pytest.raises(ValueError, match="1 NaN sample"):
        enc.write(bad)
    out += enc.write(x[5000:]) + enc.close()
    assert enc.samples_written == len(x)
    pieces, tail = stream(fmt, [x[:5000], x[5000:]])
    clean = b"".join(pieces) + tail
    if fmt == "opus":  # Ogg picks a random stream serial number: compare the audio
        assert np.array_equal(decode(fmt, out)[0], decode(fmt, clean)[0])
    else:
        assert out == clean


def test_write_after_close_and_double_close():
    enc = StreamEncoder("mp3")
    enc.write(signal(0.1))
    assert enc.close()
    assert enc.close() == b""
    with pytest.raises(ValueError, match="closed"):
        enc.write(signal(0.1))


def test_unknown_format_and_bad_input():
    for bad in ("ogg", "aiff", "", "mp4"):
        with pytest.raises(ValueError, match="mp3, opus, aac, flac, wav, pcm"):
            StreamEncoder(bad)
    with pytest.raises(ValueError, match="mp3, opus, aac, flac, wav, pcm"):
        encode_whole(signal(0.1), "ogg")
    assert StreamEncoder(" MP3 ").format == "mp3"
    enc = StreamEncoder("pcm")
    with pytest.raises(ValueError, match="mono"):
        enc.write(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="float"):
        enc.write(np.zeros(100, np.int16))
    assert enc.samples_written == 0


@pytest.mark.parametrize("fmt, sr", [("opus", 44100), ("opus", 22050), ("mp3", 96000), ("mp3", 7000),
                                     ("aac", 12345), ("wav", 0), ("pcm", -1), ("flac", True), ("mp3", 24000.0)])
def test_bad_sample_rate(fmt, sr):
    with pytest.raises(ValueError, match="Hz|sample rate"):
        StreamEncoder(fmt, sr)


@pytest.mark.parametrize("fmt, sr", [("opus", 48000), ("mp3", 44100), ("aac", 16000), ("flac", 22050)])
def test_other_sample_rates(fmt, sr):
    need(fmt)
    t = np.arange(int(0.5 * sr)) / sr
    pieces, tail = stream(fmt, [(0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)], sr)
    data = b"".join(pieces) + tail
    if fmt == "aac":
        with _av().open(io.BytesIO(data), format="aac") as c:
            assert next(c.decode(audio=0)).sample_rate == sr
    elif fmt == "flac":
        assert int.from_bytes(data[18:21], "big") >> 4 == sr  # STREAMINFO's 20-bit sample rate
    else:
        assert sf.info(io.BytesIO(data)).samplerate == sr


def test_media_types_and_counts():
    expected = {"mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "flac": "audio/flac",
                "wav": "audio/wav", "pcm": "audio/L16; rate=24000; channels=1"}
    for fmt in SERVE_FORMATS:
        assert media_type(fmt) == expected[fmt]
        if fmt != "aac":  # an AAC encoder needs PyAV: checked below
            assert StreamEncoder(fmt).media_type == expected[fmt]
    assert StreamEncoder("pcm", 16000).media_type == media_type("PCM", 16000) == "audio/L16; rate=16000; channels=1"
    enc = StreamEncoder("wav")
    for k in (0, 1, 100, 0, 7):
        enc.write(np.zeros(k, np.float32))
    assert enc.samples_written == 108
    need("aac")
    assert StreamEncoder("aac").media_type == expected["aac"]


@pytest.mark.parametrize("fmt", SERVE_FORMATS)
def test_empty_stream_is_valid(fmt):
    """No samples at all: WAV is a bare header, pcm nothing, the codecs one silent sample."""
    need(fmt)
    data = b"".join(encode_chunks([np.zeros(0, np.float32)], fmt))
    if fmt == "pcm":
        assert data == b""
        return
    y, sr = decode(fmt, data)
    assert sr == SR and (len(y) == 0 if fmt == "wav" else len(y) >= 1)
    assert np.abs(y.astype(np.float64)).max(initial=0) < 1e-3 * (32768 if y.dtype == np.int16 else 1)


def test_encode_chunks_pieces():
    x = signal()
    for fmt in ("mp3", "flac"):
        pieces = list(encode_chunks(uneven_chunks(x), fmt))
        assert pieces and all(pieces)
        written, tail = stream(fmt, uneven_chunks(x))
        assert b"".join(pieces) == b"".join(written) + tail
    gen = encode_chunks(iter([x[:100], x[100:]]), "opus")
    assert next(gen)
    gen.close()  # a client gone mid-stream: the encoder is closed, nothing raised


@pytest.mark.parametrize("fmt", SERVE_FORMATS)
def test_encode_whole(fmt):
    need(fmt)
    x = signal()
    data = encode_whole(torch.from_numpy(x)[None, :], fmt)
    if fmt == "aac":
        check_decodes(fmt, data, x)
        return
    if fmt == "opus":  # a random Ogg serial number: compare the audio
        assert np.array_equal(sf.read(io.BytesIO(data))[0], sf.read(io.BytesIO(audio_out.encode(x, SR, fmt)))[0])
    else:
        assert data == audio_out.encode(x, SR, fmt)
    if fmt == "pcm":
        return  # the same bytes as the streamed pcm, checked above
    y, sr = sf.read(io.BytesIO(data), dtype="int16" if fmt in LOSSLESS else "float32")
    assert sr == SR
    if fmt in LOSSLESS:
        assert np.array_equal(y, to_int16(x))
    else:
        assert len(y) == len(x)  # a whole MP3 has its LAME header, so decoders trim it exactly
        assert abs(dominant_hz(y) - 440) < 2


def test_imports_without_pyav():
    code = ("import sys; sys.modules['av'] = None\n"
            "import numpy as np\n"
            "from chatterbox_rt.serve.encode import StreamEncoder, encode_whole\n"
            "assert len(encode_whole(np.zeros(10, np.float32), 'pcm')) == 20\n"
            "try:\n    StreamEncoder('aac')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install av" in out.stdout
