"""Breadth-first candidate trees for table-driven drafters (Token Recycling, the n-gram store).

A static template lists tree nodes in breadth-first order as (parent index or -1 for the root, rank): node i
takes the rank-th candidate that the table offers after its parent's path. `draft_tree` fills a template from
any `next_tokens(path)` lookup; `best_chain` takes the most likely path (rank 0 at every depth), which is what
an arm drafts while verification is chain-only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

Template = tuple[tuple[int, int], ...]   # [(parent index | -1, rank)] in breadth-first order


def make_template(num_nodes: int, max_depth: int, max_rank: int = 8, top_accept: float = 0.6,
                  rank_decay: float = 0.5) -> Template:
    """The `num_nodes` rank paths most likely to be accepted, if the rank-r candidate is right with probability
    top_accept * rank_decay**r independently at each depth (a path's weight is the product along it).

    >>> make_template(4, 2)          # the root's top 2, then the top 2 under the first
    ((-1, 0), (-1, 1), (0, 0), (0, 1))
    """
    heap, chosen = [(-top_accept, (0,))], []
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < max_depth:  # first child and next sibling: scores never increase along either move
            heapq.heappush(heap, (neg * top_accept, path + (0,)))
        if path[-1] + 1 < max_rank:
            heapq.heappush(heap, (neg * rank_decay, path[:-1] + (path[-1] + 1,)))
    chosen.sort(key=lambda p: (len(p), p))
    index = {path: i for i, path in enumerate(chosen)}
    return tuple((index.get(path[:-1], -1), path[-1]) for path in chosen)


def spine(template: Template) -> Template:
    """The rank-0 chain of a template (what `best_chain` would read), as a template of its own."""
    out, where = [], {-1: -1}
    for i, (parent, rank) in enumerate(template):
        if rank == 0 and parent in where:
            where[i] = len(out)
            out.append((where[parent], 0))
    return tuple(out)


def draft_tree(template: Template, next_tokens: Callable[[tuple[int, ...]], Sequence[int]]
               ) -> tuple[list[int], list[int]]:
    """Fill the template: (tokens, parents) in breadth-first order; parents index into tokens, -1 = root.

    >>> table = {(): [5, 6], (5,): [7, 9], (6,): [8]}
    >>> draft_tree(make_template(4, 2), lambda path: table.get(path, []))
    ([5, 6, 7, 9], [-1, -1, 0, 0])
    """
    tokens, parents, paths, where, cache = [], [], [], {-1: -1}, {}
    for i, (parent, rank) in enumerate(template):
        if parent not in where:
            continue
        p = where[parent]
        if p not in cache:
            cache[p] = next_tokens(paths[p] if p >= 0 else ())
        candidates = cache[p]
        if rank >= len(candidates):
            continue
        where[i] = len(tokens)
        tokens.append(int(candidates[rank]))
        parents.append(p)
        paths.append((paths[p] if p >= 0 else ()) + (tokens[-1],))
    return tokens, parents


def best_chain(tokens: list[int], parents: list[int], k: int) -> list[int]:
    """Follow the first (most likely) child from the root, at most k tokens.

    >>> best_chain([5, 6, 7, 8], [-1, -1, 0, 1], k=3)
    [5, 7]
    """
    chain, node = [], -1
    first_child: dict[int, int] = {}
    for i, p in enumerate(parents):
        first_child.setdefault(p, i)
    while len(chain) < k and node in first_child:
        node = first_child[node]
        chain.append(tokens[node])
    return chain
