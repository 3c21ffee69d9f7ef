"""PoolWatch: which pools take requests, from Serve's deployment statuses (end to end: tests/cluster)."""

from __future__ import annotations

import asyncio

import pytest

from metaspec.deploy.pool_watch import PoolDown, PoolWatch


def watch() -> PoolWatch:
    return PoolWatch({"a": "DecodeWorker-a", "b": "DecodeWorker-b"}, interval_s=1.0, app_name="app")


def test_a_pool_is_down_only_when_the_controller_gave_up_on_every_replica():
    w = watch()
    w.update({"DecodeWorker-a": ("UPDATING", 0), "DecodeWorker-b": ("HEALTHY", 1)})   # being deployed: waits
    assert w.up("a") and w.up("b")
    w.update({"DecodeWorker-a": ("UNHEALTHY", 1)})                # one replica left: still serving
    assert w.up("a")
    w.update({"DecodeWorker-a": ("UNHEALTHY", 0), "DecodeWorker-b": ("DEPLOY_FAILED", 0)})
    assert not w.up("a") and not w.up("b")
    w.update({})                                                  # not listed: unchanged
    assert not w.up("a")
    w.update({"DecodeWorker-a": ("HEALTHY", -1)})                # healthy, replicas not counted: back
    assert w.up("a") and not w.up("b")


def test_guard_returns_the_result_while_the_pool_is_up():
    async def main():
        return await watch().guard("a", asyncio.sleep(0, result=42))

    assert asyncio.run(main()) == 42


def test_guard_cancels_a_request_waiting_on_a_pool_that_goes_down():
    async def main():
        w, cancelled = watch(), asyncio.Event()

        async def waiting_for_a_replica():
            try:
                await asyncio.Event().wait()   # a handle waiting for a replica that never comes
            except asyncio.CancelledError:
                cancelled.set()
                raise

        guarded = asyncio.ensure_future(w.guard("a", waiting_for_a_replica()))
        await asyncio.sleep(0.01)
        w.update({"DecodeWorker-a": ("UNHEALTHY", 0)})
        with pytest.raises(PoolDown, match="pool a"):
            await guarded
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(main())


def test_first_guarded_passes_a_stream_through():
    async def items():
        for i in range(3):
            yield i

    async def main():
        return [x async for x in watch().first_guarded("b", items())]

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_zero_interval_never_polls_and_never_guards():
    async def main():
        w = PoolWatch({"a": "DecodeWorker-a"}, interval_s=0)
        w.start()
        return w._task, await w.guard("a", asyncio.sleep(0, result="direct"))

    assert asyncio.run(main()) == (None, "direct")
