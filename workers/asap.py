"""Grammar-aligned sampling (ASAp, Park et al., NeurIPS 2024): undo masked sampling's distortion over repeats.

Masked sampling draws each token from p(t | w) restricted to the tokens the grammar allows, which is not the
target's sequence distribution conditioned on grammaticality: a prefix the model likes but that has few
grammatical continuations gets more mass than it deserves. The exact conditional samples t with weight
p(t | w) * EFG(w t), EFG(w) = P(a continuation of w is grammatical) (the expected future grammaticality).
ASAp starts from the mask as EFG's over-approximation (1 if allowed, 0 if not) and, after every sample,
replaces the approximation along the sampled path by what it has learned:

    EFG~(w) = sum_t p(t | w) * EFG~(w t)       (unvisited allowed children count as 1, a completed sample as 1)

kept in a prefix trie per (prompt, grammar, temperature). Samples drawn with the trie's weights converge to the
grammar-conditioned distribution as the trie fills in. A node stores only the allowed mass of p (`base`) and its
visited children (p of the token, EFG~ of the child), so memory grows with the samples, not with the vocabulary:
EFG~(w) = base + sum over visited t of p(t) * (EFG~(w t) - 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Edge:
    p: float                        # target probability of this token after the parent prefix
    efg: float = 1.0                # EFG~ of the child prefix (1 = the mask's over-approximation)
    node: Node | None = None        # the child prefix, once a sample has gone past it


@dataclass
class Node:
    base: float = 1.0                                      # sum of p over the tokens the grammar allows here
    children: dict[int, Edge] = field(default_factory=dict)

    def efg(self) -> float:
        return max(0.0, self.base + sum(e.p * (e.efg - 1.0) for e in self.children.values()))


class PrefixTrie:
    """ASAp's memory for one (prompt, grammar, sampling temperature): EFG~ of every prefix sampled so far.

    >>> trie = PrefixTrie()
    >>> trie.record([7, 2], bases=[0.5, 0.9], token_probs=[0.25, 0.9], terminal=True)   # sampled "7 EOS"
    >>> trie.node([]).children[7].efg, round(trie.node([]).efg(), 3)                      # EFG~(7) = 0.9
    (0.9, 0.475)
    """

    def __init__(self) -> None:
        self.root, self.samples, self.nodes = Node(), 0, 1

    def node(self, prefix: Sequence[int], start: Node | None = None) -> Node | None:
        """The node of `prefix` (relative to `start`, default the root), or None if no sample went there."""
        node = start or self.root
        for t in prefix:
            edge = node.children.get(t)
            if edge is None or edge.node is None:
                return None
            node = edge.node
        return node

    def record(self, path: Sequence[int], bases: Sequence[float], token_probs: Sequence[float],
               terminal: bool) -> None:
        """Learn from one sample: at position i the target gave p(path[i]) = token_probs[i] and the grammar
        allowed mass bases[i]. `terminal`: the sample ended with EOS (grammatical), so its last edge is exact."""
        if not path:
            return
        nodes, node = [], self.root
        for i, (t, b, p) in enumerate(zip(path, bases, token_probs)):
            node.base = b
            edge = node.children.setdefault(t, Edge(p))
            edge.p = p
            nodes.append(node)
            if i + 1 < len(path):
                if edge.node is None:
                    edge.node, self.nodes = Node(), self.nodes + 1
                node = edge.node
        last = nodes[-1].children[path[len(nodes) - 1]]
        last.efg = 1.0 if terminal else (last.node.efg() if last.node is not None else last.efg)
        for i in range(len(nodes) - 2, -1, -1):                   # bottom-up along the path
            nodes[i].children[path[i]].efg = nodes[i + 1].efg()
        self.samples += 1

    def weights(self, node: Node | None, allowed: torch.Tensor) -> torch.Tensor:
        """[V] EFG~ of every next token at `node`: the mask, with the visited children's learned values."""
        efg = allowed.float()
        if node is not None:
            for t, edge in node.children.items():
                efg[t] = edge.efg if allowed[t] else 0.0
        return efg

    def log_bias(self, node: Node | None, allowed: torch.Tensor) -> dict[int, float]:
        """{token: log EFG~} for the visited children (the rest of the row is the plain mask)."""
        if node is None:
            return {}
        return {t: math.log(e.efg) if e.efg > 0 else -math.inf for t, e in node.children.items() if allowed[t]}


def asap_sample(next_probs: Callable[[list[int]], torch.Tensor], allowed: Callable[[list[int]], torch.Tensor],
                trie: PrefixTrie, eos: int, max_len: int, generator: torch.Generator | None) -> list[int]:
    """One ASAp sample, token by token (the reference the serving path reproduces inside the decode loop).

    next_probs(prefix) -> [V] target distribution; allowed(prefix) -> [V] bool grammar mask. With an empty trie
    this is plain masked sampling; `trie` learns from the sample before it is returned.
    """
    path, bases, token_probs, node = [], [], [], trie.root
    while len(path) < max_len:
        p, ok = next_probs(path), allowed(path)
        w = p * trie.weights(node, ok)                                               # [V]
        t = int(torch.multinomial(w / w.sum(), 1, generator=generator))
        path.append(t)
        bases.append(float(p[ok].sum()))
        token_probs.append(float(p[t]))
        if t == eos:
            break
        node = trie.node([t], node) if node is not None else None
    trie.record(path, bases, token_probs, terminal=bool(path) and path[-1] == eos)
    return path


def masked_sample(next_probs: Callable[[list[int]], torch.Tensor], allowed: Callable[[list[int]], torch.Tensor],
                  eos: int, max_len: int, generator: torch.Generator | None) -> list[int]:
    """Plain masked sampling (what every grammar-constrained sampler does): the baseline ASAp corrects."""
    path: list[int] = []
    while len(path) < max_len and (not path or path[-1] != eos):
        w = next_probs(path) * allowed(path).float()
        path.append(int(torch.multinomial(w / w.sum(), 1, generator=generator)))
    return path


def path_probability(path: Sequence[int], next_probs: Callable[[list[int]], torch.Tensor],
                     allowed: Callable[[list[int]], torch.Tensor], trie: PrefixTrie | None = None) -> float:
    """Probability that the next sample is exactly `path` (EOS included): ASAp with `trie`, masked if None."""
    out, node = 1.0, trie.root if trie is not None else None
    for i, t in enumerate(path):
        ok = allowed(list(path[:i]))
        w = next_probs(list(path[:i])) * (trie.weights(node, ok) if trie is not None else ok.float())   # [V]
        out *= float(w[t] / w.sum())
        node = trie.node([t], node) if node is not None else None
    return out
