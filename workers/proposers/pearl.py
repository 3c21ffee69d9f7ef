"""PEARL (Liu et al., ICLR 2025): the drafter runs beside the target and keeps drafting while the target verifies.

post-verify: while the target verifies a draft, the drafter (workers/pearl.py) continues it as if it were fully
accepted. When it is, and the target's bonus token equals the drafter's next token, the next draft is already
there and `propose` returns it at once; `observe` only advances the committed length. Otherwise `observe` rolls
the drafter back to the committed sequence (common-prefix rollback of its KV cache) and it starts over.
After a rollback nothing is drafted yet and the target waits for the drafter. The paper sends the first drafted
token alone (pre-verify: the target checks it while the drafter drafts the rest), which pays when a drafter step
costs about as much as a verification. Here, by default, the draft after a rollback is as long as the request's
per-token acceptance and the cost of a drafter step relative to a verification favour (workers/draft_length.py,
as for sps): with a drafter 14x faster than the target (this CPU), waiting for 3-5 tokens beats a 1-token
verification. `PearlConfig(pre_verify=True)` restores the paper's rule.
Draft length after a full acceptance: gamma = (drafter steps that fit in one target verification) - 1, so the
drafter produces a draft plus its bonus position while the target verifies.
Under greedy decoding both lengths follow timings measured as the request runs (the drafter's step, the target's
verification): lengths cannot change greedy output. A sampled request uses the speed ratio measured once when the
pool started, so its lengths depend on tokens only and the drafter seeds its sampling per position: a seeded
sampled request is reproducible, and the drafter's q rows travel with its tokens for the p/q rule.
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from ..draft_length import Acceptance, best_length, decayed_mean
from ..pearl import Drafter, DrafterPool, PearlConfig, pool_for
from ..pearl_channel import (D_END, D_EPOCH, D_STEP_NS, D_TRACE_N, M_COMMITTED, M_EPOCH, M_REQ, M_RUN, N_TRACE,
                             DrafterGone, wait_for)
from ..registry import ArmContext, register
from ..sampling import DRAFT, row_seed
from ..types import Draft, SamplingParams, Verdict


class PearlProposer:
    def __init__(self, pool: DrafterPool, drafter: Drafter | None, params: SamplingParams, seed: int,
                 cfg: PearlConfig, unavailable: str = "", speed_ratio: float = 5.0, lease_id: int | None = None) -> None:
        self.d, self.params, self.seed, self.cfg = drafter, params, seed, cfg
        self.speed_ratio, self.unavailable = speed_ratio, unavailable    # verification / drafter step, at start
        self.acceptance = Acceptance(prior=cfg.prior_accept, decay=cfg.decay)
        self.verify_s: float | None = None     # decayed mean of one verification as this request runs (greedy)
        self.n, self.epoch, self.proposed, self.rolled_back, self.exhausted = -1, -1, [], True, False
        self.events: list[tuple[str, int, int]] = []   # target side (kind, start ns, end ns): "wait", "verify"
        self.trace_from, self.t_sent, self.kept = 0, 0, 0   # kept: bonus tokens the drafter had already drafted
        # The lease this request holds, as it was when lease() returned (the drafter's own id moves on if the
        # lease is taken back); None = the drafter's current one.
        self.lease_id = -1 if drafter is None else drafter.lease_id if lease_id is None else lease_id
        self._release = weakref.finalize(self, pool.release, drafter, self.lease_id) if drafter is not None else None

    def propose(self, seq: list[int], k: int) -> Draft:
        d = self._live()
        if len(seq) != self.n:
            self._start(seq)
        m = min(k, self.length(), d.capacity - self.n)
        if self.exhausted or m <= 0:
            self.proposed, self.t_sent = [], time.monotonic_ns()
            return Draft([])
        self._wait_until(self.n + m)
        tokens = d.ch.draft[self.n: self.n + m].tolist()
        probs = None
        if not self.params.greedy:
            rows = [(self.n + i) % d.ch.ring for i in range(m)]
            probs = torch.from_numpy(d.ch.q[rows])                             # [m, V] (fancy indexing copies)
        self.proposed, self.t_sent = tokens, time.monotonic_ns()
        return Draft(tokens, probs)

    @property
    def ratio(self) -> float:
        """Verification time / drafter step: as measured during this request under greedy decoding, else at start."""
        if self.params.greedy and self.verify_s is not None and self.d is not None:
            return self.verify_s / max(float(self.d.ch.ctl[D_STEP_NS]) * 1e-9, 1e-7)
        return self.speed_ratio

    @property
    def gamma(self) -> int:
        """Draft length after a fully accepted draft: the drafter steps that fit in one verification, minus the
        bonus position (a configured gamma is kept as is)."""
        if self.cfg.gamma is not None:
            return self.cfg.gamma
        return max(1, min(self.cfg.gamma_max, round(self.ratio) - 1))

    def length(self) -> int:
        """Tokens the next draft holds."""
        if not self.rolled_back:
            return self.gamma                                        # drafted while the target verified
        if self.cfg.pre_verify:
            return 1
        return best_length(self.acceptance.alpha, 1.0 / self.ratio, self.cfg.gamma_max)   # waited for

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        self._live()
        now = time.monotonic_ns()
        self.events.append(("verify", self.t_sent, now))
        emitted, m, n = verdict.emitted, len(self.proposed), self.n
        if m:
            self.acceptance.update(verdict.accepted, m)
            self.verify_s = decayed_mean(self.verify_s, (now - self.t_sent) * 1e-9, self.cfg.decay)
        keep = emitted[:m] == self.proposed[: len(emitted[:m])]
        if keep and len(emitted) > m and not self.exhausted:  # post-verify: is the bonus the drafter's next token?
            if n + m >= self.d.capacity:
                keep = False
            else:
                self._wait_until(n + m + 1)
                keep = int(self.d.ch.draft[n + m]) == emitted[m]
                self.kept += keep
        self._commit(emitted, keep)

    def close(self) -> None:
        """End the request on the drafter and give it back to the pool (also done when the proposer is collected)."""
        if self._release is not None:
            self._release()

    def timeline(self) -> dict[str, list[tuple[str, int, int]]]:
        """Busy intervals of this request (monotonic ns): the target side's and the drafter's forwards."""
        out = {"target": list(self.events), "drafter": []}
        if self.d is not None:
            c, trace = self.d.ch.ctl, self.d.ch.trace
            end = int(c[D_TRACE_N])
            for i in range(max(self.trace_from, end - N_TRACE), end):
                t0, t1, fed = trace[i % N_TRACE].tolist()
                out["drafter"].append(("prefill" if fed > 1 else "draft", t0, t1))
        return out

    # ---- the channel --------------------------------------------------------------------------------------------

    def _live(self) -> Drafter:
        if self.d is None:
            raise DrafterGone(self.unavailable or "no pearl drafter")
        if self.d.lease_id != self.lease_id:
            raise DrafterGone("pearl drafter was taken back after this request sat idle")
        self.d.last_used = time.monotonic()
        if reason := self.d.gone():
            raise DrafterGone(f"pearl drafter {reason} mid-request; the next request gets a restarted one")
        return self.d

    def _lost(self) -> str | None:
        """Why a wait for the drafter cannot end: it died, or its lease went to another request."""
        if self.d.lease_id != self.lease_id:
            return "was taken back by another request"
        return self.d.gone()

    def _start(self, seq: list[int]) -> None:
        """Hand the drafter a (new or resynchronised) sequence: params, tokens, then a new epoch."""
        ch, c = self.d.ch, self.d.ch.ctl
        self.trace_from = int(c[D_TRACE_N]) if self.n < 0 else self.trace_from
        self.n, self.exhausted = len(seq), len(seq) >= self.d.capacity
        if self.exhausted:
            c[M_RUN] = 0
            return
        ch.params[:] = (self.params.temperature, self.params.top_k, self.params.top_p, self.seed)
        ch.seq[: self.n] = np.asarray(seq, dtype=np.int32)
        c[M_COMMITTED] = self.n
        c[M_REQ] += 1
        c[M_EPOCH] += 1
        self.epoch, self.rolled_back = int(c[M_EPOCH]), True
        c[M_RUN] = 1
        ch.ring_drafter()

    def _commit(self, emitted: list[int], keep: bool) -> None:
        ch, c, n = self.d.ch, self.d.ch.ctl, self.n
        self.n = n + len(emitted)
        if self.exhausted or self.n >= self.d.capacity:  # past the drafter's context: drafts end, decoding goes on
            self.exhausted, c[M_RUN] = True, 0
            return
        ch.seq[n: self.n] = emitted
        c[M_COMMITTED] = self.n
        if not keep:
            c[M_EPOCH] += 1
            self.epoch = int(c[M_EPOCH])
        self.rolled_back = not keep
        ch.ring_drafter()

    def _wait_until(self, end: int) -> None:
        c, epoch, t0 = self.d.ch.ctl, self.epoch, time.monotonic_ns()
        if not (c[D_EPOCH] == epoch and c[D_END] >= end):
            wait_for(lambda: c[D_EPOCH] == epoch and c[D_END] >= end, self.d.ch.bell_r, self.cfg.spin_s,
                     self._lost, self.cfg.wait_timeout_s, f"waiting for position {end - 1}")
            self.events.append(("wait", t0, time.monotonic_ns()))


@register("pearl", drafts="model", requires=("drafter",),
          placement=("second_device",),   # the router sends it where one is idle
          description="parallel drafting (PEARL): the drafter runs beside the target and keeps drafting while it verifies")
def build(ctx: ArmContext) -> PearlProposer:
    cfg = ctx.resources.get("pearl_config") or PearlConfig()
    pool = pool_for(ctx.drafter, cfg)
    seed = row_seed(ctx.seed, 0, DRAFT) if not ctx.params.greedy else 0   # the drafter's seed follows the request's
    drafter, unavailable = None, "every pearl drafter is serving another request"
    lease_id = None
    try:
        drafter, lease_id = pool.lease() or (None, None)
    except Exception as exc:  # a drafter that cannot start makes this request decode without drafts, not fail
        unavailable = f"pearl drafter could not start: {type(exc).__name__}: {exc}"
    ratio = pool.speed(ctx.target, drafter)["speed_ratio"] if drafter is not None else 1.0
    return PearlProposer(pool, drafter, ctx.params, seed, cfg, unavailable, ratio, lease_id)
