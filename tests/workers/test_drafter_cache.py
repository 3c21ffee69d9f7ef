"""The drafter cache shared by sps and pearl: common-prefix rollback feeds only what the cache lacks and gives the
logits a fresh cache would."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from metaspec.workers.drafter_cache import DrafterCache, common_prefix
from metaspec.workers.model import ModelConfig, load_model


def test_common_prefix_matches_a_plain_scan():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 40))]
        b = [rng.randint(0, 3) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.3:
            b = a[: rng.randint(0, len(a))] + b
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want
        assert common_prefix(np.asarray(a, dtype=np.int32), tuple(b)) == want   # pearl hands numpy arrays


@pytest.fixture(scope="module")
def drafter(tiny_pair):
    return load_model(ModelConfig(tiny_pair.drafter))


def test_rollback_feeds_only_what_the_cache_lacks_and_gives_fresh_logits(drafter):
    cache = DrafterCache(drafter, capacity=64)
    steps = [([5, 6, 7, 8], 4), ([5, 6, 7, 8, 9], 1), ([5, 6, 7, 8, 9, 10, 11], 2),   # extended: fed the new ones
             ([5, 6, 7, 20, 21], 2),                                               # rejected tail: back to 3
             ([5, 6, 7, 20, 21], 1),                                               # same: last token fed again
             ([5, 6], 1), ([30, 6, 7], 3)]                                         # shorter; nothing in common
    for seq, fed in steps:
        logits, n = cache.logits_after(seq)
        assert n == fed and cache.fed == seq and cache.session.length == len(seq), seq
        fresh = drafter.session(64).forward(seq)[-1]
        assert torch.allclose(logits, fresh, atol=1e-4), seq
    cache.rollback_to(np.asarray([30, 6, 1, 2], dtype=np.int32))
    assert cache.fed == [30, 6] and cache.session.length == 2
