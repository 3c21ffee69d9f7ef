"""Serving benchmarks against a running service: serving overhead, and a bounded load test with an optional replica
kill half way through.

    python -m metaspec.deploy.loadtest overhead --server 127.0.0.1:9000 --app metaspec --pool cpu
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

def overhead(server: str, app: str, pool: str, n: int = 200, max_tokens: int = 1, method: str = "ar",
             api_key: str | None = None) -> dict:
    """p50/p99 of one short request through gRPC + router vs the same call straight to a worker (DeploymentHandle).

    The difference is what the serving layer adds: gRPC proxy, router hop, checks, choice, outcome fsync.
    """
    from ray import serve

    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    worker = serve.get_deployment_handle(f"DecodeWorker-{pool}", app_name=app)
    request = Request(prompt=PROMPTS[0], params=SamplingParams(max_tokens=max_tokens), method=method)
    grpc_s, handle_s, engine_s = [], [], []
    with Client(server, api_key=api_key) as client:
        for i in range(n + 10):                     # interleaved, first 10 of each are warm-up
            t0 = time.perf_counter()
            reply = client.generate(PROMPTS[0], max_tokens=max_tokens, method=method)
            t1 = time.perf_counter()
            result = worker.generate.remote(request).result()
            t2 = time.perf_counter()
            if i >= 10:
                grpc_s.append(t1 - t0)
                handle_s.append(t2 - t1)
                engine_s.append(result.wall_s)
            assert reply.pool == pool, f"the router chose pool {reply.pool}; measure with a single-pool app"
    p50 = {k: statistics.median(v) * 1e3 for k, v in (("grpc", grpc_s), ("handle", handle_s), ("engine", engine_s))}
    return {"n": n, "max_tokens": max_tokens, "method": method,
            "grpc_p50_ms": p50["grpc"], "grpc_p99_ms": percentile(grpc_s, 99) * 1e3,
            "worker_handle_p50_ms": p50["handle"], "worker_handle_p99_ms": percentile(handle_s, 99) * 1e3,
            "engine_p50_ms": p50["engine"],
            "serving_overhead_p50_ms": p50["grpc"] - p50["handle"],
            "overhead_vs_engine_p50_ms": p50["grpc"] - p50["engine"]}


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
    p.add_argument("--method", default="ar")
    p.add_argument("--pool", required=True)
    q = sub.add_parser("load")
    q.add_argument("--concurrency", type=int, default=16)
    q.add_argument("--duration-s", type=float, default=30.0)
    q.add_argument("--max-tokens", type=int, default=64)
    q.add_argument("--kill-pool", default=None)
    for s in (p, q):
        s.add_argument("--server", required=True)
        s.add_argument("--app", default="metaspec")
        s.add_argument("--address", default="auto", help="Ray cluster of the service (overhead, --kill-pool)")
        s.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    if args.command == "overhead" or args.kill_pool:
        import ray

        ray.init(address=args.address, log_to_driver=False)
    if args.command == "overhead":
        out = overhead(args.server, args.app, args.pool, args.n, args.max_tokens, args.method, args.api_key)
    else:
        out = asdict(load(args.server, args.concurrency, args.duration_s, args.max_tokens, args.api_key,
                          args.kill_pool, args.app))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
