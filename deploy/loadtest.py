"""Serving benchmarks against a running service: serving overhead, and a bounded load test with an optional replica
kill half way through.

    python -m metaspec.deploy.loadtest overhead --server 127.0.0.1:9000 --app metaspec --pool cpu
    python -m metaspec.deploy.loadtest overhead --local a.yaml --local b.yaml --pool cpu   # two configs, interleaved
    python -m metaspec.deploy.loadtest load --server 127.0.0.1:9000 --concurrency 16 --duration-s 30 \
        --kill-pool cpu --app metaspec

`overhead` and `--kill-pool` join the service's Ray cluster (`--address`, default "auto") to call a worker
directly and to find its replicas. Speed lives here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from metaspec.protocol.client import Client, ServiceError

PROMPTS = ["def fibonacci(n):", "Write a short story about a robot who learns to paint.",
           "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
           "Translate to French: The weather is nice today.", "import numpy as np\n\ndef softmax(x):"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# ---- serving overhead ---------------------------------------------------------------------------------------

def overhead(server: str, apps: Sequence[str], pool: str, n: int = 200, max_tokens: int = 1, method: str = "ar",
             api_key: str | None = None) -> dict[str, dict]:
    """p50/p99 of one short request through gRPC + router vs the same call straight to a worker (DeploymentHandle),
    per app. Several apps of one Serve instance (e.g. two configs) are measured interleaved, in rotated order.

    The difference is what the serving layer adds: gRPC proxy, router hop, checks, choice, outcome fsync.
    `method=""` lets the router's selector choose (featurization + model included); the direct call then runs
    the arm it chose. `pair_overhead_*` are percentiles of (gRPC call - the direct call right after it).
    """
    from ray import serve

    samples: dict[str, list[tuple[float, ...]]] = {app: [] for app in apps}
    workers = {app: serve.get_deployment_handle(f"DecodeWorker-{pool}", app_name=app) for app in apps}
    clients = {app: Client(server, api_key=api_key, application=app if len(apps) > 1 else None) for app in apps}
    try:
        for i in range(n + 10):                     # the first 10 rounds are warm-up
            for app in apps[i % len(apps):] + apps[: i % len(apps)]:
                sample = _overhead_pair(clients[app], workers[app], pool, max_tokens, method)
                if i >= 10:
                    samples[app].append(sample)
    finally:
        for client in clients.values():
            client.close()
    return {app: _overhead_stats(rows, max_tokens, method) for app, rows in samples.items()}


def _overhead_pair(client: Client, worker, pool: str, max_tokens: int,
                   method: str) -> tuple[float, float, float, float, float]:
    """(gRPC s, direct handle s, engine s, router s, worker s) of one request each way; the last two are what the
    router measured around the request and what the worker measured of its part of it."""
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    t0 = time.perf_counter()
    reply = client.generate(PROMPTS[0], max_tokens=max_tokens, method=method)
    t1 = time.perf_counter()
    request = Request(prompt=PROMPTS[0], params=SamplingParams(max_tokens=max_tokens), method=reply.method)
    result = worker.generate.remote(request).result()           # the arm the router used
    t2 = time.perf_counter()
    assert reply.pool == pool, f"the router chose pool {reply.pool}; measure with a single-pool app"
    return t1 - t0, t2 - t1, result.wall_s, reply.timings["wall_s"], reply.timings["worker_wall_s"]


def _overhead_stats(rows: list[tuple[float, ...]], max_tokens: int, method: str) -> dict:
    grpc_s, handle_s, engine_s, router_s, worker_s = (list(col) for col in zip(*rows))
    pairs = [row[0] - row[1] for row in rows]
    ms = {name: statistics.median(v) * 1e3 for name, v in (("grpc", grpc_s), ("handle", handle_s),
                                                           ("engine", engine_s))}
    return {"n": len(rows), "max_tokens": max_tokens, "method": method or "auto",
            "pair_overhead_p50_ms": statistics.median(pairs) * 1e3, "pair_overhead_p99_ms": percentile(pairs, 99) * 1e3,
            "grpc_p50_ms": ms["grpc"], "grpc_p99_ms": percentile(grpc_s, 99) * 1e3,
            "worker_handle_p50_ms": ms["handle"], "worker_handle_p99_ms": percentile(handle_s, 99) * 1e3,
            "engine_p50_ms": ms["engine"], "serving_overhead_p50_ms": ms["grpc"] - ms["handle"],
            "overhead_vs_engine_p50_ms": ms["grpc"] - ms["engine"],
            # where it goes: client+gRPC proxy+proxy->router hop, and the router's own span minus the worker's
            "outside_router_p50_ms": statistics.median(g - r for g, r in zip(grpc_s, router_s)) * 1e3,
            "router_minus_worker_p50_ms": statistics.median(r - w for r, w in zip(router_s, worker_s)) * 1e3}


def start_local(config_paths: Sequence[str], outcome_dir: str) -> tuple[str, list[str]]:
    """A loopback Ray + Serve with each Serve config file deployed as its own app (`app0`, `app1`, ...), to compare
    configs interleaved in one run. Outcomes go to `outcome_dir`/appN. Returns (gRPC address, app names)."""
    import dataclasses
    import socket

    import ray
    from ray import serve

    from .app import build_application, load_serve_file, local_cpus, start

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    loaded = [load_serve_file(path) for path in config_paths]
    if len(loaded) > 1 and any(opts.direct_ingress for _, opts in loaded):
        raise ValueError("configs with direct ingress serve each app on its own port: measure them one at a time")
    apps = [f"app{i}" for i in range(len(loaded))]
    cfgs = [dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, outcome_dir=f"{outcome_dir}/{app}"))
            for (cfg, _), app in zip(loaded, apps)]
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=sum(local_cpus(c) for c in cfgs),
             include_dashboard=False, log_to_driver=False)
    port = free_port()
    start(cfgs[0], dataclasses.replace(loaded[0][1], grpc_port=port, http_port=free_port(), app_name=apps[0],
                                      proxy_grpc_port=free_port(), proxy_http_port=free_port()))
    for cfg, app in zip(cfgs[1:], apps[1:]):
        serve.run(build_application(cfg), name=app, route_prefix=f"/{app}", blocking=False)
    address = f"127.0.0.1:{port}"
    for app in apps:                                   # wait until each answers through gRPC
        with Client(address, application=app if len(apps) > 1 else None, timeout_s=600) as client:
            client.health()
    return address, apps


# ---- load test ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    start_s: float           # since the load test began
    wall_s: float
    ttft_s: float
    code: str
    tokens: int
    method: str


@dataclass
class LoadReport:
    concurrency: int
    duration_s: float
    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    longest_s: float = 0.0
    methods: dict[str, int] = field(default_factory=dict)
    killed: str = ""                                          # replica actor killed half way, if any
    kill_at_s: float = 0.0
    codes_before_kill: dict[str, int] = field(default_factory=dict)
    codes_after_kill: dict[str, int] = field(default_factory=dict)   # requests that started after the kill


def load(server: str, concurrency: int = 16, duration_s: float = 30.0, max_tokens: int = 64,
         api_key: str | None = None, kill_pool: str | None = None, app: str = "metaspec",
         timeout_s: float = 120.0) -> LoadReport:
    """`concurrency` closed-loop streaming clients for `duration_s`; optionally kill one replica of `kill_pool`
    at half time. Every request carries a deadline (`timeout_s`), so a hang would show up as DEADLINE_EXCEEDED."""
    samples: list[Sample] = []
    t_start = time.perf_counter()

    def client_loop(idx: int) -> None:
        with Client(server, api_key=api_key, timeout_s=timeout_s) as client:
            i = 0
            while time.perf_counter() < t_start + duration_s:
                t0 = time.perf_counter()
                first, code, tokens, method = None, "OK", 0, ""
                try:
                    for msg in client.stream(PROMPTS[(idx + i) % len(PROMPTS)], max_tokens=max_tokens):
                        first = first or time.perf_counter()
                        tokens += len(msg.token_ids)
                        method = msg.method or method
                except ServiceError as exc:
                    code = exc.code
                t1 = time.perf_counter()
                samples.append(Sample(t0 - t_start, t1 - t0, (first or t1) - t0, code, tokens, method))
                i += 1

    report = LoadReport(concurrency, duration_s)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client_loop, i) for i in range(concurrency)]
        if kill_pool:
            time.sleep(duration_s / 2)
            report.killed = kill_one_replica(app, kill_pool)
            report.kill_at_s = time.perf_counter() - t_start
        for f in futures:
            f.result()
    return summarize(report, samples, time.perf_counter() - t_start)


def summarize(report: LoadReport, samples: list[Sample], wall_s: float) -> LoadReport:
    ok = [s for s in samples if s.code == "OK"]

    def count(items) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in items:
            out[key] = out.get(key, 0) + 1
        return out

    report.requests = len(samples)
    report.codes = count(s.code for s in samples)
    report.methods = count(s.method for s in ok)
    report.tokens_per_s = sum(s.tokens for s in ok) / wall_s
    report.requests_per_s = len(ok) / wall_s
    report.latency_p50_s, report.latency_p99_s = percentile([s.wall_s for s in ok], 50), \
        percentile([s.wall_s for s in ok], 99)
    report.ttft_p50_s, report.ttft_p99_s = percentile([s.ttft_s for s in ok], 50), percentile([s.ttft_s for s in ok], 99)
    report.longest_s = max((s.wall_s for s in samples), default=0.0)
    if report.killed:
        report.codes_before_kill = count(s.code for s in samples if s.start_s + s.wall_s < report.kill_at_s)
        report.codes_after_kill = count(s.code for s in samples if s.start_s > report.kill_at_s)
    return report


def kill_one_replica(app: str, pool: str) -> str:
    """ray.kill one live replica actor of the pool's DecodeWorker deployment; returns its actor name."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#DecodeWorker-{pool}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and a["name"].startswith(prefix))
    if not names:
        raise RuntimeError(f"no live replica named {prefix}*")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaspec.deploy.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--method", default="ar", help='arm to ask for; "" = let the selector choose')
    p.add_argument("--pool", required=True)
    p.add_argument("--local", action="append", default=[], metavar="SERVE_YAML",
                   help="start a loopback service with this config instead of joining one (repeat to compare "
                        "configs interleaved: apps app0, app1, ...); --server/--app/--address are then ignored")
    p.add_argument("--outcome-dir", default="/tmp/metaspec-overhead", help="outcome logs of --local apps")
    q = sub.add_parser("load")
    q.add_argument("--concurrency", type=int, default=16)
    q.add_argument("--duration-s", type=float, default=30.0)
    q.add_argument("--max-tokens", type=int, default=64)
    q.add_argument("--kill-pool", default=None)
    for s in (p, q):
        s.add_argument("--server", required=s is q)
        s.add_argument("--app", default="metaspec")
        s.add_argument("--address", default="auto", help="Ray cluster of the service (overhead, --kill-pool)")
        s.add_argument("--api-key-file", default=None, metavar="PATH", help="first line = the API key (default: "
                       "$METASPEC_API_KEY; never a key on the command line)")
    args = parser.parse_args(argv)
    from metaspec.protocol.client import read_api_key

    args.api_key = read_api_key(args.api_key_file)
    if args.command == "overhead" and args.local:
        server, apps = start_local(args.local, args.outcome_dir)
    elif args.command == "overhead" or args.kill_pool:
        import ray

        ray.init(address=args.address, log_to_driver=False)
        server, apps = args.server, [args.app]
    if args.command == "overhead":
        if not server:
            parser.error("overhead needs --server or --local")
        out = overhead(server, apps, args.pool, args.n, args.max_tokens, args.method, args.api_key)
    else:
        out = asdict(load(args.server, args.concurrency, args.duration_s, args.max_tokens, args.api_key,
                          args.kill_pool, args.app))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
