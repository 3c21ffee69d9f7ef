"""Layers import downward only: `protocol/` and the router (with everything its process imports) load no torch and
no engine module. Checked in a fresh interpreter, so nothing another test imported hides an offender."""

from __future__ import annotations

import json
import subprocess
import sys

# What the router's process imports: the gRPC and HTTP edges, the router and its pieces, the selector it runs.
ROUTER_SIDE = ("metaspec.protocol.convert", "metaspec.protocol.client", "metaspec.protocol.types",
               "metaspec.deploy.router", "metaspec.deploy.openai_http", "metaspec.deploy.openai_protocol",
               "metaspec.deploy.access", "metaspec.deploy.policy", "metaspec.deploy.tokens",
               "metaspec.selector.rules", "metaspec.selector.live", "metaspec.selector.features",
               "metaspec.workers.store", "metaspec.workers.store.sync")   # the router's n-gram mirror (policy.py)
# The only worker modules the router side may import: torch-free types, the outcome log, the shared tables.
WORKER_MODULES_ALLOWED = {"metaspec.workers", "metaspec.workers.errors", "metaspec.workers.request",
                          "metaspec.workers.outcome_log", "metaspec.workers.outcome_files", "metaspec.workers.store",
                          *(f"metaspec.workers.store.{m}" for m in ("adjacency", "counters", "keys", "ngram", "sync"))}

PROBE = """
import json, sys
for name in {names!r}:
    __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


def _imported(names: tuple[str, ...]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(names=names)], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_protocol_and_router_import_no_torch_and_no_engine_module():
    modules = _imported(ROUTER_SIDE)
    heavy = [m for m in modules if m == "torch" or m.startswith("torch.")]
    engine = [m for m in modules if m.startswith("metaspec.workers") and m not in WORKER_MODULES_ALLOWED]
    assert not heavy and not engine, (f"the router side imports torch ({len(heavy)} torch modules) and/or engine "
                                      f"modules: {engine}")


def test_the_workers_still_export_the_request_types():
    """Moving the torch-free types kept every old import path (one class each, not copies)."""
    from metaspec.workers import constraint, engine, request, types, worker

    assert engine.Request is request.Request and engine.Result is request.Result and engine.Chunk is request.Chunk
    assert types.SamplingParams is request.SamplingParams and types.DecodeStats is request.DecodeStats
    assert constraint.ConstraintSpec is request.ConstraintSpec and worker.WorkerInfo is request.WorkerInfo
