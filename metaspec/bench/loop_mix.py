"""Where a retraining loop's routed throughput goes: its choices against the cost of mixing arms in one batch.

    python -m metaspec.bench.loop_mix WORK_DIR/outcomes [--out loop_mix.json]

Reads the outcome log of a `metaspec.bench.retrain_loop` run (its `--work-dir`'s `outcomes/`). Round 0 ran every
trace request under every fixed arm at every level, each in single-arm batches, with latency L[arm, i]. For
each later round and level:
- `choices`: the summed round-0 latency of the best fixed arm over that of the arms auto chose, sum_i
  L[best, i] / sum_i L[chosen_i, i]. This is what auto would gain if each request ran as fast as in a batch of
  its own arm. The same ratio is given for the two-group policy (sampled → `--sampled-arm`, greedy → the best
  fixed arm) and for the per-request oracle.
- `mixing`: per (sampled or greedy, chosen arm), the geometric mean over requests of the per-token latency in
  auto's mixed batches over the same request's per-token latency in round 0's pass of that arm. Above 1, the
  request ran slower for sharing its batch with other arms.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from metaspec.bench.retrain_loop import parse_request_id, read_outcomes
from metaspec.bench.trace_report import AUTO


def analyse(records: list[dict], sampled_arm: str = "sps") -> dict:
    single: dict[tuple[int, int], dict[str, dict]] = defaultdict(dict)   # (level, index) -> arm -> round-0 record
    routed: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)   # (round, level) -> index -> auto's record
    for r in records:
        rid = parse_request_id(r.get("request_id", ""))
        if rid is None or r.get("status") != "OK":
            continue
        if rid["round"] == "r0" and rid["policy"] != AUTO:
            single[(rid["concurrency"], rid["index"])][rid["policy"]] = r
        elif rid["round"] != "r0" and rid["policy"] == AUTO:
            routed[(rid["round"], rid["concurrency"])][rid["index"]] = r
    arms = sorted({a for v in single.values() for a in v})
    out = []
    for (rnd, level), reqs in sorted(routed.items()):
        full = {i: single[(level, i)] for i in reqs if len(single.get((level, i), {})) == len(arms)}
        if not full:
            continue
        wall = {i: {a: rec["wall_s"] for a, rec in by_arm.items()} for i, by_arm in full.items()}
        best = min(arms, key=lambda a: sum(w[a] for w in wall.values()))
        base = sum(w[best] for w in wall.values())
        chosen = sum(wall[i].get(reqs[i]["method"], math.nan) for i in wall)
        two = sum(wall[i][sampled_arm if full[i][best]["temperature"] > 0 else best] for i in wall)
        mixing: dict[str, list[float]] = defaultdict(list)
        for i, r in reqs.items():
            ref = full.get(i, {}).get(r["method"])
            if ref and r.get("completion_tokens") and ref.get("completion_tokens"):
                mixing[f"{'sampled' if r['temperature'] > 0 else 'greedy'}/{r['method']}"].append(
                    (r["wall_s"] / r["completion_tokens"]) / (ref["wall_s"] / ref["completion_tokens"]))
        out.append({"round": rnd, "concurrency": level, "requests": len(wall), "best_fixed": best,
                    "choices": base / chosen, f"sampled_{sampled_arm}_greedy_best": base / two,
                    "oracle": base / sum(min(w.values()) for w in wall.values()),
                    "mixing": {k: {"requests": len(v), "slowdown": math.exp(sum(map(math.log, v)) / len(v))}
                               for k, v in sorted(mixing.items())}})
    return {"arms": arms, "sampled_arm": sampled_arm, "rows": out}


def format_mix(result: dict, min_requests: int = 3) -> str:
    two = f"sampled_{result['sampled_arm']}_greedy_best"
    lines = [f"{'round':>5} {'conc':>5} {'best fixed':>12} {'choices':>8} {'2-group':>8} {'oracle':>7}  "
             f"mixing slowdown (per token, vs a single-arm batch; >= {min_requests} requests)"]
    for row in result["rows"]:
        mix = ", ".join(f"{k} {v['slowdown']:.2f} ({v['requests']})" for k, v in row["mixing"].items()
                        if v["requests"] >= min_requests)
        lines.append(f"{row['round']:>5} {row['concurrency']:>5} {row['best_fixed']:>12} {row['choices']:>8.2f} "
                     f"{row[two]:>8.2f} {row['oracle']:>7.2f}  {mix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaspec.bench.loop_mix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", help="the loop's outcome folder (WORK_DIR/outcomes)")
    p.add_argument("--sampled-arm", default="sps", help="the two-group policy's arm for sampled requests")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = analyse(read_outcomes(Path(args.outcomes)), args.sampled_arm)
    if not result["rows"]:
        print(f"no retrain round with round-0 counterparts in {args.outcomes}", file=sys.stderr)
        return 1
    print(format_mix(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
