"""`metaspec soak`: a bounded soak of the whole service on loopback, with hostile requests and two disruptions.

Starts a private redis-server (a child process on a free loopback port) for the shared tables and the service
(router + worker pool, the shipped models, an outcome log of its own), then for `duration_s` runs `concurrency`
client threads sending mixed requests back to back (automatic and fixed arms, unary and streaming, temperature
0 / 0.7, some JSON-schema / regex constraints, some cancelled mid-stream) and one thread sending hostile requests
at a steady rate. At 1/3 of the time Redis is killed and started again on its port; at 1/2 one worker replica is
killed (Serve starts another). RSS of the router, proxy and worker processes and the tables' sync state are sampled
every `sample_s`. Checks (`soak_report.checks`): no INTERNAL/UNKNOWN, no hung request, hostile requests refused,
every acknowledged outcome in the log on disk, memory flat after warm-up, the tables' sync back after Redis.

    metaspec soak --minutes 10 --concurrency 24 --out build/soak     # soak.json, soak.png, a table; rc 1 on a failure
"""

from __future__ import annotations

import dataclasses
import math
import random
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from metaspec.protocol import convert
from metaspec.protocol.client import Client
from metaspec.protocol.types import Constraint

RECORDED = "outcome-recorded"          # the router's trailing metadata: the outcome is in the log ("true")
PROMPTS = ("def fibonacci(n):", "import numpy as np\n\ndef softmax(x):", "The quick brown fox",
           "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
           "Write a short story about a robot who learns to paint.", "class Stack:\n    def __init__(self):",
           "Translate to French: The weather is nice today.", "SELECT name FROM users WHERE")
CONSTRAINTS = (Constraint("json_schema", '{"type": "object", "properties": {"name": {"type": "string", "maxLength": '
                                         '12}, "age": {"type": "integer"}}, "required": ["name", "age"]}'),
               Constraint("regex", "[0-9]{3}-[a-z]{2,6}"))
# Ray Serve's own start-up limits, raised: on a loaded 2-core box a proxy may take longer than 5 s to answer.
SLOW_MACHINE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0         # how long the load runs (Redis restarts at 1/3, a replica dies at 1/2)
    concurrency: int = 24             # client threads sending mixed requests back to back
    hostile_per_s: float = 1.0        # hostile requests per second (one thread of its own)
    max_tokens: int = 48              # a mixed request asks for 8..max_tokens tokens
    deadline_s: float = 120.0         # every mixed request's gRPC deadline (DEADLINE_EXCEEDED = it hung)
    hostile_deadline_s: float = 30.0  # a hostile request's deadline (DEADLINE_EXCEEDED allowed: a refused slowness)
    slack_s: float = 30.0             # a call still open past its deadline + this is hung
    kill_grace_s: float = 30.0        # UNAVAILABLE is allowed for requests in flight in [kill, kill + this]
    auto_share: float = 0.4           # mixed requests the selector chooses for; the rest name an arm
    stream_share: float = 0.6         # streamed (the rest unary)
    cancel_share: float = 0.1         # streamed requests the client cancels after its second chunk
    constraint_share: float = 0.15    # requests under a JSON-schema or regex constraint
    sample_s: float = 5.0             # RSS, Redis size and table stats sampled this often
    rss_growth_frac: float = 0.10     # memory is flat when RSS at the end <= RSS at 1/3 x (1 + this) ...
    rss_growth_mib: float = 64.0      # ... or RSS at 1/3 + this many MiB, whichever is larger
    replicas: int = 2                 # replicas of the pool a replica of which is killed
    app: str = "metaspec-soak"        # Serve application name (its processes are found by it)
    skip_methods: tuple[str, ...] = ()          # arms never named (every arm is by default)
    seed: int = 0


@dataclass
class Call:
    """One request as its client saw it (seconds since the soak began)."""

    rid: str
    kind: str                         # "mixed", or the hostile case's name
    t0: float
    t1: float = math.nan              # nan: still open
    code: str = ""                    # gRPC status name; "CANCELLED_BY_CLIENT" for the ones we cancelled
    recorded: bool | None = None      # the outcome-recorded trailer (None: none came)
    stream: bool = False
    method: str = ""                  # the arm asked for ("" = auto) or, once answered, the arm that ran
    tokens: int = 0


@dataclass
class Timeline:
    """What happened when (seconds since the soak began), and what was sampled."""

    t_start: float = field(default_factory=time.perf_counter)
    events: dict[str, float] = field(default_factory=dict)          # redis_restart, replica_kill, load_end
    rss: list[tuple[float, int, str, float]] = field(default_factory=list)      # (t, pid, label, MiB)
    redis_keys: list[tuple[float, int]] = field(default_factory=list)           # (t, DBSIZE; -1 = down)
    tables: list[tuple[float, dict]] = field(default_factory=list)   # (t, one replica's sync state, n-gram contexts)
    killed: str = ""                                                            # the replica actor killed

    def now(self) -> float:
        return time.perf_counter() - self.t_start


# ---- Redis, a child process of this one ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisChild:
    """A redis-server on a loopback port of its own, with nothing persisted; `restart` kills it and starts a new
    one on the same port (an empty server, as after a crash without persistence)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 30.0) -> "RedisChild":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait_s
        while redis_command(self.port, "PING") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_command(port: int, *words: str, timeout_s: float = 2.0) -> str | int | None:
    """One RESP command's simple/integer reply (None when nothing answers): enough for PING and DBSIZE."""
    body = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(body.encode())
            line = sock.makefile("rb").readline().decode().strip()
    except OSError:
        return None
    return int(line[1:]) if line.startswith(":") else line[1:] if line[:1] == "+" else None


# ---- the service ----------------------------------------------------------------------------------------------

def soak_app_config(base, redis_url: str, outcome_dir: Path, replicas: int):
    """`base` (an AppConfig) with every pool's tables on `redis_url`, the first pool at `replicas` replicas and
    the outcome log in `outcome_dir`."""
    pools = [dataclasses.replace(p, tables=dataclasses.replace(p.tables, redis_url=redis_url))
             if p.tables is not None else p for p in base.pools]
    pools[0] = dataclasses.replace(pools[0], num_replicas=replicas)
    return dataclasses.replace(base, pools=tuple(pools),
                               router=dataclasses.replace(base.router, outcome_dir=str(outcome_dir)))


def deploy(app_cfg, opts, ready_s: float = 900.0) -> str:
    """Start Serve with `app_cfg` on free loopback ports (Ray must be initialised); returns the gRPC address once
    every replica runs."""
    from ray import serve

    from metaspec.deploy.app import start

    opts = dataclasses.replace(opts, grpc_port=free_port(), proxy_grpc_port=free_port(), http_port=free_port(),
                               proxy_http_port=free_port(), controller_env=SLOW_MACHINE | opts.controller_env)
    start(app_cfg, opts)
    address, deadline = f"127.0.0.1:{opts.grpc_port}", time.monotonic() + ready_s
    while True:
        status = serve.status().applications.get(opts.app_name)
        if status is not None and str(status.status).endswith("RUNNING"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {opts.app_name} not running after {ready_s:.0f} s: {status}")
        time.sleep(1.0)
    with Client(address, timeout_s=60) as client:
        while not client.health().serving:
            if time.monotonic() > deadline:
                raise TimeoutError("the service's pools are not healthy")
            time.sleep(1.0)
    return address


def service_processes(app: str) -> dict[int, str]:
    """pid -> label ("router", "proxy", "worker") of this app's Serve processes among this process's descendants."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            text = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for label, needle in (("router", f"ServeReplica:{app}:Router"), ("worker", f"ServeReplica:{app}:DecodeWorker"),
                              ("proxy", "ProxyActor")):
            if needle in text:
                out[proc.pid] = label
    return out


# ---- requests ---------------------------------------------------------------------------------------------------

def mixed_request(rng: random.Random, cfg: SoakConfig, methods: list[str], rid: str) -> tuple:
    """(GenerateRequest, stream, cancel_after_chunks or 0) of one mixed request."""
    method = "" if rng.random() < cfg.auto_share else rng.choice(methods)
    constraint = rng.choice(CONSTRAINTS) if rng.random() < cfg.constraint_share else None
    msg = convert.make_request(rng.choice(PROMPTS), temperature=rng.choice((0.0, 0.7)), method=method,
                               max_tokens=rng.randint(8, cfg.max_tokens), seed=rng.randrange(1 << 31),
                               constraint=constraint, request_id=rid)
    stream = rng.random() < cfg.stream_share
    return msg, stream, 2 if stream and rng.random() < cfg.cancel_share else 0


def hostile_requests() -> list[tuple[str, object]]:
    """(name, GenerateRequest without its request id) of every hostile case; each must be refused."""
    make = convert.make_request
    nested = '{"type": "array", "items": ' * 2000 + "{}" + "}" * 2000
    return [("ids_negative", make([-1, 5])), ("ids_beyond_vocab", make([5, 2 ** 31 - 1])),
            ("temperature_nan", make("hi", temperature=math.nan)),
            ("temperature_inf", make("hi", temperature=math.inf)),
            ("temperature_1e-300", make("hi", temperature=1e-300)), ("top_k_negative", make("hi", top_k=-5)),
            ("stop_list_huge", make("hi", stop=["a"] * 100_000)),
            ("max_tokens_huge", make("hi", max_tokens=2 ** 31 - 1)),
            ("schema_nested", make("hi", constraint=Constraint("json_schema", nested))),
            ("schema_bad", make("hi", constraint=Constraint("json_schema", '{"type": 12}'))),
            ("regex_bad", make("hi", constraint=Constraint("regex", "(a"))),
            ("method_unknown", make("hi", method="warp")), ("prompt_oversized", make("x" * 1_500_000)),
            ("message_oversized", make("x" * 5_000_000))]


def send(client: Client, msg, stream: bool, cancel_after: int, deadline_s: float, call: Call) -> None:
    """Send one request and fill `call` with what came back."""
    try:
        if stream:
            rpc = client.stub.GenerateStream(msg, timeout=deadline_s, metadata=client.metadata)
            for n, reply in enumerate(rpc, 1):
                call.tokens += len(reply.token_ids)
                call.method = reply.method or call.method
                if n == cancel_after:
                    rpc.cancel()
                    call.code = "CANCELLED_BY_CLIENT"
                    return
            trailers = rpc.trailing_metadata()
        else:
            reply, rpc = client.stub.Generate.with_call(msg, timeout=deadline_s, metadata=client.metadata)
            call.tokens, call.method = len(reply.token_ids), reply.method or call.method
            trailers = rpc.trailing_metadata()
        call.code = "OK"
    except grpc.RpcError as err:
        call.code = err.code().name if err.code() is not None else "UNKNOWN"
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    value = dict(trailers or ()).get(RECORDED)
    call.recorded = None if value is None else value == "true"


class Load:
    """The client threads: mixed requests back to back, and hostile ones at a steady rate, until `stop`."""

    def __init__(self, address: str, cfg: SoakConfig, methods: list[str], timeline: Timeline) -> None:
        self.address, self.cfg, self.methods, self.timeline = address, cfg, methods, timeline
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._mixed, args=(i,), daemon=True) for i in range(cfg.concurrency)]
        self.threads.append(threading.Thread(target=self._hostile, daemon=True))

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def stop(self, wait_s: float) -> int:
        """Stop sending; wait up to `wait_s` for the calls in flight; returns the threads still stuck."""
        self.stopping.set()
        deadline = time.monotonic() + wait_s
        for th in self.threads:
            th.join(max(0.0, deadline - time.monotonic()))
        return sum(th.is_alive() for th in self.threads)

    def _new(self, rid: str, kind: str, stream: bool, method: str = "") -> Call:
        call = Call(rid, kind, self.timeline.now(), stream=stream, method=method)
        with self.lock:
            self.calls.append(call)
        return call

    def _mixed(self, idx: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + idx)
        with Client(self.address) as client:
            i = 0
            while not self.stopping.is_set():
                rid = f"soak-{idx}-{i}"
                msg, stream, cancel = mixed_request(rng, self.cfg, self.methods, rid)
                call = self._new(rid, "mixed", stream, msg.method)
                send(client, msg, stream, cancel, self.cfg.deadline_s, call)
                call.t1 = self.timeline.now()
                i += 1

    def _hostile(self) -> None:
        cases = hostile_requests()
        with Client(self.address, max_message_bytes=64 << 20) as client:
            i = 0
            while not self.stopping.wait(1.0 / self.cfg.hostile_per_s):
                name, template = cases[i % len(cases)]
                msg = type(template)()
                msg.CopyFrom(template)
                msg.request_id = f"hostile-{i}"
                stream = (i // len(cases)) % 2 == 1          # each case unary, then streamed, and so on
                call = self._new(msg.request_id, name, stream)
                send(client, msg, stream, 0, self.cfg.hostile_deadline_s, call)
                call.t1 = self.timeline.now()
                i += 1


# ---- disruptions and sampling ---------------------------------------------------------------------------------

def sample(timeline: Timeline, app: str, pool: str, redis: RedisChild) -> None:
    """One round: RSS of the app's processes, Redis's key count, one replica's table sync state."""
    import psutil
    from ray import serve

    t = timeline.now()
    for pid, label in service_processes(app).items():
        try:
            timeline.rss.append((t, pid, label, psutil.Process(pid).memory_info().rss / 2 ** 20))
        except psutil.Error:
            continue
    keys = redis_command(redis.port, "DBSIZE")
    timeline.redis_keys.append((t, keys if isinstance(keys, int) else -1))
    try:
        handle = serve.get_deployment_handle(f"DecodeWorker-{pool}", app_name=app)
        stats = handle.table_stats.remote().result(timeout_s=10)
        if stats and stats.get("redis"):
            timeline.tables.append((t, {**{k: stats["redis"].get(k) for k in ("connected", "syncs", "errors")},
                                        "ngram_contexts": stats["ngram"]["contexts"]}))
    except Exception:   # a replica being killed or restarted: that round has no table stats
        pass


def drive(address: str, cfg: SoakConfig, redis: RedisChild, pool: str) -> tuple[list[Call], Timeline, int]:
    """The load with its disruptions and sampling; returns (calls, timeline, client threads left stuck)."""
    from metaspec.deploy.loadtest import kill_one_replica

    with Client(address, timeout_s=60) as client:
        info = client.list_methods()
    methods = sorted(set(next(p.methods for p in info.pools if p.name == pool)) - set(cfg.skip_methods))
    timeline = Timeline()
    load = Load(address, cfg, methods, timeline)
    plan = [(cfg.duration_s / 3, "redis_restart"), (cfg.duration_s / 2, "replica_kill"), (cfg.duration_s, "load_end")]
    load.start()
    next_sample = 0.0
    while plan:
        if timeline.now() >= next_sample:
            sample(timeline, cfg.app, pool, redis)
            next_sample += cfg.sample_s
        if timeline.now() >= plan[0][0]:
            _, event = plan.pop(0)
            timeline.events[event] = timeline.now()
            if event == "redis_restart":
                redis.restart()
            elif event == "replica_kill":
                timeline.killed = kill_one_replica(cfg.app, pool)
        time.sleep(0.2)
    stuck = load.stop(cfg.deadline_s + cfg.slack_s)
    sample(timeline, cfg.app, pool, redis)
    return load.calls, timeline, stuck


def run(cfg: SoakConfig, base_app_cfg, opts, out_dir: Path) -> dict:
    """The whole soak on an initialised Ray: Redis, the service, the load, the checks, soak.json + soak.png. The
    caller stops Serve (and Ray) afterwards."""
    from metaspec.workers.outcome_log import outcome_files, read_outcomes

    from . import soak_report

    out_dir.mkdir(parents=True, exist_ok=True)
    outcome_dir = out_dir / "outcomes"
    redis = RedisChild().start()
    try:
        app_cfg = soak_app_config(base_app_cfg, redis.url, outcome_dir, cfg.replicas)
        address = deploy(app_cfg, dataclasses.replace(opts, app_name=cfg.app))
        pool = app_cfg.pools[0].name
        calls, timeline, stuck = drive(address, cfg, redis, pool)
    finally:
        redis.stop()
    logged = {o.request_id for o in read_outcomes(outcome_files(outcome_dir))}
    report = soak_report.report(cfg, calls, timeline, stuck, logged) | {"redis_port": redis.port}
    soak_report.write(report, out_dir)
    return report


def main(minutes: float, concurrency: int, hostile_per_s: float, config: str | None, out: str,
         replicas: int = 2, skip_methods: tuple[str, ...] = SoakConfig.skip_methods) -> int:
    """`metaspec soak`: a loopback Ray of its own, the soak, the table; 1 when a check failed."""
    import ray

    from metaspec.deploy.app import DEFAULT_YAML, load_serve_file, local_cpus, stop

    from . import soak_report

    base, opts = load_serve_file(config or DEFAULT_YAML)
    cfg = SoakConfig(duration_s=60 * minutes, concurrency=concurrency, hostile_per_s=hostile_per_s, replicas=replicas,
                     skip_methods=skip_methods)
    cpus = local_cpus(soak_app_config(base, "redis://127.0.0.1:1/0", Path(out), replicas))
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cpus, include_dashboard=False,
             log_to_driver=False)
    try:
        rep = run(cfg, base, opts, Path(out))
        print(soak_report.table(rep))            # before the teardown: Ray may end this process during it
        print(f"wrote {Path(out) / 'soak.json'} and {Path(out) / 'soak.png'}", flush=True)
    finally:
        _shutdown_serve()
        stop()
    return 0 if rep["passed"] else 1


def _shutdown_serve() -> None:
    """Serve down in this thread first (as tests/deploy do): `stop` then only reaps, instead of racing a Serve
    shutdown thread that outlived its wait against Ray's teardown (seen: the process ended before printing)."""
    from ray import serve

    try:
        serve.shutdown()
    except Exception as exc:                     # `stop` kills what is left
        print(f"serve shutdown: {type(exc).__name__}: {exc}", flush=True)
