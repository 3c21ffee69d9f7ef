"""Corpus n-grams (in the spirit of REST/ADED): draft from the shared table learned from every emitted sequence.

The table (`resources["ngram_table"]`, workers/store) maps the last 1..4 tokens to their most frequent
continuations across all requests of all workers. Drafting walks the longest match; the candidate tree is built
breadth-first from a static template and, while verification is chain-only, the arm drafts its best chain.
Learns only emitted (verified) tokens, in `observe`; the background syncer shares them through Redis.
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


def ngram_tree(table: NgramTable, seq: list[int], template: Template) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the candidate tree after `seq`: a node's children continue its path's longest match,
    then what shorter contexts add."""
    tail = tuple(seq[-table.cfg.max_order:])
    return draft_tree(template, lambda path: table.continuations(tail + path, backoff=True))


class NgramStoreProposer:
    def __init__(self, table: NgramTable, cfg: NgramStoreConfig) -> None:
        self.table = table
        self.template = make_template(cfg.tree_nodes, cfg.tree_depth, top_accept=0.8)
        self.chain = spine(self.template)   # the only part a chain draft reads
        self.drafted = 0

    def propose(self, seq: list[int], k: int) -> Draft:
        tokens = best_chain(*ngram_tree(self.table, seq, self.chain), k) if k > 0 else []
        self.drafted = len(tokens)
        return Draft(tokens)

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        self.table.record(self.drafted, verdict.accepted, self.drafted > 0)
        self.table.learn(seq, verdict.emitted)


@register("ngram_store", requires=("ngram_table",),
          description="corpus n-grams: drafts from an n-gram table shared by every worker through Redis")
def build(ctx: ArmContext) -> NgramStoreProposer:
    table = ctx.resources["ngram_table"]
    table.request_sync()  # pull other workers' news in the background while this request prefills
    return NgramStoreProposer(table, NgramStoreConfig())
