"""Statistics of a token dataset: is it worth merging tokens (run-length, BPE) before training on it?

``chatterbox-rt tokens analyze OUT_DIR [--json F] [--plot DIR]`` reads the parquet batches that
``chatterbox-rt tokens encode`` writes (one row per segment; S3 tokens in ``tokens``, SNAC scale K in
``tokens_scale_K``) and reports, per scale:

* frequency skew: the Gini coefficient of the code counts and the top-k coverage. The Gini is taken
  over the *whole codebook* (``vocab_size`` codes, unused codes count as zeros), because an unused
  code is capacity a merge can reclaim; ``gini_used`` (over the codes that occur) is reported too.
  Gini = (2 sum_i i x_(i)) / (n sum_i x_i) - (n + 1) / n over the ascending counts x_(1..n)
  (the mean-difference form; 0 for a uniform distribution, 1 - 1/n for a one-hot one);
* n-gram structure for n = 1..7: diversity (distinct / total n-grams) and the share of the 10 most
  frequent n-grams; n-grams never cross a segment boundary;
* the bigram transition matrix over the codes that occur (vocab_used x vocab_used): the fraction
  of it that is zero (``transition_sparsity``);
* repetition: the fraction of positions whose token equals its predecessor, and run lengths.

The recommendation uses the thresholds of the issue's tokenizer-analysis document: "good" when
gini > 0.8 and sparsity > 0.95, "poor" when gini < 0.6 and sparsity < 0.8, else "moderate".

Counting is exact, on one of two paths that give the same statistics to the last bit (the tests
compare them value for value):

* C++ (``chatterbox_rt._C``: ``ngram_counts``, csrc/cpu/ngram_counts.cpp, and ``token_stats`` for
  the code counts and runs), used where the extension is built and ``(max_n - 1) *
  bit_length(vocab_size) <= 95``. No sort: the windows are kept ordered by their n-gram one n at a
  time, each level induced from the previous one by a counting sort on the token *before* each
  window (bucket sizes known from the token counts, so one pass per level); a window alone in its
  n-gram group is not copied further but counted for every longer n its row allows. It reports the
  counts of the n-grams seen at least twice and the number seen once (``_ngram_summary``), which is
  all the statistics need.
* numpy (the fallback; ``CHATTERBOX_RT_KERNELS=native`` or ``ngram_path="numpy"`` forces it). A
  window's tokens are packed as digits of ``bit_length(vocab_size)`` bits (digit = token + 1, 0 =
  past the row's end) into int64 keys; after one sort, every n whose key is a prefix of the sorted
  key is read off the same array (n-grams with an equal n-prefix are adjacent). Three sorts cover
  n = 1..7 for streams of up to 2^24 tokens with 13-bit digits (``_ngram_counts_fast``): 3 digits
  with the window's position packed below them (so the sort also yields each window's 3-gram rank,
  without an argsort), rank3 + 3 digits (n = 4..6), and rank3(i), rank3(i + 3), digit 6 (n = 7).
  Longer streams and n > 7 take ``_ngram_counts_staged``: as many digits as fit in 63 bits per
  stage, the previous stage's dense rank as the prefix.

Throughput (``profiling/bench_tokens_analyze.py``, 10 M speech-like tokens, n = 1..7, one core of
the 2-core CI VM): the whole ``analyze`` call 0.67 s = 14.9 M tokens/s on the C++ path, 3.19 s on
numpy's (BENCHMARKS.md, issue 15).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

logger = logging.getLogger("chatterbox_rt")

CODEC_VOCAB = {"s3": 6561, "snac": 4096}  # S3 speech tokens (3^8 FSQ codes); SNAC codebook per scale
BATCH_GLOB = "tokens_batch_*.parquet"
S3_COLUMN = "tokens"
SNAC_COLUMN = re.compile(r"^tokens_scale_(\d+)$")
TOP_K = (10, 100, 1000)
NGRAM_TOP = 10  # ngram_top10_coverage: the share of the 10 most frequent n-grams
MAX_N = 7

# The document's thresholds (see the module docstring).
# Below this many tokens per vocabulary code a corpus is too small for the frequency statistics
# (a code seen once in 465 tokens says nothing about its rate), and the table says so.
MIN_TOKENS_PER_CODE = 10
GOOD_GINI, GOOD_SPARSITY = 0.8, 0.95
POOR_GINI, POOR_SPARSITY = 0.6, 0.8
RECOMMENDATIONS = ("poor", "moderate", "good")  # worst to best

Sequences = dict[str, list[np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_metadata(out_dir) -> dict:
    """``OUT_DIR/metadata.json`` as a dict ({} when there is none)."""
    path = Path(out_dir) / "metadata.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _split_list_array(chunk) -> list[np.ndarray]:
    """One numpy array per row of a pyarrow list array, without a Python loop over tokens."""
    values = chunk.flatten().to_numpy(zero_copy_only=False)  # flatten() honours the chunk's slice
    offsets = np.asarray(chunk.offsets)
    offsets = offsets - offsets[0]
    return np.split(values, offsets[1:-1])


def _scale_columns(names, path) -> dict[str, str]:
    """scale name -> token column, for the S3 or the SNAC layout."""
    if S3_COLUMN in names:
        return {"s3": S3_COLUMN}
    ks = sorted(int(m.group(1)) for n in names if (m := SNAC_COLUMN.match(n)))
    if not ks:
        raise ValueError(f"{path}: neither the S3 layout (a {S3_COLUMN!r} column) nor the SNAC layout "
                         f"('tokens_scale_0', ...); columns are {list(names)}")
    if ks != list(range(len(ks))):
        raise ValueError(f"{path}: SNAC scale columns must be tokens_scale_0..K without gaps, got {ks}")
    return {f"scale_{k}": f"tokens_scale_{k}" for k in ks}


def load_sequences(out_dir) -> Sequences:
    """Scale name ("s3", or "scale_0", "scale_1", ... for SNAC) -> one token array per row.

    Reads every ``tokens_batch_*.parquet`` of ``out_dir`` in sorted order, so rows keep the
    encoder's (file_path, segment) order and the scales of one row stay aligned.
    """
    import pyarrow.parquet as pq

    d = Path(out_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"token dataset directory {d} does not exist")
    files = sorted(d.glob(BATCH_GLOB))
    if not files:
        raise FileNotFoundError(f"no {BATCH_GLOB} files in {d} (write them with `chatterbox-rt tokens encode`)")
    out: Sequences = {}
    layout = None
    for f in files:
        columns = _scale_columns(pq.read_schema(f).names, f)
        if layout is None:
            layout = columns
            out = {name: [] for name in columns}
        elif columns != layout:
            raise ValueError(f"{f}: its token columns {sorted(columns.values())} differ from those of "
                             f"{files[0].name} {sorted(layout.values())} in {d}")
        table = pq.read_table(f, columns=list(columns.values()))
        for name, col in columns.items():
            for chunk in table.column(col).chunks:
                out[name].extend(_split_list_array(chunk))
    return out


def infer_codec(sequences: Sequences) -> str:
    names = list(sequences)
    if names == ["s3"]:
        return "s3"
    if names and all(SNAC_COLUMN.match("tokens_" + n) for n in names):
        return "snac"
    raise ValueError(f"scale names {names} are neither ['s3'] nor ['scale_0', 'scale_1', ...]")


_TOKEN_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64)  # kept as they come; others -> int64


def _flatten(seqs: list[np.ndarray], vocab_size: int, name: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """(tokens, per-row int64 lengths), after checking that every token is in [0, vocab_size).

    The tokens keep their integer dtype (the encoder's int16: a quarter of int64's memory traffic);
    other dtypes become int64."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.concatenate([np.asarray(s).ravel() for s in seqs]) if seqs else np.zeros(0, np.int64)
    if flat.dtype not in _TOKEN_DTYPES:
        flat = flat.astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"{name}: tokens must lie in [0, {vocab_size}), found [{flat.min()}, {flat.max()}]")
    return flat, lengths


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
class _Windows:
    """Packed digits of every window start of a flat token stream (see the module docstring).

    digit = token + 1; reading past the end of the window's row gives the sentinel 0. Only the
    last max_n - 1 windows of a row read past its end, so keys are built from plain shifted views
    and those few windows are fixed up apart.
    """

    def __init__(self, tok: np.ndarray, lengths: np.ndarray, vocab_size: int, max_n: int):
        self.n = tok.size
        self.bits = int(vocab_size).bit_length()  # digits in [1, vocab_size], 0 = past the end
        self.digit_mask = (1 << self.bits) - 1
        self.digits = np.zeros(self.n + max_n, np.int64)
        self.digits[:self.n] = tok
        self.digits[:self.n] += 1
        lengths = lengths[lengths > 0]
        self.lengths = lengths
        ends = np.cumsum(lengths)
        span = np.minimum(lengths, max_n - 1)
        end_of = np.repeat(ends, span)
        self.tail = end_of - 1 - (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
        self.tail_rem = end_of - self.tail  # tokens left in the row from the window's start, >= 1

    def key(self, m: int, k: int, base: Optional[np.ndarray] = None) -> np.ndarray:
        """base << (k * bits) | digits m .. m + k - 1 of every window, masked past the row's end."""
        n, bits = self.n, self.bits
        key = np.zeros(n, np.int64) if base is None else base << (k * bits)
        tail_key = key[self.tail]
        for d in range(k):
            shift = (k - 1 - d) * bits
            key |= self.digits[m + d:m + d + n] << shift
            tail_key |= np.where(self.tail_rem > m + d, self.digits[self.tail + m + d], 0) << shift
        key[self.tail] = tail_key
        return key

    def rem(self) -> np.ndarray:
        """Tokens left in the row from each window start (>= 1)."""
        return np.repeat(np.cumsum(self.lengths), self.lengths) - np.arange(self.n)


def _group_sizes(grams: np.ndarray, shift: int, digit_mask: Optional[int], brk: np.ndarray) -> np.ndarray:
    """Sizes of the runs of equal ``grams >> shift`` in the sorted ``grams``.

    With ``digit_mask``, runs whose last digit (``(gram >> shift) & digit_mask``) is the sentinel 0
    are windows that ran past their row's end and are dropped. Leaves the run starts in ``brk``.
    """
    n = grams.size
    if n == 0:
        return np.zeros(0, np.int64)
    brk[0] = True
    np.greater_equal(grams[1:] ^ grams[:-1], 1 << shift, out=brk[1:n])  # xor of keys < 2^63 is >= 0
    starts = np.flatnonzero(brk[:n])
    sizes = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=sizes[:-1])
    sizes[-1] = n - starts[-1]
    if digit_mask is not None:
        sizes = sizes[((grams[starts] >> shift) & digit_mask) != 0]
    return sizes


def _ranks(brk: np.ndarray, positions: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Per window: the dense rank of its group (brk marks group starts in sorted order); its bits."""
    ranks = np.empty(n, np.int64)
    ranks[positions] = np.cumsum(brk) - 1
    return ranks, max(int(brk.sum() - 1).bit_length(), 1)


FAST_MAX_N = 7


def _ngram_counts_fast(w: _Windows, max_n: int) -> dict[int, np.ndarray]:
    """Three sorts for n = 1..7, no argsort.

    1. (digits 0..2) << pos_bits | position: np.sort gives the order of the 3-grams with the keys,
       where an argsort would cost 5x as much (2.1 s against 0.4 s for 10 M keys on one core);
       n = 1..3, and every window's 3-gram rank.
    2. rank3 << 3 digits | digits 3..5: n = 4..6.
    3. rank3(i) << (rank_bits + digit bits) | rank3(i + 3) << digit bits | digit 6, over the windows
       that lie whole in their row: n = 7.
    """
    n, bits = w.n, w.bits
    pos_bits = max(int(n - 1).bit_length(), 1)
    brk = np.empty(n, bool)
    out: dict[int, np.ndarray] = {}
    k = min(3, max_n)
    key = (w.key(0, k) << pos_bits) | np.arange(n)
    key.sort()
    grams = key >> pos_bits
    for g in range(1, k + 1):
        out[g] = _group_sizes(grams, (k - g) * bits, w.digit_mask, brk)
    if max_n <= 3:
        return out
    rank3, rank_bits = _ranks(brk, key & ((1 << pos_bits) - 1), n)  # brk holds the 3-gram starts
    del key, grams
    k = min(3, max_n - 3)
    key = w.key(3, k, rank3)
    key.sort()
    for g in range(4, 4 + k):
        out[g] = _group_sizes(key, (3 + k - g) * bits, w.digit_mask, brk)
    if max_n <= 6:
        return out
    del key
    start = np.flatnonzero(w.rem() >= 7)  # whole windows only: no sentinel needed
    key = (rank3[start] << (rank_bits + bits)) | (rank3[start + 3] << bits) | w.digits[start + 6]
    key.sort()
    out[7] = _group_sizes(key, 0, None, brk)
    return out


def _ngram_counts_staged(w: _Windows, max_n: int) -> dict[int, np.ndarray]:
    """The general path (any max_n, any stream length): stages of as many digits as fit in 63
    bits; a stage's key is sorted with argsort, so its groups' dense ranks can prefix the next."""
    n, bits = w.n, w.bits
    brk = np.empty(n, bool)
    out: dict[int, np.ndarray] = {}
    prefix, prefix_bits, m = None, 0, 0
    while m < max_n:
        k = min(max_n - m, (63 - prefix_bits) // bits)
        assert k >= 1, "the prefix rank left no room for a digit"
        key = w.key(m, k, prefix)
        last = m + k >= max_n
        if last:
            key.sort()
            grams = key
        else:
            order = np.argsort(key)
            grams = key[order]
        for g in range(m + 1, m + k + 1):
            out[g] = _group_sizes(grams, (m + k - g) * bits, w.digit_mask, brk)
        if not last:
            prefix, prefix_bits = _ranks(brk, order, n)  # brk holds the (m + k)-gram starts
        m += k
    return out


# The C++ counter (csrc/cpu/ngram_counts.cpp: the windows kept sorted one n at a time by induced
# copying, no sort) gives the same counts; it carries the max_n - 1 tokens before each window in 95 bits.
CPP_CARRY_BITS = 95
NGRAM_PATHS = ("auto", "cpp", "numpy", "fast", "staged")
_fallback_logged: list = []


def _cpp_fits(n_tokens: int, vocab_size: int, max_n: int) -> bool:
    return (max_n - 1) * int(vocab_size).bit_length() <= CPP_CARRY_BITS and n_tokens < 2 ** 31


def _cpp_available() -> bool:
    """Whether "auto" uses the C++ kernels (ngram_counts, token_stats): where the extension is built.

    ``CHATTERBOX_RT_KERNELS`` (kernels/dispatch.py) overrides it: ``cpp`` requires the extension
    (KernelUnavailable if it is missing), any other backend means numpy (there is no other form)."""
    from ..kernels import _native, dispatch

    forced = dispatch.requested()
    if forced not in (None, "cpp"):
        return False
    if _native.ngram_counts_available():
        return True
    if forced == "cpp":
        raise dispatch.KernelUnavailable(f"{dispatch.ENV_VAR}=cpp but the native extension has no ngram_counts "
                                         "kernel (reinstall with `pip install -e . --no-build-isolation`)")
    if not _fallback_logged:
        _fallback_logged.append(True)
        logger.info("chatterbox_rt tokens analyze: the native token-statistics kernels are not built; using numpy")
    return False


def _ngram_summary_cpp(tok: np.ndarray, lengths: np.ndarray, vocab_size: int,
                       max_n: int) -> dict[int, tuple[np.ndarray, int]]:
    import torch

    from ..kernels import _native

    if tok.dtype == np.int8:
        tok = tok.astype(np.int16)
    elif tok.dtype == np.uint16:
        tok = tok.astype(np.int32)
    sizes, n_sizes, ones = _native.ngram_counts(torch.from_numpy(np.ascontiguousarray(tok)),
                                                torch.from_numpy(np.ascontiguousarray(lengths, np.int64)),
                                                int(vocab_size), max_n)
    n_sizes, ones = n_sizes.tolist(), ones.tolist()
    return {n: (sizes[n - 1, :n_sizes[n - 1]].numpy(), ones[n - 1]) for n in range(1, max_n + 1)}


def _ngram_summary(tok: np.ndarray, lengths: np.ndarray, vocab_size: int, max_n: int,
                   path: str = "auto") -> dict[int, tuple[np.ndarray, int]]:
    """n -> (the counts >= 2 of the distinct n-grams, how many n-grams occur once), n = 1..max_n.

    What the statistics need, without the millions of 1s: the C++ counter's output as it comes.
    ``path`` as for ``_ngram_counts_flat``; numpy's counts are split the same way."""
    if path not in NGRAM_PATHS:
        raise ValueError(f"path must be one of {NGRAM_PATHS}, got {path!r}")
    if tok.size == 0:
        return {n: (np.zeros(0, np.int64), 0) for n in range(1, max_n + 1)}
    if int(vocab_size).bit_length() > 20:
        raise ValueError(f"vocab_size {vocab_size} is too large to pack (at most 2^20 - 1 codes)")
    if path == "cpp" or (path == "auto" and _cpp_fits(tok.size, vocab_size, max_n) and _cpp_available()):
        if not _cpp_fits(tok.size, vocab_size, max_n):
            raise ValueError(f"the C++ n-gram counter carries at most {CPP_CARRY_BITS} bits of context: "
                             f"max_n {max_n} with vocab_size {vocab_size} needs {(max_n - 1) * int(vocab_size).bit_length()}")
        return _ngram_summary_cpp(tok, lengths, vocab_size, max_n)
    counts = _ngram_counts_flat(tok, lengths, vocab_size, max_n, "numpy" if path == "auto" else path)
    return {n: (c[c >= 2], int(np.count_nonzero(c == 1))) for n, c in counts.items()}


def _ngram_counts_flat(tok: np.ndarray, lengths: np.ndarray, vocab_size: int, max_n: int,
                       path: str = "auto") -> dict[int, np.ndarray]:
    """n -> the counts of the distinct n-grams (any order), n = 1..max_n, no n-gram spanning two rows.

    ``path``: "cpp" (the C++ counter: the counts >= 2 in lexicographic order of their n-grams, then the
    1s), "fast" (three sorts, n <= 7) or "staged" (numpy, any n), "numpy" (fast where its keys fit,
    else staged) or "auto" (cpp where it is built and fits, else numpy). All give the same multiset."""
    if path in ("auto", "cpp"):
        return {n: np.concatenate([big, np.ones(once, np.int64)])
                for n, (big, once) in _ngram_summary(tok, lengths, vocab_size, max_n, path).items()}
    if path not in NGRAM_PATHS:
        raise ValueError(f"path must be one of {NGRAM_PATHS}, got {path!r}")
    if tok.size == 0:
        return {g: np.zeros(0, np.int64) for g in range(1, max_n + 1)}
    w = _Windows(tok, lengths, vocab_size, max_n)
    if w.bits > 20:
        raise ValueError(f"vocab_size {vocab_size} is too large to pack (at most 2^20 - 1 codes)")
    pos_bits = max(int(tok.size - 1).bit_length(), 1)
    # The fast path's keys: 3 digits + position, rank3 + 3 digits, two ranks + a digit (a rank has at
    # most pos_bits bits): 63, 63 and 61 bits for 13-bit digits and 10 M tokens.
    b, p = w.bits, pos_bits
    fast = max(3 * b + p, 2 * p + b) <= 63 and max_n <= FAST_MAX_N
    if path == "fast" and not fast:
        raise ValueError("the fast n-gram path does not fit this stream in 63-bit keys")
    if path == "fast" or (path == "numpy" and fast):
        return _ngram_counts_fast(w, max_n)
    return _ngram_counts_staged(w, max_n)


def ngram_counts(sequences: list[np.ndarray], vocab_size: int, max_n: int = MAX_N) -> dict[int, np.ndarray]:
    """n -> counts of every distinct n-gram (descending), n = 1..max_n; n-grams stay within a row."""
    tok, lengths = _flatten(sequences, vocab_size)
    return {n: np.sort(c)[::-1] for n, c in _ngram_counts_flat(tok, lengths, vocab_size, max_n).items()}


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (see the module docstring); 0.0 for all zeros."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(2.0 * np.dot(np.arange(1, n + 1), x) / (n * total) - (n + 1) / n)


TOP_SHARE_CANDIDATES = 4096  # above this many candidates _top_share sums through a histogram instead


def _top_share(counts: np.ndarray, k: int, total: int, ones: int = 0) -> float:
    """Share of ``total`` held by the ``k`` largest of ``counts`` (all >= 1) and ``ones`` more 1s.

    A 1 is the smallest count, so the ``ones`` only matter when ``counts`` has fewer than ``k``. No
    np.partition (introselect crawls on millions of tied small counts: 1.1 s for the 10 M 7-gram
    counts of a 10 M-token stream): the k largest are among the counts >= t, t the smallest of the
    maxima of k blocks (those are k entries >= t), usually a few; with more candidates than
    ``TOP_SHARE_CANDIDATES`` (ties), their histogram gives the sum.
    """
    if total == 0 or counts.size + ones == 0:
        return 0.0
    if counts.size <= k:
        return float((int(counts.sum()) + min(ones, k - counts.size)) / total)
    whole = counts.size // k * k
    t = counts[:whole].reshape(k, -1).max(axis=1).min()
    cand = counts[counts >= t]
    if cand.size <= TOP_SHARE_CANDIDATES:
        return float(int(np.sort(cand)[-k:].sum()) / total)
    hist = np.bincount(cand)[::-1]  # hist[j] = how many n-grams occur max - j times
    value = np.arange(hist.size - 1, -1, -1)
    n_at_least = np.cumsum(hist)
    j = int(np.searchsorted(n_at_least, k))  # the k-th largest count is value[j]
    above = int(n_at_least[j - 1]) if j else 0
    top = int(np.dot(hist[:j], value[:j])) + (k - above) * int(value[j])
    return float(top / total)


def recommend(gini_: float, sparsity: float) -> str:
    """The document's rule: "good", "moderate" or "poor" for token merging."""
    if gini_ > GOOD_GINI and sparsity > GOOD_SPARSITY:
        return "good"
    if gini_ < POOR_GINI and sparsity < POOR_SPARSITY:
        return "poor"
    return "moderate"


@dataclass
class ScaleStats:
    """Statistics of one token stream (one codec scale). Ratios are 0.0 where nothing was counted."""
    name: str
    n_tokens: int
    n_sequences: int
    vocab_size: int
    unique: int  # codes that occur (vocab_used)
    gini: float  # over the whole codebook, unused codes included
    gini_used: float  # over the codes that occur
    top_k_coverage: dict[int, float]
    unique_bigrams: int
    bigram_diversity: float  # distinct / total bigrams
    ngram_unique: dict[int, int]
    ngram_diversity: dict[int, float]
    ngram_top10_coverage: dict[int, float]
    transition_sparsity: float  # zero fraction of the vocab_used x vocab_used bigram matrix
    repetition_rate: float  # positions equal to their predecessor / positions with a predecessor
    mean_run_length: float
    max_run_length: int
    recommendation: str
    rank_frequency: np.ndarray = field(repr=False, default=None)  # counts of the used codes, descending
    run_length_hist: np.ndarray = field(repr=False, default=None)  # [L] = number of runs of length L

    def to_dict(self, arrays: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("rank_frequency", "run_length_hist")}
        for k in ("top_k_coverage", "ngram_unique", "ngram_diversity", "ngram_top10_coverage"):
            d[k] = {str(n): v for n, v in d[k].items()}
        if arrays:
            d["rank_frequency"] = self.rank_frequency.tolist()
            d["run_length_hist"] = self.run_length_hist.tolist()
        return d


def _token_stats(tok: np.ndarray, lengths: np.ndarray, vocab_size: int, cpp: bool) -> tuple[np.ndarray, np.ndarray]:
    """(code counts [vocab_size], run-length histogram: [L] = runs of L equal tokens within a row),
    from the C++ kernel (one pass) or numpy."""
    if cpp:
        import torch

        from ..kernels import _native

        if tok.dtype == np.int8:
            tok = tok.astype(np.int16)
        elif tok.dtype == np.uint16:
            tok = tok.astype(np.int32)
        longest = int(lengths.max()) if lengths.size else 0
        code_counts, run_hist = _native.token_stats(torch.from_numpy(np.ascontiguousarray(tok)),
                                                    torch.from_numpy(np.ascontiguousarray(lengths, np.int64)),
                                                    int(vocab_size), longest)
        return code_counts.numpy(), run_hist.numpy()
    code_counts = np.bincount(tok, minlength=vocab_size)
    # Runs: a new run starts at every row start and wherever the token changes.
    new_run = np.ones(tok.size, bool)
    new_run[1:] = tok[1:] != tok[:-1]
    new_run[np.cumsum(lengths[lengths > 0])[:-1]] = True
    run_len = np.diff(np.flatnonzero(new_run), append=tok.size)
    return code_counts, np.bincount(run_len, minlength=1)


def scale_stats(name: str, sequences: list[np.ndarray], vocab_size: int, max_n: int = MAX_N,
                ngram_path: str = "auto") -> ScaleStats:
    """The statistics of one scale. ``ngram_path`` picks the counters (``_ngram_counts_flat``):
    "auto" and "cpp" use the C++ kernels for the token counts and runs too, the numpy paths numpy."""
    tok, lengths = _flatten(sequences, vocab_size, name)
    n_tok, n_seq = int(tok.size), len(sequences)
    if ngram_path not in NGRAM_PATHS:
        raise ValueError(f"ngram_path must be one of {NGRAM_PATHS}, got {ngram_path!r}")
    cpp = ngram_path == "cpp" or (ngram_path == "auto" and _cpp_available())
    code_counts, run_hist = _token_stats(tok, lengths, vocab_size, cpp)
    used = int(np.count_nonzero(code_counts))
    rank_freq = np.sort(code_counts[code_counts > 0])[::-1]
    cum = np.cumsum(rank_freq)
    top_k = {k: float(cum[min(k, used) - 1] / n_tok) if used else 0.0 for k in TOP_K}

    grams = _ngram_summary(tok, lengths, vocab_size, max(max_n, 2), ngram_path)
    totals = {n: int(np.maximum(lengths - n + 1, 0).sum()) for n in grams}
    uniq = {n: int(big.size) + once for n, (big, once) in grams.items()}
    diversity = {n: uniq[n] / totals[n] if totals[n] else 0.0 for n in grams}
    top10 = {n: _top_share(big, NGRAM_TOP, totals[n], once) for n, (big, once) in grams.items()}
    sparsity = 1.0 - uniq[2] / used ** 2 if used else 0.0

    n_runs = int(run_hist.sum())
    longest_run = int(np.flatnonzero(run_hist)[-1]) if n_runs else 0
    with_pred = n_tok - int(np.count_nonzero(lengths))
    g = gini(code_counts)
    return ScaleStats(
        name=name, n_tokens=n_tok, n_sequences=n_seq, vocab_size=int(vocab_size), unique=used,
        gini=g, gini_used=gini(rank_freq), top_k_coverage=top_k,
        unique_bigrams=uniq[2], bigram_diversity=diversity[2],
        ngram_unique={n: uniq[n] for n in range(1, max_n + 1)},
        ngram_diversity={n: diversity[n] for n in range(1, max_n + 1)},
        ngram_top10_coverage={n: top10[n] for n in range(1, max_n + 1)},
        transition_sparsity=sparsity,
        repetition_rate=(n_tok - n_runs) / with_pred if with_pred else 0.0,
        mean_run_length=n_tok / n_runs if n_runs else 0.0,  # the runs cover every token once
        max_run_length=longest_run,
        recommendation=recommend(g, sparsity),
        rank_frequency=rank_freq, run_length_hist=run_hist[:longest_run + 1].copy())


@dataclass
class TokenAnalysis:
    """Per-scale statistics of a token dataset.

    ``recommendation`` is the best of the scales' recommendations: the merge methods work on one
    scale at a time, so merging is worth it when it pays on any scale (S3 has only one).
    """
    codec: str
    scales: dict[str, ScaleStats]
    recommendation: str
    max_n: int = MAX_N

    def to_dict(self, arrays: bool = False) -> dict:
        return {"codec": self.codec, "recommendation": self.recommendation, "max_n": self.max_n,
                "scales": {k: s.to_dict(arrays) for k, s in self.scales.items()}}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def format_table(self) -> str:
        names = list(self.scales)
        rows: list[tuple[str, list[str]]] = []

        def row(label, fn):
            rows.append((label, [fn(self.scales[n]) for n in names]))

        row("tokens", lambda s: f"{s.n_tokens:,}")
        row("sequences", lambda s: f"{s.n_sequences:,}")
        row("codes used / vocab", lambda s: f"{s.unique} / {s.vocab_size}")
        row("gini (codebook)", lambda s: f"{s.gini:.3f}")
        row("gini (used codes)", lambda s: f"{s.gini_used:.3f}")
        for k in TOP_K:
            row(f"top-{k} coverage", lambda s, k=k: f"{s.top_k_coverage[k]:.3f}")
        row("unique bigrams", lambda s: f"{s.unique_bigrams:,}")
        row("bigram diversity", lambda s: f"{s.bigram_diversity:.3f}")
        row("transition sparsity", lambda s: f"{s.transition_sparsity:.4f}")
        for n in range(1, self.max_n + 1):
            row(f"{n}-gram diversity / top-10", lambda s, n=n: f"{s.ngram_diversity[n]:.3f} / {s.ngram_top10_coverage[n]:.3f}")
        row("repetition rate", lambda s: f"{s.repetition_rate:.3f}")
        row("run length mean / max", lambda s: f"{s.mean_run_length:.2f} / {s.max_run_length}")
        row("recommendation", lambda s: s.recommendation)
        header = ["metric"] + names
        widths = [max(len(header[0]), *(len(r[0]) for r in rows))]
        widths += [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]

        def line(cells):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

        out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line([label] + cells) for label, cells in rows]
        out.append(f"\ncodec {self.codec}: overall recommendation {self.recommendation} "
                   f"(good: gini > {GOOD_GINI} and sparsity > {GOOD_SPARSITY}; "
                   f"poor: gini < {POOR_GINI} and sparsity < {POOR_SPARSITY})")
        small = [s.name for s in self.scales.values() if s.n_tokens < MIN_TOKENS_PER_CODE * s.vocab_size]
        if small:
            out.append(f"note: {', '.join(small)} has fewer than {MIN_TOKENS_PER_CODE} tokens per code of the "
                       "vocabulary: most codes cannot occur in so few tokens, so the codebook Gini and the "
                       "sparsity read high whatever the codec; the recommendation needs a larger corpus")
        return "\n".join(out)


def analyze(source: Union[str, Path, Sequences], *, vocab_size: Optional[int] = None,
            codec: Optional[str] = None, max_n: int = MAX_N, ngram_path: str = "auto") -> TokenAnalysis:
    """Statistics of every scale of ``source`` (an OUT_DIR or a dict as from ``load_sequences``).

    ``codec`` and ``vocab_size`` default to metadata.json's, then to the codec's codebook size.
    ``ngram_path`` picks the n-gram counter ("auto": C++ where built, else numpy; see
    ``_ngram_counts_flat``); every path gives the same statistics.
    """
    if not 1 <= max_n <= 16:
        raise ValueError(f"max_n must be in [1, 16], got {max_n}")
    meta = {}
    if isinstance(source, (str, Path)):
        meta = read_metadata(source)
        source = load_sequences(source)
    codec = codec or meta.get("codec") or infer_codec(source)
    if codec not in CODEC_VOCAB:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODEC_VOCAB)}")
    vocab_size = int(vocab_size or meta.get("vocab_size") or CODEC_VOCAB[codec])
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    scales = {name: scale_stats(name, seqs, vocab_size, max_n, ngram_path) for name, seqs in source.items()}
    best = max((s.recommendation for s in scales.values()), key=RECOMMENDATIONS.index, default="poor")
    return TokenAnalysis(codec=codec, scales=scales, recommendation=best, max_n=max_n)


def plot(analysis: TokenAnalysis, out_dir) -> list[Path]:
    """Per scale, ``<scale>_rank_frequency.png`` (log-log) and ``<scale>_run_lengths.png``."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting token statistics needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, s in analysis.scales.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        if s.rank_frequency.size:
            ax.loglog(np.arange(1, s.rank_frequency.size + 1), s.rank_frequency, ".", markersize=2)
        ax.set(xlabel="rank", ylabel="count", title=f"{analysis.codec} {name}: rank-frequency (gini {s.gini:.3f})")
        ax.grid(True, which="both", alpha=0.3)
        path = out / f"{name}_rank_frequency.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(6, 4))
        lengths = np.flatnonzero(s.run_length_hist)
        ax.bar(lengths, s.run_length_hist[lengths], width=1.0)
        ax.set_yscale("log")
        ax.set(xlabel="run length (tokens)", ylabel="runs",
               title=f"{analysis.codec} {name}: run lengths (mean {s.mean_run_length:.2f}, max {s.max_run_length})")
        path = out / f"{name}_run_lengths.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
