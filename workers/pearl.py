"""PEARL's drafter side: a drafter running beside the target that keeps drafting while the target verifies.

On a CPU the drafter is its own process pinned to its own core (one torch thread); on a GPU it is a process on
another CUDA device, or a thread with its own CUDA stream when only one device exists. Either way it talks to
the target's process through one `Channel`: a shared buffer of raw arrays (nothing crossing it is pickled) and
two pipes used only as doorbells (a byte means "look at the shared state").

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
Sampled drafts use one generator seeded per (request seed, position), so a draft never depends on timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .drafter_cache import DrafterCache
from .model import Model, ModelConfig, load_model
from .sampling import probs_from_logits, sample
from .types import SamplingParams

# control words, target side
M_EPOCH, M_COMMITTED, M_REQ, M_RUN, M_SHUTDOWN, M_PING, M_LOOKAHEAD = range(7)
# control words, drafter side
D_READY, D_EPOCH, D_START, D_END, D_STEP_NS, D_PONG, D_TRACE_N, D_ERROR, D_CALIB_NS = range(8, 17)
N_CTL, N_PARAMS, N_TRACE = 32, 4, 8192


@dataclass(frozen=True)
class PearlConfig:
    runner: str = "auto"              # "process" | "thread" | "auto": a thread with its own CUDA stream when the
                                      # drafter is on the only CUDA device, a process everywhere else
    drafter_device: str | None = None # process runner: device of the drafter (None = its ModelConfig's)
    drafter_visible_devices: str | None = None  # process runner: CUDA_VISIBLE_DEVICES of the drafter process (the
                                      # GPU of its placement-group bundle, cluster/placement.py); None = the caller's
    drafter_cpus: tuple[int, ...] | None = None  # CPUs the drafter process is pinned to (None = caller's last)
    pin_caller: bool = False          # also pin the calling (target) process to the CPUs the drafter does not use
    drafter_threads: int = 1          # torch intra-op threads of the drafter process
    gamma: int | None = None          # draft length after a fully accepted draft (None = from the speed ratio)
    gamma_max: int = 8                # longest draft the speed ratio may ask for
    pre_verify: bool = False          # after a rollback, send the first drafted token to the target at once (the
                                      # paper's pre-verify, for a drafter about as slow as the target); False: wait
                                      # for the draft length that acceptance × (drafter step / verification) favours
    prior_accept: float = 0.6         # per-token acceptance assumed before the request has any evidence
    decay: float = 0.9                # evidence kept per step (acceptance and timings follow recent steps)
    max_drafters: int = 1             # drafters per pool, each serving one request at a time
    preempt_idle_s: float = 1.0       # a lease unused this long may be taken back for a new request
    spin_s: float = 1e-3              # busy-wait before blocking on a doorbell (each side owns its core; a
                                      # wake-up from a pipe costs tens of us idle, ms on a loaded machine)
    start_timeout_s: float = 300.0    # drafter start-up (model load) limit
    wait_timeout_s: float = 60.0      # longest wait for one drafted token before the drafter is declared gone

    def __post_init__(self) -> None:
        if self.runner not in ("auto", "process", "thread"):
            raise ValueError(f"runner must be 'auto', 'process' or 'thread', got {self.runner!r}")
        if self.gamma is not None and not 1 <= self.gamma <= self.gamma_max:
            raise ValueError(f"gamma must be in [1, gamma_max={self.gamma_max}], got {self.gamma}")

    @property
    def lookahead(self) -> int:
        """Tokens the drafter may run past the committed sequence: a draft, its bonus and the next draft."""
        return 2 * self.gamma_max + 2


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

def position_seed(seed: int, position: int) -> int:
    """Independent generator seed per (request seed, position): splitmix64 of their combination."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


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
    c, feeder, gen = ch.ctl, DrafterCache(model, ch.capacity), torch.Generator()
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
            gen.manual_seed(position_seed(seed, p))
            token = sample(q, gen)
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


# ---- runners: a process (CPU, or another GPU) or a thread with its own CUDA stream -------------------------------

class Drafter:
    """One running drafter and its channel; leased to one request at a time."""

    def __init__(self, drafter: Model, source: ModelConfig | None, cfg: PearlConfig, runner: str) -> None:
        self.cfg, self.runner, self.leased, self.lease_id, self.last_used = cfg, runner, False, 0, 0.0
        self.capacity, self.vocab = drafter.max_context, drafter.vocab_size
        self.ch, fd = Channel.create(self.capacity, self.vocab, cfg.lookahead + 2, shared=runner == "process")
        self.ch.ctl[M_LOOKAHEAD] = cfg.lookahead
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        if runner == "process":
            self.proc = _spawn(self.ch, fd, source, cfg)
            os.close(fd)
        else:
            self.thread = threading.Thread(target=_thread_main, args=(self.ch, drafter, cfg), daemon=True,
                                           name="pearl-drafter")
            self.thread.start()
        self._finalizer = weakref.finalize(self, _stop, self.ch, self.proc, self.thread)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def gone(self) -> str | None:
        """Why this drafter can no longer serve (it died or failed), or None while it runs."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"died (exit code {self.proc.returncode})"
        if self.thread is not None and not self.thread.is_alive():
            return "thread ended"
        return "failed (see its stderr)" if self.ch.ctl[D_ERROR] else None

    def alive(self) -> bool:
        return self.gone() is None

    def wait_ready(self) -> None:
        wait_for(lambda: bool(self.ch.ctl[D_READY]), self.ch.bell_r, 0.0, self.gone, self.cfg.start_timeout_s,
                 "while starting")

    @property
    def step_s(self) -> float:
        return float(self.ch.ctl[D_CALIB_NS]) * 1e-9

    def ping(self) -> float:
        """Seconds for one round trip target side → drafter → target side (the drafter must be idle)."""
        c = self.ch.ctl
        token = int(c[M_PING]) + 1
        t0 = time.perf_counter()
        c[M_PING] = token
        self.ch.ring_drafter()
        wait_for(lambda: c[D_PONG] == token, self.ch.bell_r, self.cfg.spin_s, self.gone, 5.0, "ping")
        return time.perf_counter() - t0

    def stop(self) -> None:
        self._finalizer()


def _spawn(ch: Channel, fd: int, source: ModelConfig | None, cfg: PearlConfig) -> subprocess.Popen:
    if source is None:
        raise ValueError("the process runner needs the drafter's ModelConfig (models from load_model carry it)")
    model = asdict(source) | {"threads": cfg.drafter_threads}
    if cfg.drafter_device:
        model["device"] = cfg.drafter_device
    cpus = cfg.drafter_cpus or _default_drafter_cpus()
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.drafter_threads), MKL_NUM_THREADS=str(cfg.drafter_threads))
    if cfg.drafter_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cfg.drafter_visible_devices
    fds = (fd, ch.wake_r, ch.bell_w)
    args = [sys.executable, "-m", "metaspec.workers.pearl", "--model", json.dumps(model), "--fds", json.dumps(fds),
            "--shape", json.dumps([ch.capacity, ch.vocab, ch.ring]), "--cpus", json.dumps(list(cpus)),
            "--spin-s", str(cfg.spin_s), "--parent", str(os.getpid())]
    return subprocess.Popen(args, pass_fds=fds, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _default_drafter_cpus() -> tuple[int, ...]:
    """The last CPU the caller may use (the caller keeps the others), or no pinning on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cpus[-1],) if len(cpus) > 1 else ()


def _thread_main(ch: Channel, model: Model, cfg: PearlConfig) -> None:
    try:
        device = getattr(model, "device", torch.device("cpu"))
        if torch.device(device).type == "cuda":
            with torch.cuda.stream(torch.cuda.Stream(device)):  # overlaps the target's kernels on the same GPU
                serve(ch, model, cfg.spin_s)
        else:
            serve(ch, model, cfg.spin_s)
    except BaseException:
        ch.ctl[D_ERROR] = 1
        ch.ring_target()
        raise


def _stop(ch: Channel, proc: subprocess.Popen | None, thread: threading.Thread | None) -> None:
    ch.ctl[M_SHUTDOWN] = 1
    ch.ring_drafter()
    if proc is not None:
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    elif thread is not None and thread is not threading.current_thread():
        thread.join(timeout=2.0)
    ch.close()


# ---- the pool: one per drafter model and config, restarted when it dies -----------------------------------------

class DrafterPool:
    """Drafters for one drafter model, started on first use, leased one request at a time, restarted if dead.

    >>> pool = pool_for(engine.drafter, PearlConfig())
    >>> drafter = pool.lease()          # None when every drafter serves another request
    >>> pool.release(drafter, drafter.lease_id)
    """

    def __init__(self, drafter: Model, cfg: PearlConfig) -> None:
        # Weak: the pool lives in a table keyed weakly by this model, and must not keep its own key alive.
        self.model, self.cfg, self.drafters = weakref.ref(drafter), cfg, []
        self.source: ModelConfig | None = getattr(drafter, "source", None)
        self.runner = _choose_runner(cfg, self.source)
        self.speeds: "weakref.WeakKeyDictionary[Model, dict[str, float]]" = weakref.WeakKeyDictionary()
        self.restarts = 0
        if cfg.pin_caller and self.runner == "process":
            drafter_cpus = set(cfg.drafter_cpus or _default_drafter_cpus())
            rest = set(os.sched_getaffinity(0)) - drafter_cpus
            if rest:
                os.sched_setaffinity(0, rest)

    def start(self) -> Drafter:
        model = self.model()
        if model is None:
            raise DrafterGone("the drafter model was unloaded")
        d = Drafter(model, self.source, self.cfg, self.runner)
        self.drafters.append(d)
        return d

    def lease(self) -> Drafter | None:
        """An idle, ready drafter (started or restarted as needed), or None when all serve live requests.

        A drafter whose holder has not drafted for `preempt_idle_s` (a finished request whose proposer is still
        referenced somewhere) is taken back: its old holder then gets DrafterGone and decodes without drafts.
        """
        for attempt in range(2):
            for d in list(self.drafters):
                if not d.alive():  # its holder, if any, gets DrafterGone at its next call
                    self._drop(d)
                    self.restarts += 1
            idle = [d for d in self.drafters if not d.leased]
            d = idle[0] if idle else (self.start() if len(self.drafters) < self.cfg.max_drafters else None)
            if d is None and attempt == 1:
                stale = min(self.drafters, key=lambda x: x.last_used, default=None)
                d = stale if stale and time.monotonic() - stale.last_used > self.cfg.preempt_idle_s else None
            if d is not None:
                d.wait_ready()
                d.leased, d.lease_id, d.last_used = True, d.lease_id + 1, time.monotonic()
                return d
            gc.collect()  # a finished request's proposer may only await collection to give its drafter back
        return None

    def release(self, d: Drafter, lease_id: int) -> None:
        """End lease `lease_id` of `d` (a lease already taken back is left alone)."""
        if d.lease_id != lease_id or not d.leased:
            return
        d.ch.ctl[M_RUN] = 0
        d.ch.ring_drafter()
        d.leased = False
        if not d.alive() and d in self.drafters:  # died mid-request: start its replacement, ready for the next
            self._drop(d)
            self.restarts += 1
            if len(self.drafters) < self.cfg.max_drafters:
                self.start()

    def _drop(self, d: Drafter) -> None:
        self.drafters.remove(d)
        d.stop()

    def speed(self, target: Model, drafter: Drafter) -> dict[str, float]:
        """Measured once per target: one verification (5 tokens) and one drafter step, in ms, and their ratio —
        what sets draft lengths (until a greedy request times its own) and what a selector needs to know where
        pearl pays."""
        if target not in self.speeds:
            verify_s, step_s = _verify_s(target, 4), max(drafter.step_s, 1e-6)
            self.speeds[target] = {"target_verify_ms": verify_s * 1e3, "drafter_step_ms": step_s * 1e3,
                                   "speed_ratio": verify_s / step_s}
        return self.speeds[target]

    def shutdown(self) -> None:
        for d in list(self.drafters):
            self._drop(d)


def _choose_runner(cfg: PearlConfig, source: ModelConfig | None) -> str:
    if cfg.runner != "auto":
        runner = cfg.runner
    else:
        device = torch.device(cfg.drafter_device or (source.device if source else "cpu"))
        one_gpu = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() == 1
        runner = "thread" if one_gpu or source is None else "process"
    device = cfg.drafter_device or (source.device if source else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"pearl drafter device {device!r} needs CUDA, which this machine lacks")
    return runner


def _verify_s(target: Model, k: int) -> float:
    """Median seconds of one target forward over [last, *k drafted] at a short context."""
    session = target.session(64)
    session.forward([i % target.vocab_size for i in range(4, 36)])
    times = []
    for i in range(7):
        t0 = time.perf_counter()
        float(session.forward([(5 * i + j) % target.vocab_size for j in range(k + 1)])[-1, 0])
        times.append(time.perf_counter() - t0)
        session.rollback(32)
    return sorted(times[2:])[len(times[2:]) // 2]


_POOLS: "weakref.WeakKeyDictionary[Model, dict[PearlConfig, DrafterPool]]" = weakref.WeakKeyDictionary()


def pool_for(drafter: Model, cfg: PearlConfig) -> DrafterPool:
    """The pool serving `drafter` (one per loaded drafter model, i.e. per engine), created on first use.

    Keyed weakly by the model object: when the engine that loaded the drafter goes away, its drafter processes
    stop (a thread runner holds the model itself and lives until `shutdown()` or exit).
    """
    pools = _POOLS.setdefault(drafter, {})
    if cfg not in pools:
        pools[cfg] = DrafterPool(drafter, cfg)
    return pools[cfg]


# ---- the drafter process's entry point ---------------------------------------------------------------------------

def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="metaspec PEARL drafter process (started by DrafterPool)")
    for flag in ("--model", "--fds", "--shape", "--cpus"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--spin-s", type=float, default=1e-3)
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args(argv)
    cpus = json.loads(args.cpus)
    if cpus:
        os.sched_setaffinity(0, cpus)
    model_cfg = ModelConfig(**json.loads(args.model))
    torch.set_num_threads(model_cfg.threads or 1)
    shm_fd, wake_r, bell_w = json.loads(args.fds)
    capacity, vocab, ring = json.loads(args.shape)
    buf = mmap.mmap(shm_fd, Channel.nbytes(capacity, vocab, ring))
    ch = Channel(buf, capacity, vocab, ring, (wake_r, -1, -1, bell_w))
    try:
        serve(ch, load_model(model_cfg), args.spin_s, args.parent)
    except BaseException:
        ch.ctl[D_ERROR] = 1
        ch.ring_target()
        raise
    sys.stderr.flush()
    os._exit(0)  # nothing to clean up; interpreter teardown with torch loaded takes seconds on a busy machine


if __name__ == "__main__":
    _main()
