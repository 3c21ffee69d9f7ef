"""Hardware profiles -> pools: placement (Ray resources, GPUs, PEARL bundles) and what the selector sees."""

from __future__ import annotations

import pytest
import yaml

from metaspec.cluster.profiles import ACCELERATOR_SHARE, DEFAULT_PROFILES, load_profiles
from metaspec.deploy.app import build_app, local_cpus
from metaspec.deploy.config import load_app_config
from metaspec.selector.features import pool_features
from metaspec.selector.rules import allowed
from metaspec.selector.types import PoolInfo


def test_shipped_profiles_load_and_gpus_go_with_a_gpu():
    profiles = load_profiles()
    assert {"cpu", "a10g", "l4", "t4", "a100"} <= set(profiles)
    for p in profiles.values():
        assert (p.accelerator == "cpu") == (p.gpus_per_replica == 0) == (p.resource is None)
    assert profiles["a10g"].resources() == {"accelerator_type:A10G": ACCELERATOR_SHARE}
    assert profiles["a100"].rel_speed > profiles["a10g"].rel_speed > profiles["l4"].rel_speed


@pytest.mark.parametrize("bad", [
    {"profiles": {"x": {"accelerator": "cpu", "mem_gb": 8, "rel_speed": 1, "gpus_per_replica": 1}}},
    {"profiles": {"x": {"accelerator": "L4", "mem_gb": 24, "rel_speed": 0.5}}},              # a GPU, 0 GPUs
    {"profiles": {"x": {"accelerator": "L4", "mem_gb": 24, "rel_speed": 0.5, "gpus": 1}}},   # unknown field
    {"profiles": {"x": {"accelerator": "L4", "mem_gb": 0, "rel_speed": 0.5, "gpus_per_replica": 1}}},
    {"profiles": {}},
])
def test_a_bad_profiles_file_is_refused(tmp_path, bad):
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError):
        load_profiles(path)


def test_a_pool_on_a_profile_is_pinned_to_its_accelerator_and_described_by_it():
    (pool,) = load_app_config({"pools": [{"name": "g", "target": "/t", "profile": "a10g"}]}).pools
    assert pool.resources == {"accelerator_type:A10G": ACCELERATOR_SHARE}
    assert (pool.num_gpus, pool.device, pool.profile, pool.placement_bundles) == (1.0, "cuda", "a10g", ())
    assert pool.hardware == {"accelerator": "A10G", "mem_gb": 24.0, "rel_speed": 1.0, "devices": 1}


def test_explicit_pool_settings_win_over_the_profile():
    (pool,) = load_app_config({"pools": [{
        "name": "g", "target": "/t", "profile": "l4", "device": "cpu", "num_gpus": 0, "resources": {"rack": 1},
        "hardware": {"rel_speed": 0.7}}]}).pools
    assert (pool.device, pool.num_gpus) == ("cpu", 0.0)
    assert pool.resources == {"accelerator_type:L4": ACCELERATOR_SHARE, "rack": 1.0}
    assert pool.hardware["rel_speed"] == 0.7 and pool.hardware["accelerator"] == "L4"


def test_a_pool_without_a_profile_is_unchanged():
    (pool,) = load_app_config({"pools": [{"name": "cpu", "target": "/t", "hardware": {"accelerator": "cpu"}}]}).pools
    assert (pool.device, pool.num_gpus, pool.resources, pool.placement_bundles) == ("cpu", 0.0, {}, ())
    assert pool.hardware == {"accelerator": "cpu"} and pool.drafter_bundle is None


def test_unknown_profiles_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ValueError, match="unknown hardware profiles.*nope"):
        load_app_config({"pools": [{"name": "g", "profile": "nope"}]})
    with pytest.raises(ValueError, match="h200"):
        load_app_config({"pools": [{"name": "g", "profile": "a100", "pearl_drafter": {"profile": "h200"}}]})
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"profiles": {"h200": {"accelerator": "H200", "mem_gb": 141, "rel_speed": 8,
                                                         "gpus_per_replica": 1}}}))
    (pool,) = load_app_config({"profiles": str(own), "pools": [{"name": "g", "target": "/t", "profile": "h200"}]}).pools
    assert pool.resources == {"accelerator_type:H200": ACCELERATOR_SHARE}


def test_a_pearl_drafter_on_a_cheaper_gpu_gets_its_own_bundle_on_the_same_node():
    (pool,) = load_app_config({"pools": [{"name": "p", "target": "/t", "profile": "a100", "threads": 4,
                                          "pearl_drafter": {"profile": "t4"}}]}).pools
    assert pool.placement_bundles == ({"CPU": 4.0, "GPU": 1.0, "accelerator_type:A100": ACCELERATOR_SHARE},
                                      {"CPU": 1.0, "GPU": 1.0, "accelerator_type:T4": ACCELERATOR_SHARE})
    assert (pool.placement_strategy, pool.drafter_bundle, pool.drafter_device) == ("STRICT_PACK", 1, "cuda:0")
    assert pool.hardware["devices"] == 2


def test_a_pearl_drafter_on_the_cpu_path_reserves_a_core():
    (pool,) = load_app_config({"pools": [{"name": "c", "target": "/t", "threads": 2, "pearl_drafter": {}}]}).pools
    assert pool.placement_bundles == ({"CPU": 2.0}, {"CPU": 1.0})
    assert (pool.drafter_bundle, pool.drafter_device, pool.device) == (1, None, "cpu")
    assert pool.hardware == {"devices": 2}
    assert local_cpus(load_app_config({"pools": [{"name": "c", "threads": 40, "pearl_drafter": {"cpus": 2}}]})) >= 42


def test_serve_gets_the_placement_group_and_the_replica_fits_its_first_bundle():
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app({"pools": [{"name": "p", "target": "/t", "profile": "a100", "pearl_drafter": {"profile": "t4"}},
                               {"name": "g", "target": "/t", "profile": "l4"}],
                     "router": {"resources": {"ingress": 0.001}}})
    built = {d.name: d for d in serve_build(app, name="metaspec").deployments}
    p, g = built["DecodeWorker-p"], built["DecodeWorker-g"]
    bundles = p._replica_config.placement_group_bundles
    assert len(bundles) == 2 and p._replica_config.placement_group_strategy == "STRICT_PACK"
    actor = p.ray_actor_options
    first = bundles[0]
    assert actor["num_cpus"] <= first["CPU"] and actor["num_gpus"] <= first["GPU"]
    assert all(first.get(k, 0) >= v for k, v in actor["resources"].items())
    assert g._replica_config.placement_group_bundles is None
    assert g.ray_actor_options["resources"] == {"accelerator_type:L4": ACCELERATOR_SHARE}
    assert built["Router"].ray_actor_options["resources"] == {"ingress": 0.001}


def test_the_selector_sees_each_pool_s_profile():
    """The router builds PoolInfo(name, methods, pool.hardware, load): the profile's values reach the features."""
    cfg = load_app_config({"pools": [{"name": "l4", "target": "/t", "profile": "l4"},
                                     {"name": "a100", "target": "/t", "profile": "a100", "pearl_drafter": {}}]})
    infos = {p.name: PoolInfo(p.name, ("ar", "sps", "pearl"), dict(p.hardware), 0.25) for p in cfg.pools}
    l4, a100 = (pool_features(infos[n].hardware, infos[n].load) for n in ("l4", "a100"))
    assert (l4["pool_accel=L4"], l4["pool_accel=A100"], a100["pool_accel=A100"]) == (1.0, 0.0, 1.0)
    assert (l4["pool_rel_speed"], a100["pool_rel_speed"]) == (0.5, 2.6)
    assert a100["pool_mem_gb_log"] > l4["pool_mem_gb_log"] and l4["pool_load"] == 0.25
    assert allowed("pearl", infos["a100"], has_constraint=False)[0]        # its drafter has a device of its own
    assert not allowed("pearl", infos["l4"], has_constraint=False)[0]


def test_the_profiles_file_is_package_data():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "*.yaml" in data["tool"]["setuptools"]["package-data"]["metaspec.cluster"]
    assert DEFAULT_PROFILES.exists()
