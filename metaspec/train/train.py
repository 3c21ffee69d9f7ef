"""Train the shipped tokenizer, target (with LayerSkip-style early-exit loss) and distilled drafter.

One command reproduces them: `metaspec train --seed 0` (see README). Runs on CPU (bf16 autocast) or CUDA.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int          # model width
    num_hidden_layers: int    # transformer blocks
    num_attention_heads: int  # query heads (head_dim = hidden_size / heads)
    num_key_value_heads: int  # kv heads (GQA when fewer than query heads)
    intermediate_size: int    # SwiGLU width


TARGET_SHAPE = ModelShape(512, 8, 8, 8, 1536)   # ~31.5M parameters with an 8192 vocab
DRAFTER_SHAPE = ModelShape(256, 2, 4, 4, 768)   # ~3.8M parameters, < 1/8 of the target


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0                                  # seeds data order and init
    vocab_size: int = 8192                         # BPE vocabulary shared by target and drafter
    seq_len: int = 512                             # training context
    batch_size: int = 4                            # sequences per step
    lr: float = 1.5e-3                             # peak AdamW learning rate (cosine decay, warmup)
    warmup_steps: int = 100                        # linear warmup
    weight_decay: float = 0.1                      # AdamW decoupled weight decay
    max_minutes: float = 60.0                      # wall-time budget for this model
    max_tokens: int = 50_000_000                   # token budget for this model (whichever ends first)
    exit_layers: tuple[int, ...] = (2, 4)          # early-exit losses through the shared head (target only)
    exit_weight: float = 0.2                       # weight of each early-exit loss
    distill_weight: float = 0.5                    # drafter: weight of KL to the target (rest: corpus CE)
    max_position_embeddings: int = 2048            # context the shipped models accept
    eval_tokens: int = 200_000                     # held-out tokens per domain for perplexity


def train_tokenizer(corpus_dir: Path, out_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)

    def texts():
        with open(corpus_dir / "train.jsonl") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return fast


def encode_corpus(tokenizer, corpus_dir: Path, split: str) -> dict[str, torch.Tensor]:
    """Token stream per domain, documents separated by EOS: {domain: int32 tensor}."""
    streams: dict[str, list[int]] = {}
    eos = tokenizer.eos_token_id
    with open(corpus_dir / f"{split}.jsonl") as f:
        docs = [json.loads(line) for line in f]
    for d in tqdm(docs, desc=f"tokenize {split}", unit="doc"):
        streams.setdefault(d["domain"], []).extend(tokenizer.encode(d["text"]) + [eos])
    return {k: torch.tensor(v, dtype=torch.int32) for k, v in streams.items()}


def make_model(shape: ModelShape, cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       rope_theta=10000.0, **asdict(shape))
    return LlamaForCausalLM(conf)


def _lr(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% over `progress` (0..1 of the token or time budget)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch(stream: torch.Tensor, cfg: TrainConfig, rng: random.Random) -> torch.Tensor:
    starts = [rng.randrange(0, len(stream) - cfg.seq_len - 1) for _ in range(cfg.batch_size)]
    return torch.stack([stream[s: s + cfg.seq_len + 1] for s in starts]).long()  # [B, T+1]


def _loss(model, x, y, cfg: TrainConfig, exits: tuple[int, ...], teacher=None):
    out = model.model(input_ids=x, output_hidden_states=bool(exits))
    logits = model.lm_head(out.last_hidden_state)                              # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.float()
        kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t_logits, -1), log_target=True,
                      reduction="batchmean") / x.shape[1]
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kl
    for layer in exits:  # hidden_states[i] is the output of block i (0 = embeddings); every 2nd position
        h = model.model.norm(out.hidden_states[layer][:, ::2])
        loss = loss + cfg.exit_weight * F.cross_entropy(model.lm_head(h).flatten(0, 1).float(),
                                                       y[:, ::2].flatten())
    return loss


def fit(model, train: torch.Tensor, cfg: TrainConfig, desc: str, exits=(), teacher=None) -> dict:
    """Train until the token or time budget runs out; returns tokens seen and wall time."""
    rng = random.Random(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = cfg.max_tokens // tokens_per_step
    use_cuda = next(model.parameters()).is_cuda
    t0 = time.time()
    model.train()
    bar = tqdm(total=total_steps, desc=desc, unit="step")
    step = 0
    while step < total_steps:
        # The schedule follows whichever budget (tokens or wall time) is closer to running out.
        progress = max(step / total_steps, (time.time() - t0) / 60 / cfg.max_minutes)
        if progress >= 1.0:
            break
        batch = _batch(train, cfg, rng).to(next(model.parameters()).device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, progress, cfg)
        with torch.autocast("cuda" if use_cuda else "cpu", dtype=torch.bfloat16):
            loss = _loss(model, batch[:, :-1], batch[:, 1:], cfg, exits, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{step * tokens_per_step / (time.time() - t0):.0f}")
    bar.close()
    return {"tokens_seen": step * tokens_per_step, "steps": step, "wall_s": round(time.time() - t0, 1)}


@torch.no_grad()
def perplexity(model, streams: dict[str, torch.Tensor], cfg: TrainConfig, layer: int | None = None) -> dict:
    """Held-out perplexity per domain (optionally from early exit `layer` through the shared head)."""
    model.eval()
    device = next(model.parameters()).device
    result = {}
    for domain, stream in streams.items():
        n = min(len(stream) - 1, cfg.eval_tokens) // cfg.seq_len * cfg.seq_len
        x = stream[:n].long().view(-1, cfg.seq_len).to(device)
        y = stream[1: n + 1].long().view(-1, cfg.seq_len).to(device)
        total = 0.0
        for i in range(0, len(x), 8):
            out = model.model(input_ids=x[i: i + 8], output_hidden_states=layer is not None)
            h = out.last_hidden_state if layer is None else model.model.norm(out.hidden_states[layer])
            total += F.cross_entropy(model.lm_head(h).flatten(0, 1).float(), y[i: i + 8].flatten(),
                                     reduction="sum").item()
        result[domain] = round(math.exp(total / y.numel()), 2)
    return result
