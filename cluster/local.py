"""A multi-node Ray cluster on one machine, whose nodes advertise fake accelerator types (for tests and demos).

Every node is a real raylet (`ray.cluster_utils.Cluster`); a node "with an A10G" advertises the resource
`accelerator_type:A10G` and as many GPUs as asked (Ray hands out their ids; nothing computes on them), so
placement by accelerator type is exercised exactly as on a GPU cluster.

>>> with local_cluster(FakeNode(num_cpus=1), [FakeNode(1, num_gpus=1, accelerators=("A10G",))]) as (cluster, nodes):
...     ...                                   # ray is connected; cluster.remove_node(nodes[0]) loses a node
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Ray rewrites 127.0.0.1 in an address it connects to into the machine's LAN address, where a loopback-bound
# cluster is not listening; any other 127.x address stays as it is and is still loopback only.
LOOPBACK_IP = "127.0.0.2"


@dataclass(frozen=True)
class FakeNode:
    num_cpus: float                                   # Ray CPUs it advertises
    num_gpus: int = 0                                 # GPUs it advertises (ids only: no device behind them)
    accelerators: tuple[str, ...] = ()                # fake GPU types: one `accelerator_type:<X>` resource each
    resources: dict[str, float] = field(default_factory=dict)   # further custom resources

    def node_args(self) -> dict[str, Any]:
        resources = {f"accelerator_type:{a}": 1.0 for a in self.accelerators} | self.resources
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": resources,
                "node_ip_address": LOOPBACK_IP, "object_store_memory": 100 << 20}


@contextmanager
def local_cluster(head: FakeNode, workers: Sequence[FakeNode], dashboard: bool = True) -> Iterator[tuple[Any, list]]:
    """Start the head and worker nodes, connect this process, yield (cluster, worker nodes); on exit (also on
    error) disconnect and stop every node. `dashboard`: needed by Ray's state API (ray.util.state)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=head.node_args() | {
        "include_dashboard": dashboard, "dashboard_host": LOOPBACK_IP})
    try:
        nodes = [cluster.add_node(**w.node_args()) for w in workers]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK_IP, log_to_driver=False)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
