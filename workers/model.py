"""Causal LMs behind one small interface: weights load once, each request gets a `Session` (its KV cache).

`LeanLlama` is a gpt-fast-style forward for Llama-architecture checkpoints (fused qkv and gate/up weights,
static KV cache, SDPA): HF's generic forward spends ~0.25 ms per layer in framework overhead on a CPU, which a
small drafter cannot afford. On CPU it also picks faster kernels than HF (oneDNN GEMMs on weights prepacked at
load; fp32 attention for bf16 models), both switchable in `ModelConfig`; `python -m metaspec.bench_forward`
measures each. Every other architecture runs through `HFModel` (HF forward + DynamicCache).
Both match HF's logits (tests/workers/test_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    path: str                       # local directory or hub id of an HF causal LM
    dtype: str = "float32"          # "float32" | "bfloat16" | "float16": compute dtype
    device: str = "cpu"             # torch device
    lean: bool = True               # use the lean Llama forward when the architecture allows it
    threads: int | None = None      # torch intra-op threads (None = leave as is)
    prepack: bool = True            # CPU fp32/bf16 lean forward: oneDNN GEMMs on weights reordered once at load
    cpu_fp32_attention: bool = True # CPU lean forward of a bf16/fp16 model: fp32 KV cache and SDPA (5-10x faster)


class Session(Protocol):
    """One request's view of a model: a KV cache holding `length` tokens."""

    length: int

    def forward(self, tokens: list[int], exit_layer: int | None = None,
                parents: list[int] | None = None) -> torch.Tensor:
        """Score `tokens` at cache slots length.. (cache grows by len(tokens)); returns [T, V] float logits.

        `parents` makes the tokens a tree: token i attends to the cache and to its ancestors only and sits at
        position length + depth(i) - 1 (parents[i] = -1 for a root, parents[i] < i)."""

    def rollback(self, length: int) -> None:
        """Forget every cached position >= length."""

    def keep(self, slots: list[int], at: int) -> None:
        """Move the cache entries at `slots` (ascending, each >= at) to at, at + 1, ... (tree acceptance)."""


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
    hf = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_DTYPES[cfg.dtype]).to(cfg.device).eval()
    if cfg.lean and LeanLlama.supports(hf.config):
        model = LeanLlama(hf, prepack=cfg.prepack, cpu_fp32_attention=cfg.cpu_fp32_attention)
    else:
        model = HFModel(hf)
    model.source = cfg  # lets another process load the same weights (pearl's drafter process)
    return model


def _context(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def tree_layout(parents: list[int], start: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [T] and a boolean visibility [T, T] (i sees its ancestors and itself) for a token tree."""
    T = len(parents)
    seen = torch.eye(T, dtype=torch.bool)
    depth = [0] * T
    for i, p in enumerate(parents):
        if p >= 0:
            seen[i] |= seen[p]
            depth[i] = depth[p] + 1
    return torch.tensor(depth, device=device) + start, seen.to(device)


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
    def forward(self, tokens: list[int], exit_layer: int | None = None,
                parents: list[int] | None = None) -> torch.Tensor:
        if exit_layer is not None:
            raise ValueError("early exit needs the lean Llama forward")
        dev, T, start = self.hf.device, len(tokens), self.length
        ids = torch.tensor([tokens], device=dev)
        slots = torch.arange(start, start + T, device=dev)
        extra = {}
        if parents is not None:  # 4D additive mask [1, 1, T, start + T] and tree positions
            pos, seen = tree_layout(parents, start, dev)
            visible = torch.cat([torch.ones(T, start, dtype=torch.bool, device=dev), seen], 1)
            mask = torch.zeros(visible.shape, dtype=self.hf.dtype, device=dev)
            extra = {"attention_mask": mask.masked_fill(~visible, torch.finfo(mask.dtype).min)[None, None],
                     "position_ids": pos[None]}
        out = self.hf(input_ids=ids, past_key_values=self.cache, use_cache=True, cache_position=slots, **extra)
        self.length += T
        return out.logits[0].float()

    def rollback(self, length: int) -> None:
        if length < self.length:  # a negative count removes that many positions (transformers 4.x and 5.x)
            self.cache.crop(length - self.length)
        self.length = length

    @torch.inference_mode()
    def keep(self, slots: list[int], at: int) -> None:
        index = torch.tensor(slots, device=self.hf.device)
        for layer in self.cache.layers:
            n = len(slots)
            layer.keys[..., at: at + n, :] = layer.keys.index_select(-2, index)
            layer.values[..., at: at + n, :] = layer.values.index_select(-2, index)


class LeanLlama:
    """Llama forward with fused weights and a static cache; shares no mutable state between sessions.

    Per layer: rms_norm, one fused qkv GEMM, RoPE on q, k and v at once (v's rows of the table are cos=1, sin=0,
    which leaves v bit-exact), one copy of the new k/v into the cache, SDPA, the output GEMM, the fused gate/up
    and the down GEMMs. Every op rounds where HF's does; only GEMM summation order differs (see `_linear`), so
    fp32 logits match HF to ~1e-6. On CPU a bf16 model runs attention in fp32 (cache included): the CPU bf16
    SDPA kernel is 5-10x slower than the fp32 one at T=1, and fp32 is the more exact of the two.
    """

    @staticmethod
    def supports(config) -> bool:
        rope = getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        return (config.model_type == "llama" and config.hidden_act == "silu" and rope_type == "default"
                and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False))

    def __init__(self, hf, prepack: bool = True, cpu_fp32_attention: bool = True) -> None:
        c = hf.config
        self.vocab_size, self.max_context, self.num_layers = int(c.vocab_size), _context(c), int(c.num_hidden_layers)
        self.n_heads, self.n_kv, self.hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps, self.dtype, self.device = c.rms_norm_eps, hf.dtype, hf.device
        self.attn_dtype = torch.float32 if cpu_fp32_attention and self.device.type == "cpu" else self.dtype
        self.prepacked = prepack and _prepack_works(self.dtype, self.device)
        # fp32: rms_norm applies the weight itself (bit-identical to HF); reduced precision: HF rounds the
        # normalised activations before the weight multiplies them, so the weight is applied separately.
        self.norm_inside = self.dtype == torch.float32
        m, lin = hf.model, (lambda w: _linear(w.detach(), self.prepacked))
        self.embed = m.embed_tokens.weight.detach()
        self.layers = [(layer.input_layernorm.weight.detach(),
                        lin(torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                       layer.self_attn.v_proj.weight])),
                        lin(layer.self_attn.o_proj.weight),
                        layer.post_attention_layernorm.weight.detach(),
                        lin(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])),
                        lin(layer.mlp.down_proj.weight)) for layer in m.layers]
        self.norm = m.norm.weight.detach()
        self.lm_head = lin(hf.lm_head.weight)
        self.cos, self.sin = self._rope_tables(c)                                # [P, nq + 2 nkv, hd] each
        self.positions = torch.arange(self.max_context, device=self.device)      # [P] for causal masks

    def _rope_tables(self, c) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin per position and head: q and k heads rotate, v heads get cos=1, sin=0."""
        hd, half, P, nqk, nv = self.head_dim, self.head_dim // 2, self.max_context, self.n_heads + self.n_kv, self.n_kv
        theta = float(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0))
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=self.device).float() / hd)
        freqs = torch.outer(torch.arange(P, dtype=torch.float32, device=self.device), inv)
        emb = torch.cat([freqs, freqs], -1)                                      # [P, hd], as HF computes it
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)  # rotate_half(x) * sin == roll(x, half) * sin_signed
        ones = torch.ones(P, nv, hd, dtype=self.dtype, device=self.device)
        return (torch.cat([cos[:, None].expand(P, nqk, hd), ones], 1).contiguous(),
                torch.cat([sin[:, None].expand(P, nqk, hd), ones * 0], 1).contiguous())

    def session(self, capacity: int) -> "LeanSession":
        return LeanSession(self, min(capacity, self.max_context))

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.norm_inside:
            return F.rms_norm(x, (self.hidden,), w, self.eps)
        return F.rms_norm(x, (self.hidden,), None, self.eps) * w


def _linear(w: torch.Tensor, prepack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [1, T, in] -> x @ w.T [1, T, out]; prepacked: oneDNN on a weight reordered once (bf16 and fp32 alike:
    2x MKL's fp32 GEMM at T=9; MKL's GEMV wins on small weights at T=1 alone, not measurably in a forward)."""
    if not prepack:
        return lambda x: F.linear(x, w)
    op, p = torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
    return lambda x: op(x, p, None, "none", [], "")


def _prepack_works(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN weight prepacking exists on this build and CPU for `dtype` (CUDA and others use F.linear)."""
    if not (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        w, x = torch.linspace(-1, 1, 128).view(16, 8).to(dtype), torch.linspace(-1, 1, 16).view(1, 2, 8).to(dtype)
        return torch.allclose(_linear(w, True)(x).float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    except RuntimeError:  # e.g. no bf16 support in this CPU's oneDNN
        return False


class LeanSession:
    def __init__(self, model: LeanLlama, capacity: int) -> None:
        self.m, self.capacity, self.length = model, capacity, 0
        nkv = model.n_kv
        # Per layer one cache holding k heads then v heads: [1, 2 nkv, S, hd]. Positions >= length hold stale
        # values or garbage and are never read: attention reads [:end] after writing [start:end].
        kv = torch.empty(model.num_layers, 1, 2 * nkv, capacity, model.head_dim, dtype=model.attn_dtype,
                         device=model.device)
        self.kv = kv.unbind(0)
        self.k, self.v = [c[:, :nkv] for c in self.kv], [c[:, nkv:] for c in self.kv]
        self.filled = [0] * model.num_layers  # positions whose k/v each layer holds (early exits fill fewer layers)

    @torch.inference_mode()
    def forward(self, tokens: list[int], exit_layer: int | None = None,
                parents: list[int] | None = None) -> torch.Tensor:
        """Score `tokens` at positions length..; `exit_layer` runs only the first blocks, then norm and head.

        An early exit fills the cache of the blocks it runs only: a later forward through deeper blocks must
        start at or before the first position scored with the early exit (roll back first)."""
        m, T, start = self.m, len(tokens), self.length
        end, layers = start + T, m.layers[:exit_layer]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} > {self.capacity} positions")
        if T == 0 or min(self.filled[:len(layers)], default=start) < start:
            raise ValueError("nothing to score" if T == 0 else f"the first {len(layers)} blocks cache fewer than "
                             f"{start} positions (an early exit scored the rest): roll back before scoring deeper")
        x = F.embedding(torch.tensor([tokens], device=m.device), m.embed)        # [1, T, H]
        cos, sin = m.cos[start:end], m.sin[start:end]                           # [T, nq + 2 nkv, hd]
        mask = None  # T > 1: new token i sees the cache and new tokens 0..i; additive, in attention's dtype
        if parents is not None:  # tree: i sees the cache, its ancestors and itself, at position start + depth
            pos, seen = tree_layout(parents, start, m.device)
            cos, sin = m.cos[pos], m.sin[pos]
            visible = torch.cat([torch.ones(T, start, dtype=torch.bool, device=m.device), seen], 1)
            mask = torch.zeros(T, end, dtype=m.attn_dtype, device=m.device).masked_fill(~visible, float("-inf"))
        elif T > 1:
            mask = torch.where(m.positions[:end] <= m.positions[start:end, None], 0.0, float("-inf")).to(m.attn_dtype)
        nq, nkv, hd, half, adt = m.n_heads, m.n_kv, m.head_dim, m.head_dim // 2, m.attn_dtype
        for kv, k, v, (ln1, qkv_proj, o_proj, ln2, gate_up_proj, down_proj) in zip(self.kv, self.k, self.v, layers):
            qkv = qkv_proj(m.rms(x, ln1)).view(1, T, nq + 2 * nkv, hd)
            qkv = qkv * cos + qkv.roll(half, -1) * sin                          # RoPE on q and k, v unchanged
            kv.narrow(2, start, T).copy_(qkv[:, :, nq:].transpose(1, 2))        # [1, 2 nkv, T, hd]
            att = F.scaled_dot_product_attention(qkv[:, :, :nq].transpose(1, 2).to(adt), k.narrow(2, 0, end),
                                                 v.narrow(2, 0, end), attn_mask=mask, enable_gqa=nq != nkv)
            x = x + o_proj(att.transpose(1, 2).reshape(1, T, nq * hd).to(x.dtype))   # att: [1, nq, T, hd]
            gate, up = gate_up_proj(m.rms(x, ln2)).chunk(2, dim=-1)
            x = x + down_proj(F.silu(gate) * up)
        self.length = end
        self.filled[:len(layers)] = [end] * len(layers)
        return m.lm_head(m.rms(x, m.norm))[0].float()                           # [T, V]

    def rollback(self, length: int) -> None:
        # Entries beyond `length` stay in memory and are overwritten before they are read again.
        self.length = length
        self.filled = [min(f, length) for f in self.filled]

    def keep(self, slots: list[int], at: int) -> None:
        index = torch.tensor(slots, device=self.m.device)
        for kv in self.kv:  # [1, 2 nkv, S, hd]
            kv.narrow(2, at, len(slots)).copy_(kv.index_select(2, index))
