"""The step loop: the decode loop, written once, over every running request of a replica.

One step: admit waiting requests while their pool has a free slot → every decoding request's proposer proposes
(arms that batch their drafter, like sps, draft for all of their requests at once) → ONE target forward scores
every request's [last, *draft] plus the next chunk of each prefilling prompt → one vectorised verification with
one host sync → each cache rolled back to what was accepted → each proposer observes → each request's sink gets
its emitted tokens. Requests join and leave at step boundaries; a finished or cancelled request gives its slot
back at once.

KV policy: a request reserves one slot at admission, sized for its whole context (prompt + max_tokens + a draft),
so the pool never runs out mid-decode and nothing is preempted; a request that finds no free slot waits in the
bounded queue (`max_waiting`; beyond it `QueueFull`).

Chunked prefill: a prompt enters the cache in chunks of at most `prefill_chunk` tokens per step, within the
step's `step_tokens` budget after every decoding request's tokens, so running requests keep emitting while it
loads; the chunk that reaches the prompt's last token also yields the first output token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .budget import AttentionCost, Ask, CostCurve, DraftGuard, default_curve, plan
from .draft_length import Acceptance, AcceptanceBook
from .errors import QueueFull
from .kv import Item, SlotSession, forward_batch
from .proposers.ar import ARProposer
from .sampling import Noise
from .types import DecodeStats, Draft, Proposer, RequestError, SamplingParams, Verdict
from .verify import Scored, verify_batch

if TYPE_CHECKING:
    from .constraint import Constraint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16              # requests decoding at once (KV slots of the replica's pool)
    slot_tokens: int | None = None   # cache positions per slot; None = the target's context window
    kv_mem_gb: float | None = None   # cap on the target pool's KV memory (fewer slots if it binds); None = no cap
    prefill_chunk: int = 256         # prompt tokens one request may prefill per step
    step_tokens: int = 2048          # tokens one step may score: decoding requests first, then prefill chunks
    max_waiting: int = 256           # requests waiting for a slot before QueueFull
    draft_budget: bool = True        # cut drafts that do not pay for their share of the batch's forward (budget.py)
    draft_guard: bool = False        # with the budget: per batch size, no drafts while plain steps measure faster
    guard_from_batch: int = 16       # the guard acts on batches of at least this many decoding requests: below,
                                     # drafting pays clearly and probing plain steps only costs (docs/benchmarks.md)
    cap_sampled_drafts: bool = False  # the budget may cap how far a sampled request's arm drafts from a
                                     # distribution, before it drafts (never cut after: which drafted tokens are
                                     # verified must not depend on their values): samples keep the target's
                                     # distribution, but a seed reproduces a sample only under the same batch
                                     # (off: it drafts as far as its arm asks, and every batchmate waits for it)
    learnt_acceptance: bool = True   # the budget prices a draft by the acceptance this replica has learnt for its
                                     # arm, sampling and match strength (Draft.evidence), the request's own
                                     # evidence shrunk towards it; off: every request starts from a fixed 0.6


def _own_acceptance() -> Acceptance:
    """A request's own acceptance estimate (of all its drafts, or of one evidence class): recent steps count most."""
    return Acceptance(prior=0.6, decay=0.8)


@dataclass(eq=False)
class Sequence:
    """One request inside the step loop (engine-core state; the API's request types live elsewhere)."""

    prompt: list[int]
    params: SamplingParams
    seed: int                                   # position-keyed randomness (workers/sampling.py)
    proposer: Proposer
    session: SlotSession                        # the target cache; bound to a slot at admission
    sink: Callable[[tuple], None]               # receives ("tokens", list[int]), then ("end", reason) or ("error", exc)
    budget: int                                 # tokens it may still emit
    constraint: Constraint | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)
    on_end: Callable[[], None] | None = None    # releases what the request's arm holds (drafter slot, lease)
    seq: list[int] = field(default_factory=list)
    fed: int = 0                                # prompt tokens in the cache
    cancelled: bool = False
    acceptance: Acceptance = field(default_factory=_own_acceptance)   # of all its drafts
    by_evidence: dict[int, Acceptance] = field(default_factory=dict)   # per Draft.evidence class
    soft_drafts: bool = False                   # its arm drafts with a distribution (never cut when sampled)
    drafted_last: bool = False                  # its previous step carried a draft
    t_admit: float = 0.0

    def __post_init__(self) -> None:
        self.seq = list(self.prompt)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass
class StepMetrics:
    """What the loop did (read by the worker's stats and the benches)."""

    steps: int = 0
    tokens_scored: int = 0
    last_batch: int = 0                 # requests in the latest step
    last_tokens: int = 0                # tokens its forward scored
    batch_hist: dict[int, int] = field(default_factory=dict)   # requests per step -> steps
    plain_steps: int = 0                # steps the draft guard ran without drafts (plain decoding measured faster)


class Scheduler:
    def __init__(self, noise: Noise, eos_ids: frozenset[int], cfg: SchedulerConfig = SchedulerConfig(),
                 k_max: int = 8) -> None:
        self.noise, self.eos_ids, self.cfg, self.k_max = noise, eos_ids, cfg, k_max
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.metrics = StepMetrics()
        self.curve: CostCurve = default_curve()     # the engine replaces it with one measured at start
        self.attention = AttentionCost()            # what drafts add to attention (measured at start; 0 = ignored)
        self.guard = DraftGuard() if cfg.draft_budget and cfg.draft_guard else None   # does drafting pay at all
        self.book = AcceptanceBook(learnt=cfg.learnt_acceptance)   # acceptance by arm, sampling, evidence
        self._plain = False                         # this step scores no draft it may drop (the guard's call)
        self._wake = threading.Condition()

    # --- the client side (any thread) ---------------------------------------------------------------------
    def submit(self, s: Sequence) -> None:
        with self._wake:
            if len(self.waiting) >= self.cfg.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already wait for a KV slot on this replica")
            self.waiting.append(s)
            self._wake.notify()

    def cancel(self, s: Sequence) -> None:
        """Stop `s` at the next step boundary (its slot is freed then; no more events after its end)."""
        s.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting)}

    def run(self, stop: threading.Event) -> None:
        """The replica's step loop (its own thread)."""
        while not stop.is_set():
            with self._wake:
                if not self.waiting and not self.running:
                    self._wake.wait(0.2)
                    continue
            try:
                self.step()
            except Exception:   # the loop outlives any failure: a dead loop would hang every request after it
                logger.exception("step loop: a step failed outside any request's handling")
        for s in list(self.running) + list(self.waiting):
            self._end(s, error=RuntimeError("the engine stopped"))

    # --- the loop side (one thread) -----------------------------------------------------------------------
    def step(self) -> None:
        self._admit()
        for s in [s for s in self.running if s.cancelled]:
            self._end(s, reason="cancelled")
        if not self.running:
            return
        try:
            self._step()
        except Exception as exc:   # a failure of the shared forward: its requests end with it, the loop goes on
            for s in list(self.running):
                self._end(s, error=exc)

    def _admit(self) -> None:
        with self._wake:
            while self.waiting and self.waiting[0].session.pool.free > 0:
                s = self.waiting.popleft()
                if s.cancelled:
                    self._end(s, reason="cancelled")
                    continue
                s.session.bind()
                s.t_admit = time.perf_counter()
                self.running.append(s)

    def _step(self) -> None:
        t0 = time.perf_counter()
        decoding = [s for s in self.running if not s.prefilling]
        loading = sum(min(self.cfg.prefill_chunk, len(s.prompt) - s.fed) for s in self.running if s.prefilling)
        guarded = (self.guard is not None and len(decoding) >= self.cfg.guard_from_batch
                   and any(not isinstance(s.proposer, ARProposer) for s in decoding))
        self._plain = guarded and not self.guard.drafting(len(decoding))
        self.metrics.plain_steps += self._plain
        before = sum(len(s.seq) for s in decoding) if guarded else 0
        drafts, forced = self._propose(decoding, len(decoding) + min(loading, self.cfg.step_tokens))
        items = [Item(s.session, [s.seq[-1], *d.tokens],
                      None if d.parents is None else [-1, *(p + 1 for p in d.parents)])
                 for s, d in zip(decoding, drafts)]
        room = self.cfg.step_tokens - sum(len(it.tokens) for it in items)
        chunks: list[Sequence] = []
        for s in (s for s in self.running if s.prefilling):
            n = min(self.cfg.prefill_chunk, len(s.prompt) - s.fed, max(room, 0 if items or chunks else 1))
            if n <= 0:
                break
            room -= n
            last = s.fed + n == len(s.prompt)      # the chunk with the prompt's last token yields the first token
            items.append(Item(s.session, s.prompt[s.fed: s.fed + n], rows="last" if last else "none"))
            chunks.append(s)
            s.fed += n
        t1 = time.perf_counter()
        self.metrics.last_batch = len(items)
        logits = forward_batch(items)
        first = [s for s in chunks if not s.prefilling]
        for s in first:
            s.stats.prefill_s = time.perf_counter() - s.t_admit
        rows = {id(it.session): lg for it, lg in zip(items, logits)}
        scored, judged = self._score(decoding + first, drafts + [Draft([])] * len(first), rows)
        verdicts = verify_batch(scored, self.noise, self.eos_ids)
        t2 = time.perf_counter()
        for (s, d, raw), v in zip(judged, verdicts):
            self._apply(s, d, raw, v, forced.get(id(s), False) or s in first)
        self._count(len(items), sum(len(it.tokens) for it in items), decoding, t1 - t0, t2 - t1)
        if guarded and not chunks:     # a pure-decode step: what its mode emitted per second
            self.guard.observe(len(decoding), not self._plain, sum(len(s.seq) for s in decoding) - before,
                               time.perf_counter() - t0)

    def _propose(self, decoding: list[Sequence], base_tokens: int) -> tuple[list[Draft], dict[int, bool]]:
        """Every decoding request's draft: the grammar's forced tokens, else its arm's (batched where it can),
        within the step's draft budget."""
        drafts: dict[int, Draft] = {}
        forced: dict[int, bool] = {}
        groups: dict[Any, list[tuple[Sequence, int]]] = {}
        caps = self._caps(decoding, base_tokens)
        for s, cap in zip(decoding, caps):
            room = min(self.k_max, s.budget - 1)
            ff = s.constraint.forced(room) if s.constraint is not None else None
            if ff is not None:
                drafts[id(s)], forced[id(s)] = ff, True
                continue
            groups.setdefault(getattr(s.proposer, "propose_batch", None), []).append((s, min(room, cap)))
        for batch_fn, members in groups.items():
            if batch_fn is not None:
                try:
                    got = batch_fn([s.proposer for s, _ in members], [s.seq for s, _ in members],
                                   [r for _, r in members])
                except Exception as exc:   # an arm's failure must not fail its requests: they fall back to AR
                    got = [self._fallback(s, exc) for s, _ in members]
                drafts.update((id(s), d) for (s, _), d in zip(members, got))
                continue
            for s, r in members:
                try:
                    drafts[id(s)] = s.proposer.propose(s.seq, r)
                except Exception as exc:
                    drafts[id(s)] = self._fallback(s, exc)
        out = []
        for s in decoding:   # a tree arm's template may be wider than k; the grammar prunes what leaves it
            d = drafts[id(s)].head(min(self.k_max, s.budget - 1))
            out.append(s.constraint.restrict(d, s.params) if s.constraint is not None else d)
        return self._cut(decoding, out, forced, base_tokens), forced

    def _caps(self, decoding: list[Sequence], base_tokens: int) -> list[int]:
        """Before drafting: how far each request's arm may draft (arms that draft with a model pay per token).
        A table arm that drafted nothing last step is not capped (its lookup is free: it shows what it has
        first); an arm that pays to draft is capped every step, so a cap of zero sticks while drafting does not
        pay (its drafter is not run one step in two just to be cut). A sampled request whose arm drafts with a
        distribution is never capped (a batch-dependent cap would change its sample)."""
        free = self.k_max
        if not self.cfg.draft_budget:
            return [free] * len(decoding)
        if self._plain:   # only a sampled request's soft drafts are never capped
            why = self._why(len(decoding))
            for s in decoding:
                if not isinstance(s.proposer, ARProposer):
                    s.stats.budget_reason = why
            return [free if self._uncut(s) else 0 for s in decoding]
        cost = [getattr(s.proposer, "draft_cost_s", 0.0) for s in decoding]
        planned = [i for i, s in enumerate(decoding)
                   if (s.drafted_last or (cost[i] > 0 and (s.params.greedy or self.cfg.cap_sampled_drafts)))
                   and not self._uncut(s)]
        asks = [Ask(self._alpha(decoding[i]), free, cost[i], context=decoding[i].session.length) for i in planned]
        caps = [free] * len(decoding)
        cached = sum(s.session.length for s in decoding)
        for i, cap in zip(planned, plan(asks, base_tokens, self.curve, self.attention, len(decoding), cached)):
            caps[i] = cap
        return caps

    def _cut(self, decoding: list[Sequence], drafts: list[Draft], forced: dict[int, bool],
             base_tokens: int) -> list[Draft]:
        """After drafting: verify only the draft tokens whose expected acceptance pays for their forward cost."""
        if not self.cfg.draft_budget:
            return drafts
        fixed = [len(d.tokens) if forced.get(id(s)) or (d.probs is not None and not s.params.greedy) else 0
                 for s, d in zip(decoding, drafts)]
        alphas = [self._alpha(s, d.evidence) for s, d in zip(decoding, drafts)]
        asks = [Ask(a, len(d.tokens), 0.0, f, s.session.length) for s, d, f, a in zip(decoding, drafts, fixed, alphas)]
        cached = sum(a.context for a in asks)
        keeps = fixed if self._plain else plan(asks, base_tokens, self.curve, self.attention, len(decoding), cached)
        out = []
        for s, d, keep, alpha in zip(decoding, drafts, keeps, alphas):
            if keep < len(d.tokens):
                s.stats.budget_cut += len(d.tokens) - keep
                s.stats.budget_reason = self._why(len(decoding), len(d.tokens), keep, alpha)
                d = d.head(keep)
            out.append(d)
        return out

    def _alpha(self, s: Sequence, evidence: int | None = None) -> float:
        """The per-token acceptance the budget prices `s`'s next draft at: its own evidence (of drafts of this
        evidence class; None = all its drafts), shrunk towards what the replica learnt for the class."""
        if not self.book.learnt:
            return s.acceptance.alpha
        own = s.acceptance if evidence is None else s.by_evidence.get(evidence)
        prior = self.book.alpha(_class(s, evidence))
        return prior if own is None else own.estimate(prior)

    def _learn(self, s: Sequence, d: Draft, accepted: int) -> None:
        drafted = len(d.tokens)
        s.acceptance.update(accepted, drafted)
        if self.book.learnt:
            s.by_evidence.setdefault(d.evidence, _own_acceptance()).update(accepted, drafted)
            self.book.update(_class(s, None), accepted, drafted)
            self.book.update(_class(s, d.evidence), accepted, drafted)

    def _uncut(self, s: Sequence) -> bool:
        """A sampled request whose arm drafts from a distribution, on a loop that never caps those drafts (a cap
        that depends on the batch changes its sample)."""
        return s.soft_drafts and not s.params.greedy and not self.cfg.cap_sampled_drafts

    def _why(self, batch: int, drafted: int = 0, keep: int = 0, alpha: float = 0.0) -> str:
        if not self._plain:
            return f"batch of {batch}: {drafted} drafted, {keep} worth their forward cost at acceptance {alpha:.2f}"
        drafting, plain = self.guard.rate(batch)
        return (f"batch of {batch}: plain decoding measured faster than drafting here "
                f"({_rate(plain)} vs {_rate(drafting)} tokens/s)")

    def _score(self, seqs: list[Sequence], drafts: list[Draft], rows: dict[int, torch.Tensor]
               ) -> tuple[list[Scored], list]:
        """Each request's rows, grammar-masked; a request whose grammar fails ends here, the others go on."""
        scored, judged = [], []
        for s, d in zip(seqs, drafts):
            raw = rows[id(s.session)]                                            # [k'+1, V]
            try:
                masked = s.constraint.mask(raw, d, s.params) if s.constraint is not None else raw
            except RequestError as exc:
                self._end(s, error=exc)
                continue
            scored.append(Scored(masked, d, s.params, s.seed, len(s.seq), s.budget))
            judged.append((s, d, raw))
        return scored, judged

    def _apply(self, s: Sequence, d: Draft, raw: torch.Tensor, v: Verdict, not_arms: bool) -> None:
        """Roll the cache back to what was accepted, let the arm observe, emit, and end the request if done."""
        v = replace(v, scored=[s.seq[-1], *d.tokens], logits=raw)
        if v.path:  # tree: move the accepted nodes' cache entries onto the sequence
            s.session.keep([len(s.seq) + i for i in v.path], len(s.seq))
        s.session.rollback(len(s.seq) + v.accepted)
        if not not_arms:    # a step the grammar drafted, or the prompt's last chunk, is none of the arm's business
            try:
                s.proposer.observe(s.seq, v)
            except Exception as exc:
                self._fallback(s, exc)
        try:
            emitted = v.emitted if s.constraint is None else s.constraint.commit(v, s.budget)
        except RequestError as exc:
            self._end(s, error=exc)
            return
        s.seq.extend(emitted)
        s.budget -= len(emitted)
        st = s.stats
        drafted = 0 if not_arms else len(d.tokens)
        if drafted:
            self._learn(s, d, v.accepted)
            s.soft_drafts = d.probs is not None
            st.draft_hist[drafted] = st.draft_hist.get(drafted, 0) + 1
        if not not_arms:
            s.drafted_last = drafted > 0
        st.batch_sum += self.metrics.last_batch
        st.steps += 1
        st.drafts += drafted > 0
        st.drafted += drafted
        st.accepted += 0 if not_arms else v.accepted
        st.emitted += len(emitted)
        if s.constraint is not None:
            st.forced += (v.accepted if not_arms and d.tokens else 0) + len(emitted) - len(v.emitted)
            st.pruned = s.constraint.pruned
        self._emit(s, ("tokens", emitted))
        if emitted[-1] in self.eos_ids and (not s.params.ignore_eos or s.constraint is not None):
            self._end(s, reason="stop")
        elif s.budget <= 0:
            self._end(s, reason="length")

    def _fallback(self, s: Sequence, exc: Exception) -> Draft:
        s.stats.fallback, s.proposer = f"{type(exc).__name__}: {exc}", ARProposer()
        return Draft([])

    def _end(self, s: Sequence, reason: str = "", error: Exception | None = None) -> None:
        if s in self.running:
            self.running.remove(s)
        try:
            s.session.release()
            if s.on_end is not None:
                s.on_end()
        finally:
            self._emit(s, ("error", error) if error is not None else ("end", reason))

    def _emit(self, s: Sequence, event: tuple) -> None:
        """Hand an event to the request's consumer; a consumer that is gone (closed event loop) cancels it."""
        try:
            s.sink(event)
        except Exception:
            s.cancelled = True

    def _count(self, batch: int, tokens: int, decoding: list[Sequence], propose_s: float, verify_s: float) -> None:
        m = self.metrics
        m.steps += 1
        m.tokens_scored += tokens
        m.last_batch, m.last_tokens = batch, tokens
        m.batch_hist[batch] = m.batch_hist.get(batch, 0) + 1
        for s in decoding:
            s.stats.propose_s += propose_s
            s.stats.verify_s += verify_s


def _class(s: Sequence, evidence: int | None) -> tuple[str, bool, int]:
    """A draft's class in the AcceptanceBook: (its arm, greedy, evidence; -1 = any draft of the arm)."""
    return type(s.proposer).__name__, s.params.greedy, -1 if evidence is None else evidence


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"
