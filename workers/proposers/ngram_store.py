"""Corpus n-grams (in the spirit of REST/ADED): draft from the shared table learned from every emitted sequence.

The table (`resources["ngram_table"]`, workers/store) maps the last 1..4 tokens to their most frequent
continuations across all requests of all workers: the engine teaches it every request's emitted tokens at request
end, whatever the arm, and the background syncer shares them through Redis. Within a request the arm also learns
its own emitted tokens in a private table (consulted first at each context length, never shared, so the shared
table counts each request once). Drafting walks the longest match; the candidate tree is built breadth-first from
a static template and the arm drafts its best chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import ArmContext, register
from ..store import NgramTable
from ..tree_draft import Template, best_chain, draft_tree, make_template, spine
from ..types import Draft, Verdict


@dataclass(frozen=True)
class NgramStoreConfig:
    tree_nodes: int = 24      # candidate tree size (breadth-first template)
    tree_depth: int = 8       # deepest node = longest draft


def continuations(tables: list[NgramTable], seq: list[int] | tuple[int, ...]) -> list[int]:
    """Next tokens after seq: longest context first; at each length every table's row in turn, no repeats.

    >>> shared.learn([], [1, 2, 7]); own.learn([], [5, 2, 9])
    >>> continuations([own, shared], [1, 2])      # (1, 2) -> 7 outranks own (2,) -> 9
    [7, 9]
    """
    cfg, out = tables[0].cfg, []
    for n in range(min(cfg.max_order, len(seq)), cfg.min_order - 1, -1):
        context = tuple(seq[-n:])
        for table in tables:
            out += [t for t in table.following(context) if t not in out]
    return out


def match_order(tables: list[NgramTable], seq: list[int] | tuple[int, ...]) -> int:
    """The longest context of seq that any table continues (0 = none): how strong a draft's first token is.

    >>> shared.learn([], [1, 2, 7]); own.learn([], [5, 2, 9])
    >>> match_order([own, shared], [1, 2]), match_order([own, shared], [4, 2]), match_order([own], [3])
    (2, 1, 0)
    """
    cfg = tables[0].cfg
    for n in range(min(cfg.max_order, len(seq)), cfg.min_order - 1, -1):
        context = tuple(seq[-n:])
        if any(table.following(context) for table in tables):
            return n
    return 0


def ngram_tree(table: NgramTable, seq: list[int], template: Template,
               own: NgramTable | None = None) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the candidate tree after `seq`: a node's children continue its path's longest match,
    then what shorter contexts add; `own` (this request's table) ranks before `table` at each context length."""
    tail, tables = tuple(seq[-table.cfg.max_order:]), [table] if own is None else [own, table]
    return draft_tree(template, lambda path: continuations(tables, tail + path))


class NgramStoreProposer:
    def __init__(self, table: NgramTable, cfg: NgramStoreConfig) -> None:
        self.table = table
        self.own = NgramTable(table.cfg, table.vocab_size)   # this request's emitted tokens (private)
        self.template = make_template(cfg.tree_nodes, cfg.tree_depth, top_accept=0.8)
        self.chain = spine(self.template)   # the only part a chain draft reads
        self.drafted = 0

    def propose(self, seq: list[int], k: int) -> Draft:
        tokens = best_chain(*ngram_tree(self.table, seq, self.chain, self.own), k) if k > 0 else []
        self.drafted = len(tokens)
        return Draft(tokens, evidence=match_order([self.own, self.table], seq) if tokens else 0)

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        self.table.record(self.drafted, verdict.accepted, self.drafted > 0)
        self.own.learn(seq, verdict.emitted)


@register("ngram_store", drafts="lookup", requires=("ngram_table",),
          description="corpus n-grams: drafts from an n-gram table shared by every worker through Redis")
def build(ctx: ArmContext) -> NgramStoreProposer:
    table = ctx.resources["ngram_table"]
    table.request_sync()  # pull other workers' news in the background while this request prefills
    return NgramStoreProposer(table, NgramStoreConfig())
