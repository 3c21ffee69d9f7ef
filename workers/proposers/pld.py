"""Prompt lookup decoding: continue the latest earlier occurrence of the sequence's trailing n-gram."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import ArmContext, register
from ..types import Draft, Verdict


def lookup(seq: list[int] | np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[list[int], int]:
    """Tokens that followed the most recent earlier match of seq's last n tokens (longest n first), and that n
    (0 = no match).

    >>> lookup([5, 6, 7, 8, 5, 6], k=2)
    ([7, 8], 2)
    """
    arr = np.asarray(seq, dtype=np.int64)
    n_seq = len(arr)
    for n in range(min(max_ngram, n_seq - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[: n_seq - 1], n)  # starts 0..n_seq-1-n
        hits = np.flatnonzero((windows == arr[n_seq - n:]).all(axis=1))
        hits = hits[hits + n < n_seq]  # a continuation must exist
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start: start + k].tolist(), n
    return [], 0


@dataclass(frozen=True)
class PLDConfig:
    max_ngram: int = 3   # longest trailing n-gram tried first
    min_ngram: int = 1   # shortest n-gram accepted as a match


class PLDProposer:
    def __init__(self, cfg: PLDConfig) -> None:
        self.cfg = cfg

    def propose(self, seq: list[int], k: int) -> Draft:
        if k <= 0:
            return Draft([])
        tokens, n = lookup(seq, k, self.cfg.max_ngram, self.cfg.min_ngram)
        return Draft(tokens, evidence=n)     # a longer match is a likelier continuation: the budget prices each n

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        pass


@register("pld", drafts="lookup",
          description="prompt lookup: drafts by matching the trailing n-gram earlier in the sequence")
def build(ctx: ArmContext) -> PLDProposer:
    return PLDProposer(PLDConfig())
