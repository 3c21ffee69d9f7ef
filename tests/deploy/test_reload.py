"""The learnt selector changes under load without a restart and without failing a request, in a running Ray Serve
app reached through a real gRPC channel; and the shared n-gram table feeds the router's `ngram_table_hit` feature.

The app is deployed the way `serve deploy` deploys a config file (the controller's apply_config), so that a changed
Router `user_config` is applied in place by `reconfigure` rather than by replacing replicas.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from metaspec.deploy.app import GRPC_SERVICER
from metaspec.protocol.client import Client, ServiceError
from metaspec.workers.outcome_log import outcome_files, read_outcomes

from ..selector.synth import HARDWARE, synthetic_outcomes
from .conftest import QUICK_SHUTDOWN, stop_serve
from .test_service import SLOW_MACHINE, _free_port, redis_server, wait_for   # noqa: F401 (a fixture)

APP = "metaspec-reload"
CHECK_S = 0.5          # the router looks at its selector file at most this often
CLIENTS, PER_CLIENT = 8, 5


@dataclass(frozen=True)
class App:
    address: str
    outcome_dir: Path
    files: dict[str, Path]          # selector version -> its file (each trained on the synthetic table)
    watched: Path                   # the file the router starts with and watches
    args: dict


def write_selector(path: Path, version: str, kind: str = "ridge") -> None:
    """What `metaspec retrain --out path` does: fit, then an atomic replace of the file with a new version."""
    from metaspec.selector.train import build_table, design, fit_model

    table = build_table(synthetic_outcomes(30, seed=len(version)))
    model = fit_model(table, kind, meta={"version": version})
    model.save(path, design(table, model.methods)[0][:8])


def deploy(args: dict, port: int, router_user_config: dict | None = None) -> None:
    """Deploy (or redeploy) the app from a config, as `serve deploy` would."""
    from ray.serve._private.api import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {"name": APP, "route_prefix": f"/{APP}", "import_path": "metaspec.deploy.app:build_app", "args": args}
    if router_user_config is not None:
        app["deployments"] = [{"name": "Router", "user_config": router_user_config}]
    config = {"proxy_location": "EveryNode", "grpc_options": {"port": port, "grpc_servicer_functions": [GRPC_SERVICER]},
              "applications": [app]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def running() -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app is not None and app.status == "RUNNING" and all(d.status == "HEALTHY"
                                                                for d in app.deployments.values())


def replicas(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


@pytest.fixture(scope="module")
def app(ray_local, tiny_pair, tmp_path_factory, redis_server):
    from ray import serve
    from ray.serve.config import gRPCOptions

    root = tmp_path_factory.mktemp("reload")
    files = {v: root / f"{v}.skops" for v in ("v1", "v2", "v3")}
    watched = root / "selector.skops"
    write_selector(watched, "v1")
    args = {"pools": [{"name": "a", "target": tiny_pair.target, "drafter": tiny_pair.drafter, "hardware": HARDWARE,
                       "max_ongoing_requests": 4, "max_queued_requests": 16,
                       "tables": {"redis_url": redis_server.url}}],
            "router": {"selector": str(watched), "explore": 0.0, "selector_check_s": CHECK_S,
                       "outcome_dir": str(root / "outcomes"), "default_max_tokens": 4}}
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]),
                    controller_options={"runtime_env": {"env_vars": SLOW_MACHINE | QUICK_SHUTDOWN}})
        deploy(args, port)
        wait_for(running, "the app to run", 300)
        yield App(f"127.0.0.1:{port}", root / "outcomes", files, watched, args)
    finally:
        stop_serve()


@pytest.fixture(scope="module")
def client(app):
    with Client(app.address, timeout_s=120) as c:
        wait_for(lambda: _answers(c), "the gRPC ingress to answer", 300)
        yield c


def _answers(client) -> bool:
    try:
        return client.generate("ready?", max_tokens=1).completion_tokens == 1
    except ServiceError as exc:
        print("not ready:", exc)
        return False


def logged(app: App) -> dict[str, object]:
    return {o.request_id: o for o in read_outcomes(outcome_files(app.outcome_dir))}


def load_while(client, change, new_version: str, tag: str) -> dict[int, list[tuple[str, str]]]:
    """CLIENTS threads send short requests; once each has done a few, `change()` runs; each thread keeps going
    until it has done PER_CLIENT requests and the service answered with `new_version` (a liveness bound of 300 s,
    not a speed assertion). Returns, per thread, its (request id, selector_version or error code) in order."""
    seen = threading.Event()
    results: dict[int, list[tuple[str, str]]] = defaultdict(list)
    deadline = time.monotonic() + 300

    def one(idx: int) -> None:
        i = 0
        while (i < PER_CLIENT or not seen.is_set()) and time.monotonic() < deadline:
            rid = f"{tag}-{idx}-{i}"
            try:
                reply = client.generate(f"def f{idx}_{i}(x):", max_tokens=4, ignore_eos=True, request_id=rid)
                results[idx].append((rid, reply.selector_version))
                if reply.selector_version == new_version:
                    seen.set()
            except ServiceError as exc:
                results[idx].append((rid, exc.code))
            i += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one, i) for i in range(CLIENTS)]
        wait_for(lambda: all(len(results[i]) >= 2 for i in range(CLIENTS)), "every client to be mid-load", 300)
        change()
        for f in futures:
            f.result()
    return results


def check_nothing_dropped(app: App, results, old: str, new: str) -> None:
    flat = [r for rows in results.values() for r in rows]
    assert len(flat) >= CLIENTS * PER_CLIENT
    assert {v for _, v in flat} <= {old, new}, flat                  # every request answered, none failed
    assert any(v == old for _, v in flat) and any(v == new for _, v in flat)
    for rows in results.values():                                    # once a client saw the new selector, it
        versions = [v for _, v in rows]                              # never got the old one back
        assert versions == sorted(versions, key=lambda v: v == new), versions
    records = wait_for(lambda: (log := logged(app)) and all(rid in log for rid, _ in flat) and log, "outcomes")
    assert all(records[rid].status == "OK" and records[rid].selector_version == v for rid, v in flat)


def test_a_new_selector_file_swaps_in_under_load_and_no_request_fails(app, client):
    assert client.list_methods().selector_version == "v1"
    results = load_while(client, lambda: write_selector(app.watched, "v2", kind="rf"), "v2", "file")
    check_nothing_dropped(app, results, "v1", "v2")
    assert client.list_methods().selector_version == "v2"


def test_a_corrupted_file_is_refused_with_a_logged_error_and_the_current_selector_stays(app, client):
    good = app.watched.read_bytes()
    tmp = app.watched.with_name("incoming.tmp")
    tmp.write_bytes(good[: len(good) // 2])
    tmp.replace(app.watched)                                         # a truncated file appears

    def refusal_logged() -> bool:
        client.generate("poke", max_tokens=1)                        # requests drive the (cheap) file check
        return any("refused, keeping selector v2" in p.read_text(errors="replace") for p in router_logs())

    wait_for(refusal_logged, "the router to log the refusal", 120)
    for i in range(6):
        reply = client.generate(f"still fine {i}", max_tokens=4)
        assert reply.completion_tokens == 4 and reply.selector_version == "v2"


def test_reconfigure_switches_the_file_in_place_under_load(app, client):
    """`serve deploy` with a new Router user_config: the same router replica serves on with the new file."""
    write_selector(app.files["v3"], "v3")
    routers, workers = replicas("Router"), replicas("DecodeWorker-a")
    assert len(routers) == 1
    user_config = {"selector": str(app.files["v3"]), "explore": 0.0, "selector_check_s": CHECK_S}
    results = load_while(client, lambda: deploy(app.args, int(app.address.rsplit(":", 1)[1]), user_config), "v3",
                         "reconfigure")
    check_nothing_dropped(app, results, "v2", "v3")
    wait_for(running, "the app to settle", 120)
    assert replicas("Router") == routers and replicas("DecodeWorker-a") == workers   # nothing restarted
    assert client.list_methods().selector_version == "v3"


def test_the_shared_ngram_table_feeds_the_selector_feature(app, client):
    """A text the workers emitted (learnt into the shared table, synced through Redis to the router's mirror)
    gives a later prompt ending in it a non-zero `ngram_table_hit`; an unrelated prompt gets 0."""
    first = client.generate("def fibonacci(n):", max_tokens=48, ignore_eos=True, method="ngram_store")
    prompt = "def fibonacci(n):" + first.text

    def hit() -> float:
        rid = f"hit-{time.monotonic_ns()}"
        client.generate(prompt, max_tokens=1, request_id=rid)
        return wait_for(lambda: logged(app).get(rid), "its outcome").features["ngram_table_hit"]

    assert wait_for(lambda: hit() > 0, "the router's table to learn the emitted text", 120)
    client.generate("zzqx unrelated 9876", max_tokens=1, request_id="no-hit")
    assert wait_for(lambda: logged(app).get("no-hit"), "its outcome").features["ngram_table_hit"] == 0.0


def router_logs() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return sorted(logs.glob(f"replica_{APP}_Router_*.log"))


@pytest.mark.parametrize("ids", [[512], [1, 2, 512], [-1]], ids=["vocab", "vocab-last", "negative"])
def test_token_ids_outside_the_vocabulary_are_invalid_argument_under_the_learnt_selector(app, client, ids):
    """The learnt selector featurizes the prompt before any worker sees it: the ids are checked against the pools'
    vocabulary (512 in the tiny pair) before it does, so they are a bad argument, never INTERNAL."""
    with pytest.raises(ServiceError) as err:
        client.generate(ids, max_tokens=2)
    assert err.value.code == "INVALID_ARGUMENT" and "prompt_ids must be token ids in" in err.value.message
    assert client.generate("still serving", max_tokens=1).completion_tokens == 1


def test_the_batchs_drafting_mix_reaches_the_recorded_features(client, app):
    """A request chosen while another drafts with a model on its pool records it (load_model_drafting), from the
    router's own in-flight counts by the registry's `drafts`; the same request on an idle pool records none.
    Three tries: the long stream may end before the probe is chosen (then a try shows no peer at all)."""
    long = dict(max_tokens=600, ignore_eos=True, method="sps")
    client.generate("mix idle", max_tokens=2, method="sps", request_id="mix-idle")
    assert logged(app)["mix-idle"].features["load_model_drafting"] == 0.0
    seen = []
    for i in range(3):
        stream = client.stream("mix long", request_id=f"mix-long-{i}", **long)
        next(stream)                                     # in flight now
        client.generate("mix probe", max_tokens=2, method="sps", request_id=f"mix-probe-{i}")
        stream.close()
        feats = logged(app)[f"mix-probe-{i}"].features
        seen.append((feats["load_running"], feats["load_model_drafting"], feats["load_lookup_drafting"]))
        if seen[-1] == (1.0, 1.0, 0.0):
            break
    assert seen[-1] == (1.0, 1.0, 0.0), seen


def test_api_keys_rotate_and_quotas_apply_in_place_through_user_config(app, client):
    """`serve deploy` with a changed Router user_config: keys are required, then rotated, and a key over its
    request quota answers RESOURCE_EXHAUSTED; no Router replica restarts. (Last: it leaves the app without keys.)"""
    from metaspec.deploy.config import hash_api_key

    routers = replicas("Router")
    selector = {"selector": str(app.watched), "explore": 0.0, "selector_check_s": CHECK_S}
    deploy(app.args, int(app.address.rsplit(":", 1)[1]), selector | {
        "api_key_hashes": [hash_api_key("key-1")], "key_quota": {"requests_per_min": 4}})

    def refused(key: str | None) -> str | None:
        with Client(app.address, api_key=key, timeout_s=60) as other:
            try:
                other.generate("who?", max_tokens=1)
                other.health()
            except ServiceError as exc:
                return exc.code
        return None

    wait_for(lambda: refused(None) == "UNAUTHENTICATED", "keys to be required", 120)
    assert refused("key-1") is None                                  # 2 of key-1's 4 requests this minute
    deploy(app.args, int(app.address.rsplit(":", 1)[1]), selector | {
        "api_key_hashes": [hash_api_key("key-1"), hash_api_key("key-2")], "key_quota": {"requests_per_min": 4}})
    wait_for(lambda: refused("key-2") is None, "key-2 to be accepted", 120)
    with Client(app.address, api_key="key-1", timeout_s=60) as one:
        codes = []
        for _ in range(4):
            try:
                one.generate("quota", max_tokens=1)
                codes.append("OK")
            except ServiceError as exc:
                codes.append(exc.code)
    assert codes[-1] == "RESOURCE_EXHAUSTED" and codes.count("OK") >= 1, codes
    deploy(app.args, int(app.address.rsplit(":", 1)[1]), selector | {"api_key_hashes": [hash_api_key("key-2")]})
    wait_for(lambda: refused("key-1") == "UNAUTHENTICATED", "key-1 to be revoked", 120)
    assert replicas("Router") == routers                             # in place: the same replica throughout
