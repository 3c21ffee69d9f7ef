"""Which worker pools can take requests, as Serve's controller sees them.

A pool whose replicas are all gone (its node was lost, and no other node offers its accelerator type) would hold
every request sent to it in its DeploymentHandle until a replica comes back — for a lost node type, never. The
router asks this watch instead: a pool the controller reports UNHEALTHY (or DEPLOY_FAILED) with no RUNNING replica
gets no new requests, and a request still waiting for one of its replicas ends with PoolDown (gRPC UNAVAILABLE) as
soon as the watch sees that. A pool being deployed or updated (status UPDATING) keeps its requests: they wait for
the new replicas as before.

>>> watch = PoolWatch({"a10g": "DecodeWorker-a10g"}, interval_s=1.0, app_name="metaspec")
>>> watch.start()                                     # inside the router's event loop
>>> watch.up("a10g")
True
>>> result = await watch.guard("a10g", handle.generate.remote(request))   # raises PoolDown if the pool is lost
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
DOWN_STATUSES = ("UNHEALTHY", "DEPLOY_FAILED")   # the controller's verdict that replicas failed (not an update)


class PoolDown(Exception):
    """The pool has no running replica (it was lost); the request is answered UNAVAILABLE."""


class PoolWatch:
    def __init__(self, deployments: Mapping[str, str], interval_s: float, app_name: str | None = None) -> None:
        self.deployments = dict(deployments)      # pool -> its Serve deployment name
        self.interval_s = interval_s              # 0 = never ask: every pool is always up
        self.app_name = app_name                  # None = this replica's application (asked on start)
        self._down = {pool: asyncio.Event() for pool in self.deployments}
        self._task: asyncio.Task | None = None

    def up(self, pool: str) -> bool:
        return not self._down[pool].is_set()

    def start(self) -> None:
        """Begin polling in the running event loop (again, if the poller died)."""
        if self.interval_s > 0 and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def update(self, statuses: Mapping[str, tuple[str, int]]) -> None:
        """Apply {deployment: (status, running replicas)}; a deployment not listed keeps its state."""
        for pool, name in self.deployments.items():
            if name not in statuses:
                continue
            status, running = statuses[name]
            down, event = running == 0 and status in DOWN_STATUSES, self._down[pool]
            if down != event.is_set():
                logger.warning("pool %s is %s (%s, %d running)", pool, "down" if down else "back", status, running)
                if down:
                    event.set()
                else:
                    event.clear()

    async def guard(self, pool: str, awaitable: Awaitable[T]) -> T:
        """The awaitable's result, unless the pool is or goes down first: then it is cancelled and PoolDown raised."""
        if self.interval_s <= 0:
            return await awaitable
        work = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(self._down[pool].wait())
        try:
            done, _ = await asyncio.wait((work, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not work.done():
                work.cancel()
        if work in done:
            return work.result()
        raise PoolDown(f"pool {pool} has no running replica (its node was lost?); retry later")

    async def first_guarded(self, pool: str, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """The stream's items, its first one guarded (once a replica answers, its loss is reported by Ray)."""
        try:
            first = await self.guard(pool, anext(stream))
        except StopAsyncIteration:
            return
        yield first
        async for item in stream:
            yield item

    async def _poll(self) -> None:
        failing = ""
        while True:
            try:
                self.update(await asyncio.to_thread(deployment_statuses, self.app_name))
                failing = ""
            except Exception as exc:   # a controller that does not answer leaves every pool as it was
                if f"{exc}" != failing:
                    logger.warning("pool watch: serve status failed (pools keep their state): %s", exc)
                failing = f"{exc}"
            await asyncio.sleep(self.interval_s)


def deployment_statuses(app_name: str | None) -> dict[str, tuple[str, int]]:
    """{deployment: (status, RUNNING replicas)} of one Serve application (None = the caller's); the count is -1
    (not asked) while no deployment is UNHEALTHY or DEPLOY_FAILED.

    The statuses alone are one small protobuf from the controller; `serve.status()`, which also counts replicas,
    builds the whole instance's pydantic details (it cloudpickles every deployment's request router class) and
    took a quarter of the router's CPU when asked every second (py-spy, README "Serving overhead"). So it is asked
    only once a pool looks down.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    name = app_name or serve.get_replica_context().app_name
    overview = _get_global_client().get_serve_status(name)
    statuses = {d.name: str(d.status.value) for d in overview.deployment_statuses}
    if not any(s in DOWN_STATUSES for s in statuses.values()):
        return {d: (s, -1) for d, s in statuses.items()}
    app = serve.status().applications.get(name)
    if app is None:
        return {}
    return {d: (str(s.status.value), int(s.replica_states.get("RUNNING", 0))) for d, s in app.deployments.items()}
