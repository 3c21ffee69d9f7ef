"""The whole training recipe, stage by stage: corpus → tokenizer → target → drafter → model cards."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .corpus import CorpusConfig, build_corpus
from .train import DRAFTER_SHAPE, TARGET_SHAPE, TrainConfig, encode_corpus, fit, make_model, perplexity, train_tokenizer

STAGES = ("corpus", "tokenizer", "target", "drafter")


def _save(model, tokenizer, out: Path, card: dict) -> None:
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(card, indent=2))
    lines = [f"# metaspec {card['role']}", "", "Llama-architecture causal LM trained offline by `metaspec train` "
             "(see the repository README, 'Models').", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card.items() if not isinstance(v, dict)]
    lines += ["", "Held-out perplexity per domain:", "", "| domain | perplexity |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card["heldout_perplexity"].items()]
    for layer, ppl in card.get("early_exit_perplexity", {}).items():
        lines.append(f"| early exit after layer {layer} ({', '.join(f'{d} {p}' for d, p in ppl.items())}) | |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def run(stages: tuple[str, ...], work_dir: Path, out_dir: Path, cfg: TrainConfig, drafter_minutes: float,
        device: str = "cpu", distill_weight: float = 0.5, drafter_init: str | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    corpus_dir = work_dir / "corpus"
    if "corpus" in stages:
        build_corpus(CorpusConfig(), corpus_dir)
    if "tokenizer" in stages:
        train_tokenizer(corpus_dir, work_dir / "tokenizer", cfg.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(work_dir / "tokenizer")
    cache = work_dir / "tokens.pt"
    if not cache.exists():
        torch.save({"train": encode_corpus(tokenizer, corpus_dir, "train"),
                    "heldout": encode_corpus(tokenizer, corpus_dir, "heldout")}, cache)
    data = torch.load(cache)
    train = torch.cat(list(data["train"].values()))
    base_card = {"seed": cfg.seed, "corpus_sha256": json.loads((corpus_dir / "manifest.json").read_text())["sha256"],
                 "train_tokens_available": len(train), "device": device, "host": platform.processor() or "cpu",
                 "torch": torch.__version__, "config": asdict(cfg)}
    if "target" in stages:
        model = make_model(TARGET_SHAPE, cfg, tokenizer).to(device)
        stats = fit(model, train, cfg, "target", exits=cfg.exit_layers)
        card = {"role": "target", "parameters": sum(p.numel() for p in model.parameters()), **stats,
                "heldout_perplexity": perplexity(model, data["heldout"], cfg),
                "early_exit_perplexity": {str(layer): perplexity(model, data["heldout"], cfg, layer)
                                          for layer in cfg.exit_layers}, **base_card}
        _save(model, tokenizer, out_dir / "target", card)
    if "drafter" in stages:
        teacher = AutoModelForCausalLM.from_pretrained(out_dir / "target", dtype=torch.bfloat16).to(device).eval()
        dcfg = replace(cfg, max_minutes=drafter_minutes, lr=3e-3 if drafter_init is None else 1e-3, seed=cfg.seed + 1,
                       distill_weight=distill_weight)
        if drafter_init is None:
            model = make_model(DRAFTER_SHAPE, dcfg, tokenizer).to(device)
        else:  # continue an earlier drafter (e.g. a pure-KL pass after a mixed one)
            model = AutoModelForCausalLM.from_pretrained(drafter_init, dtype=torch.float32).to(device)
            prior = json.loads((Path(drafter_init) / "training.json").read_text())
        stats = fit(model, train, dcfg, "drafter", teacher=teacher)
        if drafter_init is not None:  # the card counts both passes
            stats = {**stats, "tokens_seen": stats["tokens_seen"] + prior["tokens_seen"],
                     "wall_s": round(stats["wall_s"] + prior["wall_s"], 1),
                     "passes": [*prior.get("passes", [prior["config"]]), asdict(dcfg)]}
        card = {"role": "drafter", "parameters": sum(p.numel() for p in model.parameters()), **stats,
                "distilled_from": "target", "heldout_perplexity": perplexity(model, data["heldout"], dcfg),
                **base_card, "config": asdict(dcfg)}
        _save(model, tokenizer, out_dir / "drafter", card)
