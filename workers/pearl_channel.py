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
"""

from __future__ import annotations

import mmap
import os
import select
import time

import numpy as np
import torch

from .drafter_cache import DrafterCache
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
    return int(sorted(times[3:])[len(times[3:]) // 2])


def serve(ch: Channel, model: Model, spin_s: float, parent_pid: int | None = None) -> None:
    """The drafter's loop: draft ahead of the committed sequence until told to shut down."""
    c, feeder, noise = ch.ctl, DrafterCache(model, ch.capacity), Noise("cpu")
    c[D_CALIB_NS] = c[D_STEP_NS] = _calibrate(model)
    c[D_READY] = 1
    epoch, req, chain, params, seed, traced = -1, -1, [], SamplingParams(), 0, 0
    while not c[M_SHUTDOWN]:
        if c[M_PING] != c[D_PONG]:
            c[D_PONG] = c[M_PING]
            ch.ring_target()
        if not c[M_RUN]:
            _idle(ch, spin_s, parent_pid)
            continue
        if c[M_EPOCH] != epoch:
            epoch, n = int(c[M_EPOCH]), int(c[M_COMMITTED])  # epoch first: M_COMMITTED is stored before it
            if c[M_REQ] != req:
                req, (params, seed) = int(c[M_REQ]), _request_params(ch)
            prefix = ch.seq[:n].copy()
            feeder.rollback_to(prefix)   # common-prefix rollback on a new epoch
            chain = prefix.tolist()
            c[D_EPOCH], c[D_START], c[D_END] = -1, n, n
            c[D_EPOCH] = epoch
        p = len(chain)
        if p >= ch.capacity or p >= c[M_COMMITTED] + c[M_LOOKAHEAD]:
            _idle(ch, spin_s, parent_pid)
            continue
        t0 = time.monotonic_ns()
        logits, fed = feeder.logits_after(chain)                             # [V]
        if params.greedy:
            token, q = int(logits.argmax()), None
        else:
            q = probs_from_logits(logits, params).cpu()                       # [V]
            token = int(race(q, noise.rows(seed, [p], q.shape[-1], DRAFT)[0]))
        t1 = time.monotonic_ns()
        ch.trace[traced % N_TRACE] = (t0, t1, fed)
        traced += 1
        c[D_TRACE_N] = traced
        if fed == 1:
            c[D_STEP_NS] = (9 * int(c[D_STEP_NS]) + (t1 - t0)) // 10
        if c[M_EPOCH] != epoch:  # the target side moved on while this token was computed
            continue
        ch.draft[p] = token
        if q is not None:
            ch.q[p % ch.ring, : q.shape[0]] = q.numpy()
        chain.append(token)
        c[D_END] = p + 1
        ch.ring_target()


def _idle(ch: Channel, spin_s: float, parent_pid: int | None) -> None:
    """Wait for the target side to change something: spin briefly, then sleep on the wake pipe."""
    c = ch.ctl
    snapshot = c[:8].copy()
    spin_s = spin_s if c[M_RUN] else min(spin_s, 50e-6)  # between requests: sleep almost at once
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < spin_s:
        if not np.array_equal(c[:8], snapshot):
            return
    select.select([ch.wake_r], [], [], 0.05)
    _drain(ch.wake_r)
    if parent_pid is not None and os.getppid() != parent_pid:  # orphaned: the serving process is gone
        c[M_SHUTDOWN] = 1
