"""One command that shows the product: start the service on the shipped models, send a few real requests through
gRPC, print the answers with the method the router chose, stop.

    python -m metaspec.deploy.demo [--config deploy/metaspec.yaml] [--grpc-port 9000]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .app import DEFAULT_YAML, load_serve_file, local_cpus, missing_checkpoints, start

PROMPTS = [
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", {}),
    ("story", "Once upon a time, in a small village by the sea,", {}),
    ("math", "Question: A baker makes 12 loaves a day for 5 days. How many loaves?\nAnswer:", {}),
    ("repeat", "Copy the list: apples, pears, plums, apples, pears, plums, apples,", {"method": "pld"}),
]


def run(config: str, grpc_port: int | None, max_tokens: int) -> int:
    import ray
    from ray import serve

    from metaspec.protocol.client import Client, ServiceError

    cfg, opts = load_serve_file(config)
    opts = replace(opts, grpc_port=grpc_port, proxy_grpc_port=None) if grpc_port else opts
    if missing := missing_checkpoints(cfg):
        print(f"error: checkpoints not found: {', '.join(missing)} (run `metaspec train`)", file=sys.stderr)
        return 2
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=local_cpus(cfg), include_dashboard=False,
             log_to_driver=False)
    try:
        start(cfg, opts)
        address = f"127.0.0.1:{opts.grpc_port}"
        with Client(address, timeout_s=120) as client:
            print(f"service up on {address}; methods: "
                  f"{', '.join(m.name for m in client.list_methods().methods)}\n")
            for name, prompt, extra in PROMPTS:
                try:
                    r = client.generate(prompt, max_tokens=max_tokens, **extra)
                except ServiceError as exc:
                    print(f"[{name}] error: {exc}")
                    continue
                print(f"[{name}] method={r.method} pool={r.pool} ({r.reason}) "
                      f"{r.completion_tokens} tokens, {r.timings['tokens_per_s']:.0f} tok/s, "
                      f"acceptance length {r.acceptance['acceptance_length']:.2f}")
                print(f"{prompt}\033[1m{r.text}\033[0m\n")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaspec.deploy.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_YAML))
    parser.add_argument("--grpc-port", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    return run(args.config, args.grpc_port, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
