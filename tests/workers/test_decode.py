"""The decode loop: max_tokens at a draft boundary, EOS inside a draft, rollback after partial acceptance, stop
strings, and an arm that fails mid-request falling back to AR."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from metaspec.workers import registry
from metaspec.workers.decode import decode
from metaspec.workers.engine import Chunk, Request, Result
from metaspec.workers.model import ModelConfig, load_model
from metaspec.workers.proposers.ar import ARProposer
from metaspec.workers.registry import Arm, ArmContext, arms, build
from metaspec.workers.types import DecodeStats, Draft, SamplingParams, Verdict

from ..conftest import local_resources, missing_requirements

GREEDY = SamplingParams(max_tokens=40)
PROMPT = [17, 250, 31, 99, 4, 17, 250, 64, 12, 300, 17, 250]
ARMS = sorted(arms())


@pytest.fixture(scope="module")
def models(tiny_pair):
    return load_model(ModelConfig(tiny_pair.target)), load_model(ModelConfig(tiny_pair.drafter))


def run(target, proposer, params=GREEDY, prompt=PROMPT, eos_ids=frozenset(), k=8, stats=None) -> list[int]:
    capacity = len(prompt) + params.max_tokens + k + 1   # what the engine allocates
    session = target.session(capacity)
    return [t for step in decode(session, proposer, prompt, params, None, eos_ids, capacity, k, stats) for t in step]


@pytest.fixture(scope="module")
def ar_out(models) -> list[int]:
    out = run(models[0], ARProposer())
    assert len(out) == GREEDY.max_tokens
    return out


@dataclass
class Scripted:
    """Drafts from a known continuation `oracle` (prompt + output), optionally wrong or misbehaving on purpose."""

    oracle: list[int]
    length: int = 4                               # draft length asked for (capped by k unless ignore_k)
    corrupt: frozenset[int] = frozenset()         # sequence positions whose drafted token is made wrong
    ignore_k: bool = False                        # draft `length` tokens even when k (the budget) is smaller
    raise_in_propose_at: int | None = None        # call number at which propose raises
    raise_in_observe_at: int | None = None
    calls: int = 0
    verdicts: list[Verdict] = field(default_factory=list)

    def propose(self, seq: list[int], k: int) -> Draft:
        self.calls += 1
        if self.calls == self.raise_in_propose_at:
            raise RuntimeError("drafter went away")
        n = self.length if self.ignore_k else min(k, self.length)
        start = len(seq)
        tokens = self.oracle[start: start + n]
        return Draft([(t + 1) % 512 if start + i in self.corrupt else t for i, t in enumerate(tokens)])

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        if self.calls == self.raise_in_observe_at:
            raise KeyError("lost track")


# --- max_tokens ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 2, 4, 5, 6, 9, 10, 11])
def test_max_tokens_exact_when_drafts_are_all_accepted(models, ar_out, max_tokens):
    params = SamplingParams(max_tokens=max_tokens)
    proposer = Scripted(PROMPT + ar_out, length=4)
    stats = DecodeStats()
    assert run(models[0], proposer, params, stats=stats) == ar_out[:max_tokens]
    assert stats.emitted == max_tokens and stats.accepted == stats.drafted


@pytest.mark.parametrize("max_tokens", [1, 3, 5, 7])
def test_max_tokens_exact_when_a_draft_is_longer_than_the_budget(models, ar_out, max_tokens):
    """A draft that overshoots the remaining budget is cut in verification; nothing past max_tokens leaks out."""
    params = SamplingParams(max_tokens=max_tokens)
    proposer = Scripted(PROMPT + ar_out, length=6, ignore_k=True)
    assert run(models[0], proposer, params, k=6) == ar_out[:max_tokens]


@pytest.mark.parametrize("method", ARMS)
@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_every_arm_emits_exactly_max_tokens(tiny_engine, method, max_tokens):
    if method not in tiny_engine.available_methods():
        pytest.skip(f"arm {method!r} needs resources the test engine lacks")
    prompt = "import os\nimport sys\nimport os\nimport"
    result = tiny_engine.generate(Request(prompt=prompt, params=SamplingParams(max_tokens=max_tokens), method=method))
    assert len(result.token_ids) == max_tokens and result.finish_reason == "length"


# --- EOS ----------------------------------------------------------------------------------------------------------

def _eos_inside_second_draft(ar_out: list[int]) -> int:
    """Index of a token that first occurs inside the second 4-token draft: the prompt's last chunk emits token 0,
    the first draft's step tokens 1..5, the second draft covers positions 6..9."""
    for j in (7, 8, 9):
        if ar_out[j] not in ar_out[:j]:
            return j
    pytest.fail(f"no fresh token at positions 7..9 of {ar_out}")


def test_eos_inside_an_accepted_draft_ends_the_output_there(models, ar_out):
    j = _eos_inside_second_draft(ar_out)
    eos = frozenset({ar_out[j]})
    stats = DecodeStats()
    proposer = Scripted(PROMPT + ar_out, length=4)
    out = run(models[0], proposer, eos_ids=eos, stats=stats)
    assert out == ar_out[: j + 1] == run(models[0], ARProposer(), eos_ids=eos)
    assert stats.steps == 3, "EOS was drafted in the second draft (step 3), so decoding should stop after it"
    assert proposer.verdicts[-1].emitted[-1] == ar_out[j]


def test_eos_is_ignored_with_ignore_eos(models, ar_out):
    j = _eos_inside_second_draft(ar_out)
    params = SamplingParams(max_tokens=GREEDY.max_tokens, ignore_eos=True)
    out = run(models[0], Scripted(PROMPT + ar_out), params, eos_ids=frozenset({ar_out[j]}))
    assert out == ar_out


@pytest.mark.parametrize("method", ARMS)
def test_every_arm_stops_at_eos_like_ar(models, ar_out, method):
    target, drafter = models
    resources = local_resources(target.vocab_size)
    if reason := missing_requirements(method, resources):
        pytest.skip(reason)
    for j in sorted({3, _eos_inside_second_draft(ar_out), 20}):
        eos = frozenset({ar_out[j]})
        want = run(target, ARProposer(), eos_ids=eos)
        capacity = len(PROMPT) + GREEDY.max_tokens + 9
        session = target.session(capacity)
        proposer = build(method, ArmContext(target=target, params=GREEDY, drafter=drafter, target_session=session,
                                            resources=resources))
        got = [t for s in decode(session, proposer, PROMPT, GREEDY, None, eos, capacity, 8) for t in s]
        assert got == want and got[-1] == ar_out[j], (method, j)


# --- rollback after partial acceptance -----------------------------------------------------------------------------

@pytest.mark.parametrize("corrupt", [{14, 19, 20, 33}, {13}, set(range(12, 60))])
def test_partial_acceptance_rolls_the_cache_back(models, ar_out, corrupt):
    """Rejected draft positions were written into the KV cache; if rollback misses them the output drifts."""
    stats = DecodeStats()
    proposer = Scripted(PROMPT + ar_out, length=5, corrupt=frozenset(corrupt))
    assert run(models[0], proposer, stats=stats) == ar_out
    assert stats.accepted < stats.drafted
    assert any(0 < v.accepted < 5 for v in proposer.verdicts) or corrupt == set(range(12, 60))


# --- what every proposer observes ------------------------------------------------------------------------------

def test_every_verdict_carries_what_the_target_scored(models, ar_out):
    """observe gets [last, *draft] and the target's raw logits after each: the same data for every proposer."""
    target = models[0]
    proposer = Scripted(PROMPT + ar_out, length=3, corrupt=frozenset({14, 20}))
    assert run(target, proposer) == ar_out
    seq, reference = PROMPT + ar_out[:1], target.session(len(PROMPT) + 60)   # token 0 came with the prompt's
    reference.forward(PROMPT)                                                 # last chunk, observed by no arm
    for v in proposer.verdicts:
        assert v.scored[0] == seq[-1] and len(v.scored) == v.logits.shape[0] and v.logits.shape[1] == 512
        assert v.logits[: v.accepted + 1].argmax(-1).tolist() == v.emitted       # greedy: argmax rows are AR's
        want = reference.forward(v.scored)                                       # the same forward, done again
        assert (v.logits - want).abs().max() < 1e-4
        reference.rollback(len(seq) + v.accepted)
        seq += v.emitted
    assert any(len(v.scored) > v.accepted + 1 for v in proposer.verdicts)        # rejected rows are carried too


def test_a_constrained_verdict_carries_the_draft_as_pruned(tiny_engine):
    from metaspec.workers.constraint import ConstraintSpec

    tok = tiny_engine.tokenizer
    a, c, x = (tok.convert_tokens_to_ids([t])[0] for t in "acx")

    class Junk(Scripted):
        def propose(self, seq, k):
            self.calls += 1
            return Draft([c, x, c][:k])

    params = SamplingParams(max_tokens=4)
    constraint = tiny_engine.grammars.start(ConstraintSpec("regex", "(a|b)c+"), params, ())
    proposer = Junk([])
    session = tiny_engine.target.session(64)
    prompt = tok.encode("x", add_special_tokens=False)
    list(decode(session, proposer, prompt, params, None, tiny_engine.eos_ids, 64, 8, None, constraint))
    first = proposer.verdicts[0]                       # after the first token (a or b, from the prompt's step)
    assert first.scored[1:] == [c] and first.logits.shape[0] == 2           # x and what follows it were pruned
    assert not torch.isinf(first.logits).any()                              # raw scores, not the grammar's mask


# --- an arm failing mid-request ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["propose", "observe"])
def test_failing_proposer_falls_back_to_ar(models, ar_out, where):
    stats = DecodeStats()
    proposer = Scripted(PROMPT + ar_out, length=3, corrupt=frozenset({16}),
                        **{f"raise_in_{where}_at": 3})
    assert run(models[0], proposer, stats=stats) == ar_out
    assert stats.fallback is not None and ("RuntimeError" in stats.fallback or "KeyError" in stats.fallback)
    assert proposer.calls == 3, "the failed proposer must not be called again"


def test_failing_arm_through_the_engine_records_the_fallback(tiny_engine, monkeypatch):
    class Flaky:
        calls = 0

        def propose(self, seq, k):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("flaky arm broke")
            return Draft(seq[-2:][:k])

        def observe(self, seq, verdict):
            pass

    monkeypatch.setitem(registry._ARMS, "flaky", Arm("flaky", lambda ctx: Flaky(), frozenset(), "test arm"))
    params = SamplingParams(max_tokens=30)
    prompt = "for i in range(10):\n    print(i)\n"
    want = tiny_engine.generate(Request(prompt=prompt, params=params, method="ar"))
    got = tiny_engine.generate(Request(prompt=prompt, params=params, method="flaky"))
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.stats.fallback and "flaky arm broke" in got.stats.fallback
    assert want.stats.fallback is None


# --- draft size: k nodes at most, whatever the proposer returns -----------------------------------------------

class WideTree:
    """Ignores k: a tree of the oracle's next `depth` tokens (the spine) with a wrong sibling under every node."""

    def __init__(self, oracle: list[int], depth: int = 12) -> None:
        self.oracle, self.depth, self.scored = oracle, depth, []

    def propose(self, seq, k):
        truth = self.oracle[len(seq): len(seq) + self.depth]
        tokens, parents = [], []
        for i, t in enumerate(truth):                    # breadth-first enough: parents[i] < i
            parent = -1 if i == 0 else 2 * (i - 1)
            tokens += [t, (t + 1) % 512]
            parents += [parent, parent]
        return Draft(tokens, parents=parents) if tokens else Draft([])

    def observe(self, seq, verdict):
        self.scored.append(len(verdict.scored))


@pytest.mark.parametrize("max_tokens", [3, 9, 40])
def test_an_oversized_tree_draft_is_cut_to_k_nodes_near_max_tokens(models, ar_out, max_tokens):
    """The engine's cache holds prompt + max_tokens + k + 1 positions: a 24-node tree must not overflow it."""
    params, k = SamplingParams(max_tokens=max_tokens), 4
    proposer = WideTree(PROMPT + ar_out + [0] * 20)
    assert run(models[0], proposer, params, k=k) == ar_out[:max_tokens]
    assert max(proposer.scored) <= k + 1 and max(proposer.scored) > 1


def test_an_oversized_tree_draft_near_the_context_end(tiny_engine, monkeypatch):
    oracle: list[int] = []                               # filled below, read by every WideTree built
    monkeypatch.setitem(registry._ARMS, "wide", Arm("wide", lambda ctx: WideTree(oracle), frozenset(), "test arm"))
    context = tiny_engine.target.max_context
    ids = tuple((PROMPT * 200)[: context - 6])
    want = tiny_engine.generate(Request(prompt_ids=ids, params=SamplingParams(max_tokens=48), method="ar"))
    oracle += list(ids) + want.token_ids + [0] * 20
    got = tiny_engine.generate(Request(prompt_ids=ids, params=SamplingParams(max_tokens=48), method="wide"))
    assert got.token_ids == want.token_ids and len(got.token_ids) == 6 and got.stats.fallback is None
    assert got.stats.accepted > 0


def test_draft_head_keeps_a_valid_prefix():
    chain = Draft([4, 5, 6], probs=torch.eye(8)[[4, 5, 6]])
    assert chain.head(5) is chain and chain.head(2).tokens == [4, 5] and chain.head(2).probs.shape == (2, 8)
    tree = Draft([1, 2, 3, 4], parents=[-1, -1, 0, 2])
    cut = tree.head(3)
    assert (cut.tokens, cut.parents) == ([1, 2, 3], [-1, -1, 0]) and tree.head(0).tokens == []


# --- stop strings ---------------------------------------------------------------------------------------------------

STOP_PROMPT = "Question: what is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def full_text(tiny_engine) -> Result:
    return tiny_engine.generate(Request(prompt=STOP_PROMPT, params=SamplingParams(max_tokens=48), method="ar"))


def _stop_string(text: str, start: int) -> str:
    """A 3-character ASCII-alphanumeric substring of `text` at or after `start` (so it is stable to decode)."""
    for i in range(start, len(text) - 3):
        s = text[i: i + 3]
        if s.isascii() and s.isalnum():
            return s
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("method", ARMS)
def test_stop_string_cuts_text(tiny_engine, full_text, method):
    if method not in tiny_engine.available_methods():
        pytest.skip(f"arm {method!r} needs resources the test engine lacks")
    stop = _stop_string(full_text.text, len(full_text.text) // 2)
    cut = full_text.text.find(stop)
    items = list(tiny_engine.stream(Request(prompt=STOP_PROMPT, method=method,
                                            params=SamplingParams(max_tokens=48, stop=("zzzzqq", stop)))))
    result = items[-1]
    assert isinstance(result, Result)
    assert result.text == full_text.text[:cut]
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert result.token_ids == full_text.token_ids[: len(result.token_ids)]
    assert len(result.token_ids) < len(full_text.token_ids)
    chunks = [c for c in items[:-1] if isinstance(c, Chunk)]
    assert "".join(c.text for c in chunks) == result.text, "streamed text must equal the final text"


def test_earliest_stop_string_wins_and_absent_stop_changes_nothing(tiny_engine, full_text):
    late, early = _stop_string(full_text.text, len(full_text.text) * 2 // 3), _stop_string(full_text.text, 2)
    params = SamplingParams(max_tokens=48, stop=(late, early))
    result = tiny_engine.generate(Request(prompt=STOP_PROMPT, params=params, method="ar"))
    assert result.text == full_text.text[: full_text.text.find(early)]
    absent = tiny_engine.generate(Request(prompt=STOP_PROMPT, method="ar",
                                          params=SamplingParams(max_tokens=48, stop=("\x00never\x00",))))
    assert (absent.text, absent.token_ids, absent.finish_reason) == (full_text.text, full_text.token_ids, "length")


# --- context limit ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ARMS)
def test_prompt_near_the_context_end_stops_at_capacity(tiny_engine, method):
    if method not in tiny_engine.available_methods():
        pytest.skip(f"arm {method!r} needs resources the test engine lacks")
    context = tiny_engine.target.max_context
    ids = tuple((PROMPT * 200)[: context - 3])
    result = tiny_engine.generate(Request(prompt_ids=ids, params=SamplingParams(max_tokens=48), method=method))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"
