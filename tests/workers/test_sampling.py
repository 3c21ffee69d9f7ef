"""Lossless sampling: every arm's first two tokens are distributed exactly as the target's, and seeds reproduce.

On a 12-token vocabulary the target's joint distribution of the first two tokens (144 outcomes) is enumerable
from HF's own forward, with temperature / top-k / top-p applied by an independent reference implementation.
Each arm is sampled N times (seeds 0..N-1, so the test is deterministic) and compared with a chi-square
goodness-of-fit test (cells with expected count < 5 pooled): the arm fails when p < ALPHA = 1e-3. A correct arm
would fail with probability 0.1% for an arbitrary choice of seeds; a biased one is caught (see
`test_a_biased_sampler_fails_the_same_check`, where the classic "resample from p after a rejection" bug gives
p-values below 1e-20).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from metaspec.workers import verify as verify_module
from metaspec.workers.decode import decode
from metaspec.workers.engine import Request
from metaspec.workers.model import ModelConfig, load_model
from metaspec.workers.registry import ArmContext, arms, build
from metaspec.workers.types import SamplingParams

from ..conftest import local_resources, missing_requirements

ALPHA = 1e-3
N_SAMPLES = 2500
PROMPT = [1, 4, 8, 10, 1, 4, 8]   # prompt lookup drafts [10, 1, ...]; the target gives 10 probability ~0.46
ARMS = sorted(arms())
PARAMS = {
    "top_k_top_p": SamplingParams(temperature=0.8, top_k=6, top_p=0.9, max_tokens=2),   # first step: 1-token draft
    "temperature": SamplingParams(temperature=1.0, max_tokens=3),   # first step drafts 2 tokens; test tokens 1-2
}


@pytest.fixture(scope="module")
def models(small_vocab_pair):
    from transformers import AutoModelForCausalLM

    target = load_model(ModelConfig(small_vocab_pair.target))
    drafter = load_model(ModelConfig(small_vocab_pair.drafter))
    hf = AutoModelForCausalLM.from_pretrained(small_vocab_pair.target).eval()
    return target, drafter, hf


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] logits → float64 [V] probabilities: temperature, then top-k, then top-p on the renormalised rest."""
    p = (logits.double() / params.temperature).softmax(-1)
    if 0 < params.top_k < len(p):
        p = torch.where(p >= p.topk(params.top_k).values[-1], p, 0.0)
        p = p / p.sum()
    if params.top_p < 1:
        sorted_p, order = p.sort(descending=True)
        keep_sorted = (sorted_p.cumsum(0) - sorted_p) < params.top_p
        p = torch.zeros_like(p).scatter(0, order, sorted_p * keep_sorted)
        p = p / p.sum()
    return p


@torch.no_grad()
def exact_first_two(hf, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """[V, V] target probability of emitting (x1, x2) first."""
    vocab = hf.config.vocab_size
    p1 = reference_probs(hf(input_ids=torch.tensor([prompt])).logits[0, -1], params)              # [V]
    batch = torch.tensor([prompt + [x] for x in range(vocab)])                                     # [V, T+1]
    last = hf(input_ids=batch).logits[:, -1]                                                        # [V, V]
    p2 = torch.stack([reference_probs(row, params) for row in last])                                # [V, V]
    return p1[:, None] * p2


def run_arm(models, method: str, params: SamplingParams, seed: int) -> list[int]:
    target, drafter, _ = models
    capacity = len(PROMPT) + params.max_tokens + 9
    session = target.session(capacity)
    ctx = ArmContext(target=target, params=params, seed=seed, drafter=drafter, target_session=session,
                     resources=local_resources(target.vocab_size))
    proposer = build(method, ctx)
    return [t for step in decode(session, proposer, PROMPT, params, seed, frozenset(), capacity, k=8)
            for t in step]


def first_two_counts(models, method: str, params: SamplingParams, n: int) -> torch.Tensor:
    vocab = models[0].vocab_size
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for seed in range(n):
        out = run_arm(models, method, params, seed)
        assert len(out) == params.max_tokens
        counts[out[0], out[1]] += 1
    return counts


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(chi-square p-value, total variation) of counts against probs; cells with expected < 5 pooled."""
    counts, probs = counts.flatten(), probs.flatten()
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "sampled an outcome the processed target distribution forbids"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    tv = float(0.5 * (counts / n - probs).abs().sum())
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue), tv


def _require(method: str) -> None:
    if reason := missing_requirements(method, local_resources(12)):
        pytest.skip(reason)


def test_the_setup_exercises_acceptance_and_rejection(models):
    """Guard: the drafted token is neither certain nor impossible under the target, so both branches run."""
    _, _, hf = models
    p = exact_first_two(hf, PROMPT, PARAMS["temperature"]).sum(1)
    assert 0.2 < float(p[10]) < 0.8
    assert float((p > 0.01).sum()) >= 4  # not degenerate


@pytest.mark.parametrize("setting", sorted(PARAMS))
@pytest.mark.parametrize("method", ARMS)
def test_first_two_tokens_follow_the_target_distribution(models, method, setting):
    _require(method)
    params = PARAMS[setting]
    counts = first_two_counts(models, method, params, N_SAMPLES)
    p_value, tv = goodness_of_fit(counts, exact_first_two(models[2], PROMPT, params))
    print(f"{method} {setting}: chi-square p={p_value:.3g} TV={tv:.3f}")
    assert p_value > ALPHA, f"{method} under {params}: chi-square p={p_value:.2e}, TV={tv:.3f}"


def test_a_biased_sampler_fails_the_same_check(models, monkeypatch):
    """Resampling from p (instead of the residual max(p - q, 0)) after a rejection inflates the drafted token."""
    monkeypatch.setattr(verify_module, "_residual", lambda p, q: p)
    params = PARAMS["temperature"]
    counts = first_two_counts(models, "sps", params, N_SAMPLES)
    p_value, tv = goodness_of_fit(counts, exact_first_two(models[2], PROMPT, params))
    print(f"biased rejection: chi-square p={p_value:.3g} TV={tv:.3f}")
    assert p_value < ALPHA, (p_value, tv)


def test_a_wrong_temperature_fails_the_same_check(models):
    """Sampling the target at temperature 1.25 while claiming 1.0 is detected too (a subtler bias)."""
    truth = exact_first_two(models[2], PROMPT, PARAMS["temperature"])
    biased = exact_first_two(models[2], PROMPT, SamplingParams(temperature=1.25))
    counts = torch.zeros_like(truth).flatten()
    draws = torch.multinomial(biased.flatten().float(), N_SAMPLES, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    counts.index_add_(0, draws, torch.ones(N_SAMPLES, dtype=counts.dtype))
    p_value, tv = goodness_of_fit(counts.view_as(truth), truth)
    print(f"temperature 1.25 for 1.0: chi-square p={p_value:.3g} TV={tv:.3f}")
    assert p_value < ALPHA


# --- seeds --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ARMS)
def test_same_seed_same_output(models, method):
    _require(method)
    params = SamplingParams(temperature=1.0, top_k=8, top_p=0.95, max_tokens=24)
    for seed in (0, 1, 2):
        assert run_arm(models, method, params, seed) == run_arm(models, method, params, seed)
    outputs = {tuple(run_arm(models, method, params, seed)) for seed in range(6)}
    assert len(outputs) > 1, "different seeds always gave the same output: the seed is not used"


def test_prompt_lookup_reproduces_ar_seeded_samples(models):
    """One-hot drafts keep a node iff it equals the target's own position-keyed draw: same seed, AR's output."""
    params = SamplingParams(temperature=1.0, max_tokens=24)
    for seed in range(10):
        assert run_arm(models, "pld", params, seed) == run_arm(models, "ar", params, seed)


@pytest.mark.parametrize("method", ARMS)
def test_same_seed_same_text_through_the_engine(tiny_engine, method):
    if method not in tiny_engine.available_methods():
        pytest.skip(f"arm {method!r} needs {sorted(arms()[method].requires)}, which the test engine lacks")
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)
    first, second = (tiny_engine.generate(Request(prompt="def add(a, b):", params=params, method=method))
                     for _ in range(2))
    assert first.token_ids == second.token_ids and first.text == second.text


def test_sampled_tokens_stay_inside_top_k(models):
    target, _, hf = models
    params = SamplingParams(temperature=2.0, top_k=3, max_tokens=1)
    with torch.no_grad():
        allowed = set(hf(input_ids=torch.tensor([PROMPT])).logits[0, -1].topk(3).indices.tolist())
    for method in ARMS:
        if missing_requirements(method, local_resources(12)):
            continue
        seen = {run_arm(models, method, params, seed)[0] for seed in range(200)}
        assert seen <= allowed, (method, seen, allowed)
        assert len(seen) == 3, (method, seen)
