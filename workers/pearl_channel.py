"""The channel between PEARL's target side (proposers/pearl.py) and a drafter running beside it, and the
drafter's loop (`serve`); workers/pearl.py starts drafters, leases them to requests and restarts them.

The channel is one shared buffer of raw arrays (nothing crossing it is pickled) and two pipes used only as
doorbells (a byte means "look at the shared state").

    ctl     int64[32]     control words: M_* written by the target side, D_* by the drafter
    params  float64[4]    temperature, top_k, top_p, seed of the request being served
    seq     int32[C]      the committed sequence (target side; append-only within a request)
    draft   int32[C]      the drafter's chain: draft[p] is its token for absolute position p, D_START <= p < D_END
    q       float32[R, V] the drafter's distribution for position p in row p % R (sampled requests only)
    trace   int64[N, 3]   drafter busy intervals (start ns, end ns, tokens fed), a ring for timelines

Every word has one writer, and a writer stores data before the counter that publishes it (x86-64 keeps stores in
order; a weakly ordered CPU would need fences). The target side starts a request or rolls the drafter back by
writing tokens and M_COMMITTED, then bumping M_EPOCH; a fully accepted draft only advances M_COMMITTED. On a new
epoch the drafter feeds seq[:M_COMMITTED] (common-prefix rollback of its KV cache), publishes D_START = D_END =
M_COMMITTED and D_EPOCH, then drafts position D_END while D_END < M_COMMITTED + M_LOOKAHEAD, writing draft[p]
(and its q row) before D_END = p + 1. A token finished after the target side moved to another epoch is dropped.
Sampled drafts use noise keyed by (request seed, position) (workers/sampling.py), so a draft never depends on timing.

One drafter serves several requests at once, a channel ("lane") each: every round of its loop scores the next
position of every lane that has one in a single batched drafter forward (its own KV pool, a slot per lane), the
drafter-side counterpart of the target's step.
"""

from __future__ import annotations

import mmap
import os
import select
import time

import numpy as np
import torch

from .drafter_cache import DrafterCache
from .kv import Item, forward_batch
from .model import Model
from .sampling import DRAFT, Noise, probs_from_logits, race
from .types import SamplingParams

# control words, target side
M_EPOCH, M_COMMITTED, M_REQ, M_RUN, M_SHUTDOWN, M_PING, M_LOOKAHEAD = range(7)
# control words, drafter side
D_READY, D_EPOCH, D_START, D_END, D_STEP_NS, D_PONG, D_TRACE_N, D_ERROR, D_CALIB_NS = range(8, 17)
N_CTL, N_PARAMS, N_TRACE = 32, 4, 8192


class DrafterGone(RuntimeError):
    """The drafter process or thread died (or stopped answering); the request falls back to AR."""


# ---- the channel -------------------------------------------------------------------------------------------------

class Channel:
    """Views over one shared buffer plus two doorbell pipes; see the module docstring for the layout."""

    def __init__(self, buf, capacity: int, vocab: int, ring: int, fds: tuple[int, int, int, int]) -> None:
        self.buf, self.capacity, self.vocab, self.ring = buf, capacity, vocab, ring
        self.wake_r, self.wake_w, self.bell_r, self.bell_w = fds
        for name, dtype, shape, offset in _layout(capacity, vocab, ring)[0]:
            setattr(self, name, np.frombuffer(buf, dtype, int(np.prod(shape)), offset).reshape(shape))

    @staticmethod
    def nbytes(capacity: int, vocab: int, ring: int) -> int:
        return _layout(capacity, vocab, ring)[1]

    @classmethod
    def create(cls, capacity: int, vocab: int, ring: int, shared: bool) -> tuple["Channel", int | None]:
        """A zeroed channel; `shared`: backed by an anonymous memfd another process can map (its fd is returned)."""
        size = cls.nbytes(capacity, vocab, ring)
        fd = os.memfd_create("metaspec-pearl") if shared else None
        if fd is not None:
            os.ftruncate(fd, size)
        buf = mmap.mmap(fd if fd is not None else -1, size)
        wake_r, wake_w = os.pipe()
        bell_r, bell_w = os.pipe()
        for end in (wake_w, bell_w, wake_r, bell_r):
            os.set_blocking(end, False)
        return cls(buf, capacity, vocab, ring, (wake_r, wake_w, bell_r, bell_w)), fd

    def ring_drafter(self) -> None:
        _ring(self.wake_w)

    def ring_target(self) -> None:
        _ring(self.bell_w)

    def close(self) -> None:
        fds = (self.wake_r, self.wake_w, self.bell_r, self.bell_w)
        self.wake_r = self.wake_w = self.bell_r = self.bell_w = -1  # a closed number may be reused: never touch it
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _layout(capacity: int, vocab: int, ring: int) -> tuple[list[tuple], int]:
    """[(name, dtype, shape, byte offset)] of the channel's arrays (64-byte aligned) and the total size."""
    arrays = [("ctl", np.int64, (N_CTL,)), ("params", np.float64, (N_PARAMS,)), ("seq", np.int32, (capacity,)),
              ("draft", np.int32, (capacity,)), ("q", np.float32, (ring, vocab)), ("trace", np.int64, (N_TRACE, 3))]
    out, offset = [], 0
    for name, dtype, shape in arrays:
        offset = -(-offset // 64) * 64
        out.append((name, dtype, shape, offset))
        offset += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return out, offset


def _ring(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except (BlockingIOError, OSError):  # a full pipe already wakes the reader; a closed one has no reader
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def wait_for(done, bell_fd: int, spin_s: float, gone, timeout_s: float, what: str) -> None:
    """Spin on `done()` for spin_s, then block on the doorbell (2 ms slices). Raise DrafterGone when `gone()`
    returns a reason (the drafter died) or timeout_s passes."""
    t0 = time.perf_counter()
    while not done():
        waited = time.perf_counter() - t0
        if waited < spin_s:
            continue
        if reason := gone():
            raise DrafterGone(f"pearl drafter {reason} ({what}); the next request gets a restarted one")
        if waited > timeout_s:
            raise DrafterGone(f"pearl drafter did not answer within {timeout_s:.0f} s ({what})")
        select.select([bell_fd], [], [], 0.002)
        _drain(bell_fd)


# ---- the drafter loop (runs in the drafter process, or in a thread) ---------------------------------------------

PREFILL_CHUNK = 64   # most tokens one lane feeds per drafter forward (a new request's prompt loads over several,
                     # so the other lanes keep drafting while it does)


def _request_params(ch: Channel) -> tuple[SamplingParams, int]:
    temperature, top_k, top_p, seed = ch.params.tolist()
    return SamplingParams(temperature=temperature, top_k=int(top_k), top_p=top_p), int(seed)


def _calibrate(model: Model) -> int:
    """Median ns of one single-token drafter forward at a short context (the speed ratio's denominator)."""
    session = model.session(64)
    session.forward([i % model.vocab_size for i in range(4, 20)])
    times = []
    for i in range(15):
        t0 = time.perf_counter_ns()
        float(session.forward([(7 * i) % model.vocab_size])[-1, 0])  # float(): waits for a GPU too
        times.append(time.perf_counter_ns() - t0)
    session.release()
    return int(sorted(times[3:])[len(times[3:]) // 2])


class _Lane:
    """One request's drafting on the drafter side: its channel, its slot of the drafter's KV pool, its chain."""

    def __init__(self, ch: Channel, session) -> None:
        self.ch, self.feeder = ch, DrafterCache(None, ch.capacity, session)
        self.epoch, self.req, self.chain, self.params, self.seed, self.traced = -1, -1, [], SamplingParams(), 0, 0

    def ready(self) -> bool:
        """Follow the target side (ping, run, a new epoch); True when this lane has a position to draft."""
        ch, c = self.ch, self.ch.ctl
        if c[M_PING] != c[D_PONG]:
            c[D_PONG] = c[M_PING]
            ch.ring_target()
        if not c[M_RUN]:
            return False
        if c[M_EPOCH] != self.epoch:
            self.epoch, n = int(c[M_EPOCH]), int(c[M_COMMITTED])  # epoch first: M_COMMITTED is stored before it
            if c[M_REQ] != self.req:
                self.req, (self.params, self.seed) = int(c[M_REQ]), _request_params(ch)
            prefix = ch.seq[:n].copy()
            self.feeder.rollback_to(prefix)   # common-prefix rollback on a new epoch
            self.chain = prefix.tolist()
            c[D_EPOCH], c[D_START], c[D_END] = -1, n, n
            c[D_EPOCH] = self.epoch
        p = len(self.chain)   # an empty sequence has nothing to draft after (and must not fail the other lanes)
        return 0 < p < ch.capacity and p < c[M_COMMITTED] + c[M_LOOKAHEAD]

    def publish(self, token: int, q: torch.Tensor | None, fed: int, t0: int, t1: int) -> None:
        """Trace the forward; hand the drafted token (and its q row) over unless the target side moved on."""
        ch, c, p = self.ch, self.ch.ctl, len(self.chain)
        ch.trace[self.traced % N_TRACE] = (t0, t1, fed)
        self.traced += 1
        c[D_TRACE_N] = self.traced
        if fed == 1:
            c[D_STEP_NS] = (9 * int(c[D_STEP_NS]) + (t1 - t0)) // 10
        if c[M_EPOCH] != self.epoch:  # the target side moved on while this token was computed
            return
        ch.draft[p] = token
        if q is not None:
            ch.q[p % ch.ring, : q.shape[0]] = q.numpy()
        self.chain.append(token)
        c[D_END] = p + 1
        ch.ring_target()


def serve(lanes: list[Channel], model: Model, spin_s: float, parent_pid: int | None = None,
          chunk: int = PREFILL_CHUNK) -> None:
    """The drafter's loop: draft ahead of every lane's committed sequence until told to shut down.

    Each round scores the next position of every lane that has one in ONE drafter forward (a batch over the
    drafter's own KV pool, a slot per lane), so requests sharing a drafter do not take turns on it."""
    pool = model.pool(len(lanes), lanes[0].capacity)
    state, noise = [_Lane(ch, pool.session()) for ch in lanes], Noise("cpu")
    calib = _calibrate(model)
    for ch in lanes:
        ch.ctl[D_CALIB_NS] = ch.ctl[D_STEP_NS] = calib
        ch.ctl[D_READY] = 1
    while not any(ch.ctl[M_SHUTDOWN] for ch in lanes):
        ready = [lane for lane in state if lane.ready()]
        if not ready:
            _idle(lanes, spin_s, parent_pid)
            continue
        t0 = time.monotonic_ns()
        feeds = [lane.feeder.pending(lane.chain) for lane in ready]
        items = [Item(lane.feeder.session, f[:chunk], rows="last" if len(f) <= chunk else "none")
                 for lane, f in zip(ready, feeds)]
        logits = forward_batch(items)
        for lane, item in zip(ready, items):
            lane.feeder.fed_up(item.tokens)
        done = [(lane, len(f), lg[-1]) for lane, f, lg in zip(ready, feeds, logits) if lg is not None]
        greedy = [i for i, (lane, _, _) in enumerate(done) if lane.params.greedy]
        tokens: list[int | None] = [None] * len(done)
        if greedy:   # one host sync for every greedy lane
            picked = torch.stack([done[i][2] for i in greedy]).argmax(-1).tolist()
            for i, token in zip(greedy, picked):
                tokens[i] = token
        qs: list[torch.Tensor | None] = [None] * len(done)
        for i, (lane, _, lg) in enumerate(done):
            if tokens[i] is None:
                qs[i] = probs_from_logits(lg, lane.params).cpu()                           # [V]
                tokens[i] = int(race(qs[i], noise.rows(lane.seed, [len(lane.chain)], qs[i].shape[-1], DRAFT)[0]))
        t1 = time.monotonic_ns()
        for (lane, fed, _), token, q in zip(done, tokens, qs):
            lane.publish(token, q, fed, t0, t1)


def _idle(lanes: list[Channel], spin_s: float, parent_pid: int | None) -> None:
    """Wait for the target side to change something on any lane: spin briefly, then sleep on the wake pipes."""
    snapshot = [ch.ctl[:8].copy() for ch in lanes]
    spin_s = spin_s if any(ch.ctl[M_RUN] for ch in lanes) else min(spin_s, 50e-6)  # no request: sleep almost at once
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < spin_s:
        if any(not np.array_equal(ch.ctl[:8], snap) for ch, snap in zip(lanes, snapshot)):
            return
    select.select([ch.wake_r for ch in lanes], [], [], 0.05)
    for ch in lanes:
        _drain(ch.wake_r)
    if parent_pid is not None and os.getppid() != parent_pid:  # orphaned: the serving process is gone
        for ch in lanes:
            ch.ctl[M_SHUTDOWN] = 1
