"""Plain autoregressive decoding: the proposer that never drafts."""

from __future__ import annotations

from ..registry import ArmContext, register
from ..types import Draft, Verdict


class ARProposer:
    def propose(self, seq: list[int], k: int) -> Draft:
        return Draft([])

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        pass


@register("ar", drafts="none", description="plain autoregressive decoding (one target forward per token)")
def build(ctx: ArmContext) -> ARProposer:
    return ARProposer()
