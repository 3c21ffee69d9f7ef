"""PEARL's drafter side: a drafter running beside the target that keeps drafting while the target verifies.

On a CPU the drafter is its own process pinned to its own core (one torch thread); on a GPU it is a process on
another CUDA device, or a thread with its own CUDA stream when only one device exists. Either way it talks to
the target's process through one `Channel` per request it serves (a lane; workers/pearl_channel.py: the
shared-memory protocol and the drafter's loop, which drafts for all its lanes in one batched forward). This
module starts drafters, leases one lane to each request and restarts a drafter that died.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass

import torch

from .model import Model, ModelConfig, load_model
from .pearl_channel import (D_CALIB_NS, D_ERROR, D_PONG, D_READY, M_LOOKAHEAD, M_PING, M_RUN, M_SHUTDOWN, Channel,
                            DrafterGone, serve, wait_for)


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
    max_drafters: int = 1             # drafter processes (or threads) per pool
    lanes: int = 4                    # requests one drafter serves at once: each drafted position of all of them
                                      # is one batched drafter forward
    preempt_idle_s: float = 30.0      # a lease unused this long may be taken back for a new request (a holder
                                      # that never closed; a live request on a loaded replica can go seconds
                                      # between steps)
    spin_s: float = 1e-3              # busy-wait before blocking on a doorbell (each side owns its core; a
                                      # wake-up from a pipe costs tens of us idle, ms on a loaded machine)
    start_timeout_s: float = 300.0    # drafter start-up (model load) limit
    wait_timeout_s: float = 60.0      # longest wait for one drafted token before the drafter is declared gone

    def __post_init__(self) -> None:
        if self.runner not in ("auto", "process", "thread"):
            raise ValueError(f"runner must be 'auto', 'process' or 'thread', got {self.runner!r}")
        if self.lanes < 1 or self.max_drafters < 1:
            raise ValueError(f"lanes and max_drafters must be >= 1, got {self.lanes}, {self.max_drafters}")
        if self.gamma is not None and not 1 <= self.gamma <= self.gamma_max:
            raise ValueError(f"gamma must be in [1, gamma_max={self.gamma_max}], got {self.gamma}")

    @property
    def lookahead(self) -> int:
        """Tokens the drafter may run past the committed sequence: a draft, its bonus and the next draft."""
        return 2 * self.gamma_max + 2


# ---- runners: a process (CPU, or another GPU) or a thread with its own CUDA stream -------------------------------

class DrafterProcess:
    """One running drafter (a process, or a thread with its own CUDA stream) and its `cfg.lanes` channels."""

    def __init__(self, drafter: Model, source: ModelConfig | None, cfg: PearlConfig, runner: str) -> None:
        self.cfg, self.runner = cfg, runner
        made = [Channel.create(drafter.max_context, drafter.vocab_size, cfg.lookahead + 2, shared=runner == "process")
                for _ in range(cfg.lanes)]
        self.channels = [ch for ch, _ in made]
        for ch in self.channels:
            ch.ctl[M_LOOKAHEAD] = cfg.lookahead
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        if runner == "process":
            self.proc = _spawn(made, source, cfg)
            for _, fd in made:
                os.close(fd)
        else:
            self.thread = threading.Thread(target=_thread_main, args=(self.channels, drafter, cfg), daemon=True,
                                           name="pearl-drafter")
            self.thread.start()
        self._finalizer = weakref.finalize(self, _stop, self.channels, self.proc, self.thread)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def gone(self) -> str | None:
        """Why this drafter can no longer serve (it died or failed), or None while it runs."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"died (exit code {self.proc.returncode})"
        if self.thread is not None and not self.thread.is_alive():
            return "thread ended"
        return "failed (see its stderr)" if any(ch.ctl[D_ERROR] for ch in self.channels) else None

    def stop(self) -> None:
        self._finalizer()


class Drafter:
    """One lane of a running drafter and its channel: what one request leases."""

    def __init__(self, process: DrafterProcess, ch: Channel) -> None:
        self.process, self.ch, self.cfg = process, ch, process.cfg
        self.leased, self.lease_id, self.last_used = False, 0, 0.0
        self.capacity, self.vocab = ch.capacity, ch.vocab

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def gone(self) -> str | None:
        return self.process.gone()

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


def _spawn(made: list[tuple[Channel, int]], source: ModelConfig | None, cfg: PearlConfig) -> subprocess.Popen:
    if source is None:
        raise ValueError("the process runner needs the drafter's ModelConfig (models from load_model carry it)")
    model = asdict(source) | {"threads": cfg.drafter_threads}
    if cfg.drafter_device:
        model["device"] = cfg.drafter_device
    cpus = cfg.drafter_cpus or _default_drafter_cpus()
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.drafter_threads), MKL_NUM_THREADS=str(cfg.drafter_threads))
    if cfg.drafter_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cfg.drafter_visible_devices
    lanes = [(fd, ch.wake_r, ch.bell_w) for ch, fd in made]
    ch = made[0][0]
    args = [sys.executable, "-m", "metaspec.workers.pearl", "--model", json.dumps(model), "--fds", json.dumps(lanes),
            "--shape", json.dumps([ch.capacity, ch.vocab, ch.ring]), "--cpus", json.dumps(list(cpus)),
            "--spin-s", str(cfg.spin_s), "--parent", str(os.getpid())]
    return subprocess.Popen(args, pass_fds=[fd for lane in lanes for fd in lane], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)


def _default_drafter_cpus() -> tuple[int, ...]:
    """The last CPU the caller may use (the caller keeps the others), or no pinning on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cpus[-1],) if len(cpus) > 1 else ()


def _thread_main(lanes: list[Channel], model: Model, cfg: PearlConfig) -> None:
    try:
        device = getattr(model, "device", torch.device("cpu"))
        if torch.device(device).type == "cuda":
            with torch.cuda.stream(torch.cuda.Stream(device)):  # overlaps the target's kernels on the same GPU
                serve(lanes, model, cfg.spin_s)
        else:
            serve(lanes, model, cfg.spin_s)
    except BaseException:
        _failed(lanes)
        raise


def _failed(lanes: list[Channel]) -> None:
    for ch in lanes:
        ch.ctl[D_ERROR] = 1
        ch.ring_target()


def _stop(lanes: list[Channel], proc: subprocess.Popen | None, thread: threading.Thread | None) -> None:
    for ch in lanes:
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
    for ch in lanes:
        ch.close()


# ---- the pool: one per drafter model and config, restarted when it dies -----------------------------------------

class DrafterPool:
    """Drafters for one drafter model, started on first use, restarted if dead; each lane of a drafter is leased to
    one request at a time (a drafter serves `cfg.lanes` requests in one batched forward per drafted position).

    >>> pool = pool_for(engine.drafter, PearlConfig())
    >>> drafter, lease_id = pool.lease()   # a lane; None when every lane serves another request
    >>> pool.release(drafter, lease_id)
    """

    def __init__(self, drafter: Model, cfg: PearlConfig) -> None:
        # Weak: the pool lives in a table keyed weakly by this model, and must not keep its own key alive.
        self.model, self.cfg = weakref.ref(drafter), cfg
        self.processes: list[DrafterProcess] = []
        self.drafters: list[Drafter] = []          # every lane of every running drafter
        self.source: ModelConfig | None = getattr(drafter, "source", None)
        self.runner = _choose_runner(cfg, self.source)
        self.speeds: "weakref.WeakKeyDictionary[Model, dict[str, float]]" = weakref.WeakKeyDictionary()
        self.restarts = 0
        # Requests are set up on several threads at once: choosing, starting and leasing a lane happen under this
        # lock, or two requests could lease the same lane and drive its one channel together (each then waits on
        # epochs the other keeps moving: a stalled step loop). Reentrant: a collection inside may run a finished
        # request's finalizer, which releases.
        self._lock = threading.RLock()
        if cfg.pin_caller and self.runner == "process":
            drafter_cpus = set(cfg.drafter_cpus or _default_drafter_cpus())
            rest = set(os.sched_getaffinity(0)) - drafter_cpus
            if rest:
                os.sched_setaffinity(0, rest)

    def start(self) -> Drafter:
        """Start one more drafter; its first lane."""
        model = self.model()
        if model is None:
            raise DrafterGone("the drafter model was unloaded")
        process = DrafterProcess(model, self.source, self.cfg, self.runner)
        lanes = [Drafter(process, ch) for ch in process.channels]
        self.processes.append(process)
        self.drafters += lanes
        return lanes[0]

    def lease(self) -> tuple[Drafter, int] | None:
        """An idle lane of a ready drafter (started or restarted as needed) and the id of this lease, or None when
        all serve live requests. The id is the caller's proof of holding it: `drafter.lease_id` moves on when the
        lease is taken back, so read it here, not later.

        A lane whose holder has not drafted for `preempt_idle_s` (a finished request whose proposer is still
        referenced somewhere) is taken back: its old holder then gets DrafterGone and decodes without drafts.
        Safe to call from several threads: each lane goes to one caller at a time, under its own lease id.
        """
        for attempt in range(2):
            with self._lock:
                d = self._pick(take_stale=attempt == 1)
                if d is not None:
                    d.leased, d.lease_id, d.last_used = True, d.lease_id + 1, time.monotonic()
                    lease_id = d.lease_id
            if d is not None:
                try:
                    d.wait_ready()       # outside the lock: a drafter starting up does not hold up the others
                except BaseException:
                    self.release(d, lease_id)
                    raise
                return d, lease_id
            gc.collect()  # a finished request's proposer may only await collection to give its lane back
        return None

    def _pick(self, take_stale: bool) -> Drafter | None:
        for p in list(self.processes):
            if p.gone():  # the holders of its lanes, if any, get DrafterGone at their next call
                self._drop(p)
                self.restarts += 1
        idle = [d for d in self.drafters if not d.leased]
        if idle:   # lanes of running drafters first: requests that share a drafter share its forwards
            return idle[0]
        if len(self.processes) < self.cfg.max_drafters:
            return self.start()
        stale = min(self.drafters, key=lambda x: x.last_used, default=None)
        if take_stale and stale is not None and time.monotonic() - stale.last_used > self.cfg.preempt_idle_s:
            return stale
        return None

    def release(self, d: Drafter, lease_id: int) -> None:
        """End lease `lease_id` of lane `d` (a lease already taken back is left alone)."""
        with self._lock:
            if d.lease_id != lease_id or not d.leased:
                return
            d.ch.ctl[M_RUN] = 0
            d.ch.ring_drafter()
            d.leased = False
            if not d.alive() and d.process in self.processes:  # died mid-request: start its replacement
                self._drop(d.process)
                self.restarts += 1
                if len(self.processes) < self.cfg.max_drafters:
                    self.start()

    def _drop(self, process: DrafterProcess) -> None:
        self.processes.remove(process)
        self.drafters = [d for d in self.drafters if d.process is not process]
        process.stop()

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
        with self._lock:
            for p in list(self.processes):
                self._drop(p)


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
    capacity, vocab, ring = json.loads(args.shape)
    size = Channel.nbytes(capacity, vocab, ring)
    lanes = [Channel(mmap.mmap(shm_fd, size), capacity, vocab, ring, (wake_r, -1, -1, bell_w))
             for shm_fd, wake_r, bell_w in json.loads(args.fds)]
    try:
        serve(lanes, load_model(model_cfg), args.spin_s, args.parent)
    except BaseException:
        _failed(lanes)
        raise
    sys.stderr.flush()
    os._exit(0)  # nothing to clean up; interpreter teardown with torch loaded takes seconds on a busy machine


if __name__ == "__main__":
    _main()
