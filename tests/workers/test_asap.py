"""Grammar-aligned sampling (ASAp) converges to the grammar-conditioned distribution; masked sampling does not.

A random Llama over a 5-token vocabulary (a, b, c, d, EOS) and a regular language small enough to enumerate:
the exact target is P(y | y in L) = P(y) / sum over L, computed from the model. The grammar check is a Python
regex over token letters here; the serving path (llguidance, the engine) is tested at the end on the tiny pair.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import pytest
import torch

from metaspec.workers.asap import PrefixTrie, asap_sample, masked_sample, path_probability
from metaspec.workers.constraint import ConstraintSpec
from metaspec.workers.engine import Request
from metaspec.workers.types import RequestError, SamplingParams

from ..conftest import llama_config, random_llama

CHARS, EOS = "abcd", 4
PATTERN = r"(ab|ba)(c|dd)?"           # 6 words
PROMPT = [0]


class Toy:
    """next-token distributions of the tiny model (memoised: the language has few prefixes) and the grammar."""

    def __init__(self, seed: int = 0) -> None:
        conf = llama_config(5, hidden_size=32, intermediate_size=64, max_position_embeddings=32,
                            initializer_range=0.05, bos_token_id=0, eos_token_id=EOS, pad_token_id=EOS)
        self.model, self.memo = random_llama(conf, seed=seed), {}
        self.words = [w for n in range(1, 5) for w in map("".join, itertools.product(CHARS, repeat=n))
                      if re.fullmatch(PATTERN, w)]
        self.prefixes = {w[:i] for w in self.words for i in range(len(w) + 1)}

    def next_probs(self, prefix: list[int]) -> torch.Tensor:
        key = tuple(prefix)
        if key not in self.memo:
            with torch.no_grad():
                self.memo[key] = self.model(torch.tensor([PROMPT + prefix])).logits[0, -1].float().softmax(-1)
        return self.memo[key]

    def allowed(self, prefix: list[int]) -> torch.Tensor:
        s = self.text(prefix)
        return torch.tensor([s + c in self.prefixes for c in CHARS] + [s in self.words])

    @staticmethod
    def text(path: list[int]) -> str:
        return "".join(CHARS[t] for t in path if t != EOS)

    def tokens(self, word: str) -> list[int]:
        return [CHARS.index(c) for c in word] + [EOS]

    def exact(self) -> dict[str, float]:
        """The target's sequence distribution restricted to the language and renormalised."""
        mass = {w: path_probability(self.tokens(w), self.next_probs, lambda _: torch.ones(5, dtype=torch.bool))
                for w in self.words}
        total = sum(mass.values())
        return {w: m / total for w, m in mass.items()}


def kl(exact: dict[str, float], q: dict[str, float]) -> float:
    return sum(p * math.log(p / q[w]) for w, p in exact.items() if p > 0)


def empirical(samples: list[str], words: list[str]) -> dict[str, float]:
    """Add-1/2 smoothed frequencies over the language (an unseen word must not make KL infinite)."""
    counts = Counter(samples)
    total = len(samples) + 0.5 * len(words)
    return {w: (counts[w] + 0.5) / total for w in words}


@pytest.fixture(scope="module")
def toy() -> Toy:
    torch.set_num_threads(1)
    return Toy()


def test_the_setting_distorts_masked_sampling(toy):
    exact = toy.exact()
    masked = {w: path_probability(toy.tokens(w), toy.next_probs, toy.allowed) for w in toy.words}
    assert len(toy.words) == 6 and abs(sum(masked.values()) - 1) < 1e-5
    assert kl(exact, masked) > 0.3, "masked sampling is nearly exact here: the test would show nothing"


def test_asap_sampling_distribution_converges(toy):
    """The exact distribution ASAp samples from after n samples: masked at n = 0, exact once every prefix of the
    language has been sampled (here within 10 samples). Not monotone sample by sample: one sample can fix one
    branch's weight while its sibling still carries the mask's over-approximation."""
    exact, trie, gen = toy.exact(), PrefixTrie(), torch.Generator().manual_seed(0)
    curve = {}
    for n in range(401):
        if n in (0, 5, 20, 100, 400):
            curve[n] = kl(exact, {w: path_probability(toy.tokens(w), toy.next_probs, toy.allowed, trie)
                                  for w in toy.words})
        path = asap_sample(toy.next_probs, toy.allowed, trie, EOS, 8, gen)
        assert toy.text(path) in toy.words and path[-1] == EOS
    masked = kl(exact, {w: path_probability(toy.tokens(w), toy.next_probs, toy.allowed) for w in toy.words})
    assert curve[0] == pytest.approx(masked)
    assert curve[5] < 0.8 * curve[0], curve
    assert max(curve[20], curve[100], curve[400]) < 1e-3 * curve[0], curve


def test_empirical_kl_falls_for_asap_and_stays_for_masked_sampling(toy):
    exact, trie, gen = toy.exact(), PrefixTrie(), torch.Generator().manual_seed(1)
    n, window = 2000, 400
    asap = [toy.text(asap_sample(toy.next_probs, toy.allowed, trie, EOS, 8, gen)) for _ in range(n)]
    masked = [toy.text(masked_sample(toy.next_probs, toy.allowed, EOS, 8, gen)) for _ in range(n)]
    first_asap = kl(exact, empirical(asap[:50], toy.words))
    last_asap = kl(exact, empirical(asap[-window:], toy.words))
    first_masked = kl(exact, empirical(masked[:window], toy.words))
    last_masked = kl(exact, empirical(masked[-window:], toy.words))
    assert last_asap < 0.03 and last_asap < 0.25 * first_asap, (first_asap, last_asap)
    assert last_masked > 0.3 and last_masked > 0.5 * first_masked, (first_masked, last_masked)
    assert set(asap) <= set(toy.words) and set(masked) <= set(toy.words)


def test_trie_update_is_the_expected_future_grammaticality():
    trie = PrefixTrie()
    trie.record([1, 2, EOS], bases=[0.5, 0.4, 0.3], token_probs=[0.2, 0.1, 0.3], terminal=True)
    node_1 = trie.node([1])
    node_12 = trie.node([1, 2])
    assert node_12.efg() == pytest.approx(0.3)                       # only EOS allowed after "1 2"
    assert node_1.efg() == pytest.approx(0.4 + 0.1 * (0.3 - 1))      # unvisited allowed children still count 1
    assert trie.root.efg() == pytest.approx(0.5 + 0.2 * (node_1.efg() - 1))
    allowed = torch.tensor([True, True, False, False, True])
    assert trie.weights(trie.root, allowed).tolist() == pytest.approx([1.0, node_1.efg(), 0, 0, 1.0])
    trie.record([1, 3], bases=[0.5, 0.4], token_probs=[0.2, 0.05], terminal=False)   # cut by max_tokens
    assert node_1.children[3].efg == 1.0 and node_1.efg() == pytest.approx(0.4 + 0.1 * (0.3 - 1))


# ---- the serving path: llguidance masks + the decode loop, through the engine -------------------------------

def test_engine_asap_converges_on_the_tiny_pair(tiny_engine):
    """Repeated aligned requests move the engine's own sampling distribution towards the exact one."""
    spec = ConstraintSpec("regex", "(yes|no|maybe)", aligned=True)
    params = SamplingParams(temperature=1.0, max_tokens=16)
    prompt = tuple(tiny_engine.tokenizer.encode("Answer:", add_special_tokens=False))
    session = tiny_engine.target.session(64)
    memo: dict[tuple[int, ...], torch.Tensor] = {}

    def next_probs(prefix: list[int]) -> torch.Tensor:
        if tuple(prefix) not in memo:
            session.rollback(0)
            memo[tuple(prefix)] = (session.forward([*prompt, *prefix])[-1].float() / params.temperature).softmax(-1)
        return memo[tuple(prefix)]

    matcher_of = tiny_engine.grammars.compile(spec).matcher
    sequences, allowed_at = _enumerate(matcher_of, min(tiny_engine.eos_ids), tiny_engine.target.vocab_size)

    def allowed(prefix: list[int]) -> torch.Tensor:
        return allowed_at[tuple(prefix)]

    unmasked = {s: path_probability(s, next_probs, lambda p: torch.ones_like(allowed(p))) for s in sequences}
    exact = {s: m / sum(unmasked.values()) for s, m in unmasked.items()}

    def engine_kl() -> float:
        trie = tiny_engine.grammars.asap_trie(spec, params, prompt)
        return kl(exact, {s: path_probability(s, next_probs, allowed, trie) for s in sequences})

    before = engine_kl()
    texts = [tiny_engine.generate(Request(prompt_ids=prompt, params=SamplingParams(temperature=1.0, max_tokens=16,
                                                                                   seed=i),
                                          method="sps", constraint=spec)).text for i in range(150)]
    after = engine_kl()
    assert set(texts) <= {"yes", "no", "maybe"}
    assert tiny_engine.grammars.asap_trie(spec, params, prompt).samples == 150
    assert before > 0.05 and after < 0.2 * before, (before, after)


def _enumerate(compiled, eos: int, vocab: int) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], torch.Tensor]]:
    """Every token sequence of a finite grammar (EOS included) and the allowed mask after each prefix."""
    from metaspec.workers.constraint import Constraint, ConstraintConfig

    c = Constraint(compiled.deep_copy(), frozenset([eos]), ConstraintConfig())
    sequences, allowed_at = [], {}

    def visit(prefix: tuple[int, ...]) -> None:
        allowed = c._allowed(vocab)
        allowed_at[prefix] = allowed
        for t in allowed.nonzero().flatten().tolist():
            if t == eos:
                sequences.append(prefix + (t,))
            else:
                assert c.m.consume_token(t)
                visit(prefix + (t,))
                c.m.rollback(1)

    visit(())
    return sequences, allowed_at


def test_aligned_needs_plain_sampling(tiny_engine):
    spec = ConstraintSpec("regex", "(yes|no)", aligned=True)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0,
                                                                                                top_k=5)):
        with pytest.raises(RequestError, match="aligned"):
            tiny_engine.generate(Request(prompt="x", params=params, constraint=spec))
