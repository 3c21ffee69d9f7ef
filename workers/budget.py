"""How many draft tokens a step should score: per-request acceptance against the measured cost of the batch.

At batch 1 a draft of 8 tokens is nearly free (one forward over 9 tokens costs ~1.4x one token on this CPU); at
batch 32 every drafted token competes with other requests' tokens for the same forward. Each step the scheduler
hands out draft tokens one at a time, always to the request whose next token is the most likely to be accepted
(alpha_i ** (k_i + 1) for the (k_i + 1)-th token of a draft at per-token acceptance alpha_i), while the step's
expected tokens per second still rises: the forward's cost comes from a curve measured on the replica's own
hardware when it starts (`CostCurve.measure`), plus what the arm pays to draft that token. With no token paying,
every draft is empty: the step is batched AR.

What the plan cannot price (per-request Python work, a drafter forward's fixed part, cache bookkeeping) the
`DraftGuard` measures instead: per batch size it times the replica's own steps with drafts and without, and runs
the faster mode, probing the other now and then.
"""

from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass

from .draft_length import expected_tokens


@dataclass(frozen=True)
class CostCurve:
    """Forward seconds against tokens scored in one step (piecewise linear between measured points)."""

    tokens: tuple[int, ...]      # ascending token counts measured
    seconds: tuple[float, ...]   # median forward time at each count

    def time(self, n: int) -> float:
        if n <= self.tokens[0]:
            return self.seconds[0] * max(n, 1) / self.tokens[0]
        i = bisect.bisect_left(self.tokens, n)
        if i == len(self.tokens):   # beyond the last point: the last segment's slope
            (a, ta), (b, tb) = (self.tokens[-2], self.seconds[-2]), (self.tokens[-1], self.seconds[-1])
        else:
            (a, ta), (b, tb) = (self.tokens[i - 1], self.seconds[i - 1]), (self.tokens[i], self.seconds[i])
        return ta + (tb - ta) * (n - a) / (b - a)

    @staticmethod
    def measure(pool, vocab: int, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128), context: int = 64,
                rounds: int = 5) -> CostCurve:
        """Time one forward scoring n tokens of one sequence that holds `context` tokens: what a draft adds to a
        step is that many more rows through every GEMM (the cost of a step), at negligible attention cost.

        Sizes are interleaved over `rounds` and each keeps its fastest round, so a burst of load elsewhere on
        the machine during start-up does not make drafting look expensive for the replica's whole life."""
        from .kv import Item, forward_batch

        capacity = pool.slot_tokens
        context = max(1, min(context, capacity // 4))
        sizes = tuple(n for n in sizes if context + n <= capacity) or (1,)
        s = pool.session(capacity)
        try:
            s.bind()
            forward_batch([Item(s, [(7 * i) % vocab for i in range(context)], rows="none")])
            best = _fastest([lambda r, n=n: _time_forward(s, n, context, vocab, r) for n in sizes], rounds)
        finally:
            s.release()
        return CostCurve(sizes, tuple(_plausible(sizes, best)))


def _fastest(timers, rounds: int) -> list[float]:
    """Each timer's fastest of `rounds` (called with the round number), interleaved, after one warm-up round."""
    best = [float("inf")] * len(timers)
    for r in range(rounds + 1):
        for i, timer in enumerate(timers):
            t = timer(r)
            best[i] = min(best[i], t) if r else best[i]         # round 0 warms up
    return best


def _time_forward(s, n: int, context: int, vocab: int, salt: int) -> float:
    from .kv import Item, forward_batch

    t0 = time.perf_counter()
    (out,) = forward_batch([Item(s, [(3 * j + salt) % vocab for j in range(n)])])
    float(out[-1, 0])                                            # waits for an accelerator too
    elapsed = time.perf_counter() - t0
    s.rollback(context)
    return elapsed


def _plausible(sizes: tuple[int, ...], seconds: list[float]) -> list[float]:
    """Cost never decreases with tokens, and n tokens never cost more than max(1.5, n / 4) one-token forwards
    (measured: 1.4x at 8 tokens, 4.1x at 64 on this CPU in bf16; fp32 at most 2.4x at 9): a spike during the
    measurement must not switch speculation off."""
    out: list[float] = []
    for n, t in zip(sizes, seconds):
        t = min(t, seconds[0] * max(1.5, n / 4))
        out.append(max(t, out[-1]) if out else t)
    return out


def default_curve(one_token_s: float = 0.0026) -> CostCurve:
    """Without a measurement: PERF_NOTES' shipped-target shape on this CPU (1.0x at 1 token, 4.1x at 64)."""
    shape = (1.0, 1.18, 1.18, 1.38, 1.74, 2.48, 4.08)
    return CostCurve((1, 2, 4, 8, 16, 32, 64), tuple(one_token_s * x for x in shape))


def drafts_split(drafting: int, decoding: int) -> bool:
    """Whether the lean forward gives each draft an attention call of its own (workers/lean.py `_parts`): while
    at most half of the step's short items draft; beyond that one call pads every item to the longest draft."""
    return 2 * drafting <= decoding


@dataclass(frozen=True)
class AttentionCost:
    """What drafts add to a step's attention (workers/lean.py `_parts`), measured on the replica's pool.

    With drafts in at most half of the step's decoding requests, each draft gets an attention call of its own:
    `split_s` per drafting request at `context` cached tokens (scaled by its own context). With more, one call pads
    every request's queries to the longest draft: `pad_s` per padded query row per cached token of the longest
    sequence. Both are on top of the GEMM rows the cost curve prices; `row_s` (per decoding request per cached
    token) is the attention every step pays anyway, which sets how much a step's time a draft adds to."""

    split_s: float = 0.0
    pad_s: float = 0.0
    context: int = 1
    row_s: float = 0.0

    def extra(self, rows: int, drafting: int, split_keys: int, longest: int, keys: int) -> float:
        """Seconds drafts add: `drafting` of `rows` decoding requests draft, the longest draft scoring `longest`
        query rows, `split_keys` = the drafting requests' cached tokens summed, `keys` = the longest cache."""
        if drafting == 0:
            return 0.0
        if drafts_split(drafting, rows):
            return self.split_s * split_keys / self.context
        return self.pad_s * rows * (longest - 1) * keys

    @staticmethod
    def measure(pool, vocab: int, curve: CostCurve, rows: int = 8, context: int = 256,
                rounds: int = 5) -> AttentionCost:
        """Time `rows` sequences of `context` tokens scoring one token each, then one of them a 2-token draft
        (split), then all of them (padded); each keeps its fastest round, less the GEMM rows the curve prices."""
        from .kv import Item, forward_batch

        rows, context = min(rows, pool.slots), max(1, min(context, pool.slot_tokens // 2))
        if rows < 2:
            return AttentionCost()
        sessions = [pool.session() for _ in range(rows)]

        def timed(shape: list[int], salt: int) -> float:
            t0 = time.perf_counter()
            out = forward_batch([Item(s, [(5 * j + salt) % vocab for j in range(n)], rows="last")
                                 for s, n in zip(sessions, shape)])
            float(out[-1][-1, 0])                                        # waits for an accelerator too
            elapsed = time.perf_counter() - t0
            for s in sessions:
                s.rollback(context)
            return elapsed

        try:
            for i, s in enumerate(sessions):
                s.bind()
                forward_batch([Item(s, [(7 * j + i) % vocab for j in range(context)], rows="none")])
            shapes = ([1] * rows, [2] + [1] * (rows - 1), [2] * rows)
            best = _fastest([lambda r, shape=shape: timed(shape, r) for shape in shapes], rounds)
        finally:
            for s in sessions:
                s.release()
        split = max(0.0, best[1] - best[0] - (curve.time(rows + 1) - curve.time(rows)))
        pad = max(0.0, best[2] - best[0] - (curve.time(2 * rows) - curve.time(rows))) / (rows * (context + 2))
        row = max(0.0, best[0] - curve.time(rows)) / (rows * (context + 1))
        return AttentionCost(split, pad, context, row)


@dataclass(frozen=True)
class Ask:
    """One decoding request's part in a step's plan."""

    alpha: float          # per-token acceptance estimate of its arm on this request
    limit: int            # draft tokens it may get at most (its room, or the length of its draft)
    cost_s: float = 0.0   # what drafting one more token costs its arm (0 for table lookups)
    fixed: int = 0        # draft tokens it scores whatever the plan (a sampled drafter's draft is never cut)
    context: int = 0      # tokens it has cached (what its attention reads)


def plan(asks: list[Ask], base_tokens: int, curve: CostCurve, attention: AttentionCost | None = None,
         rows: int | None = None, cached: int = 0) -> list[int]:
    """Draft tokens per request: greedy by acceptance probability while expected tokens per second rises.

    `base_tokens`: what the step scores anyway (each request's last token, prefill chunks); `attention` prices
    what drafts add to the step's attention, `rows` = the step's decoding requests (default: the asks) and `cached`
    the tokens they hold (the attention the step pays without drafts).

    >>> curve = CostCurve((1, 8, 64), (1.0, 1.4, 4.1))
    >>> plan([Ask(0.8, 8)], 1, curve)                      # alone: a long draft is nearly free
    [8]
    >>> plan([Ask(0.8, 8)] * 32, 32, curve)[:3]             # at batch 32 each token costs real time
    [1, 1, 1]
    """
    att, rows = attention or AttentionCost(), len(asks) if rows is None else rows
    caps = [a.fixed for a in asks]
    keys = max((a.context for a in asks), default=0)
    drafting = sum(1 for c in caps if c)
    split_keys = sum(a.context for a, c in zip(asks, caps) if c)
    longest = 1 + max(caps, default=0)
    tokens = base_tokens + sum(caps)
    emitted = float(len(asks)) + sum(expected_tokens(a.alpha, a.fixed) - 1 for a in asks)
    attn = att.extra(rows, drafting, split_keys, longest, keys)
    seconds = curve.time(tokens) + att.row_s * cached + attn
    heap = [(-(a.alpha ** (a.fixed + 1)), i) for i, a in enumerate(asks) if a.fixed < a.limit and a.alpha > 0]
    heapq.heapify(heap)
    while heap:
        neg_p, i = heapq.heappop(heap)
        new = caps[i] == 0
        d, sk = drafting + new, split_keys + (asks[i].context if new else 0)
        lg = max(longest, caps[i] + 2)
        attn_after = att.extra(rows, d, sk, lg, keys)
        p = -neg_p
        extra = curve.time(tokens + 1) - curve.time(tokens) + asks[i].cost_s + attn_after - attn
        if (emitted + p) * seconds <= emitted * (seconds + extra):   # this token would lower tokens per second
            continue
        caps[i] += 1
        tokens, emitted, seconds = tokens + 1, emitted + p, seconds + extra
        drafting, split_keys, longest, attn = d, sk, lg, attn_after
        if caps[i] < asks[i].limit:
            heapq.heappush(heap, (-(p * asks[i].alpha), i))
    return caps


@dataclass
class _Mode:
    rate: float | None = None     # decayed mean of emitted tokens per second of this mode's steps
    samples: int = 0


class DraftGuard:
    """Measures whether drafting pays at all, a batch at a time, on the replica's real steps.

    `plan` prices what it can model (the forward, attention, a drafter's share); what it cannot (per-request
    Python work, a drafter forward's fixed part, the cache bookkeeping a verified draft costs) still makes a
    speculating batch slower than plain decoding at high load. So, per batch size (bucketed by powers of two),
    the guard keeps a decayed mean of emitted tokens per second of pure-decode steps run in each mode: "draft"
    (the plan decides) and "plain" (no draft is scored, only those a sampled request's drafter already drew and
    the grammar's forced tokens). A step runs the mode that measures faster, except every `probe_every`-th step
    of its bucket, which runs the other, so both stay measured as the batch's arms and lengths drift (every
    4 x `probe_every`-th while one mode leads by more than `clear_gap`: at batch 1, where drafting wins ~1.5x,
    probing costs ~0.6%). Greedy
    output does not depend on the mode (verification is lossless), sampled output neither (position-keyed noise,
    soft drafts never cut).

    >>> g = DraftGuard(probe_every=4)
    >>> [g.drafting(16) for _ in range(4)]          # unmeasured: draft, and every 4th step plain
    [True, True, True, False]
    >>> g.observe(16, True, 10, 0.10); g.observe(16, False, 12, 0.10)   # plain measured 1.2x faster
    >>> [g.drafting(16) for _ in range(4)]
    [False, False, False, True]
    """

    def __init__(self, probe_every: int = 16, decay: float = 0.1, clear_gap: float = 1.25) -> None:
        if probe_every < 2 or not 0 < decay <= 1 or clear_gap < 1:
            raise ValueError("probe_every >= 2, decay in (0, 1], clear_gap >= 1")
        self.probe_every, self.decay, self.clear_gap = probe_every, decay, clear_gap
        self.buckets: dict[int, dict[bool, _Mode]] = {}
        self._steps: dict[int, int] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        return max(int(batch), 1).bit_length()       # 1 | 2-3 | 4-7 | 8-15 | 16-31 | ...

    def _modes(self, batch: int) -> dict[bool, _Mode]:
        return self.buckets.setdefault(self.bucket(batch), {True: _Mode(), False: _Mode()})

    def drafting(self, batch: int) -> bool:
        """The mode of the next step of a batch of `batch` decoding requests: True = draft as the plan says."""
        b = self.bucket(batch)
        n = self._steps[b] = self._steps.get(b, 0) + 1
        modes = self._modes(batch)
        d, p = modes[True].rate, modes[False].rate
        better = d is None or p is None or d >= p
        clear = d is not None and p is not None and max(d, p) > self.clear_gap * min(d, p)
        return better != (n % (self.probe_every * (4 if clear else 1)) == 0)

    def observe(self, batch: int, drafting: bool, emitted: int, seconds: float) -> None:
        """A pure-decode step's outcome: tokens it emitted over its wall time (propose to emit)."""
        if seconds <= 0:
            return
        m = self._modes(batch)[drafting]
        rate = emitted / seconds
        m.rate = rate if m.rate is None else (1 - self.decay) * m.rate + self.decay * rate
        m.samples += 1

    def rate(self, batch: int) -> tuple[float | None, float | None]:
        """(drafting, plain) measured tokens/s at this batch size's bucket (None = not measured yet)."""
        modes = self.buckets.get(self.bucket(batch))
        return (modes[True].rate, modes[False].rate) if modes else (None, None)

    def rates(self) -> dict[str, dict[str, float | None]]:
        """Per bucket (its smallest batch size): the measured rate of each mode (metrics, bench reports)."""
        return {str(1 << (b - 1)): {"draft": m[True].rate, "plain": m[False].rate}
                for b, m in sorted(self.buckets.items())}
