"""One command that shows the product: start the service on the shipped models, send a few real requests through
gRPC at once (they share the worker's batched steps, each with the method the router chose for it), print the
answers with the chosen method, stop. The prompts are the kind of text the shipped model was trained on: Python
code, its documentation and man pages.

    python -m metaspec.deploy.demo [--config deploy/metaspec.yaml] [--grpc-port 9000]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from concurrent.futures import ThreadPoolExecutor

from metaspec.protocol.types import Constraint

from .app import DEFAULT_YAML, load_serve_file, local_cpus, missing_checkpoints, start

SCHEMA = ('{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, '
          '"version": {"type": "integer"}}, "required": ["name", "version"], "additionalProperties": false}')
PROMPTS = [
    ("code", 'def read_config(path):\n    """Read a JSON file and return its contents as a dict."""\n', {}),
    ("docs", "os.path.join(path, *paths)\n    Join one or more path segments intelligently. The return value", {}),
    ("man", "NAME\n       ls - list directory contents\n\nSYNOPSIS\n       ls [OPTION]... [FILE]...\n\n"
            "DESCRIPTION\n", {}),
    ("repeat", "import os\nimport sys\nimport json\nimport os\nimport sys\nimport", {"method": "pld"}),
    ("json", "A package description as JSON: ", {"constraint": Constraint("json_schema", SCHEMA)}),
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
            with ThreadPoolExecutor(len(PROMPTS)) as pool:     # at once: the worker batches them
                replies = list(pool.map(lambda p: _ask(client, p[1], max_tokens, p[2]), PROMPTS))
            for (name, prompt, _), r in zip(PROMPTS, replies):
                if isinstance(r, ServiceError):
                    print(f"[{name}] error: {r}")
                    continue
                print(f"[{name}] method={r.method} pool={r.pool} ({r.reason}) "
                      f"{r.completion_tokens} tokens, {r.timings['tokens_per_s']:.0f} tok/s, "
                      f"acceptance length {r.acceptance['acceptance_length']:.2f}")
                print(f"{prompt}\033[1m{r.text}\033[0m\n")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _ask(client, prompt: str, max_tokens: int, extra: dict):
    from metaspec.protocol.client import ServiceError

    try:
        return client.generate(prompt, max_tokens=max_tokens, **extra)
    except ServiceError as exc:
        return exc


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
