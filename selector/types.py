"""What the router and the selector exchange, and the outcome record every finished request leaves behind."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

OUTCOME_SCHEMA = 1


@dataclass(frozen=True)
class PoolInfo:
    """One worker pool as the router sees it (pool = model pair + hardware profile)."""

    name: str                                   # pool name, e.g. "cpu-small"
    methods: tuple[str, ...]                    # arms its workers can run
    hardware: dict[str, float | str] = field(default_factory=dict)  # profile: accelerator, mem_gb, rel_speed...
    load: float = 0.0                           # ongoing requests / capacity, 0..1+
    batch: dict[str, float] = field(default_factory=dict)   # its replica's features.load_features ({} = idle)


@dataclass(frozen=True)
class Choice:
    """The router's decision for one request."""

    pool: str
    method: str
    reason: str                                 # "model", "override", "explore", "rule: ...", "fixed"
    scores: dict[str, float] = field(default_factory=dict)   # predicted tokens/s per "pool/method"
    explored: bool = False                      # a non-greedy pick made to keep the log covering all arms
    features: dict[str, float] = field(default_factory=dict)  # what the choice was made from
    selector_version: str = "fixed"


@dataclass(frozen=True)
class Outcome:
    """One finished request (served or collected offline); one JSON line in the outcome log."""

    request_id: str
    ts: float                                   # unix time at finish
    source: str                                 # "service" | "collect"
    pool: str
    method: str
    status: str                                 # "OK" or a gRPC status code name
    features: dict[str, float]                  # selector features at choice time
    prompt_id: str | None = None                # dataset id (collect) or a hash of the prompt (service)
    category: str | None = None                 # dataset category when known
    explored: bool = False
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    selector_version: str = "fixed"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    acceptance_length: float = 1.0              # 1 + accepted / drafts
    acceptance_rate: float = 0.0                # accepted / drafted
    finish_reason: str = ""
    fallback: str | None = None                 # why the arm fell back to AR mid-request
    temperature: float = 0.0
    max_tokens: int = 0
    has_constraint: bool = False
    concurrency: int = 0                        # collect: requests decoded together (0 = not a collect batch)
    batch_mean: float = 0.0                     # mean requests per step it shared (stats batch_sum / steps)
    budget_cut: int = 0                         # draft tokens the step budget cut
    schema: int = OUTCOME_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "Outcome":
        data: dict[str, Any] = json.loads(line)
        if data.get("schema") != OUTCOME_SCHEMA:
            raise ValueError(f"outcome schema {data.get('schema')!r} is not {OUTCOME_SCHEMA}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
