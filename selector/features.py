"""Cheap, deterministic features of a request and of a worker pool, as flat `{name: float}` dicts.

Request features come from what the router already holds before any decoding: the prompt's token ids and text,
the sampling parameters and whether a constraint is attached. They are pure functions of their inputs (no
clock, no randomness), vectorised with numpy so that a 1,000-token prompt featurises in tens of microseconds.

>>> inp = RequestInput(prompt_ids=(5, 6, 7, 5, 6, 7), prompt_text="def f(x):\\n    return x", max_tokens=64)
>>> feats = request_features(inp)
>>> feats["rep1"], feats["rep3"], feats["max_tokens_log"] > 4
(0.5, 0.25, True)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FEATURE_VERSION = 3                  # 3: the batch's drafting mix; 2: the pool's batch load; 1: neither
COUNTED_DRAFTS = ("lookup", "model") # the registry's `drafts` kinds a load feature counts ("none": the rest)
ACCELERATORS = ("cpu", "T4", "L4", "A10G", "V100", "A100", "H100", "H200", "other")  # one-hot order
TAIL_TOKENS = 64                     # the prompt tail whose repetition best predicts prompt-lookup hits
_CODE_PUNCT = b"{}[]();:<>_#\\|`'\"@$&"
_OPERATORS = b"+-*/=^%~"
_CODE_WORDS = ("def ", "return", "import ", "class ", "function", "=>", "for (", "if (", "print(", "self.", "==")
_MATH_WORDS = ("how many", "how much", "calculate", "total", "solve", "equation", "percent", "$")


@dataclass(frozen=True)
class RequestInput:
    """What the selector sees of one request."""

    prompt_ids: Sequence[int]          # the tokenised prompt
    prompt_text: str = ""              # the prompt text (decoded from the ids when only ids were sent)
    max_tokens: int = 128              # tokens the client asked for at most
    temperature: float = 0.0           # 0 = greedy
    top_p: float = 1.0                 # nucleus mass
    has_constraint: bool = False       # a JSON schema / regex / grammar is attached


def request_input(request, tokenizer=None, has_constraint: bool | None = None) -> RequestInput:
    """A RequestInput from a `workers.request.Request`-like object (prompt and/or prompt_ids, params): the one
    conversion from the engine's request to the selector's input. The router tokenises a text prompt before it
    gets here (deploy/tokens.py): both are set, and nothing is tokenised again.

    With a tokenizer (the pools' shared one), text and ids are both exact. Without one, a text-only prompt gets
    word-level pseudo ids (crc32 of each whitespace-separated word): an approximation of the token ids the
    selector was trained on, kept only so that a router without a tokenizer still routes.
    """
    text, ids = request.prompt or "", request.prompt_ids
    if ids is None:
        ids = (tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None
               else [zlib.crc32(w.encode()) & 0xFFFFF for w in text.split()])
    elif not text and tokenizer is not None:
        text = tokenizer.decode(list(ids))
    p = request.params
    constrained = getattr(request, "constraint", None) is not None if has_constraint is None else has_constraint
    return RequestInput(ids, text, p.max_tokens, p.temperature, p.top_p, constrained)


def _packed_ngrams(ids: np.ndarray, n: int) -> np.ndarray:
    """Every n-gram of `ids` packed into one int64 (21 bits a token: any vocabulary below 2M); [len - n + 1]."""
    windows = max(0, len(ids) - n + 1)
    packed = np.zeros(windows, dtype=np.int64)
    for j in range(n):
        packed = (packed << 21) | ids[j: j + windows]
    return packed


def ngram_repetition(ids: np.ndarray, n: int) -> float:
    """Share of positions whose trailing n-gram already occurred earlier in `ids` (0 when too short).

    >>> ngram_repetition(np.array([1, 2, 1, 2, 1]), 2)
    0.5
    """
    packed = _packed_ngrams(ids, n)
    if len(packed) <= 1:
        return 0.0
    return float(len(packed) - len(np.unique(packed))) / len(packed)


def tail_repetition(ids: np.ndarray, n: int = 3, tail: int = TAIL_TOKENS) -> float:
    """Share of the last `tail` positions whose trailing n-gram occurred anywhere earlier in the prompt."""
    packed = _packed_ngrams(ids, n)
    if len(packed) <= 1:
        return 0.0
    _, first = np.unique(packed, return_index=True)
    seen_before = np.ones(len(packed), dtype=bool)
    seen_before[first] = False                     # a first occurrence is not a repeat
    return float(seen_before[-tail:].mean())


def text_features(text: str) -> dict[str, float]:
    """Character statistics that tell code, prose, math and structured data apart."""
    raw = text.encode("utf-8", "replace")
    n = max(len(raw), 1)
    hist = np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=256) if raw else np.zeros(256, np.int64)
    lines = int(hist[ord("\n")]) + 1
    lower = text.lower()

    def share(chars: bytes) -> float:
        return float(hist[list(chars)].sum()) / n

    return {
        "chars_log": math.log1p(len(text)),
        "code_punct": share(_CODE_PUNCT),
        "operators": share(_OPERATORS),
        "digits": float(hist[48:58].sum()) / n,
        "upper": float(hist[65:91].sum()) / n,
        "alpha": float(hist[65:91].sum() + hist[97:123].sum()) / n,
        "spaces": float(hist[32]) / n,
        "non_ascii": float(hist[128:].sum()) / n,
        "newlines": float(hist[10]) / n,
        "indent_lines": (text.count("\n    ") + text.count("\n\t")) / lines,
        "code_words": sum(map(lower.count, _CODE_WORDS)) / lines,
        "math_words": sum(map(lower.count, _MATH_WORDS)) / max(len(text) / 100.0, 1.0),
        "mean_line_chars_log": math.log1p(len(text) / lines),
    }


def request_features(inp: RequestInput,
                     ngram_hit_rate: Callable[[Sequence[int]], float] | None = None) -> dict[str, float]:
    """The request's feature dict (fixed key order). `ngram_hit_rate(prompt_ids)` asks the shared n-gram table
    how often the prompt's tail continues there (0..1); without one the feature is 0."""
    ids = np.asarray(inp.prompt_ids, dtype=np.int64)
    feats = {
        "prompt_tokens_log": math.log1p(len(ids)),
        "rep1": ngram_repetition(ids, 1),
        "rep2": ngram_repetition(ids, 2),
        "rep3": ngram_repetition(ids, 3),
        "tail_rep3": tail_repetition(ids, 3),
        "ngram_table_hit": float(ngram_hit_rate(inp.prompt_ids)) if ngram_hit_rate is not None else 0.0,
    }
    feats.update(text_features(inp.prompt_text))
    feats.update({
        "max_tokens_log": math.log1p(max(inp.max_tokens, 0)),
        "temperature": float(inp.temperature),
        "greedy": float(inp.temperature == 0),
        "top_p": float(inp.top_p),
        "has_constraint": float(bool(inp.has_constraint)),
    })
    return feats


def ngram_tail_hit_rate(table, order: int = 3, tail: int = 32) -> Callable[[Sequence[int]], float]:
    """The `ngram_hit_rate` hook over a shared n-gram table (anything with a `rows` mapping keyed by token
    tuples, e.g. `workers.store.NgramTable`): share of the prompt's last `tail` positions whose preceding
    `order` tokens have continuations in the table."""

    def hit_rate(ids: Sequence[int]) -> float:
        ids = list(ids)
        ends = range(max(order, len(ids) - tail + 1), len(ids) + 1)
        rows = table.rows
        hits = [bool(rows.get(tuple(ids[e - order: e]))) for e in ends]
        return sum(hits) / len(hits) if hits else 0.0

    return hit_rate


def load_features(running: float, waiting: float, slots_free: float, slots: int,
                  drafting: Mapping[str, float] | None = None) -> dict[str, float]:
    """The replica's batch at choice time, from cheap counters: requests in the step loop's batch, requests
    queued for a KV slot, the share of KV slots held, and how many of the running requests draft by lookup
    (pld, recycling, ngram_store: extra tokens in the forward) and with a model (sps, pearl, early_exit: a
    drafter forward too), by the registry's `drafts` (`drafting`: kind -> running requests). The request being
    chosen for is not counted.

    >>> load_features(running=3, waiting=0, slots_free=13, slots=16, drafting={"model": 2})
    {'load_running': 3.0, 'load_running_log': 1.3862943611198906, 'load_waiting': 0.0, 'load_kv_used': 0.1875, \
'load_lookup_drafting': 0.0, 'load_model_drafting': 2.0}
    """
    slots = max(int(slots), 1)
    running = max(float(running), 0.0)
    feats = {
        "load_running": running,
        "load_running_log": math.log1p(running),
        "load_waiting": float(max(waiting, 0)),
        "load_kv_used": min(max(1.0 - slots_free / slots, 0.0), 1.0),
    }
    feats.update({f"load_{kind}_drafting": min(float((drafting or {}).get(kind, 0.0)), running)
                  for kind in COUNTED_DRAFTS})
    return feats


IDLE_LOAD = load_features(0, 0, 1, 1)   # what feature-version-1 records (collected one request at a time) saw


def worker_load_features(stats, slots: int | None = None) -> dict[str, float]:
    """load_features from a worker's stats (`workers.worker.WorkerCounters`-like: running, waiting and, when it
    has them, slots_free/slots); `slots` (the pool's max_batch) stands in when the stats do not carry it."""
    running, waiting = int(getattr(stats, "running", 0)), int(getattr(stats, "waiting", 0))
    total = int(getattr(stats, "slots", 0) or slots or max(running, 1))
    free = getattr(stats, "slots_free", None)
    return load_features(running, waiting, total - running if free is None else int(free), total)


def inflight_load_features(inflight: int, replicas: int, max_batch: int,
                           drafting: Mapping[str, int] | None = None) -> dict[str, float]:
    """load_features from what a router counts itself, with no call to the workers: its requests in flight on a
    pool (`drafting`: how many of them by the kind of their arm's drafts), spread evenly over the pool's replicas
    of `max_batch` KV slots each; the running share of each kind is its share of what is in flight.

    >>> inflight_load_features(inflight=40, replicas=2, max_batch=16)["load_waiting"]
    4.0
    >>> inflight_load_features(inflight=40, replicas=2, max_batch=16, drafting={"model": 10})["load_model_drafting"]
    4.0
    """
    per_replica = max(inflight, 0) / max(replicas, 1)
    running = min(per_replica, max_batch)
    share = running / per_replica / max(replicas, 1) if per_replica else 0.0
    return load_features(running, per_replica - running, max_batch - running, max_batch,
                         {kind: n * share for kind, n in (drafting or {}).items()})


def pool_features(hardware: Mapping[str, float | str], load: float,
                  batch: Mapping[str, float] | None = None) -> dict[str, float]:
    """A pool's hardware profile and current load. Keys read from `hardware` (all optional): accelerator,
    mem_gb, rel_speed, cores, devices. `batch` is its replica's load_features (None = idle)."""
    accel = str(hardware.get("accelerator", "cpu"))
    accel = accel if accel in ACCELERATORS else "other"
    feats = {f"pool_accel={name}": float(name == accel) for name in ACCELERATORS}
    feats.update({
        "pool_mem_gb_log": math.log1p(float(hardware.get("mem_gb", 0.0))),
        "pool_rel_speed": float(hardware.get("rel_speed", 1.0)),
        "pool_cores": float(hardware.get("cores", 1.0)),
        "pool_devices": float(hardware.get("devices", 1.0)),
        "pool_load": float(load),
    })
    feats.update({k: float((batch or {}).get(k, v)) for k, v in IDLE_LOAD.items()})
    return feats


def upgrade(features: Mapping[str, float], peers_drafts: str | None = None) -> dict[str, float] | None:
    """A recorded feature dict in this version's terms, or None when it cannot be (an unknown version, or a
    version-2 record whose batch's drafting mix is unknown). Version 1 lacked the load features: its records
    were collected on an idle replica, so they get IDLE_LOAD. Version 2 lacked the drafting mix: `peers_drafts`
    is the `drafts` kind every peer in the batch ran (collect's batches run one arm: the record's own), None
    for a service's log (its batch-mates ran whatever the router chose: not recorded, so the record is dropped).

    >>> upgrade({"feature_version": 2.0, "load_running": 3.0}, "model")["load_model_drafting"]
    3.0
    >>> upgrade({"feature_version": 2.0, "load_running": 3.0}) is None
    True
    """
    version = features.get("feature_version", FEATURE_VERSION)
    if version == FEATURE_VERSION:
        return dict(features)
    if version == 1:
        return {**IDLE_LOAD, **features, "feature_version": float(FEATURE_VERSION)}
    if version == 2 and peers_drafts is not None:
        running = float(features.get("load_running", 0.0))
        mix = load_features(running, 0, 1, 1, {peers_drafts: running})
        return {**features, **{k: mix[k] for k in mix if k.endswith("_drafting")},
                "feature_version": float(FEATURE_VERSION)}
    return None


REQUEST_FEATURES = tuple(request_features(RequestInput(prompt_ids=(1,))))
POOL_FEATURES = tuple(pool_features({}, 0.0))
LOAD_FEATURES = tuple(IDLE_LOAD)
