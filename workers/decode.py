"""One request decoded on its own: a batch of one through the step loop (workers/scheduler.py), never a second path.

For tools and tests that hold a session and a proposer in hand; the engine submits to its replica's scheduler.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .kv import SlotSession
from .sampling import Noise, new_seed
from .scheduler import Scheduler, SchedulerConfig, Sequence
from .types import DecodeStats, Proposer, SamplingParams

if TYPE_CHECKING:
    from .constraint import Constraint


def decode(session: SlotSession, proposer: Proposer, prompt: list[int], params: SamplingParams,
           seed: int | None, eos_ids: frozenset[int], capacity: int, k: int = 8, stats: DecodeStats | None = None,
           constraint: Constraint | None = None) -> Iterator[list[int]]:
    """Yield the tokens emitted at each step until EOS, max_tokens or the cache's capacity.

    An arm that raises mid-request is replaced by AR for the rest of the request (`stats.fallback` says why).
    `constraint` (the request's grammar, workers/constraint.py) drafts the tokens it forces instead of the arm,
    prunes the arm's drafts, masks the target's logits and ends with the EOS it forces; None = unconstrained.
    """
    events: list[tuple] = []
    budget = min(params.max_tokens, capacity - len(prompt))
    if budget <= 0:
        return
    device = getattr(session.pool, "m", None)
    sched = Scheduler(Noise(device.device if device is not None else "cpu"), eos_ids,
                      SchedulerConfig(max_batch=1, prefill_chunk=max(1, len(prompt))), k)
    s = Sequence(list(prompt), params, seed if seed is not None else new_seed(), proposer, session, events.append,
                 budget, constraint, stats if stats is not None else DecodeStats())
    sched.submit(s)
    try:
        while True:
            sched.step()
            for kind, value in events:
                if kind == "tokens":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
            events.clear()
    finally:
        if s.session.bound:
            sched.cancel(s)
            sched.step()
