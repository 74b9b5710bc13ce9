"""The multilingual model's attention-alignment EOS control, on the device.

The reference (``models/t3/inference/alignment_stream_analyzer.py``) watches three attention
heads of the conditional row, tracks where in the text the speech currently is, suppresses EOS
until the end of the text is reached, and forces EOS on a long tail, a repeat of earlier text, or
two equal tokens in a row. It does so with Python control flow on CPU copies of the attention
(a host sync per token). This is the same state machine written with tensor ops so it stays on
the device; every quantity and threshold is the reference's:

* per step, the mean attention of the heads over the text columns is appended to the alignment
  matrix ``A`` (first step: the rows of the two start-of-speech positions), with columns past
  the current frame index zeroed;
* ``text_position`` follows the argmax of the newest row unless it jumps by <= -4 or >= 7;
* ``complete`` once ``text_position >= S - 3``;
* EOS logit set to -2**15 while the newest argmax is before ``S - 3`` (texts longer than 5);
* EOS forced (all logits -2**15, EOS +2**15) on a long tail (>= 5 attention mass on the last
  three columns since completion), an alignment repetition (> 5 summed row maxima over the
  columns before the last five since completion) or a token repetition (the two previous
  tokens equal, from the third step on).

The reference also tracks a "false start" state that nothing reads; it is left out here, as it
cannot change the output. Where the reference crashes (texts of at most five tokens reaching the repetition test, whose
column slice is then empty), we treat the repetition test as false.
"""
from __future__ import annotations

import torch
from torch import Tensor

FORCE_LOGIT = float(2 ** 15)
# The frames where text_position jumps by this much are ignored (reference thresholds).
MAX_BACKWARD_JUMP = 4
MAX_FORWARD_JUMP = 7
LONG_TAIL_MASS = 5.0
REPETITION_MASS = 5.0
EOS_SUPPRESS_MIN_TEXT = 5


class AlignmentController:
    def __init__(self, text_start: int, text_end: int, max_steps: int, eos: int, device: torch.device):
        self.i, self.j = text_start, text_end
        self.S = text_end - text_start
        self.eos = eos
        # Row 0 and 1 come from the prefill (two start-of-speech positions), one row per step after.
        self.A = torch.zeros(max_steps + 2, self.S, device=device)
        self.rows = 0  # host-side: the number of rows is known without looking at the device
        self.frame = 0
        self.text_position = torch.zeros((), dtype=torch.long, device=device)
        self.complete = torch.zeros((), dtype=torch.bool, device=device)
        self.completed_at = torch.full((), max_steps + 3, dtype=torch.long, device=device)
        self._cols = torch.arange(self.S, device=device)
        self._row_idx = torch.arange(max_steps + 2, device=device)

    def step(self, attn: Tensor, logits: Tensor, prev_tokens: Tensor | None) -> Tensor:
        """``attn``: ``[heads, n, L]`` softmax attention of the alignment heads for this forward's
        query rows (stacked in the reference's head order). ``logits``: ``[1, V]`` after CFG.
        ``prev_tokens``: the two previously sampled tokens ``[2]`` (None before the third step)."""
        chunk = attn.mean(dim=0)[:, self.i:self.j]  # [n, S]
        if self.frame == 0:
            chunk = chunk[-2:]  # the two start-of-speech rows (reference: aligned_attn[j:, i:j])
        chunk = chunk * (self._cols <= self.frame).to(chunk.dtype)
        n = chunk.shape[0]
        self.A[self.rows:self.rows + n] = chunk
        self.rows += n
        T, S = self.rows, self.S
        A = self.A[:T]

        cur = torch.argmax(chunk[-1])
        jump = cur - self.text_position
        continuous = (jump > -MAX_BACKWARD_JUMP) & (jump < MAX_FORWARD_JUMP)
        self.text_position = torch.where(continuous, cur, self.text_position)

        newly = ~self.complete & (self.text_position >= S - 3)
        self.complete = self.complete | newly
        self.completed_at = torch.where(newly, torch.full_like(self.completed_at, T), self.completed_at)
        after = (self._row_idx[:T] >= self.completed_at).to(A.dtype)[:, None]  # rows since completion

        long_tail = self.complete & ((A[:, -3:] * after).sum(dim=0).max() >= LONG_TAIL_MASS)
        force = long_tail
        if S > 5:
            repetition = (A[:, :-5] * after).max(dim=1).values.sum() > REPETITION_MASS
            force = force | (self.complete & repetition)
        if prev_tokens is not None:
            force = force | (prev_tokens[0] == prev_tokens[1])

        logits = logits.clone()
        if S > EOS_SUPPRESS_MIN_TEXT:
            suppressed = torch.where(cur < S - 3, torch.full_like(logits[:, self.eos], -FORCE_LOGIT),
                                     logits[:, self.eos])
            logits[:, self.eos] = suppressed
        forced = torch.full_like(logits, -FORCE_LOGIT)
        forced[:, self.eos] = FORCE_LOGIT
        self.frame += 1
        return torch.where(force, forced, logits)
