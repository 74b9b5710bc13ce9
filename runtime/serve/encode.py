"""Streaming audio encoders for the OpenAI-compatible ``/v1/audio/speech`` server: float chunks in,
encoded bytes out as soon as the encoder has them, so a response can start before synthesis ends::

    enc = StreamEncoder("mp3")                     # mono, 24 kHz by default
    for chunk in engine_chunks:                    # float32 [n] or [1, n], numpy or torch
        send(enc.write(chunk))                     # whatever is ready now (may be b"")
    send(enc.close())                              # the rest

    for piece in encode_chunks(engine_chunks, "opus"): ...   # the same, as a generator
    body = encode_whole(wav, "aac")                          # a non-streamed response

The formats are OpenAI's ``response_format`` values (``SERVE_FORMATS``), all mono. Samples follow
:mod:`chatterbox_rt.audio_out`: clipped to [-1, 1], a NaN is a ValueError (and that chunk is not
encoded at all: the encoder stays usable), the lossless formats take ``to_int16``'s rounding. The
concatenation of every ``write`` and the ``close`` is one valid stream of the whole audio:

* ``pcm``: raw 16-bit little-endian samples, byte for byte ``audio_out.encode(..., "pcm")`` of the
  concatenated chunks.
* ``wav``: a 44-byte RIFF/WAVE PCM16 header, then the ``pcm`` bytes. The length is unknown when the
  header has to go out, so the RIFF and data chunk sizes are 0xFFFFFFFF (the largest a WAV can
  claim; ffmpeg leaves the same on a pipe); libsndfile 1.2.2 then counts the samples from the
  file size. A size of 0 does not do: libsndfile reads such a file as empty.
* ``flac``, ``mp3``, ``opus``: libsndfile (the one soundfile bundles) writing to a sink that hands
  its bytes over after each write. libsndfile seeks back at close to fill in header fields; those
  bytes are already sent, so the fields stay as first written:

  - ``flac``: 16-bit, one frame per 4096 samples. STREAMINFO keeps 0 for the total samples, the
    min/max frame sizes and the MD5, which the FLAC format defines as "unknown"; every other byte
    is that of ``audio_out``'s FLAC file. ffmpeg decodes it; libsndfile 1.2.2 itself reports
    2**63 - 1 frames for it, and soundfile's read fails at its end.
  - ``mp3``: constant 64 kbit/s, not ``audio_out``'s VBR, one frame per 576 samples at <= 24 kHz
    (1152 above). Without the Xing/LAME header that LAME fills in at close, decoders (libsndfile's
    mpg123 among them) take the duration from the byte count and the first frame's bit rate,
    which is right only for CBR (soundfile read a VBR stream of 1.3 s as 0.47 s). LAME's
    placeholder for that header stays a zeroed frame that decoders play as silence, so at 24 kHz
    the audio starts 1681 samples late (576 for that frame, 1105 of encoder delay) and the end is
    padded to a whole frame.
  - ``opus``: Ogg/Opus at libsndfile's default quality. The Ogg page latency is cut from
    libsndfile's 1 s to 100 ms, so a page (what a decoder can use) goes out every 100 ms of audio;
    that costs about 4 % in size. The length is exact: the granule positions carry the pre-skip
    and the end.

  The rates are those ``audio_out`` takes (Opus: 48/24/16/12/8 kHz; MP3: 8 to 48 kHz).
* ``aac``: AAC-LC from ffmpeg's encoder through PyAV (``av``, imported only here) in an ADTS stream,
  at ffmpeg's default bit rate (about 70 kbit/s for 24 kHz mono). ADTS has no field for the encoder
  delay, so decoders output 1024 priming samples first and pad the end to a 1024-sample frame; the
  first bytes come once 2048 samples are in (two frames), then one frame per 1024 samples.

FLAC, MP3, Opus and AAC cannot hold zero samples, so a stream closed without any gets one silent
sample (as ``audio_out`` does for whole files).
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import numpy as np

from .. import audio_out
from ..audio_out import _check_rate, _samples, to_int16

SERVE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
# The sampling-frequency index table of the ADTS header: the only rates an ADTS stream can name.
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
MP3_KBPS = 64
OGG_PAGE_LATENCY_MS = 100.0
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # sndfile.h; soundfile's cffi declarations leave it out
_NEEDS_A_SAMPLE = ("flac", "mp3", "opus", "aac")


def check_serve_format(fmt: str) -> str:
    """A ``response_format`` (any case) -> its name in ``SERVE_FORMATS``; ValueError listing them otherwise."""
    key = str(fmt).strip().lower()
    if key not in SERVE_FORMATS:
        raise ValueError(f"unknown response format {fmt!r}; choose one of {', '.join(SERVE_FORMATS)}")
    return key


def media_type(fmt: str, sample_rate: int = 24000) -> str:
    """The HTTP Content-Type of a format, without building an encoder (``audio_out``'s; ``audio/aac``)."""
    key = check_serve_format(fmt)
    return "audio/aac" if key == "aac" else audio_out.media_type(key, sample_rate)


def _check_serve_rate(sample_rate, key: str) -> int:
    sr = _check_rate(sample_rate, key)  # a positive int; Opus and MP3 rates
    if key == "aac" and sr not in AAC_RATES:
        raise ValueError(f"AAC (ADTS) takes {', '.join(map(str, AAC_RATES))} Hz, not {sr} Hz")
    return sr


def _wav_header(sr: int) -> bytes:
    """RIFF/WAVE PCM16 mono header with both sizes 0xFFFFFFFF (length unknown; see the module docstring)."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, 2 * sr, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


class _Sink:
    """A write-only file for libsndfile and PyAV that keeps only the bytes not yet drained.

    Positions are absolute, so an encoder may seek and overwrite bytes still held here. A write
    behind the drained point (a header fixed up at close) is dropped: those bytes have been sent.
    """

    def __init__(self):
        self._held = bytearray()
        self._base = 0  # absolute offset of _held[0]
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        origin = (0, self._pos, self._base + len(self._held))[whence]
        self._pos = max(0, origin + offset)
        return self._pos

    def write(self, data) -> int:
        data = bytes(data)
        n = len(data)
        if self._pos < self._base:
            skip = min(n, self._base - self._pos)
            data, self._pos = data[skip:], self._pos + skip
        if data:
            at = self._pos - self._base
            if at > len(self._held):
                self._held.extend(bytes(at - len(self._held)))
            self._held[at:at + len(data)] = data
            self._pos += len(data)
        return n  # all of it, dropped part included: a short count would make the encoder fail

    def drain(self) -> bytes:
        out = bytes(self._held)
        self._base += len(out)
        self._held.clear()
        return out


class StreamEncoder:
    """Encode one mono stream chunk by chunk; see the module docstring for the formats.

    ``write(chunk)`` returns the bytes ready now, ``close()`` the rest (b"" when already closed);
    writing after ``close`` is a ValueError.
    """

    def __init__(self, fmt: str, sample_rate: int = 24000):
        self.format = check_serve_format(fmt)
        self.sample_rate = _check_serve_rate(sample_rate, self.format)
        self.media_type = media_type(self.format, self.sample_rate)
        self.samples_written = 0
        self._closed = False
        self._sink = _Sink()
        self._sf = self._av = None
        if self.format == "wav":
            self._sink.write(_wav_header(self.sample_rate))
        elif self.format == "aac":
            self._open_aac()
        elif self.format != "pcm":
            self._open_soundfile()

    def _open_soundfile(self) -> None:
        import soundfile as sf

        major, subtype = audio_out.FORMATS[self.format]
        kw = {}
        if self.format == "mp3":
            kw = {"compression_level": _mp3_cbr_level(self.sample_rate, MP3_KBPS), "bitrate_mode": "CONSTANT"}
        try:
            self._sf = sf.SoundFile(self._sink, "w", self.sample_rate, 1, subtype, format=major, **kw)
        except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError, TypeError) as e:
            raise ValueError(f"cannot encode {self.format} at {self.sample_rate} Hz: {e}") from e
        if self.format == "opus":
            _set_ogg_page_latency(self._sf, OGG_PAGE_LATENCY_MS)

    def _open_aac(self) -> None:
        try:
            import av
        except ImportError as e:
            raise ImportError("AAC output needs PyAV: pip install av") from e
        from fractions import Fraction

        try:
            av.codec.Codec("aac", "w")
        except ValueError as e:  # UnknownCodecError: an ffmpeg built without it
            raise RuntimeError(f"AAC output needs ffmpeg's AAC encoder, which this PyAV ({av.__version__}) "
                               "lacks; install a PyAV wheel from PyPI (pip install av)") from e
        self._av = av.open(self._sink, "w", format="adts")
        self._av_stream = self._av.add_stream("aac", rate=self.sample_rate, layout="mono")
        self._av_frame = av.AudioFrame
        self._av_time_base = Fraction(1, self.sample_rate)

    def write(self, chunk) -> bytes:
        """Encode a float chunk (numpy or torch, 1-D or [1, n], any length); the bytes ready now."""
        if self._closed:
            raise ValueError(f"this {self.format} stream is closed; nothing more can be written")
        self._encode(_samples(chunk))  # NaN / bad shape: ValueError before anything is encoded
        return self._sink.drain()

    def _encode(self, data: np.ndarray) -> None:
        if data.size == 0:
            return
        if self.format in ("pcm", "wav"):
            self._sink.write(to_int16(data).astype("<i2", copy=False).tobytes())
        elif self._sf is not None:
            # Lossless FLAC gets the integers (one rounding with wav/pcm); the lossy codecs the floats.
            self._sf.write(to_int16(data) if self.format == "flac" else data)
        else:
            self._encode_aac(data)
        self.samples_written += data.size

    def _encode_aac(self, data) -> None:
        # The encoder takes planar float; for mono that is these samples as they are. PyAV re-cuts
        # the frames into the encoder's 1024-sample frames.
        frame = self._av_frame.from_ndarray(data[None, :], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples_written
        frame.time_base = self._av_time_base
        for packet in self._av_stream.encode(frame):
            self._av.mux(packet)

    def close(self) -> bytes:
        """Flush the encoder and end the stream; the remaining bytes (b"" on a second call)."""
        if self._closed:
            return b""
        self._closed = True
        if self.samples_written == 0 and self.format in _NEEDS_A_SAMPLE:
            self._encode(np.zeros(1, dtype=np.float32))
        if self._sf is not None:
            self._sf.close()
        elif self._av is not None:
            for packet in self._av_stream.encode(None):
                self._av.mux(packet)
            self._av.close()
        return self._sink.drain()


def _mp3_cbr_level(sr: int, kbps: int) -> float:
    """The libsndfile compression level that gives ``kbps`` in CBR mode at ``sr``.

    libsndfile maps a level c in [0, 1] linearly onto each MPEG version's bit-rate range
    (MPEG-1 at >= 32 kHz: 320..32, MPEG-2 at >= 16 kHz: 160..8, MPEG-2.5: 64..8 kbit/s) and
    truncates; half a kbit/s of margin keeps the truncation from landing one below (and at
    MPEG-2.5's top rate, 64, the level is 0).
    """
    top, bottom = (320, 32) if sr >= 32000 else (160, 8) if sr >= 16000 else (64, 8)
    return max(0.0, (top - kbps - 0.5) / (top - bottom))


def _set_ogg_page_latency(sfo, ms: float) -> None:
    """Ask libsndfile to end an Ogg page every ``ms`` of audio (soundfile has no call for it)."""
    import soundfile as sf

    try:  # soundfile's private handles: a soundfile without them keeps libsndfile's 1 s pages
        value = sf._ffi.new("double[1]", [ms])
        sf._snd.sf_command(sfo._file, _SFC_SET_OGG_PAGE_LATENCY_MS, value, sf._ffi.sizeof(value))
    except AttributeError as e:
        import logging

        logging.getLogger(__name__).warning("cannot shorten Ogg pages with this soundfile (%s): streamed Opus "
                                            "comes out once a second", e)


def encode_chunks(chunks: Iterable, fmt: str, sample_rate: int = 24000) -> Iterator[bytes]:
    """Encode an iterable of float chunks; yields the non-empty byte pieces as they come, then the tail.

    A generator closed early (a client gone) still closes its encoder."""
    enc = StreamEncoder(fmt, sample_rate)
    try:
        for chunk in chunks:
            piece = enc.write(chunk)
            if piece:
                yield piece
        tail = enc.close()
        if tail:
            yield tail
    finally:
        enc.close()


def encode_whole(wav, fmt: str, sample_rate: int = 24000) -> bytes:
    """A whole waveform -> the bytes of a non-streamed ``fmt`` response: ``audio_out.encode`` (a
    complete file, MP3 with its VBR header) for the formats it has, PyAV's ADTS for ``aac``."""
    key = check_serve_format(fmt)
    if key != "aac":
        return audio_out.encode(wav, sample_rate, key)
    enc = StreamEncoder(key, sample_rate)
    return enc.write(wav) + enc.close()


__all__ = ["AAC_RATES", "SERVE_FORMATS", "StreamEncoder", "check_serve_format", "encode_chunks", "encode_whole",
           "media_type"]
