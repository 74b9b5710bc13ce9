"""chatterbox_rt.voice: the exaggeration rule, voice files that are not voices, saving to places that
are not files, and the model-family rule (Voice.check_fits). No model runs here (test_tts.py runs
the same rules through TTS)."""
import math
import os
import stat

import numpy as np
import pytest
import torch

from chatterbox_rt.tts import dummy_voice
from chatterbox_rt.voice import (EXAGGERATION_MAX, EXAGGERATION_MIN, Voice, VoiceError, check_exaggeration,
                                 variant_family)

# --------------------------------------------------------------------------- exaggeration


@pytest.mark.parametrize("value,want", [
    (0, 0.0), (0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (2, 2.0), (10.0, 10.0),
    (np.float32(0.75), 0.75), (np.float64(1.5), 1.5), (np.int64(1), 1.0),
    (torch.tensor(0.3), 0.3), (torch.full((1, 1, 1), 0.7), 0.7),
])
def test_check_exaggeration_accepts_the_reference_range(value, want):
    got = check_exaggeration(value)
    assert type(got) is float and got == pytest.approx(want)
    assert (EXAGGERATION_MIN, EXAGGERATION_MAX) == (0.0, 10.0)


@pytest.mark.parametrize("value,match", [
    (float("nan"), "finite"), (float("inf"), "finite"), (-float("inf"), "finite"), (np.float32("nan"), "finite"),
    (torch.tensor(float("nan")), "finite"), (-0.01, "between 0 and 10"), (10.01, "between 0 and 10"),
    (1e9, "between 0 and 10"), (True, "a number, got bool"), (np.bool_(True), "a number"), ("0.5", "a number"),
    (None, "a number"), (torch.tensor([0.1, 0.2]), "one real number"), (torch.tensor(True), "one real number"),
])
def test_check_exaggeration_refuses(value, match):
    with pytest.raises(VoiceError, match=match) as e:
        check_exaggeration(value, "--exaggeration")
    assert isinstance(e.value, ValueError) and str(e.value).startswith("--exaggeration must be")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 50.0, True])
def test_with_exaggeration_uses_the_rule(bad):
    v = dummy_voice(150)
    with pytest.raises(VoiceError, match="exaggeration must be"):
        v.with_exaggeration(bad)
    assert v.with_exaggeration(2.0).exaggeration == 2.0 and v.with_exaggeration(0).exaggeration == 0.0


@pytest.mark.parametrize("stored", [float("nan"), float("inf"), -3.0, 1e6])
def test_a_stored_bad_exaggeration_is_a_corrupt_voice(tmp_path, stored):
    data = dummy_voice(150).to_dict()
    data["t3"]["emotion_adv"] = torch.full((1, 1, 1), stored)
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(VoiceError, match=r"bad.pt is not a usable voice: emotion_adv \(the exaggeration\) must be"):
        Voice.load(path)
    data["t3"]["emotion_adv"] = stored  # a plain float, as T3Cond's default is
    with pytest.raises(VoiceError, match="emotion_adv"):
        Voice.from_dict(data)


def test_a_voice_without_emotion_value_still_loads(tmp_path):
    """The GPT-2 models do not read emotion_adv; a conds.pt with None there stays loadable."""
    data = dummy_voice(375).to_dict()
    data["t3"]["emotion_adv"] = None
    v = Voice.from_dict(data)
    assert v.exaggeration is None and v.with_exaggeration(0.5).exaggeration == 0.5
    assert Voice.load(v.save(tmp_path / "none.pt")).t3.emotion_adv is None


# --------------------------------------------------------------------------- files


def test_loading_a_text_file_says_so(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not a voice\n")
    with pytest.raises(VoiceError) as e:
        Voice.load(path)
    msg = str(e.value)
    assert str(path) in msg and "it is a text file, not a voice" in msg and "conds.pt" in msg
    assert "pop from empty list" not in msg


@pytest.mark.parametrize("content,kind", [(b"", "an empty file"), (b"\x00\x01\x02garbage" * 10, "not a PyTorch file"),
                                          ("naïve text ".encode() * 60, "a text file")])
def test_loading_other_non_voice_files(tmp_path, content, kind):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(VoiceError, match=f"cannot read voice file .*x.pt: it is {kind}, not a voice"):
        Voice.load(path)


def test_loading_a_truncated_voice(tmp_path):
    path = dummy_voice(150).save(tmp_path / "v.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VoiceError, match=r"cannot read voice file .*v.pt: .*\(truncated or corrupt\?\)"):
        Voice.load(path)


def test_loading_a_directory(tmp_path):
    with pytest.raises(VoiceError, match=f"cannot read voice file {tmp_path}: it is a directory"):
        Voice.load(tmp_path)


def test_saving_to_a_directory(tmp_path):
    with pytest.raises(VoiceError, match=f"cannot save the voice to {tmp_path}: it is a directory; give a file "
                                         f"name such as {tmp_path / 'voice.pt'}"):
        dummy_voice(150).save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_saving_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(VoiceError, match="cannot save the voice to .*afile/v.pt: .*afile is not a directory"):
        dummy_voice(150).save(tmp_path / "afile" / "v.pt")
    with pytest.raises(VoiceError, match="is not a directory"):
        dummy_voice(150).save(tmp_path / "afile" / "deeper" / "v.pt")


def test_save_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = dummy_voice(150).save(tmp_path / "v.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["v.pt"]


# --------------------------------------------------------------------------- model families


def test_variant_family():
    assert [variant_family(v) for v in ("chatterbox", "multilingual", "multilingual-v3", "turbo", "nano")] == \
        ["llama", "llama", "llama", "gpt2", "gpt2"]
    with pytest.raises(ValueError, match="unknown variant"):
        variant_family("gpt5")


def test_prepared_for_is_kept_in_memory_only(tmp_path):
    v = Voice(dummy_voice(150).t3, dummy_voice(150).gen, prepared_for="multilingual")
    assert v.family == "llama"
    assert v.to("cpu").prepared_for == "multilingual" and v.with_exaggeration(1.5).prepared_for == "multilingual"
    path = v.save(tmp_path / "v.pt")
    assert set(torch.load(path, weights_only=True)) == {"t3", "gen"}  # the reference's layout, nothing added
    assert Voice.load(path).prepared_for is None
    with pytest.raises(VoiceError, match="prepared_for 'gpt5' is not a variant"):
        Voice(v.t3, v.gen, prepared_for="gpt5").validate()


def test_check_fits_with_a_recorded_family():
    nano = Voice(dummy_voice(229).t3, dummy_voice(229).gen, prepared_for="nano")
    with pytest.raises(VoiceError) as e:
        nano.check_fits("chatterbox", name="bob")
    msg = str(e.value)
    assert msg.startswith("voice 'bob' was prepared for nano (a GPT-2-family voice: 229 prompt tokens from the first "
                          "15 s of its clip), but the chatterbox model needs a Llama-family voice (up to 150 prompt "
                          "tokens from the first 6 s")
    assert "tts.prepare_conditionals(clip)" in msg and "voices add NAME CLIP --variant chatterbox" in msg
    assert nano.check_fits("turbo") is nano
    english = Voice(dummy_voice(150).t3, dummy_voice(150).gen, prepared_for="chatterbox")
    with pytest.raises(VoiceError, match=r"this voice was prepared for chatterbox \(a Llama-family voice: 150 "
                                         r"prompt tokens.*the nano model needs a GPT-2-family voice \(up to 375 .*"
                                         r"15 s of the clip, loudness-normalised\).*--variant nano"):
        english.check_fits("nano")
    assert english.check_fits("multilingual-v2") is english


def test_check_fits_infers_the_family_only_when_conclusive():
    long = dummy_voice(229)  # a plain conds.pt: no record, but more than 150 tokens is GPT-2-family
    assert long.prepared_for is None and long.family == "gpt2"
    with pytest.raises(VoiceError, match=r"this voice has 229 prompt tokens, more than the 150 a Llama-family voice "
                                         r"can have, so it was prepared for a GPT-2-family model \(turbo or nano\)"):
        long.check_fits("multilingual")
    long.check_fits("nano")
    for n in (150, 100, 1):  # a Llama voice, or a GPT-2 one from a short clip: cannot tell, so accepted
        v = dummy_voice(n)
        assert v.family is None and v.check_fits("chatterbox") is v and v.check_fits("turbo") is v
    assert math.isclose(long.exaggeration, 0.5)
