"""The lean Llama forward over a KV slot pool: every sequence of a step scored in one forward.

`LeanLlama` is a gpt-fast-style forward for Llama-architecture checkpoints (fused qkv and gate/up weights,
static KV cache, SDPA): HF's generic forward spends ~0.25 ms per layer in framework overhead on a CPU, which a
small drafter cannot afford. On CPU it also picks faster kernels than HF (oneDNN GEMMs on weights prepacked at
load; fp32 attention for bf16 models), both switchable in `ModelConfig`.

`LeanPool.forward` flattens the new tokens of every item into one [1, N, H] activation for the GEMMs (the cost of
a step), writes each token's k/v into its item's slot, and runs attention in as few calls as pay (`_parts`): the
decoding items together, queries padded to [B, nq, Tmax, hd] against the slot range's caches [B, nkv, E, hd] with
one additive mask [B, 1, Tmax, E] (each row sees its own cache and its own causal or tree ancestors); a long
prefill chunk, or one of a few drafts, in a call of its own so that its length does not pad every row. Padding
only adds masked keys and unused query rows, so an item's logits do not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .budget import drafts_split
from .kv import Item, SlotPool, SlotSession, tree_depths, tree_visibility


def _context(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


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

    def session(self, capacity: int) -> SlotSession:
        """A private one-slot pool's session (tools and tests; a replica's requests share `pool`)."""
        return self.pool(1, min(capacity, self.max_context)).session()

    def pool(self, slots: int, slot_tokens: int | None = None) -> LeanPool:
        """The KV memory of `slots` sequences of up to `slot_tokens` positions, allocated now, once."""
        return LeanPool(self, slots, min(slot_tokens or self.max_context, self.max_context))

    def slot_bytes(self, slot_tokens: int) -> int:
        return self.num_layers * 2 * self.n_kv * slot_tokens * self.head_dim * self.attn_dtype.itemsize

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


class LeanPool(SlotPool):
    """Per layer one tensor [slots, 2 nkv, slot_tokens, hd] (k heads then v heads), allocated at construction."""

    def __init__(self, model: LeanLlama, slots: int, slot_tokens: int) -> None:
        super().__init__(slots, slot_tokens)
        self.m, self.num_layers = model, model.num_layers
        # Zeroed, not empty: a batch's attention reads every slot's cache up to the longest sequence (masked), and
        # a masked key or value that is NaN garbage still poisons the softmax and the weighted sum (0 * NaN).
        kv = torch.zeros(model.num_layers, slots, 2 * model.n_kv, slot_tokens, model.head_dim,
                         dtype=model.attn_dtype, device=model.device)
        self.kv = kv.unbind(0)
        self.mem_bytes = kv.numel() * kv.element_size()

    @torch.inference_mode()
    def forward(self, items: list[Item], exit_layer: int | None) -> list[torch.Tensor | None]:
        """Score every item's tokens; `exit_layer` runs only the first blocks, then norm and head.

        An early exit fills the cache of the blocks it runs only: a later forward through deeper blocks must
        start at or before the first position scored with the early exit (roll back first)."""
        m = self.m
        layers = m.layers[:exit_layer]
        for it in items:
            _check(it, len(layers))
        lay = _Layout(items, m, self.slot_tokens)
        nq, nkv, hd, half, adt = m.n_heads, m.n_kv, m.head_dim, m.head_dim // 2, m.attn_dtype
        x = F.embedding(lay.ids, m.embed)[None]                                  # [1, N, H]
        cos, sin = m.cos[lay.pos], m.sin[lay.pos]                               # [N, nq + 2 nkv, hd]
        for kv, (ln1, qkv_proj, o_proj, ln2, gate_up_proj, down_proj) in zip(self.kv, layers):
            qkv = qkv_proj(m.rms(x, ln1)).view(lay.n, nq + 2 * nkv, hd)
            qkv = qkv * cos + qkv.roll(half, -1) * sin                          # RoPE on q and k, v unchanged
            kv.view(-1, hd).index_copy_(0, lay.write, qkv[:, nq:].reshape(-1, hd).to(adt))
            att = qkv.new_empty(lay.n, nq * hd)
            for g in lay.groups:                                                 # one SDPA per group
                q = qkv.new_zeros(g.b * g.t, nq, hd).index_copy_(0, g.dest, qkv[g.src, :nq])
                q = q.view(g.b, g.t, nq, hd).transpose(1, 2).to(adt)            # [B, nq, Tmax, hd]
                cache = kv[g.lo: g.lo + g.b, :, :g.e]                          # [B, 2 nkv, E, hd] (a view)
                out = F.scaled_dot_product_attention(q, cache[:, :nkv], cache[:, nkv:], attn_mask=g.mask,
                                                     enable_gqa=nq != nkv)       # [B, nq, Tmax, hd]
                out = out.transpose(1, 2).reshape(g.b * g.t, nq * hd).index_select(0, g.dest)
                att.index_copy_(0, g.src, out.to(att.dtype))
            x = x + o_proj(att[None])
            gate, up = gate_up_proj(m.rms(x, ln2)).chunk(2, dim=-1)
            x = x + down_proj(F.silu(gate) * up)
        for it in items:
            end = it.session.length + len(it.tokens)
            it.session.length = end
            it.session.filled[:len(layers)] = [end] * len(layers)
        if lay.rows.numel() == 0:
            return [None] * len(items)
        logits = m.lm_head(m.rms(x[:, lay.rows], m.norm))[0].float()            # [R, V]
        return [None if n == 0 else logits[a: a + n] for a, n in lay.spans]

    @torch.inference_mode()
    def keep(self, session: SlotSession, slots: list[int], at: int) -> None:
        index = torch.tensor(slots, device=self.m.device)
        for kv in self.kv:                                                       # [S, 2 nkv, L, hd]
            kv[session.slot, :, at: at + len(slots)] = kv[session.slot].index_select(1, index)


def _check(item: Item, layers: int) -> None:
    s, T = item.session, len(item.tokens)
    if T == 0:
        raise ValueError("nothing to score")
    if s.length + T > s.capacity:
        raise ValueError(f"KV cache full: {s.length + T} > {s.capacity} positions")
    if min(s.filled[:layers], default=s.length) < s.length:
        raise ValueError(f"the first {layers} blocks cache fewer than {s.length} positions (an early exit scored "
                         "the rest): roll back before scoring deeper")


class _Layout:
    """Where each new token goes in one batched forward, built on the host and sent to the device once per call.

    ids/pos [N]: tokens and their RoPE positions (a tree node sits at start + depth); write [N * 2 nkv]: flat
    cache rows of their k/v heads; rows [R]: the flat tokens whose logits come back; spans: each item's (first row,
    count) among them; groups: the attention calls (`_parts`: decoding items together, a long prefill chunk or
    one of a few drafts alone, so its length does not pad every decode row of the batch).
    """

    def __init__(self, items: list[Item], m: LeanLlama, L: int) -> None:
        ids, pos, cache_pos, slot_of, rows, self.spans, firsts = [], [], [], [], [], [], []
        n = 0
        for it in items:
            T, start = len(it.tokens), it.session.length
            depth = range(T) if it.parents is None else tree_depths(it.parents)
            ids += it.tokens
            pos += [start + d for d in depth]
            cache_pos += range(start, start + T)
            slot_of += [it.session.slot] * T
            picked = {"all": range(n, n + T), "last": range(n + T - 1, n + T), "none": range(0)}[it.rows]
            self.spans.append((len(rows), len(picked)))
            rows += picked
            firsts.append(n)
            n += T
        self.n, dev = n, m.device
        heads = torch.arange(2 * m.n_kv)
        write = (torch.tensor(slot_of)[:, None] * (2 * m.n_kv) + heads) * L + torch.tensor(cache_pos)[:, None]
        self.ids, self.pos = torch.tensor(ids, device=dev), torch.tensor(pos, device=dev)
        self.write = write.flatten().to(dev)
        self.rows = torch.tensor(rows, dtype=torch.long, device=dev)
        self.groups = [_Group([items[i] for i in part], [firsts[i] for i in part], m) for part in _parts(items)]


def _parts(items: list[Item], long: int = 32) -> list[list[int]]:
    """The items of each attention call. Queries of one call are padded to its longest item, so: items scoring
    more than `long` tokens (prefill chunks) get a call each; the rest share one call, unless only a few of them
    score a draft. Then the decoding items (one token each) share a call and each draft gets its own: one request
    drafting 4 tokens beside 15 decoding ones would otherwise pay for 5 query rows per request over every cache
    (measured with the shipped target, 16 requests x 300 cached tokens, per layer: 2.5 ms padded, 1.0-1.1 ms
    split; with every request drafting, one padded call stays the cheaper, 2.9 ms against 5 ms)."""
    short = [i for i, it in enumerate(items) if len(it.tokens) <= long]
    drafts = [i for i in short if len(items[i].tokens) > 1]
    if drafts and drafts_split(len(drafts), len(short)):
        parts = [[i for i in short if len(items[i].tokens) == 1]] + [[i] for i in drafts]
    else:
        parts = [short] if short else []
    return parts + [[i] for i, it in enumerate(items) if len(it.tokens) > long]


class _Group:
    """One attention call: queries padded to [B, nq, Tmax, hd] over the slot range lo..lo+B, mask [B, 1, Tmax, E];
    src [n]: the group's flat tokens, dest [n]: their rows in the padded [B * Tmax] layout."""

    def __init__(self, items: list[Item], firsts: list[int], m: LeanLlama) -> None:
        slots = [it.session.slot for it in items]
        self.lo = min(slots)
        self.b, self.t = max(slots) - self.lo + 1, max(len(it.tokens) for it in items)
        self.e = max(it.session.length + len(it.tokens) for it in items)
        visible = torch.zeros(self.b, self.t, self.e, dtype=torch.bool)
        src, dest = [], []
        for it, slot, first in zip(items, slots, firsts):
            T, start, b = len(it.tokens), it.session.length, slot - self.lo
            seen = torch.ones(T, T, dtype=torch.bool).tril() if it.parents is None else tree_visibility(it.parents)
            visible[b, :T, :start] = True
            visible[b, :T, start: start + T] = seen
            src += range(first, first + T)
            dest += range(b * self.t, b * self.t + T)
        visible[..., 0] |= ~visible.any(-1)        # padding rows see one key: no all-masked row, no NaN
        mask = torch.zeros(self.b, 1, self.t, self.e, dtype=m.attn_dtype)
        self.mask = mask.masked_fill_(~visible[:, None], float("-inf")).to(m.device)
        self.src, self.dest = torch.tensor(src, device=m.device), torch.tensor(dest, device=m.device)
