"""Where a pool's replicas run: Ray actor options, and a placement group when the PEARL drafter gets its own device.

A pool on a hardware profile asks for its accelerator's resource (`accelerator_type:A10G`) and GPUs. A pool whose
PEARL drafter has a device of its own gets a placement group with one bundle per device: bundle 0 holds the
replica (the target's device, its CPUs), bundle 1 the drafter's device — possibly a cheaper GPU type. The drafter
is a process the replica starts and talks to through shared memory (workers/pearl.py), so both bundles must be on
one node: the strategy is STRICT_PACK. On a cloud where every node has one GPU type the drafter's type is then the
target's; a node that mixes types (e.g. an on-premise box with an A100 and a T4) can hold a cheaper drafter.

>>> p = pool_placement(threads=4, target=profiles["a100"], drafter=profiles["t4"])
>>> p.bundles
({'CPU': 4.0, 'GPU': 1.0, 'accelerator_type:A100': 0.001}, {'CPU': 1.0, 'GPU': 1.0, 'accelerator_type:T4': 0.001})

At replica start, `drafter_visible_devices` finds which GPU Ray reserved in the drafter's bundle, so the drafter
process gets it as its CUDA_VISIBLE_DEVICES (Ray shows the replica only the GPUs of its own bundle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .profiles import HardwareProfile

PEARL_STRATEGY = "STRICT_PACK"   # the drafter shares memory with its replica: same node, always


@dataclass(frozen=True)
class Placement:
    num_cpus: float                                   # Ray CPUs of one replica
    num_gpus: float = 0.0                             # Ray GPUs of one replica (the target's devices)
    resources: dict[str, float] = field(default_factory=dict)   # custom Ray resources of one replica
    bundles: tuple[dict[str, float], ...] = ()        # placement group, one bundle per device; () = none
    drafter_bundle: int | None = None                 # the PEARL drafter's bundle; None = no device of its own
    drafter_device: str | None = None                 # torch device of the drafter process (None = its model's)

    @property
    def strategy(self) -> str:
        return PEARL_STRATEGY

    def devices(self) -> int:
        """Devices one replica holds: the target's (at least one, a CPU core counts) plus the drafter's."""
        return max(1, int(self.num_gpus)) + (1 if self.drafter_bundle is not None else 0)


def pool_placement(threads: int, target: HardwareProfile | None = None, drafter: HardwareProfile | None = None,
                   num_cpus: float | None = None, num_gpus: float | None = None,
                   resources: dict[str, float] | None = None, drafter_cpus: float = 1.0,
                   drafter_device: str | None = None, drafter_own_device: bool = False) -> Placement:
    """Actor options (and bundles) of one pool's replica. Explicit num_cpus/num_gpus/resources win over the
    profile's; `drafter` (or `drafter_own_device` for a drafter on a CPU core of its own) adds the drafter's bundle."""
    cpus = float(threads if num_cpus is None else num_cpus)
    gpus = float(num_gpus if num_gpus is not None else (target.gpus_per_replica if target else 0))
    res = (target.resources() if target else {}) | dict(resources or {})
    if drafter is None and not drafter_own_device:
        return Placement(cpus, gpus, res)
    replica = _bundle(cpus, gpus, res)
    own = _bundle(drafter_cpus, float(drafter.gpus_per_replica) if drafter else 0.0,
                  drafter.resources() if drafter else {})
    device = drafter_device or ("cuda:0" if drafter is not None and drafter.gpus_per_replica else None)
    return Placement(cpus, gpus, res, (replica, own), drafter_bundle=1, drafter_device=device)


def _bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    bundle = {"CPU": cpus, "GPU": gpus} | resources
    return {k: v for k, v in bundle.items() if v}


def drafter_visible_devices(bundle: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for a process using the GPUs Ray reserved in `bundle` of the caller's placement group
    (None when that bundle holds no GPU). Asks a zero-CPU task scheduled into the bundle, the one way Ray tells
    which of the node's GPUs a bundle holds; the reservation stays with the placement group afterwards."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None:
        raise RuntimeError("drafter_visible_devices: this replica was not started in a placement group")
    gpus = group.bundle_specs[bundle].get("GPU", 0)
    if not gpus:
        return None
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    probe = ray.remote(_gpu_ids).options(num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy)
    return ",".join(ray.get(probe.remote()))


def _gpu_ids() -> list[str]:
    import ray

    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
