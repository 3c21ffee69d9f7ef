"""Lookup counters every shared table keeps: lookups, hits, drafted and accepted tokens, and their rates."""

from __future__ import annotations


def record_lookup(counters: dict[str, int], drafted: int, accepted: int, hit: bool) -> None:
    """Count one draft lookup: whether the table had an entry, tokens drafted from it and accepted."""
    counters["lookups"] += 1
    counters["hits"] += hit
    counters["drafted"] += drafted
    counters["accepted"] += accepted


def lookup_rates(counters: dict[str, int]) -> dict[str, float]:
    """hit_rate = hits / lookups, acceptance_rate = accepted / drafted (0 when nothing was counted)."""
    c = counters
    return {"hit_rate": c["hits"] / c["lookups"] if c["lookups"] else 0.0,
            "acceptance_rate": c["accepted"] / c["drafted"] if c["drafted"] else 0.0}
