"""`metaspec` command line: one subcommand per job, each a thin layer over a library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def _train(args) -> int:
    from metaspec.train.recipe import STAGES, run
    from metaspec.train.train import TrainConfig

    cfg = TrainConfig(seed=args.seed, max_minutes=args.target_minutes)
    stages = tuple(STAGES) if args.stages == "all" else tuple(args.stages.split(","))
    run(stages, Path(args.work_dir), Path(args.out), cfg, drafter_minutes=args.drafter_minutes, device=args.device,
        distill_weight=args.distill_weight, drafter_init=args.drafter_init)
    return 0

def _quiet_loading() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars drown the command's own output


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _drafter(value: str) -> str | None:
    return None if value.lower() in ("", "none") else value


def _generate(args) -> int:
    from metaspec.bench_generate import (GenerateConfig, compare_methods, compare_table, local_engine, stats_line,
                                         stream_text)
    from metaspec.workers.engine import Request
    from metaspec.workers.types import RequestError, SamplingParams

    try:
        constraint = _constraint(args)
    except (ValueError, OSError) as exc:   # RequestError is a ValueError
        return _generate_error(args, exc)
    if args.compare and (constraint is not None or args.json):
        return _generate_error(args, ValueError("--compare runs unconstrained and prints a table; drop "
                                                "--json-schema/--regex/--grammar/--json"))
    if getattr(args, "server", None):
        return _generate_remote(args, constraint)   # gRPC client to a running service: no model loads here
    _quiet_loading()
    # everything below is the local, in-process path.
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_tokens=args.max_tokens, stop=tuple(args.stop), seed=args.seed)
        engine = local_engine(GenerateConfig(args.target, _drafter(args.drafter), args.dtype, args.threads))
        request = Request(prompt=args.prompt, params=params, method=args.method, constraint=constraint)
        if args.json:
            result = engine.generate(request)
            print(json.dumps(_result_record(result)), flush=True)
            return 0
        result = stream_text(engine, request)
        print(("" if args.method else "(automatic method) ") + stats_line(result))
        if args.compare:
            rows = compare_methods(engine, args.prompt, params, repeats=args.repeats)
            print(f"\nevery method on this prompt ({args.dtype}, median of {args.repeats} interleaved runs):")
            print(compare_table(rows, greedy=params.greedy))
    except (RequestError, OSError) as exc:  # a bad request, or checkpoints that cannot be loaded
        return _generate_error(args, exc)
    return 0


def _constraint(args):
    """--json-schema / --regex / --grammar (text, or @FILE) -> the request's ConstraintSpec (None without one)."""
    from metaspec.workers.constraint import ConstraintSpec

    for kind, value in (("json_schema", args.json_schema), ("regex", args.regex), ("grammar", args.grammar)):
        if value is not None:
            source = Path(value[1:]).read_text() if value.startswith("@") else value
            if kind == "json_schema":
                json.loads(source)                       # a clear error here, before any model loads
            return ConstraintSpec(kind, source)
    return None


def _result_record(result) -> dict:
    """One local generation as a JSON-able record (`generate --json`)."""
    s = result.stats
    return {"text": result.text, "method": result.method, "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "acceptance_length": s.acceptance_length, "acceptance_rate": s.acceptance_rate,
            "ttft_s": result.ttft_s, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
            "fallback": s.fallback or ""}


def _generate_error(args, exc: BaseException) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": str(exc)}), flush=True)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return 2


def _bench(args) -> int:
    from metaspec.bench.arms import BenchConfig, default_out_dir, run_bench, write_outputs
    from metaspec.bench_report import format_tables

    _quiet_loading()
    if args.constraints:  # JSON Schema-constrained decoding over JSONSchemaBench (metaspec/bench_constraints.py)
        from metaspec.bench_constraints import run_from_cli
        return run_from_cli(args)
    try:
        cfg = BenchConfig(
            target=args.target, drafter=_drafter(args.drafter), dtype=args.dtype, threads=args.threads,
            arms=_csv(args.arms), categories=_csv(args.categories), n_per_category=args.n_per_category,
            repeats=args.repeats, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
            data_dir=args.data_dir, max_prompt_tokens=args.max_prompt_tokens, compare_hf=args.compare_hf,
            hf_prompt_lookup_tokens=args.hf_prompt_lookup_tokens, table_modes=_csv(args.table_modes) or (),
            warm_per_category=args.warm_per_category, redis_url=args.redis_url)
        result = run_bench(cfg)
    except (ValueError, OSError) as exc:  # bad options (RequestError is a ValueError), missing checkpoints or data
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(result, Path(args.out) if args.out else default_out_dir())
    print(format_tables(result))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=str(DEFAULT_CHECKPOINTS / "target"), help="target HF causal LM (path or id)")
    p.add_argument("--drafter", default=str(DEFAULT_CHECKPOINTS / "drafter"),
                   help="drafter sharing the target's tokenizer ('none' to run without)")
    p.add_argument("--dtype", default="auto", type=_dtype, metavar="{auto,float32,bfloat16,float16}",
                   help="compute dtype; auto (default): bfloat16 where the CPU has native bf16 (AMX, AVX512-BF16), "
                        "else float32 (workers/model.py resolve_dtype)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _dtype(value: str) -> str:
    """--dtype as the concrete dtype this CPU runs ("auto" resolved), so reports name what ran."""
    from metaspec.workers.model import resolve_dtype

    try:
        return resolve_dtype(value, "cpu")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate from a prompt locally; --compare runs every method on it")
    p.add_argument("prompt")
    p.add_argument("--compare", action="store_true", help="also run every available method and print a table")
    p.add_argument("--method", default=None, help="arm to use (default: automatic)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", default=None, metavar="SCHEMA", help="output matches this JSON Schema "
                       "(JSON text, or @FILE)")
    shape.add_argument("--regex", default=None, help="output matches this regular expression")
    shape.add_argument("--grammar", default=None, help="output matches this Lark grammar (text, or @FILE)")
    p.add_argument("--json", action="store_true", help="print one JSON object per result (text, method, tokens, "
                   "acceptance...) instead of streaming text")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method with --compare")
    _add_model_options(p)
    _add_server_options(p)
    p.set_defaults(func=_generate)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark arms over ../shared/data prompts: JSON, table and PNG")
    _add_model_options(p)
    p.add_argument("--arms", default=None, help="comma list of arms (default: every arm the engine can run)")
    p.add_argument("--categories", default=None, help="comma list (default: the 6 Spec-Bench groups, "
                                                      "humaneval, gsm8k)")
    p.add_argument("--n-per-category", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="interleaved passes over all prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="shared data folder (default: nearest shared/data above cwd "
                                                  "or the package)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="keep only the last N prompt tokens")
    p.add_argument("--compare-hf", action="store_true", help="also run HF generate: greedy, assisted, prompt lookup")
    p.add_argument("--hf-prompt-lookup-tokens", type=int, default=10)
    p.add_argument("--table-modes", default="cold,warm", help="table-driven arms (ngram_store, recycling) run from "
                   "empty tables (cold) and/or from tables warmed on other prompts of the category (warm)")
    p.add_argument("--warm-per-category", type=int, default=5, help="other prompts per category that warm its tables")
    p.add_argument("--redis-url", default=None, help="warm the tables through this Redis (one worker pushes, another "
                   "pulls; default: in-process tables)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-<timestamp>)")
    p.add_argument("--constraints", action="store_true", help="JSON Schema-constrained decoding on JSONSchemaBench "
                   "(--categories = subsets, --n-per-category = schemas per subset)")
    p.set_defaults(func=_bench)
    _add_bench_serve(p.add_subparsers(dest="bench_command", required=False, metavar="{serve}"))


def _ints(value: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in _csv(value)) if value else None


def _bench_serve(args) -> int:
    from metaspec.bench.backends import EngineSpec
    from metaspec.bench.serve import ServeConfig, default_out_dir, format_result, run_serve, write_outputs

    _quiet_loading()
    try:
        args.api_key = _api_key(args)            # from the key file or the environment, never the command line
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.trace:    # the seeded mixed-traffic trace per policy (metaspec/bench/trace.py)
        from metaspec.bench.trace import run_from_cli

        return run_from_cli(args)
    try:
        levels = _ints(args.concurrency)
        top = args.max_concurrency or args.num_prompts if args.request_rate else max(levels)
        spec = EngineSpec(target=args.target, drafter=_drafter(args.drafter), dtype=args.dtype, threads=args.threads,
                          max_batch=args.max_batch or top,
                          slot_tokens=args.slot_tokens or args.max_prompt_tokens + args.max_tokens + 16)
        cfg = ServeConfig(
            backend=args.backend, engine=spec, server=args.server, base_url=args.base_url, model=args.model,
            api_key=args.api_key, methods=_csv(args.methods), concurrency=levels, request_rate=args.request_rate,
            max_concurrency=args.max_concurrency, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
            ignore_eos=not args.stop_at_eos, repeats=args.repeats, categories=_csv(args.categories),
            max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, data_dir=args.data_dir,
            compare_hf=args.compare_hf, hf_concurrency=_ints(args.hf_concurrency), baseline_ref=args.baseline_ref,
            baseline_concurrency=_ints(args.baseline_concurrency))
        result = run_serve(cfg)
    except (ValueError, OSError, RuntimeError) as exc:   # bad options, missing checkpoints/data, a dead baseline
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(result, Path(args.out) if args.out else default_out_dir())
    print(format_result(result))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _add_bench_serve(sub) -> None:
    p = sub.add_parser("serve", help="throughput and latency under concurrent load (like `vllm bench serve`): "
                                     "bench_serve.json, table, PNG")
    _add_model_options(p)
    p.set_defaults(threads=2)
    p.add_argument("--backend", default="engine", choices=["engine", "grpc", "openai"],
                   help="engine: in process; grpc: --server; openai: --base-url (streamed completions)")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="gRPC service (--backend grpc)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="metaspec", help="model name for --backend openai")
    _add_key_options(p)
    p.add_argument("--methods", default="ar", help="comma list of arms; 'auto' = no method (the service's "
                   "selector; the engine backend's default arm); engine backend: 'pearl:lanes=N' = pearl with a "
                   "drafter serving N requests at once, '<arm>:guard=1' = that arm with the draft guard on "
                   "(settings joined by ',')")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma list: closed-loop clients per load level")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead")
    p.add_argument("--max-concurrency", type=int, default=None, help="in-flight cap with --request-rate")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per load (prompts mixed over categories)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: every request emits max-tokens)")
    p.add_argument("--repeats", type=int, default=1, help="passes over every level and method (methods interleaved)")
    p.add_argument("--categories", default=None, help="comma list of prompt categories (default: all)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="keep the last N prompt tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-batch", type=int, default=None, help="engine KV slots (default: the largest level)")
    p.add_argument("--slot-tokens", type=int, default=None, help="cache positions per slot (default: "
                   "max-prompt-tokens + max-tokens + 16)")
    p.add_argument("--compare-hf", action="store_true", help="also HF transformers' generate_batch at each level")
    p.add_argument("--hf-concurrency", default=None, help="comma list: levels HF runs at (default: all)")
    p.add_argument("--baseline-ref", default=None, metavar="GITREF", help="also the same load on this commit's "
                   "engine (e.g. 84ce1a3, the engine before batching)")
    p.add_argument("--baseline-concurrency", default=None, help="comma list: levels the baseline runs at (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-serve-<timestamp>)")
    p.add_argument("--trace", default=None, choices=["mixed"], help="replay the seeded mixed-traffic trace "
                   "(metaspec/bench/trace.py) per policy: auto, every arm, ar; --concurrency levels")
    p.add_argument("--trace-requests", type=int, default=48, help="requests in the --trace")
    p.add_argument("--trace-repeats", type=int, default=1, help="passes per (policy, level) of the --trace, "
                   "interleaved A B C, C B A, ...: ratios come with their spread over the repeats")
    p.add_argument("--trace-policies", default=None, help="comma list (default: auto + every arm + ar)")
    p.set_defaults(func=_bench_serve)


def _collect(args) -> int:
    from metaspec.collect import CollectConfig, collect

    _quiet_loading()
    try:
        cfg = CollectConfig(
            target=args.target, drafter=_drafter(args.drafter), dtype=args.dtype, threads=args.threads,
            arms=_csv(args.arms), categories=_csv(args.categories), n_per_category=args.n_per_category,
            max_tokens=tuple(int(n) for n in _csv(args.max_tokens)),
            temperatures=tuple(float(t) for t in _csv(args.temperatures) or ("0",)),
            concurrency=tuple(int(c) for c in _csv(args.concurrency) or ("1",)), constrain=not args.no_constraints,
            repeats=args.repeats, ignore_eos=not args.stop_at_eos, seed=args.seed, data_dir=args.data_dir,
            pool=args.pool, hardware_json=args.hardware)
        summary = collect(cfg, Path(args.out), append=args.append)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['records']} outcome records ({summary['prompts']} prompts x {', '.join(summary['methods'])}) "
          f"in {summary['wall_s']} s -> {summary['out']}")
    if summary["dropped_prompts"]:
        print(f"left out (schema not servable): {', '.join(summary['dropped_prompts'])}", file=sys.stderr)
    return 0


def _retrain(args) -> int:
    import json

    from metaspec.selector.retrain import RetrainConfig, retrain

    cfg = RetrainConfig(kinds=_csv(args.kinds) or RetrainConfig().kinds, n_splits=args.folds,
                        holdout_share=args.holdout_share, tolerance=args.tolerance, seed=args.seed,
                        hedge=not args.no_hedge, caps_sampled_drafts=args.caps_sampled_drafts)
    try:
        report = retrain(args.outcomes, args.current, args.out, cfg)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    if report.get("current_error"):
        print(f"note: the current selector could not be used: {report['current_error']}", file=sys.stderr)
    return 0 if report["written"] else 3


def _eval_selector(args) -> int:
    from metaspec.selector.report import evaluate_outcomes, format_table, write

    try:
        result = evaluate_outcomes(args.outcomes, _csv(args.kinds) or ("rf", "gb", "knn", "ridge"), args.folds,
                                   args.seed, loco=not args.no_loco, embed_dims=args.embed_dims)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write(result, Path(args.out))
    print(format_table(result))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _add_selector_commands(sub) -> None:
    p = sub.add_parser("collect", help="run every arm on the shared prompts and write selector outcome records")
    _add_model_options(p)
    p.add_argument("--out", default="data/selector/outcomes-collect.jsonl", help="outcome log (JSONL) to write")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--arms", default=None, help="comma list of arms (default: every arm the engine can run)")
    p.add_argument("--categories", default=None, help="comma list (default: Spec-Bench groups, humaneval, gsm8k, "
                                                      "json_schema)")
    p.add_argument("--n-per-category", type=int, default=8)
    p.add_argument("--max-tokens", default="64", help="comma list; each (prompt, temperature, concurrency) draws one")
    p.add_argument("--temperatures", default="0", help="comma list; each prompt runs once per temperature")
    p.add_argument("--concurrency", default="1", help="comma list of levels: that many requests of one arm decode "
                                                      "together; each prompt runs at each level")
    p.add_argument("--no-constraints", action="store_true", help="json_schema prompts run without their schema")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: emit max-tokens every run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--pool", default="local", help="pool name written in the records")
    p.add_argument("--hardware", default=None, help="pool hardware profile as JSON (default: this machine)")
    p.set_defaults(func=_collect)

    p = sub.add_parser("retrain", help="fit a selector on outcome logs; write it only if not worse than --current")
    p.add_argument("--outcomes", nargs="+", required=True, help="outcome JSONL files or folders of them")
    p.add_argument("--current", default=None, help="the selector in use (compared on the same held-out prompts)")
    p.add_argument("--out", required=True, help="where the new selector file is written (atomically, with a new "
                                                "version); a router whose `selector` is this file reloads it by itself")
    p.add_argument("--kinds", default=None, help="comma list of rf,gb,knn,ridge (default: all)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--holdout-share", type=float, default=0.2)
    p.add_argument("--tolerance", type=float, default=0.0)
    p.add_argument("--no-hedge", action="store_true", help="route by the plain argmax of the predictions (default: "
                   "keep each load level's best fixed arm unless another is predicted a fitted margin faster)")
    p.add_argument("--caps-sampled-drafts", action="store_true", help="the pools cap sampled drafts "
                   "(cap_sampled_drafts: true), so sps / early_exit may serve sampled requests under load: fit and "
                   "score on those rows too (default: drop them, the router cannot choose them)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_retrain)

    p = sub.add_parser("eval-selector", help="selector vs oracle and fixed arms on held-out prompts: JSON/table/PNG")
    p.add_argument("--outcomes", nargs="+", required=True, help="outcome JSONL files or folders (collect runs)")
    p.add_argument("--kinds", default=None, help="comma list of rf,gb,knn,ridge (default: all)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-loco", action="store_true", help="skip leave-one-category-out")
    p.add_argument("--embed-dims", type=int, default=0, help="also measure N PCA dims of a MiniLM prompt embedding")
    p.add_argument("--out", default="runs/eval-selector", help="output folder")
    p.set_defaults(func=_eval_selector)


# ---- serving: `serve`, `outcomes gather`, and `generate --server` --------------------------------------------

def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="send the request to a running service over gRPC instead of loading models here")
    _add_key_options(p)
    p.add_argument("--tls", action="store_true", help="--server speaks TLS (verified against --ca-cert or the "
                   "system's roots)")
    p.add_argument("--ca-cert", default=None, metavar="FILE", help="PEM CA certificate(s) to verify the server by "
                   "(implies --tls)")
    p.add_argument("--tls-server-name", default=None, metavar="NAME", help="the name the server's certificate is "
                   "for, when --server is an IP (the cluster's self-signed one: metaspec)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds for --server")


def _add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="file whose first line is the API key "
                   "(default: $METASPEC_API_KEY; sent as x-api-key metadata / a bearer token)")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)   # refused: see _api_key


def _api_key(args) -> str | None:
    """The key from --api-key-file or $METASPEC_API_KEY. A key on the command line is refused: it would show in
    `ps`, shell history and CI logs."""
    from metaspec.protocol.client import API_KEY_ENV, read_api_key

    if args.api_key is not None:
        raise ValueError(f"--api-key is not accepted (command lines are visible to every user of the machine): "
                         f"set {API_KEY_ENV} or pass --api-key-file PATH")
    return read_api_key(args.api_key_file)


def _generate_remote(args, constraint=None) -> int:
    from metaspec.protocol.client import Client, ServiceError

    if args.compare:
        print("error: --compare runs locally; drop --server", file=sys.stderr)
        return 2
    final, text = None, []
    try:
        key = _api_key(args)
        ca = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    except (ValueError, OSError) as exc:
        return _generate_error(args, exc)
    try:
        with Client(args.server, api_key=key, timeout_s=args.timeout, tls=args.tls, ca_cert=ca,
                    server_name=args.tls_server_name) as client:
            for reply in client.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed,
                                       method=args.method or "", constraint=constraint):
                text.append(reply.text)
                if not args.json:
                    print(reply.text, end="", flush=True)
                final = reply if reply.finish_reason else final
    except ServiceError as exc:
        if not args.json:
            print()
        return _generate_error(args, exc)
    if args.json:
        fields = dataclasses.asdict(final) if final is not None else {}
        fields.pop("token_ids", None)
        print(json.dumps(fields | {"text": "".join(text)}), flush=True)
        return 0
    print()
    if final is not None:
        t, a = final.timings, final.acceptance
        print(f"[{final.method} on {final.pool} ({final.reason}) | {final.completion_tokens} tokens, "
              f"{t.get('tokens_per_s', 0):.1f} tok/s, ttft {1000 * t.get('ttft_s', 0):.1f} ms, "
              f"acceptance length {a.get('acceptance_length', 1):.2f}, finish {final.finish_reason}"
              f"{', fallback: ' + final.fallback if final.fallback else ''}]")
    return 0


def _serve(args) -> int:
    from dataclasses import replace

    from metaspec.deploy.app import DEFAULT_YAML, load_serve_file, missing_checkpoints, serve_until_interrupted

    path = args.config or DEFAULT_YAML
    try:
        cfg, opts = load_serve_file(path)
    except (ValueError, OSError) as exc:   # pydantic's ValidationError is a ValueError
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    opts = replace(opts, grpc_port=args.grpc_port, proxy_grpc_port=None) if args.grpc_port else opts
    if args.host:   # opt in to other interfaces than the config's (loopback unless it says otherwise)
        opts = replace(opts, http_host=args.host, ingress=replace(opts.ingress, host=args.host))
    opts = replace(opts, http_port=args.http_port, proxy_http_port=None) if args.http_port else opts
    if not args.address and (missing := missing_checkpoints(cfg)):
        print(f"error: checkpoints not found: {', '.join(missing)} (run `metaspec train` or set the pool's "
              "target/drafter in the config)", file=sys.stderr)
        return 2
    serve_until_interrupted(cfg, opts, address=args.address, num_cpus=args.num_cpus)
    return 0


def _outcomes_gather(args) -> int:
    from metaspec.workers.outcome_log import gather_cluster, merge, outcome_files, read_outcomes

    try:
        if args.address:
            import ray

            ray.init(address=args.address)
            outcomes = gather_cluster(args.dir)
        else:
            outcomes = read_outcomes(outcome_files(args.dir))
        count = merge(outcomes, args.out)
    except (ValueError, OSError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} outcome records -> {args.out}")
    return 0


def _add_serving_commands(sub) -> None:
    p = sub.add_parser("serve", help="start the gRPC service (Ray Serve) on a loopback Ray or a given cluster")
    p.add_argument("--config", default=None, help="Serve config YAML (default: the shipped deploy/metaspec.yaml)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: the config's)")
    p.add_argument("--http-port", type=int, default=None, help="OpenAI HTTP API port (default: the config's)")
    p.add_argument("--host", default=None, help="interface the gRPC and HTTP APIs listen on (default: the config's, "
                   "127.0.0.1 in the shipped one; 0.0.0.0 = every interface: configure TLS and API keys first)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray on loopback)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: enough for the pools)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("outcomes", help="outcome log tools")
    osub = p.add_subparsers(dest="outcomes_command", required=True)
    g = osub.add_parser("gather", help="merge the per-node outcome logs into one JSONL file")
    g.add_argument("--dir", default="~/.metaspec/outcomes", help="outcome directory (on every node)")
    g.add_argument("--out", required=True, help="merged JSONL file to write")
    g.add_argument("--address", default=None, help="Ray cluster address: read --dir on every alive node")
    g.set_defaults(func=_outcomes_gather)


# ---- cluster: thin wrappers over `ray up` / `ray down` / `ray status` / `serve deploy` -------------------------

def _cluster(args) -> int:
    from metaspec.cluster.launch import ClusterArgs, run

    try:
        return run(args.action, ClusterArgs(args.cluster_yaml, args.yes, args.serve_config, args.address),
                   dry_run=args.dry_run)
    except (ValueError, OSError) as exc:   # an unreadable YAML
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _add_cluster_commands(sub) -> None:
    from metaspec.cluster.launch import ACTIONS, DEFAULT_CLUSTER_YAML, DEFAULT_SERVE_YAML

    p = sub.add_parser("cluster", help="start, inspect, stop a Ray cluster (ray up/status/down) and deploy the "
                                       "service on it (serve deploy)")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("cluster_yaml", nargs="?", default=str(DEFAULT_CLUSTER_YAML),
                   help="Ray cluster launcher YAML (default: the shipped cluster/aws.yaml)")
    p.add_argument("--serve-config", default=str(DEFAULT_SERVE_YAML), help="deploy: Serve config YAML "
                   "(default: the shipped cluster/serve.yaml)")
    p.add_argument("--address", default=None, help="deploy: dashboard address (http://HEAD:8265) to `serve deploy` "
                   "to from here (default: run `serve deploy` on the head node)")
    p.add_argument("--yes", action="store_true", help="up/down: no confirmation prompt")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.set_defaults(func=_cluster)


def _soak(args) -> int:
    from metaspec.bench.soak import main

    return main(args.minutes, args.concurrency, args.hostile_per_s, args.config, args.out, args.replicas,
                tuple(m for m in args.skip_methods.split(",") if m))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="build the corpus and train the shipped tokenizer, target and drafter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="all", help="comma list of corpus,tokenizer,target,drafter or 'all'")
    p.add_argument("--work-dir", default="build/train", help="corpus, tokenizer and token cache")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINTS), help="where the HF checkpoints are written")
    p.add_argument("--target-minutes", type=float, default=60.0)
    p.add_argument("--drafter-minutes", type=float, default=15.0)
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="drafter loss = w * KL(target || drafter) + (1 - w) * cross-entropy on the corpus")
    p.add_argument("--drafter-init", default=None, help="continue training this drafter checkpoint instead of a fresh one")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_train)
    _add_generate(sub)
    _add_bench(sub)
    _add_selector_commands(sub)
    _add_serving_commands(sub)
    _add_cluster_commands(sub)
    p = sub.add_parser("soak", help="bounded soak on loopback: mixed + hostile load, Redis restarted, a worker "
                                    "replica killed; checks, soak.json, table, soak.png (rc 1 on a failed check)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=24, help="client threads sending mixed requests")
    p.add_argument("--hostile-per-s", type=float, default=1.0, help="hostile requests per second")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the pool one of which is killed")
    p.add_argument("--skip-methods", default="", help="comma list of arms never named (default: none)")
    p.add_argument("--config", default=None, help="Serve config YAML (default: the shipped deploy/metaspec.yaml)")
    p.add_argument("--out", default="build/soak", help="soak.json, soak.png and the outcome log go here")
    p.set_defaults(func=_soak)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
