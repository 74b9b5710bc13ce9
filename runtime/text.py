"""Text front ends: raw text -> the text token ids that T3 consumes.

Every model variant turns text into tokens the same way its reference ``generate()`` does
(PyPI ``chatterbox-tts==0.1.7``); this module reproduces those paths id for id:

* ``chatterbox``   : ``tts.py::punc_norm`` + ``models/tokenizers/tokenizer.py::EnTokenizer``,
  then the start/stop text tokens around the ids.
* ``multilingual`` : ``mtl_tts.py::punc_norm`` + ``MTLTokenizer`` (lowercase, NFKD,
  per-language normalisation, ``[xx]`` language token), then start/stop text tokens.
* ``turbo``/``nano``: ``tts_turbo.py::punc_norm`` + the GPT-2 byte-level BPE tokenizer that
  the reference loads with ``transformers.AutoTokenizer`` (transformers 5.2, the version the
  reference pins); no start/stop tokens.

Only the ``tokenizers`` library is used for tokenisation. Some languages need optional
packages (Japanese, Chinese, Hebrew, Russian); they are imported on first use, and a missing
one raises :class:`MissingDependencyError` instead of the reference's silent fallback, which
would quietly feed the model text it was not trained on.
"""
from __future__ import annotations

import importlib
import json
import logging
import threading
import unicodedata
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_LANGUAGES",
    "VARIANTS",
    "START_TEXT_TOKEN",
    "STOP_TEXT_TOKEN",
    "MissingDependencyError",
    "punc_norm",
    "EnglishTokenizer",
    "MultilingualTokenizer",
    "GPT2Tokenizer",
    "TextFrontEnd",
    "load_text_frontend",
    "dummy_text_frontend",
]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

# Same entries (and order) as chatterbox/mtl_tts.py::SUPPORTED_LANGUAGES.
SUPPORTED_LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "ms": "Malay",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "sw": "Swahili",
    "tr": "Turkish",
    "zh": "Chinese",
}

VARIANTS = ("chatterbox", "multilingual", "turbo", "nano")

# T3Config.start_text_token / stop_text_token (identical for the English and multilingual
# models); generate() pads the tokenizer's ids with them.
START_TEXT_TOKEN = 255
STOP_TEXT_TOKEN = 0

# Special tokens of the grapheme tokenizers (models/tokenizers/tokenizer.py).
SOT = "[START]"
EOT = "[STOP]"
UNK = "[UNK]"
SPACE = "[SPACE]"

# Official file names inside a checkpoint directory.
ENGLISH_TOKENIZER_FILE = "tokenizer.json"
MULTILINGUAL_TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"
GPT2_TOKENIZER_FILE = "tokenizer.json"
GPT2_VOCAB_FILE = "vocab.json"
GPT2_MERGES_FILE = "merges.txt"
GPT2_ADDED_TOKENS_FILE = "added_tokens.json"
GPT2_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GPT2_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# --- punc_norm tables -----------------------------------------------------------------
# Applied in order with str.replace, exactly as the reference lists them. The order matters:
# " ," -> "," runs after the rules that create ", ", so "a ; b" ends as "a,  b" (the double
# space is the reference's, since whitespace is collapsed before these replacements).

# chatterbox/tts.py and chatterbox/mtl_tts.py
CHATTERBOX_PUNC_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("...", ", "),
    ("…", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)

# chatterbox/tts_turbo.py: deliberately shorter. It keeps "...", ";" and " - " as written.
TURBO_PUNC_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("…", ", "),
    (":", ","),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)

SENTENCE_ENDERS: tuple[str, ...] = (".", "!", "?", "-", ",")
# mtl_tts.py also accepts CJK enders, so Chinese/Japanese text gets no extra ASCII ".".
MULTILINGUAL_SENTENCE_ENDERS: tuple[str, ...] = SENTENCE_ENDERS + ("、", "，", "。", "？", "！")

# What every reference punc_norm returns for "" (the model then says this sentence).
EMPTY_TEXT_REPLACEMENT = "You need to add some text for me to talk."

_PUNC_NORM_RULES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "chatterbox": (CHATTERBOX_PUNC_REPLACEMENTS, SENTENCE_ENDERS),
    "multilingual": (CHATTERBOX_PUNC_REPLACEMENTS, MULTILINGUAL_SENTENCE_ENDERS),
    "turbo": (TURBO_PUNC_REPLACEMENTS, SENTENCE_ENDERS),
    "nano": (TURBO_PUNC_REPLACEMENTS, SENTENCE_ENDERS),
}

# transformers' "no maximum length" threshold: with a model_max_length above it,
# truncation=True does nothing.
_HF_LARGE_INTEGER = int(1e20)

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class MissingDependencyError(ImportError):
    """A language's normaliser needs an optional package that is not installed."""

    def __init__(self, package: str, language_id: str, module: str | None = None):
        self.package = package
        self.language_id = language_id
        language = SUPPORTED_LANGUAGES.get(language_id, language_id)
        super().__init__(
            f"{language} text needs the optional package '{package}' (pip install {package})",
            name=module,
        )


def _import_optional(module: str, package: str, language_id: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(package, language_id, module) from err


def _check_language_id(language_id: str) -> str:
    lid = language_id.lower()
    if lid not in SUPPORTED_LANGUAGES:
        supported = ", ".join(SUPPORTED_LANGUAGES)
        raise ValueError(f"Unsupported language_id '{language_id}'. Supported languages: {supported}")
    return lid


# --------------------------------------------------------------------------------------
# punc_norm
# --------------------------------------------------------------------------------------


def punc_norm(text: str, variant: str) -> str:
    """Clean up punctuation the way the variant's reference ``punc_norm`` does.

    Quirks kept on purpose: "" becomes :data:`EMPTY_TEXT_REPLACEMENT`; only the first
    character is capitalised (and before whitespace is collapsed, so "  hi" stays lower
    case); whitespace-only text becomes ".".
    """
    try:
        replacements, enders = _PUNC_NORM_RULES[variant]
    except KeyError:
        raise ValueError(f"Unknown variant '{variant}'; expected one of {', '.join(VARIANTS)}") from None

    if len(text) == 0:
        return EMPTY_TEXT_REPLACEMENT

    if text[0].islower():
        text = text[0].upper() + text[1:]

    text = " ".join(text.split())

    for old, new in replacements:
        text = text.replace(old, new)

    text = text.rstrip(" ")
    if not text.endswith(enders):
        text += "."
    return text


# --------------------------------------------------------------------------------------
# Grapheme tokenizers (chatterbox, multilingual)
# --------------------------------------------------------------------------------------


def _load_tokenizer_json(path: Path) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path} is not a valid tokenizers JSON file: {err}") from err


def _check_start_stop(tokenizer: Tokenizer, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in (SOT, EOT) if t not in vocab]
    if missing:
        raise ValueError(f"{path} lacks the special token(s) {', '.join(missing)}; is it a Chatterbox tokenizer?")


def _ids_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


def _grapheme_decode(tokenizer: Tokenizer, ids) -> str:
    # The grapheme tokenizers' decoder joins tokens with spaces; real spaces are [SPACE].
    txt = tokenizer.decode(_ids_list(ids), skip_special_tokens=False)
    return txt.replace(" ", "").replace(SPACE, " ").replace(EOT, "").replace(UNK, "")


class EnglishTokenizer:
    """``EnTokenizer`` of the reference: the original (English) Chatterbox grapheme tokenizer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tokenizer = _load_tokenizer_json(self.path)
        _check_start_stop(self.tokenizer, self.path)

    @classmethod
    def from_file(cls, path: str | Path) -> "EnglishTokenizer":
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.replace(" ", SPACE)).ids

    def decode(self, ids) -> str:
        return _grapheme_decode(self.tokenizer, ids)


# --- language-specific normalisers (models/tokenizers/tokenizer.py) -------------------

# The optional back ends are slow to build (dictionaries, ONNX sessions), so one instance
# per process is shared, as in the reference.
_BACKENDS: dict[str, object] = {}
_BACKENDS_LOCK = threading.Lock()


def _backend(key: str, factory):
    obj = _BACKENDS.get(key)
    if obj is None:
        with _BACKENDS_LOCK:
            obj = _BACKENDS.get(key)
            if obj is None:
                obj = factory()
                _BACKENDS[key] = obj
    return obj


def _is_kanji(c: str) -> bool:
    return 19968 <= ord(c) <= 40959


def _is_katakana(c: str) -> bool:
    return 12449 <= ord(c) <= 12538


def hiragana_normalize(text: str) -> str:
    """Japanese: kanji -> hiragana (pykakasi), katakana kept, then NFKD."""
    pykakasi = _import_optional("pykakasi", "pykakasi", "ja")
    kakasi = _backend("pykakasi", pykakasi.kakasi)
    out = []
    for r in kakasi.convert(text):
        inp = r["orig"]
        hira = r["hira"]
        if any(_is_kanji(c) for c in inp):
            # The reference puts a space before a kanji reading that starts with the
            # particles は/へ, presumably so they are read as words of their own.
            if hira and hira[0] in ("は", "へ"):
                hira = " " + hira
            out.append(hira)
        elif inp and all(_is_katakana(c) for c in inp):
            out.append(inp)
        else:
            out.append(inp)
    return unicodedata.normalize("NFKD", "".join(out))


def add_hebrew_diacritics(text: str) -> str:
    """Hebrew: add niqqud with dicta-onnx."""
    dicta_onnx = _import_optional("dicta_onnx", "dicta-onnx", "he")
    dicta = _backend("dicta", dicta_onnx.Dicta)
    try:
        return dicta.add_diacritics(text)
    except Exception as err:
        # Kept from the reference: a failing diacritiser degrades to the plain text.
        logger.warning("Hebrew diacritization failed: %s", err)
        return text


def add_russian_stress(text: str) -> str:
    """Russian: add stress marks with russian-text-stresser."""
    mod = _import_optional("russian_text_stresser.text_stresser", "russian-text-stresser", "ru")
    stresser = _backend("russian_stresser", mod.RussianTextStresser)
    try:
        return stresser.stress_text(text)
    except Exception as err:
        # Kept from the reference: a failing stresser degrades to the plain text.
        logger.warning("Russian stress labeling failed: %s", err)
        return text


def _decompose_hangul(char: str) -> str:
    # The reference's range runs to U+D7AF, 12 code points past the last syllable (U+D7A3);
    # kept so those unassigned code points map the same way.
    if not ("\uac00" <= char <= "\ud7af"):
        return char
    base = ord(char) - 0xAC00
    initial = chr(0x1100 + base // (21 * 28))
    medial = chr(0x1161 + (base % (21 * 28)) // 28)
    final = chr(0x11A7 + base % 28) if base % 28 > 0 else ""
    return initial + medial + final


def korean_normalize(text: str) -> str:
    """Korean: Hangul syllables -> conjoining Jamo; the reference also strips the ends."""
    return "".join(_decompose_hangul(c) for c in text).strip()


class ChineseCangjieConverter:
    """Chinese: pkuseg word segmentation, then each CJK glyph -> ``[cj_x]...[cj_.]`` codes.

    Reads ``Cangjie5_TC.json`` from the checkpoint directory. (The reference passes that
    directory to ``hf_hub_download`` as a *cache* dir, so it only finds the table in the hub
    cache layout or by downloading it; we read the plain file and never touch the network.)
    """

    def __init__(self, cangjie_path: str | Path):
        path = Path(cangjie_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Chinese text needs the Cangjie table '{path.name}' in the checkpoint directory "
                f"{path.parent}, but it is not there"
            )
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
        self.word2cj: dict[str, str] = {}
        self.cj2word: dict[str, list[str]] = {}
        for entry in data:
            word, code = entry.split("\t")[:2]
            # Later duplicates win in word2cj but keep their list position in cj2word,
            # which decides the numeric suffix: both exactly as the reference builds them.
            self.word2cj[word] = code
            self.cj2word.setdefault(code, []).append(word)
        pkuseg_mod = _import_optional("spacy_pkuseg", "spacy-pkuseg", "zh")
        self.segmenter = _backend("pkuseg", pkuseg_mod.pkuseg)

    def _cangjie_encode(self, glyph: str) -> str | None:
        code = self.word2cj.get(glyph)
        if code is None:
            return None
        index = self.cj2word[code].index(glyph)
        return code + (str(index) if index > 0 else "")

    def __call__(self, text: str) -> str:
        # The segmenter's word boundaries become spaces, hence [SPACE] tokens.
        full_text = " ".join(self.segmenter.cut(text))
        output = []
        for t in full_text:
            if unicodedata.category(t) == "Lo":
                cangjie = self._cangjie_encode(t)
                if cangjie is None:
                    output.append(t)
                    continue
                output.append("".join(f"[cj_{c}]" for c in cangjie) + "[cj_.]")
            else:
                output.append(t)
        return "".join(output)


class MultilingualTokenizer:
    """``MTLTokenizer`` of the reference: the 23-language grapheme tokenizer."""

    def __init__(self, path: str | Path, cangjie_path: str | Path | None = None):
        self.path = Path(path)
        self.tokenizer = _load_tokenizer_json(self.path)
        _check_start_stop(self.tokenizer, self.path)
        # Like the reference, the Cangjie table is looked for next to the vocabulary.
        self.cangjie_path = Path(cangjie_path) if cangjie_path is not None else self.path.parent / CANGJIE_FILE
        self._cangjie: ChineseCangjieConverter | None = None
        self._cangjie_lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, cangjie_path: str | Path | None = None) -> "MultilingualTokenizer":
        return cls(path, cangjie_path)

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> "MultilingualTokenizer":
        ckpt_dir = Path(ckpt_dir)
        return cls(ckpt_dir / MULTILINGUAL_TOKENIZER_FILE, ckpt_dir / CANGJIE_FILE)

    def _cangjie_converter(self) -> ChineseCangjieConverter:
        # Built on first Chinese input only: the table is large and pkuseg loads a model.
        if self._cangjie is None:
            with self._cangjie_lock:
                if self._cangjie is None:
                    self._cangjie = ChineseCangjieConverter(self.cangjie_path)
        return self._cangjie

    def preprocess(self, text: str, lowercase: bool = True, nfkd_normalize: bool = True) -> str:
        if lowercase:
            text = text.lower()
        if nfkd_normalize:
            text = unicodedata.normalize("NFKD", text)
        return text

    def normalize(self, text: str, language_id: str | None = None, lowercase: bool = True,
                  nfkd_normalize: bool = True) -> str:
        """The string handed to the tokenizer (before spaces become ``[SPACE]``)."""
        # generate() lower-cases language_id before MTLTokenizer sees it; "" means none.
        lid = _check_language_id(language_id) if language_id else None
        text = self.preprocess(text, lowercase=lowercase, nfkd_normalize=nfkd_normalize)
        if lid == "zh":
            text = self._cangjie_converter()(text)
        elif lid == "ja":
            text = hiragana_normalize(text)
        elif lid == "he":
            text = add_hebrew_diacritics(text)
        elif lid == "ko":
            text = korean_normalize(text)
        elif lid == "ru":
            text = add_russian_stress(text)
        if lid:
            text = f"[{lid}]{text}"
        return text

    def encode(self, text: str, language_id: str | None = None, lowercase: bool = True,
               nfkd_normalize: bool = True) -> list[int]:
        text = self.normalize(text, language_id, lowercase=lowercase, nfkd_normalize=nfkd_normalize)
        return self.tokenizer.encode(text.replace(" ", SPACE)).ids

    def decode(self, ids) -> str:
        return _grapheme_decode(self.tokenizer, ids)


# --------------------------------------------------------------------------------------
# GPT-2 byte-level BPE (turbo, nano)
# --------------------------------------------------------------------------------------


def _read_json(path: Path):
    with open(path, encoding="utf-8") as fp:
        return json.load(fp)


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value["content"]
    return str(value)


def _as_added_token(value, special: bool) -> AddedToken:
    if isinstance(value, dict):
        kw = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        kw.setdefault("special", special)
        return AddedToken(value["content"], **kw)
    return AddedToken(str(value), special=special)


def _bos_eos_template(tok: Tokenizer, bos: str | None, eos: str | None, where: Path):
    specials = []
    for name, content in (("bos_token", bos), ("eos_token", eos)):
        if content is None:
            continue
        idx = tok.token_to_id(content)
        if idx is None:
            raise ValueError(
                f"the tokenizer config in {where} asks for a {name} {content!r} that is not in the vocabulary")
        specials.append((content, idx))
    head = [f"{bos}:0"] if bos is not None else []
    tail = [f"{eos}:0"] if eos is not None else []
    return processors.TemplateProcessing(
        single=head + ["$A:0"] + tail,
        pair=head + ["$A:0"] + tail + (head and [f"{bos}:1"]) + ["$B:1"] + (tail and [f"{eos}:1"]),
        special_tokens=list(dict(specials).items()),
    )


class GPT2Tokenizer:
    """The Turbo/Nano text tokenizer: GPT-2 byte-level BPE plus the checkpoint's added tokens.

    Reproduces ``transformers.AutoTokenizer.from_pretrained(ckpt_dir)`` (transformers 5.2,
    class ``GPT2Tokenizer``) for encoding:

    * the BPE is built from ``vocab.json`` + ``merges.txt``, or taken from ``tokenizer.json``
      when present; transformers 5 keeps only that file's vocabulary, merges, post-processor
      and added tokens and re-applies GPT-2's own byte-level pre-tokenizer and decoder, so we
      do the same;
    * added tokens come from ``tokenizer_config.json``'s ``added_tokens_decoder`` if it has
      one, otherwise from ``added_tokens.json`` (plus those already in ``tokenizer.json``);
    * the named special tokens (default ``<|endoftext|>``) are registered too, so they are
      recognised in the text as single ids; no BOS/EOS is added unless the config asks.
    """

    def __init__(self, tokenizer: Tokenizer, model_max_length: int | None = None):
        self.tokenizer = tokenizer
        # None: no limit (transformers then ignores truncation=True).
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> "GPT2Tokenizer":
        ckpt_dir = Path(ckpt_dir)
        tokenizer_file = ckpt_dir / GPT2_TOKENIZER_FILE
        vocab_file = ckpt_dir / GPT2_VOCAB_FILE
        merges_file = ckpt_dir / GPT2_MERGES_FILE
        added_file = ckpt_dir / GPT2_ADDED_TOKENS_FILE
        config_file = ckpt_dir / GPT2_TOKENIZER_CONFIG_FILE
        special_map_file = ckpt_dir / GPT2_SPECIAL_TOKENS_MAP_FILE

        config = _read_json(config_file) if config_file.is_file() else {}
        add_prefix_space = bool(config.get("add_prefix_space", False))

        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class not in (None, "GPT2Tokenizer", "GPT2TokenizerFast"):
            logger.warning("%s names tokenizer_class %r; building a GPT-2 tokenizer anyway",
                           config_file, tokenizer_class)

        file_added: list[dict] = []
        post_processor = None
        if tokenizer_file.is_file():
            data = _read_json(tokenizer_file)
            model = data.get("model") or {}
            if model.get("type") != "BPE":
                raise ValueError(f"{tokenizer_file} does not hold a BPE model; not a GPT-2 tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            file_added = data.get("added_tokens") or []
            post_processor = _load_tokenizer_json(tokenizer_file).post_processor
        elif vocab_file.is_file() and merges_file.is_file():
            vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
        else:
            missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
            raise FileNotFoundError(
                f"No GPT-2 tokenizer in {ckpt_dir}: looked for {GPT2_TOKENIZER_FILE}, or "
                f"{GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE} (missing: {', '.join(missing)})"
            )
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        if post_processor is not None:
            tok.post_processor = post_processor
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()

        # Named special tokens: GPT2Tokenizer's defaults, overridden by the config and then by
        # special_tokens_map.json (read only when the config has no added_tokens_decoder,
        # as transformers does).
        named: dict[str, object] = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                    "eos_token": "<|endoftext|>"}
        for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
            if key in config:
                named[key] = config[key]
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        if "added_tokens_decoder" not in config and special_map_file.is_file():
            for key, value in _read_json(special_map_file).items():
                if key in ("extra_special_tokens", "additional_special_tokens"):
                    names = {_token_content(t) for t in extra}
                    extra += [t for t in value if _token_content(t) not in names]
                else:
                    named[key] = value
        special_names = {_token_content(v) for v in named.values() if v is not None}
        special_names |= {_token_content(t) for t in extra}

        # Added tokens, in id order, each asserted to land on its listed id.
        listed: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            for idx, value in config["added_tokens_decoder"].items():
                listed[int(idx)] = _as_added_token(value, special=False)
        else:
            if added_file.is_file():
                for content, idx in _read_json(added_file).items():
                    is_special = content in special_names
                    listed[int(idx)] = AddedToken(content, rstrip=False, lstrip=False,
                                                  normalized=not is_special, special=is_special)
            for entry in file_added:
                listed[int(entry["id"])] = _as_added_token(entry, special=False)
        present_content: set[str] = set()
        for idx in sorted(listed):
            token = listed[idx]
            if token.content in present_content:
                continue
            tok.add_tokens([token])
            got = tok.token_to_id(token.content)
            if got != idx:
                raise ValueError(
                    f"added token {token.content!r} is listed with id {idx} in {ckpt_dir} but the "
                    f"vocabulary gives it id {got}"
                )
            present_content.add(token.content)
        for value in [v for v in named.values() if v is not None] + extra:
            content = _token_content(value)
            if content not in present_content:
                token = _as_added_token(value, special=True)
                token.special = True
                tok.add_tokens([token])
                present_content.add(content)

        # transformers replaces the post-processor with its BOS/EOS template when the config
        # mentions add_bos_token/add_eos_token or there is none; GPT-2's default adds nothing.
        if "add_bos_token" in config or "add_eos_token" in config or tok.post_processor is None:
            tok.post_processor = _bos_eos_template(
                tok, _token_content(named.get("bos_token")) if config.get("add_bos_token") else None,
                _token_content(named.get("eos_token")) if config.get("add_eos_token") else None, ckpt_dir)

        max_len = config.get("model_max_length")
        if max_len is not None and int(max_len) > _HF_LARGE_INTEGER:
            max_len = None
        return cls(tok, model_max_length=int(max_len) if max_len is not None else None)

    def encode(self, text: str, truncation: bool = False) -> list[int]:
        """Ids as ``AutoTokenizer(...)(text, truncation=truncation).input_ids``."""
        if not truncation or self.model_max_length is None:
            return self.tokenizer.encode(text).ids
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        # Room is kept for the tokens the post-processor adds, as transformers does.
        enc.truncate(max(0, self.model_max_length - self.tokenizer.num_special_tokens_to_add(False)))
        return self.tokenizer.post_process(enc).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(_ids_list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------------------
# Front end
# --------------------------------------------------------------------------------------


class TextFrontEnd:
    """Text -> 1-D ``LongTensor`` of T3 text tokens, as the variant's ``generate()`` builds them."""

    def __init__(self, variant: str, tokenizer: EnglishTokenizer | MultilingualTokenizer | GPT2Tokenizer):
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant '{variant}'; expected one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.tokenizer = tokenizer

    def token_ids(self, text: str, language_id: str | None = None) -> list[int]:
        if self.variant == "multilingual":
            if not language_id:
                supported = ", ".join(SUPPORTED_LANGUAGES)
                raise ValueError(f"The multilingual model needs a language_id; supported languages: {supported}")
            language_id = _check_language_id(language_id)
        elif language_id and language_id.lower() != "en":
            raise ValueError(f"The {self.variant} model is English only; got language_id '{language_id}'")

        text = punc_norm(text, self.variant)
        if self.variant == "multilingual":
            ids = self.tokenizer.encode(text, language_id=language_id)
        elif isinstance(self.tokenizer, GPT2Tokenizer):
            # tts_turbo.generate() calls the tokenizer with truncation=True.
            ids = self.tokenizer.encode(text, truncation=True)
        else:
            ids = self.tokenizer.encode(text)

        if self.variant in ("chatterbox", "multilingual"):
            return [START_TEXT_TOKEN] + ids + [STOP_TEXT_TOKEN]
        return ids

    def to_tokens(self, text: str, language_id: str | None = None) -> torch.LongTensor:
        return torch.tensor(self.token_ids(text, language_id), dtype=torch.long)

    __call__ = to_tokens


def load_text_frontend(ckpt_dir: str | Path, variant: str) -> TextFrontEnd:
    """Build the front end of ``variant`` from the official tokenizer files in ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    if variant == "chatterbox":
        tokenizer = EnglishTokenizer(ckpt_dir / ENGLISH_TOKENIZER_FILE)
    elif variant == "multilingual":
        tokenizer = MultilingualTokenizer.from_dir(ckpt_dir)
    elif variant in ("turbo", "nano"):
        tokenizer = GPT2Tokenizer.from_dir(ckpt_dir)
    else:
        raise ValueError(f"Unknown variant '{variant}'; expected one of {', '.join(VARIANTS)}")
    return TextFrontEnd(variant, tokenizer)


def _char_tokenizer(specials: list[str], chars: str) -> Tokenizer:
    """A BPE with no merges over single characters: every known character is one token."""
    vocab = {t: i for i, t in enumerate(specials)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def dummy_text_frontend(variant: str) -> TextFrontEnd:
    """A character-level stand-in for the official tokenizer files, for dummy weights.

    Text goes through the variant's real normalisation and the same tokenizer classes; only
    the vocabulary is made up (letters, digits and punctuation are one token each), so token
    counts are realistic (~1 token per character, like the grapheme tokenizers).
    """
    import string

    chars = string.ascii_letters + string.digits + string.punctuation + "’“”"
    if variant == "chatterbox":
        specials = [EOT, UNK, SPACE] + [f"[pad{i}]" for i in range(3, START_TEXT_TOKEN)] + [SOT]
        tok = EnglishTokenizer.__new__(EnglishTokenizer)
        tok.path, tok.tokenizer = Path("<dummy>"), _char_tokenizer(specials, chars)
    elif variant == "multilingual":
        langs = [f"[{lid}]" for lid in SUPPORTED_LANGUAGES]
        specials = [EOT, UNK, SPACE] + langs + [f"[pad{i}]" for i in range(3 + len(langs), START_TEXT_TOKEN)] + [SOT]
        tok = MultilingualTokenizer.__new__(MultilingualTokenizer)
        tok.path, tok.tokenizer = Path("<dummy>"), _char_tokenizer(specials, chars)
        tok.cangjie_path, tok._cangjie, tok._cangjie_lock = Path("<dummy>"), None, threading.Lock()
    elif variant in ("turbo", "nano"):
        byte_chars = "".join(sorted(pre_tokenizers.ByteLevel.alphabet()))  # the alphabet comes unordered
        inner = _char_tokenizer([UNK, "<|endoftext|>"], byte_chars)
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        tok = GPT2Tokenizer(inner)
    else:
        raise ValueError(f"Unknown variant '{variant}'; expected one of {', '.join(VARIANTS)}")
    return TextFrontEnd(variant, tok)
