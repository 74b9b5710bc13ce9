"""Audio output: a float waveform -> bytes in a named format, and atomic file writes.

One module for every place that hands audio out (the CLI now, an HTTP server later)::

    data = encode(wav, 24000, "mp3")            # bytes
    write("out.flac", wav, 24000)               # format from the extension, written atomically
    write("-", wav, 24000, "pcm")               # standard output

Formats (``FORMATS``), all mono, encoded by the libsndfile that soundfile bundles (>= 1.1 writes
MP3 and Ogg/Opus):

* ``wav``: 16-bit PCM WAV; ``flac``: 16-bit FLAC (lossless: the same samples as the WAV);
* ``mp3``: MPEG-1/2 layer III; ``ogg``: Ogg/Vorbis; ``opus``: Ogg/Opus (48/24/16/12/8 kHz only),
  at libsndfile's default quality (~80, ~60 and ~40 kbit/s for 24 kHz speech);
* ``pcm``: raw 16-bit little-endian samples, no header (OpenAI's ``response_format="pcm"``);
  byte for byte the WAV's data chunk.

Samples are clipped to [-1, 1] before the conversion to integers (libsndfile would wrap around);
a NaN sample is an error. The lossless formats share one rounding (nearest of ``x * 32768``). An
empty waveform gives a valid file (FLAC, MP3 and Opus cannot hold zero samples, so they get one
silent sample).

:func:`write` never leaves a half-written file under the target name: the data is encoded in
memory first, written to a temporary file in the target's directory, flushed to disk and renamed
over the target (``os.replace``); on any failure (a full disk, an interrupt) the temporary file is
removed and a previous file of that name is untouched. The new file's permission bits are those
a plain ``open(path, "w")`` would give: the umask's for a new file, the old file's when one is
replaced. Targets that exist and are not regular files (``/dev/stdout``, ``/dev/full``, a FIFO)
are written directly, and so is a writable existing file in a directory where no temporary file
can be created. Failures raise ``OSError`` / ``ValueError`` naming the path and the reason.
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

# name -> (libsndfile major format, subtype)
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "pcm": ("RAW", "PCM_16"),
}
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "ogg", ".oga": "ogg", ".opus": "opus",
              ".pcm": "pcm", ".raw": "pcm"}
# HTTP Content-Type per format (``pcm``: RFC 2586's audio/L16 names the rate and channels).
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg",
               "opus": "audio/ogg; codecs=opus", "pcm": "audio/L16"}
LOSSLESS = ("wav", "flac", "pcm")
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
STDOUT = "-"

PathOrStream = Union[str, os.PathLike, BinaryIO]


def _known() -> str:
    return ", ".join(FORMATS)


def check_format(fmt: str) -> str:
    """A format name (any case) -> its key in ``FORMATS``; ValueError listing the formats otherwise."""
    key = str(fmt).strip().lower().lstrip(".")
    if key not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {_known()}")
    return key


def format_for_path(path: Union[str, os.PathLike]) -> str:
    """The format an output file name asks for, by its extension (``.oga`` is Ogg/Vorbis, ``.raw``
    raw PCM). No extension, or one that is not an audio format here: ValueError."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    what = "has no file extension" if not ext else f"has the extension {p.suffix!r}, which is not an audio format here"
    raise ValueError(f"cannot tell the audio format of {os.fspath(path)}: it {what}; name it .wav, .flac, .mp3, "
                     f".ogg, .opus or .pcm, or choose the format with --format ({_known()})")


def media_type(fmt: str, sr: int = 24000) -> str:
    """HTTP Content-Type for a format (``pcm`` carries its rate: ``audio/L16; rate=24000; channels=1``)."""
    key = check_format(fmt)
    if key == "pcm":
        return f"audio/L16; rate={int(sr)}; channels=1"
    return MEDIA_TYPES[key]


def _samples(wav) -> np.ndarray:
    """torch tensor or array, 1-D or ``[1, N]`` / ``[N, 1]`` -> clipped float32 ``[N]``."""
    if hasattr(wav, "detach"):  # a torch tensor (torch is not needed to use this module otherwise)
        wav = wav.detach().float().cpu().numpy()
    data = np.asarray(wav)
    if data.dtype.kind != "f":
        raise ValueError(f"the waveform must be float samples in [-1, 1], got dtype {data.dtype}")
    if data.ndim == 2 and 1 in data.shape:
        data = data.reshape(-1)
    if data.ndim != 1:
        raise ValueError(f"the waveform must be mono, 1-D or [1, N]; got shape {tuple(data.shape)}")
    data = data.astype(np.float32, copy=False)
    n_nan = int(np.isnan(data).sum())
    if n_nan:
        raise ValueError(f"the waveform has {n_nan} NaN sample(s) (of {data.size}); nothing was written")
    return np.clip(data, -1.0, 1.0)  # inf -> +-1 too


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Clipped float samples -> int16 by round-to-nearest of ``x * 32768`` (1.0 -> 32767)."""
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)


def _check_rate(sr, key: str) -> int:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"the sample rate must be a positive int, got {sr!r}")
    sr = int(sr)
    if key == "opus" and sr not in OPUS_RATES:
        raise ValueError(f"Opus takes {', '.join(map(str, OPUS_RATES))} Hz, not {sr} Hz")
    if key == "mp3" and sr not in MP3_RATES:
        raise ValueError(f"MP3 takes {', '.join(map(str, MP3_RATES))} Hz, not {sr} Hz")
    return sr


def encode(wav, sr: int, fmt: str = "wav") -> bytes:
    """A float waveform (torch or numpy, 1-D or ``[1, N]``) at ``sr`` Hz -> the bytes of a ``fmt`` file."""
    import soundfile as sf

    key = check_format(fmt)
    sr = _check_rate(sr, key)
    data = _samples(wav)
    if data.size == 0 and key in ("flac", "mp3", "opus"):
        data = np.zeros(1, dtype=np.float32)  # these encoders write nothing readable for no samples
    if key in LOSSLESS:
        data = to_int16(data)  # one rounding for all three (libsndfile's WAV and FLAC paths differ)
    major, subtype = FORMATS[key]
    buf = io.BytesIO()
    try:
        sf.write(buf, data, sr, format=major, subtype=subtype, endian="LITTLE" if key == "pcm" else None)
    except (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot encode {data.size} samples at {sr} Hz as {key}: {e}") from e
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _os_error(path, e: OSError, doing: str = "write") -> OSError:
    """An OSError whose message is ``cannot write PATH: reason`` (errno kept)."""
    reason = e.strerror or str(e) or type(e).__name__
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    err = OSError(f"cannot {doing} {where}: {reason}")
    err.errno = e.errno
    return err


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask's set-and-restore
    would briefly affect other threads' files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass  # not Linux (or no /proc): the portable way below
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_direct(path: Path, data: bytes) -> None:
    """Open and write a target as it is (a device, a FIFO, or a file we may not replace)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
    except OSError as e:
        raise _os_error(path, e) from e


def check_output_path(path: Union[str, os.PathLike]) -> Path:
    """Where ``write`` would put ``path``, checked before any work is done: not a directory, its
    directory exists, and a file can be created there (or the existing target can be written).
    Returns the expanded path; OSError / ValueError saying what is wrong otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"cannot write {p}: it is a directory; give a file name")
    parent = p.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {p}: directory {parent} does not exist")
    if p.exists() and not p.is_file():  # a device or a FIFO: written directly
        if not os.access(p, os.W_OK):
            raise PermissionError(f"cannot write {p}: permission denied")
        return p
    if not os.access(parent, os.W_OK | os.X_OK) and not (p.is_file() and os.access(p, os.W_OK)):
        raise PermissionError(f"cannot write {p}: permission denied (directory {parent} is not writable)")
    return p


def write_bytes(path: PathOrStream, data: bytes) -> None:
    """``data`` to ``path`` atomically (see the module docstring); ``"-"`` is standard output's
    binary buffer and a binary file object is written as it is."""
    if hasattr(path, "write"):
        try:
            path.write(data)
            path.flush()
        except OSError as e:
            raise _os_error(getattr(path, "name", "the output stream"), e) from e
        return
    if os.fspath(path) == STDOUT:
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout
        try:
            out.write(data)
            out.flush()
        except OSError as e:
            raise _os_error("standard output", e) from e
        return

    p = Path(path).expanduser()
    try:
        st = os.stat(p)  # follows links
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _os_error(p, e) from e
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"cannot write {p}: it is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_direct(p, data)  # /dev/stdout, /dev/full, a FIFO: nothing to rename over
        return
    if p.is_symlink():
        p = Path(os.path.realpath(p))  # replace the file the link points to, not the link
    parent = p.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {p}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".tmp")
    except PermissionError as e:
        if st is not None and os.access(p, os.W_OK):
            _write_direct(p, data)  # may write the file, not its directory: in place, not atomically
            return
        raise _os_error(p, e) from e
    except OSError as e:
        raise _os_error(p, e) from e
    try:
        try:
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException as e:  # a full disk, an interrupt: no temporary file left behind
        with contextlib.suppress(OSError):  # already renamed or gone
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _os_error(p, e) from e
        raise
    # Make the rename durable: best effort, as not every file system lets a directory be fsync'ed.
    with contextlib.suppress(OSError):
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write(path: PathOrStream, wav, sr: int, fmt: Optional[str] = None) -> int:
    """Encode ``wav`` (see :func:`encode`) and write it to ``path`` atomically; ``"-"`` (or a
    binary stream) writes to standard output (that stream). ``fmt`` defaults to the path's
    extension (WAV for ``"-"``, a stream, or a device/FIFO without one). Returns the bytes written."""
    if fmt is None:
        fmt = default_format(path)
    try:
        data = encode(wav, sr, fmt)
    except ValueError as e:
        if hasattr(path, "write"):
            where = getattr(path, "name", None) or "the output stream"
        else:
            where = "standard output" if os.fspath(path) == STDOUT else os.fspath(path)
        raise ValueError(f"cannot write {where}: {e}") from e
    write_bytes(path, data)
    return len(data)


def default_format(path: PathOrStream) -> str:
    """The format ``write`` uses for ``path`` when none is given: by extension; WAV for standard
    output, a stream, or an existing device/FIFO whose name has no audio extension."""
    if hasattr(path, "write") or os.fspath(path) == STDOUT:
        return "wav"
    p = Path(path).expanduser()
    try:
        return format_for_path(p)
    except ValueError:
        if p.exists() and not p.is_file() and not p.is_dir():
            return "wav"
        raise


__all__ = ["FORMATS", "EXTENSIONS", "MEDIA_TYPES", "LOSSLESS", "STDOUT", "check_format", "format_for_path",
           "default_format", "media_type", "encode", "write", "write_bytes", "check_output_path"]
