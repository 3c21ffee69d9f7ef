"""Benchmark prompts with categories, read from the shared evaluation data (`../shared/data/`).

Categories: Spec-Bench's 6 groups (`mt_bench`, `translation`, `summarization`, `qa`, `math_reasoning`, `rag`),
HumanEval (`humaneval`) and GSM8K (`gsm8k`). Provenance and field names: `shared/data/SOURCES.md`.

>>> prompts = load_prompts(find_data_dir())
>>> [p.category for p in sample_prompts(prompts, n_per_category=1, seed=0, categories=("qa", "gsm8k"))]
['qa', 'gsm8k']
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPECBENCH_GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
CATEGORIES = SPECBENCH_GROUPS + ("humaneval", "gsm8k")
# Spec-Bench stores its MT-Bench group as MT-Bench's own 8 sub-categories.
MT_BENCH_SUBCATEGORIES = frozenset({"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                    "humanities"})
SPECBENCH_FILE, HUMANEVAL_FILE, GSM8K_FILE = "specbench_questions.jsonl", "humaneval_prompts.jsonl", "gsm8k_test_300.jsonl"


@dataclass(frozen=True)
class Prompt:
    prompt_id: str    # source-qualified id, e.g. "specbench/321", "HumanEval/0", "gsm8k/17"
    category: str     # one of CATEGORIES
    text: str         # the prompt as the model sees it (first turn only for multi-turn rows)
    schema: str | None = None   # JSON Schema (JSON text) the answer must match, for `json_schema` prompts


def find_data_dir(start: Path | None = None) -> Path:
    """The nearest `shared/data` folder walking up from `start` (cwd), then from this package's location."""
    here = Path(__file__).resolve().parent
    for origin in (Path(start or Path.cwd()).resolve(), here):
        for folder in (origin, *origin.parents):
            candidate = folder / "shared" / "data"
            if (candidate / SPECBENCH_FILE).is_file():
                return candidate
    raise FileNotFoundError(f"no shared/data/{SPECBENCH_FILE} above {start or Path.cwd()} or {here}; "
                            "pass --data-dir")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def specbench_group(category: str) -> str:
    """Spec-Bench's file category → the paper's group (MT-Bench's 8 sub-categories → `mt_bench`)."""
    return "mt_bench" if category in MT_BENCH_SUBCATEGORIES else category


def _specbench(data_dir: Path) -> list[Prompt]:
    return [Prompt(f"specbench/{row['question_id']}", specbench_group(row["category"]), row["turns"][0])
            for row in _read_jsonl(data_dir / SPECBENCH_FILE)]


def _humaneval(data_dir: Path) -> list[Prompt]:
    return [Prompt(row["task_id"], "humaneval", row["prompt"]) for row in _read_jsonl(data_dir / HUMANEVAL_FILE)]


def _gsm8k(data_dir: Path, exclude: frozenset[str]) -> list[Prompt]:
    """GSM8K test questions, minus those Spec-Bench's math_reasoning already holds (10 overlap)."""
    rows = _read_jsonl(data_dir / GSM8K_FILE)
    return [Prompt(f"gsm8k/{i}", "gsm8k", row["question"]) for i, row in enumerate(rows)
            if row["question"] not in exclude]


def load_prompts(data_dir: Path | str) -> list[Prompt]:
    """Every prompt of every category, in file order."""
    data_dir = Path(data_dir)
    spec = _specbench(data_dir)
    in_specbench = frozenset(p.text for p in spec)
    return spec + _humaneval(data_dir) + _gsm8k(data_dir, in_specbench)


def sample_prompts(prompts: list[Prompt], n_per_category: int, seed: int = 0,
                   categories: tuple[str, ...] | None = None) -> list[Prompt]:
    """`n_per_category` prompts from each category (all if fewer), chosen by `seed`, grouped in category order."""
    wanted = categories or CATEGORIES
    if unknown := set(wanted) - set(CATEGORIES):
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
    if n_per_category <= 0:
        raise ValueError(f"n_per_category must be > 0, got {n_per_category}")
    chosen = []
    for category in wanted:
        pool = [p for p in prompts if p.category == category]
        rng = random.Random(f"{seed}/{category}")  # one stream per category: adding a category moves nothing
        chosen += sorted(rng.sample(pool, min(n_per_category, len(pool))), key=pool.index)
    return chosen
