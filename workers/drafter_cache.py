"""A drafter's KV cache kept equal to a prefix of the sequence it drafts after, by common-prefix rollback.

Used by every arm whose drafter runs its own cache (sps in the step loop, pearl in its own process): after a
verification the sequence may share only a prefix with what the drafter was fed (rejected draft tokens), so the
cache is rolled back to the common prefix and only the rest is fed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .kv import SlotSession
from .model import Model


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences.

    >>> common_prefix([5, 6, 7], [5, 6, 9, 1])
    2
    """
    a, b = _as_list(a), _as_list(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (everything drafted was kept); slices compare in C, no per-token Python
        return n
    lo, hi = 0, n - 1   # a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]: bisect on slice equality
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def _as_list(seq: Sequence[int] | np.ndarray) -> list[int]:
    return seq.tolist() if isinstance(seq, np.ndarray) else seq if isinstance(seq, list) else list(seq)


class DrafterCache:
    """One drafter session and the tokens it holds (`fed`).

    >>> cache = DrafterCache(drafter, capacity=256)
    >>> logits, fed = cache.logits_after([5, 6, 7])        # feeds 3 tokens: [V] logits after 7
    >>> logits, fed = cache.logits_after([5, 6, 9, 1])     # rolls back to [5, 6], feeds 2
    """

    def __init__(self, model: Model | None, capacity: int, session: SlotSession | None = None) -> None:
        self.session, self.fed = session if session is not None else model.session(capacity), []

    def rollback_to(self, seq: Sequence[int] | np.ndarray) -> None:
        """Keep the longest common prefix of the cache and seq, short of seq's last token (always fed again: its
        logits are what the drafter needs)."""
        common = common_prefix(self.fed, seq[: max(0, len(seq) - 1)])
        if common < len(self.fed):
            del self.fed[common:]
            self.session.rollback(common)

    def pending(self, seq: Sequence[int]) -> list[int]:
        """Roll back to the common prefix; the tokens to feed next (a batched forward feeds them, then `fed_up`)."""
        self.rollback_to(seq)
        return list(seq[len(self.fed):])

    def fed_up(self, new: list[int]) -> None:
        self.fed.extend(new)

    def logits_after(self, seq: Sequence[int]) -> tuple[torch.Tensor, int]:
        """([V] logits for the position after seq, tokens fed), feeding only what the cache lacks."""
        new = self.pending(seq)
        logits = self.session.forward(new)[-1]
        self.fed_up(new)
        return logits, len(new)

    def release(self) -> None:
        self.fed = []
        self.session.release()
