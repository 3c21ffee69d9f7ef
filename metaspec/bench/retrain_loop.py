"""The retraining loop, end to end, on a loopback service: the product's "retrained from its own logged metrics".

    python -m metaspec.bench.retrain_loop [--config deploy/metaspec.yaml] [--rounds 3] [--trace-requests 48]
        [--concurrency 1,4,16] [--explore 0.2] [--out runs/retrain-loop-...]

1. Start the service from `--config` with `router.selector` set to a file that does not exist yet (so the router
   serves the fixed arm, `SelectorConfig.fixed_method`, with exploration `--explore` to other arms),
   `selector_check_s` short and the outcome log in a temporary folder.
2. Round 0: the mixed trace (`metaspec.bench.trace`) through gRPC at every level for `auto` and every fixed arm
   (method named). Its fixed-arm outcomes are the oracle's data; its `auto` run is the fixed-arm-plus-exploration
   baseline.
3. Each round r >= 1: `selector.retrain.retrain` (what `metaspec retrain` runs) on the service's own outcome log,
   written into the router's selector path; a probe request per check period until ListMethods reports the new
   `selector_version`; then the trace again for `auto`, for the round-0 best fixed arms and for `ar` (measured
   in the same round, so machine drift hits them alike; `--no-watch-ar` leaves ar out). With `--repeats` k the
   round replays the trace k times per policy, interleaved (auto, fixed, fixed, auto, ...: `trace.pass_order`);
   auto / fixed is pooled over the repeats and given repeat by repeat, whose spread says how far one pass can
   be trusted. Repeat k > 0's request ids are `r{i}.{k}/...` (loop_mix reports each repeat as its own round).

Training data: by default every trace request the service logged (`--train-on all`): the router's own choices
(the fixed arm, what exploration sent elsewhere, later the learnt selector's) and the requests that named an arm
(round 0 runs every arm on every trace request: counterfactuals no exploration rate gives). `--train-on routed`
keeps only `reason` != "override", what a service whose clients never name an arm logs: with `explore` 0.2 over
six other arms that is ~80% the fixed arm (measured 2026-12-01: too few rows of the winning arm to learn it).

Before every pass the worker replicas' n-gram and recycling tables are emptied (`DecodeWorker.reset_tables`;
`run_trace`'s docstring says why): every policy and round starts from the same table state.

The oracle, estimated from the logged outcomes of round 0 (`oracle_estimate`): at level c, each trace request i
ran under every fixed arm a with router-measured latency L[a, i] (outcome `wall_s`). The per-request oracle runs
each request with its fastest arm, L*[i] = min_a L[a, i]. In a closed loop of c clients the throughput is c over
the mean latency (Little's law), so the oracle's tokens/s is estimated as the best fixed arm's measured tokens/s
times sum_i L[best, i] / sum_i L*[i]. This assumes a request's latency under an arm does not depend on the arms
of the requests batched with it (under batching it does), and that every arm emits the same tokens (greedy and
EOS-ignoring requests do; sampled constrained ones may differ slightly). Over the whole trace: every level's
tokens over the sum of the levels' oracle wall times. Output: `retrain_loop.json`, `retrain_loop.txt`,
`retrain_loop.png` (routed tokens/s per round, per level and whole, against the best fixed arm and the oracle).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from metaspec.bench.trace import TraceConfig, TraceMix, run_trace
from metaspec.bench.trace_report import AUTO, best_fixed, pass_ratios

PROBE = "probe"


@dataclass(frozen=True)
class LoopConfig:
    config: str | None = None                # Serve YAML to start from (None = deploy/metaspec.yaml)
    rounds: int = 3                          # retrain rounds after round 0
    explore: float = 0.2                     # router exploration share
    check_s: float = 1.0                     # router selector_check_s
    concurrency: tuple[int, ...] = (1, 4, 16)   # trace levels
    mix: TraceMix = field(default_factory=TraceMix)
    train_on: str = "all"                    # "all": every logged trace request (round 0's named arms too) |
                                             # "routed": only what the router chose itself
    reload_timeout_s: float = 120.0          # give up waiting for the router to report the new version
    repeats: int = 1                         # passes per (policy, level) in rounds >= 1, interleaved A B, B A
    watch_ar: bool = True                    # rounds >= 1 run ar too (auto / ar measured in the same round)
    work_dir: str | None = None              # YAML, outcome log, selector file (None = a new temp dir)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.train_on not in ("routed", "all") or not 0 <= self.explore <= 1 \
                or self.repeats < 1:
            raise ValueError("rounds >= 1, train_on routed|all, explore in [0, 1], repeats >= 1")


# ---- pure parts ----------------------------------------------------------------------------------------------

def parse_request_id(rid: str) -> dict | None:
    """`r0/c4/pld/17` -> {round: "r0", concurrency: 4, policy: "pld", index: 17}; None for other ids."""
    parts = rid.split("/")
    if len(parts) != 4 or not parts[1].startswith("c") or not parts[1][1:].isdigit() or not parts[3].isdigit():
        return None
    return {"round": parts[0], "concurrency": int(parts[1][1:]), "policy": parts[2], "index": int(parts[3])}


def training_records(records: list[dict], train_on: str) -> list[dict]:
    """The outcome records a round trains on: trace requests only (no probes); routed ones unless `all`."""
    out = []
    for r in records:
        rid = parse_request_id(r.get("request_id", ""))
        if rid is None or r.get("status") != "OK":
            continue
        if train_on == "routed" and r.get("reason") == "override":
            continue
        out.append(r)
    return out


def oracle_estimate(records: list[dict], fixed_tps: dict[int, dict[str, float]], round_tag: str = "r0") -> dict:
    """Per level and "all": the oracle's estimated tokens/s from round `round_tag`'s fixed-arm outcomes (module
    docstring). `fixed_tps[level][arm]`: the measured tokens/s of each fixed arm at that level."""
    wall: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    tokens: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        rid = parse_request_id(r.get("request_id", ""))
        if rid is None or rid["round"] != round_tag or rid["policy"] == AUTO or r.get("status") != "OK":
            continue
        wall[rid["concurrency"]][rid["policy"]][rid["index"]] = float(r["wall_s"])
        tokens[rid["concurrency"]][rid["policy"]] += int(r.get("completion_tokens", 0))
    out, total_tokens, total_wall = {}, 0, 0.0
    for level, arms in sorted(wall.items()):
        measured = {a: t for a, t in fixed_tps.get(level, {}).items() if a in arms}
        if not measured:
            continue
        best = max(measured, key=measured.get)
        common = set.intersection(*(set(v) for v in arms.values()))
        if not common:
            continue
        fastest = {i: min(arms, key=lambda a: arms[a].get(i, float("inf"))) for i in common}
        l_best = sum(arms[best][i] for i in common)
        l_oracle = sum(arms[fastest[i]][i] for i in common)
        tps = measured[best] * l_best / l_oracle
        out[str(level)] = {"oracle_tokens_per_s": tps, "best_fixed": best, "best_fixed_tokens_per_s": measured[best],
                           "latency_ratio": l_best / l_oracle, "requests": len(common),
                           "oracle_arms": dict(Counter(fastest.values()))}
        total_tokens += tokens[level][best]
        total_wall += tokens[level][best] / tps
    if total_wall:
        out["all"] = {"oracle_tokens_per_s": total_tokens / total_wall}
    return out


def round_summary(index: int, trace: dict, retrain: dict | None, version: str | None, reload_s: float | None
                  ) -> dict:
    """What one round reports: auto's and the fixed arms' tokens/s per level and whole (pooled over the round's
    repeats, each repeat's own under `..._passes`), and what auto routed."""
    recs = trace["records"]
    auto = {str(r["concurrency"]): r for r in recs if r["policy"] == AUTO}
    fixed: dict[str, dict[str, float]] = defaultdict(dict)
    fixed_passes: dict[str, dict[str, list]] = defaultdict(dict)
    for r in recs:
        if r["policy"] != AUTO:
            fixed[str(r["concurrency"])][r["policy"]] = r["output_tokens_per_s"]
            fixed_passes[str(r["concurrency"])][r["policy"]] = r.get("passes", [])
    runs = [r for r in trace["runs"] if r["policy"] == AUTO]
    routed = sum((Counter(r.get("methods", {})) for r in runs), Counter())
    return {"round": index, "selector_version": version, "reload_s": reload_s,
            "retrain": {k: v for k, v in (retrain or {}).items() if k not in ("cv_scores",)} or None,
            "auto_tokens_per_s": {lv: r["output_tokens_per_s"] for lv, r in auto.items()},
            "auto_tpot_ms": {lv: r["tpot_ms"] for lv, r in auto.items()},
            "fixed_tokens_per_s": dict(fixed), "routed_methods": dict(routed),
            "auto_passes": {lv: r.get("passes", []) for lv, r in auto.items()},
            "fixed_passes": dict(fixed_passes),
            "explored": sum(r.get("explored", 0) for r in runs),
            "versions_seen": dict(sum((Counter(r.get("selector_versions", {})) for r in runs), Counter()))}


def compare(rounds: list[dict], best_arm: dict[str, str], oracle: dict) -> list[dict]:
    """Per round and level: auto / the best fixed arm (same round; pooled, and repeat by repeat) and auto / the
    oracle (round 0's outcomes)."""
    out = []
    for rd in rounds:
        for lv, tps in rd["auto_tokens_per_s"].items():
            arm = best_arm.get(lv)
            fixed = rd["fixed_tokens_per_s"].get(lv, {}).get(arm)
            orc = oracle.get(lv, {}).get("oracle_tokens_per_s")
            by_repeat = pass_ratios({"passes": rd.get("auto_passes", {}).get(lv, [])},
                                    {"passes": rd.get("fixed_passes", {}).get(lv, {}).get(arm, [])})
            ar = rd["fixed_tokens_per_s"].get(lv, {}).get("ar")
            out.append({"round": rd["round"], "concurrency": lv, "auto_tokens_per_s": tps, "best_fixed": arm,
                        "best_fixed_tokens_per_s": fixed, "oracle_tokens_per_s": orc,
                        "auto_vs_best_fixed": tps / fixed if fixed else None,
                        "auto_vs_ar": tps / ar if ar else None,
                        "auto_vs_best_fixed_by_repeat": by_repeat,
                        "auto_vs_oracle": tps / orc if orc else None})
    return out


# ---- the service ---------------------------------------------------------------------------------------------

def loop_yaml(config: str | None, work: Path, cfg: LoopConfig) -> Path:
    """The Serve YAML with no learnt selector yet (the file comes later), exploration on, a short check period."""
    import yaml

    from metaspec.deploy.app import DEFAULT_YAML

    data = yaml.safe_load(Path(config or DEFAULT_YAML).read_text())
    router = data["applications"][0].setdefault("args", {}).setdefault("router", {})
    router |= {"selector": str(work / "selector.skops"), "explore": cfg.explore, "selector_check_s": cfg.check_s}
    path = work / "metaspec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _pools(served: Path) -> list[dict]:
    """The pools of the YAML the service was started from (the loop's own copy: the same pools it serves)."""
    import yaml

    return yaml.safe_load(served.read_text())["applications"][0]["args"]["pools"]


def table_reset(app: str, pools: list[dict]):
    """reset() for run_trace: every pool's worker empties its local tables. One replica per pool, so that a handle
    call reaches each; a pool of several replicas is refused (it could not be reset whole)."""
    from ray import serve

    if many := [p["name"] for p in pools if int(p.get("num_replicas", 1)) != 1]:
        raise ValueError(f"the loop empties each pool's tables before every pass: pools {many} need num_replicas 1")
    handles = {p["name"]: serve.get_deployment_handle(f"DecodeWorker-{p['name']}", app_name=app) for p in pools}

    def reset() -> dict:
        return {p: h.reset_tables.remote().result(timeout_s=60) for p, h in handles.items()}
    return reset


def read_outcomes(folder: Path) -> list[dict]:
    out = []
    for file in sorted(folder.rglob("*.jsonl")):
        out += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return out


def retrain_round(outcome_dir: Path, work: Path, index: int, cfg: LoopConfig, pools: list[dict]) -> dict:
    """`metaspec retrain` on this round's training records, into the router's selector path (with
    `--caps-sampled-drafts` where the served pools cap sampled drafts)."""
    from metaspec.selector.retrain import RetrainConfig, retrain

    records = training_records(read_outcomes(outcome_dir), cfg.train_on)
    data = work / "train" / f"round{index}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    selector = work / "selector.skops"
    caps = bool(pools) and all(p.get("cap_sampled_drafts", False) for p in pools)
    report = retrain([data], selector if selector.exists() else None, selector,
                     RetrainConfig(caps_sampled_drafts=caps))
    return report | {"training_records": len(records)}


def wait_for_version(client, version: str, ids: list[int], check_s: float, timeout_s: float) -> float:
    """Probe (one token) every check period until ListMethods reports `version`; seconds it took."""
    t0 = time.perf_counter()
    k = 0
    while time.perf_counter() - t0 < timeout_s:
        time.sleep(check_s)
        client.generate(ids, max_tokens=1, request_id=f"{PROBE}/{version}/{k}")   # the router polls on a request
        k += 1
        if client.list_methods().selector_version == version:
            return time.perf_counter() - t0
    raise RuntimeError(f"the router did not report selector {version} within {timeout_s} s")


def run_loop(cfg: LoopConfig) -> dict:
    """Start the service, run round 0 and `rounds` retrain rounds, stop it; returns the report (nothing written)."""
    import ray
    from ray import serve
    from tqdm import tqdm

    from metaspec.deploy.loadtest import start_local
    from metaspec.protocol.client import Client

    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="metaspec-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    served = loop_yaml(cfg.config, work, cfg)
    address, apps = start_local([str(served)], str(work / "outcomes"))
    outcome_dir = work / "outcomes"
    client = Client(address, timeout_s=600)
    rounds, traces = [], []
    try:
        reset = table_reset(apps[0], _pools(served))
        base = TraceConfig(backend="grpc", server=address, concurrency=cfg.concurrency, mix=cfg.mix,
                           data_dir=cfg.data_dir, progress=False)
        with tqdm(total=cfg.rounds + 1, desc="retrain loop", unit="round") as bar:
            first = run_trace(replace(base, tag="r0"), client=client, reset=reset)
            traces.append(first)
            rounds.append(round_summary(0, first, None, client.list_methods().selector_version, None))
            best = {str(lv): (best_fixed(first["records"], lv) or {}).get("policy") for lv in
                    list(cfg.concurrency) + ["all"]}
            watched = tuple(dict.fromkeys([AUTO, *filter(None, best.values()), *(["ar"] if cfg.watch_ar else [])]))
            bar.update(1)
            probe_ids = list(client.generate("def f(x):", max_tokens=1).token_ids) or [1]
            for i in range(1, cfg.rounds + 1):
                report = retrain_round(outcome_dir, work, i, cfg, _pools(served))
                version, reload_s = client.list_methods().selector_version, None
                if report.get("written"):
                    reload_s = wait_for_version(client, report["version"], probe_ids, cfg.check_s,
                                                cfg.reload_timeout_s)
                    version = report["version"]
                res = run_trace(replace(base, tag=f"r{i}", policies=watched, repeats=cfg.repeats), client=client,
                                reset=reset)
                traces.append(res)
                rounds.append(round_summary(i, res, report, version, reload_s))
                bar.update(1)
        outcomes = read_outcomes(outcome_dir)
    finally:
        client.close()
        serve.shutdown()
        ray.shutdown()
    fixed_tps = defaultdict(dict)
    for r in first["records"]:
        if r["policy"] != AUTO and r["concurrency"] != "all":
            fixed_tps[r["concurrency"]][r["policy"]] = r["output_tokens_per_s"]
    oracle = oracle_estimate(outcomes, fixed_tps)
    return {"config": asdict(cfg), "work_dir": str(work), "machine": first["machine"], "trace": first["trace"],
            "round0_records": first["records"], "round0_ratios": first["ratios"], "best_fixed": best,
            "oracle": oracle, "rounds": rounds, "comparison": compare(rounds, best, oracle),
            "outcome_records": len(outcomes), "round_records": [t["records"] for t in traces]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaspec.bench.retrain_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="Serve YAML (default: deploy/metaspec.yaml)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trace-requests", type=int, default=48)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--explore", type=float, default=0.2)
    p.add_argument("--check-s", type=float, default=1.0)
    p.add_argument("--train-on", default="all", choices=["routed", "all"])
    p.add_argument("--no-watch-ar", action="store_true", help="rounds >= 1 run auto and the best fixed arms only "
                   "(default: ar too, so auto / ar is measured in the same round)")
    p.add_argument("--repeats", type=int, default=1, help="passes per (policy, level) in rounds >= 1, "
                   "interleaved (auto, fixed, fixed, auto, ...): auto / fixed comes with its spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = LoopConfig(config=args.config, rounds=args.rounds, explore=args.explore, check_s=args.check_s,
                     concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                     mix=TraceMix(n_requests=args.trace_requests, seed=args.seed), train_on=args.train_on,
                     work_dir=args.work_dir, data_dir=args.data_dir, repeats=args.repeats,
                     watch_ar=not args.no_watch_ar)
    from metaspec.bench.retrain_loop_report import format_loop, write_loop

    result = run_loop(cfg)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("retrain-loop-%Y%m%d-%H%M%S")
    paths = write_loop(result, out)
    print(format_loop(result))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
