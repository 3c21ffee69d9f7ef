"""Causal LMs behind one small interface: weights load once; KV memory is a pool of slots, one per sequence.

Llama-architecture checkpoints run on the lean forward (workers/lean.py), which batches every sequence of a step
into one forward over its slot pool. Every other architecture runs through `HFModel`: HF's generic forward with
one DynamicCache per sequence (allocated when the sequence binds its slot). HF's forward is NOT batched across
sequences here: a step calls it once per sequence (a ragged batch would need HF's paged cache). Both match HF's
logits (tests/workers/test_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .kv import Item, SlotPool, SlotSession, tree_depths, tree_visibility
from .lean import LeanLlama, LeanPool, _context

__all__ = ["HFModel", "LeanLlama", "LeanPool", "Model", "ModelConfig", "Session", "load_model", "resolve_dtype"]


@dataclass(frozen=True)
class ModelConfig:
    path: str                       # local directory or hub id of an HF causal LM
    dtype: str = "float32"          # "float32" | "bfloat16" | "float16" | "auto" (resolve_dtype): compute dtype
    device: str = "cpu"             # torch device
    lean: bool = True               # use the lean Llama forward when the architecture allows it
    threads: int | None = None      # torch intra-op threads (None = leave as is)
    prepack: bool = True            # CPU fp32/bf16 lean forward: oneDNN GEMMs on weights reordered once at load
    cpu_fp32_attention: bool = True # CPU lean forward of a bf16/fp16 model: fp32 KV cache and SDPA (5-10x faster)


Session = SlotSession   # one sequence's view of a model: forward / rollback / keep (workers/kv.py)


class Model(Protocol):
    vocab_size: int
    max_context: int
    num_layers: int
    device: torch.device

    def session(self, capacity: int) -> SlotSession: ...

    def pool(self, slots: int, slot_tokens: int | None = None) -> SlotPool: ...

    def slot_bytes(self, slot_tokens: int) -> int: ...


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *_DTYPES)
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})   # native bf16 matrix / dot-product instructions


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """This CPU's feature flags (empty where the file does not exist: not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(dtype: str, device: str = "cpu", flags: frozenset[str] | None = None) -> str:
    """The concrete compute dtype for `dtype` on `device`; "auto" picks it from the hardware (as vLLM's
    `--dtype auto` does): on CUDA bfloat16 where the GPU has it, else float16; on a CPU bfloat16 only with native
    bf16 instructions (AMX or AVX512-BF16, `flags` = cpu_flags()), else float32. Without them oneDNN has no bf16
    GEMM: on an AVX2-only AMD EPYC (2026-12-04, shipped 31.5M target, 1 thread, 256 cached) a bf16 forward of
    one token took 15.9 ms against fp32's 23.9, but of 9 tokens 78.8 against 34.9 and a 256-token prefill
    1,944 ms against 331, so every speculative arm and every prompt would run slower there. The lossless contract
    is tested in fp32: in bf16 a batched forward and a one-token forward may round a near-tie differently."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
        return dtype
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    if torch.device(device).type != "cpu":
        return "float32"
    return "bfloat16" if (cpu_flags() if flags is None else flags) & CPU_BF16_FLAGS else "float32"


def load_model(cfg: ModelConfig) -> Model:
    """Load an HF causal LM; Llama-architecture checkpoints get the lean forward when `cfg.lean`."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hf = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_DTYPES[dtype]).to(cfg.device).eval()
    if cfg.lean and LeanLlama.supports(hf.config):
        model = LeanLlama(hf, prepack=cfg.prepack, cpu_fp32_attention=cfg.cpu_fp32_attention)
    else:
        model = HFModel(hf)
    model.source = cfg  # lets another process load the same weights (pearl's drafter process)
    return model


class HFModel:
    """Any HF causal LM; each sequence's cache is a DynamicCache cropped on rollback."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.vocab_size = int(hf.config.vocab_size)
        self.max_context = _context(hf.config)
        self.num_layers = int(getattr(hf.config, "num_hidden_layers", 0))
        self.device = hf.device

    def session(self, capacity: int) -> SlotSession:
        return self.pool(1, min(capacity, self.max_context)).session()

    def pool(self, slots: int, slot_tokens: int | None = None) -> HFPool:
        return HFPool(self.hf, slots, min(slot_tokens or self.max_context, self.max_context))

    def slot_bytes(self, slot_tokens: int) -> int:
        return 0   # DynamicCache grows per sequence: not part of the pool's fixed memory


class HFPool(SlotPool):
    """Slots bound to per-sequence DynamicCaches; `forward` runs HF's forward once per item (not batched)."""

    num_layers = 0      # no early exit through HF's forward
    mem_bytes = 0

    def __init__(self, hf, slots: int, slot_tokens: int) -> None:
        super().__init__(slots, slot_tokens)
        self.hf = hf

    def on_bind(self, session: SlotSession) -> None:
        from transformers import DynamicCache

        session.state = DynamicCache(config=self.hf.config)

    @torch.inference_mode()
    def forward(self, items: list[Item], exit_layer: int | None) -> list[torch.Tensor | None]:
        if exit_layer is not None:
            raise ValueError("early exit needs the lean Llama forward")
        return [self._one(it) for it in items]

    def _one(self, it: Item) -> torch.Tensor | None:
        s, dev, T = it.session, self.hf.device, len(it.tokens)
        start = s.length
        if T == 0:
            raise ValueError("nothing to score")
        if start + T > s.capacity:
            raise ValueError(f"KV cache full: {start + T} > {s.capacity} positions")
        extra = {}
        if it.parents is not None:  # 4D additive mask [1, 1, T, start + T] and tree positions
            pos = torch.tensor(tree_depths(it.parents), device=dev) + start
            visible = torch.cat([torch.ones(T, start, dtype=torch.bool), tree_visibility(it.parents)], 1).to(dev)
            mask = torch.zeros(visible.shape, dtype=self.hf.dtype, device=dev)
            extra = {"attention_mask": mask.masked_fill(~visible, torch.finfo(mask.dtype).min)[None, None],
                     "position_ids": pos[None]}
        out = self.hf(input_ids=torch.tensor([it.tokens], device=dev), past_key_values=s.state, use_cache=True,
                      cache_position=torch.arange(start, start + T, device=dev), **extra)
        s.length += T
        logits = out.logits[0].float()                                          # [T, V]
        return {"all": logits, "last": logits[-1:], "none": None}[it.rows]

    def crop(self, session: SlotSession, length: int) -> None:
        if length < session.state.get_seq_length():  # a negative count removes that many positions
            session.state.crop(length - session.state.get_seq_length())

    @torch.inference_mode()
    def keep(self, session: SlotSession, slots: list[int], at: int) -> None:
        index = torch.tensor(slots, device=self.hf.device)
        for layer in session.state.layers:
            n = len(slots)
            layer.keys[..., at: at + n, :] = layer.keys.index_select(-2, index)
            layer.values[..., at: at + n, :] = layer.values.index_select(-2, index)
