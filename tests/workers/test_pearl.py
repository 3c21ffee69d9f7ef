"""PEARL: the drafter in its own process (pinned, one thread), the shared-memory channel, post-verify, losslessness
(greedy and sampled), the drafter killed mid-request, leases of finished / abandoned / concurrent requests, and the
thread runner that serves a CUDA stream (exercised here on the CPU)."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from metaspec.workers.decode import decode
from metaspec.workers.engine import Chunk, Request, Result
from metaspec.workers.model import ModelConfig, load_model
from metaspec.workers.pearl import M_RUN, DrafterGone, PearlConfig, pool_for
from metaspec.workers.pearl_channel import D_TRACE_N, N_TRACE
from metaspec.workers.registry import ArmContext, build
from metaspec.workers.types import DecodeStats, SamplingParams

from .test_sampling import exact_first_two, goodness_of_fit, reference_probs

PROMPTS = ["def fib(n):\n    if n < 2:\n        return n\n", "The capital of France is", "import os\nimport sys\nimport"]
GREEDY = SamplingParams(max_tokens=48)


def _pool(engine, cfg: PearlConfig | None = None):
    return pool_for(engine.drafter, cfg or PearlConfig())


def _generate(engine, method: str, prompt: str, params: SamplingParams = GREEDY) -> Result:
    return engine.generate(Request(prompt=prompt, params=params, method=method))


def _run(target, drafter, params, prompt, seed=None, cfg=None, generator_seed=0):
    """One request through decode() directly: (emitted tokens, stats, proposer)."""
    capacity = len(prompt) + params.max_tokens + 9
    session = target.session(capacity)
    resources = {"pearl_config": cfg} if cfg else {}
    ctx = ArmContext(target=target, params=params, seed=generator_seed, drafter=drafter, target_session=session,
                     resources=resources)
    proposer, stats = build("pearl", ctx), DecodeStats()
    out = [t for step in decode(session, proposer, prompt, params, generator_seed, frozenset(), capacity, 8, stats)
           for t in step]
    return out, stats, proposer


# --- the drafter process ------------------------------------------------------------------------------------------

def test_greedy_equals_ar_and_drafts_come_from_a_pinned_drafter_process(tiny_engine):
    drafted = 0
    for prompt in PROMPTS:
        want, have = _generate(tiny_engine, "ar", prompt), _generate(tiny_engine, "pearl", prompt)
        assert have.token_ids == want.token_ids and have.text == want.text
        assert have.stats.fallback is None
        drafted += have.stats.drafted
    assert drafted > 0
    (drafter,) = _pool(tiny_engine).processes
    assert drafter.pid != os.getpid() and drafter.gone() is None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        assert os.sched_getaffinity(drafter.pid) == {cpus[-1]}
    with open(f"/proc/{drafter.pid}/status") as f:
        threads = int(next(line for line in f if line.startswith("Threads:")).split()[1])
    assert threads <= 4, f"drafter process runs {threads} threads; it should run one torch thread"


def test_the_draft_after_a_rollback_is_sized_by_acceptance_and_the_speed_ratio():
    """After a rollback the target waits for the drafter: a drafter 14x faster than the target is worth waiting
    a few tokens for, one barely faster than it is not; the paper's pre-verify sends one token whatever the ratio.
    After a fully accepted draft the length is gamma: the drafter steps that fit in one verification, minus one."""
    from metaspec.workers.draft_length import best_length
    from metaspec.workers.proposers.pearl import PearlProposer

    def proposer(ratio: float, **cfg) -> PearlProposer:   # no drafter: the lengths follow the ratio given
        return PearlProposer(None, None, GREEDY, 0, PearlConfig(**cfg), speed_ratio=ratio)

    fast, slow = proposer(14.0), proposer(1.5)
    assert fast.length() == best_length(PearlConfig().prior_accept, 1 / 14, 8) > 1 == slow.length()
    assert proposer(14.0, pre_verify=True).length() == 1
    for p in (fast, slow):
        p.acceptance.update(8, 8)                 # long accepted drafts raise the length after a rollback
    assert proposer(14.0).length() < fast.length()
    fast.rolled_back = slow.rolled_back = False
    assert (fast.gamma, slow.gamma, proposer(5.0).gamma, proposer(5.0, gamma=2).gamma) == (8, 1, 4, 2)


def test_round_trip_through_the_channel(tiny_engine):
    pool = _pool(tiny_engine)
    drafter, lease_id = pool.lease()
    try:
        times = [drafter.ping() for _ in range(50)]
    finally:
        pool.release(drafter, lease_id)
    assert all(t > 0 for t in times)


def test_post_verify_hands_over_drafts_made_during_verification(tiny_engine):
    """A full acceptance whose bonus the drafter already drafted leaves the drafter running (no rollback)."""
    target, drafter = tiny_engine.target, tiny_engine.drafter
    prompt = tiny_engine.tokenizer.encode(PROMPTS[2])
    out, stats, proposer = _run(target, drafter, GREEDY, prompt)
    timeline = proposer.timeline()
    proposer.close()
    assert proposer.kept > 0, "no draft ever came from the drafter's post-verify continuation"
    assert stats.accepted < stats.drafted  # and rollbacks happened too
    assert {kind for kind, _, _ in timeline["target"]} >= {"verify"}
    assert len(timeline["drafter"]) >= stats.drafted
    assert all(t0 <= t1 for _, t0, t1 in timeline["drafter"] + timeline["target"])


# --- crash, lifecycle, leases -------------------------------------------------------------------------------------

def test_drafter_killed_mid_request_falls_back_to_ar_and_restarts(tiny_engine):
    prompt = PROMPTS[0]
    want = _generate(tiny_engine, "ar", prompt)
    _generate(tiny_engine, "pearl", prompt)                 # the pool's drafter is up
    pool = _pool(tiny_engine)
    (victim,) = pool.processes
    out, result = [], None
    for i, item in enumerate(tiny_engine.stream(Request(prompt=prompt, params=GREEDY, method="pearl"))):
        if isinstance(item, Chunk):
            out += item.token_ids
            if i == 1:
                os.kill(victim.pid, signal.SIGKILL)
        else:
            result = item
    assert out == result.token_ids == want.token_ids
    assert "died" in result.stats.fallback
    after = _generate(tiny_engine, "pearl", prompt)        # a fresh drafter serves the next request
    assert after.token_ids == want.token_ids and after.stats.fallback is None and after.stats.drafted > 0
    (fresh,) = pool.processes
    assert fresh.pid != victim.pid and victim.proc.poll() == -signal.SIGKILL


def test_abandoned_request_gives_its_drafter_back(tiny_engine):
    pool = _pool(tiny_engine)
    _generate(tiny_engine, "pearl", PROMPTS[1])
    (process,), drafter = pool.processes, pool.drafters[0]   # the lane the next request leases
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    stream = tiny_engine.stream(Request(prompt=PROMPTS[0], params=long, method="pearl"))
    next(stream), next(stream)                              # the second step is the first one the drafter serves
    assert drafter.leased and drafter.ch.ctl[M_RUN] == 1
    del stream                                              # the client went away mid-request
    deadline = time.monotonic() + 10                        # the step loop ends it at its next step boundary
    while drafter.leased and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not drafter.leased and drafter.ch.ctl[M_RUN] == 0
    result = _generate(tiny_engine, "pearl", PROMPTS[1])
    assert result.stats.fallback is None and pool.processes == [process]


def test_concurrent_requests_share_one_drafter_batched_and_stay_exact(tiny_engine):
    """Requests at the same time each lease a lane of one drafter, which drafts for all of them in one forward
    per position: every output equals AR, every request drafted, and the drafter's traces show shared forwards."""
    long = SamplingParams(max_tokens=120, ignore_eos=True)   # all three run at once for most of their steps
    requests = [Request(prompt=p, params=long, method="pearl") for p in PROMPTS]
    want = [tiny_engine.generate(Request(prompt=r.prompt, params=r.params, method="ar")).token_ids for r in requests]
    pool = _pool(tiny_engine)
    before = {id(d): int(d.ch.ctl[D_TRACE_N]) for d in pool.drafters}
    results = tiny_engine.generate_many(requests)
    assert [r.token_ids for r in results] == want
    assert all(r.stats.fallback is None and r.stats.drafted > 0 for r in results), [r.stats for r in results]
    assert len(pool.processes) == 1
    forwards = [{tuple(d.ch.trace[i % N_TRACE, :2].tolist()) for i in range(before.get(id(d), 0),
                                                                            int(d.ch.ctl[D_TRACE_N]))}
                for d in pool.drafters]
    shared = [len(a & b) for i, a in enumerate(forwards) for b in forwards[i + 1:]]
    assert max(shared) > 0, "no drafter forward served two requests at once"


def test_one_lane_per_drafter_sends_the_second_request_without_drafts(tiny_pair):
    """lanes=1, max_drafters=1: a second request at the same time decodes without drafts, exactly."""
    target, drafter = load_model(ModelConfig(tiny_pair.target)), load_model(ModelConfig(tiny_pair.drafter))
    cfg = PearlConfig(runner="thread", lanes=1)
    try:
        first = build("pearl", ArmContext(target=target, params=GREEDY, drafter=drafter,
                                          resources={"pearl_config": cfg}))
        second = build("pearl", ArmContext(target=target, params=GREEDY, drafter=drafter,
                                           resources={"pearl_config": cfg}))
        assert first.d is not None and second.d is None
        with pytest.raises(DrafterGone, match="another request"):
            second.propose([5, 6, 7], 4)
    finally:
        pool_for(drafter, cfg).shutdown()


def test_requests_set_up_at_once_never_share_a_lane(tiny_pair):
    """Requests are set up on several threads at once: however their lease() calls interleave, each lane goes to
    one of them (the others get None), and the pool never starts more than max_drafters (two holders of one
    drafter drove its channel together and stalled the step loop; seen in the soak)."""
    drafter = load_model(ModelConfig(tiny_pair.drafter))
    pool = pool_for(drafter, PearlConfig(runner="thread", max_drafters=1, lanes=2, preempt_idle_s=60.0))
    try:
        for _ in range(5):
            start = threading.Barrier(6)

            def lease():
                start.wait()
                return pool.lease()

            with ThreadPoolExecutor(6) as ex:
                got = [lease for lease in ex.map(lambda _: lease(), range(6)) if lease is not None]
            assert len(got) == 2 and len({id(d) for d, _ in got}) == 2 and len(pool.processes) == 1, got
            for lease in got:
                pool.release(*lease)
    finally:
        pool.shutdown()


def test_a_lease_taken_back_during_setup_stays_with_its_new_holder(tiny_pair, monkeypatch):
    """Setting up a pearl request measures speeds after leasing (slow the first time); if another request takes
    the lease back meanwhile, the first must keep the lease id it was given, not the new holder's (then both held
    "the" lease and drove one channel together: the soak's stalled step loop)."""
    target, drafter = load_model(ModelConfig(tiny_pair.target)), load_model(ModelConfig(tiny_pair.drafter))
    cfg = PearlConfig(runner="thread", lanes=1, preempt_idle_s=0.0)   # one lane: the four contend for it
    pool = pool_for(drafter, cfg)
    real_speed = type(pool).speed
    monkeypatch.setattr(type(pool), "speed", lambda self, t, d: (time.sleep(0.05), real_speed(self, t, d))[1])
    try:
        with ThreadPoolExecutor(4) as ex:
            proposers = list(ex.map(lambda i: build("pearl", ArmContext(
                target=target, params=GREEDY, drafter=drafter, resources={"pearl_config": cfg})), range(4)))
        holders = [p for p in proposers if p.d is not None and p.lease_id == p.d.lease_id]
        assert len(holders) == 1, [(p.lease_id, p.d and p.d.lease_id) for p in proposers]
        for p in proposers:
            if p not in holders and p.d is not None:
                with pytest.raises(DrafterGone, match="taken back"):
                    p.propose([5, 6, 7], 4)
    finally:
        pool.shutdown()


def test_a_stale_lease_is_taken_back_and_its_holder_stops_drafting(tiny_pair):
    target, drafter = load_model(ModelConfig(tiny_pair.target)), load_model(ModelConfig(tiny_pair.drafter))
    cfg = PearlConfig(preempt_idle_s=0.0, lanes=1)   # one lane: the second request must take it back
    prompt = [5, 6, 7, 8, 9, 10]
    first = _run(target, drafter, GREEDY, prompt, cfg=cfg)  # its proposer is still referenced here
    second = _run(target, drafter, GREEDY, prompt, cfg=cfg)
    assert second[0] == first[0] and second[1].fallback is None
    with pytest.raises(DrafterGone, match="taken back"):
        first[2].propose(prompt + first[0], 4)


def test_drafter_processes_end_with_their_model(tiny_pair):
    target, drafter = load_model(ModelConfig(tiny_pair.target)), load_model(ModelConfig(tiny_pair.drafter))
    _run(target, drafter, SamplingParams(max_tokens=8), [5, 6, 7])
    (proc,) = [p.proc for p in pool_for(drafter, PearlConfig()).processes]
    assert proc.poll() is None
    del drafter
    gc.collect()
    assert proc.wait(timeout=10) == 0, "the drafter process should exit cleanly when its model is gone"


# --- sampling -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_models(small_vocab_pair):
    from transformers import AutoModelForCausalLM

    target, drafter = load_model(ModelConfig(small_vocab_pair.target)), load_model(ModelConfig(small_vocab_pair.drafter))
    return target, drafter, AutoModelForCausalLM.from_pretrained(small_vocab_pair.target).eval()


@torch.no_grad()
def exact_third(hf, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """[V] target probability of the third emitted token."""
    vocab = hf.config.vocab_size
    joint = exact_first_two(hf, prompt, params)                                                    # [V, V]
    batch = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])            # [V*V, T+2]
    p3 = torch.stack([reference_probs(row, params) for row in hf(input_ids=batch).logits[:, -1]])  # [V*V, V]
    return (joint.flatten()[:, None] * p3).sum(0)


def test_sampled_tokens_follow_the_target_through_post_verify(small_models):
    """gamma = 1: the first step pre-verifies one token; when it is accepted and the bonus equals the drafter's
    next token, the second step's draft (token 3) comes from the drafter's continuation. The first two tokens
    (joint) and the third (marginal) must follow the target exactly."""
    target, drafter, hf = small_models
    params, prompt, n = SamplingParams(temperature=1.0, max_tokens=4), [1, 4, 8, 10, 1, 4, 8], 3000
    cfg = PearlConfig(gamma=1, pre_verify=True)
    pairs, thirds, kept = torch.zeros(12, 12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64), 0
    for seed in range(n):
        out, stats, proposer = _run(target, drafter, params, prompt, cfg=cfg, generator_seed=seed)
        assert stats.fallback is None
        pairs[out[0], out[1]] += 1
        thirds[out[2]] += 1
        kept += proposer.kept
        del proposer
    assert kept > n // 10, kept
    p_pairs, tv_pairs = goodness_of_fit(pairs, exact_first_two(hf, prompt, params))
    p_third, tv_third = goodness_of_fit(thirds, exact_third(hf, prompt, params))
    assert p_pairs > 1e-3 and p_third > 1e-3, (p_pairs, tv_pairs, p_third, tv_third)


def test_sampled_drafts_do_not_depend_on_timing(small_models):
    target, drafter, _ = small_models
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24)
    runs = [_run(target, drafter, params, [1, 4, 8, 10], generator_seed=s)[0] for s in (3, 3, 3, 4)]
    assert runs[0] == runs[1] == runs[2] != runs[3]


# --- the thread runner (a CUDA stream on a GPU; the same protocol on the CPU here) --------------------------------

def test_thread_runner_is_exact_too(tiny_pair):
    target, drafter = load_model(ModelConfig(tiny_pair.target)), load_model(ModelConfig(tiny_pair.drafter))
    cfg = PearlConfig(runner="thread")
    prompt = [17, 250, 31, 99, 4, 17, 250, 64]
    from metaspec.workers.proposers.ar import ARProposer

    capacity = len(prompt) + GREEDY.max_tokens + 9
    session = target.session(capacity)
    want = [t for s in decode(session, ARProposer(), prompt, GREEDY, None, frozenset(), capacity) for t in s]
    out, stats, proposer = _run(target, drafter, GREEDY, prompt, cfg=cfg)
    assert out == want and stats.fallback is None and stats.drafted > 0
    assert pool_for(drafter, cfg).drafters[0].pid is None  # a thread, not a process


def test_cuda_runner_refuses_a_machine_without_cuda(tiny_pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    drafter = load_model(ModelConfig(tiny_pair.drafter))
    with pytest.raises(ValueError, match="CUDA"):
        pool_for(drafter, PearlConfig(drafter_device="cuda:1"))
