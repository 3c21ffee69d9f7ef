"""Causal LMs behind one small interface: weights load once, each request gets a `Session` (its KV cache).

`LeanLlama` is a gpt-fast-style forward for Llama-architecture checkpoints (fused qkv and gate/up weights,
static KV cache, SDPA): HF's generic forward spends ~0.25 ms per layer in framework overhead on a CPU, which a
small drafter cannot afford. Every other architecture runs through `HFModel` (HF forward + DynamicCache).
Both match HF's logits (tests/workers/test_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    path: str                       # local directory or hub id of an HF causal LM
    dtype: str = "float32"          # "float32" | "bfloat16" | "float16": compute dtype
    device: str = "cpu"             # torch device
    lean: bool = True               # use the lean Llama forward when the architecture allows it
    threads: int | None = None      # torch intra-op threads (None = leave as is)


class Session(Protocol):
    """One request's view of a model: a KV cache holding `length` tokens."""

    length: int

    def forward(self, tokens: list[int], exit_layer: int | None = None) -> torch.Tensor:
        """Score `tokens` at positions length.. (cache grows by len(tokens)); returns [T, V] float logits."""

    def rollback(self, length: int) -> None:
        """Forget every cached position >= length."""


class Model(Protocol):
    vocab_size: int
    max_context: int
    num_layers: int

    def session(self, capacity: int) -> Session: ...


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig) -> Model:
    """Load an HF causal LM; Llama-architecture checkpoints get the lean forward when `cfg.lean`."""
    from transformers import AutoModelForCausalLM

    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hf = AutoModelForCausalLM.from_pretrained(cfg.path, torch_dtype=_DTYPES[cfg.dtype]).to(cfg.device).eval()
    if cfg.lean and LeanLlama.supports(hf.config):
        return LeanLlama(hf)
    return HFModel(hf)


def _context(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


class HFModel:
    """Any HF causal LM; the cache is a DynamicCache cropped on rollback."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.vocab_size = int(hf.config.vocab_size)
        self.max_context = _context(hf.config)
        self.num_layers = int(getattr(hf.config, "num_hidden_layers", 0))

    def session(self, capacity: int) -> Session:
        return _HFSession(self.hf)


class _HFSession:
    def __init__(self, hf) -> None:
        from transformers import DynamicCache

        self.hf, self.cache, self.length = hf, DynamicCache(config=hf.config), 0

    @torch.inference_mode()
    def forward(self, tokens: list[int], exit_layer: int | None = None) -> torch.Tensor:
        if exit_layer is not None:
            raise ValueError("early exit needs the lean Llama forward")
        ids = torch.tensor([tokens], device=self.hf.device)
        pos = torch.arange(self.length, self.length + len(tokens), device=self.hf.device)
        out = self.hf(input_ids=ids, past_key_values=self.cache, use_cache=True, cache_position=pos)
        self.length += len(tokens)
        return out.logits[0].float()

    def rollback(self, length: int) -> None:
        if length < self.length:  # a negative count removes that many positions (transformers 4.x and 5.x)
            self.cache.crop(length - self.length)
        self.length = length


class LeanLlama:
    """Llama forward with fused weights and a static cache; shares no mutable state between sessions."""

    @staticmethod
    def supports(config) -> bool:
        rope = getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        return (config.model_type == "llama" and config.hidden_act == "silu" and rope_type == "default"
                and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False))

    def __init__(self, hf) -> None:
        c = hf.config
        self.vocab_size, self.max_context, self.num_layers = int(c.vocab_size), _context(c), int(c.num_hidden_layers)
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps, self.dtype, self.device = c.rms_norm_eps, hf.dtype, hf.device
        m = hf.model
        self.embed = m.embed_tokens.weight.detach()
        self.layers = [self._fuse(layer) for layer in m.layers]
        self.norm = m.norm.weight.detach()
        self.lm_head = hf.lm_head.weight.detach()
        theta = float(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0))
        inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.device) / self.head_dim)
        freqs = torch.outer(torch.arange(self.max_context, dtype=torch.float32, device=self.device), inv)
        emb = torch.cat([freqs, freqs], -1)                                    # [P, hd]
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _fuse(layer) -> dict[str, torch.Tensor]:
        a, mlp = layer.self_attn, layer.mlp
        return {
            "wqkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
            "wo": a.o_proj.weight.detach(),
            "w13": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            "w2": mlp.down_proj.weight.detach(),
            "ln1": layer.input_layernorm.weight.detach(),
            "ln2": layer.post_attention_layernorm.weight.detach(),
        }

    def session(self, capacity: int) -> "LeanSession":
        return LeanSession(self, min(capacity, self.max_context))

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class LeanSession:
    def __init__(self, model: LeanLlama, capacity: int) -> None:
        self.m, self.capacity, self.length = model, capacity, 0
        shape = (model.num_layers, 1, model.n_kv, capacity, model.head_dim)  # [layers, B, kv_heads, S, hd]
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)

    @torch.inference_mode()
    def forward(self, tokens: list[int], exit_layer: int | None = None) -> torch.Tensor:
        m, T, start = self.m, len(tokens), self.length
        end = start + T
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} > {self.capacity} positions")
        x = F.embedding(torch.tensor(tokens, device=m.device), m.embed)[None]  # [1, T, H]
        cos, sin = m.cos[start:end], m.sin[start:end]                           # [T, hd]
        mask = None
        if T > 1:  # new token i sees the cache and new tokens 0..i
            mask = torch.ones(T, end, dtype=torch.bool, device=m.device).tril(diagonal=start)
        nq, nkv, hd = m.n_heads, m.n_kv, m.head_dim
        for i, w in enumerate(m.layers[:exit_layer]):
            qkv = F.linear(m.rms(x, w["ln1"]), w["wqkv"])                       # [1, T, (nq+2nkv)*hd]
            q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
            q = _rotate(q.view(1, T, nq, hd).transpose(1, 2), cos, sin)         # [1, nq, T, hd]
            k = _rotate(k.view(1, T, nkv, hd).transpose(1, 2), cos, sin)        # [1, nkv, T, hd]
            self.k[i, :, :, start:end] = k
            self.v[i, :, :, start:end] = v.view(1, T, nkv, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, self.k[i, :, :, :end], self.v[i, :, :, :end], attn_mask=mask,
                                                 enable_gqa=nq != nkv)          # [1, nq, T, hd]
            x = x + F.linear(att.transpose(1, 2).reshape(1, T, nq * hd), w["wo"])
            gate, up = F.linear(m.rms(x, w["ln2"]), w["w13"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["w2"])
        self.length = end
        return F.linear(m.rms(x, m.norm), m.lm_head)[0].float()                 # [T, V]

    def rollback(self, length: int) -> None:
        # Stale entries beyond `length` are overwritten before they are read again.
        self.length = length
