"""End to end against the reference: ``ChatterboxTTS`` (voice preparation, then text -> watermarked
waveform), Turbo's voice preparation (loudness normalisation, 15 s / 375-token prompt) and
``ChatterboxVC``, on espeak-ng speech clips.

Both sides hold the same random weights: T3 with a reduced backbone (2 layers; everything else
real), S3Gen, the voice encoder and the watermark network at full size. A character-level
tokenizer file (``dummy_text_frontend``) is read by the reference's ``EnTokenizer`` and by ours.
Decoding is greedy (temperature 1e-5: the reference's multinomial then draws the argmax); the
reference's S3Gen random draws are patched to zeros and ours run noise-free with zero CFM noise.
The reference's generate hard-codes ``max_new_tokens=1000``; random weights rarely emit EOS, so
its T3 call is wrapped to stop after ``N_TOKENS`` (the only change to its pipeline).
"""
import numpy as np
import pytest
import torch

from _s3gen_pairs import DATA, assert_close_rel, build_s3gen_pair, zero_noise
from _t3_pairs import build_pair
from chatterbox_rt.checkpoint import load_into
from chatterbox_rt.models.voice_encoder import VoiceEncoder
from chatterbox_rt.text import EnglishTokenizer, TextFrontEnd, dummy_text_frontend
from chatterbox_rt.tts import TTS
from chatterbox_rt.vc import VC

pytestmark = pytest.mark.parity
N_TOKENS = 24
TEXT = "Hello there, this is a test."
GREEDY = dict(temperature=1e-5)


@pytest.fixture(scope="module")
def s3gen_pair(ref):
    return build_s3gen_pair(ref, meanflow=False, seed=5)


@pytest.fixture(scope="module")
def ve_pair(ref):
    from chatterbox.models.voice_encoder import VoiceEncoder as RefVE

    torch.manual_seed(7)
    ref_ve = RefVE().eval()
    return ref_ve, load_into(VoiceEncoder(), ref_ve.state_dict(), "reference VE").eval()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    dummy_text_frontend("chatterbox").tokenizer.tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def tts_pair(ref, s3gen_pair, ve_pair, tokenizer_file):
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.tts import ChatterboxTTS

    ref_t3, our_t3 = build_pair(ref, "chatterbox", reduced=True, seed=2)
    ref_tts = ChatterboxTTS(ref_t3, s3gen_pair[0], ve_pair[0], EnTokenizer(str(tokenizer_file)), "cpu")
    ours = TTS("chatterbox", our_t3, s3gen_pair[1], ve_pair[1],
               TextFrontEnd("chatterbox", EnglishTokenizer(tokenizer_file)))
    return ref_tts, ours


def assert_voice_equal(ref_conds, voice):
    assert torch.equal(voice.t3.cond_prompt_speech_tokens.cpu(), ref_conds.t3.cond_prompt_speech_tokens.long().cpu())
    torch.testing.assert_close(voice.t3.speaker_emb, ref_conds.t3.speaker_emb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(voice.t3.emotion_adv, ref_conds.t3.emotion_adv.float())
    g, rg = voice.gen, ref_conds.gen
    assert torch.equal(g["prompt_token"], rg["prompt_token"].long())
    torch.testing.assert_close(g["prompt_feat"], rg["prompt_feat"], rtol=0, atol=1e-4)
    torch.testing.assert_close(g["embedding"], rg["embedding"], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def voices(tts_pair):
    ref_tts, ours = tts_pair
    clip = DATA / "speech_en_6s.wav"
    with torch.inference_mode():
        ref_tts.prepare_conditionals(str(clip), exaggeration=0.7)
    return ref_tts.conds, ours.prepare_conditionals(clip, exaggeration=0.7)


def test_prepare_conditionals_parity(voices):
    ref_conds, voice = voices
    assert voice.t3.cond_prompt_speech_tokens.shape == (1, 150)
    assert_voice_equal(ref_conds, voice)


def test_generate_parity_greedy_watermarked(tts_pair, voices, monkeypatch):
    ref_tts, ours = tts_pair
    ref_conds, voice = voices
    seen = {}
    real_inference = ref_tts.t3.inference

    def capped(**kw):
        seen["tokens"] = real_inference(**dict(kw, max_new_tokens=N_TOKENS))
        return seen["tokens"]

    with monkeypatch.context() as m:
        m.setattr(ref_tts.t3, "inference", capped)
        zero_noise(m)
        want = ref_tts.generate(TEXT, exaggeration=0.7, **GREEDY)

    tokens = ours.t3_tokens(TEXT, voice, max_new_tokens=N_TOKENS, **GREEDY)
    ref_tokens = seen["tokens"][0]
    assert torch.equal(tokens, ref_tokens[ref_tokens < 6561])
    L = 2 * (voice.gen["prompt_token"].shape[1] + tokens.numel())
    mel = ours.s3gen_mel(tokens, voice, noise=torch.zeros(1, 80, L))
    got = ours._finish(ours.s3gen_wav(mel, noise_free=True), watermark=True)
    assert want.shape == got.shape and want.std() > 1e-3
    assert_close_rel(got, want, "watermarked waveform")


def test_turbo_voice_preparation_parity(ref, ve_pair):
    """Turbo normalises the clip to -27 LUFS and takes a 15 s, 375-token T3 prompt."""
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    ref_s3gen, our_s3gen = build_s3gen_pair(ref, meanflow=True, seed=6)
    ref_t3, our_t3 = build_pair(ref, "turbo", reduced=True, seed=2)
    ref_tts = ChatterboxTurboTTS.__new__(ChatterboxTurboTTS)  # no watermarker or tokenizer needed here
    ref_tts.t3, ref_tts.s3gen, ref_tts.ve, ref_tts.device = ref_t3, ref_s3gen, ve_pair[0], "cpu"
    ours = TTS("turbo", our_t3, our_s3gen, ve_pair[1], dummy_text_frontend("turbo"))
    clip = DATA / "speech_en_6s.wav"

    def norm_loudness_numpy1(wav, sr, target_lufs=-27):
        # The reference's norm_loudness as it computes under its pinned numpy < 2 (float32 product);
        # under numpy 2 its product turns float64 and its tokenizer then raises a dtype error.
        import pyloudnorm

        gain = 10.0 ** ((target_lufs - pyloudnorm.Meter(sr).integrated_loudness(wav)) / 20.0)
        return wav * np.float32(gain)

    ref_tts.norm_loudness = norm_loudness_numpy1
    with torch.inference_mode():
        ref_tts.prepare_conditionals(str(clip), exaggeration=0.0)
    voice = ours.prepare_conditionals(clip, exaggeration=0.0)
    assert 150 < voice.t3.cond_prompt_speech_tokens.shape[1] < 375  # 6.7 s of speech: over 6 s, under the cap
    assert_voice_equal(ref_tts.conds, voice)
    with pytest.raises(ValueError, match="at least 5"):
        ours.prepare_conditionals(DATA / "speech_en_3s.wav")  # the reference asserts > 5 s


def test_vc_parity(ref, s3gen_pair, monkeypatch):
    """Source tokens identical; the flow's mel within 1e-5; HiFT on the reference's mel within 1e-5.
    The whole chain is compared with a looser bound: HiFT turns the flow's ~4e-7 float-rounding
    mel differences into ~1e-3 of the waveform over these 4 s (F0 drives a phase accumulator, so
    tiny F0 differences grow with time). Compared before the watermark, which is bit-equal on its
    own (test_watermark_parity.py) and included in test_generate_parity_greedy_watermarked."""
    from chatterbox.vc import ChatterboxVC

    ref_s3gen, our_s3gen = s3gen_pair
    source, target = DATA / "speech_stereo_44k.wav", DATA / "speech_en_3s.wav"
    ref_vc = ChatterboxVC(ref_s3gen, "cpu")
    ref_vc.watermarker = type("NoWatermark", (), {"apply_watermark": staticmethod(lambda wav, sample_rate: wav)})()
    seen = {}
    real_hift = ref_s3gen.hift_inference

    def capture(speech_feat, cache_source=None):
        seen["mel"] = speech_feat.clone()
        return real_hift(speech_feat, cache_source)

    with monkeypatch.context() as m:
        zero_noise(m)
        m.setattr(ref_s3gen, "hift_inference", capture)
        want = ref_vc.generate(str(source), target_voice_path=str(target))

    vc = VC(our_s3gen)
    tokens = vc.source_tokens(source)
    assert torch.equal(tokens, ref_s3gen.tokenizer(torch.from_numpy(_librosa_16k(source))[None])[0].long())
    gen = vc.prepare_target(target)
    L = 2 * (gen["prompt_token"].shape[1] + tokens.shape[1])
    mel = vc.s3gen_mel(tokens, gen, noise=torch.zeros(1, 80, L))
    assert_close_rel(mel, seen["mel"], "converted mel", rtol=1e-5)
    assert_close_rel(vc.s3gen_wav(seen["mel"], noise_free=True), want, "HiFT on the reference's mel", rtol=1e-5)
    got = vc._finish(vc.s3gen_wav(mel, noise_free=True), watermark=False)
    assert want.shape == got.shape and want.std() > 1e-3
    assert_close_rel(got, want, "converted waveform", rtol=5e-3)


def _librosa_16k(path):
    import librosa

    return librosa.load(str(path), sr=16000)[0]
