"""Shared fixtures: tiny seeded random models written once per session, engines over them, evaluation prompts.

Every model here is random and seeded, so tests are reproducible without any download. The tiny pair is shaped so
that drafting is exercised (weak attention makes greedy output loop, which prompt lookup can copy; the drafter is
the target plus noise, so it agrees often but not always): the contract test then sees accepted, partially
accepted and rejected drafts, not only empty ones.
"""

from __future__ import annotations

import faulthandler
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the CI box has 2 cores; tiny models gain nothing from more threads


def pytest_sessionfinish(session, exitstatus):
    """Stop what the tests left running while the interpreter is still whole: PEARL drafters, a Ray driver, and
    (by a collection now) any gRPC channel or engine a test dropped without closing. Native threads still polling
    when the interpreter tears down are what crash an exiting process."""
    import gc
    import sys

    pearl = sys.modules.get("metaspec.workers.pearl")
    if pearl is not None:
        for pools in list(pearl._POOLS.values()):
            for pool in list(pools.values()):
                pool.shutdown()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    gc.collect()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """pytest's faulthandler stops with the session; keep one on while the interpreter exits, so a crash there
    prints every thread's stack instead of a bare exit code 139."""
    faulthandler.enable(all_threads=True)


REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "metaspec" / "checkpoints"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in the shipped tokenizer


def data_dir() -> Path | None:
    """The shared evaluation data (`../shared/data` next to the clone), or None when this machine lacks it."""
    for candidate in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (candidate / "specbench_questions.jsonl").exists():
            return candidate
    return None


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (32768+, where every bind(0) of Ray's own
    processes lands) and above Ray's worker ports (10002-19999): a port taken with bind(0) and handed to Serve
    seconds later could meanwhile go to one of Ray's processes (CI: "Failed to bind to address
    127.0.0.1:44899"). Never the same port twice in one test run."""
    import random
    import socket

    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-32000")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=None)
def category_prompts(per_category: int = 2, max_chars: int = 1000) -> tuple[tuple[str, str], ...]:
    """(category, prompt text) pairs: `per_category` from every Spec-Bench category, HumanEval and GSM8K.

    The files are inputs only; expected outputs always come from running `ar` on the same model.
    """
    root = data_dir()
    if root is None:
        return ()
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for row in read_jsonl(root / "specbench_questions.jsonl"):
        cat = row["category"]
        if seen.get(cat, 0) < per_category:
            seen[cat] = seen.get(cat, 0) + 1
            out.append((cat, row["turns"][0][:max_chars]))
    out += [("humaneval", r["prompt"][:max_chars]) for r in read_jsonl(root / "humaneval_prompts.jsonl")[:per_category]]
    out += [("gsm8k", r["question"][:max_chars]) for r in read_jsonl(root / "gsm8k_test_300.jsonl")[:per_category]]
    return tuple(out)


def _corpus_text() -> list[str]:
    root = data_dir()
    if root is None:  # still a usable tokenizer, just a poorer one
        return ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog. " * 20] * 50
    texts = [r["turns"][0] for r in read_jsonl(root / "specbench_questions.jsonl")[::3]]
    return texts + [r["prompt"] for r in read_jsonl(root / "humaneval_prompts.jsonl")]


def train_tokenizer(out_dir: Path, vocab_size: int = 512):
    """A small byte-level BPE (special tokens at ids 0..3), saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return fast


def llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaConfig(**(base | overrides))


def random_llama(config, seed: int, attn_scale: float = 1.0):
    """A seeded random LlamaForCausalLM in fp32; `attn_scale` < 1 weakens attention (loopier greedy output)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(attn_scale)
    return model


def noisy_copy(model, seed: int, noise: float):
    """Same architecture, every weight perturbed by `noise` x its tensor's std: a drafter that mostly agrees."""
    from transformers import LlamaForCausalLM

    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    return copy


@dataclass(frozen=True)
class Pair:
    target: str   # directory of an HF checkpoint (with tokenizer files when text is needed)
    drafter: str


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer_dir) -> Pair:
    """Target (2 layers, GQA, vocab 512, weak attention, weak last MLP) and a noisy-copy drafter, with the tiny
    tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_pair")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    target = random_llama(llama_config(len(tok)), seed=0, attn_scale=0.15)
    with torch.no_grad():   # a weak last block: the first block's early exit agrees with the target often enough
        target.model.layers[-1].mlp.down_proj.weight.mul_(0.3)
    drafter = noisy_copy(target, seed=1, noise=0.1)
    for name, model in (("target", target), ("drafter", drafter)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return Pair(str(root / "target"), str(root / "drafter"))


@pytest.fixture(scope="session")
def small_vocab_pair(tmp_path_factory) -> Pair:
    """Two unrelated random Llamas over a 12-token vocabulary: exact distributions are enumerable. Each carries a
    word-level tokenizer of those 12 tokens, so an Engine (which loads one) can serve them by prompt ids."""
    root = tmp_path_factory.mktemp("small_vocab")
    conf = llama_config(12, hidden_size=32, intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    tok = word_tokenizer(conf.vocab_size)
    for name, seed in (("target", 10), ("drafter", 11)):
        random_llama(conf, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return Pair(str(root / "target"), str(root / "drafter"))


def word_tokenizer(vocab_size: int):
    """The special tokens at ids 0..3, then one word per id ("w4", "w5", ...), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def local_resources(vocab_size: int) -> dict:
    """Process-local instances of the shared objects table-driven arms require (no Redis: nothing syncs them).

    Arms whose resources are not built here are skipped by the contract tests, with the missing names as reason.
    """
    try:
        from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable
    except ImportError:
        return {}
    return {"ngram_table": NgramTable(NgramConfig(), vocab_size), "adjacency_table": AdjacencyTable(vocab_size)}


def missing_requirements(method: str, resources: dict, drafter: bool = True) -> str | None:
    """Why `method` cannot be built with these resources (a skip reason), or None when it can."""
    from metaspec.workers.registry import arms

    missing = arms()[method].requires - set(resources) - ({"drafter"} if drafter else set())
    return f"arm {method!r} needs {sorted(missing)}, which this test does not provide" if missing else None


def make_engine(pair: Pair, dtype: str = "float32", lean: bool = True, drafter: bool = True, batch=None):
    from metaspec.workers.engine import Engine, EngineConfig
    from metaspec.workers.model import ModelConfig
    from metaspec.workers.scheduler import SchedulerConfig

    # The draft budget off by default: it weighs measured timings, so with it on how much an arm drafts depends
    # on the machine's load, and the contract tests must see every arm draft. tests/workers/test_budget.py turns
    # it on.
    cfg = EngineConfig(target=ModelConfig(pair.target, dtype=dtype, lean=lean),
                       drafter=ModelConfig(pair.drafter, dtype=dtype, lean=lean) if drafter else None,
                       default_method="ar", batch=batch or SchedulerConfig(draft_budget=False))
    engine = Engine(cfg)
    engine.resources.update(local_resources(engine.target.vocab_size))
    return engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_pair):
    """fp32 engine over the tiny pair (lean Llama forward)."""
    engine = make_engine(tiny_pair)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def shipped_pair() -> Pair:
    target, drafter = CHECKPOINTS / "target", CHECKPOINTS / "drafter"
    missing = [str(p) for p in (target, drafter) if not (p / "config.json").exists()]
    if missing:
        pytest.skip(f"shipped checkpoints not found ({', '.join(missing)}); train them with `metaspec train`")
    return Pair(str(target), str(drafter))


@pytest.fixture(scope="session")
def shipped_engine(shipped_pair):
    """fp32 engine over the shipped target + drafter (fp32: bf16 batched vs single-token numerics can flip ties)."""
    engine = make_engine(shipped_pair)
    yield engine
    engine.close()
