"""Token Recycling: draft from an adjacency table of the target's own top-k next tokens.

Every verified step scores [last, *draft]; `observe` recycles the top-k of each of the target's rows (carried by
the Verdict) into the table (`resources["adjacency_table"]`: vocab x k, never reset, shared through Redis).
Drafting looks up a static breadth-first tree template (the paper's ~80 nodes, depth 6); while verification is
chain-only the arm drafts the template's best chain (argmax of the table at every depth).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import ArmContext, register
from ..store import AdjacencyTable
from ..tree_draft import Template, best_chain, draft_tree, make_template, spine
from ..types import Draft, Verdict


@dataclass(frozen=True)
class RecyclingConfig:
    tree_nodes: int = 80      # static template size (Token Recycling: ~80)
    tree_depth: int = 6       # template depth (Token Recycling: 6)


def recycling_tree(table: AdjacencyTable, last: int, template: Template) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the candidate tree after `last`: a node's children are its token's table row."""
    return draft_tree(template, lambda path: table.next_tokens(path[-1] if path else last))


class RecyclingProposer:
    def __init__(self, table: AdjacencyTable, cfg: RecyclingConfig) -> None:
        self.table = table
        self.template = make_template(cfg.tree_nodes, cfg.tree_depth)
        self.chain = spine(self.template)
        self.drafted = 0

    def propose(self, seq: list[int], k: int) -> Draft:
        tokens = best_chain(*recycling_tree(self.table, seq[-1], self.chain), k) if k > 0 else []
        self.drafted = len(tokens)
        return Draft(tokens)

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        if verdict.logits is not None:  # [k'+1, V] the target's scores after each of verdict.scored
            self.table.update(verdict.scored, verdict.logits)
        self.table.record(self.drafted, verdict.accepted, self.drafted > 0)


@register("recycling", drafts="lookup", requires=("adjacency_table",),
          description="Token Recycling: drafts from the target's recycled top-k next tokens (shared table)")
def build(ctx: ArmContext) -> RecyclingProposer:
    table = ctx.resources["adjacency_table"]
    table.request_sync()
    return RecyclingProposer(table, RecyclingConfig())
