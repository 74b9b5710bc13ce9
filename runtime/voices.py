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
Temporary files start with ``.``, which no voice name may, so they never look like entries.

Loaded voices are kept in a bounded, thread-safe LRU (CPU copies, keyed by name and the two files'
mtime and size, so a change made by another process is noticed on the next ``get``).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import __version__
from .voice import Voice, VoiceError

ENV_VAR = "CHATTERBOX_RT_VOICES"
DEFAULT_ROOT = Path("~/.cache/chatterbox-rt/voices")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
VOICE_SUFFIX, INFO_SUFFIX = ".pt", ".json"
DEFAULT_CACHE_ITEMS = 32
FORMAT_VERSION = 1

# Voices made for one variant fit the others of its family: the same speech-prompt length
# (T3Config.speech_cond_prompt_len: 150 for the Llama models, 375 for the GPT-2 ones) and the
# same clip preprocessing (Turbo/Nano normalise loudness and read 15 s instead of 6).
VOICE_FAMILY = {"chatterbox": "llama", "multilingual": "llama", "turbo": "gpt2", "nano": "gpt2"}
FAMILY_PROMPT_TOKENS = {"llama": 150, "gpt2": 375}


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(variant: str) -> str:
    from .models.t3.config import canonical_variant

    key = canonical_variant(variant)
    if key not in VOICE_FAMILY:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VOICE_FAMILY)}")
    return key


@dataclasses.dataclass(frozen=True)
class VoiceInfo:
    """One library entry's metadata (the ``<NAME>.json`` record)."""

    name: str
    variant: str
    exaggeration: float
    source: Optional[str]  # absolute path of the clip, or None for an array
    source_sha256: str
    duration_s: float
    sample_rate: int
    created: str  # ISO 8601, UTC
    version: str  # chatterbox_rt version that prepared it
    path: Optional[str] = None  # the .pt file (filled in when read from a library)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d["format"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "VoiceInfo":
        fields = {f.name for f in dataclasses.fields(cls)} - {"path"}
        missing = sorted(fields - set(data))
        if missing:
            raise VoiceError(f"{path}: voice record lacks {missing}")
        return cls(**{k: data[k] for k in fields}, path=str(path.with_suffix(VOICE_SUFFIX)))


class VoiceLibrary:
    """Named voices on disk, with an in-memory LRU of loaded ones (see the module docstring)."""

    def __init__(self, root: Union[str, os.PathLike, None] = None, max_cached: int = DEFAULT_CACHE_ITEMS):
        if max_cached < 0:
            raise ValueError(f"max_cached must be >= 0, got {max_cached}")
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[tuple, Voice]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"VoiceLibrary({str(self.root)!r})"

    # ------------------------------------------------------------------ paths

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.root / f"{name}{VOICE_SUFFIX}", self.root / f"{name}{INFO_SUFFIX}"

    def __contains__(self, name) -> bool:
        try:
            return self._paths(name)[1].is_file()
        except VoiceError:
            return False

    def __len__(self) -> int:
        return len(self.list())

    def _missing(self, name: str) -> UnknownVoice:
        return UnknownVoice(f"no voice named {name!r} in the library {self.root} "
                            f"(`chatterbox-rt voices list` shows the voices there)")

    # ------------------------------------------------------------------ write

    def add(self, name: str, clip, tts, exaggeration: float = 0.5, overwrite: bool = False,
            sr: Optional[int] = None) -> Voice:
        """Prepare ``clip`` (a path, or an array with ``sr``) with ``tts.prepare_conditionals`` and
        store it as ``name``. An existing name is an error unless ``overwrite=True``."""
        pt, info_path = self._paths(name)
        if info_path.is_file() and not overwrite:
            raise VoiceError(f"a voice named {name!r} already exists in {self.root}; pass overwrite=True "
                             f"(CLI: --overwrite) to replace it, or `chatterbox-rt voices remove {name}` first")
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
        info = VoiceInfo(name=name, variant=_canonical(tts.variant), exaggeration=float(exaggeration),
                         source=source, source_sha256=sha, duration_s=round(float(duration), 3),
                         sample_rate=int(rate), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         version=__version__)
        self._write(name, voice, info)
        return voice

    def _write(self, name: str, voice: Voice, info: VoiceInfo) -> None:
        pt, info_path = self._paths(name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmps, placed, committed = [], False, False
        try:
            for suffix in (VOICE_SUFFIX, INFO_SUFFIX):
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f"{suffix}.tmp", dir=self.root)
                tmps.append(Path(tmp))
                with os.fdopen(fd, "wb") as f:
                    if suffix == VOICE_SUFFIX:
                        torch.save(voice.to_dict(), f)
                    else:
                        f.write(json.dumps(info.to_json(), indent=2).encode() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
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
        pt, info_path = self._paths(name)
        with self._lock:
            self._cache.pop(name, None)
            if not info_path.is_file():
                raise self._missing(name)
            info_path.unlink()  # the record first: from here on the entry does not exist
            pt.unlink(missing_ok=True)

    # ------------------------------------------------------------------ read

    def info(self, name: str) -> VoiceInfo:
        _, info_path = self._paths(name)
        if not info_path.is_file():
            raise self._missing(name)
        try:
            data = json.loads(info_path.read_text())
        except (OSError, ValueError) as e:
            raise VoiceError(f"cannot read voice record {info_path}: {e}") from e
        if not isinstance(data, dict):
            raise VoiceError(f"{info_path} is not a voice record")
        return VoiceInfo.from_json(data, info_path)

    def list(self) -> list[VoiceInfo]:
        """Every entry, sorted by name (unreadable records are skipped)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob(f"*{INFO_SUFFIX}")):
            name = p.name[: -len(INFO_SUFFIX)]
            if name.startswith(".") or not NAME_PATTERN.fullmatch(name):
                continue
            try:
                out.append(self.info(name))
            except VoiceError:
                continue
        return out

    def _stamp(self, name: str) -> tuple:
        pt, info_path = self._paths(name)
        try:
            a, b = pt.stat(), info_path.stat()
        except FileNotFoundError:
            raise self._missing(name) from None
        return (a.st_mtime_ns, a.st_size, b.st_mtime_ns, b.st_size)

    def get(self, name: str, device=None, variant: Optional[str] = None) -> Voice:
        """The voice ``name`` (on ``device`` if given). With ``variant``, check that the voice was
        prepared for a model of that family (a Turbo voice has 375 prompt tokens, a Llama one 150)."""
        if variant is not None:
            self.check_variant(name, variant)
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
            voice = Voice.load(self._paths(name)[0])
            if self.max_cached:
                with self._lock:
                    self._cache[name] = (stamp, voice)
                    self._cache.move_to_end(name)
                    while len(self._cache) > self.max_cached:
                        self._cache.popitem(last=False)
        return voice.to(device) if device is not None else voice

    def check_variant(self, name: str, variant: str) -> VoiceInfo:
        info = self.info(name)
        want, have = _canonical(variant), _canonical(info.variant)
        if VOICE_FAMILY[want] != VOICE_FAMILY[have]:
            fits = [v for v, f in VOICE_FAMILY.items() if f == VOICE_FAMILY[want]]
            raise VoiceError(
                f"voice {name!r} was prepared for {have} ({FAMILY_PROMPT_TOKENS[VOICE_FAMILY[have]]} prompt tokens) "
                f"and does not fit the {want} model, which needs a voice prepared for {' or '.join(fits)} "
                f"({FAMILY_PROMPT_TOKENS[VOICE_FAMILY[want]]} prompt tokens); prepare the clip again with that "
                f"model under another name (CLI: `chatterbox-rt voices add NAME CLIP --variant {want}`)")
        return info

    def cache_info(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max": self.max_cached,
                    "names": list(self._cache)}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


__all__ = ["VoiceLibrary", "VoiceInfo", "UnknownVoice", "check_name", "default_root", "ENV_VAR", "VOICE_FAMILY"]
