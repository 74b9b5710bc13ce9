"""Long text: split into segments that each fit one T3 request, and join their audio.

The models are trained on sentence-length text, take at most 1000 speech tokens (40 s) per request
and drift after 25-30 s of speech (upstream #43, #60, #76, #181, #424, #543). So a text longer than
one segment is cut, in this order of preference:

1. at paragraph breaks and sentence ends (``. ! ? …`` optionally closed by a quote or bracket and
   followed by white space; ``。！？`` directly),
2. at clause marks and commas (``, ; :`` followed by white space; ``，；：、``),
3. at word boundaries,
4. hard, between characters (scripts written without spaces),

then adjacent pieces are packed greedily while a segment stays within ``MAX_SEGMENT_CHARS``
*weighted* characters (``text_weight``: a CJK/kana/hangul character, said in about a fifth of a
second, weighs ``DENSE_CHAR_WEIGHT`` Latin ones, said in about a fourteenth), about 20 s of speech,
inside the 40 s a request may take. A segment over the model's text-token limit (counted exactly
with the variant's tokenizer) is cut again at the last break that fits (:func:`fit_tokens`).

Joining (``Joiner``): each join fades the end of one segment and the start of the next with a
raised cosine of ``JOIN_FADE_S`` and puts ``JOIN_PAUSE_S`` of silence between them, so a join is
continuous (no click) whatever the waveforms do there. It works on a stream of chunks.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Optional

import torch
from torch import Tensor

MAX_SEGMENT_CHARS = 300  # weighted characters per segment: ~20 s of read English (~14 characters/s)
DENSE_CHAR_WEIGHT = 3  # a CJK / kana / hangul character takes ~3x as long to say as a Latin letter
JOIN_PAUSE_S = 0.2  # silence between two segments
JOIN_FADE_S = 0.01  # raised-cosine fade-out / fade-in on either side of the pause

# A sentence ends at . ! ? or … (optionally closed by a quote or bracket) followed by white space,
# or at a CJK full stop / ! / ? directly; "3.14" and "e.g.," therefore do not split, "Dr. Smith" does.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?…][\"'”’)\]»])\s+|(?<=[.!?…])\s+|(?<=[。！？])")
_SOFT_BREAK = re.compile(r"[,;:]\s|[，；：、]")
# Scripts said at about one syllable per character.
_DENSE = re.compile(r"[\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f]")


def text_weight(text: str) -> int:
    """Characters, a dense-script character counting ``DENSE_CHAR_WEIGHT``: a proxy for speech length."""
    return len(text) + (DENSE_CHAR_WEIGHT - 1) * len(_DENSE.findall(text))


def _prefix_within(text: str, budget: int) -> int:
    """The length of the longest prefix of ``text`` whose weight is at most ``budget``."""
    if text_weight(text) <= budget:
        return len(text)
    w = 0
    for i, c in enumerate(text):
        w += DENSE_CHAR_WEIGHT if _DENSE.match(c) else 1
        if w > budget:
            return i
    return len(text)


def _first_cut(sentence: str, max_chars: int) -> tuple[str, str]:
    """(head, rest): ``head`` within ``max_chars`` weighted characters, cut after the last
    ', ; :' in reach, else at the last space, else hard."""
    n = _prefix_within(sentence, max_chars)
    head = sentence[: n + 1]
    soft = [m.end() for m in _SOFT_BREAK.finditer(head) if text_weight(head[: m.end()].rstrip()) <= max_chars]
    cut = soft[-1] if soft else head.rfind(" ") + 1
    if cut <= 0:
        cut = max(1, n)
    return sentence[:cut].strip(), sentence[cut:].strip()


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence over ``max_chars`` weighted characters -> pieces at the last ', ; :' in reach,
    else the last space, else a hard cut."""
    out = []
    while text_weight(sentence) > max_chars:
        piece, sentence = _first_cut(sentence, max_chars)
        if piece:
            out.append(piece)
    if sentence:
        out.append(sentence)
    return out


def split_text(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Text -> segments of at most ``max_chars`` weighted characters (``text_weight``), one T3
    request each: broken at newlines and sentence ends, a sentence too long at its last clause mark
    or comma, then space, in reach; adjacent pieces are packed greedily, joined by a space (none
    between dense-script pieces), while the segment stays within ``max_chars`` (text hard-wrapped
    at newlines comes back together). White space inside a piece is collapsed."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces = []
    for line in text.splitlines():
        for sentence in _SENTENCE_BREAK.split(line):
            sentence = " ".join(sentence.split())
            if sentence:
                pieces.extend(_cut_long(sentence, max_chars))
    segments: list[str] = []
    for piece in pieces:
        if segments:
            sep = "" if _DENSE.match(segments[-1][-1]) and _DENSE.match(piece[0]) else " "
            if text_weight(segments[-1]) + len(sep) + text_weight(piece) <= max_chars:
                segments[-1] = f"{segments[-1]}{sep}{piece}"
                continue
        segments.append(piece)
    return segments


def fit_tokens(chunks: list, n_tokens: Callable[[str], int], limit: int) -> list:
    """Chunks -> chunks of at most ``limit`` tokens (``n_tokens(text)`` counts them): a chunk over
    the limit is cut, as :func:`split_text` cuts long sentences, at the last ', ; :' or space
    within the longest prefix that fits (found by bisection), else hard; the rest is cut again
    until it fits. ValueError if not even one character fits."""
    out = []
    for chunk in chunks:
        rest = chunk
        while rest:
            if n_tokens(rest) <= limit:
                out.append(rest)
                break
            lo, hi = 0, len(rest)  # rest[:lo] fits (0: nothing yet), rest[:hi] does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if n_tokens(rest[:mid].strip()) <= limit:
                    lo = mid
                else:
                    hi = mid
            if lo == 0:
                raise ValueError(f"the model takes at most {limit} text token(s) per call, too few for even "
                                 f"{rest[:1]!r}")
            piece, tail = _first_cut(rest, text_weight(rest[:lo]))
            if not piece or n_tokens(piece) > limit:  # the break landed badly: cut where it is known to fit
                piece, tail = rest[:lo].strip(), rest[lo:].strip()
            out.append(piece)
            rest = tail
    return out


def segment_text(text: str, n_tokens: Callable[[str], int], limit: int, *, split: Optional[bool] = None,
                 max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """The segments a request for ``text`` runs as. ``split``: None (default) splits only a text
    longer than one segment (over ``max_chars`` weighted characters or ``limit`` tokens) and
    returns a shorter one whole and unchanged, as the reference takes it; True always splits at
    sentence ends; False never splits (a text over the token limit then fails in T3, as the
    reference's would)."""
    if split is False or (split is None and text_weight(text) <= max_chars and n_tokens(text) <= limit):
        return [text]
    segments = fit_tokens(split_text(text, max_chars), n_tokens, limit)
    return segments or [text]


def segment_seed(seed: int, index: int) -> int:
    """Segment ``index``'s seed, derived from the request's: each segment draws from its own stream
    (a hash, so neighbouring request seeds give unrelated segment streams)."""
    digest = hashlib.blake2b(f"chatterbox-rt segment {seed} {index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def fade_windows(n: int) -> tuple[Tensor, Tensor]:
    """Raised-cosine (fade_in, fade_out) of ``n`` samples, 0 -> 1 and 1 -> 0, ends excluded."""
    t = (torch.arange(n, dtype=torch.float64) + 1) / (n + 1)
    fade_in = (0.5 - 0.5 * torch.cos(math.pi * t)).float()
    return fade_in, fade_in.flip(0)


class Joiner:
    """Joins the segments' audio in order, chunk by chunk: ``push(chunk)`` the current segment's
    audio as it comes, ``end_segment(last=...)`` after it. Each join fades out the last ``fade``
    samples of the segment before it, inserts ``pause`` zeros and fades in the first ``fade`` of
    the one after it; the first segment's start and the last one's end are left as they are. What
    it returns is ready to go out; it holds back at most ``fade`` samples."""

    def __init__(self, sr: int, pause_s: float = JOIN_PAUSE_S, fade_s: float = JOIN_FADE_S):
        if not (pause_s >= 0 and fade_s >= 0 and math.isfinite(pause_s) and math.isfinite(fade_s)):
            raise ValueError(f"pause_s and fade_s must be finite and >= 0, got {pause_s!r} and {fade_s!r}")
        self.pause = int(round(pause_s * sr))
        self.fade = int(round(fade_s * sr))
        self._in, self._out = fade_windows(self.fade)
        self._tail = torch.zeros(0)
        self._pos = 0  # samples of the current segment seen so far
        self._segment = 0

    def push(self, chunk: Tensor) -> Tensor:
        chunk = chunk.reshape(-1).float()
        if self._segment > 0 and self._pos < self.fade and chunk.numel():
            k = min(self.fade - self._pos, chunk.numel())
            chunk = chunk.clone()
            chunk[:k] *= self._in[self._pos: self._pos + k]
        self._pos += chunk.numel()
        held = torch.cat([self._tail, chunk])
        cut = max(0, held.numel() - self.fade)
        self._tail = held[cut:]
        return held[:cut]

    def end_segment(self, last: bool) -> Tensor:
        """The held tail of the segment that just ended: as it is if ``last``, else faded out and
        followed by the pause."""
        tail, self._tail = self._tail, torch.zeros(0)
        self._segment += 1
        self._pos = 0
        if last:
            return tail
        if tail.numel():
            tail = tail * self._out[self.fade - tail.numel():]
        return torch.cat([tail, torch.zeros(self.pause)])


__all__ = ["MAX_SEGMENT_CHARS", "JOIN_PAUSE_S", "JOIN_FADE_S", "text_weight", "split_text", "fit_tokens",
           "segment_text", "segment_seed", "Joiner"]
