"""The public TTS API on dummy weights (T3 reduced to 2 layers; S3Gen, the voice encoder and the
watermark at full size): reproducibility, stage composition, voices, and bad input."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import chatterbox_rt
from chatterbox_rt import AudioError, CheckpointError, TTS, Voice, VoiceError
from chatterbox_rt.models.t3 import T3Config

DATA = Path(__file__).parent.parent / "data"
SHORT = dict(max_new_tokens=6)


def small_tts(variant: str, seed: int = 0) -> TTS:
    backbone = dataclasses.replace(T3Config.for_variant(variant).backbone, num_layers=2)
    return TTS.from_dummy(variant, seed=seed, device="cpu", backbone=backbone)


@pytest.fixture(scope="module")
def nano():
    return small_tts("nano")


@pytest.fixture(scope="module")
def english():
    return small_tts("chatterbox")


def test_public_names_and_sample_rate(nano):
    assert chatterbox_rt.TTS is TTS and nano.sr == 24000
    assert {"TTS", "VC", "Voice"} <= set(dir(chatterbox_rt))


def test_generate_is_reproducible_with_a_seed(nano):
    a = nano.generate("Hello.", seed=3, watermark=False, **SHORT)
    b = nano.generate("Hello.", seed=3, watermark=False, **SHORT)
    c = nano.generate("Hello.", seed=4, watermark=False, **SHORT)
    assert a.shape[0] == 1 and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_equals_its_stages(nano):
    """generate = t3_tokens -> (+3 silence tokens for Turbo/Nano) -> s3gen_mel -> s3gen_wav, all
    drawing from one generator."""
    wav = nano.generate("Hi there.", seed=9, watermark=False, **SHORT)
    g = torch.Generator().manual_seed(9)
    tokens = nano.t3_tokens("Hi there.", generator=g, **SHORT)
    assert tokens.dtype == torch.long and int(tokens.max()) < 6561
    tokens = torch.cat([tokens, torch.full((3,), 4299)])
    mel = nano.s3gen_mel(tokens, generator=g)
    assert mel.shape == (1, 80, 2 * tokens.numel())
    assert torch.equal(nano.s3gen_wav(mel, generator=g), wav)


def test_s3gen_mel_takes_full_length_noise(nano):
    tokens = torch.arange(10) * 7
    L = 2 * (nano.builtin_voice.gen["prompt_token"].shape[1] + 10)
    noise = torch.randn(1, 80, L, generator=torch.Generator().manual_seed(0))
    a = nano.s3gen_mel(tokens, noise=noise)
    assert torch.equal(a, nano.s3gen_mel(tokens[None], noise=noise))
    with pytest.raises(ValueError, match=r"noise must be \[1, 80, >= "):
        nano.s3gen_mel(tokens, noise=noise[..., : L - 1])
    with pytest.raises(ValueError, match="speech tokens must be in"):
        nano.s3gen_mel(torch.tensor([1, 2, 6561]))
    with pytest.raises(ValueError, match="no speech tokens"):
        nano.s3gen_mel(torch.tensor([], dtype=torch.long))
    wav_quiet = nano.s3gen_wav(a, noise_free=True)
    assert wav_quiet.shape == (1, 480 * a.shape[-1])
    assert torch.equal(wav_quiet, nano.s3gen_wav(a, noise_free=True))


def test_watermark_is_on_by_default(nano):
    from chatterbox_rt.watermark import get_watermarker

    marked = nano.generate("Hello there.", seed=1, **SHORT)
    clean = nano.generate("Hello there.", seed=1, watermark=False, **SHORT)
    assert marked.shape[-1] <= clean.shape[-1] and not torch.equal(marked[..., :100], clean[..., :100])
    wm = get_watermarker()
    assert wm.detect(marked[0], 24000) > 0.8 > wm.detect(clean[0], 24000)


@pytest.mark.parametrize("text,error,match", [
    ("", ValueError, "empty"),
    ("   \n\t", ValueError, "empty"),
    (None, TypeError, "str"),
    (b"bytes", TypeError, "str"),
])
def test_bad_text(nano, text, error, match):
    with pytest.raises(error, match=match):
        nano.generate(text, watermark=False, **SHORT)


def test_text_over_the_limit(english):
    with pytest.raises(ValueError, match="too long: .* at most 2050"):
        english.t3_tokens("word " * 600, **SHORT)


def test_bad_sampling_arguments(nano):
    with pytest.raises(TypeError, match="unknown sampling argument"):
        nano.generate("Hi.", temprature=0.5, **SHORT)
    with pytest.raises(ValueError, match="temperature"):
        nano.generate("Hi.", temperature=0.0, **SHORT)


def test_multilingual_needs_a_valid_language():
    tts = small_tts("multilingual")  # 2 layers: no alignment heads, so only the text path is run
    with pytest.raises(ValueError, match="needs language_id"):
        tts.t3_tokens("Bonjour.", **SHORT)
    with pytest.raises(ValueError, match="Unsupported language_id 'xx'"):
        tts.t3_tokens("Bonjour.", language_id="xx", **SHORT)
    ids = tts.text_tokens("Bonjour.", language_id="FR")  # case-insensitive, as the reference
    assert ids[0] == 255 and ids[-1] == 0


def test_no_voice_without_builtin(nano):
    bare = TTS(nano.variant, nano.t3, nano.s3gen, nano.ve, nano.frontend, None)
    with pytest.raises(ValueError, match="no built-in voice"):
        bare.generate("Hi.", **SHORT)
    with pytest.raises(TypeError, match="prepare_conditionals"):
        bare.generate("Hi.", voice="clip.wav", **SHORT)


def test_prepare_conditionals_from_files_and_arrays(english, tmp_path):
    voice = english.prepare_conditionals(DATA / "speech_en_3s.wav", exaggeration=0.3)
    assert voice.exaggeration == pytest.approx(0.3)
    assert voice.t3.speaker_emb.shape == (1, 256) and voice.t3.cond_prompt_speech_tokens.shape == (1, 80)
    assert voice.gen["prompt_feat"].shape[0] == 1 and voice.gen["embedding"].shape == (1, 192)
    # the same clip as an array at another rate, and as stereo: same voice within resampling error
    import soundfile as sf

    wav, sr = sf.read(DATA / "speech_en_3s.wav", dtype="float32")
    same = english.prepare_conditionals(wav, sr=sr, exaggeration=0.3)
    assert torch.equal(same.t3.cond_prompt_speech_tokens, voice.t3.cond_prompt_speech_tokens)
    stereo = english.prepare_conditionals(np.stack([wav, wav]), sr=sr, exaggeration=0.3)
    torch.testing.assert_close(stereo.t3.speaker_emb, voice.t3.speaker_emb)
    # saved in the reference's conds.pt layout, loaded back
    path = voice.save(tmp_path / "v.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"t3", "gen"} and raw["t3"]["emotion_adv"].shape == (1, 1, 1)
    back = Voice.load(path)
    assert torch.equal(back.t3.cond_prompt_speech_tokens, voice.t3.cond_prompt_speech_tokens)
    english.generate("Hi.", back, watermark=False, **SHORT)


def test_bad_reference_clips(english, nano, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    cases = [
        (tmp_path / "missing.wav", None, "not found"),
        (not_audio, None, "notes.wav"),
        (np.zeros(48000, np.float32), 24000, "silent"),
        (np.full(48000, np.nan, np.float32), 24000, "NaN"),
        (np.ones(48000, np.float32) * np.inf, 24000, "inf"),
        (np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1, 16000, "at least 1 s"),
        (np.ones(48000, np.float32), None, "sr"),
    ]
    for clip, sr, match in cases:
        with pytest.raises(AudioError, match=match):
            english.prepare_conditionals(clip, sr=sr)
    with pytest.raises(AudioError, match="5"):  # Turbo/Nano need more than 5 s, as the reference asserts
        nano.prepare_conditionals(DATA / "speech_en_3s.wav")


def test_bad_voice_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(VoiceError, match="cannot read"):
        Voice.load(garbage)
    partial = tmp_path / "partial.pt"
    torch.save({"t3": {"speaker_emb": torch.zeros(1, 256)}, "gen": {}}, partial)
    with pytest.raises(VoiceError, match="prompt_token is missing"):
        Voice.load(partial)
    with pytest.raises(VoiceError, match="not found"):
        Voice.load(tmp_path / "none.pt")


def test_checkpoint_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        TTS.from_local(tmp_path / "nowhere")
    (tmp_path / "t3_cfg.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="s3gen.safetensors"):
        TTS.from_local(tmp_path, device="cpu")


@pytest.mark.slow  # bf16 end to end also runs in test_precision.py::test_every_mode_runs_end_to_end
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_reduced_precision_runs_end_to_end(dtype):
    """T3, the flow and HiFT in bf16 (HiFT's 16-point STFTs stay fp32: there is no half-precision
    FFT on CPU); a batch of two padded requests through HiFT too."""
    tts = small_tts("nano")
    tts16 = TTS.from_dummy("nano", seed=0, device="cpu", dtype=dtype, backbone=tts.t3.config.backbone)
    wav = tts16.generate("Hello.", seed=0, watermark=False, **SHORT)
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all() and wav.abs().max() > 0
    mel = torch.randn(2, 80, 12, dtype=dtype) - 5
    out = tts16.s3gen.hift(mel, torch.tensor([12, 7]), noise_free=True)
    assert torch.isfinite(out).all() and out[1, 7 * 480:].abs().max() == 0


def test_public_modules_import_no_heavy_or_reference_packages():
    """librosa, torchaudio, transformers, scipy (pyloudnorm's, imported only for Turbo voices) and
    perth stay out of the runtime path; each module is imported first in a fresh interpreter, so
    an import cycle between the front ends shows up too."""
    import subprocess
    import sys

    banned = ("librosa", "scipy", "torchaudio", "transformers", "perth", "chatterbox")
    for module in ("chatterbox_rt.models.voice_encoder", "chatterbox_rt.models.s3tokenizer",
                   "chatterbox_rt.models.s3gen", "chatterbox_rt.tts", "chatterbox_rt.vc", "chatterbox_rt.compat",
                   "chatterbox_rt.voices", "chatterbox_rt.cli", "chatterbox_rt.watermark", "chatterbox_rt.audio"):
        code = f"import sys, {module}; print(sorted(m for m in {banned!r} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, f"import {module} failed:\n{out.stderr[-2000:]}"
        assert out.stdout.strip() == "[]", f"{module} imported {out.stdout.strip()}"


# --------------------------------------------------------------------------- prepare_conditionals / _voice

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 11.0, True])
def test_prepare_conditionals_refuses_a_bad_exaggeration_first(english, tmp_path, bad):
    """Checked before the clip is read (the path does not exist: the error is about the value)."""
    with pytest.raises(VoiceError, match="exaggeration must be"):
        english.prepare_conditionals(tmp_path / "missing.wav", exaggeration=bad)
    with pytest.raises(VoiceError, match="exaggeration must be"):
        english.generate("Hi.", exaggeration=bad, watermark=False, **SHORT)


def test_voices_of_the_other_family_are_refused(english, nano, tmp_path):
    """The API refuses what the CLI refuses (issue 17 item 8), saying the voice's real prompt length
    and what to do; a voice whose family cannot be told (a plain conds.pt of at most 150 tokens) is
    accepted, and one of more than 150 tokens is a GPT-2-family voice."""
    clip = DATA / "speech_en_6s.wav"  # Nano needs more than 5 s
    en_voice = english.prepare_conditionals(clip)
    nano_voice = nano.prepare_conditionals(clip)
    assert (en_voice.prepared_for, nano_voice.prepared_for) == ("chatterbox", "nano")
    n_en, n_nano = en_voice.prompt_tokens, nano_voice.prompt_tokens
    with pytest.raises(VoiceError, match=rf"prepared for chatterbox \(a Llama-family voice: {n_en} prompt tokens.*"
                                         r"nano model needs a GPT-2-family voice.*--variant nano"):
        nano.generate("Hi.", en_voice, watermark=False, **SHORT)
    with pytest.raises(VoiceError, match=rf"prepared for nano \(a GPT-2-family voice: {n_nano} prompt tokens.*"
                                         r"chatterbox model needs a Llama-family voice.*--variant chatterbox"):
        english.t3_tokens("Hi.", nano_voice, **SHORT)
    # The same voices from plain files (no record): the English one (at most 150 tokens) could be
    # either family, so it is accepted; the Nano one has more than 150, so it is known to be GPT-2's.
    plain_en = Voice.load(en_voice.save(tmp_path / "en.pt"))
    plain_nano = Voice.load(nano_voice.save(tmp_path / "nano.pt"))
    assert plain_en.prepared_for is None and plain_en.prompt_tokens == 150 and n_nano > 150
    assert nano.t3_tokens("Hi.", plain_en, **SHORT).dim() == 1
    with pytest.raises(VoiceError, match=f"has {n_nano} prompt tokens, more than the 150 a Llama-family voice can "
                                         "have, so it was prepared for a GPT-2-family model"):
        english.t3_tokens("Hi.", plain_nano, **SHORT)
    assert english.t3_tokens("Hi.", plain_en, **SHORT).dim() == 1
