"""Smoke tests of `metaspec bench` / `metaspec generate` and the prompt loader on tiny seeded models.

Nothing here times anything: speed lives in the benchmark's output, never in assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaspec.cli import main
from metaspec.prompts import CATEGORIES, find_data_dir, load_prompts, sample_prompts

SPEC_ROWS = [  # (question_id, Spec-Bench file category, first turn)
    (81, "writing", "Write a short poem about the sea and the sea again."),
    (82, "coding", "Write a function that adds two numbers and returns the sum."),
    (161, "translation", "Translate German to English: Das ist ein kleines Haus."),
    (241, "summarization", "Summarize: The cat sat on the mat. The cat sat on the mat all day long."),
    (321, "qa", "What is the capital of France?"),
    (401, "math_reasoning", "Tom has 3 apples and buys 2 more. How many apples does he have?"),
    (481, "rag", "The sea is blue. The sky is blue. Question: what colour is the sea?"),
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A miniature shared/data folder with the real files' names and fields (synthetic prompts)."""
    root = tmp_path_factory.mktemp("shared") / "data"
    root.mkdir()
    _write_jsonl(root / "specbench_questions.jsonl",
                 [{"question_id": i, "category": c, "turns": [t, "second turn"]} for i, c, t in SPEC_ROWS])
    _write_jsonl(root / "humaneval_prompts.jsonl", [
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n"},
        {"task_id": "HumanEval/1", "prompt": "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n"}])
    _write_jsonl(root / "gsm8k_test_300.jsonl", [
        {"question": SPEC_ROWS[5][2], "answer": "#### 5"},  # also in Spec-Bench math_reasoning: dropped
        {"question": "A box holds 4 eggs. How many eggs are in 3 boxes?", "answer": "#### 12"},
        {"question": "Sam reads 5 pages a day. How many pages in a week?", "answer": "#### 35"}])
    return root


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """A seeded random Llama target (2 layers) and drafter (1 layer) sharing a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for _, _, t in SPEC_ROWS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    paths = []
    for name, layers, hidden in (("target", 2, 64), ("drafter", 1, 32)):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=fast.bos_token_id,
                             eos_token_id=fast.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(root / name)
        fast.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


# ---- prompts ---------------------------------------------------------------------------------------------------

def test_load_prompts_maps_mt_bench_and_drops_gsm8k_overlap(data_dir):
    prompts = load_prompts(data_dir)
    by_id = {p.prompt_id: p for p in prompts}
    assert by_id["specbench/81"].category == by_id["specbench/82"].category == "mt_bench"
    assert by_id["specbench/81"].text == SPEC_ROWS[0][2]  # first turn only
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert [p.prompt_id for p in prompts if p.category == "gsm8k"] == ["gsm8k/1", "gsm8k/2"]


def test_sample_prompts_is_deterministic_and_per_category(data_dir):
    prompts = load_prompts(data_dir)
    a = sample_prompts(prompts, n_per_category=1, seed=3)
    assert a == sample_prompts(prompts, n_per_category=1, seed=3)
    assert [p.category for p in a] == list(CATEGORIES)
    assert [p.category for p in sample_prompts(prompts, 5, 0, ("qa", "gsm8k"))] == ["qa", "gsm8k", "gsm8k"]
    with pytest.raises(ValueError, match="unknown categories"):
        sample_prompts(prompts, 1, 0, ("poetry",))


def test_find_data_dir_walks_up(data_dir, tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir)
    nested = tmp_path / "repo" / "sub"
    nested.mkdir(parents=True)
    assert find_data_dir(nested) == tmp_path / "shared" / "data"


def test_real_shared_data_has_every_category():
    try:
        data = find_data_dir()
    except FileNotFoundError:
        pytest.skip("no shared/data above this checkout")
    prompts = load_prompts(data)
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert all(counts[g] == 80 for g in ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"))
    assert counts["humaneval"] == 164 and counts["gsm8k"] == 290  # 300 minus the 10 Spec-Bench already holds
    assert len({p.prompt_id for p in prompts}) == len(prompts)


# ---- bench -----------------------------------------------------------------------------------------------------

def test_bench_cli_writes_json_table_and_png(tiny_models, data_dir, tmp_path, capsys):
    target, drafter = tiny_models
    out = tmp_path / "run"
    rc = main(["bench", "--target", target, "--drafter", drafter, "--dtype", "float32", "--threads", "1",
               "--data-dir", str(data_dir), "--categories", "qa,humaneval,gsm8k", "--n-per-category", "2",
               "--repeats", "2", "--max-tokens", "12", "--compare-hf", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up vs AR" in capsys.readouterr().out

    ours = sorted({r["arm"] for r in result["records"] if r["family"] == "ours"})  # every arm the engine can run
    hf = sorted({r["arm"] for r in result["records"] if r["family"] == "hf"})
    assert {"ar", "pld", "sps"} <= set(ours) and hf == ["hf_assisted", "hf_greedy", "hf_pld"]
    n_prompts = 1 + 2 + 2  # qa has one prompt in the miniature data
    assert len(result["records"]) == 2 * n_prompts * (len(ours) + len(hf))
    assert all(r["tokens"] == 12 for r in result["records"])   # EOS ignored: every runner emits max_tokens
    assert result["machine"]["dtype"] == "float32" and result["machine"]["torch_threads"] == 1

    rows = {(r["category"], r["arm"]): r for r in result["summary"]}
    assert {c for c, _ in rows} == {"qa", "humaneval", "gsm8k", "all"}
    fields = {"tokens_per_s_median", "tokens_per_s_mean", "speedup_vs_ar", "acceptance_length", "acceptance_rate",
              "peak_rss_mb", "mismatches_vs_ar", "checked_vs_ar"}
    assert fields <= set(rows[("all", "sps")])
    assert rows[("all", "ar")]["speedup_vs_ar"] == pytest.approx(1.0)
    assert rows[("all", "ar")]["acceptance_length"] == 1.0
    for arm in ours:  # lossless in fp32: every run of every arm equals AR token for token
        assert rows[("all", arm)]["checked_vs_ar"] == 2 * n_prompts
        assert rows[("all", arm)]["mismatches_vs_ar"] == 0
    assert rows[("all", "pld")]["acceptance_length"] >= 1.0 and rows[("all", "pld")]["peak_rss_mb"] > 0
    pairs = {(r["ours"], r["hf"]) for r in result["hf_ratios"] if r["category"] == "all"}
    assert pairs == {("ar", "hf_greedy"), ("sps", "hf_assisted"), ("pld", "hf_pld")}


def test_bench_rejects_an_arm_it_cannot_run(tiny_models, data_dir, tmp_path, capsys):
    target, _ = tiny_models
    rc = main(["bench", "--target", target, "--drafter", "none", "--dtype", "float32", "--threads", "1",
               "--data-dir", str(data_dir), "--arms", "sps", "--n-per-category", "1", "--max-tokens", "4",
               "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "cannot run here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- generate --------------------------------------------------------------------------------------------------

def test_generate_compare_prints_text_and_a_row_per_method(tiny_models, capsys):
    target, drafter = tiny_models
    rc = main(["generate", "def add(a, b):", "--compare", "--target", target, "--drafter", drafter,
               "--dtype", "float32", "--threads", "1", "--max-tokens", "10", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "(automatic method) [sps · " in out
    table = out[out.index("\nmethod ") + 1:].splitlines()[1:]
    methods = [line.split()[0] for line in table]
    assert methods[0] == "ar" and {"pld", "sps"} <= set(methods) and len(set(methods)) == len(methods)
    assert all(line.rstrip().endswith("yes") for line in table)  # greedy, fp32: identical to AR


def test_generate_reports_a_bad_request_as_an_error(tiny_models, capsys):
    target, _ = tiny_models
    assert main(["generate", "hi", "--target", target, "--drafter", "none", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


# ---- bench: shared tables, cold and warm -----------------------------------------------------------------------

def _table_bench(tiny_models, data_dir, out: Path, *extra: str) -> dict:
    target, drafter = tiny_models
    rc = main(["bench", "--target", target, "--drafter", drafter, "--dtype", "float32", "--threads", "1",
               "--data-dir", str(data_dir), "--categories", "humaneval,gsm8k,qa", "--n-per-category", "1",
               "--arms", "ngram_store,recycling", "--warm-per-category", "1", "--max-tokens", "12", "--out", str(out),
               *extra])
    assert rc == 0
    return json.loads((out / "bench.json").read_text())


def test_bench_runs_the_table_arms_cold_and_warm(tiny_models, data_dir, tmp_path, capsys):
    result = _table_bench(tiny_models, data_dir, tmp_path / "run")
    arms = {"ar", "ngram_store:cold", "ngram_store:warm", "recycling:cold", "recycling:warm"}
    assert {r["arm"] for r in result["records"]} == arms
    assert all(r["matches_ar"] for r in result["records"])          # lossless from any table state
    warm = result["tables"]["warm"]
    assert set(warm) == {"humaneval", "gsm8k"}                       # qa has no other prompt to warm from
    assert all(w["contexts"] > 0 and w["rows"] > 0 and len(w["prompts"]) == 1 for w in warm.values())
    measured = {r["prompt_id"] for r in result["records"]}
    assert not measured & {p for w in warm.values() for p in w["prompts"]}   # warmed on *other* prompts
    for r in result["records"]:
        if r["arm"].endswith(":cold"):
            assert r["table_contexts"] == r["table_rows"] == 0       # every cold run starts empty
        elif r["arm"].endswith(":warm"):                             # every warm run starts from the same copy
            want = warm.get(r["category"], {"contexts": 0, "rows": 0})
            assert (r["table_contexts"], r["table_rows"]) == (want["contexts"], want["rows"])
    gains = {(g["category"], g["arm"]) for g in result["table_gains"]}
    assert {("all", "ngram_store"), ("all", "recycling")} <= gains
    assert "warm vs cold tables" in capsys.readouterr().out


def test_bench_warms_the_tables_through_redis(tiny_models, data_dir, tmp_path):
    import redis

    from tests.workers.test_tables import REDIS_BIN, RedisServer

    if REDIS_BIN is None:
        pytest.skip("redis-server is not installed")
    local = _table_bench(tiny_models, data_dir, tmp_path / "local")
    server = RedisServer().start()
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        server.client().config_set("requirepass", "s3cret-pw")
        shared = _table_bench(tiny_models, data_dir, tmp_path / "redis", "--redis-url", url)
        left = redis.Redis(port=server.port, password="s3cret-pw").keys("metaspec:tables:*")
    finally:
        server.kill()
    assert shared["tables"]["through_redis"] and not local["tables"]["through_redis"]
    assert shared["tables"]["warm"] == local["tables"]["warm"]       # the same tables, pushed and pulled
    assert left == []                                                # the bench namespaces are deleted
    assert "s3cret-pw" not in (tmp_path / "redis" / "bench.json").read_text()
    assert shared["config"]["redis_url"] == f"redis://:***@127.0.0.1:{server.port}/0"
