"""GPU checks (skipped without CUDA): the batched engine's contract and device hygiene on the accelerator.

`python -m metaspec.gpu_check` runs the same checks as one command and prints JSON; this file is the pytest view.
"""

from __future__ import annotations

import pytest
import torch

from metaspec import gpu_check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def cuda_engine(tmp_path_factory):
    e = gpu_check.engine(*gpu_check.tiny_pair(tmp_path_factory.mktemp("gpu")), "cuda", "float32", 16)
    yield e
    e.close()


def test_every_arm_equals_ar_alone_and_batched_on_the_gpu(cuda_engine):
    report = gpu_check.contract(cuda_engine, max_tokens=24)
    assert report["ok"], report["mismatches"]


def test_kv_pool_and_logits_live_on_the_gpu(cuda_engine):
    from metaspec.workers.kv import Item, forward_batch

    s = cuda_engine.pool.session(64)
    s.bind()
    try:
        (logits,) = forward_batch([Item(s, [5, 6, 7])])
        assert logits.device.type == "cuda" and cuda_engine.pool.kv[0].device.type == "cuda"
    finally:
        s.release()
