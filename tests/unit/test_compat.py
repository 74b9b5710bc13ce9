"""chatterbox_rt.compat: the reference README's examples, unchanged except for the import, the
loader (``from_local`` on a dummy checkpoint directory instead of ``from_pretrained``), short
texts and a soundfile write instead of ``ta.save``; plus the reference's error behaviour, its
signatures, and ``conds.pt`` files interchangeable with the reference's ``Conditionals``.

The checkpoints are ``tests/_dummy_ckpt.py``'s: reduced T3 (loaded through the same reduced
``T3Config.for_variant``), full-size S3Gen and voice encoder, a short built-in voice. Generation
is capped with compat's testing knobs (``MAX_NEW_TOKENS``, ``N_STEPS``): random weights rarely
emit EOS, and the flow runs over the voice prompt on every call.
"""
import inspect
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch

from chatterbox_rt import compat
from chatterbox_rt.checkpoint import CheckpointError
from chatterbox_rt.compat import (SUPPORTED_LANGUAGES, ChatterboxMultilingualTTS, ChatterboxTTS, ChatterboxTurboTTS,
                                  ChatterboxVC, Conditionals, MissingConditionalsError)
from chatterbox_rt.models.t3.config import T3Config
from chatterbox_rt.text import MissingDependencyError
from chatterbox_rt.tts import dummy_voice

from _dummy_ckpt import reduced_for_variant, write_checkpoint, write_t3

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPT_6S = str(DATA / "speech_en_6s.wav")
SOURCE_3S = str(DATA / "speech_en_3s.wav")
TEST_MAX_NEW_TOKENS = 10
TEST_N_STEPS = 1


@pytest.fixture(scope="module", autouse=True)
def small_and_short(one_thread):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T3Config, "for_variant", staticmethod(reduced_for_variant))
        mp.setattr(compat, "MAX_NEW_TOKENS", TEST_MAX_NEW_TOKENS)
        mp.setattr(compat, "N_STEPS", TEST_N_STEPS)
        yield


def _checkpoint_fixture(variant):
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        d = write_checkpoint(tmp_path_factory.mktemp(variant), variant)
        yield d
        shutil.rmtree(d, ignore_errors=True)  # ~1.2 GB each; pytest would keep three runs of them
    return fixture


english_dir = _checkpoint_fixture("chatterbox")
multilingual_dir = _checkpoint_fixture("multilingual")
turbo_dir = _checkpoint_fixture("turbo")


def check_wav(wav, path, sr):
    """A README ``ta.save(path, wav, model.sr)``, with soundfile."""
    assert isinstance(wav, torch.Tensor) and wav.dim() == 2 and wav.shape[0] == 1 and wav.shape[1] > 0
    assert wav.dtype == torch.float32 and wav.device.type == "cpu" and torch.isfinite(wav).all()
    sf.write(str(path), wav.squeeze(0).numpy(), sr)
    assert sf.info(str(path)).frames == wav.shape[1]


# ---------------------------------------------------------------------------------------- README


def test_readme_english(english_dir, tmp_path):
    model = ChatterboxTTS.from_local(english_dir, device="cpu")
    assert model.sr == 24000 and model.device == "cpu" and isinstance(model.conds, Conditionals)

    text = "Ezreal and Jinx teamed up."
    wav = model.generate(text)
    check_wav(wav, tmp_path / "test-english.wav", model.sr)

    # generate's exaggeration replaces the voice's, in self.conds, as in the reference
    model.generate(text, exaggeration=0.8)
    assert model.conds.exaggeration == pytest.approx(0.8)

    # If you want to synthesize with a different voice, specify the audio prompt
    AUDIO_PROMPT_PATH = PROMPT_6S
    wav = model.generate(text, audio_prompt_path=AUDIO_PROMPT_PATH)
    check_wav(wav, tmp_path / "test-2.wav", model.sr)
    assert model.conds.exaggeration == pytest.approx(0.5)
    assert model.conds.t3.cond_prompt_speech_tokens.shape == (1, model.t3.config.speech_cond_prompt_len)

    model.conds = None
    with pytest.raises(MissingConditionalsError, match="prepare_conditionals"):
        model.generate(text)
    with pytest.raises(AssertionError):  # what the reference raises, for old handlers
        model.generate(text)


def test_readme_multilingual(multilingual_dir, tmp_path):
    multilingual_model = ChatterboxMultilingualTTS.from_local(multilingual_dir, device="cpu")
    assert multilingual_model.get_supported_languages() == SUPPORTED_LANGUAGES

    french_text = "Bonjour, comment ça va?"
    wav_french = multilingual_model.generate(french_text, language_id="fr")
    check_wav(wav_french, tmp_path / "test-french.wav", multilingual_model.sr)

    chinese_text = "你好，今天天气真不错。"
    try:
        import spacy_pkuseg  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="spacy-pkuseg"):
            multilingual_model.generate(chinese_text, language_id="zh")
    else:
        wav_chinese = multilingual_model.generate(chinese_text, language_id="zh")
        check_wav(wav_chinese, tmp_path / "test-chinese.wav", multilingual_model.sr)

    # language_id is checked first, with the reference's message, even with no voice
    multilingual_model.conds = None
    supported = ", ".join(SUPPORTED_LANGUAGES)
    with pytest.raises(ValueError) as e:
        multilingual_model.generate("Hallo.", language_id="xx")
    assert str(e.value) == f"Unsupported language_id 'xx'. Supported languages: {supported}"
    with pytest.raises(MissingConditionalsError):
        multilingual_model.generate("Hallo.", language_id="DE")


def _sampling_spy(monkeypatch):
    """Record the SamplingParams each T3.generate call resolves (defaults included)."""
    from chatterbox_rt.models.t3 import T3

    seen = []
    real = T3.sampling_params

    def spy(self, **given):
        p = real(self, **given)
        seen.append(p)
        return p

    monkeypatch.setattr(T3, "sampling_params", spy)
    return seen


def test_multilingual_v3_and_language_pack(multilingual_dir, monkeypatch):
    """Upstream's ``t3_model=`` (5de7a54): V2 by default with 0.1.7's behaviour, "v3" and any other
    .safetensors file with upstream's (no alignment control, repetition penalty 1.2)."""
    write_t3(multilingual_dir, "multilingual-v3", seed=3)
    write_t3(multilingual_dir, "multilingual-v3", seed=4, name="t3_es_mx_latam.safetensors")
    seen = _sampling_spy(monkeypatch)
    expect = {None: ("0.1.7", 2.0), "v2": ("0.1.7", 2.0), "v3": ("upstream", 1.2),
              "t3_mtl23ls_v3": ("upstream", 1.2), "t3_es_mx_latam.safetensors": ("upstream", 1.2)}
    for t3_model, (behaviour, penalty) in expect.items():
        model = ChatterboxMultilingualTTS.from_local(multilingual_dir, "cpu", t3_model=t3_model)
        cfg = model.t3.config
        assert (cfg.behaviour, cfg.sampling.repetition_penalty) == (behaviour, penalty), t3_model
        assert bool(cfg.alignment_heads) == (behaviour == "0.1.7") and cfg.drop_last_token_audio == (behaviour != "0.1.7")
        model.generate("Hola.", language_id="es")
        assert seen[-1].repetition_penalty == penalty, t3_model
        model.generate("Hola.", language_id="es", repetition_penalty=1.7)
        assert seen[-1].repetition_penalty == 1.7
    # upstream's V2 behaviour is one option away
    model = ChatterboxMultilingualTTS.from_local(multilingual_dir, "cpu", t3_model="v2", behaviour="upstream")
    assert model.t3.config.behaviour == "upstream" and not model.t3.config.alignment_heads
    # weights differ per file
    v2 = ChatterboxMultilingualTTS.from_local(multilingual_dir, "cpu").t3.speech_head.weight
    pack = ChatterboxMultilingualTTS.from_local(multilingual_dir, "cpu",
                                                t3_model="t3_es_mx_latam.safetensors").t3.speech_head.weight
    assert not torch.equal(v2, pack)
    with pytest.raises(ValueError, match=r"Unknown multilingual T3 model 'v4'\. Expected one of"):
        ChatterboxMultilingualTTS.from_local(multilingual_dir, "cpu", t3_model="v4")
    with pytest.raises(CheckpointError, match="t3_missing.safetensors"):
        ChatterboxMultilingualTTS.from_local(multilingual_dir, "cpu", t3_model="t3_missing.safetensors")


def test_from_pretrained_loads_from_a_populated_cache(english_dir, tmp_path, monkeypatch):
    """The English checkpoint downloaded from a stand-in Hub by a user's process (no
    HF_HUB_OFFLINE there), then loaded here offline from that cache: a real from_pretrained."""
    import json
    import os
    import subprocess
    import sys

    from _fake_hub import FakeHub

    pytest.importorskip("huggingface_hub")
    home = tmp_path / "hf-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with FakeHub({compat.REPO_ID: english_dir}) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home))
        code = ("import json; from chatterbox_rt import compat; "
                "print(json.dumps(str(compat.hub_snapshot(compat.REPO_ID, files=compat.ENGLISH_FILES))))")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    snapshot = Path(json.loads(r.stdout.strip().splitlines()[-1]))
    assert snapshot.is_relative_to(home) and sorted(p.name for p in snapshot.iterdir()) == sorted(compat.ENGLISH_FILES)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ChatterboxTTS.from_pretrained("cpu")
    assert model.t3.config.variant == "chatterbox" and model.conds is not None
    ref_sd = ChatterboxTTS.from_local(english_dir, "cpu").t3.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.t3.state_dict().items())
    shutil.rmtree(home, ignore_errors=True)  # 1.2 GB


def test_readme_turbo(turbo_dir, tmp_path, caplog):
    model = ChatterboxTurboTTS.from_local(turbo_dir, device="cpu")
    assert model.t3.config.variant == "turbo"

    # Generate with Paralinguistic Tags
    text = "Hi there [chuckle], got a minute?"
    # Generate audio (requires a reference clip for voice cloning)
    wav = model.generate(text, audio_prompt_path=PROMPT_6S)
    check_wav(wav, tmp_path / "test-turbo.wav", model.sr)
    assert 125 < model.conds.t3.cond_prompt_speech_tokens.shape[1] <= 375  # the whole 6.8 s clip, 25 tokens/s

    with caplog.at_level("WARNING", logger="chatterbox_rt"):
        model.generate(text, cfg_weight=0.5)
    assert compat.TURBO_IGNORED_MESSAGE in caplog.text


def test_nano(turbo_dir, tmp_path):
    # Nano's repository is Turbo's layout with another T3 file.
    write_t3(turbo_dir, "nano")
    model = ChatterboxTurboTTS.from_local(turbo_dir, device="cpu", nano=True)
    assert model.t3.config.variant == "nano"
    check_wav(model.generate("Hello there."), tmp_path / "test-nano.wav", model.sr)

    only_nano = tmp_path / "nano"
    only_nano.mkdir()
    (only_nano / "t3_nano_v1.safetensors").touch()
    with pytest.raises(CheckpointError, match="nano=True"):
        ChatterboxTurboTTS.from_local(only_nano, device="cpu")


def test_readme_vc(english_dir, tmp_path):
    model = ChatterboxVC.from_local(english_dir, device="cpu")
    assert model.ref_dict is not None  # the built-in voice
    AUDIO_PATH, TARGET_VOICE_PATH = SOURCE_3S, PROMPT_6S
    wav = model.generate(audio=AUDIO_PATH, target_voice_path=TARGET_VOICE_PATH)
    check_wav(wav, tmp_path / "testvc.wav", model.sr)
    assert model.ref_dict["prompt_feat"].shape[1] > 2 * 25 * 5  # set_target_voice stored the 6 s target

    model.ref_dict = None
    with pytest.raises(MissingConditionalsError, match="target_voice_path"):
        model.generate(AUDIO_PATH)


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("load", [ChatterboxTTS.from_pretrained, ChatterboxMultilingualTTS.from_pretrained,
                                  ChatterboxTurboTTS.from_pretrained,
                                  lambda device: ChatterboxTurboTTS.from_pretrained(device, nano=True),
                                  ChatterboxVC.from_pretrained],
                         ids=["english", "multilingual", "turbo", "nano", "vc"])
def test_from_pretrained_offline_without_cache(load, monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(CheckpointError) as e:
        load(device="cpu")
    msg = str(e.value)
    assert "ResembleAI/chatterbox" in msg and "HF_HUB_OFFLINE" in msg and "from_local" in msg
    assert str(tmp_path) in msg


def test_map_device():
    if not torch.backends.mps.is_available():
        assert compat.map_device("mps") == "cpu"
    assert compat.map_device("cpu") == "cpu"


# ---------------------------------------------------------------------------------------- reference


def test_signatures_match_reference(ref):
    """The reference's parameters come first, in order, with the same defaults."""
    import chatterbox.tts_turbo as ref_turbo

    pairs = [(ChatterboxTTS, ref.tts.ChatterboxTTS), (ChatterboxMultilingualTTS, ref.mtl_tts.ChatterboxMultilingualTTS),
             (ChatterboxTurboTTS, ref_turbo.ChatterboxTurboTTS), (ChatterboxVC, ref.vc.ChatterboxVC)]
    try:  # upstream HEAD (5de7a54) adds t3_model= to the multilingual loaders, nano= to Turbo's
        import chatterbox_head.mtl_tts
        import chatterbox_head.tts_turbo
    except ImportError:
        chatterbox_head = None
    if chatterbox_head is not None:
        pairs += [(ChatterboxMultilingualTTS, chatterbox_head.mtl_tts.ChatterboxMultilingualTTS),
                  (ChatterboxTurboTTS, chatterbox_head.tts_turbo.ChatterboxTurboTTS)]
    # Deliberate: the multilingual default repetition penalty follows the loaded file (2.0 for V2 as
    # 0.1.7, 1.2 for V3/the pack as upstream), so the signature's default is None.
    deviations = {(ChatterboxMultilingualTTS, "generate", "repetition_penalty"): None}
    for ours, theirs in pairs:
        for name in ("__init__", "from_local", "from_pretrained", "generate", "prepare_conditionals",
                     "set_target_voice", "get_supported_languages", "norm_loudness"):
            if not hasattr(theirs, name):
                continue
            want = list(inspect.signature(getattr(theirs, name)).parameters.values())
            got = list(inspect.signature(getattr(ours, name)).parameters.values())[:len(want)]
            want = [(p.name, deviations.get((ours, name, p.name), p.default)) for p in want]
            assert [(p.name, p.default) for p in got] == want, (ours, theirs, name)
        assert ours.ENC_COND_LEN == theirs.ENC_COND_LEN and ours.DEC_COND_LEN == theirs.DEC_COND_LEN


def test_language_message_matches_reference(ref):
    with pytest.raises(ValueError) as theirs:  # validated before the reference touches self
        ref.mtl_tts.ChatterboxMultilingualTTS.generate(object(), "Hallo.", "xx")
    with pytest.raises(ValueError) as ours:
        ChatterboxMultilingualTTS.generate(object(), "Hallo.", "xx")
    assert str(ours.value) == str(theirs.value)
    assert SUPPORTED_LANGUAGES == ref.mtl_tts.SUPPORTED_LANGUAGES


def test_conditionals_files_interchange_with_reference(ref, tmp_path):
    ours = Conditionals.wrap(dummy_voice(150, seed=5))
    ours.save(tmp_path / "ours.pt")
    theirs = ref.tts.Conditionals.load(tmp_path / "ours.pt", map_location="cpu")
    theirs.save(tmp_path / "theirs.pt")
    back = Conditionals.load(tmp_path / "theirs.pt", map_location="cpu")
    wrapped = Conditionals.wrap(theirs)  # a reference object assigned to model.conds
    for c in (back, wrapped):
        assert isinstance(c, Conditionals)
        for k in ("speaker_emb", "cond_prompt_speech_tokens", "emotion_adv"):
            assert torch.equal(getattr(c.t3, k), getattr(ours.t3, k)), k
        for k, v in ours.gen.items():
            assert (c.gen[k] is None and v is None) or torch.equal(c.gen[k], v), k
    assert back.to("cpu") is back  # in place, as the reference's
