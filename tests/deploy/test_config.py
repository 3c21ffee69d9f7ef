"""The YAML edge: pydantic validation, defaults, the shipped YAML, and the app builder (no Ray needed)."""

from __future__ import annotations


from dataclasses import replace

import pytest
import yaml
from pydantic import ValidationError

from metaspec.deploy.app import DEFAULT_YAML, GRPC_SERVICER, LOW_LATENCY_ENV, build_app, load_serve_file, local_cpus
from metaspec.deploy.config import (BATCH_HEADROOM, CHECKPOINTS, PoolModel, PoolSpec, RouterSpec, hash_api_key,
                                    load_app_config)


def test_defaults_point_at_the_shipped_checkpoints():
    cfg = load_app_config({})
    (pool,) = cfg.pools
    assert pool.target == str(CHECKPOINTS / "target") and pool.drafter == str(CHECKPOINTS / "drafter")
    assert cfg.router == RouterSpec()


def test_empty_drafter_means_no_drafter_and_fields_carry_over():
    cfg = load_app_config({"pools": [{"name": "gpu-a10g", "target": "/m/t", "drafter": "", "threads": 2,
                                      "num_replicas": 3, "max_ongoing_requests": 8, "max_queued_requests": 5,
                                      "hardware": {"accelerator": "A10G", "mem_gb": 24},
                                      "resources": {"accelerator_type:A10G": 0.001}, "num_gpus": 1}],
                           "router": {"methods": ["pld", "ar"], "api_key_hashes": [hash_api_key("k")]}})
    pool = cfg.pools[0]
    assert pool.drafter is None and pool.target == "/m/t"
    assert (pool.threads, pool.num_replicas, pool.max_ongoing_requests, pool.max_queued_requests) == (2, 3, 8, 5)
    assert pool.hardware == {"accelerator": "A10G", "mem_gb": 24} and pool.num_gpus == 1
    assert cfg.router.methods == ("pld", "ar") and cfg.router.api_key_hashes == (hash_api_key("k"),)


def test_tables_default_to_local_and_the_redis_password_stays_out_of_reprs():
    assert load_app_config({}).pools[0].tables.redis_url is None
    cfg = load_app_config({"pools": [{"name": "a", "tables": {"redis_url": "redis://10.0.0.5:6379/0",
                                                              "redis_password": "hunter2"}},
                                     {"name": "b", "tables": None}]})
    a, b = cfg.pools
    assert a.tables.redis_password == "hunter2" and "hunter2" not in repr(cfg) and b.tables is None
    with pytest.raises(ValidationError) as err:
        load_app_config({"pools": [{"name": "a", "tables": {"redis_url": "http://x", "redis_password": "hunter2"}}]})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    ({"pools": []}, "at least 1"),
    ({"pools": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"pools": [{"name": "a b"}]}, "pattern"),
    ({"pools": [{"name": "a", "threads": 0}]}, "greater than or equal to 1"),
    ({"pools": [{"name": "a", "dtype": "int4"}]}, "pattern"),
    ({"pools": [{"name": "a", "thread": 2}]}, "Extra inputs"),
    ({"router": {"default_max_tokens": 900, "max_tokens_limit": 100}}, "default_max_tokens"),
    ({"router": {"api_key_hashes": ["plain-text-key"]}}, "sha256"),
])
def test_bad_configs_are_refused_with_the_reason(args, message):
    with pytest.raises(ValidationError, match=message):
        load_app_config(args)


def test_the_shipped_yaml_is_a_serve_config_naming_the_builder():
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    assert data["grpc_options"]["grpc_servicer_functions"] == [GRPC_SERVICER]
    assert data["proxy_location"] == "EveryNode"
    (app,) = data["applications"]
    assert app["import_path"] == "metaspec.deploy.app:build_app"
    cfg, opts = load_serve_file(DEFAULT_YAML)
    assert opts.grpc_port == 9000 and opts.max_message_bytes == 4 << 20
    assert cfg.pools[0].name == "cpu" and cfg.pools[0].threads == 1


def test_ray_serve_accepts_the_yaml_schema():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(DEFAULT_YAML.read_text()))


def test_build_app_binds_one_worker_deployment_per_pool(tmp_path):
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app({"pools": [{"name": "a", "target": "/t", "threads": 2}, {"name": "b", "target": "/t",
                                                                          "drafter": "", "num_cpus": 0.5}]})
    built = {d.name: d for d in serve_build(app, name="metaspec").deployments}
    assert set(built) == {"Router", "DecodeWorker-a", "DecodeWorker-b"}
    assert built["DecodeWorker-a"].ray_actor_options["num_cpus"] == 2
    assert built["DecodeWorker-b"].ray_actor_options["num_cpus"] == 0.5
    assert built["DecodeWorker-a"].max_ongoing_requests == 16 + BATCH_HEADROOM     # the batch can fill
    spread = build_app({"router": {"num_replicas": 3, "max_replicas_per_node": 1}})
    router = {d.name: d for d in serve_build(spread, name="metaspec").deployments}["Router"]
    assert router.num_replicas == 3 and router._replica_config.max_replicas_per_node == 1


def test_local_ray_gets_enough_cpus_for_every_replica():
    cfg = load_app_config({"pools": [{"name": "a", "threads": 4, "num_replicas": 3}]})
    assert local_cpus(cfg) >= 12


def test_controller_settings_in_the_yaml_reach_serve_options(tmp_path):
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    env = data["controller_options"]["runtime_env"]["env_vars"]
    env |= {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": "1000"}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    _, opts = load_serve_file(path)       # shipped: direct ingress, clients on 9000, the fallback proxy on 9100
    assert opts.controller_env == LOW_LATENCY_ENV | {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
    assert (opts.max_message_bytes, opts.grpc_port, opts.fallback_grpc_port) == (1000, 9000, 9100)
    assert opts.serve_env()["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] == "9000"
    moved = replace(opts, grpc_port=9500, proxy_grpc_port=None)     # `metaspec serve --grpc-port 9500`
    assert (moved.serve_env()["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"], moved.fallback_grpc_port) == ("9500", 9600)

    for key in [k for k in env if k.startswith("RAY_SERVE_") and k not in ("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE",
                                                                            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")]:
        del env[key]                      # Serve's classic proxy: the proxy's port is the service's port
    path.write_text(yaml.safe_dump(data))
    _, opts = load_serve_file(path)
    assert not opts.direct_ingress and (opts.grpc_port, opts.fallback_grpc_port) == (9100, 9100)
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT" not in opts.serve_env()


BATCH_FIELDS = ("max_batch", "prefill_chunk", "step_tokens", "kv_mem_gb", "slot_tokens", "max_waiting", "draft_budget",
                "draft_guard", "guard_from_batch", "cap_sampled_drafts", "learnt_acceptance")


def test_batch_defaults_are_the_schedulers_own():
    from dataclasses import fields

    from metaspec.workers.scheduler import SchedulerConfig

    engine = SchedulerConfig()
    assert {f.name for f in fields(engine)} == set(BATCH_FIELDS)       # a pool sets every step-loop setting
    model, spec = PoolModel(name="a"), PoolSpec(name="a", target="/t", drafter=None)
    for name in BATCH_FIELDS:
        assert getattr(model, name) == getattr(spec, name) == getattr(engine, name), name
    pool = load_app_config({}).pools[0]
    assert pool.max_ongoing_requests == spec.max_ongoing_requests == engine.max_batch + BATCH_HEADROOM


def test_batch_settings_reach_the_worker_config():
    from ray.serve._private.build_app import build_app as serve_build

    batch = {"max_batch": 6, "prefill_chunk": 64, "step_tokens": 512, "kv_mem_gb": 0.5, "slot_tokens": 768,
             "max_waiting": 9, "draft_budget": True, "draft_guard": False, "guard_from_batch": 4,
             "cap_sampled_drafts": True, "learnt_acceptance": False}
    app = build_app({"pools": [{"name": "a", "target": "/t", **batch},
                               {"name": "b", "target": "/t", "max_batch": 3, "max_ongoing_requests": 2}]})
    built = {d.name: d for d in serve_build(app, name="metaspec").deployments}
    (cfg,) = built["DecodeWorker-a"].init_args
    assert {k: getattr(cfg.engine.batch, k) for k in BATCH_FIELDS} == batch
    assert built["DecodeWorker-a"].max_ongoing_requests == 6 + BATCH_HEADROOM   # sized from max_batch
    assert built["DecodeWorker-b"].max_ongoing_requests == 2                    # an explicit value stays
    assert built["DecodeWorker-b"].init_args[0].engine.batch.max_batch == 3


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("prefill_chunk", 0), ("step_tokens", 0),
                                          ("kv_mem_gb", 0), ("slot_tokens", 8), ("max_waiting", -1)])
def test_bad_batch_settings_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        load_app_config({"pools": [{"name": "a", field: value}]})


@pytest.mark.parametrize("path", [DEFAULT_YAML, DEFAULT_YAML.parents[1] / "cluster" / "serve.yaml"])
def test_shipped_yamls_let_the_batch_fill(path):
    for pool in yaml.safe_load(path.read_text())["applications"][0]["args"]["pools"]:
        spec = PoolModel.model_validate(pool)
        ongoing = spec.max_ongoing_requests or spec.max_batch + BATCH_HEADROOM
        assert ongoing >= spec.max_batch, pool["name"]


def test_the_tables_redis_url_and_password_can_come_from_the_environment(monkeypatch):
    tables = {"redis_url_env": "TABLES_URL", "redis_password_env": "TABLES_PASSWORD"}
    monkeypatch.setenv("TABLES_URL", "redis://10.1.2.3:6380/0")
    monkeypatch.setenv("TABLES_PASSWORD", "pw")
    spec = load_app_config({"pools": [{"name": "a", "tables": tables}]}).pools[0].tables
    assert (spec.redis_url, spec.redis_password) == ("redis://10.1.2.3:6380/0", "pw") and "pw" not in repr(spec)
    monkeypatch.setenv("TABLES_URL", "http://nope")
    with pytest.raises(ValueError, match="redis://"):
        load_app_config({"pools": [{"name": "a", "tables": tables}]})
    monkeypatch.delenv("TABLES_PASSWORD")
    with pytest.raises(ValueError, match="TABLES_PASSWORD is not set"):
        load_app_config({"pools": [{"name": "a", "tables": {"redis_password_env": "TABLES_PASSWORD"}}]})
    with pytest.raises(ValueError, match="not both"):
        load_app_config({"pools": [{"name": "a", "tables": {"redis_password": "x", "redis_password_env": "P"}}]})
