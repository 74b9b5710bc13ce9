"""chatterbox_rt.text against the reference text paths (chatterbox-tts==0.1.7, transformers 5.2).

Compares punc_norm of all three reference modules, the grapheme tokenizers (EnTokenizer,
MTLTokenizer) and the GPT-2 tokenizer the Turbo model loads with AutoTokenizer, plus the
whole generate() text path (punc_norm, tokenizer, start/stop padding). Tokenizer files are
small ones trained here; optional language packages are replaced by deterministic fakes so
the plumbing around them is compared without installing them.
"""
import json
import shutil
import sys
import types
import unicodedata

import pytest
import torch
import torch.nn.functional as F
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers, trainers

from chatterbox_rt import text as T

pytestmark = pytest.mark.parity

GRAPHEME_SPECIALS = ["[STOP]", "[UNK]", "[SPACE]", "[START]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
LANG_TOKENS = [f"[{c}]" for c in T.SUPPORTED_LANGUAGES]
CJ_TOKENS = [f"[cj_{c}]" for c in "abcdefghijklmnopqrstuvwxyz0123456789."]
SENTENCES = [
    "Hello world, this is a test of the emergency broadcast system.",
    "The quick brown fox jumps over the lazy dog! Isn't it?",
    "Ça va très bien, merci. Où est la bibliothèque ? L'été dernier.",
    "Größe und Übermaß; die Straße ist naß.",
    "안녕하세요 세계. 한국어 문장입니다.",
    "にほんご の ぶんしょう です。カタカナ も。",
    "שלום עולם",
    "привет мир",
]

AWKWARD = [
    "",
    " ",
    "   \t\n ",
    "hello world",
    "  leading spaces stay lowercase",
    "ßtraße",
    "élan vital",
    "Multiple    spaces\tand\nnewlines",
    "Wait... what?!",
    "Trailing ellipsis…",
    "Mid…ellipsis and ... dots",
    "Colon: semicolon; dash - done",
    "em—dash en–dash",
    "space before comma , here",
    "“Curly double” and ‘curly single’",
    "Ends with dash -",
    "Ends with comma ,",
    "Ends with space ",
    "No ending",
    "Question?",
    "你好世界",
    "你好。",
    "你好，",
    "你好、",
    "你好！",
    "你好？",
    "日本語です。",
    "Mixed 中文, English… 그리고 한국어",
    "a - b - c ; d : e",
    "...",
    "…",
    " - ",
    ";;",
    "[laugh] that was funny [sigh]",
]


def _train_grapheme(path, specials):
    texts = SENTENCES + AWKWARD + [t for ts in MTL_CASES.values() for t in ts]
    alphabet = sorted({c for s in texts
                       for v in (s, unicodedata.normalize("NFKD", s.lower())) for c in v if not c.isspace()})
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def grapheme_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grapheme_parity")
    _train_grapheme(d / "tokenizer.json", GRAPHEME_SPECIALS)
    _train_grapheme(d / "grapheme_mtl_merged_expanded_v1.json", GRAPHEME_SPECIALS + LANG_TOKENS + CJ_TOKENS)
    return d


# --------------------------------------------------------------------------- punc_norm


@pytest.mark.parametrize("text", AWKWARD)
def test_punc_norm(ref, text):
    import chatterbox.mtl_tts as mtl_tts
    import chatterbox.tts as tts
    import chatterbox.tts_turbo as tts_turbo

    assert T.punc_norm(text, "chatterbox") == tts.punc_norm(text)
    assert T.punc_norm(text, "multilingual") == mtl_tts.punc_norm(text)
    assert T.punc_norm(text, "turbo") == tts_turbo.punc_norm(text)
    assert T.punc_norm(text, "nano") == tts_turbo.punc_norm(text)


def test_supported_languages(ref):
    import chatterbox.mtl_tts as mtl_tts

    assert list(T.SUPPORTED_LANGUAGES.items()) == list(mtl_tts.SUPPORTED_LANGUAGES.items())


# --------------------------------------------------------------------------- English


def test_english_tokenizer(ref, grapheme_dir):
    from chatterbox.models.tokenizers import EnTokenizer

    path = str(grapheme_dir / "tokenizer.json")
    theirs, ours = EnTokenizer(path), T.EnglishTokenizer.from_file(path)
    for text in SENTENCES + AWKWARD:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(torch.tensor(ids))


def test_english_generate_path(ref, grapheme_dir):
    import chatterbox.tts as tts
    from chatterbox.models.tokenizers import EnTokenizer

    theirs = EnTokenizer(str(grapheme_dir / "tokenizer.json"))
    fe = T.load_text_frontend(grapheme_dir, "chatterbox")
    for text in SENTENCES + AWKWARD:
        expected = theirs.text_to_tokens(tts.punc_norm(text))
        expected = F.pad(expected, (1, 0), value=T.START_TEXT_TOKEN)
        expected = F.pad(expected, (0, 1), value=T.STOP_TEXT_TOKEN)
        assert fe.to_tokens(text).tolist() == expected[0].tolist(), text


# --------------------------------------------------------------------------- multilingual


@pytest.fixture
def ref_tok_module(ref, monkeypatch):
    import chatterbox.models.tokenizers.tokenizer as mod

    # Fresh optional back ends on both sides, so fakes never leak between tests.
    for name in ("_kakasi", "_dicta", "_russian_stresser"):
        monkeypatch.setattr(mod, name, None)
    monkeypatch.setattr(T, "_BACKENDS", {})
    return mod


def _both_mtl(mod, vocab_dir):
    path = str(vocab_dir / "grapheme_mtl_merged_expanded_v1.json")
    return mod.MTLTokenizer(path), T.MultilingualTokenizer.from_dir(vocab_dir)


MTL_CASES = {
    "en": SENTENCES[:2] + ["  Spaces  around  ", "UPPER lower"],
    "fr": [SENTENCES[2], "ÉCOLE élève Noël", "À bientôt ! «Bonjour»"],
    "de": [SENTENCES[3], "ÄÖÜ äöü ß ẞ"],
    "ko": [SENTENCES[4], "  앞뒤 공백  ", "한글 and English 섞기", "\ud7a4"],
}


@pytest.mark.parametrize("lang", sorted(MTL_CASES))
def test_multilingual_tokenizer(ref_tok_module, grapheme_dir, lang):
    theirs, ours = _both_mtl(ref_tok_module, grapheme_dir)
    for text in MTL_CASES[lang] + AWKWARD[:12]:
        for kw in ({}, {"lowercase": False}, {"nfkd_normalize": False}):
            ids = ours.encode(text, language_id=lang, **kw)
            assert ids == theirs.encode(text, language_id=lang, **kw), (text, kw)
        assert ours.decode(ids) == theirs.decode(torch.tensor(ids))
    # No language id: no language token on either side.
    assert ours.encode("Hello there") == theirs.encode("Hello there")


def test_multilingual_generate_path(ref_tok_module, grapheme_dir):
    import chatterbox.mtl_tts as mtl_tts

    theirs, _ = _both_mtl(ref_tok_module, grapheme_dir)
    fe = T.load_text_frontend(grapheme_dir, "multilingual")
    for lang, texts in MTL_CASES.items():
        for text in texts + AWKWARD:
            # As ChatterboxMultilingualTTS.generate() does it (language_id lower-cased).
            expected = theirs.text_to_tokens(mtl_tts.punc_norm(text), language_id=lang.lower())
            expected = F.pad(expected, (1, 0), value=T.START_TEXT_TOKEN)
            expected = F.pad(expected, (0, 1), value=T.STOP_TEXT_TOKEN)
            assert fe.to_tokens(text, language_id=lang.upper()).tolist() == expected[0].tolist(), (lang, text)


def test_japanese_real_pykakasi(ref_tok_module, grapheme_dir):
    pytest.importorskip("pykakasi")
    theirs, ours = _both_mtl(ref_tok_module, grapheme_dir)
    for text in ["日本語の文章です。", "東京へ行きます", "私は学生です", "橋を渡る部屋", "カタカナとひらがな", "漢字 and English"]:
        assert ours.normalize(text, "ja") == "[ja]" + ref_tok_module.hiragana_normalize(
            unicodedata.normalize("NFKD", text.lower()))
        assert ours.encode(text, language_id="ja") == theirs.encode(text, language_id="ja"), text


class _FakeKakasi:
    """Deterministic pykakasi stand-in: one segment per run of kanji / katakana / other."""

    READINGS = {"私": "わたし", "東": "ひがし", "京": "きょう", "橋": "はし", "辺": "へん", "語": "ご"}

    def convert(self, text):
        def kind(c):
            return "k" if 19968 <= ord(c) <= 40959 else "K" if 12449 <= ord(c) <= 12538 else "o"

        out, i = [], 0
        while i < len(text):
            j = i
            while j < len(text) and kind(text[j]) == kind(text[i]):
                j += 1
            seg = text[i:j]
            hira = "".join(self.READINGS.get(c, "あ") for c in seg) if kind(seg[0]) == "k" else seg
            out.append({"orig": seg, "hira": hira})
            i = j
        return out


def test_japanese_plumbing_with_fake_pykakasi(ref_tok_module, grapheme_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pykakasi", types.SimpleNamespace(kakasi=_FakeKakasi))
    theirs, ours = _both_mtl(ref_tok_module, grapheme_dir)
    for text in ["私は東京の橋です", "辺り カタカナ がぎ", "語", "ABC def", ""]:
        assert ours.encode(text, language_id="ja") == theirs.encode(text, language_id="ja"), text
        assert ours.normalize(text, "ja") == "[ja]" + ref_tok_module.hiragana_normalize(
            unicodedata.normalize("NFKD", text.lower()))


def test_hebrew_russian_plumbing_with_fakes(ref_tok_module, grapheme_dir, monkeypatch):
    class Dicta:
        def add_diacritics(self, text):
            return "".join(c + "\u05b8" if "\u05d0" <= c <= "\u05ea" else c for c in text)

    class RussianTextStresser:
        def stress_text(self, text):
            return text.replace("и", "и\u0301")

    monkeypatch.setitem(sys.modules, "dicta_onnx", types.SimpleNamespace(Dicta=Dicta))
    pkg = types.ModuleType("russian_text_stresser")
    sub = types.SimpleNamespace(RussianTextStresser=RussianTextStresser)
    pkg.text_stresser = sub
    monkeypatch.setitem(sys.modules, "russian_text_stresser", pkg)
    monkeypatch.setitem(sys.modules, "russian_text_stresser.text_stresser", sub)
    theirs, ours = _both_mtl(ref_tok_module, grapheme_dir)
    for lang, text in [("he", "שלום עולם"), ("ru", "Привет мир"), ("he", "abc"), ("ru", "")]:
        assert ours.encode(text, language_id=lang) == theirs.encode(text, language_id=lang), (lang, text)


def test_chinese_plumbing_with_fake_pkuseg(ref_tok_module, tmp_path, grapheme_dir, monkeypatch):
    class pkuseg:  # noqa: N801 - the real class name
        def cut(self, text):
            return [text[k:k + 2] for k in range(0, len(text), 2)]

    monkeypatch.setitem(sys.modules, "spacy_pkuseg", types.SimpleNamespace(pkuseg=pkuseg))
    shutil.copy(grapheme_dir / "grapheme_mtl_merged_expanded_v1.json", tmp_path)
    # Duplicate codes and a duplicated glyph exercise the index suffix and "last one wins".
    entries = ["你\tonf", "妤\tvnd", "好\tvnd", "世\tpt", "界\twol", "界\twoll", "中\tl", "文\tyk", "字\tjnd"]
    cangjie = tmp_path / "Cangjie5_TC.json"
    cangjie.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    # The reference looks the table up on the hub (cache layout); hand it our file instead.
    monkeypatch.setattr(ref_tok_module, "hf_hub_download", lambda **kw: str(cangjie))
    theirs, ours = _both_mtl(ref_tok_module, tmp_path)
    assert theirs.cangjie_converter.word2cj, "reference did not load the fake table"
    for text in ["你好世界", "中文字，你好！", "你好 world 界", "ひらがな中文", ""]:
        assert ours.encode(text, language_id="zh") == theirs.encode(text, language_id="zh"), text


# --------------------------------------------------------------------------- GPT-2

GPT2_TEXTS = [
    "Hello world, this is a test.",
    "hello world",
    " leading space",
    "trailing space ",
    "  multiple   spaces\tand\nnewlines\n\n",
    "[laugh] that was funny [sigh] right?",
    "word[laugh]word [sigh][laugh]",
    "[unknown tag] stays bytes",
    "end<|endoftext|>more",
    "Ça va? naïve café — “quotes” 😀 中文",
    "",
    "Don't you'll we've 123 4567",
]


def _train_gpt2(d):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 3 + GPT2_TEXTS, vocab_size=500, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(d))
    n = len(json.loads((d / "vocab.json").read_text()))
    (d / "added_tokens.json").write_text(json.dumps({"[laugh]": n, "[sigh]": n + 1, "[cough]": n + 2}))
    # transformers 5 cannot pick a tokenizer class without a config (or a config.json).
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return bpe


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("gpt2_files")
    bpe = _train_gpt2(base)
    dirs = {"vocab_merges": base}

    with_json = tmp_path_factory.mktemp("gpt2_tokenizer_json")
    for f in base.iterdir():
        shutil.copy(f, with_json)
    bpe.save(str(with_json / "tokenizer.json"))
    dirs["tokenizer_json"] = with_json

    # What transformers itself writes (tokenizer.json + added_tokens_decoder in the config).
    import transformers

    saved = tmp_path_factory.mktemp("gpt2_saved")
    transformers.AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(saved))
    dirs["save_pretrained"] = saved

    limited = tmp_path_factory.mktemp("gpt2_max_len")
    for f in base.iterdir():
        shutil.copy(f, limited)
    (limited / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 6}))
    dirs["max_len"] = limited

    bos = tmp_path_factory.mktemp("gpt2_bos")
    for f in base.iterdir():
        shutil.copy(f, bos)
    (bos / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "model_max_length": 5}))
    dirs["add_bos"] = bos
    return dirs


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json", "save_pretrained", "max_len", "add_bos"])
def test_gpt2_tokenizer(ref, gpt2_dirs, layout):
    import transformers

    d = gpt2_dirs[layout]
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = T.GPT2Tokenizer.from_dir(d)
    assert len(ours) == len(theirs)
    for text in GPT2_TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.encode(text, truncation=True) == theirs(text, truncation=True).input_ids, text


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json", "max_len", "add_bos"])
@pytest.mark.parametrize("variant", ["turbo", "nano"])
def test_turbo_generate_path(ref, gpt2_dirs, layout, variant):
    import chatterbox.tts_turbo as tts_turbo
    import transformers

    d = gpt2_dirs[layout]
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    if theirs.pad_token is None:  # as ChatterboxTurboTTS.from_local does
        theirs.pad_token = theirs.eos_token
    fe = T.load_text_frontend(d, variant)
    for text in GPT2_TEXTS + AWKWARD:
        expected = theirs(tts_turbo.punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids
        assert fe.to_tokens(text).tolist() == expected[0].tolist(), text
