"""Client load for `metaspec bench serve`: N closed-loop clients, or open-loop Poisson arrivals.

A backend's `send(request) -> Trace` blocks until the request ends; the load functions here only decide when each
request is sent and from which thread.

>>> traces, wall_s = closed_loop(send, requests, concurrency=4)    # 4 clients, each sends its next when one ends
>>> traces, wall_s = poisson(send, requests, rate_per_s=8.0, seed=0, max_concurrency=64)
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeRequest:
    prompt_id: str                 # source-qualified id ("specbench/321", "HumanEval/0", ...)
    category: str                  # the prompt's category
    text: str                      # the prompt text (remote backends that take text)
    ids: tuple[int, ...]           # the prompt tokenised (and left-truncated) with the target's tokenizer


@dataclass
class Trace:
    """One request as its client saw it (perf_counter seconds)."""

    t_send: float
    t_chunks: list[float] = field(default_factory=list)   # arrival time of each streamed chunk
    n_chunks: list[int] = field(default_factory=list)     # tokens in each chunk (>1 where a draft was accepted)
    error: str | None = None
    drafts: int = 0                # drafting steps (our arms; 0 where the backend cannot tell)
    accepted: int = 0              # draft tokens accepted

    @property
    def tokens(self) -> int:
        return sum(self.n_chunks)

    def chunk(self, n: int, t: float | None = None) -> None:
        if n > 0:
            self.t_chunks.append(time.perf_counter() if t is None else t)
            self.n_chunks.append(n)


Send = Callable[[ServeRequest], Trace]


def _guarded(send: Send, request: ServeRequest) -> Trace:
    """A request that raises becomes a failed trace: one bad request must not stop the load."""
    t = time.perf_counter()
    try:
        return send(request)
    except Exception as exc:  # noqa: BLE001 - recorded, counted, shown in the table
        return Trace(t, error=f"{type(exc).__name__}: {exc}")


def closed_loop(send: Send, requests: list[ServeRequest], concurrency: int,
                on_done: Callable[[], None] | None = None) -> tuple[list[Trace], float]:
    """`concurrency` clients, each sending the next unsent request when its previous one ends."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    pending, lock, traces = list(reversed(requests)), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                request = pending.pop()
            trace = _guarded(send, request)
            with lock:
                traces.append(trace)
            if on_done is not None:
                on_done()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, len(requests)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return traces, time.perf_counter() - t0


def arrival_offsets(n: int, rate_per_s: float, seed: int) -> list[float]:
    """Seconds after the start at which each of n Poisson arrivals (mean rate `rate_per_s`) is sent."""
    if rate_per_s <= 0:
        raise ValueError(f"request rate must be > 0, got {rate_per_s}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate_per_s)
    return out


def poisson(send: Send, requests: list[ServeRequest], rate_per_s: float, seed: int, max_concurrency: int,
            on_done: Callable[[], None] | None = None) -> tuple[list[Trace], float]:
    """Open loop: requests sent at Poisson arrival times, at most `max_concurrency` in flight (later ones queue)."""
    offsets = arrival_offsets(len(requests), rate_per_s, seed)
    t0 = time.perf_counter()

    def one(request: ServeRequest) -> Trace:
        trace = _guarded(send, request)
        if on_done is not None:
            on_done()
        return trace

    with ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(requests)))) as pool:
        futures = []
        for request, offset in zip(requests, offsets):
            time.sleep(max(0.0, t0 + offset - time.perf_counter()))
            futures.append(pool.submit(one, request))
        traces = [f.result() for f in futures]
    return traces, time.perf_counter() - t0


# ---- the machine under the load: was a pass slow, or the machine? --------------------------------------------

def cpu_jiffies() -> tuple[int, ...] | None:
    """The machine's CPU time counters (/proc/stat's first line: user nice system idle iowait irq softirq steal
    ...); None where there is none (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return tuple(int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None


def cpu_shares(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> dict[str, float | None]:
    """Between two `cpu_jiffies`: the share of CPU time that was busy and the share a hypervisor took from this
    VM (steal: its other guests ran), or None without counters.

    >>> cpu_shares((0, 0, 0, 100, 0, 0, 0, 0), (50, 0, 10, 130, 0, 0, 0, 10))
    {'busy_frac': 0.6, 'steal_frac': 0.1}
    """
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return {"busy_frac": None, "steal_frac": None}
    d = [b - a for a, b in zip(before, after)]
    total = sum(d)
    if total <= 0:
        return {"busy_frac": None, "steal_frac": None}
    return {"busy_frac": (total - d[3] - d[4] - d[7]) / total, "steal_frac": d[7] / total}


def canary_ms(size: int = 512, reps: int = 21) -> float:
    """The median time of one fixed float32 matmul in this process: the machine's speed at this moment, taken
    between passes (idle), so that passes on a machine that slowed down (another guest, a clock) can be told from
    passes that were slow."""
    import torch

    a, b = torch.ones(size, size), torch.ones(size, size)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2]
