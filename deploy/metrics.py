"""The service's Prometheus metrics, named once (Ray's metrics API; Ray exports them on each node's metrics port).

Every metric also carries Serve's deployment/replica/application tags.
"""

from __future__ import annotations

from metaspec.selector.types import Choice, Outcome

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_TOKENS_PER_S = [5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200]
_ACCEPTANCE = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0]


class ServiceMetrics:
    """The router's metrics: one object per router replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        mp = ("method", "pool")
        self.requests = Counter("metaspec_requests_total", "finished requests by method, pool and gRPC status",
                                tag_keys=("method", "pool", "status"))
        self.errors = Counter("metaspec_errors_total", "requests answered with a non-OK status, by status and stage",
                              tag_keys=("status", "stage"))
        self.choices = Counter("metaspec_selector_choices_total", "selector decisions by pool, method and reason",
                               tag_keys=("method", "pool", "reason"))
        self.fallbacks = Counter("metaspec_fallbacks_total", "requests whose arm fell back to AR mid-request",
                                 tag_keys=mp)
        self.tokens = Counter("metaspec_completion_tokens_total", "tokens emitted", tag_keys=mp)
        self.tokens_per_s = Histogram("metaspec_tokens_per_s", "completion tokens per second per request",
                                      boundaries=_TOKENS_PER_S, tag_keys=mp)
        self.acceptance = Histogram("metaspec_acceptance_length", "mean acceptance length per request "
                                    "(1 + accepted / drafts)", boundaries=_ACCEPTANCE, tag_keys=mp)
        self.ttft = Histogram("metaspec_ttft_s", "time to first token at the router", boundaries=_SECONDS,
                              tag_keys=mp)
        self.wall = Histogram("metaspec_request_wall_s", "request time at the router", boundaries=_SECONDS,
                              tag_keys=mp)
        self.unrecorded_outcomes = Counter("metaspec_outcomes_unrecorded_total",
                                           "requests answered whose outcome could not be written to the log",
                                           tag_keys=("status",))
        self.log_counters = Gauge("metaspec_outcome_log", "the outcome log's counters (appended, unrecorded, "
                                  "pending_retry, dropped...)", tag_keys=("counter",))
        self.inflight = Gauge("metaspec_inflight_requests", "requests this router has in flight per pool",
                              tag_keys=("pool",))

    def chosen(self, choice: Choice) -> None:
        self.choices.inc(tags={"method": choice.method, "pool": choice.pool, "reason": _reason_tag(choice.reason)})

    def rejected(self, status: str) -> None:
        """A request refused before it reached a worker (bad input, auth, no pool)."""
        self.requests.inc(tags={"method": "", "pool": "", "status": status})
        self.errors.inc(tags={"status": status, "stage": "admission"})

    def finished(self, outcome: Outcome) -> None:
        tags = {"method": outcome.method, "pool": outcome.pool}
        self.requests.inc(tags=tags | {"status": outcome.status})
        if outcome.status != "OK":
            self.errors.inc(tags={"status": outcome.status, "stage": "decode"})
            return
        self.tokens.inc(outcome.completion_tokens, tags=tags)
        self.tokens_per_s.observe(outcome.tokens_per_s, tags=tags)
        self.acceptance.observe(outcome.acceptance_length, tags=tags)
        self.ttft.observe(outcome.ttft_s, tags=tags)
        self.wall.observe(outcome.wall_s, tags=tags)
        if outcome.fallback:
            self.fallbacks.inc(tags=tags)

    def unrecorded(self, outcome: Outcome) -> None:
        self.unrecorded_outcomes.inc(tags={"status": outcome.status})

    def outcome_log(self, stats: dict[str, int]) -> None:
        for name, value in stats.items():
            self.log_counters.set(value, tags={"counter": name})

    def set_inflight(self, pool: str, count: int) -> None:
        self.inflight.set(count, tags={"pool": pool})


def _reason_tag(reason: str) -> str:
    """Bounded label values: 'rule: drafter missing' -> 'rule'."""
    return reason.split(":", 1)[0].strip() or "unknown"
