"""Weight-free token merging for a token dataset: run-length symbols, thresholded BPE, cross-scale tuples.

``chatterbox-rt tokens bpe OUT_DIR --method rl|bpe|rl-bpe|cross-scale [--merges N] [--min-freq N]
--save RULES.json`` learns merge rules on part of a token dataset and reports how much they shorten
the rest. Every encoding is exact: ``undo_rules(r, apply_rules(r, x))`` returns ``x`` for any tokens in
the base vocabulary, seen in training or not. Symbols below ``vocab_size`` are the codec's tokens;
learned symbols are numbered from ``vocab_size`` up.

* ``rl``: the most frequent (token, run length) pairs, L >= 2, become symbols. A run is cut greedily
  into the longest learned lengths of its token (as many of each as fit); what is left of it, and
  any run whose token has no learned length, stays as plain tokens.
* ``bpe``: Sennrich et al. 2016 byte-pair encoding over token ids: merge the most frequent adjacent
  pair (ties: the smallest pair ids) while it occurs at least ``min_freq`` times, up to ``merges``
  merges; pairs never straddle two rows. Encoding applies the merges in learned order, each
  left to right without overlaps, as in the reference implementation.
* ``rl-bpe``: ``rl``, then ``bpe`` over its output (``merges`` bounds each stage).
* ``cross-scale`` (multi-scale codecs such as SNAC): scale k token i covers scale k + 1 tokens
  2i, 2i + 1, so a *frame* is one coarse token with its 2, 4, ... aligned finer tokens
  (1 + 2 + 4 = 7 tokens for 3 scales), ordered coarse to fine. The most frequent frames become
  symbols. A row encodes as a ``ScaleCode``: one symbol per frame, either a learned frame symbol
  (>= vocab_size) or the frame's tokens as they are (frame-width tokens, all < vocab_size, so a
  decoder reads a token as the start of a raw frame), then per scale the tokens after the last
  whole frame (``tails``), unchanged.

Learning and encoding are vectorised over the concatenated rows; BPE keeps its pair counts up to
date incrementally (only pairs next to a merged occurrence change), so a merge costs one scan.
"""
from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .analyze import CODEC_VOCAB, Sequences, infer_codec, load_sequences, read_metadata

METHODS = ("rl", "bpe", "rl-bpe", "cross-scale")
RULES_FORMAT, RULES_VERSION = "chatterbox-rt-merge-rules", 1
SCALE_RATIO = 2  # tokens of scale k + 1 per token of scale k (SNAC's strides halve per scale)
MAX_LEARN_TOKENS = 2_000_000  # evaluate(): tokens of the training rows BPE learns from


def frame_width(n_scales: int) -> int:
    return sum(SCALE_RATIO ** k for k in range(n_scales))


def _as_table(x, width: Optional[int], what: str) -> np.ndarray:
    a = np.asarray(x if x is not None else [], dtype=np.int64)
    if a.size == 0:
        return np.zeros((0, width or 0), np.int64)
    if a.ndim != 2 or (width is not None and a.shape[1] != width):
        raise ValueError(f"{what} must be a list of {width}-element rows, got shape {a.shape}")
    return a


@dataclass
class MergeRules:
    """Learned merge tables. Symbol ids: tokens [0, V); ``runs`` [V, V + R); ``pairs``
    [V + R, V + R + M); ``tuples`` [V, V + T) (cross-scale only)."""
    method: str
    vocab_size: int
    runs: np.ndarray = None  # [R, 2] (token, run length)
    pairs: np.ndarray = None  # [M, 2] (left, right) symbol ids, in merge order
    tuples: np.ndarray = None  # [T, frame_width] frame tokens, coarse to fine
    scales: tuple = ()  # cross-scale: the scale names, coarse to fine
    scale: Optional[str] = None  # 1-D methods: the scale the rules were learned on
    _expansion: tuple = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; expected one of {', '.join(METHODS)}")
        self.vocab_size = int(self.vocab_size)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        self.scales = tuple(self.scales)
        self.runs = _as_table(self.runs, 2, "runs")
        self.pairs = _as_table(self.pairs, 2, "pairs")
        width = frame_width(len(self.scales)) if self.scales else None
        self.tuples = _as_table(self.tuples, width, "tuples")
        v = self.vocab_size
        uses = {"rl": ("runs",), "bpe": ("pairs",), "rl-bpe": ("runs", "pairs"), "cross-scale": ("tuples",)}[self.method]
        for name in ("runs", "pairs", "tuples"):
            if name not in uses and len(getattr(self, name)):
                raise ValueError(f"method {self.method!r} has no {name} table")
        if self.method == "cross-scale" and len(self.scales) < 2:
            raise ValueError("cross-scale rules need the names of at least two scales")
        r = self.runs
        if len(r) and ((r[:, 0] < 0).any() or (r[:, 0] >= v).any() or (r[:, 1] < 2).any()):
            raise ValueError(f"runs must be (token in [0, {v}), length >= 2) pairs")
        if len(np.unique(r, axis=0)) != len(r):
            raise ValueError("runs holds a (token, length) pair twice")
        p = self.pairs
        limit = v + len(r) + np.arange(len(p))  # a merge may only use symbols that exist before it
        if len(p) and ((p < 0).any() or (p[:, 0] >= limit).any() or (p[:, 1] >= limit).any()):
            raise ValueError("pairs must only merge tokens and symbols of earlier rules")
        t = self.tuples
        if len(t) and ((t < 0).any() or (t >= v).any()):
            raise ValueError(f"tuples must hold tokens in [0, {v})")
        if len(np.unique(t, axis=0)) != len(t):
            raise ValueError("tuples holds a frame twice")

    @property
    def n_rules(self) -> int:
        return len(self.runs) + len(self.pairs) + len(self.tuples)

    @property
    def new_vocab_size(self) -> int:
        return self.vocab_size + self.n_rules

    def to_dict(self) -> dict:
        return {"format": RULES_FORMAT, "version": RULES_VERSION, "method": self.method,
                "vocab_size": self.vocab_size, "scale": self.scale, "scales": list(self.scales),
                "runs": self.runs.tolist(), "pairs": self.pairs.tolist(), "tuples": self.tuples.tolist()}

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "MergeRules":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read merge rules ({e})") from None
        if not isinstance(d, dict) or d.get("format") != RULES_FORMAT:
            raise ValueError(f"{path}: not a merge-rules file (no \"format\": \"{RULES_FORMAT}\")")
        if d.get("version") != RULES_VERSION:
            raise ValueError(f"{path}: merge-rules version {d.get('version')!r}, this reader knows {RULES_VERSION}")
        try:
            return cls(method=d["method"], vocab_size=d["vocab_size"], runs=d.get("runs"), pairs=d.get("pairs"),
                       tuples=d.get("tuples"), scales=d.get("scales") or (), scale=d.get("scale"))
        except KeyError as e:
            raise ValueError(f"{path}: merge rules lack the field {e}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def expansion(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [new_vocab_size + 1], values): symbol s decodes to values[offsets[s]:offsets[s + 1]]."""
        if self._expansion is None:
            v = self.vocab_size
            learned: list[np.ndarray] = []  # learned[s - v]: the tokens of symbol s >= v

            def tokens_of(s: int) -> np.ndarray:
                return np.array([s]) if s < v else learned[s - v]

            learned += [np.full(int(length), tok) for tok, length in self.runs]
            learned += list(self.tuples)
            for a, b in self.pairs.tolist():
                learned.append(np.concatenate([tokens_of(a), tokens_of(b)]))
            lengths = np.fromiter((q.size for q in learned), np.int64, count=len(learned))
            offsets = np.concatenate([np.arange(v + 1), v + np.cumsum(lengths)])
            values = np.concatenate([np.arange(v)] + learned).astype(np.int64)
            self._expansion = (offsets, values)
        return self._expansion


@dataclass
class ScaleCode:
    """One multi-scale row encoded by cross-scale rules (see the module docstring)."""
    symbols: np.ndarray
    tails: tuple

    def __len__(self) -> int:
        return int(self.symbols.size + sum(t.size for t in self.tails))


# ---------------------------------------------------------------------------------------------
# Helpers over concatenated rows
# ---------------------------------------------------------------------------------------------
def _check_method(method: str, merges: int = 1, min_freq: int = 1) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    if int(merges) < 1:
        raise ValueError(f"merges must be >= 1, got {merges}")
    if int(min_freq) < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")


def _flat(seqs: list, limit: int, what: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    arrays = [np.asarray(s, dtype=np.int64).ravel() for s in seqs]
    lengths = np.fromiter((a.size for a in arrays), np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= limit):
        raise ValueError(f"{what} must lie in [0, {limit}), found values in [{flat.min()}, {flat.max()}]")
    return flat, lengths


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _ragged_gather(symbols: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """concatenate(values[offsets[s]:offsets[s + 1]] for s in symbols), vectorised."""
    lens = offsets[symbols + 1] - offsets[symbols]
    out_start = np.cumsum(lens) - lens
    idx = np.repeat(offsets[symbols] - out_start, lens) + np.arange(int(lens.sum()))
    return values[idx]


def _runs(flat: np.ndarray, lengths: np.ndarray):
    """Maximal runs within rows: (token, length, row) per run."""
    new = np.ones(flat.size, bool)
    new[1:] = flat[1:] != flat[:-1]
    new[np.cumsum(lengths[lengths > 0])[:-1]] = True
    starts = np.flatnonzero(new)
    run_len = np.diff(starts, append=flat.size)
    row = np.repeat(np.arange(len(lengths)), lengths)[starts]
    return flat[starts], run_len, row


def _non_overlapping(p: np.ndarray) -> np.ndarray:
    """Of match positions of a pair (a, a) (p, p + 1, ... overlap), keep every other from the left."""
    if p.size < 2:
        return p
    i = np.arange(p.size)
    chain_start = np.maximum.accumulate(np.where(np.diff(p, prepend=p[0] - 2) != 1, i, 0))
    return p[(i - chain_start) % 2 == 0]


def _pair_positions(x: np.ndarray, start: np.ndarray, a: int, b: int) -> np.ndarray:
    """Left positions of the non-overlapping (a, b) pairs within rows, leftmost first."""
    p = np.flatnonzero(x[:-1] == a)
    p = p[(x[p + 1] == b) & ~start[p + 1]]
    return _non_overlapping(p) if a == b else p


# ---------------------------------------------------------------------------------------------
# rl
# ---------------------------------------------------------------------------------------------
def _learn_rl(flat, lengths, merges, min_freq) -> np.ndarray:
    tok, run_len, _ = _runs(flat, lengths)
    keep = run_len >= 2
    if not keep.any():
        return np.zeros((0, 2), np.int64)
    cap = int(run_len.max()) + 1
    keys, counts = np.unique(tok[keep] * cap + run_len[keep], return_counts=True)
    order = np.lexsort((keys, -counts))  # most frequent first; ties by (token, length)
    order = order[counts[order] >= min_freq][:merges]
    return np.stack([keys[order] // cap, keys[order] % cap], axis=1)


def _apply_rl(flat, lengths, runs: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    tok, run_len, row = _runs(flat, lengths)
    if len(runs) == 0 or tok.size == 0:
        return flat.copy(), lengths.copy()
    cap = int(max(run_len.max(), runs[:, 1].max())) + 1
    table_keys = runs[:, 0] * cap + runs[:, 1]
    order = np.argsort(table_keys)
    table_keys, table_tok, table_len = table_keys[order], runs[order, 0], runs[order, 1]
    table_sym = vocab_size + order
    rem = run_len.copy()
    pending = np.flatnonzero(rem >= 2)
    piece_run, piece_sym, piece_cnt = [], [], []
    while pending.size:
        # Greedy: the longest learned length <= what is left of the run, as many times as it fits.
        j = np.searchsorted(table_keys, tok[pending] * cap + rem[pending], side="right") - 1
        ok = j >= 0
        ok[ok] = table_tok[j[ok]] == tok[pending[ok]]
        pending, j = pending[ok], j[ok]
        cnt = rem[pending] // table_len[j]
        rem[pending] -= cnt * table_len[j]
        piece_run.append(pending)
        piece_sym.append(table_sym[j])
        piece_cnt.append(cnt)
        pending = pending[rem[pending] >= 2]
    if piece_run:
        run_i = np.concatenate(piece_run)
        order = np.argsort(run_i, kind="stable")  # a run's pieces in the order they were cut
        run_i, sym, cnt = run_i[order], np.concatenate(piece_sym)[order], np.concatenate(piece_cnt)[order]
    else:
        run_i = sym = cnt = np.zeros(0, np.int64)
    n_pieces = np.bincount(run_i, weights=cnt, minlength=tok.size).astype(np.int64)
    out_len = n_pieces + rem
    run_off = np.cumsum(out_len) - out_len
    out = np.empty(int(out_len.sum()), np.int64)
    # Pieces: their place within the run is the count of the run's earlier pieces.
    excl = np.cumsum(cnt) - cnt
    first = np.searchsorted(run_i, run_i)  # index of the run's first piece (run_i is sorted)
    within = excl - excl[first]
    total = int(cnt.sum())
    out[np.repeat(run_off[run_i] + within - excl, cnt) + np.arange(total)] = np.repeat(sym, cnt)
    # What is left of each run, as plain tokens, after its pieces.
    left = int(rem.sum())
    lstart = run_off + n_pieces
    out[np.repeat(lstart - (np.cumsum(rem) - rem), rem) + np.arange(left)] = np.repeat(tok, rem)
    return out, np.bincount(row, weights=out_len, minlength=len(lengths)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# bpe
# ---------------------------------------------------------------------------------------------
def _row_starts(lengths: np.ndarray, n: int) -> np.ndarray:
    start = np.zeros(n + 1, bool)  # one spare: start[p + 1] is always addressable
    start[np.cumsum(lengths)[:-1][lengths[1:] > 0] if len(lengths) else []] = True
    start[0] = True
    return start


def _merge_at(x, start, p, z):
    """x with the pairs at left positions p replaced by symbol z (and start kept aligned)."""
    x[p] = z
    keep = np.ones(x.size, bool)
    keep[p + 1] = False
    return x[keep], start[np.append(keep, True)]


def _learn_bpe(flat, lengths, base, merges, min_freq) -> np.ndarray:
    x = flat.copy()
    start = _row_starts(lengths, x.size)
    cap = base + merges  # every symbol id stays below cap, so a * cap + b names a pair exactly
    if x.size < 2:
        return np.zeros((0, 2), np.int64)
    keys = x[:-1] * cap + x[1:]
    keys, counts = np.unique(keys[~start[1:x.size]], return_counts=True)
    count = dict(zip(keys.tolist(), counts.tolist()))
    heap = [(-c, k) for k, c in count.items()]
    heapq.heapify(heap)
    pairs = []
    for j in range(merges):
        while heap and count.get(heap[0][1], 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale: the pair's count changed since this entry was pushed
        if not heap or -heap[0][0] < min_freq:
            break
        a, b = divmod(heap[0][1], cap)
        p = _pair_positions(x, start, a, b)
        # The pairs touching a merged occurrence, before (removed) and after (added) the merge.
        old = np.unique(np.concatenate([p - 1, p, p + 1]))
        old = old[(old >= 0) & (old < x.size - 1)]
        old = old[~start[old + 1]]
        removed = x[old] * cap + x[old + 1]
        x, start = _merge_at(x, start, p, base + j)
        q = p - np.arange(p.size)  # where the merged symbols are now
        new = np.unique(np.concatenate([q - 1, q]))
        new = new[(new >= 0) & (new < x.size - 1)]
        new = new[~start[new + 1]]
        added = x[new] * cap + x[new + 1]
        changed = set()
        for keys_, sign in ((removed, -1), (added, 1)):
            uk, uc = np.unique(keys_, return_counts=True)
            for k, c in zip(uk.tolist(), uc.tolist()):
                count[k] = count.get(k, 0) + sign * c
                changed.add(k)
        for k in changed:
            c = count[k]
            if c > 0:
                heapq.heappush(heap, (-c, k))
            else:
                del count[k]
        pairs.append((a, b))
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def _apply_bpe(flat, lengths, pairs: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    x = flat.copy()
    start = _row_starts(lengths, x.size)
    present = np.bincount(x, minlength=base + len(pairs))
    for j, (a, b) in enumerate(pairs.tolist()):
        if not present[a] or not present[b]:
            continue  # cheap skip: a merge of a symbol that is absent cannot apply
        p = _pair_positions(x, start, a, b)
        if p.size:
            x, start = _merge_at(x, start, p, base + j)
            present[a] -= p.size
            present[b] -= p.size
            present[base + j] += p.size
    out_len = np.zeros(len(lengths), np.int64)
    nonempty = lengths > 0
    out_len[nonempty] = np.diff(np.flatnonzero(start[:x.size]), append=x.size)
    return x, out_len


# ---------------------------------------------------------------------------------------------
# cross-scale
# ---------------------------------------------------------------------------------------------
def _frames(rows: list[list[np.ndarray]], vocab_size: int):
    """rows[i][k]: scale k of row i -> (frames [F, W], frames per row, tails per row)."""
    frames, n_frames, tails = [], [], []
    for scales in rows:
        arrs = [np.asarray(s, dtype=np.int64).ravel() for s in scales]
        for a in arrs:
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                raise ValueError(f"tokens must lie in [0, {vocab_size}), found [{a.min()}, {a.max()}]")
        f = min(a.size // SCALE_RATIO ** k for k, a in enumerate(arrs))
        frames.append(np.concatenate([a[:f * SCALE_RATIO ** k].reshape(f, SCALE_RATIO ** k) for k, a in enumerate(arrs)], axis=1))
        n_frames.append(f)
        tails.append(tuple(a[f * SCALE_RATIO ** k:].copy() for k, a in enumerate(arrs)))
    width = frame_width(len(rows[0])) if rows else 0
    all_frames = np.concatenate(frames) if frames else np.zeros((0, width), np.int64)
    return all_frames, np.asarray(n_frames, np.int64), tails


def _group_rows(m: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of the int matrix m: (group id per row, index of each group's first row)."""
    per_word = 63 // bits
    words = []
    for c in range(0, m.shape[1], per_word):
        w = np.zeros(m.shape[0], np.int64)
        for col in range(c, min(c + per_word, m.shape[1])):
            w = (w << bits) | m[:, col]
        words.append(w)
    order = np.lexsort(words[::-1])  # stable: a group's rows keep their order
    new = np.zeros(m.shape[0], bool)
    if m.shape[0]:
        new[0] = True
        for w in words:
            new[1:] |= w[order][1:] != w[order][:-1]
    gid = np.empty(m.shape[0], np.int64)
    gid[order] = np.cumsum(new) - 1
    return gid, order[new]


def _scale_rows(seqs: Sequences, scales: tuple) -> list[list[np.ndarray]]:
    missing = [s for s in scales if s not in seqs]
    if missing:
        raise ValueError(f"cross-scale rules need the scales {list(scales)}; missing {missing}")
    n = {len(seqs[s]) for s in scales}
    if len(n) != 1:
        raise ValueError(f"the scales hold different numbers of rows: { {s: len(seqs[s]) for s in scales} }")
    return [list(r) for r in zip(*(seqs[s] for s in scales))]


def _learn_cross(rows, vocab_size, merges, min_freq) -> np.ndarray:
    frames, _, _ = _frames(rows, vocab_size)
    if not len(frames):
        return np.zeros((0, frames.shape[1]), np.int64)
    gid, first = _group_rows(frames, int(vocab_size - 1).bit_length() or 1)
    counts = np.bincount(gid)
    order = np.lexsort((first, -counts))  # most frequent first; ties by first occurrence
    order = order[counts[order] >= min_freq][:merges]
    return frames[first[order]]


def _apply_cross(rules: MergeRules, rows) -> list[ScaleCode]:
    frames, n_frames, tails = _frames(rows, rules.vocab_size)
    t, width = len(rules.tuples), frames.shape[1]
    if t:
        gid, _ = _group_rows(np.concatenate([rules.tuples, frames]), int(rules.vocab_size - 1).bit_length() or 1)
        table_of = np.full(int(gid.max()) + 1, -1)
        table_of[gid[:t]] = np.arange(t)
        code = table_of[gid[t:]]
    else:
        code = np.full(len(frames), -1)
    known = code >= 0
    lens = np.where(known, 1, width)
    at = np.cumsum(lens) - lens
    out = np.empty(int(lens.sum()), np.int64)
    out[at[known]] = rules.vocab_size + code[known]
    raw = ~known
    out[(at[raw][:, None] + np.arange(width)).ravel()] = frames[raw].ravel()
    row_len = np.bincount(np.repeat(np.arange(len(rows)), n_frames), weights=lens, minlength=len(rows)).astype(np.int64)
    return [ScaleCode(s, tl) for s, tl in zip(_split(out, row_len), tails)]


def _undo_cross(rules: MergeRules, code: ScaleCode) -> list[np.ndarray]:
    offsets, values = rules.expansion()
    sym = np.asarray(code.symbols, dtype=np.int64)
    if sym.size and (sym.min() < 0 or sym.max() >= rules.new_vocab_size):
        raise ValueError(f"symbols must lie in [0, {rules.new_vocab_size})")
    width = frame_width(len(rules.scales))
    flat = _ragged_gather(sym, offsets, values)
    if flat.size % width:
        raise ValueError(f"a cross-scale code must decode to whole {width}-token frames, got {flat.size} tokens")
    frames = flat.reshape(-1, width)
    out, col = [], 0
    for k, tail in enumerate(code.tails):
        w = SCALE_RATIO ** k
        out.append(np.concatenate([frames[:, col:col + w].ravel(), np.asarray(tail, np.int64)]))
        col += w
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def learn_rules(sequences, method: str, *, vocab_size: int, merges: int = 1000, min_freq: int = 2,
                scale: Optional[str] = None) -> MergeRules:
    """Learn ``method``'s rules: ``sequences`` is a list of token arrays (rl, bpe, rl-bpe) or, for
    cross-scale, a dict scale name -> list of arrays with the scales coarse to fine."""
    _check_method(method, merges, min_freq)
    merges, min_freq = int(merges), int(min_freq)
    if method == "cross-scale":
        if not isinstance(sequences, dict):
            raise ValueError("cross-scale needs a dict of scales (scale name -> rows), e.g. load_sequences() of a snac dataset")
        scales = tuple(sequences)
        if len(scales) < 2:
            raise ValueError(f"cross-scale needs a multi-scale codec such as snac; got the scales {list(scales)}")
        tuples = _learn_cross(_scale_rows(sequences, scales), vocab_size, merges, min_freq)
        return MergeRules(method, vocab_size, tuples=tuples, scales=scales)
    if isinstance(sequences, dict):
        raise ValueError(f"{method} learns on one scale: pass a list of arrays (e.g. load_sequences(d)['s3'])")
    flat, lengths = _flat(sequences, vocab_size)
    runs = pairs = None
    if method in ("rl", "rl-bpe"):
        runs = _learn_rl(flat, lengths, merges, min_freq)
        if method == "rl-bpe":
            flat, lengths = _apply_rl(flat, lengths, runs, vocab_size)
    if method in ("bpe", "rl-bpe"):
        base = vocab_size + (len(runs) if runs is not None else 0)
        pairs = _learn_bpe(flat, lengths, base, merges, min_freq)
    return MergeRules(method, vocab_size, runs=runs, pairs=pairs, scale=scale)


def apply_rules(rules: MergeRules, sequence_or_sequences):
    """Encode one row or a list of rows (cross-scale: a dict scale -> row or -> rows).

    Returns an array / a list of arrays (cross-scale: a ``ScaleCode`` / a list of them)."""
    v = rules.vocab_size
    if rules.method == "cross-scale":
        seqs = sequence_or_sequences
        if not isinstance(seqs, dict):
            raise ValueError("cross-scale rules encode a dict of scales (scale name -> row or rows)")
        single = all(isinstance(seqs.get(s), np.ndarray) and seqs[s].ndim == 1 for s in rules.scales if s in seqs)
        if single:
            seqs = {s: [a] for s, a in seqs.items()}
        codes = _apply_cross(rules, _scale_rows(seqs, rules.scales))
        return codes[0] if single else codes
    single = isinstance(sequence_or_sequences, np.ndarray) and sequence_or_sequences.ndim == 1
    seqs = [sequence_or_sequences] if single else list(sequence_or_sequences)
    flat, lengths = _flat(seqs, v)
    if rules.method in ("rl", "rl-bpe"):
        flat, lengths = _apply_rl(flat, lengths, rules.runs, v)
    if rules.method in ("bpe", "rl-bpe"):
        flat, lengths = _apply_bpe(flat, lengths, rules.pairs, v + len(rules.runs))
    out = _split(flat, lengths)
    return out[0] if single else out


def undo_rules(rules: MergeRules, encoded):
    """Decode what ``apply_rules`` returned, back to the exact tokens (same nesting as its input)."""
    if rules.method == "cross-scale":
        single = isinstance(encoded, ScaleCode)
        codes = [encoded] if single else list(encoded)
        rows = [_undo_cross(rules, c) for c in codes]
        if single:
            return dict(zip(rules.scales, rows[0]))
        return {s: [r[k] for r in rows] for k, s in enumerate(rules.scales)}
    single = isinstance(encoded, np.ndarray) and encoded.ndim == 1
    seqs = [encoded] if single else list(encoded)
    flat, lengths = _flat(seqs, rules.new_vocab_size, "symbols")
    offsets, values = rules.expansion()
    out_flat = _ragged_gather(flat, offsets, values)
    row_len = np.bincount(np.repeat(np.arange(len(lengths)), lengths),
                          weights=offsets[flat + 1] - offsets[flat], minlength=len(lengths)).astype(np.int64)
    out = _split(out_flat, row_len)
    return out[0] if single else out


@dataclass
class MergeReport:
    """Compression of the rules on the rows they were learned on and on held-out rows.

    ratio = original tokens / encoded symbols (cross-scale: tokens of all scales / symbols + tails)."""
    method: str
    scale: Optional[str]
    vocab_size: int
    new_vocab_size: int
    n_rules: int
    merges: int
    min_freq: int
    train_rows: int
    train_tokens: int
    train_symbols: int
    heldout_rows: int
    heldout_tokens: int
    heldout_symbols: int
    learn_tokens: int  # tokens the rules were learned from (BPE: a prefix of the training rows)
    learn_s: float

    @property
    def train_ratio(self) -> float:
        return self.train_tokens / self.train_symbols if self.train_symbols else 1.0

    @property
    def heldout_ratio(self) -> Optional[float]:
        return self.heldout_tokens / self.heldout_symbols if self.heldout_symbols else None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["train_ratio"], d["heldout_ratio"] = self.train_ratio, self.heldout_ratio
        return d

    def format(self) -> str:
        held = (f"{self.heldout_ratio:.3f}x ({self.heldout_tokens:,} -> {self.heldout_symbols:,}, "
                f"{self.heldout_rows} rows)" if self.heldout_ratio is not None else "n/a (no held-out rows)")
        scale = f" on {self.scale}" if self.scale else ""
        return "\n".join([
            f"method {self.method}{scale}: {self.n_rules} rules (merges <= {self.merges}, min_freq {self.min_freq}), "
            f"vocabulary {self.vocab_size} -> {self.new_vocab_size}",
            f"  train    {self.train_ratio:.3f}x ({self.train_tokens:,} -> {self.train_symbols:,}, {self.train_rows} rows)",
            f"  held-out {held}",
            f"  learned from {self.learn_tokens:,} tokens in {self.learn_s:.2f} s"])


def _n_tokens(rows) -> int:
    return int(sum(np.asarray(r).size for r in rows))


def evaluate(source: Union[str, Path, Sequences], method: str, *, merges: int = 1000, min_freq: int = 2,
             holdout: float = 0.2, seed: int = 0, scale: Optional[str] = None,
             vocab_size: Optional[int] = None,
             max_learn_tokens: Optional[int] = MAX_LEARN_TOKENS) -> tuple[MergeRules, MergeReport]:
    """Learn ``method``'s rules on a random (``seed``) 1 - ``holdout`` of the rows of ``source`` (an
    OUT_DIR or a dict as from ``load_sequences``) and measure the compression on both parts.

    rl / bpe / rl-bpe work on one scale: ``scale`` names it; by default the only scale of S3 data,
    and for SNAC the finest scale (the last, with the most tokens, where most of the bitrate is).
    Learning (rl, bpe) reads at most ``max_learn_tokens`` tokens, the first training rows in the
    shuffled order (None: all); compression is measured on all rows.
    """
    _check_method(method, merges, min_freq)
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    meta = {}
    if isinstance(source, (str, Path)):
        meta = read_metadata(source)
        source = load_sequences(source)
    codec = meta.get("codec") or infer_codec(source)
    vocab_size = int(vocab_size or meta.get("vocab_size") or CODEC_VOCAB.get(codec, 0))
    n_rows = len(next(iter(source.values())))
    order = np.random.default_rng(seed).permutation(n_rows)
    n_held = min(int(round(holdout * n_rows)), max(n_rows - 1, 0))
    train_i, held_i = order[n_held:], order[:n_held]
    if method == "cross-scale":
        if len(source) < 2:
            raise ValueError(f"cross-scale needs a multi-scale codec such as snac; this dataset ({codec}) has "
                             f"the single scale {list(source)}")
        data = source
        scale = None
    else:
        scale = scale or list(source)[-1]
        if scale not in source:
            raise ValueError(f"no scale {scale!r}; the dataset has {list(source)}")
        data = {scale: source[scale]}

    def pick(idx, limit=None):
        out = {s: [] for s in data}
        total = 0
        for i in idx:
            if limit is not None and total >= limit:
                break
            for s in data:
                out[s].append(data[s][i])
            total += sum(np.asarray(data[s][i]).size for s in data)
        return out

    train, held = pick(train_i), pick(held_i)
    learn = pick(train_i, max_learn_tokens) if method != "cross-scale" else train
    t0 = time.perf_counter()
    rules = learn_rules(learn if method == "cross-scale" else learn[scale], method, vocab_size=vocab_size,
                        merges=merges, min_freq=min_freq, scale=scale)
    learn_s = time.perf_counter() - t0

    def measure(part) -> tuple[int, int]:
        tokens = sum(_n_tokens(part[s]) for s in part)
        if not tokens:
            return 0, 0
        enc = apply_rules(rules, part if method == "cross-scale" else part[scale])
        return tokens, int(sum(len(e) for e in enc))

    tr_tok, tr_sym = measure(train)
    ho_tok, ho_sym = measure(held)
    report = MergeReport(method=method, scale=scale, vocab_size=vocab_size, new_vocab_size=rules.new_vocab_size,
                         n_rules=rules.n_rules, merges=int(merges), min_freq=int(min_freq),
                         train_rows=len(train_i), train_tokens=tr_tok, train_symbols=tr_sym,
                         heldout_rows=len(held_i), heldout_tokens=ho_tok, heldout_symbols=ho_sym,
                         learn_tokens=sum(_n_tokens(learn[s]) for s in learn), learn_s=learn_s)
    return rules, report
