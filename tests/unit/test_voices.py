"""The voice library (chatterbox_rt.voices): files, names, overwrite rules, atomic writes, the LRU.

A stand-in TTS prepares random voices at the real shapes, so these tests run no model; the CLI
tests (test_cli.py) add a voice with a real (dummy-weight) TTS.
"""
import datetime
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox_rt import __version__
from chatterbox_rt.audio import AudioError, load_audio
from chatterbox_rt.tts import dummy_voice
from chatterbox_rt.voice import GEN_FIELDS, T3_FIELDS, Voice, VoiceError
from chatterbox_rt import voices as voices_mod
from chatterbox_rt.voices import ENV_VAR, UnknownVoice, VoiceLibrary, check_name

DATA = Path(__file__).resolve().parents[1] / "data"
CLIP = DATA / "speech_en_3s.wav"
CLIP_STEREO = DATA / "speech_stereo_44k.wav"
PROMPT_TOKENS = {"chatterbox": 150, "multilingual": 150, "turbo": 375, "nano": 375}


class FakeTTS:
    """``prepare_conditionals`` without a model: reads the clip (so bad audio fails as in TTS) and
    returns a different random voice each call."""

    def __init__(self, variant="chatterbox"):
        self.variant = variant
        self.calls = 0

    def prepare_conditionals(self, wav, sr=None, exaggeration=0.5):
        load_audio(wav, sr)
        self.calls += 1
        return dummy_voice(PROMPT_TOKENS[self.variant], seed=self.calls).with_exaggeration(exaggeration)


def same_voice(a: Voice, b: Voice) -> bool:
    da, db = a.to_dict(), b.to_dict()
    for part in ("t3", "gen"):
        for k, v in da[part].items():
            w = db[part][k]
            if torch.is_tensor(v) != torch.is_tensor(w) or (torch.is_tensor(v) and not torch.equal(v, w)):
                return False
    return True


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.fixture
def lib(tmp_path):
    return VoiceLibrary(tmp_path / "voices")


def test_add_get_list_remove(lib):
    tts = FakeTTS()
    v = lib.add("alice", CLIP, tts, exaggeration=0.7)
    assert "alice" in lib and "bob" not in lib and len(lib) == 1
    assert entries(lib.root) == ["alice.json", "alice.pt"]
    got = lib.get("alice")
    assert same_voice(v, got) and got.exaggeration == pytest.approx(0.7)

    (info,) = lib.list()
    assert info.name == "alice" and info.variant == "chatterbox" and info.exaggeration == pytest.approx(0.7)
    assert info.source == str(CLIP.resolve())
    assert info.source_sha256 == hashlib.sha256(CLIP.read_bytes()).hexdigest()
    wav, sr = load_audio(CLIP)
    assert info.sample_rate == sr and info.duration_s == pytest.approx(len(wav) / sr, abs=1e-3)
    assert info.version == __version__
    assert datetime.datetime.fromisoformat(info.created).tzinfo is not None
    assert Path(info.path) == lib.root / "alice.pt"
    assert json.loads((lib.root / "alice.json").read_text())["variant"] == "chatterbox"

    lib.add("bob", CLIP_STEREO, tts)
    assert [i.name for i in lib.list()] == ["alice", "bob"]
    lib.remove("alice")
    assert "alice" not in lib and entries(lib.root) == ["bob.json", "bob.pt"]
    with pytest.raises(UnknownVoice, match="no voice named 'alice'"):
        lib.remove("alice")
    with pytest.raises(UnknownVoice, match="voices list"):
        lib.get("alice")


def test_saved_file_is_conds_pt_layout(lib):
    v = lib.add("alice", CLIP, FakeTTS())
    data = torch.load(lib.root / "alice.pt", map_location="cpu", weights_only=True)
    assert set(data) == {"t3", "gen"}
    assert tuple(data["t3"]) == T3_FIELDS and set(data["gen"]) == set(GEN_FIELDS)
    assert data["t3"]["speaker_emb"].shape == (1, 256)
    assert data["t3"]["cond_prompt_speech_tokens"].shape == (1, 150)
    assert data["t3"]["emotion_adv"].shape == (1, 1, 1)
    assert same_voice(Voice.from_dict(data), v)


def test_array_clip_needs_sr(lib):
    wav, sr = load_audio(CLIP)
    lib.add("arr", wav, FakeTTS(), sr=sr)
    info = lib.info("arr")
    assert info.source is None and info.sample_rate == sr and info.duration_s == pytest.approx(len(wav) / sr, abs=1e-3)
    with pytest.raises(TypeError, match="sample rate"):
        lib.add("arr2", wav, FakeTTS())


def test_bad_clip_leaves_nothing(lib, tmp_path):
    with pytest.raises(AudioError, match="file not found"):
        lib.add("alice", tmp_path / "missing.wav", FakeTTS())
    assert "alice" not in lib and entries(lib.root) == []


def test_overwrite_rules(lib):
    tts = FakeTTS()
    first = lib.add("alice", CLIP, tts)
    with pytest.raises(VoiceError, match="already exists.*overwrite=True"):
        lib.add("alice", CLIP, tts)
    assert same_voice(lib.get("alice"), first)
    second = lib.add("alice", CLIP, tts, exaggeration=0.3, overwrite=True)
    assert not same_voice(first, second)
    assert same_voice(lib.get("alice"), second) and lib.info("alice").exaggeration == pytest.approx(0.3)
    # overwrite=True on a new name is fine.
    lib.add("bob", CLIP, tts, overwrite=True)
    assert "bob" in lib


@pytest.mark.parametrize("name", ["", ".hidden", ".", "..", "a/b", "../x", "a b", "x" * 65, "é", "a\n", None, 3])
def test_bad_names(lib, name):
    with pytest.raises(VoiceError, match="invalid voice name"):
        check_name(name)
    with pytest.raises(VoiceError, match="invalid voice name"):
        lib.add(name, CLIP, FakeTTS())
    with pytest.raises(VoiceError, match="invalid voice name"):
        lib.get(name)
    assert name not in lib
    assert entries(lib.root) == []


@pytest.mark.parametrize("name", ["a", "A.b_c-1", "x" * 64, "v1.0", "-dash"])
def test_good_names(lib, name):
    lib.add(name, CLIP, FakeTTS())
    assert name in lib and [i.name for i in lib.list()] == [name]


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "envlib"))
    assert VoiceLibrary().root == tmp_path / "envlib"
    monkeypatch.delenv(ENV_VAR)
    assert VoiceLibrary().root == Path("~/.cache/chatterbox-rt/voices").expanduser()


# --------------------------------------------------------------------------- atomic writes

class Boom(BaseException):
    """Stands for a crash or Ctrl-C (BaseException, like KeyboardInterrupt)."""


def test_failure_while_writing_voice_leaves_nothing(lib, monkeypatch):
    def half_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise Boom()

    monkeypatch.setattr(voices_mod.torch, "save", half_save)
    with pytest.raises(Boom):
        lib.add("alice", CLIP, FakeTTS())
    assert "alice" not in lib and lib.list() == [] and entries(lib.root) == []


def _fail_on_replace(monkeypatch, nth):
    """Make the nth os.replace in chatterbox_rt.voices raise (1 = the .pt, 2 = the .json)."""
    real, count = os.replace, [0]

    def replace(src, dst):
        count[0] += 1
        if count[0] == nth:
            raise Boom()
        return real(src, dst)

    monkeypatch.setattr(voices_mod.os, "replace", replace)


@pytest.mark.parametrize("nth", [1, 2])
def test_interrupted_commit_leaves_nothing(lib, monkeypatch, nth):
    _fail_on_replace(monkeypatch, nth)
    with pytest.raises(Boom):
        lib.add("alice", CLIP, FakeTTS())
    assert "alice" not in lib and entries(lib.root) == []


def test_failed_overwrite_keeps_old_voice(lib, monkeypatch):
    tts = FakeTTS()
    old = lib.add("alice", CLIP, tts, exaggeration=0.2)
    monkeypatch.setattr(voices_mod.torch, "save", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        lib.add("alice", CLIP, tts, overwrite=True)
    monkeypatch.undo()
    assert entries(lib.root) == ["alice.json", "alice.pt"]
    assert same_voice(lib.get("alice"), old) and lib.info("alice").exaggeration == pytest.approx(0.2)


def test_interrupted_overwrite_never_mixes(lib, monkeypatch):
    tts = FakeTTS()
    lib.add("alice", CLIP, tts)
    _fail_on_replace(monkeypatch, 2)  # the new .pt is in place, its record is not
    with pytest.raises(Boom):
        lib.add("alice", CLIP, tts, exaggeration=0.9, overwrite=True)
    # The old record was removed before the new .pt moved in: no entry rather than a mixed one.
    assert "alice" not in lib and entries(lib.root) == []


# --------------------------------------------------------------------------- cache

def test_lru_hits_and_eviction(tmp_path):
    lib = VoiceLibrary(tmp_path, max_cached=2)
    tts = FakeTTS()
    for n in ("a", "b", "c"):
        lib.add(n, CLIP, tts)
    first = lib.get("a")
    assert lib.get("a") is first  # served from memory
    assert lib.cache_info()["hits"] == 1 and lib.cache_info()["misses"] == 1
    lib.get("b")
    lib.get("a")  # a is now the most recent
    lib.get("c")  # evicts b
    info = lib.cache_info()
    assert info["names"] == ["a", "c"] and info["size"] == 2
    misses = info["misses"]
    lib.get("b")
    assert lib.cache_info()["misses"] == misses + 1 and lib.cache_info()["names"] == ["c", "b"]


def test_cache_disabled(tmp_path):
    lib = VoiceLibrary(tmp_path, max_cached=0)
    lib.add("a", CLIP, FakeTTS())
    assert lib.get("a") is not lib.get("a") and lib.cache_info()["size"] == 0


def test_cache_invalidation(lib):
    tts = FakeTTS()
    lib.add("alice", CLIP, tts)
    lib.get("alice")
    new = lib.add("alice", CLIP, tts, overwrite=True)
    assert "alice" not in lib.cache_info()["names"]
    assert same_voice(lib.get("alice"), new)

    lib.remove("alice")
    assert lib.cache_info()["names"] == []
    with pytest.raises(UnknownVoice):
        lib.get("alice")


def test_external_change_is_noticed(lib):
    lib.add("alice", CLIP, FakeTTS())
    cached = lib.get("alice")
    other = dummy_voice(150, seed=99)
    other.save(lib.root / "alice.pt")  # another process replaces the file
    st = (lib.root / "alice.pt").stat()
    os.utime(lib.root / "alice.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse-mtime filesystems
    got = lib.get("alice")
    assert got is not cached and same_voice(got, other)


def test_get_to_device(lib):
    lib.add("alice", CLIP, FakeTTS())
    v = lib.get("alice", device="cpu")
    assert v.device == torch.device("cpu")


def test_concurrent_gets(tmp_path):
    lib = VoiceLibrary(tmp_path, max_cached=2)
    tts = FakeTTS()
    for n in ("a", "b", "c"):
        lib.add(n, CLIP, tts)
    errors = []

    def worker(i):
        try:
            for k in range(20):
                assert lib.get("abc"[(i + k) % 3]).t3.speaker_emb.shape == (1, 256)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and lib.cache_info()["size"] <= 2


# --------------------------------------------------------------------------- variants

def test_variant_mismatch(lib):
    lib.add("turbo_voice", CLIP, FakeTTS("turbo"))
    lib.add("llama_voice", CLIP, FakeTTS("chatterbox"))
    with pytest.raises(VoiceError, match=r"prepared for turbo \(375 prompt tokens\).*chatterbox model") as e:
        lib.get("turbo_voice", variant="chatterbox")
    assert "voices add" in str(e.value)
    with pytest.raises(VoiceError, match=r"prepared for chatterbox \(150 prompt tokens\).*turbo or nano"):
        lib.get("llama_voice", variant="nano")
    # Same family: fine (aliases included).
    assert lib.get("turbo_voice", variant="nano").t3.cond_prompt_speech_tokens.shape == (1, 375)
    assert lib.get("llama_voice", variant="multilingual-v3").t3.cond_prompt_speech_tokens.shape == (1, 150)
    with pytest.raises(ValueError, match="unknown variant"):
        lib.get("llama_voice", variant="gpt5")


def test_corrupt_record_is_skipped_by_list_and_reported_by_get(lib):
    lib.add("alice", CLIP, FakeTTS())
    (lib.root / "bob.json").write_text("{not json")
    (lib.root / "bob.pt").write_bytes(np.zeros(4).tobytes())
    assert [i.name for i in lib.list()] == ["alice"]
    with pytest.raises(VoiceError, match="cannot read voice record"):
        lib.get("bob", variant="chatterbox")
    (lib.root / "bob.json").write_text(json.dumps(lib.info("alice").to_json() | {"name": "bob"}))
    with pytest.raises(VoiceError, match="cannot read voice file"):
        lib.get("bob")
