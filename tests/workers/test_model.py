"""Model sessions: the lean Llama forward equals HF's logits; chunked forwards and rollback equal one full forward."""

from __future__ import annotations

import pytest
import torch

from metaspec.workers.model import HFModel, LeanLlama, ModelConfig, load_model

from ..conftest import llama_config, random_llama

FP32_ATOL = 1e-4

LLAMA_SHAPES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "mha_theta": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0, num_hidden_layers=3),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
}


def _llama(shape: str, seed: int = 0):
    return random_llama(llama_config(97, max_position_embeddings=128, **LLAMA_SHAPES[shape]), seed=seed)


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    conf = GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1)
    return GPT2LMHeadModel(conf).eval()


def _tokens(n: int, seed: int, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([tokens])).logits[0].float()   # [T, V]


def _chunked(session, tokens: list[int], cuts: list[int]) -> torch.Tensor:
    bounds = [0, *cuts, len(tokens)]
    return torch.cat([session.forward(tokens[a:b]) for a, b in zip(bounds, bounds[1:])])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


# --- lean Llama vs HF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", sorted(LLAMA_SHAPES))
def test_lean_llama_logits_equal_hf_fp32(shape):
    hf = _llama(shape)
    assert LeanLlama.supports(hf.config)
    tokens = _tokens(40, seed=1)
    lean = LeanLlama(hf).session(64).forward(tokens)
    assert _max_diff(lean, _hf_logits(hf, tokens)) < FP32_ATOL


@pytest.mark.parametrize("shape", ["gqa", "mqa_tied"])
def test_lean_llama_logits_close_to_hf_bf16(shape):
    """bf16 rounding differs between the two forwards, so compare each one's error against the fp32 truth."""
    hf = _llama(shape)
    tokens = _tokens(40, seed=2)
    truth = _hf_logits(hf, tokens)
    hf16 = hf.to(torch.bfloat16)
    lean_err = _max_diff(LeanLlama(hf16).session(64).forward(tokens), truth)
    hf_err = _max_diff(_hf_logits(hf16, tokens), truth)
    scale = float(truth.abs().max())
    assert lean_err < 0.05 * scale, (lean_err, scale)
    assert lean_err < 3 * hf_err + 1e-2, (lean_err, hf_err)


def test_lean_llama_early_exit_equals_hf_hidden_state_through_head():
    hf = _llama("mha_theta")
    tokens = _tokens(20, seed=3)
    with torch.no_grad():
        hidden = hf(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states   # L+1 x [1, T, H]
        want = hf.lm_head(hf.model.norm(hidden[1]))[0]
    got = LeanLlama(hf).session(64).forward(tokens, exit_layer=1)
    assert _max_diff(got, want) < FP32_ATOL


# --- incremental forward and rollback, both backends -------------------------------------------------------------

BACKENDS = ["lean_llama", "hf_llama", "hf_gpt2"]


def _backend(name: str):
    """(HF module as the reference, our Model over it)."""
    hf = _gpt2() if name == "hf_gpt2" else _llama("gqa")
    return hf, LeanLlama(hf) if name == "lean_llama" else HFModel(hf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_forward_equals_full_forward(backend):
    hf, model = _backend(backend)
    tokens = _tokens(30, seed=4)
    full = _hf_logits(hf, tokens)
    session = model.session(64)
    got = _chunked(session, tokens, cuts=[7, 8, 13, 14, 15, 22])
    assert session.length == len(tokens)
    assert _max_diff(got, full) < FP32_ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_then_forward_equals_fresh_forward(backend):
    """Partial acceptance: score a draft, keep a prefix of it, continue with other tokens — as if never drafted."""
    hf, model = _backend(backend)
    prefix, rejected, replacement = _tokens(12, seed=5), _tokens(9, seed=6), _tokens(6, seed=7)
    session = model.session(64)
    session.forward(prefix)
    session.forward(rejected)                       # 9 positions scored ...
    session.rollback(len(prefix) + 3)               # ... 3 of them kept
    assert session.length == len(prefix) + 3
    got = session.forward(replacement)
    seq = prefix + rejected[:3] + replacement
    assert _max_diff(got, _hf_logits(hf, seq)[-len(replacement):]) < FP32_ATOL
    # a second rollback into the prompt, then one token at a time
    session.rollback(5)
    again = torch.cat([session.forward([t]) for t in replacement])
    assert _max_diff(again, _hf_logits(hf, prefix[:5] + replacement)[5:]) < FP32_ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_sessions_of_one_model_are_independent(backend):
    hf, model = _backend(backend)
    a_tokens, b_tokens = _tokens(10, seed=8), _tokens(10, seed=9)
    a, b = model.session(32), model.session(32)
    a_logits = [a.forward(a_tokens[:5])]
    b_logits = [b.forward(b_tokens[:5])]
    a_logits.append(a.forward(a_tokens[5:]))
    b_logits.append(b.forward(b_tokens[5:]))
    assert _max_diff(torch.cat(a_logits), _hf_logits(hf, a_tokens)) < FP32_ATOL
    assert _max_diff(torch.cat(b_logits), _hf_logits(hf, b_tokens)) < FP32_ATOL


def test_lean_session_refuses_to_overflow_its_cache():
    session = LeanLlama(_llama("gqa")).session(8)
    session.forward(_tokens(6, seed=10))
    with pytest.raises(ValueError, match="KV cache full"):
        session.forward(_tokens(3, seed=11))


# --- load_model ----------------------------------------------------------------------------------------------------

def test_load_model_picks_the_forward_by_architecture(tmp_path):
    _llama("gqa").save_pretrained(tmp_path / "llama")
    _gpt2().save_pretrained(tmp_path / "gpt2")
    lean = load_model(ModelConfig(str(tmp_path / "llama")))
    assert isinstance(lean, LeanLlama)
    assert (lean.vocab_size, lean.max_context, lean.num_layers) == (97, 128, 2)
    assert isinstance(load_model(ModelConfig(str(tmp_path / "llama"), lean=False)), HFModel)
    gpt2 = load_model(ModelConfig(str(tmp_path / "gpt2")))
    assert isinstance(gpt2, HFModel)
    assert (gpt2.vocab_size, gpt2.max_context) == (97, 128)
    with pytest.raises(ValueError, match="dtype"):
        load_model(ModelConfig(str(tmp_path / "llama"), dtype="float8"))


def test_loaded_lean_model_matches_hf_from_disk(tmp_path):
    hf = _llama("mqa_tied", seed=3)
    hf.save_pretrained(tmp_path)
    tokens = _tokens(25, seed=12)
    got = load_model(ModelConfig(str(tmp_path))).session(32).forward(tokens)
    assert _max_diff(got, _hf_logits(hf, tokens)) < FP32_ATOL


@pytest.mark.parametrize("drafting", [1, 2, 5, 6])
def test_a_drafts_logits_do_not_depend_on_how_attention_is_split(drafting):
    """Six sequences in one forward, `drafting` of them scoring a 4-token draft, the rest one token: with few drafts
    each gets an attention call of its own (no padding of the decoding rows), with many one padded call serves
    all. Either way every item's logits equal HF's over its whole sequence."""
    from metaspec.workers.kv import Item, forward_batch
    from metaspec.workers.lean import _parts

    hf = _llama("gqa")
    pool = LeanLlama(hf, prepack=False).pool(6, 64)
    prompts = [_tokens(7 + 3 * i, seed=20 + i) for i in range(6)]
    sessions = [pool.session() for _ in prompts]
    forward_batch([Item(s, p, rows="none") for s, p in zip(sessions, prompts)])
    new = [_tokens(4 if i < drafting else 1, seed=40 + i) for i in range(6)]
    items = [Item(s, t) for s, t in zip(sessions, new)]
    split = len(_parts(items)) > 1
    assert split == (2 * drafting <= 6)
    for p, t, logits in zip(prompts, new, forward_batch(items)):
        assert _max_diff(logits, _hf_logits(hf, p + t)[len(p):]) < FP32_ATOL


def test_auto_dtype_is_bf16_only_on_cpus_with_native_bf16():
    from metaspec.workers.model import resolve_dtype

    assert resolve_dtype("auto", "cpu", frozenset({"avx2", "fma"})) == "float32"            # AVX2-only
    assert resolve_dtype("auto", "cpu", frozenset({"avx512f", "avx512bw"})) == "float32"    # AVX-512, no bf16
    assert resolve_dtype("auto", "cpu", frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert resolve_dtype("auto", "cpu", frozenset({"amx_tile", "amx_bf16"})) == "bfloat16"
    assert resolve_dtype("float16", "cpu", frozenset()) == "float16"                       # a named dtype stays
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("int4", "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from metaspec.workers.model import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_a_model_loads_with_auto_dtype(tmp_path):
    from metaspec.workers.model import resolve_dtype

    _llama("gqa").save_pretrained(tmp_path / "m")
    model = load_model(ModelConfig(str(tmp_path / "m"), dtype="auto"))
    assert model.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[resolve_dtype("auto")]
