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


def test_the_cluster_serve_config_fits_the_launcher_s_nodes():
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
