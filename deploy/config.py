"""Deployment config: pydantic models at the YAML edge, converted once into frozen dataclasses.

The YAML (deploy/metaspec.yaml) is a Ray Serve config file; its application's `args` are an `AppModel`:

    pools:
      - name: cpu
        threads: 1
        num_replicas: 1
        hardware: {accelerator: cpu, rel_speed: 1.0}
    router: {num_replicas: 1, default_max_tokens: 128, max_tokens_limit: 1024}
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

import metaspec
from metaspec.cluster.placement import pool_placement
from metaspec.cluster.profiles import DEFAULT_PROFILES, HardwareProfile, load_profiles

CHECKPOINTS = Path(metaspec.__file__).resolve().parent / "checkpoints"   # the shipped target and drafter
BATCH_HEADROOM = 4   # a pool's default max_ongoing_requests is max_batch + this: requests in setup beside the batch


# ---- the frozen dataclasses the code uses ---------------------------------------------------------------------

@dataclass(frozen=True)
class TablesSpec:
    """The shared n-gram / Token Recycling tables (arms `ngram_store`, `recycling`), synced through Redis."""

    redis_url: str | None = None                # None = tables local to each replica, nothing shared
    redis_username: str | None = None           # ACL user
    redis_password: str | None = field(default=None, repr=False)  # a secret from this config, never hard-coded
    redis_tls: bool = False                     # TLS even for a redis:// URL
    redis_tls_ca_file: str | None = None        # CA bundle for the server's certificate


@dataclass(frozen=True)
class PoolSpec:
    """One worker pool: a model pair on one hardware profile, served by identical DecodeWorker replicas."""

    name: str                                   # pool name, unique in the app ("cpu", "a10g"...)
    target: str                                 # target checkpoint directory (HF format)
    drafter: str | None                         # drafter checkpoint sharing the tokenizer; None = no draft model
    tokenizer: str | None = None                # tokenizer directory; None = the target's
    dtype: str = "float32"                      # compute dtype of both models
    device: str = "cpu"                         # torch device inside the replica
    threads: int = 1                            # torch intra-op threads per replica
    k_max: int = 8                              # longest draft per step
    max_batch: int = 16                         # requests one replica's step loop decodes at once (its KV slots)
    prefill_chunk: int = 256                    # prompt tokens one request prefills per step
    step_tokens: int = 2048                     # tokens one step may score (decoding requests first, then prefill)
    kv_mem_gb: float | None = None              # cap on the replica's KV pool (fewer slots if it binds); None = none
    slot_tokens: int | None = None              # cache positions per slot; None = the target's context window
    max_waiting: int = 256                      # requests waiting for a KV slot before RESOURCE_EXHAUSTED
    draft_budget: bool = True                   # cut drafts that do not pay for their share of a step's forward
    draft_guard: bool = False                   # and run plain steps while they measure faster
    guard_from_batch: int = 16                  # ... on batches of at least this many decoding requests
    cap_sampled_drafts: bool = False            # the budget may cap sampled drafts too (seeds then reproduce per batch)
    learnt_acceptance: bool = True              # the budget prices drafts by acceptance learnt per arm, sampling, match
    pearl_lanes: int = 4                        # pearl requests the replica's PEARL drafter serves at once (batched)
    num_replicas: int = 1                       # replicas of this pool
    max_ongoing_requests: int = 16 + BATCH_HEADROOM   # requests Serve hands one replica (max_batch + headroom:
                                                # the batch fills while a few more are set up, tokenized, compiled)
    max_queued_requests: int = 16               # per caller; beyond this the router answers RESOURCE_EXHAUSTED
    hardware: dict[str, Any] = field(default_factory=dict)       # profile the selector sees (accelerator...)
    num_cpus: float | None = None               # Ray CPUs per replica; None = threads
    num_gpus: float = 0.0                       # Ray GPUs per replica
    resources: dict[str, float] = field(default_factory=dict)    # custom Ray resources (node type, accelerator)
    tables: TablesSpec | None = TablesSpec()    # shared tables; None = the table-driven arms are unavailable
    profile: str | None = None                  # hardware profile it was placed by (cluster/profiles.yaml)
    placement_bundles: tuple[dict[str, float], ...] = ()   # placement group, one bundle per device (0: the replica,
                                                # 1: the PEARL drafter's own device); () = no placement group
    placement_strategy: str = "STRICT_PACK"     # of that group: the drafter shares memory with its replica
    drafter_bundle: int | None = None           # bundle of the PEARL drafter's device; None = pearl's defaults
    drafter_device: str | None = None           # torch device of the PEARL drafter process in its bundle


@dataclass(frozen=True)
class Quota:
    requests_per_min: int | None = None    # requests one API key may start per minute; None = no limit
    tokens_per_min: int | None = None      # prompt + completion tokens one key may use per minute; None = no limit


@dataclass(frozen=True)
class RouterSpec:
    num_replicas: int = 1                       # one per node on a cluster (with proxy_location: EveryNode)
    max_replicas_per_node: int | None = None    # 1 spreads the routers over nodes; each proxy prefers its node's
    max_ongoing_requests: int = 256             # requests one router replica holds at once
    max_queued_requests: int = 512              # per proxy; beyond this the proxy answers RESOURCE_EXHAUSTED
    default_max_tokens: int = 128               # when a request leaves max_tokens unset
    max_tokens_limit: int = 2048                # requests asking for more get INVALID_ARGUMENT
    max_prompt_chars: int = 200_000             # longer text prompts get INVALID_ARGUMENT before tokenizing
    methods: tuple[str, ...] = ("sps", "pld", "ar")   # fixed policy: first method the chosen pool can run
    selector: str = "fixed"                     # "fixed" (the policy above), "default" (the shipped learnt
                                                # selector; fixed without one) or a selector model file
    explore: float = 0.05                       # share of requests the learnt selector sends to another arm
    selector_check_s: float = 5.0               # look for a new selector file at most this often (0 = only on
                                                # reconfigure); `selector`, `explore` and this are the Router's
                                                # user_config: `serve deploy` changes them without a restart
    outcome_dir: str = "~/.metaspec/outcomes"   # per-node directory of the outcome log (expanded on the node)
    outcome_max_bytes: int = 64 << 20           # rotate an outcome file past this size
    outcome_fsync: bool = True                  # sync each record to disk before replying (False: the write only,
                                                # which survives process kills but not power loss)
    outcome_fsync_before_reply: bool = True     # False: reply once the record is written; its fsync follows at
                                                # once (a power loss can lose that last batch, a kill cannot)
    api_key_hashes: tuple[str, ...] = ()        # sha256 hex digests of accepted API keys; empty (and no file) =
                                                # no auth
    api_keys_file: str | None = None            # a file of further digests on the router's node (one per line)
    keys_version: str = ""                      # change it (user_config) to make the routers re-read that file
    key_quota: Quota = Quota()                  # every key's quota per router replica (deploy/access.py)
    quotas: dict[str, Quota] = field(default_factory=dict)   # digest -> its own quota
    health_timeout_s: float = 5.0               # a pool that does not answer Health within this is not ok
    resources: dict[str, float] = field(default_factory=dict)    # custom Ray resources per router replica (e.g.
                                                # pin routers to nodes that run a gRPC proxy)
    pool_watch_s: float = 1.0                   # how often the router asks Serve which pools have a running
                                                # replica (pools without one get no requests; 0 = never ask)
    served_model_name: str = "metaspec"         # the model id of the OpenAI HTTP API (GET /v1/models)


@dataclass(frozen=True)
class AppConfig:
    pools: tuple[PoolSpec, ...]
    router: RouterSpec = RouterSpec()


def hash_api_key(key: str) -> str:
    """The digest to list under router.api_key_hashes for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


# ---- pydantic at the YAML edge ------------------------------------------------------------------------------

class TablesModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(default=None, pattern=r"^rediss?://")
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_tls: bool = False
    redis_tls_ca_file: str | None = None
    # Names of environment variables holding the URL / the password (AUTH), read where the app is built (Serve's
    # build task, on a cluster node: cluster/aws.yaml sets both on every node), so no secret is in the YAML.
    redis_url_env: str | None = Field(default=None, min_length=1)
    redis_password_env: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> "TablesModel":
        for name in ("redis_url", "redis_password"):
            if getattr(self, name) is not None and getattr(self, f"{name}_env") is not None:
                raise ValueError(f"give {name} or {name}_env, not both")
        return self

    def to_spec(self) -> TablesSpec:
        secret = self.redis_password.get_secret_value() if self.redis_password is not None else None
        url = self.redis_url
        if self.redis_password_env:
            secret = _required_env(self.redis_password_env, "redis_password_env")
        if self.redis_url_env:
            url = _required_env(self.redis_url_env, "redis_url_env")
            if not url.startswith(("redis://", "rediss://")):
                raise ValueError(f"${self.redis_url_env} (redis_url_env) must be a redis:// or rediss:// URL")
        fields = self.model_dump(exclude={"redis_password", "redis_url", "redis_url_env", "redis_password_env"})
        return TablesSpec(**(fields | {"redis_url": url, "redis_password": secret}))


def _required_env(name: str, field_name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{field_name}: environment variable {name} is not set (or empty) where the app is built")
    return value


class DrafterPlacementModel(BaseModel):
    """The PEARL drafter's own device: a second placement-group bundle on the replica's node."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = None                  # its hardware profile (a cheaper GPU type...); None = the pool's
    device: str | None = None                   # torch device of the drafter process; None = cuda:0 of its bundle
                                                # on a GPU profile, else the pool's device
    cpus: float = Field(default=1.0, gt=0)      # Ray CPUs of its bundle (the drafter process pins one core)


class PoolModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    target: str | None = None                   # None = the shipped target
    drafter: str | None = None                  # None = the shipped drafter; "" = no drafter
    tokenizer: str | None = None
    dtype: str = Field(default="float32", pattern=r"^(float32|bfloat16|float16|auto)$")  # auto: model.resolve_dtype
    device: str | None = None                   # None = the profile's ("cuda" on a GPU), else cpu
    threads: int = Field(default=1, ge=1)
    k_max: int = Field(default=8, ge=1, le=64)
    # the replica's step loop (workers.scheduler.SchedulerConfig; the defaults are its own)
    max_batch: int = Field(default=16, ge=1)
    prefill_chunk: int = Field(default=256, ge=1)
    step_tokens: int = Field(default=2048, ge=1)
    kv_mem_gb: float | None = Field(default=None, gt=0)
    slot_tokens: int | None = Field(default=None, ge=16)
    max_waiting: int = Field(default=256, ge=0)
    draft_budget: bool = True                   # false = every arm drafts what it asks (no load-aware cut)
    draft_guard: bool = False                   # true = plain steps while they measure faster
    guard_from_batch: int = Field(default=16, ge=1)   # the guard acts from this batch size up
    cap_sampled_drafts: bool = False            # true = the budget caps sampled drafts too (samples keep the target's
                                                # distribution; a seed reproduces them only under the same batch)
    learnt_acceptance: bool = True              # false = a fixed 0.6 prior per request, one class (no learnt priors)
    pearl_lanes: int = Field(default=4, ge=1, le=64)   # pearl requests one PEARL drafter drafts for in one forward
    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int | None = Field(default=None, ge=1)   # None = max_batch + BATCH_HEADROOM
    max_queued_requests: int = Field(default=16, ge=-1)
    hardware: dict[str, str | float] = Field(default_factory=dict)
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)   # None = the profile's GPUs per replica (0 without one)
    resources: dict[str, float] = Field(default_factory=dict)
    tables: TablesModel | None = Field(default_factory=TablesModel)   # null = no shared tables
    profile: str | None = None                  # a name in the app's profiles file: placement + selector features
    pearl_drafter: DrafterPlacementModel | None = None   # give the PEARL drafter a device of its own

    def to_spec(self, profiles: Mapping[str, HardwareProfile]) -> PoolSpec:
        target = self.target or str(CHECKPOINTS / "target")
        drafter = str(CHECKPOINTS / "drafter") if self.drafter is None else (self.drafter or None)
        prof = profiles[self.profile] if self.profile else None
        own = self.pearl_drafter
        drafter_prof = (profiles[own.profile] if own.profile else prof) if own else None
        placed = pool_placement(self.threads, prof, drafter_prof, num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                resources=self.resources, drafter_cpus=own.cpus if own else 1.0,
                                drafter_device=own.device if own else None, drafter_own_device=own is not None)
        hardware = prof.hardware(placed.devices()) if prof else ({"devices": placed.devices()} if own else {})
        fields = self.model_dump(exclude={"target", "drafter", "tables", "pearl_drafter", "device", "num_gpus",
                                          "resources", "hardware"})
        tables = self.tables.to_spec() if self.tables is not None else None
        if self.max_ongoing_requests is None:
            fields["max_ongoing_requests"] = self.max_batch + BATCH_HEADROOM
        return PoolSpec(target=target, drafter=drafter, tables=tables, **fields,
                        device=self.device or (prof.device if prof else "cpu"), num_gpus=placed.num_gpus,
                        resources=placed.resources, hardware=hardware | self.hardware,
                        placement_bundles=placed.bundles, placement_strategy=placed.strategy,
                        drafter_bundle=placed.drafter_bundle, drafter_device=placed.drafter_device)


class QuotaModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_min: int | None = Field(default=None, ge=0)
    tokens_per_min: int | None = Field(default=None, ge=0)


class RouterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1)
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(default=512, ge=-1)
    default_max_tokens: int = Field(default=128, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    methods: list[str] = Field(default_factory=lambda: ["sps", "pld", "ar"], min_length=1)
    selector: str = Field(default="fixed", min_length=1)
    explore: float = Field(default=0.05, ge=0, le=1)
    selector_check_s: float = Field(default=5.0, ge=0)
    outcome_dir: str = "~/.metaspec/outcomes"
    outcome_max_bytes: int = Field(default=64 << 20, ge=1024)
    outcome_fsync: bool = True
    outcome_fsync_before_reply: bool = True
    api_key_hashes: list[str] = Field(default_factory=list)
    api_keys_file: str | None = None
    keys_version: str = ""
    key_quota: QuotaModel = Field(default_factory=QuotaModel)
    quotas: dict[str, QuotaModel] = Field(default_factory=dict)
    health_timeout_s: float = Field(default=5.0, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)
    pool_watch_s: float = Field(default=1.0, ge=0)
    served_model_name: str = Field(default="metaspec", min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "RouterModel":
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be <= max_tokens_limit")
        bad = [h for h in [*self.api_key_hashes, *self.quotas]
               if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
        if bad:
            raise ValueError("api_key_hashes and the keys of quotas must be lowercase sha256 hex digests (see "
                             "deploy.config.hash_api_key)")
        return self

    def to_spec(self) -> RouterSpec:
        data = self.model_dump()
        return RouterSpec(**(data | {"methods": tuple(self.methods), "api_key_hashes": tuple(self.api_key_hashes),
                                     "key_quota": Quota(**data["key_quota"]),
                                     "quotas": {d: Quota(**q) for d, q in data["quotas"].items()}}))


class AppModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: list[PoolModel] = Field(default_factory=lambda: [PoolModel(name="cpu")], min_length=1)
    router: RouterModel = Field(default_factory=RouterModel)
    profiles: str | None = None                 # hardware profiles YAML; None = the shipped cluster/profiles.yaml

    @model_validator(mode="after")
    def _unique(self) -> "AppModel":
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _known_profiles(self) -> "AppModel":
        wanted = {n for p in self.pools for n in (p.profile, p.pearl_drafter and p.pearl_drafter.profile) if n}
        if wanted and (unknown := sorted(wanted - set(load_profiles(self.profiles)))):
            raise ValueError(f"unknown hardware profiles {unknown} (see {self.profiles or DEFAULT_PROFILES})")
        return self

    def to_config(self) -> AppConfig:
        profiles = load_profiles(self.profiles) if any(p.profile or p.pearl_drafter for p in self.pools) else {}
        return AppConfig(tuple(p.to_spec(profiles) for p in self.pools), self.router.to_spec())


def load_app_config(args: dict[str, Any] | None) -> AppConfig:
    """Validate a YAML application's `args` (raises pydantic.ValidationError with every problem listed)."""
    return AppModel.model_validate(args or {}).to_config()
