"""Hardware profiles: what one kind of device offers a pool, read from a YAML file (cluster/profiles.yaml).

A profile decides where a pool's replicas run (the Ray resource `accelerator_type:<accelerator>` that every node
with such a device advertises, and GPUs per replica) and what the selector knows about the pool's hardware:

>>> a10g = load_profiles()["a10g"]
>>> a10g.resources()
{'accelerator_type:A10G': 0.001}
>>> a10g.hardware(devices=1)
{'accelerator': 'A10G', 'mem_gb': 24.0, 'rel_speed': 1.0, 'devices': 1}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PROFILES = Path(__file__).resolve().parent / "profiles.yaml"
ACCELERATOR_SHARE = 0.001   # of a node's `accelerator_type:X` resource (1.0 per node) one replica or bundle asks
                            # for: it pins the replica to such a node without limiting how many fit there (Ray's
                            # own `accelerator_type=` actor option asks for the same share)


@dataclass(frozen=True)
class HardwareProfile:
    name: str                      # profile name, e.g. "a10g"
    accelerator: str               # "cpu" or the GPU type as Ray names it: A10G, L4, T4, A100, H100...
    mem_gb: float                  # memory of one device (host memory one replica may use on "cpu")
    rel_speed: float               # decode speed relative to the A10G (an estimate, see profiles.yaml)
    gpus_per_replica: int = 0      # GPUs one replica of the target uses (0 on "cpu")
    node_type: str = ""            # the cluster launcher node type that offers it (cluster/aws.yaml)
    instance_type: str = ""        # that node type's cloud instance type

    @property
    def resource(self) -> str | None:
        """The Ray resource every node with this device advertises (None for "cpu": every node has CPUs)."""
        return None if self.accelerator == "cpu" else f"accelerator_type:{self.accelerator}"

    @property
    def device(self) -> str:
        """The torch device a replica on this hardware computes on."""
        return "cuda" if self.gpus_per_replica else "cpu"

    def resources(self) -> dict[str, float]:
        """Custom Ray resources that pin one replica (or one placement-group bundle) to this hardware."""
        return {self.resource: ACCELERATOR_SHARE} if self.resource else {}

    def hardware(self, devices: int) -> dict[str, str | float]:
        """What the selector sees of a pool on this hardware (selector.features.pool_features reads these keys);
        `devices`: devices one replica holds (a PEARL drafter on its own device makes it 2)."""
        return {"accelerator": self.accelerator, "mem_gb": self.mem_gb, "rel_speed": self.rel_speed,
                "devices": devices}


class ProfileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accelerator: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    mem_gb: float = Field(gt=0)
    rel_speed: float = Field(gt=0)
    gpus_per_replica: int = Field(default=0, ge=0)
    node_type: str = ""
    instance_type: str = ""


class ProfilesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profiles: dict[str, ProfileModel] = Field(min_length=1)


def load_profiles(path: str | Path | None = None) -> dict[str, HardwareProfile]:
    """Profiles by name from a YAML file (default: the shipped cluster/profiles.yaml); raises
    pydantic.ValidationError (a ValueError) listing every problem."""
    import yaml

    data = yaml.safe_load(Path(path or DEFAULT_PROFILES).read_text()) or {}
    parsed = ProfilesFile.model_validate(data)
    for name, p in parsed.profiles.items():
        if (p.accelerator == "cpu") != (p.gpus_per_replica == 0):
            raise ValueError(f"profile {name}: gpus_per_replica must be 0 exactly when accelerator is cpu")
    return {name: HardwareProfile(name=name, **p.model_dump()) for name, p in parsed.profiles.items()}
