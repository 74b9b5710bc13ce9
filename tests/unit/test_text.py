"""Unit tests for chatterbox_rt.text that need no reference package and no real checkpoint.

Tokenizer files are built here with the `tokenizers` library; the real ones are never
downloaded.
"""
import json
import sys
import types
import unicodedata

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers, trainers

from chatterbox_rt import text as T

GRAPHEME_SPECIALS = ["[STOP]", "[UNK]", "[SPACE]", "[START]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
LANG_TOKENS = ["[en]", "[fr]", "[de]", "[ko]", "[ja]", "[zh]", "[he]", "[ru]"]
CJ_TOKENS = [f"[cj_{c}]" for c in "abcdefghijklmnopqrstuvwxyz0123456789."]
SENTENCES = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog!",
    "Ça va très bien, merci. Größe und Übermaß.",
    "안녕하세요 세계. 한국어 문장입니다.",
]


def _train_grapheme(path, specials, sentences=SENTENCES):
    alphabet = sorted({c for s in sentences for v in (s, unicodedata.normalize("NFKD", s.lower())) for c in v})
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def grapheme_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grapheme")
    _train_grapheme(d / "tokenizer.json", GRAPHEME_SPECIALS)
    _train_grapheme(d / "grapheme_mtl_merged_expanded_v1.json", GRAPHEME_SPECIALS + LANG_TOKENS + CJ_TOKENS)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(d))
    n = len(json.loads((d / "vocab.json").read_text()))
    (d / "added_tokens.json").write_text(json.dumps({"[laugh]": n, "[sigh]": n + 1}))
    return d


# --------------------------------------------------------------------------- punc_norm


@pytest.mark.parametrize("variant", T.VARIANTS)
def test_punc_norm_empty_and_whitespace(variant):
    assert T.punc_norm("", variant) == "You need to add some text for me to talk."
    # Whitespace only collapses to "" and then gets the full stop.
    assert T.punc_norm("   ", variant) == "."


@pytest.mark.parametrize("variant", T.VARIANTS)
def test_punc_norm_capitalises_only_a_lowercase_first_char(variant):
    assert T.punc_norm("hello there", variant) == "Hello there."
    # The first character is a space here, so nothing is capitalised (reference quirk).
    assert T.punc_norm("  hello there", variant) == "hello there."
    assert T.punc_norm("ßig", variant) == "SSig."


def test_punc_norm_chatterbox_vs_turbo_tables():
    s = "wait... what; really - yes: “ok” ‘fine’ — done – end"
    # "..." and ";" become ", " in front of the following space (reference quirk: double space).
    assert T.punc_norm(s, "chatterbox") == "Wait,  what,  really, yes, \"ok\" 'fine' - done - end."
    assert T.punc_norm(s, "multilingual") == T.punc_norm(s, "chatterbox")
    # Turbo keeps "...", ";" and " - ".
    assert T.punc_norm(s, "turbo") == "Wait... what; really - yes, \"ok\" 'fine' - done - end."
    assert T.punc_norm(s, "nano") == T.punc_norm(s, "turbo")


def test_punc_norm_ellipsis_leaves_double_space():
    # Spaces are collapsed before "…" -> ", ", so a double space survives (reference quirk).
    assert T.punc_norm("hi… there", "chatterbox") == "Hi,  there."
    assert T.punc_norm("end…", "turbo") == "End,"


def test_punc_norm_cjk_enders_only_multilingual():
    for s in ("你好。", "你好！", "你好？", "你好，", "你好、"):
        assert T.punc_norm(s, "multilingual") == s
        assert T.punc_norm(s, "chatterbox") == s + "."
        assert T.punc_norm(s, "turbo") == s + "."


def test_punc_norm_unknown_variant():
    with pytest.raises(ValueError, match="chatterbox"):
        T.punc_norm("hi", "llama")


def test_tables_are_module_constants():
    assert len(T.CHATTERBOX_PUNC_REPLACEMENTS) == 12
    assert len(T.TURBO_PUNC_REPLACEMENTS) == 9
    assert set(T.TURBO_PUNC_REPLACEMENTS) < set(T.CHATTERBOX_PUNC_REPLACEMENTS)
    assert set(T.MULTILINGUAL_SENTENCE_ENDERS) - set(T.SENTENCE_ENDERS) == set("、，。？！")


def test_supported_languages():
    assert len(T.SUPPORTED_LANGUAGES) == 23
    assert T.SUPPORTED_LANGUAGES["zh"] == "Chinese" and T.SUPPORTED_LANGUAGES["en"] == "English"
    assert (T.START_TEXT_TOKEN, T.STOP_TEXT_TOKEN) == (255, 0)


# --------------------------------------------------------------------------- English


def test_english_tokenizer_spaces_and_decode(grapheme_dir):
    tok = T.EnglishTokenizer.from_file(grapheme_dir / "tokenizer.json")
    ids = tok.encode("Hello world")
    space = tok.tokenizer.token_to_id("[SPACE]")
    assert space in ids and tok.tokenizer.token_to_id("[UNK]") not in ids
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(torch.tensor(ids)) == "Hello world"


def test_english_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.EnglishTokenizer(tmp_path / "tokenizer.json")


def test_english_tokenizer_needs_start_stop(tmp_path):
    path = _train_grapheme(tmp_path / "bad.json", ["[UNK]", "[SPACE]"])
    with pytest.raises(ValueError, match=r"bad\.json.*\[START\], \[STOP\]"):
        T.EnglishTokenizer(path)


# --------------------------------------------------------------------------- multilingual


@pytest.fixture
def mtl(grapheme_dir):
    return T.MultilingualTokenizer.from_dir(grapheme_dir)


def test_mtl_language_token_and_case(mtl):
    ids = mtl.encode("Hello World", language_id="en")
    assert ids[0] == mtl.tokenizer.token_to_id("[en]")
    assert mtl.encode("Hello World", language_id="EN") == ids
    # No language: no language token, like the reference.
    assert mtl.encode("Hello World")[0] != ids[0]
    assert mtl.encode("Hello World", language_id="") == mtl.encode("Hello World")
    assert mtl.decode(ids) == "[en]hello world"


def test_mtl_lowercase_and_nfkd(mtl):
    assert mtl.normalize("Ça", "fr") == "[fr]" + unicodedata.normalize("NFKD", "ça")
    assert mtl.normalize("Ça", "fr", lowercase=False, nfkd_normalize=False) == "[fr]Ça"


def test_mtl_bad_language(mtl):
    with pytest.raises(ValueError, match=r"Unsupported language_id 'xx'.*ar, da, de"):
        mtl.encode("hi", language_id="xx")


def test_korean_decomposition(mtl):
    # Without NFKD the tokenizer's own Hangul decomposition must give the NFKD Jamo.
    s = "  한국어 문장입니다  "
    assert T.korean_normalize(s) == unicodedata.normalize("NFKD", s).strip()
    assert mtl.normalize(s, "ko", nfkd_normalize=False) == "[ko]" + unicodedata.normalize("NFKD", s).strip()
    assert T.korean_normalize("가") == "\u1100\u1161"
    assert T.korean_normalize("각") == "\u1100\u1161\u11a8"
    assert T.korean_normalize("abc") == "abc"
    assert mtl.tokenizer.token_to_id("[UNK]") not in mtl.encode("한국어", language_id="ko")


@pytest.mark.parametrize(
    "lang, module, package, language",
    [
        ("ja", "pykakasi", "pykakasi", "Japanese"),
        ("he", "dicta_onnx", "dicta-onnx", "Hebrew"),
        ("ru", "russian_text_stresser", "russian-text-stresser", "Russian"),
    ],
)
def test_missing_optional_package(mtl, monkeypatch, lang, module, package, language):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(T.MissingDependencyError) as info:
        mtl.encode("text", language_id=lang)
    msg = str(info.value)
    assert f"'{package}'" in msg and f"pip install {package}" in msg and language in msg
    assert isinstance(info.value, ImportError)
    assert info.value.package == package and info.value.language_id == lang


def test_japanese_message_matches_brief(mtl, monkeypatch):
    monkeypatch.setitem(sys.modules, "pykakasi", None)
    expected = r"^Japanese text needs the optional package 'pykakasi' \(pip install pykakasi\)$"
    with pytest.raises(ImportError, match=expected):
        mtl.encode("日本語", language_id="ja")


def test_chinese_needs_cangjie_table(tmp_path, grapheme_dir):
    vocab = tmp_path / "grapheme_mtl_merged_expanded_v1.json"
    vocab.write_bytes((grapheme_dir / "grapheme_mtl_merged_expanded_v1.json").read_bytes())
    tok = T.MultilingualTokenizer.from_dir(tmp_path)
    # Other languages work without the table.
    tok.encode("hi", language_id="en")
    with pytest.raises(FileNotFoundError) as info:
        tok.encode("你好", language_id="zh")
    assert "Cangjie5_TC.json" in str(info.value) and str(tmp_path) in str(info.value)


def _write_cangjie(d):
    # word \t code; "好" shares code "vnd" with "妤" listed first, so it gets suffix 1.
    entries = ["你\tonf", "妤\tvnd", "好\tvnd", "們\tonan", "中\tl"]
    (d / "Cangjie5_TC.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")


def _fake_pkuseg_module():
    class pkuseg:  # noqa: N801 - the real class name
        def cut(self, text):
            return [text[:2], text[2:]] if len(text) > 2 else [text]

    return types.SimpleNamespace(pkuseg=pkuseg)


def test_chinese_cangjie_conversion(tmp_path, grapheme_dir, monkeypatch):
    (tmp_path / "grapheme_mtl_merged_expanded_v1.json").write_bytes(
        (grapheme_dir / "grapheme_mtl_merged_expanded_v1.json").read_bytes())
    _write_cangjie(tmp_path)
    monkeypatch.setattr(T, "_BACKENDS", {})
    monkeypatch.setitem(sys.modules, "spacy_pkuseg", _fake_pkuseg_module())
    tok = T.MultilingualTokenizer.from_dir(tmp_path)
    assert tok.normalize("你好中x", "zh") == (
        "[zh][cj_o][cj_n][cj_f][cj_.][cj_v][cj_n][cj_d][cj_1][cj_.] [cj_l][cj_.]x")
    ids = tok.encode("你好中", language_id="zh")
    assert tok.tokenizer.token_to_id("[SPACE]") in ids


def test_chinese_missing_pkuseg(tmp_path, grapheme_dir, monkeypatch):
    (tmp_path / "grapheme_mtl_merged_expanded_v1.json").write_bytes(
        (grapheme_dir / "grapheme_mtl_merged_expanded_v1.json").read_bytes())
    _write_cangjie(tmp_path)
    monkeypatch.setitem(sys.modules, "spacy_pkuseg", None)
    tok = T.MultilingualTokenizer.from_dir(tmp_path)
    with pytest.raises(T.MissingDependencyError, match=r"Chinese text needs the optional package 'spacy-pkuseg'"):
        tok.encode("你好", language_id="zh")


# --------------------------------------------------------------------------- GPT-2


def test_gpt2_added_tokens_and_no_bos_eos(gpt2_dir):
    tok = T.GPT2Tokenizer.from_dir(gpt2_dir)
    n = len(json.loads((gpt2_dir / "vocab.json").read_text()))
    assert len(tok) == n + 2
    ids = tok.encode("Hello [laugh] world[sigh]")
    assert n in ids and n + 1 in ids
    eot = tok.tokenizer.token_to_id("<|endoftext|>")
    assert eot not in ids
    assert tok.encode("hi<|endoftext|>")[-1] == eot
    assert tok.decode(tok.encode("Hello [laugh] world")) == "Hello [laugh] world"


def test_gpt2_missing_files(tmp_path, gpt2_dir):
    with pytest.raises(FileNotFoundError) as info:
        T.GPT2Tokenizer.from_dir(tmp_path)
    msg = str(info.value)
    assert all(name in msg for name in ("tokenizer.json", "vocab.json", "merges.txt", str(tmp_path)))
    (tmp_path / "vocab.json").write_bytes((gpt2_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="missing: merges.txt"):
        T.GPT2Tokenizer.from_dir(tmp_path)


def test_gpt2_added_token_id_mismatch(tmp_path, gpt2_dir):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    n = len(json.loads((tmp_path / "vocab.json").read_text()))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[laugh]": n + 5}))
    with pytest.raises(ValueError, match=r"\[laugh\].*id %d" % (n + 5)):
        T.GPT2Tokenizer.from_dir(tmp_path)


def test_gpt2_truncation(tmp_path, gpt2_dir):
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4}))
    fe = T.load_text_frontend(tmp_path, "turbo")
    full = fe.tokenizer.encode(T.punc_norm("the quick brown fox jumps", "turbo"))
    assert len(full) > 4
    assert fe.to_tokens("the quick brown fox jumps").tolist() == full[:4]


# --------------------------------------------------------------------------- front end


def test_frontend_chatterbox_padding(grapheme_dir):
    fe = T.load_text_frontend(grapheme_dir, "chatterbox")
    toks = fe.to_tokens("hello world")
    assert toks.dtype == torch.long and toks.dim() == 1
    inner = fe.tokenizer.encode("Hello world.")
    assert toks.tolist() == [T.START_TEXT_TOKEN] + inner + [T.STOP_TEXT_TOKEN]
    assert fe.to_tokens("hello world", language_id="en").tolist() == toks.tolist()
    with pytest.raises(ValueError, match="English only"):
        fe.to_tokens("bonjour", language_id="fr")


def test_frontend_multilingual(grapheme_dir):
    fe = T.load_text_frontend(grapheme_dir, "multilingual")
    toks = fe.to_tokens("bonjour", language_id="FR").tolist()
    assert toks[0] == T.START_TEXT_TOKEN and toks[-1] == T.STOP_TEXT_TOKEN
    assert toks[1] == fe.tokenizer.tokenizer.token_to_id("[fr]")
    for bad in (None, ""):
        with pytest.raises(ValueError, match="needs a language_id"):
            fe.to_tokens("bonjour", language_id=bad)
    with pytest.raises(ValueError, match="Unsupported language_id 'xx'"):
        fe.to_tokens("bonjour", language_id="xx")


@pytest.mark.parametrize("variant", ["turbo", "nano"])
def test_frontend_gpt2_variants(gpt2_dir, variant):
    fe = T.load_text_frontend(gpt2_dir, variant)
    toks = fe.to_tokens("hello world… [laugh]")
    assert toks.dtype == torch.long and toks.dim() == 1
    assert toks.tolist() == fe.tokenizer.encode("Hello world,  [laugh].")
    assert fe.to_tokens("hi", language_id="en").tolist() == fe.to_tokens("hi").tolist()
    with pytest.raises(ValueError, match="English only"):
        fe.to_tokens("hi", language_id="de")


def test_load_text_frontend_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load_text_frontend(tmp_path, "chatterbox")
    with pytest.raises(FileNotFoundError, match="grapheme_mtl_merged_expanded_v1.json"):
        T.load_text_frontend(tmp_path, "multilingual")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        T.load_text_frontend(tmp_path, "turbo")
    with pytest.raises(ValueError, match="Unknown variant"):
        T.load_text_frontend(tmp_path, "large")
