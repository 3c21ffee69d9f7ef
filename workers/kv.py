"""KV cache pools and the batched forward: one call scores the new tokens of many sequences, each in its own slot.

A pool is allocated once (a replica's whole KV memory); a `SlotSession` is one sequence's view of it. A session
is created unbound and holds no memory until `bind()` gives it a slot; `release()` hands the slot back at once,
explicitly (a finished or cancelled request never waits for garbage collection). `forward_batch` groups the items
of one step by pool and runs ONE forward per pool over all of their tokens (ragged: each item its own slot,
positions and mask).

    >>> pool = model.pool(slots=4, slot_tokens=256)
    >>> a, b = pool.session(), pool.session()
    >>> a.bind(); b.bind()
    >>> la, lb = forward_batch([Item(a, [5, 6, 7]), Item(b, [9], rows="last")])   # [3, V] and [1, V]
    >>> a.release(); b.release()
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Item:
    """One sequence's share of a batched forward."""

    session: "SlotSession"
    tokens: list[int]                   # [T] new tokens, scored at cache positions session.length..
    parents: list[int] | None = None    # [T] tree over the new tokens (parents[i] < i, -1 = root); None = chain
    rows: str = "all"                   # logits returned: "all" [T, V], "last" [1, V] or "none" (prefill chunk)


class Pool(Protocol):
    """Where sessions' caches live; `forward(items, exit_layer)` scores items that all belong to this pool."""

    slots: int

    def session(self, capacity: int | None = None) -> "SlotSession": ...

    def forward(self, items: list[Item], exit_layer: int | None) -> list[torch.Tensor | None]: ...


class SlotPool:
    """Slot bookkeeping shared by every pool kind: a free list (lowest slot first, so a batch's slots stay dense)."""

    def __init__(self, slots: int, slot_tokens: int) -> None:
        if slots < 1 or slot_tokens < 1:
            raise ValueError(f"a KV pool needs slots >= 1 and slot_tokens >= 1, got {slots}, {slot_tokens}")
        self.slots, self.slot_tokens = slots, slot_tokens
        self._free = list(range(slots))
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    def session(self, capacity: int | None = None) -> SlotSession:
        return SlotSession(self, min(capacity or self.slot_tokens, self.slot_tokens))

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("KV pool exhausted: admission must wait for a free slot")
            self._free.sort()
            return self._free.pop(0)

    def give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def on_bind(self, session: SlotSession) -> None:
        """Hook for pools that keep per-session state (HF's DynamicCache)."""

    def forward(self, items: list[Item], exit_layer: int | None) -> list[torch.Tensor | None]:
        raise NotImplementedError


class SlotSession:
    """One sequence's KV cache: `length` positions held in a slot of its pool (gpt-fast: every token but the last)."""

    def __init__(self, pool: SlotPool, capacity: int) -> None:
        self.pool, self.capacity = pool, capacity
        self.slot: int | None = None
        self.length = 0
        self.filled: list[int] = []      # per layer: positions whose k/v that layer holds (early exits fill fewer)
        self.state = None                # pool-specific per-session state (HF: its DynamicCache)

    @property
    def bound(self) -> bool:
        return self.slot is not None

    def bind(self) -> None:
        """Take a slot (raises when the pool has none free: callers admit only while `pool.free`)."""
        if self.slot is None:
            self.slot, self.length = self.pool.acquire(), 0
            self.filled = [0] * getattr(self.pool, "num_layers", 0)
            self.pool.on_bind(self)

    def release(self) -> None:
        """Give the slot back now; the session may be bound again later (it starts empty)."""
        if self.slot is not None:
            slot, self.slot, self.state, self.length = self.slot, None, None, 0
            self.pool.give_back(slot)

    def forward(self, tokens: list[int], exit_layer: int | None = None,
                parents: list[int] | None = None) -> torch.Tensor:
        """This session alone (a batch of one): [T, V] float logits; binds a slot on first use."""
        self.bind()
        return self.pool.forward([Item(self, list(tokens), parents)], exit_layer)[0]

    def rollback(self, length: int) -> None:
        # Entries beyond `length` stay in memory and are overwritten before they are read again.
        self.length = min(self.length, length)
        self.filled = [min(f, length) for f in self.filled]
        if self.state is not None:
            self.pool.crop(self, length)

    def keep(self, slots: list[int], at: int) -> None:
        """Move the cache entries at `slots` (ascending, each >= at) to at, at + 1, ... (tree acceptance)."""
        self.pool.keep(self, slots, at)


def forward_batch(items: list[Item], exit_layer: int | None = None) -> list[torch.Tensor | None]:
    """Score every item; one forward per pool among the items' sessions (a step's target items share one)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        item.session.bind()
        groups.setdefault(id(item.session.pool), []).append(i)
    for index in groups.values():
        pool = items[index[0]].session.pool
        for i, logits in zip(index, pool.forward([items[i] for i in index], exit_layer)):
            out[i] = logits
    return out


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each node (0 = a root), parents[i] < i."""
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        depth[i] = depth[p] + 1 if p >= 0 else 0
    return depth


def tree_visibility(parents: list[int]) -> torch.Tensor:
    """[T, T] bool on the host: node i sees its ancestors and itself."""
    T = len(parents)
    seen = torch.eye(T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            seen[i] |= seen[p]
    return seen
