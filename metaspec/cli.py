"""`metaspec` command line: one subcommand per job, each a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def _train(args) -> int:
    from metaspec.train.recipe import STAGES, run
    from metaspec.train.train import TrainConfig

    cfg = TrainConfig(seed=args.seed, max_minutes=args.target_minutes)
    stages = tuple(STAGES) if args.stages == "all" else tuple(args.stages.split(","))
    run(stages, Path(args.work_dir), Path(args.out), cfg, drafter_minutes=args.drafter_minutes, device=args.device)
    return 0


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
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
