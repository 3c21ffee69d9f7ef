"""The Router: the Serve deployment behind both ingresses. gRPC methods are named after the RPCs of metaspec.proto;
`__call__` answers the OpenAI-compatible HTTP API (deploy/openai_http.py) over the same path.

Per request: protobuf (or an OpenAI JSON body) -> GenerateCall -> `choose`: checks -> (pool, method) from the
policy -> `run` / `stream`: the pool's DecodeWorker through a DeploymentHandle -> outcome fsync'ed to the outcome
log -> final reply. Errors become gRPC status codes (`status.status_of`; HTTP maps them onto HTTP statuses); the
router keeps serving after each.

The learnt selector changes without a restart: `reconfigure` (Serve's user_config: `selector`, `explore`,
`selector_check_s`) switches file or settings in place, and the selector re-reads its file by itself when the file
changes (`metaspec retrain --out <that file>`), checked at most every `selector_check_s`. A file that cannot be
trusted is refused with a logged error and the current selector keeps serving; every reply and outcome carries
the `selector_version` that chose it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc
from ray import serve
from ray.serve.handle import DeploymentHandle

from metaspec.protocol import convert
from metaspec.protocol.client import API_KEY_HEADER
from metaspec.protocol.types import (GenerateCall, Health, MethodInfo, PoolDescription, PoolHealth, Reply,
                                     ServiceInfo)
from metaspec.selector.live import LiveSelector
from metaspec.selector.rules import ArmSpec, specs_from_registry
from metaspec.selector.features import inflight_load_features
from metaspec.selector.types import Choice, Outcome, PoolInfo
from metaspec.workers.outcome_log import OutcomeLog, OutcomeLogConfig
from metaspec.workers.request import Chunk, Request, RequestStats, Result, WorkerInfo

from . import openai_http
from .access import Access, access_config
from .config import PoolSpec, RouterSpec
from .metrics import ServiceMetrics
from .pool_watch import PoolWatch
from .policy import (FixedPolicy, NgramMirror, Policy, apply_user_config, check_call, live_config, make_policy,
                     mirror_pool, pick)
from .status import Status, _replica_lost, status_of
from .tokens import PromptTokens

logger = logging.getLogger("ray.serve")
OUTCOME_RECORDED = "outcome-recorded"   # trailing metadata of Generate/GenerateStream: "true" / "false"


@dataclasses.dataclass
class Receipt:
    """What a transport tells its client beside the reply: whether the request's outcome reached the log.

    Contract: an outcome that could not be written (full disk, EIO...) is not silently acknowledged. The reply still
    goes out (the tokens were generated), marked `outcome-recorded: false` (gRPC trailing metadata; HTTP:
    `metaspec.outcome_recorded`); the log keeps the record and retries it; `metaspec_outcomes_unrecorded_total`
    counts it.
    """

    outcome_recorded: bool | None = None     # None: no outcome was due (refused before a pool was chosen)
    key: str | None = None                   # the caller's API key digest (its quota is charged the tokens)

    def metadata(self) -> list[tuple[str, str]]:
        if self.outcome_recorded is None:
            return []
        return [(OUTCOME_RECORDED, "true" if self.outcome_recorded else "false")]


def _local_handles(workers: dict[str, DeploymentHandle]) -> dict[str, DeploymentHandle]:
    """The same handles asked for in this replica: handles bound at build time carry the defaults of the process
    that built the app, these carry the replica's own Serve settings (RAY_SERVE_USE_GRPC_BY_DEFAULT: calls to
    the workers over gRPC instead of Ray actor tasks)."""
    try:
        return {n: serve.get_deployment_handle(h.deployment_name, h.app_name) for n, h in workers.items()}
    except Exception:   # not inside a Serve replica (a plain class in a unit test): keep what was given
        return dict(workers)


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, spec: RouterSpec, pools: tuple[PoolSpec, ...], workers: dict[str, DeploymentHandle],
                 policy: Policy | None = None, arms: Mapping[str, ArmSpec] | None = None) -> None:
        self.spec = spec
        self.pools = {p.name: p for p in pools}
        self.arms = dict(arms) if arms is not None else specs_from_registry()   # the app builder passes the table
        self.workers = _local_handles(workers)
        self.tokens = PromptTokens(_tokenizer_of(pools[0]))   # every pool shares one tokenizer family
        self.mirror: NgramMirror | None = None                   # these two: built once a learnt selector is used
        self.live: LiveSelector | None = None
        self.policy: Policy = policy or self._policy_for(spec)
        self.tokens.warm()
        self.log = OutcomeLog(OutcomeLogConfig(spec.outcome_dir, spec.outcome_max_bytes, fsync=spec.outcome_fsync,
                                               sync_before_ack=spec.outcome_fsync_before_reply))
        self.metrics = ServiceMetrics()
        self._infos: dict[str, WorkerInfo] = {}
        self._inflight = {name: 0 for name in self.pools}
        self._drafting: dict[str, Counter[str]] = {name: Counter() for name in self.pools}   # in flight, by kind
        self.watch = PoolWatch({n: h.deployment_name for n, h in workers.items()}, spec.pool_watch_s)
        self.access = Access(access_config(spec))
        self.chat_template = openai_http.ChatTemplate(pools[0].tokenizer or pools[0].target)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's in-place update of the user_config (`serve deploy` with a changed `user_config`): a new
        selector file, exploration share or check period. Requests keep being served by the current selector
        while the new one loads; a file that cannot be loaded is refused (logged) and the current one stays."""
        spec = apply_user_config(self.spec, config)       # a malformed user_config raises: the deploy fails
        access = await asyncio.to_thread(access_config, spec)       # keys rotate (the keys file is re-read)
        self.policy = await asyncio.to_thread(self._policy_for, spec)
        self.access = self.access.rotated(access)
        self.spec = spec

    def _policy_for(self, spec: RouterSpec) -> Policy:
        if spec.selector == "fixed":
            return FixedPolicy(spec.methods)
        if self.live is None:                                    # built once, the first time a learnt selector is used
            pools = tuple(self.pools.values())
            pool = mirror_pool(pools)
            self.mirror = NgramMirror.for_pool(pool) if pool is not None else None
            self.live = make_policy(spec, pools, self.tokens.tokenizer(),
                                    ngram_hit_rate=self.mirror.hit_rate if self.mirror else None, arms=self.arms)
        elif error := self.live.switch(live_config(spec)):
            logger.error("router reconfigure: %s", error)
        return self.live

    def __del__(self) -> None:   # Serve calls it on graceful replica shutdown
        if getattr(self, "mirror", None) is not None:
            self.mirror.close()
        if getattr(self, "tokens", None) is not None:
            self.tokens.close()

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def Generate(self, msg: Any, grpc_context=None) -> Any:
        t0, receipt = time.perf_counter(), Receipt()
        try:
            call, choice, rid = await self._admit(msg, grpc_context, receipt)
            reply = await self.run(call, choice, rid, t0, receipt=receipt)
        except Exception as exc:
            _trailers(grpc_context, receipt)
            return self._refuse(grpc_context, status_of(exc))
        _trailers(grpc_context, receipt)
        return convert.reply_to_proto(reply)

    async def GenerateStream(self, msg: Any, grpc_context=None) -> AsyncIterator[Any]:
        t0, receipt = time.perf_counter(), Receipt()
        try:
            call, choice, rid = await self._admit(msg, grpc_context, receipt)
            async with aclosing(self.stream(call, choice, rid, t0, receipt=receipt)) as replies:
                async for reply in replies:
                    if reply.finish_reason:
                        _trailers(grpc_context, receipt)   # the outcome is recorded (or not) before the last one
                    yield convert.reply_to_proto(reply)
        except Exception as exc:
            _trailers(grpc_context, receipt)
            self._abort(grpc_context, status_of(exc))

    async def __call__(self, request: Any) -> Any:
        """Serve's HTTP ingress: the OpenAI-compatible API (deploy/openai_http.py) over the same path as gRPC."""
        return await openai_http.handle(self, request)

    # ---- serving a chosen request (both transports) --------------------------------------------------------
    async def run(self, call: GenerateCall, choice: Choice, rid: str, t0: float,
                  timeout_s: float | None = None, receipt: Receipt | None = None) -> Reply:
        """The whole answer; its outcome is on disk before it returns (else `receipt` says it is not). Raises a
        (counted) Status on failure."""
        receipt = receipt if receipt is not None else Receipt()
        request = self._request_for(call, choice)
        self._enter(choice)
        left = None if timeout_s is None else max(0.0, timeout_s - (time.perf_counter() - t0))
        try:
            async with asyncio.timeout(left):   # the deadline counts from the request's arrival (t0)
                result = await self._worker_generate(choice.pool, request, rid)
        except asyncio.CancelledError:
            await self._record(call, choice, rid, "CANCELLED", t0, receipt=receipt)
            raise
        except Exception as exc:
            raise await self._failed(call, choice, rid, t0, exc, receipt) from None
        finally:
            self._leave(choice)
        wall = time.perf_counter() - t0
        ttft = (wall - result.wall_s) + result.ttft_s   # router overhead before the worker started + worker ttft
        await self._record(call, choice, rid, "OK", t0, result, ttft, receipt)
        return final_reply(result, choice, rid, ttft, wall, whole=True)

    async def stream(self, call: GenerateCall, choice: Choice, rid: str, t0: float,
                     timeout_s: float | None = None, receipt: Receipt | None = None) -> AsyncIterator[Reply]:
        """Chunk replies (the first carries the choice), then the final one, whose outcome is on disk before it
        is yielded (else `receipt` says it is not). Raises a (counted) Status on failure; closing it cancels the
        worker's request."""
        receipt = receipt if receipt is not None else Receipt()
        request = self._request_for(call, choice)
        self._enter(choice)
        done, ttft = False, None
        deadline = None if timeout_s is None else t0 + timeout_s
        try:
            async with aclosing(_until(self._worker_stream(choice.pool, request, rid), deadline)) as items:
                async for item in items:
                    if isinstance(item, Chunk):
                        first = ttft is None
                        ttft = time.perf_counter() - t0 if first else ttft
                        yield chunk_reply(item, choice, rid, with_choice=first)
                        continue
                    wall = time.perf_counter() - t0
                    done = True
                    await self._record(call, choice, rid, "OK", t0, item, ttft or wall, receipt)
                    yield final_reply(item, choice, rid, ttft or wall, wall, whole=False)
        except (asyncio.CancelledError, GeneratorExit):
            if not done:
                await self._record(call, choice, rid, "CANCELLED", t0, receipt=receipt)
            raise
        except Exception as exc:
            raise await self._failed(call, choice, rid, t0, exc, receipt) from None
        finally:
            self._leave(choice)

    async def _failed(self, call: GenerateCall, choice: Choice, rid: str, t0: float, exc: BaseException,
                      receipt: Receipt) -> Status:
        status = status_of(exc)
        await self._record(call, choice, rid, status.code.name, t0, receipt=receipt)
        status.counted = True                    # the outcome counted it: not a rejection before any choice
        return status

    async def Health(self, msg: Any, grpc_context=None) -> Any:
        """Every pool's health (authenticated like every RPC when keys are configured); the outcome log's counters
        go out as `outcome-log` trailing metadata (JSON)."""
        try:
            self._authorize(grpc_context)
        except Status as status:
            self.refused(status)
            if grpc_context is not None:
                grpc_context.set_code(status.code)
                grpc_context.set_details(status.message)
            return convert.health_to_proto(Health(False))
        health = await self.health()
        if grpc_context is not None:
            grpc_context.set_trailing_metadata([("outcome-log", json.dumps(self.log_stats(), sort_keys=True))])
        return convert.health_to_proto(health)

    async def health(self) -> Health:
        async def one(name: str) -> PoolHealth:
            try:
                await asyncio.wait_for(self.workers[name].ping.remote(), self.spec.health_timeout_s)
                return PoolHealth(name, True)
            except Exception as exc:   # a pool that cannot answer is reported, not raised; the why stays in our log
                logger.warning("health: pool %s did not answer: %s: %s", name, type(exc).__name__, exc)
                what = "did not answer in time" if isinstance(exc, TimeoutError) else "unreachable"
                return PoolHealth(name, False, f"{what} ({type(exc).__name__})")

        pools = tuple(await asyncio.gather(*(one(n) for n in self.pools)))
        self.metrics.outcome_log(self.log_stats())
        return Health(all(p.ok for p in pools), pools)

    def log_stats(self) -> dict[str, int]:
        """The outcome log's counters (appended, unrecorded, pending_retry...; its file name stays here)."""
        return {k: v for k, v in self.log.stats().items() if isinstance(v, int)}

    async def ListMethods(self, msg: Any, grpc_context=None) -> Any:
        try:
            self._authorize(grpc_context)
        except Status as status:
            return self._refuse(grpc_context, status, reply=convert.service_info_to_proto(_EMPTY_INFO))
        return convert.service_info_to_proto(await self.service_info())

    # ---- pieces --------------------------------------------------------------------------------------------
    async def _worker_generate(self, pool: str, request, rid: str) -> Result:
        """The worker's unary generate; a replica lost before answering is retried once (nothing was sent)."""
        for attempt in (1, 2):
            response = self.workers[pool].generate.remote(request, rid)
            try:
                return await self.watch.guard(pool, response)   # PoolDown if the pool is lost meanwhile
            except BaseException as exc:
                if attempt == 1 and _replica_lost(exc):
                    logger.warning("request %s: replica of pool %s lost (%s); retrying once", rid, pool,
                                   type(exc).__name__)
                    continue
                response.cancel()
                raise
        raise AssertionError("unreachable")

    async def _worker_stream(self, pool: str, request, rid: str) -> AsyncIterator[Chunk | Result]:
        """The worker's stream; a replica lost before its first item is retried once. Closing this generator
        cancels the worker's request."""
        for attempt in (1, 2):
            stream = self.workers[pool].options(stream=True).stream.remote(request, rid)
            sent = False
            try:
                async for item in self.watch.first_guarded(pool, stream):
                    sent = True
                    yield item
                return
            except BaseException as exc:
                if attempt == 1 and not sent and _replica_lost(exc):
                    logger.warning("request %s: replica of pool %s lost (%s); retrying once", rid, pool,
                                   type(exc).__name__)
                    continue
                stream.cancel()
                raise

    async def service_info(self) -> ServiceInfo:
        methods = tuple(MethodInfo(n, a.description, tuple(sorted(a.requires))) for n, a in sorted(self.arms.items()))
        infos = await self._pool_infos()
        pools = tuple(PoolDescription(p.name, infos[p.name].methods if p.name in infos else (),
                                      {k: str(v) for k, v in p.hardware.items()}, _model_name(p.target),
                                      _model_name(p.drafter),
                                      p.num_replicas, infos[p.name].max_context if p.name in infos else 0)
                      for p in self.pools.values())
        return ServiceInfo(methods, pools, getattr(self.policy, "version", "unknown"), self.spec.max_tokens_limit,
                           self.spec.default_max_tokens)

    async def _admit(self, msg: Any, grpc_context, receipt: Receipt) -> tuple[GenerateCall, Choice, str]:
        """Authorize (and count against the key's quota), convert, check and choose; raises what `status_of`
        maps."""
        receipt.key = self._authorize(grpc_context)
        self.access.admit(receipt.key)
        return await self.choose(convert.call_from_proto(msg, self.spec.default_max_tokens))

    async def choose(self, call: GenerateCall) -> tuple[GenerateCall, Choice, str]:
        """Check a converted call against the deployment's limits, tokenise its text prompt (once, off the event
        loop) and pick (pool, method); returns the call with its prompt ids, the choice and the request id. Raises
        what `status_of` maps."""
        if self.live is not None and self.policy is self.live:
            self.live.poll()                                # a stat at most every selector_check_s
        check_call(call, self.spec.max_tokens_limit, self.spec.max_prompt_chars)
        infos = await self._pool_infos()
        self.watch.start()
        serving = {n: i for n, i in infos.items() if self.watch.up(n)}   # pools with a running replica
        if not serving:
            raise Status(grpc.StatusCode.UNAVAILABLE, "no worker pool is reachable")
        # ids beyond the smallest vocabulary fail here, before any feature or arm sees them (every pool shares one
        # tokenizer family; a pool with a larger vocabulary accepts what this lets through)
        convert.check_token_ids(call.request.prompt_ids, min(i.vocab_size for i in infos.values()))
        call = dataclasses.replace(call, request=await self.tokens.tokenised(call.request))
        if (m := call.request.method) and not any(m in i.methods for i in serving.values()) and any(
                m in i.methods for i in infos.values()):
            raise Status(grpc.StatusCode.UNAVAILABLE, f"every pool that runs {m} is down; retry later")
        pools = [PoolInfo(n, i.methods, self._hardware(n), self._load(n), self._batch(n)) for n, i in serving.items()]
        if self.live is not None and self.policy is self.live:   # its features read (and may decode) the prompt
            choice = await self.tokens.off_loop(pick, self.policy, call.request, pools, self.arms)
        else:
            choice = pick(self.policy, call.request, pools, self.arms)
        self.metrics.chosen(choice)
        return call, choice, call.request_id or uuid.uuid4().hex

    def _request_for(self, call: GenerateCall, choice: Choice) -> Request:
        """What the chosen pool's worker gets: the chosen method, and the prompt ids if it tokenises like us."""
        request = dataclasses.replace(call.request, method=choice.method)
        return self.tokens.for_pool(request, _tokenizer_of(self.pools[choice.pool]))

    async def _pool_infos(self) -> dict[str, WorkerInfo]:
        """Each pool's WorkerInfo, asked once per pool (a pool that does not answer is asked again next time)."""
        missing = [n for n in self.pools if n not in self._infos and self.watch.up(n)]
        if missing:
            async def ask(name: str) -> None:
                try:
                    self._infos[name] = await asyncio.wait_for(self.workers[name].info.remote(),
                                                               self.spec.health_timeout_s)
                except Exception as exc:
                    logger.warning("pool %s did not describe itself: %s", name, exc)
            await asyncio.gather(*(ask(n) for n in missing))
        return {n: self._infos[n] for n in self.pools if n in self._infos}

    def _authorize(self, grpc_context) -> str | None:
        enabled = grpc_context is not None and self.access.enabled
        metadata = dict(grpc_context.invocation_metadata()) if enabled else {}
        return self.check_key(metadata.get(API_KEY_HEADER), grpc_context.peer() if grpc_context is not None else "?",
                              f"send it as `{API_KEY_HEADER}` metadata")

    def check_key(self, key: str | None, peer: str, how: str) -> str | None:
        """The key's digest (None when no keys are configured); raises UNAUTHENTICATED unless `key` is one of
        them (`how`: where to put it)."""
        return self.access.authenticate(key, peer, how)

    def _load(self, pool: str) -> float:
        spec = self.pools[pool]
        return self._inflight[pool] / max(1, spec.num_replicas * spec.max_ongoing_requests)

    def _hardware(self, pool: str) -> dict[str, float | str]:
        """The pool's profile as the rules read it, and whether its step loop caps sampled drafts."""
        spec = self.pools[pool]
        return {**spec.hardware, "caps_sampled_drafts": float(spec.cap_sampled_drafts)}

    def _batch(self, pool: str) -> dict[str, float]:
        """The selector's load features of the pool's replicas, from this router's own in-flight counts (no call
        to the workers: requests in flight, and how many of them draft by lookup or with a model, spread over the
        replicas' KV slots)."""
        spec = self.pools[pool]
        return inflight_load_features(self._inflight[pool], spec.num_replicas, spec.max_batch,
                                      self._drafting[pool])

    def _drafts(self, method: str) -> str:
        spec = self.arms.get(method)
        return spec.drafts if spec is not None else "none"

    def _enter(self, choice: Choice) -> None:
        self._inflight[choice.pool] += 1
        self._drafting[choice.pool][self._drafts(choice.method)] += 1
        self.metrics.set_inflight(choice.pool, self._inflight[choice.pool])

    def _leave(self, choice: Choice) -> None:
        self._inflight[choice.pool] -= 1
        self._drafting[choice.pool][self._drafts(choice.method)] -= 1
        self.metrics.set_inflight(choice.pool, self._inflight[choice.pool])

    async def _record(self, call: GenerateCall, choice: Choice, rid: str, status: str, t0: float,
                      result: Result | None = None, ttft_s: float = 0.0, receipt: Receipt | None = None) -> None:
        """Append the outcome durably (before the reply leaves) and count it; `receipt` learns whether it is on
        disk, and the caller's quota is charged its tokens."""
        outcome = make_outcome(call, choice, rid, status, time.perf_counter() - t0, result, ttft_s)
        if receipt is not None:
            self.access.charge(receipt.key, outcome.prompt_tokens + outcome.completion_tokens)
        recorded = True
        try:
            await self.log.append_async(outcome)
        except OSError as exc:   # OutcomeNotRecorded (kept for retry) or worse: loud in the log, told to the client
            logger.error("request %s: outcome not recorded: %s", rid, exc)
            recorded = False
            self.metrics.unrecorded(outcome)
            self.metrics.outcome_log(self.log_stats())
        self.metrics.finished(outcome)
        if receipt is not None:
            receipt.outcome_recorded = recorded

    def refused(self, status: Status) -> Status:
        """Count a refusal that no outcome recorded (bad input, auth, no pool...)."""
        if not status.counted:
            self.metrics.rejected(status.code.name)
            status.counted = True
        return status

    def _refuse(self, grpc_context, status: Status, reply: Any = None) -> Any:
        """Set the status on a unary call and return an empty reply."""
        self.refused(status)
        if grpc_context is not None:
            grpc_context.set_code(status.code)
            grpc_context.set_details(status.message)
        return reply if reply is not None else convert.reply_to_proto(Reply())

    def _abort(self, grpc_context, status: Status) -> None:
        """End a streaming call with a status: Serve carries a code set on the context along with the exception.

        The exception travels to the proxy by pickle, so it is a builtin one.
        """
        self._refuse(grpc_context, status)
        raise RuntimeError(status.message)


_EMPTY_INFO = ServiceInfo((), (), "", 0, 0)


def _trailers(grpc_context, receipt: Receipt) -> None:
    if grpc_context is not None and receipt.outcome_recorded is not None:
        grpc_context.set_trailing_metadata(receipt.metadata())


def _tokenizer_of(pool: PoolSpec) -> str:
    return pool.tokenizer or pool.target


def _model_name(path: str | None) -> str:
    """What a client learns of a checkpoint: its directory's name, never the path on the node."""
    return Path(path).name if path else ""


async def _until(items: AsyncIterator[Any], deadline: float | None) -> AsyncIterator[Any]:
    """The items, each awaited at most until `deadline` (perf_counter; None = no limit): TimeoutError past it.
    Closing this closes `items`."""
    async with aclosing(items):
        while True:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
                item = await (anext(items) if wait is None else asyncio.wait_for(anext(items), wait))
            except StopAsyncIteration:
                return
            yield item


def chunk_reply(chunk: Chunk, choice: Choice, rid: str, with_choice: bool) -> Reply:
    if not with_choice:
        return Reply(text=chunk.text, token_ids=tuple(chunk.token_ids), request_id=rid)
    return Reply(text=chunk.text, token_ids=tuple(chunk.token_ids), method=choice.method, pool=choice.pool,
                 reason=choice.reason, scores=dict(choice.scores), selector_version=choice.selector_version,
                 request_id=rid)


def final_reply(result: Result, choice: Choice, rid: str, ttft_s: float, wall_s: float, whole: bool) -> Reply:
    """The unary reply (whole=True) or the last stream message (text and token_ids left to the chunks)."""
    s = result.stats
    n = len(result.token_ids)
    acceptance = {"acceptance_length": s.acceptance_length, "acceptance_rate": s.acceptance_rate, "steps": s.steps,
                  "drafts": s.drafts, "drafted": s.drafted, "accepted": s.accepted}
    timings = {"ttft_s": ttft_s, "wall_s": wall_s, "tokens_per_s": n / wall_s if wall_s > 0 else 0.0,
               "worker_wall_s": result.wall_s, "prefill_s": s.prefill_s}
    return Reply(text=result.text if whole else "", token_ids=tuple(result.token_ids) if whole else (),
                 finish_reason=result.finish_reason, method=result.method, pool=choice.pool, reason=choice.reason,
                 scores=dict(choice.scores), selector_version=choice.selector_version, acceptance=acceptance,
                 timings=timings, fallback=s.fallback or "", request_id=rid,
                 prompt_tokens=result.prompt_tokens, completion_tokens=n)


def make_outcome(call: GenerateCall, choice: Choice, rid: str, status: str, wall_s: float,
                 result: Result | None = None, ttft_s: float = 0.0) -> Outcome:
    req, p = call.request, call.request.params
    s = result.stats if result is not None else RequestStats()
    n = len(result.token_ids) if result is not None else 0
    prompt = req.prompt if req.prompt is not None else ",".join(map(str, req.prompt_ids or ()))
    return Outcome(
        request_id=rid, ts=time.time(), source="service", pool=choice.pool, method=choice.method, status=status,
        features=dict(choice.features), prompt_id=hashlib.sha256((prompt or "").encode()).hexdigest()[:16],
        explored=choice.explored, reason=choice.reason, scores=dict(choice.scores),
        selector_version=choice.selector_version, prompt_tokens=result.prompt_tokens if result else 0,
        completion_tokens=n, ttft_s=ttft_s, wall_s=wall_s, tokens_per_s=n / wall_s if wall_s > 0 else 0.0,
        acceptance_length=s.acceptance_length, acceptance_rate=s.acceptance_rate,
        finish_reason=result.finish_reason if result else "", fallback=s.fallback,
        temperature=p.temperature, max_tokens=p.max_tokens, has_constraint=req.constraint is not None)
