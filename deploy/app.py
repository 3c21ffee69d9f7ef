"""The Ray Serve application: one DecodeWorker deployment per pool behind one Router, with native gRPC ingress.

    serve run deploy/metaspec.yaml             # Ray Serve's CLI (the YAML names `build_app` in import_path)
    metaspec serve --config deploy/metaspec.yaml

`build_app(args)` is the Ray Serve LLM-style builder: `args` is the YAML application's `args` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from metaspec.selector.rules import specs_from_registry
from metaspec.workers.pearl import PearlConfig
from metaspec.workers.scheduler import SchedulerConfig
from metaspec.workers.store import RedisConfig, StoreConfig
from metaspec.workers.worker import DecodeWorker, worker_config

from .config import AppConfig, PoolSpec, TablesSpec, load_app_config
from .ingress import CALLBACK, CALLBACK_ENV, CERT_ENV, HOST_ENV, KEY_ENV, IngressSpec, bind_address, spec_from_env
from .policy import user_config
from .router import Router

GRPC_SERVICER = "metaspec.protocol.convert.add_MetaSpecServicer_to_server"   # generated one + lenient parsing
MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"   # Ray reads the proxy's gRPC message limit from this
DEFAULT_YAML = Path(__file__).resolve().parent / "metaspec.yaml"
OWN_ENV = (MAX_MESSAGE_ENV, CALLBACK_ENV, HOST_ENV, CERT_ENV, KEY_ENV)   # env vars ServeOptions writes itself
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# Ray Serve's own settings that cut the serving overhead (gRPC + router + choice over a direct worker call) from
# ~13 ms to ~5 ms p50 on a 2-core machine (`python -m metaspec.deploy.loadtest overhead`, README). deploy/metaspec.yaml
# sets them; they reach every Serve process through the controller's runtime_env (its actors inherit it).
LOW_LATENCY_ENV = {
    DIRECT_INGRESS_ENV: "1",                          # the Router replicas serve gRPC themselves: no proxy hop
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",             # Router -> worker handle calls over gRPC, not actor tasks
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # no thread hop per request inside a replica
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",     # (replicas only: a driver's handle needs the separate loop)
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # access log lines written in batches
}


@dataclass(frozen=True)
class ServeOptions:
    """Serve-level (not application-level) settings: the top of the YAML."""

    grpc_port: int = 9000                    # the service's gRPC port (each node's proxy, or its Router replica)
    proxy_grpc_port: int | None = None       # direct ingress: the head node's fallback Serve proxy (None = +100)
    http_port: int = 8000                    # the OpenAI HTTP API's port (each node's proxy, or its Router replica)
    proxy_http_port: int | None = None       # direct ingress: the head node's fallback HTTP proxy (None = +100)
    http_host: str = "127.0.0.1"            # interface of the OpenAI HTTP API (http_options.host)
    ingress: IngressSpec = IngressSpec()     # the gRPC ingress's interface and TLS (deploy/ingress.py)
    proxy_location: str = "EveryNode"        # a gRPC proxy on every node: no single ingress bottleneck
    max_message_bytes: int = 4 << 20         # gRPC messages above this get RESOURCE_EXHAUSTED at the ingress
    request_timeout_s: float | None = None   # end-to-end limit Serve enforces (DEADLINE_EXCEEDED); None = none
    app_name: str = "metaspec"
    controller_env: dict[str, str] = field(default_factory=dict)  # further Ray Serve settings for the controller
                                                                  # (e.g. RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S)

    @property
    def direct_ingress(self) -> bool:
        """Router replicas listen for gRPC themselves (LOW_LATENCY_ENV); Serve keeps one fallback proxy on the
        head node, on `fallback_grpc_port`."""
        return self.controller_env.get(DIRECT_INGRESS_ENV) == "1"

    @property
    def fallback_grpc_port(self) -> int:
        """The gRPC port of Serve's proxy: the service's port, or with direct ingress the head's fallback proxy."""
        if not self.direct_ingress:
            return self.grpc_port
        return self.proxy_grpc_port if self.proxy_grpc_port is not None else self.grpc_port + 100

    @property
    def fallback_http_port(self) -> int:
        """The HTTP port of Serve's proxy: the service's port, or with direct ingress the head's fallback proxy."""
        if not self.direct_ingress:
            return self.http_port
        return self.proxy_http_port if self.proxy_http_port is not None else self.http_port + 100

    def serve_env(self) -> dict[str, str]:
        """Environment of the Serve controller and, by inheritance, its proxies and replicas. With direct ingress
        the first Router replica of each node takes `grpc_port` and `http_port` (Serve gives ingress replicas ports
        from a range; here the range starts at the service's port, so clients find it where the config says)."""
        env = dict(self.controller_env) | {MAX_MESSAGE_ENV: str(self.max_message_bytes)} | self.ingress.env()
        if self.direct_ingress:
            env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", str(self.grpc_port))
            env.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", str(self.grpc_port + 99))
            env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(self.http_port))
            env.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(self.http_port + 99))
        return env


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The builder named by the YAML's import_path (`metaspec.deploy.app:build_app`)."""
    return build_application(load_app_config(args))


def build_application(cfg: AppConfig) -> Application:
    workers = {pool.name: _worker(pool) for pool in cfg.pools}
    r = cfg.router
    spread = {"max_replicas_per_node": r.max_replicas_per_node} if r.max_replicas_per_node else {}
    pinned = {"ray_actor_options": {"num_cpus": 0, "resources": dict(r.resources)}} if r.resources else {}
    router = Router.options(num_replicas=r.num_replicas, max_ongoing_requests=r.max_ongoing_requests,
                            max_queued_requests=r.max_queued_requests, user_config=user_config(r),
                            **spread, **pinned)
    return router.bind(r, cfg.pools, workers, arms=specs_from_registry())   # the registry's table, as data


def _worker(pool: PoolSpec) -> Application:
    actor: dict[str, Any] = {"num_cpus": pool.threads if pool.num_cpus is None else pool.num_cpus}
    if pool.num_gpus:
        actor["num_gpus"] = pool.num_gpus
    if pool.resources:
        actor["resources"] = dict(pool.resources)
    # A PEARL drafter with a device of its own: one placement-group bundle per device, the drafter a process in
    # the second (cluster/placement.py); without one, pearl's defaults (a process on a core of the replica's node).
    group = {"placement_group_bundles": [dict(b) for b in pool.placement_bundles],
             "placement_group_strategy": pool.placement_strategy} if pool.placement_bundles else {}
    own = pool.drafter_bundle is not None
    pearl = (PearlConfig(runner="process", drafter_device=pool.drafter_device, lanes=pool.pearl_lanes) if own
             else PearlConfig(lanes=pool.pearl_lanes))
    cfg = worker_config(pool.name, pool.target, pool.drafter, pool.tokenizer, pool.dtype, pool.device, pool.threads,
                        pool.k_max, store_config(pool.tables), pearl, pool.drafter_bundle, batch=batch_config(pool))
    return DecodeWorker.options(name=f"DecodeWorker-{pool.name}", num_replicas=pool.num_replicas,
                                max_ongoing_requests=pool.max_ongoing_requests,
                                max_queued_requests=pool.max_queued_requests, ray_actor_options=actor,
                                **group).bind(cfg)


def batch_config(pool: PoolSpec) -> SchedulerConfig:
    """The replica's step-loop settings from its pool's (a pool names every SchedulerConfig field)."""
    return SchedulerConfig(**{f.name: getattr(pool, f.name) for f in fields(SchedulerConfig)})


def store_config(tables: TablesSpec | None) -> StoreConfig | None:
    if tables is None:
        return None
    return StoreConfig(redis=RedisConfig(url=tables.redis_url, username=tables.redis_username,
                                         password=tables.redis_password, tls=tables.redis_tls,
                                         tls_ca_file=tables.redis_tls_ca_file))


def start(cfg: AppConfig, opts: ServeOptions) -> None:
    """Start Serve's proxies and controller (Ray must be initialised) and deploy the app; returns when ready."""
    from ray.serve.config import gRPCOptions

    serve.start(
        proxy_location=opts.proxy_location,
        http_options={"host": opts.http_host, "port": opts.fallback_http_port},
        grpc_options=gRPCOptions(port=opts.fallback_grpc_port, grpc_servicer_functions=[GRPC_SERVICER],
                                 request_timeout_s=opts.request_timeout_s),
        controller_options={"runtime_env": {"env_vars": opts.serve_env()}},
    )
    serve.run(build_application(cfg), name=opts.app_name, blocking=False)


def load_serve_file(path: str | Path) -> tuple[AppConfig, ServeOptions]:
    """Read a Serve config YAML (like deploy/metaspec.yaml): the first application's args and the Serve options."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    apps = data.get("applications") or [{}]
    app = apps[0]
    if app.get("import_path", "metaspec.deploy.app:build_app") != "metaspec.deploy.app:build_app":
        raise ValueError(f"{path}: the application's import_path must be metaspec.deploy.app:build_app")
    grpc = data.get("grpc_options") or {}
    http = data.get("http_options") or {}
    env = ((data.get("controller_options") or {}).get("runtime_env") or {}).get("env_vars") or {}
    if env.get(CALLBACK_ENV, CALLBACK) != CALLBACK:
        raise ValueError(f"{path}: {CALLBACK_ENV} must be {CALLBACK} (metaspec sets the gRPC ingress's address and "
                         "TLS through it)")
    defaults = ServeOptions()
    direct = str(env.get(DIRECT_INGRESS_ENV)) == "1"
    grpc_port = int(grpc.get("port", defaults.grpc_port))   # with direct ingress: the head's fallback proxy
    http_port = int(http.get("port", defaults.http_port))   # (likewise)
    opts = ServeOptions(grpc_port=int(env.get("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", grpc_port - 100))
                        if direct else grpc_port,
                        proxy_grpc_port=grpc_port if direct else None,
                        http_port=int(env.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", http_port - 100))
                        if direct else http_port,
                        proxy_http_port=http_port if direct else None,
                        http_host=str(http.get("host", defaults.http_host)),
                        ingress=spec_from_env(env),
                        proxy_location=str(data.get("proxy_location", defaults.proxy_location)),
                        max_message_bytes=int(env.get(MAX_MESSAGE_ENV, defaults.max_message_bytes)),
                        request_timeout_s=grpc.get("request_timeout_s"),
                        app_name=str(app.get("name", defaults.app_name)),
                        controller_env={str(k): str(v) for k, v in env.items()   # the ports follow grpc_port
                                        if k not in OWN_ENV and not k.startswith("RAY_SERVE_DIRECT_INGRESS_M")})
    return load_app_config(app.get("args")), opts


def _reachable(host: str) -> str:
    """An address a local client can dial for a server bound to `host` (a wildcard means loopback too)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def missing_checkpoints(cfg: AppConfig) -> list[str]:
    """Local checkpoint directories the config names that do not exist (checked before a local deploy)."""
    paths = [p for pool in cfg.pools for p in (pool.target, pool.drafter, pool.tokenizer) if p]
    return sorted({p for p in paths if not Path(p).is_dir()})


def local_cpus(cfg: AppConfig) -> int:
    """Logical CPUs a loopback Ray needs: every replica's CPUs (and at least this machine's count)."""
    import math
    import os

    need = sum(_replica_cpus(p) * p.num_replicas for p in cfg.pools)
    return max(os.cpu_count() or 1, math.ceil(need))


def _replica_cpus(pool: PoolSpec) -> float:
    """Ray CPUs one replica holds: its own, plus its PEARL drafter's bundle."""
    own = pool.threads if pool.num_cpus is None else pool.num_cpus
    return own + sum(b.get("CPU", 0.0) for b in pool.placement_bundles[1:])


def serve_until_interrupted(cfg: AppConfig, opts: ServeOptions, address: str | None = None,
                            num_cpus: int | None = None, stop_timeout_s: float = 20.0) -> None:
    """`metaspec serve`: join `address` (or start a loopback Ray), deploy, print the address, block until Ctrl-C
    (or SIGTERM), then shut Serve and Ray down and leave no process behind (see `stop`)."""
    import signal
    import time

    import ray

    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus or local_cpus(cfg),
                 include_dashboard=False)   # a new loopback Ray even when another one runs on this machine
    signal.signal(signal.SIGTERM, _interrupt)   # after ray.init, whose own handler exits without stopping Ray
    try:
        start(cfg, opts)
        pools = ", ".join(f"{p.name} ({p.num_replicas}x{p.threads} threads)" for p in cfg.pools)
        grpc_at = bind_address(_reachable(opts.ingress.host), opts.grpc_port)
        tls = " --tls --ca-cert CA.pem" if opts.ingress.tls else ""
        print(f"metaspec is serving gRPC{' (TLS)' if opts.ingress.tls else ''} on {grpc_at} and the OpenAI HTTP API "
              f"on http://{bind_address(_reachable(opts.http_host), opts.http_port)}/v1 — pools: {pools}", flush=True)
        print(f"try: metaspec generate --server {grpc_at}{tls} \"def fibonacci(n):\"  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(stop_timeout_s)


def stop(timeout_s: float = 20.0) -> None:
    """Shut Serve down (at most `timeout_s`: in-flight requests drain meanwhile), then Ray, then wait for every
    process this one started (raylet, GCS, the dashboard and runtime-env agents, workers) to be gone: Ray's agents
    outlive their raylet by 40 s and more otherwise, holding ports. A second Ctrl-C / SIGTERM does not cut it short."""
    import signal
    import threading

    import ray
    import psutil                                    # (Ray ships it)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    ours = _descendants()                            # now: once their raylet is gone they belong to init, not us
    _detached_reaper([p.pid for p in ours])          # and if Ray ends this process abruptly, they still go
    done = threading.Thread(target=_quiet_serve_shutdown, daemon=True)
    done.start()
    done.join(timeout_s)
    if not done.is_alive():   # Serve still shutting down: ray.shutdown() now would make that thread's next Ray
        ray.shutdown()        # call exit the whole process before the reaping below (seen on a loaded CI box)
    ours += [p for p in _descendants() if p.pid not in {q.pid for q in ours}]
    _, alive = psutil.wait_procs(ours, timeout=5)
    for proc in alive:
        _signal(proc, "terminate")
    _, alive = psutil.wait_procs(alive, timeout=5)
    for proc in alive:
        _signal(proc, "kill")
    psutil.wait_procs(alive, timeout=5)


_REAPER = """
import os, signal, sys, time
me, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
deadline = time.monotonic() + 180
while alive(me) and time.monotonic() < deadline:
    time.sleep(0.2)
for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    left = [p for p in pids if alive(p)]
    if not left:
        break
    for pid in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(wait_s)
"""


def _detached_reaper(pids: list[int]) -> None:
    """A process of its own session that, once this one has exited (however it exits), stops what is left of
    `pids`: SIGTERM, then SIGKILL 5 s later."""
    import os
    import subprocess
    import sys

    if pids:
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), *map(str, pids)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _quiet_serve_shutdown() -> None:
    try:
        serve.shutdown()
    except Exception as exc:                         # Ray's shutdown below stops what Serve could not
        print(f"serve shutdown: {type(exc).__name__}: {exc}", flush=True)


def _descendants() -> list:
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _signal(proc, how: str) -> None:
    import psutil

    try:
        getattr(proc, how)()
    except psutil.Error:
        pass
