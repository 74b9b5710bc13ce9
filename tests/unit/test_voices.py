"""The voice library (chatterbox_rt.voices): files, names, overwrite rules, atomic writes, the LRU.

A stand-in TTS prepares random voices at the real shapes, so these tests run no model; the CLI
tests (test_cli.py) add a voice with a real (dummy-weight) TTS.
"""
import datetime
import hashlib
import json
import os
import re
import stat
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

    def __init__(self, variant="chatterbox", prompt_tokens=None, barrier=None, seed=0):
        self.variant, self.seed = variant, seed
        self.prompt_tokens = prompt_tokens or PROMPT_TOKENS[variant]
        self.barrier = barrier  # a threading.Barrier: every caller waits there (a race made certain)
        self.calls = 0

    def prepare_conditionals(self, wav, sr=None, exaggeration=0.5):
        load_audio(wav, sr)
        self.calls += 1
        seed = self.seed + self.calls
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        return dummy_voice(self.prompt_tokens, seed=seed).with_exaggeration(exaggeration)


def same_voice(a: Voice, b: Voice) -> bool:
    da, db = a.to_dict(), b.to_dict()
    for part in ("t3", "gen"):
        for k, v in da[part].items():
            w = db[part][k]
            if torch.is_tensor(v) != torch.is_tensor(w) or (torch.is_tensor(v) and not torch.equal(v, w)):
                return False
    return True


def entries(root: Path) -> list[str]:
    """The files in a library, but its writers' lock file (temporary files included: none may be left)."""
    return sorted(p.name for p in root.iterdir() if p.name != ".lock") if root.exists() else []


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


def test_variant_mismatch_states_the_real_prompt_length(lib):
    """A voice is refused for the other model family, with its real prompt-token count, the variant it
    was prepared for, and the command that fixes it (issue 17 item 8: "375 prompt tokens" was said of a
    voice that has 229)."""
    lib.add("nano_voice", CLIP, FakeTTS("nano", prompt_tokens=229))
    lib.add("llama_voice", CLIP, FakeTTS("chatterbox"))
    with pytest.raises(VoiceError, match=r"'nano_voice' was prepared for nano \(a GPT-2-family voice: 229 prompt "
                                         r"tokens.*the chatterbox model needs a Llama-family voice") as e:
        lib.get("nano_voice", variant="chatterbox")
    assert "375" not in str(e.value) and "voices add NAME CLIP --variant chatterbox" in str(e.value)
    with pytest.raises(VoiceError, match=r"prepared for chatterbox \(a Llama-family voice: 150 prompt tokens.*"
                                         r"nano model needs a GPT-2-family voice.*--variant nano"):
        lib.get("llama_voice", variant="nano")
    with pytest.raises(VoiceError, match="229 prompt tokens"):
        lib.check_variant("nano_voice", "multilingual")
    # Same family: fine (aliases included).
    assert lib.get("nano_voice", variant="turbo").t3.cond_prompt_speech_tokens.shape == (1, 229)
    assert lib.get("llama_voice", variant="multilingual-v3").t3.cond_prompt_speech_tokens.shape == (1, 150)
    assert lib.check_variant("llama_voice", "chatterbox").variant == "chatterbox"
    with pytest.raises(ValueError, match="unknown variant"):
        lib.get("llama_voice", variant="gpt5")


def test_library_voices_know_their_variant(lib):
    """get() gives the voice the variant of its record, so the Python API (TTS._voice ->
    Voice.check_fits) refuses the same voices as the CLI; the .pt itself stays the reference's."""
    added = lib.add("nano_voice", CLIP, FakeTTS("nano", prompt_tokens=140))
    assert added.prepared_for == "nano"
    v = lib.get("nano_voice")
    assert v.prepared_for == "nano" and v.family == "gpt2" and lib.get("nano_voice", device="cpu").prepared_for == "nano"
    with pytest.raises(VoiceError, match="prepared for nano"):
        v.check_fits("chatterbox", name="nano_voice")
    assert set(torch.load(lib.root / "nano_voice.pt", weights_only=True)) == {"t3", "gen"}
    assert Voice.load(lib.root / "nano_voice.pt").prepared_for is None  # 140 tokens: family unknown, accepted
    Voice.load(lib.root / "nano_voice.pt").check_fits("chatterbox")


# --------------------------------------------------------------------------- broken entries

def _break_entries(lib):
    """A good entry and every kind of broken one."""
    lib.add("alice", CLIP, FakeTTS())
    good = json.loads((lib.root / "alice.json").read_text())
    (lib.root / "bob.json").write_text("{not json")
    (lib.root / "bob.pt").write_bytes(np.zeros(4).tobytes())
    dummy_voice(150).save(lib.root / "orphan_pt.pt")
    (lib.root / "orphan_json.json").write_text(json.dumps(good | {"name": "orphan_json"}))
    (lib.root / "nan_exag.json").write_text(json.dumps(good | {"name": "nan_exag", "exaggeration": float("nan")}))
    dummy_voice(150).save(lib.root / "nan_exag.pt")
    (lib.root / "no_variant.json").write_text(json.dumps({k: v for k, v in good.items() if k != "variant"}))
    dummy_voice(150).save(lib.root / "no_variant.pt")
    (lib.root / ".alice.x.pt.tmp").write_bytes(b"")  # a writer's temporary file: never an entry
    return {"bob": "cannot read voice record", "nan_exag": "exaggeration must be a finite number",
            "no_variant": r"lacks \['variant'\]", "orphan_json": "orphan_json.pt is missing",
            "orphan_pt": "orphan_pt.pt has no record orphan_pt.json"}


def test_broken_entries_are_listed_refused_and_removable(lib):
    broken = _break_entries(lib)
    listed = lib.list()
    assert [i.name for i in listed] == sorted(["alice", *broken])
    by_name = {i.name: i for i in listed}
    assert not by_name["alice"].broken and by_name["alice"].problem is None
    for name, match in broken.items():
        info = by_name[name]
        assert info.broken and re.search(match, info.problem), (name, info.problem)
        with pytest.raises(VoiceError):
            lib.get(name)
    with pytest.raises(UnknownVoice, match="only an orphan orphan_pt.pt.*voices remove orphan_pt"):
        lib.get("orphan_pt")
    with pytest.raises(VoiceError, match="orphan_json.pt is missing.*voices remove orphan_json"):
        lib.get("orphan_json", variant="chatterbox")
    for name in broken:
        lib.remove(name)
    assert entries(lib.root) == [".alice.x.pt.tmp", "alice.json", "alice.pt"]
    assert [i.name for i in lib.list()] == ["alice"]
    with pytest.raises(UnknownVoice):
        lib.remove("orphan_pt")


def test_library_root_that_is_a_file(tmp_path):
    f = tmp_path / "voices"
    f.write_text("not a directory")
    with pytest.raises(VoiceError, match=r"voices is a file, not a directory"):
        VoiceLibrary(f)
    lib = VoiceLibrary(tmp_path / "later")
    assert lib.list() == []
    (tmp_path / "later").write_text("")  # became a file after construction
    for call in (lib.list, lambda: lib.add("a", CLIP, FakeTTS()), lambda: lib.remove("a")):
        with pytest.raises(VoiceError, match="is a file, not a directory"):
            call()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_follow_the_umask(tmp_path, umask):
    """Voices are readable by others as the umask allows (mkstemp made them 0600 whatever it was)."""
    old = os.umask(umask)
    try:
        lib = VoiceLibrary(tmp_path / "voices")
        lib.add("alice", CLIP, FakeTTS())
        path = dummy_voice(150).save(tmp_path / "plain.pt")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for p in (lib.root / "alice.pt", lib.root / "alice.json", path):
        assert stat.S_IMODE(p.stat().st_mode) == want, (p.name, oct(p.stat().st_mode))


# --------------------------------------------------------------------------- exaggeration

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5, 10.5, True, "0.5", None])
def test_add_refuses_a_bad_exaggeration_before_preparing(lib, bad):
    tts = FakeTTS()
    with pytest.raises(VoiceError, match="exaggeration must be"):
        lib.add("alice", CLIP, tts, exaggeration=bad)
    assert tts.calls == 0 and "alice" not in lib and entries(lib.root) == []


@pytest.mark.parametrize("value", [0.0, 0.25, 2.0, 10.0, np.float32(0.7), 1])
def test_add_accepts_the_reference_range(lib, value):
    lib.add("alice", CLIP, FakeTTS(), exaggeration=value)
    record = (lib.root / "alice.json").read_text()
    assert json.loads(record)["exaggeration"] == pytest.approx(float(value))
    assert lib.get("alice").exaggeration == pytest.approx(float(value))


# --------------------------------------------------------------------------- concurrent adds

def test_concurrent_adds_of_one_name_threads(lib):
    """Two adds of one name race past the early check (the barrier holds both in the slow
    preparation): exactly one wins, the other fails with "already exists", the stored voice is the
    winner's."""
    barrier = threading.Barrier(2)
    results = {}

    def add(i):
        try:
            results[i] = lib.add("alice", CLIP, FakeTTS(barrier=barrier, seed=100 * i))
        except VoiceError as e:
            results[i] = e

    threads = [threading.Thread(target=add, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    won = [r for r in results.values() if isinstance(r, Voice)]
    lost = [r for r in results.values() if isinstance(r, VoiceError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "already exists" in str(lost[0]) and "another thread or process" in str(lost[0])
    assert same_voice(lib.get("alice"), won[0])
    assert entries(lib.root) == ["alice.json", "alice.pt"]


_ADD_IN_A_PROCESS = r"""
import sys, time
from pathlib import Path
from chatterbox_rt.voice import Voice, VoiceError
from chatterbox_rt.voices import VoiceLibrary

root, me, clip, voice_file, barrier = sys.argv[1:]
barrier = Path(barrier)

class T:
    variant = "chatterbox"
    def prepare_conditionals(self, wav, sr=None, exaggeration=0.5):
        (barrier / me).touch()
        deadline = time.monotonic() + 60
        while len(list(barrier.iterdir())) < 2:  # both processes are past the early check
            if time.monotonic() > deadline:
                sys.exit("barrier timeout")
            time.sleep(0.01)
        return Voice.load(voice_file)

try:
    VoiceLibrary(root).add("alice", clip, T())
    print("added", me)
except VoiceError as e:
    print("refused", me, e)
"""


def test_concurrent_adds_of_one_name_processes(tmp_path):
    """The same race between two processes (two VoiceLibrary objects, no shared memory): the lock
    file serialises the commits and the name is checked again under it."""
    import subprocess
    import sys

    root, barrier = tmp_path / "voices", tmp_path / "barrier"
    barrier.mkdir()
    files = []
    for i in (1, 2):
        files.append(dummy_voice(150, seed=i).save(tmp_path / f"v{i}.pt"))
    procs = [subprocess.Popen([sys.executable, "-c", _ADD_IN_A_PROCESS, str(root), str(i), str(CLIP), str(f),
                               str(barrier)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, f in zip((1, 2), files, strict=True)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    added = [o for o in outs if o.startswith("added")]
    refused = [o for o in outs if o.startswith("refused")]
    assert len(added) == 1 and len(refused) == 1, outs
    assert "already exists" in refused[0]
    winner = int(added[0].split()[1])
    assert same_voice(VoiceLibrary(root).get("alice"), Voice.load(files[winner - 1]))
    assert entries(root) == ["alice.json", "alice.pt"]


def test_overwrite_races_are_serialised(lib):
    """With overwrite=True both concurrent adds succeed, one after the other: a complete entry."""
    barrier = threading.Barrier(2)
    errors = []

    def add(i):
        try:
            lib.add("alice", CLIP, FakeTTS(barrier=barrier, seed=100 * i), overwrite=True)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and entries(lib.root) == ["alice.json", "alice.pt"]
    lib.get("alice")


# --------------------------------------------------------------------------- the CLI's voices commands

def _cli(argv, capsys):
    from chatterbox_rt.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_lists_and_removes_broken_entries(lib, capsys):
    broken = _break_entries(lib)
    rc, out, err = _cli(["voices", "list", "--library", lib.root], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{len(broken) + 1} voice(s) in {lib.root}, {len(broken)} broken"
    assert lines[1].split() == ["NAME", "VARIANT", "DURATION", "CREATED"]
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert list(rows) == sorted(["alice", *broken])
    assert rows["alice"].split()[1] == "chatterbox"
    for name, match in broken.items():
        assert re.search(rf"^{name} +\(broken: .*{match}", rows[name]), rows[name]
    assert "voices remove NAME" in lines[-1]
    for name in broken:
        rc, out, err = _cli(["voices", "remove", name, "--library", lib.root], capsys)
        assert rc == 0 and f"removed voice {name!r}" in out, err
    rc, out, _ = _cli(["voices", "list", "--library", lib.root], capsys)
    assert out.splitlines()[0] == f"1 voice(s) in {lib.root}" and "broken" not in out


def test_cli_library_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "lib"
    f.write_text("")
    for argv in (["voices", "list"], ["voices", "remove", "x"],
                 ["voices", "add", "x", CLIP, "--dummy-weights", "--device", "cpu"]):
        rc, out, err = _cli(argv + ["--library", f], capsys)
        assert rc == 2 and err.startswith("chatterbox-rt: error:") and "is a file, not a directory" in err, err
        assert "no voices" not in out


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "11"])
def test_cli_add_refuses_a_bad_exaggeration_before_loading_a_model(tmp_path, capsys, monkeypatch, value):
    from chatterbox_rt import cli

    monkeypatch.setattr(cli, "_load_tts", lambda args: pytest.fail("the model was loaded"))
    rc, _, err = _cli(["voices", "add", "x", CLIP, "--library", tmp_path / "lib", "--dummy-weights",
                       f"--exaggeration={value}"], capsys)
    assert rc == 2 and "--exaggeration must be" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "lib" / "x.json").exists()
