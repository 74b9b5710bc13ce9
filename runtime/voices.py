"""A persistent voice library: prepare a reference clip once, reuse it by name.

On disk a library is a flat directory (``$CHATTERBOX_RT_VOICES``, default
``~/.cache/chatterbox-rt/voices``) with two files per voice:

* ``<NAME>.pt``: the voice in the reference's ``conds.pt`` layout (``Voice.save``), so
  ``ChatterboxTTS.prepare_conditionals`` users can ``Conditionals.load`` it unchanged;
* ``<NAME>.json``: what it was made from and for: the variant, exaggeration, the source clip's
  path, sha256, duration and sample rate, the creation time and the chatterbox_rt version.

The ``.json`` is the commit record: an entry exists exactly when its ``.json`` does, and it is
written last (temporary file, then ``os.replace``). An interrupted ``add`` therefore leaves either
no entry or a complete one; an interrupted ``add(overwrite=True)`` removes the old record first, so
it leaves the old entry, no entry, or the new one, never the new ``.pt`` under the old record.
Temporary files start with ``.``, which no voice name may, so they never look like entries. Files
get the usual mode of a file the user writes (``0666 & ~umask``), so a library one user prepares
can be read by another (a service account) as the umask allows.

Writers (``add``, ``remove``) commit under a lock that holds across threads and processes (an
``fcntl.flock`` on ``<ROOT>/.lock``; ``msvcrt.locking`` on Windows; an ``O_EXCL`` lock file
elsewhere). The slow preparation runs outside it; the name is checked again under the lock right
before the files move in, so of two concurrent adds of one name without ``overwrite`` exactly one
succeeds and the other fails with "already exists". Readers take no lock (a library may be read-only
to them), so a ``list`` taken during another process's commit may show that one entry as broken.

Anything else that looks like an entry is listed as *broken* (``VoiceInfo.problem``): a record that
cannot be read, a ``.pt`` without its record or a record without its ``.pt`` (e.g. left by a crash
or by hand); ``remove`` deletes any of them.

Loaded voices are kept in a bounded, thread-safe LRU (CPU copies, keyed by name and the two files'
mtime and size, so a change made by another process is noticed on the next ``get``). A voice from
the library knows the variant it was prepared for (``Voice.prepared_for``, from its record), so
``TTS`` refuses it for a model of the other family (``Voice.check_fits``), as ``get(variant=)`` does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import numbers
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import __version__
from .voice import (FAMILY_PROMPT_TOKENS, VOICE_FAMILY, Voice, VoiceError, check_exaggeration,
                    create_temp_file)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows and others
    fcntl = None
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None

ENV_VAR = "CHATTERBOX_RT_VOICES"
DEFAULT_ROOT = Path("~/.cache/chatterbox-rt/voices")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
VOICE_SUFFIX, INFO_SUFFIX = ".pt", ".json"
LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 60.0  # a writer holds the lock only while renaming files
DEFAULT_CACHE_ITEMS = 32
FORMAT_VERSION = 1


class UnknownVoice(VoiceError):
    """No voice of that name in the library."""


def default_root() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_ROOT.expanduser()


def check_name(name) -> str:
    """A voice name is 1-64 of ``A-Z a-z 0-9 . _ -`` and does not start with ``.``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith("."):
        raise VoiceError(f"invalid voice name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         f"not starting with '.' (e.g. 'alice' or 'narrator_2')")
    return name


def _is_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name)) and not name.startswith(".")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(variant: str) -> str:
    from .models.t3.config import canonical_variant

    key = canonical_variant(variant) if isinstance(variant, str) else variant
    if key not in VOICE_FAMILY:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VOICE_FAMILY)}")
    return key


_OPTIONAL_RECORD_FIELDS = ("median_f0", "clips")
_RECORD_TYPES = {"name": str, "source": (str, type(None)), "source_sha256": str, "duration_s": numbers.Real,
                 "sample_rate": numbers.Integral, "created": str, "version": str}


@dataclasses.dataclass(frozen=True)
class VoiceInfo:
    """One library entry's metadata (the ``<NAME>.json`` record).

    A broken entry (see the module docstring) has ``problem`` set to what is wrong, and None in the
    fields it could not read."""

    name: str
    variant: Optional[str] = None
    exaggeration: Optional[float] = None
    source: Optional[str] = None  # absolute path of the clip, or None for an array
    source_sha256: Optional[str] = None
    duration_s: Optional[float] = None
    sample_rate: Optional[int] = None
    created: Optional[str] = None  # ISO 8601, UTC
    version: Optional[str] = None  # chatterbox_rt version that prepared it
    path: Optional[str] = None  # the .pt file (filled in when read from a library)
    problem: Optional[str] = None  # why the entry is unusable; None for a good one
    # Optional in a record (older ones lack them): the median F0 of the clip(s) in Hz, when the
    # pitch extra measured it (voice conversion's pitch_match), and, for a voice made from several
    # clips, each clip's {source, source_sha256, duration_s, sample_rate} (the fields above then
    # describe the longest clip, the prompt's).
    median_f0: Optional[float] = None
    clips: Optional[list] = None

    @property
    def broken(self) -> bool:
        return self.problem is not None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d.pop("problem")
        d["format"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "VoiceInfo":
        fields = {f.name for f in dataclasses.fields(cls)} - {"path", "problem"}
        missing = sorted(fields - set(data) - set(_OPTIONAL_RECORD_FIELDS))
        if missing:
            raise VoiceError(f"{path}: voice record lacks {missing}")
        try:
            variant = _canonical(data["variant"])
        except ValueError as e:
            raise VoiceError(f"{path}: {e}") from None
        exaggeration = check_exaggeration(data["exaggeration"], f"{path}: exaggeration")
        for key, want in _RECORD_TYPES.items():
            if not isinstance(data[key], want) or isinstance(data[key], bool):
                raise VoiceError(f"{path}: {key} is {type(data[key]).__name__} {data[key]!r}, not a voice "
                                 f"record's {want[0].__name__ if isinstance(want, tuple) else want.__name__}")
        f0 = data.get("median_f0")
        if f0 is not None and (isinstance(f0, bool) or not isinstance(f0, numbers.Real) or not f0 > 0):
            raise VoiceError(f"{path}: median_f0 is {f0!r}, not a positive number of Hz")
        clips = data.get("clips")
        if clips is not None and (not isinstance(clips, list) or not all(isinstance(c, dict) for c in clips)):
            raise VoiceError(f"{path}: clips is {type(clips).__name__}, not a list of clip records")
        return cls(**{k: data.get(k) for k in fields} | {"variant": variant, "exaggeration": exaggeration},
                   path=str(path.with_suffix(VOICE_SUFFIX)))


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S):
    """An exclusive lock on ``path`` held across processes (and threads: each call opens the file
    anew, and an flock belongs to the open file). ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on
    Windows, else an ``O_EXCL`` companion file ``<path>.excl``."""
    deadline = time.monotonic() + timeout

    def wait() -> None:
        if time.monotonic() > deadline:
            raise VoiceError(f"the voice library is locked by another writer ({path}) for more than "
                             f"{timeout:g} s; if no other writer is running, delete {path}")
        time.sleep(0.01)

    if fcntl is None and msvcrt is None:  # pragma: no cover - neither POSIX nor Windows
        excl = path.with_name(path.name + ".excl")
        while True:
            try:
                os.close(os.open(excl, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                wait()
        try:
            yield
        finally:
            excl.unlink(missing_ok=True)
        return

    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        while True:
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:  # pragma: no cover - Windows
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                break
            except (BlockingIOError, PermissionError):  # held by another: EWOULDBLOCK / EACCES
                wait()
            except OSError:  # pragma: no cover - msvcrt reports a held lock as EDEADLOCK
                if fcntl is not None:
                    raise
                wait()
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:  # pragma: no cover - Windows
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)


class VoiceLibrary:
    """Named voices on disk, with an in-memory LRU of loaded ones (see the module docstring)."""

    def __init__(self, root: Union[str, os.PathLike, None] = None, max_cached: int = DEFAULT_CACHE_ITEMS):
        if max_cached < 0:
            raise ValueError(f"max_cached must be >= 0, got {max_cached}")
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._check_root()
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[tuple, Voice]] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._write_lock = threading.Lock()  # writers of this object, before the cross-process lock
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"VoiceLibrary({str(self.root)!r})"

    # ------------------------------------------------------------------ paths

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise VoiceError(f"voice library {self.root} is a file, not a directory; give --library (or "
                             f"${ENV_VAR}) a directory")

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.root / f"{name}{VOICE_SUFFIX}", self.root / f"{name}{INFO_SUFFIX}"

    def __contains__(self, name) -> bool:
        try:
            return self._paths(name)[1].is_file()
        except VoiceError:
            return False

    def __len__(self) -> int:
        """The number of listed entries (broken ones included, as ``list`` shows them)."""
        return len(self.list())

    def _missing(self, name: str) -> UnknownVoice:
        pt = self.root / f"{name}{VOICE_SUFFIX}"
        orphan = (f" (only an orphan {pt.name} without its record is there, e.g. from an interrupted add: "
                  f"`chatterbox-rt voices remove {name}` deletes it)") if pt.is_file() else ""
        return UnknownVoice(f"no voice named {name!r} in the library {self.root}{orphan} "
                            f"(`chatterbox-rt voices list` shows the voices there)")

    def _exists(self, name: str, later: bool = False) -> VoiceError:
        how = " (added by another thread or process while this one was being prepared)" if later else ""
        return VoiceError(f"a voice named {name!r} already exists in {self.root}{how}; pass overwrite=True "
                          f"(CLI: --overwrite) to replace it, or `chatterbox-rt voices remove {name}` first")

    @contextlib.contextmanager
    def _writing(self):
        """Exclusive write access to the library, across threads and processes."""
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        with self._write_lock, _file_lock(self.root / LOCK_NAME):
            yield

    # ------------------------------------------------------------------ write

    def add(self, name: str, clip, tts, exaggeration: float = 0.5, overwrite: bool = False,
            sr: Optional[int] = None) -> Voice:
        """Prepare ``clip`` (a path, or an array with ``sr``; or a list of them: several clips of
        one speaker) with ``tts.prepare_conditionals`` and store it as ``name``. An existing name is
        an error unless ``overwrite=True``, also when another thread or process adds the same name
        meanwhile (exactly one of them wins).

        Several clips: each is prepared, then ``chatterbox_rt.voice.merge_voices`` averages the
        speaker embeddings and keeps the longest clip's prompts. With the ``vc`` extra installed
        (``chatterbox_rt.pitch``) the clips' median F0 is measured and kept in the record
        (``Voice.median_f0``: voice conversion's ``pitch_match``)."""
        from .voice import merge_voices

        pt, info_path = self._paths(name)
        exaggeration = check_exaggeration(exaggeration)
        self._check_root()
        if info_path.is_file() and not overwrite:  # fail fast; checked again under the lock
            raise self._exists(name)
        clips = list(clip) if isinstance(clip, (list, tuple)) else [clip]
        if not clips:
            raise ValueError("no clips given: a voice needs at least one clip")
        voices, records = [], []
        for c in clips:
            voice, record = self._prepare(c, tts, exaggeration, sr)
            voices.append(voice)
            records.append(record)
        longest = max(range(len(clips)), key=lambda i: records[i]["duration_s"])
        voice = merge_voices(voices, [r["duration_s"] for r in records])
        f0 = _clips_median_f0(clips, sr)
        if f0 is not None:
            voice = dataclasses.replace(voice, median_f0=f0)
        variant = _canonical(tts.variant)
        top = records[longest]
        info = VoiceInfo(name=name, variant=variant, exaggeration=exaggeration,
                         source=top["source"], source_sha256=top["source_sha256"],
                         duration_s=round(float(top["duration_s"]), 3), sample_rate=int(top["sample_rate"]),
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         version=__version__, median_f0=None if f0 is None else round(f0, 3),
                         clips=[dict(r, duration_s=round(float(r["duration_s"]), 3)) for r in records]
                         if len(records) > 1 else None)
        self._write(name, voice, info, overwrite=overwrite)
        if voice.prepared_for is None:
            voice = dataclasses.replace(voice, prepared_for=variant)
        return voice

    @staticmethod
    def _prepare(clip, tts, exaggeration: float, sr: Optional[int]) -> tuple[Voice, dict]:
        """One clip -> (its voice, its record fields: source, source_sha256, duration_s, sample_rate)."""
        if isinstance(clip, (str, os.PathLike)):
            import soundfile as sf

            from .audio import AudioError

            clip_path = Path(clip).expanduser().resolve()
            voice = tts.prepare_conditionals(str(clip_path), sr=sr, exaggeration=exaggeration)
            try:  # prepare_conditionals has already read it, so this only fails on a race
                meta = sf.info(str(clip_path))
            except Exception as e:
                raise AudioError(f"{clip_path}: cannot read as audio ({e})") from e
            source, sha, duration, rate = str(clip_path), _sha256_file(clip_path), meta.duration, meta.samplerate
        else:
            if sr is None:
                raise TypeError("clip must be a file path, or an array given with its sample rate sr=")
            voice = tts.prepare_conditionals(clip, sr=sr, exaggeration=exaggeration)
            arr = clip.detach().cpu().numpy() if torch.is_tensor(clip) else np.asarray(clip)
            source, sha = None, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
            duration, rate = arr.shape[-1] / sr if arr.ndim == 1 else max(arr.shape) / sr, sr
        return voice, {"source": source, "source_sha256": sha, "duration_s": float(duration), "sample_rate": int(rate)}

    def _write(self, name: str, voice: Voice, info: VoiceInfo, overwrite: bool = True) -> None:
        pt, info_path = self._paths(name)
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        record = json.dumps(info.to_json(), indent=2, allow_nan=False).encode() + b"\n"
        tmps, placed, committed = [], False, False
        try:
            for suffix in (VOICE_SUFFIX, INFO_SUFFIX):  # the slow part, outside the lock
                fd, tmp = create_temp_file(self.root, prefix=f".{name}.", suffix=f"{suffix}.tmp")
                tmps.append(tmp)
                with os.fdopen(fd, "wb") as f:
                    if suffix == VOICE_SUFFIX:
                        torch.save(voice.to_dict(), f)
                    else:
                        f.write(record)
                    f.flush()
                    os.fsync(f.fileno())
            with self._writing():
                if not overwrite and info_path.is_file():
                    raise self._exists(name, later=True)
                with self._lock:
                    self._cache.pop(name, None)
                # The old record goes first, so an interruption never pairs the new .pt with it.
                info_path.unlink(missing_ok=True)
                os.replace(tmps[0], pt)
                placed = True
                os.replace(tmps[1], info_path)
                committed = True
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
            if placed and not committed:  # a .pt without its record is no entry: do not leave it behind
                pt.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        """Delete the entry ``name``, broken ones included (a record without its ``.pt``, an orphan
        ``.pt``, an unreadable record)."""
        pt, info_path = self._paths(name)
        self._check_root()
        if not (info_path.is_file() or pt.is_file()):
            with self._lock:
                self._cache.pop(name, None)
            raise self._missing(name)
        with self._writing():
            with self._lock:
                self._cache.pop(name, None)
            info_path.unlink(missing_ok=True)  # the record first: from here on the entry does not exist
            pt.unlink(missing_ok=True)

    # ------------------------------------------------------------------ read

    def info(self, name: str) -> VoiceInfo:
        """The record of ``name``; a VoiceError saying what is wrong when it is broken."""
        _, info_path = self._paths(name)
        if not info_path.is_file():
            raise self._missing(name)
        try:
            data = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VoiceError(f"cannot read voice record {info_path}: {e}") from e
        if not isinstance(data, dict):
            raise VoiceError(f"{info_path} is not a voice record (not a JSON object)")
        return VoiceInfo.from_json(data, info_path)

    def _entry(self, name: str) -> VoiceInfo:
        pt, info_path = self._paths(name)
        if not info_path.is_file():
            return VoiceInfo(name, path=str(pt), problem=f"{pt.name} has no record {info_path.name} "
                                                         f"(left by an interrupted add?)")
        try:
            info = self.info(name)
        except VoiceError as e:
            return VoiceInfo(name, path=str(pt), problem=" ".join(str(e).split()))
        if not pt.is_file():
            return dataclasses.replace(info, problem=f"its voice file {pt.name} is missing")
        return info

    def list(self) -> list[VoiceInfo]:
        """Every entry, sorted by name; broken ones (see the module docstring) have ``problem`` set."""
        self._check_root()
        if not self.root.is_dir():
            return []
        names = set()
        for p in self.root.iterdir():
            for suffix in (VOICE_SUFFIX, INFO_SUFFIX):
                if p.name.endswith(suffix) and _is_name(p.name[: -len(suffix)]) and p.is_file():
                    names.add(p.name[: -len(suffix)])
        return [self._entry(n) for n in sorted(names)]

    def _stamp(self, name: str) -> tuple:
        pt, info_path = self._paths(name)
        try:
            b = info_path.stat()
        except FileNotFoundError:
            raise self._missing(name) from None
        try:
            a = pt.stat()
        except FileNotFoundError:
            raise VoiceError(f"voice {name!r} in {self.root} is broken: its voice file {pt.name} is missing "
                             f"(`chatterbox-rt voices remove {name}` deletes the entry)") from None
        return (a.st_mtime_ns, a.st_size, b.st_mtime_ns, b.st_size)

    def get(self, name: str, device=None, variant: Optional[str] = None) -> Voice:
        """The voice ``name`` (on ``device`` if given), with ``prepared_for`` from its record. With
        ``variant``, check that it fits a model of that variant (``Voice.check_fits``: a voice is
        prepared for one family, Llama or GPT-2); ``TTS`` makes the same check when it is used."""
        if variant is not None:
            variant = _canonical(variant)
        stamp = self._stamp(name)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(name)
                self.hits += 1
                voice = hit[1]
            else:
                voice = None
                self.misses += 1
        if voice is None:
            info = self.info(name)
            voice = Voice.load(self._paths(name)[0])
            voice.prepared_for = info.variant
            voice.median_f0 = info.median_f0
            if self.max_cached:
                with self._lock:
                    self._cache[name] = (stamp, voice)
                    self._cache.move_to_end(name)
                    while len(self._cache) > self.max_cached:
                        self._cache.popitem(last=False)
        if variant is not None:
            voice.check_fits(variant, name=name)
        return voice.to(device) if device is not None else voice

    def check_variant(self, name: str, variant: str) -> VoiceInfo:
        """The record of ``name`` if its voice fits ``variant``'s model, else a VoiceError that says
        the voice's real prompt length, the model it was prepared for, and what to do."""
        self.get(name, variant=variant)
        return self.info(name)

    def cache_info(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max": self.max_cached,
                    "names": list(self._cache)}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def _clips_median_f0(clips, sr: Optional[int]) -> Optional[float]:
    """The median F0 over every clip's frames (their 24 kHz audio joined), or None when the pitch
    extra (``pip install 'chatterbox-rt[vc]'``) is not installed or no frame is voiced."""
    try:
        from .pitch import median_f0
    except ImportError:
        return None
    from .audio import load_audio
    from .models.s3gen.hift import S3GEN_SR

    wav = np.concatenate([load_audio(c, sr, target_sr=S3GEN_SR)[0] for c in clips])
    try:
        f0 = median_f0(wav, S3GEN_SR)
    except ImportError:  # chatterbox_rt.pitch is there, its praat-parselmouth is not
        return None
    return None if f0 is None else float(f0)


__all__ = ["VoiceLibrary", "VoiceInfo", "UnknownVoice", "check_name", "default_root", "ENV_VAR", "VOICE_FAMILY",
           "FAMILY_PROMPT_TOKENS"]
