"""Turn logits into the distribution decoding samples from, and the randomness that samples it.

Applying the same temperature / top-k / top-p to both sides is what keeps speculative sampling lossless with
respect to the *processed* target distribution, which is the distribution AR sampling draws from.

Randomness is a pure function of (request seed, sequence position, stream), not a generator's running state:
`noise(seed, position)` reseeds a generator on the sampling device for each row. A token is drawn as
argmax(p / E) with E ~ Exp(1) per vocabulary entry (the exponential race: token i wins with probability p_i), and
one more exponential gives the uniform of the p/q acceptance test. So a seeded request draws the same numbers at
each position whatever its draft lengths, its arm's choices or the batch it shares a forward with; and an arm
with one-hot drafts emits exactly AR's seeded sample at every position.
"""

from __future__ import annotations

import random

import torch

from .types import SamplingParams

TARGET, DRAFT = 0, 1     # streams: the target's verification draws, a drafter's own sampling
_MASK = (1 << 64) - 1


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits → [..., V] float32 probabilities (one-hot argmax when greedy)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p  # keep the smallest prefix reaching p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def row_seed(seed: int, position: int, stream: int = TARGET) -> int:
    """A 63-bit seed for one (request, position, stream), mixed by splitmix64 so that nearby inputs decorrelate."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) >> 1


class Noise:
    """Exp(1) draws keyed by (seed, position): one generator per device, reseeded per row (no host sync)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)

    def rows(self, seed: int, positions: list[int] | range, vocab: int, stream: int = TARGET) -> torch.Tensor:
        """[len(positions), vocab + 1] exponentials: columns :vocab race the tokens, column vocab is the uniform's."""
        out = torch.empty(len(positions), vocab + 1, device=self.device)
        for row, position in zip(out, positions):
            self.gen.manual_seed(row_seed(seed, position, stream))
            row.exponential_(generator=self.gen)
        return out


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[..., V] probabilities and [..., V(+1)] exponentials → [...] sampled token ids: argmax(p / E)."""
    return (probs / noise[..., : probs.shape[-1]]).argmax(-1)


def uniform(noise: torch.Tensor) -> torch.Tensor:
    """[..., V + 1] exponentials → [...] U(0, 1) draws independent of the race (exp(-E) of the last column)."""
    return torch.exp(-noise[..., -1])


def new_seed() -> int:
    """A seed for a request that brought none."""
    return random.SystemRandom().getrandbits(62)
