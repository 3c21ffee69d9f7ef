"""Run in a subprocess by metaspec/bench/baseline.py: the same closed-loop load on ANOTHER commit's engine.

It imports nothing of the current tree: argv[1] is a folder holding `metaspec/` whose subpackages (workers,
selector, cluster) are that commit's files. It replays the pre-batching worker faithfully: every request is
`Engine.stream(request)`, and every client's `next(steps)` runs on ONE ThreadPoolExecutor(max_workers=1) thread
(the old `DecodeWorker`'s decode thread), so requests take turns a step at a time, one forward per request.

Protocol (JSON lines): stdin line 1 = setup {target, drafter, dtype, threads, prompts, max_tokens, ignore_eos};
then {"method", "concurrency"} per load, or {"warm": [methods]}; each answered on stdout with
{"traces": [...], "wall_s", "peak_rss_mb"} ({"ok": true} for warm). EOF ends it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

_END = object()


def _use_tree(root: str) -> None:
    """`metaspec` = the old tree's package: put it first and drop the editable install's finder."""
    sys.path.insert(0, root)
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]


def _engine(setup: dict):
    from metaspec.workers.engine import Engine, EngineConfig
    from metaspec.workers.model import ModelConfig

    def model(path):
        return ModelConfig(path, dtype=setup["dtype"], threads=setup["threads"])

    drafter = model(setup["drafter"]) if setup["drafter"] else None
    return Engine(EngineConfig(target=model(setup["target"]), drafter=drafter, default_method="ar",
                               learn_emitted=False))


def _reset_tables(engine) -> None:
    from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable

    v = engine.target.vocab_size
    engine.resources.update({"ngram_table": NgramTable(NgramConfig(), v), "adjacency_table": AdjacencyTable(v)})


def _stamped_next(steps):
    item = next(steps, _END)
    return item, time.perf_counter()   # stamped on the decode thread, as the new engine's sink stamps its steps


def _one(engine, decode: ThreadPoolExecutor, ids: list[int], method: str | None, params) -> dict:
    from metaspec.workers.engine import Chunk, Request

    trace = {"t_send": time.perf_counter(), "t_chunks": [], "n_chunks": [], "error": None, "drafts": 0,
             "accepted": 0}
    steps = engine.stream(Request(prompt_ids=tuple(ids), params=params, method=method))
    try:
        while (got := decode.submit(_stamped_next, steps).result())[0] is not _END:
            item, t = got
            if isinstance(item, Chunk) and item.token_ids:
                trace["t_chunks"].append(t)
                trace["n_chunks"].append(len(item.token_ids))
            elif not isinstance(item, Chunk):
                stats = item.stats   # a RequestStats record, or a dict on trees from before it
                get = stats.get if isinstance(stats, dict) else (lambda k, _=0: getattr(stats, k))
                trace["drafts"], trace["accepted"] = get("drafts", 0), get("accepted", 0)
    except Exception as exc:  # noqa: BLE001 - a failed request is a failed trace
        trace["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        decode.submit(steps.close)
    return trace


def _load(engine, decode, setup: dict, method: str | None, concurrency: int, prompts: list) -> dict:
    from metaspec.workers.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=setup["max_tokens"], seed=0, ignore_eos=setup["ignore_eos"])
    pending, lock, traces = list(reversed(prompts)), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                ids = pending.pop()
            trace = _one(engine, decode, ids, method, params)
            with lock:
                traces.append(trace)

    _reset_tables(engine)
    _reset_peak()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, len(prompts)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"traces": traces, "wall_s": time.perf_counter() - t0, "peak_rss_mb": _peak_mb()}


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def main() -> int:
    out = os.fdopen(os.dup(1), "w")   # replies only; anything a library prints goes to stderr
    os.dup2(2, 1)
    _use_tree(sys.argv[1])
    setup = json.loads(sys.stdin.readline())
    engine = _engine(setup)
    decode = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "warm" in cmd:
            for m in cmd["warm"]:
                _load(engine, decode, setup, m, 2, setup["prompts"][:2])
            reply = {"ok": True, "methods": engine.available_methods()}
        else:
            reply = _load(engine, decode, setup, cmd["method"], cmd["concurrency"], setup["prompts"])
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
