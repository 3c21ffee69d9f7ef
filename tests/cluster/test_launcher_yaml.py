"""The cluster launcher YAMLs pass Ray's own validation (what `ray up` runs before it calls the cloud), and agree
with the hardware profiles and the cluster's Serve config. No cloud account is involved."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from metaspec.cluster.profiles import load_profiles
from metaspec.deploy.app import load_serve_file

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in (yaml.safe_load(p.read_text()) or {}))


def ray_validated(config: dict) -> dict:
    """Ray's own steps before `ray up` contacts the provider: defaults merged, then the JSON schema and checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def accelerators(node_type: dict) -> list[str]:
    return [k.split(":", 1)[1] for k in node_type.get("resources", {}) if k.startswith("accelerator_type:")]


def test_there_is_an_aws_launcher():
    assert CLUSTER / "aws.yaml" in LAUNCHERS


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_ray_accepts_the_launcher_config(path):
    config = yaml.safe_load(path.read_text())
    full = ray_validated(config)
    types = full["available_node_types"]
    head = types[full["head_node_type"]]
    workers = {n: t for n, t in types.items() if n != full["head_node_type"]}
    assert not accelerators(head) and not head["resources"].get("GPU")
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU")}
    assert len({a for t in gpu_types.values() for a in accelerators(t)}) >= 2     # heterogeneous GPUs
    for name, t in gpu_types.items():
        assert len(accelerators(t)) == 1, name                      # one GPU type per node type
        assert t["resources"][f"accelerator_type:{accelerators(t)[0]}"] == 1   # as Ray itself advertises it
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= full["max_workers"]
    assert "." in full["file_mounts"].values()                     # the checkout goes to every node ...
    assert any("pip install" in c and "metaspec" in c for c in full["setup_commands"])   # ... and is installed


def test_the_container_runs_this_ray_version_on_python_3_11():
    import ray

    docker = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image


@pytest.mark.parametrize("breakage", [
    lambda c: c["available_node_types"]["gpu.l4"]["resources"].update({"GPU": 0.5}),   # resources are integers
    lambda c: c["available_node_types"]["gpu.l4"].update({"gpus": 1}),                 # unknown key
    lambda c: c.update({"head_node_type": "gpu.h100"}),                                # no such node type
    lambda c: c.update({"max_workers": 0}),                                            # < sum of min_workers
])
def test_ray_validation_refuses_a_broken_config(breakage):
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    breakage(config)
    with pytest.raises(Exception):   # jsonschema.ValidationError or ValueError, as `ray up` raises them
        ray_validated(config)


def test_every_gpu_profile_names_a_node_type_that_offers_it():
    types = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    for p in load_profiles().values():
        t = types[p.node_type]
        assert t["node_config"]["InstanceType"] == p.instance_type, p.name
        if p.gpus_per_replica:
            assert accelerators(t) == [p.accelerator] and t["resources"]["GPU"] >= p.gpus_per_replica, p.name


@pytest.fixture
def node_env(monkeypatch):
    """What aws.yaml's start commands export on every node for cluster/serve.yaml."""
    monkeypatch.setenv("METASPEC_REDIS_URL", "redis://10.0.0.5:6380/0")
    monkeypatch.setenv("METASPEC_REDIS_PASSWORD", "s3cret")


def test_the_cluster_serve_config_fits_the_launcher_s_nodes(node_env):
    """Every pool of cluster/serve.yaml (all its bundles, together) fits on one node type of aws.yaml."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / "serve.yaml").read_text()))
    cfg, opts = load_serve_file(CLUSTER / "serve.yaml")
    types = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    for pool in cfg.pools:
        bundles = pool.placement_bundles or ({"CPU": pool.threads, "GPU": pool.num_gpus} | pool.resources,)
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        fits = [n for n, t in types.items() if all(t["resources"].get(k, 0) >= v for k, v in need.items())]
        assert fits, f"pool {pool.name} needs {need} on one node"
    assert cfg.router.resources and all(types["head"]["resources"].get(k, 0) >= v
                                        for k, v in cfg.router.resources.items())


def test_the_cluster_keeps_token_auth_and_the_dashboard_off_public_interfaces():
    data = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head = " ".join(data["head_start_ray_commands"])
    workers = " ".join(data["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=0.0.0.0" not in head and "--dashboard-host=127.0.0.1" in head
    assert "~/.ray/auth_token" in data["file_mounts"]


def _commands(data: dict, key: str) -> str:
    return "\n".join(data[key])


def test_no_dashboard_or_secret_on_a_command_line_and_every_secret_comes_from_the_mounted_files():
    data = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    every = "\n".join(c for k in ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                                   "worker_start_ray_commands") for c in data[k])
    assert "0.0.0.0:8265" not in every and "--include-dashboard=true" not in every
    assert "--requirepass" not in every and "redis-cli -a" not in every    # no password in any argv
    secrets = "~/.metaspec/secrets"
    assert data["file_mounts"][secrets] == secrets
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = _commands(data, key)
        assert f'METASPEC_REDIS_PASSWORD="$(cat {secrets}/redis_password)"' in start, key
        assert "METASPEC_REDIS_URL=" in start and "RAY_AUTH_MODE=token ray start" in start, key


def test_the_tables_redis_on_the_head_requires_the_password(tmp_path):
    """The head's own Redis lines of aws.yaml, run here (HOME = a temp dir holding the secret, another port):
    a client without the password is refused, one with it is served."""
    import shutil
    import socket
    import subprocess

    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on this machine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    lines = [c for c in data["head_start_ray_commands"] if "redis" in c and "ray start" not in c]
    assert any("requirepass" in c and c.rstrip().endswith("| redis-server -") for c in lines)
    (tmp_path / ".metaspec" / "secrets").mkdir(parents=True)
    (tmp_path / ".metaspec" / "secrets" / "redis_password").write_text("pw-from-the-file\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    for line in lines:
        line = line.replace("6380", str(port)).replace("bind 0.0.0.0", "bind 127.0.0.1")
        subprocess.run(["bash", "-c", line], env=env, check=True, timeout=30, cwd=tmp_path)
    try:
        anonymous = redis.Redis(port=port, socket_timeout=5)
        for _ in range(50):
            try:
                anonymous.ping()
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                import time
                time.sleep(0.1)
        else:
            pytest.fail("Redis answered without the password")
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("x", "1")
        assert redis.Redis(port=port, password="pw-from-the-file", socket_timeout=5).ping()
    finally:
        redis.Redis(port=port, password="pw-from-the-file").shutdown(nosave=True)


def test_the_cluster_service_reads_the_redis_url_and_password_from_each_node_s_environment(node_env, monkeypatch):
    text = (CLUSTER / "serve.yaml").read_text()
    assert "redis_password:" not in text
    cfg, opts = load_serve_file(CLUSTER / "serve.yaml")
    for pool in cfg.pools:
        assert pool.tables.redis_url == "redis://10.0.0.5:6380/0" and pool.tables.redis_password == "s3cret"
        assert "s3cret" not in repr(pool)
    monkeypatch.delenv("METASPEC_REDIS_PASSWORD")
    with pytest.raises(ValueError, match="METASPEC_REDIS_PASSWORD"):
        load_serve_file(CLUSTER / "serve.yaml")


def test_the_cluster_serves_grpc_and_http_with_tls_from_the_mounted_certificate(node_env):
    data = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    _, opts = load_serve_file(CLUSTER / "serve.yaml")
    secrets = "/home/ray/.metaspec/secrets/"      # ~/.metaspec/secrets of aws.yaml's file_mounts, in the container
    assert opts.ingress.tls and opts.ingress.tls_cert_file == secrets + "server.crt"
    assert opts.ingress.tls_key_file == secrets + "server.key" and opts.ingress.host == "0.0.0.0"
    assert data["http_options"]["ssl_certfile"] == secrets + "server.crt"
    assert data["http_options"]["ssl_keyfile"] == secrets + "server.key"
    assert opts.serve_env()["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "metaspec.deploy.ingress.configure_ingress"
