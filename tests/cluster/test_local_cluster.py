"""The whole app on a local multi-node Ray cluster whose nodes advertise fake accelerator types.

Nodes: a head (no accelerator; Serve's controller, the gRPC proxy and the router), an "A10G" node, an "L4" node
and a "mixed" node with A100 and T4 resources (4 GPU ids). Pools, placed by the shipped hardware profiles but
computing on the CPU: `a10g` (tiny target, no drafter), `a100` (tiny pair, PEARL drafter in its own T4 bundle on
the same node) and `l4` (the shipped models, local n-gram tables: the only pool with `ngram_store`, so requests
naming that arm are bound to it). The last test removes the L4 node.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from metaspec.cluster.local import FakeNode, local_cluster
from metaspec.cluster.placement import drafter_visible_devices
from metaspec.deploy.app import ServeOptions, start
from metaspec.deploy.config import load_app_config
from metaspec.protocol.client import Client, ServiceError
from ..conftest import free_port

APP = "metaspec-cluster-test"
HEAD = FakeNode(num_cpus=1, resources={"ingress": 1.0})
A10G = FakeNode(num_cpus=1, num_gpus=1, accelerators=("A10G",))
L4 = FakeNode(num_cpus=1, num_gpus=1, accelerators=("L4",))
MIXED = FakeNode(num_cpus=2, num_gpus=4, accelerators=("A100", "T4"))
DEADLINE_S = 120.0   # every call has one: a hung request fails the test with DEADLINE_EXCEEDED instead of hanging it
SLOW_MACHINE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@dataclass
class Service:
    address: str
    cluster: object
    nodes: dict[str, object]        # "a10g" / "l4" / "mixed" -> ray._private.node.Node


def _free_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def service(tiny_pair, shipped_pair, tmp_path_factory):
    from ray import serve

    tiny = {"target": tiny_pair.target, "device": "cpu", "tables": None}
    cfg = load_app_config({
        "pools": [
            tiny | {"name": "a10g", "profile": "a10g", "drafter": ""},
            tiny | {"name": "a100", "profile": "a100", "drafter": tiny_pair.drafter,
                    "pearl_drafter": {"profile": "t4", "device": "cpu"}},
            {"name": "l4", "profile": "l4", "device": "cpu", "target": shipped_pair.target,
             "drafter": shipped_pair.drafter, "tables": {}, "max_ongoing_requests": 8},
        ],
        "router": {"resources": {"ingress": 0.001}, "outcome_dir": str(tmp_path_factory.mktemp("outcomes")),
                   "max_tokens_limit": 1500, "outcome_fsync": False}})
    with local_cluster(HEAD, [A10G, L4, MIXED]) as (cluster, nodes):
        try:
            port = _free_port()
            start(cfg, ServeOptions(grpc_port=port, http_port=_free_port(), proxy_location="HeadOnly",
                                    app_name=APP, controller_env=SLOW_MACHINE))
            yield Service(f"127.0.0.1:{port}", cluster, dict(zip(("a10g", "l4", "mixed"), nodes)))
        finally:
            serve.shutdown()


@pytest.fixture
def client(service):
    with Client(service.address, timeout_s=DEADLINE_S) as c:
        yield c


def replicas() -> dict[str, list]:
    """Alive Serve replica actors by deployment name (Ray's state API)."""
    from ray.util.state import list_actors

    out: dict[str, list] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000):
        if actor.class_name.startswith("ServeReplica:"):
            out.setdefault(actor.class_name.rsplit(":", 1)[-1], []).append(actor)
    return out


# ---- placement --------------------------------------------------------------------------------------------------

def test_each_pool_runs_on_the_node_its_profile_asks_for(service):
    where = {name: {a.node_id for a in actors} for name, actors in replicas().items()}
    nodes = service.nodes
    assert where["DecodeWorker-a10g"] == {nodes["a10g"].node_id}
    assert where["DecodeWorker-l4"] == {nodes["l4"].node_id}
    assert where["DecodeWorker-a100"] == {nodes["mixed"].node_id}
    assert where["Router"] == {service.cluster.head_node.node_id}   # pinned by its `ingress` resource


def test_pearl_drafter_gets_a_bundle_of_its_own_on_the_target_s_node(service):
    import ray

    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    pearl = [g for g in groups if any("accelerator_type:T4" in b for b in g["bundles"].values())]
    assert len(pearl) == 1, groups
    bundles, on = pearl[0]["bundles"], pearl[0]["bundles_to_node_id"]
    assert bundles[0]["accelerator_type:A100"] > 0 and bundles[0]["GPU"] == 1      # the replica: the target's GPU
    assert bundles[1]["accelerator_type:T4"] > 0 and bundles[1]["GPU"] == 1        # the drafter: a cheaper one
    assert set(on.values()) == {service.nodes["mixed"].node_id} and pearl[0]["strategy"] == "STRICT_PACK"


def test_drafter_visible_devices_names_the_gpu_of_the_drafter_bundle(service):
    """What a PEARL replica does at start, in a placement group of its own: the GPU Ray reserved in bundle 1 is
    another GPU than the replica's (bundle 0)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=1)
    def ids() -> tuple[list[str], str | None]:
        own = [str(i) for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]]
        return own, drafter_visible_devices(1)

    group = ray.util.placement_group([{"GPU": 1, "accelerator_type:A100": 0.001},
                                      {"GPU": 1, "accelerator_type:T4": 0.001}], strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=DEADLINE_S)
        own, drafter = ray.get(ids.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote(),
                               timeout=DEADLINE_S)
        assert len(own) == 1 and drafter is not None and drafter.isdigit() and drafter not in own
    finally:
        ray.util.remove_placement_group(group)


def test_pearl_on_the_placed_pool_is_lossless_and_its_drafter_uses_its_bundle(service, client):
    prompt = "def fibonacci(n):"
    pearl = client.generate(prompt, method="pearl", max_tokens=48, ignore_eos=True)
    ar = client.generate(prompt, method="ar", max_tokens=48, ignore_eos=True)
    assert (pearl.pool, pearl.method, ar.pool) == ("a100", "pearl", "a10g")   # a10g: the same tiny target
    assert pearl.token_ids == ar.token_ids and not pearl.fallback
    (replica,) = replicas()["DecodeWorker-a100"]
    drafters = [pid for pid in _children(replica.pid) if b"metaspec.workers.pearl" in _read(pid, "cmdline")]
    assert len(drafters) == 1
    env = dict(v.split(b"=", 1) for v in _read(drafters[0], "environ").split(b"\0") if b"=" in v)
    assert env.get(b"CUDA_VISIBLE_DEVICES", b"").isdigit()   # one GPU id: its bundle's, not inherited


def _read(pid: int, what: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        stat = _read(int(entry), "stat") if entry.isdigit() else b""
        if stat and int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


# ---- the selector's view and serving ---------------------------------------------------------------------------

def test_pools_describe_the_hardware_of_their_profiles(client):
    pools = {p.name: p.hardware for p in client.list_methods().pools}
    assert pools["a10g"] == {"accelerator": "A10G", "mem_gb": "24.0", "rel_speed": "1.0", "devices": "1"}
    assert (pools["l4"]["accelerator"], pools["l4"]["rel_speed"]) == ("L4", "0.5")
    assert (pools["a100"]["accelerator"], pools["a100"]["devices"]) == ("A100", "2")   # its drafter's device


def test_every_pool_answers_over_grpc(client):
    served = {m: client.generate("for i in range(10):", method=m, max_tokens=16, ignore_eos=True)
              for m in ("ar", "sps", "ngram_store")}
    assert {m: r.pool for m, r in served.items()} == {"ar": "a10g", "sps": "a100", "ngram_store": "l4"}
    assert all(len(r.token_ids) == 16 for r in served.values())


# ---- losing a node (last: it changes the cluster) --------------------------------------------------------------

def test_losing_a_node_leaves_the_other_pools_serving_and_no_request_hangs(service, client):
    streams: list[dict] = [{"chunks": 0, "status": None} for _ in range(3)]
    started = threading.Event()

    def consume(record: dict) -> None:   # a long answer from the L4 pool, in flight when its node goes
        try:
            for reply in client.stream("import os\n", method="ngram_store", max_tokens=1400, ignore_eos=True):
                record["chunks"] += 1
                started.set()
            record["status"] = "OK"
        except ServiceError as exc:
            record["status"] = exc.code

    threads = [threading.Thread(target=consume, args=(r,)) for r in streams]
    for t in threads:
        t.start()
    assert started.wait(DEADLINE_S), streams
    service.cluster.remove_node(service.nodes["l4"])
    for t in threads:
        t.join(DEADLINE_S + 30)
    assert all(not t.is_alive() for t in threads)
    assert {r["status"] for r in streams} <= {"OK", "UNAVAILABLE"}, streams   # never DEADLINE_EXCEEDED
    print("in-flight streams on the lost pool:", streams)

    with pytest.raises(ServiceError) as lost:                       # bound to the lost pool: refused at once
        client.generate("import os\n", method="ngram_store", max_tokens=8)
    assert lost.value.code == "UNAVAILABLE"
    rerouted = client.generate("def add(a, b):", method="sps", max_tokens=16, ignore_eos=True)
    assert rerouted.pool == "a100"                                  # sps ran on l4 too; now on the pool left
    for _ in range(3):
        reply = client.generate("def add(a, b):", max_tokens=16, ignore_eos=True)   # the policy's choice
        assert reply.pool in ("a10g", "a100") and len(reply.token_ids) == 16
    health = {p.name: p.ok for p in client.health().pools}
    assert health == {"a10g": True, "a100": True, "l4": False}
