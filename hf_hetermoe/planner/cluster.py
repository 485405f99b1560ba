"""Cluster descriptions: which GPUs, how many, which of them run attention, and the network between them.

`--cluster 6xA40,6xV100` (or a preset name such as O1) becomes a `ClusterSpec` with two `DeviceGroup`s.
The attention pool is the newest generation, numbered first (global ranks 0..M-1); the expert pool is the
other device type (ranks M..M+N-1). When every entry names the same device, the first entry is the
attention pool (a homogeneous cluster split in two).

Network assumptions (stated because they drive every communication time): each GPU has its own full-duplex
link of `link_gbps` (the paper's 100 Gbps RoCE for O1-O3, 200 Gbps for the simulated C1-C2); an all-to-all
moves at `LINK_EFFICIENCY` of that rate per direction and pays `COLLECTIVE_LATENCY_S` per call. Traffic
between GPUs of the same node is charged like any other (no NVLink shortcut): the paper's clusters put the
two GPU types on different nodes, and EP's same-type traffic is a minority.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .profiles import BUILTIN_GPUS, DeviceCosts

LINK_EFFICIENCY = 0.8  # achieved fraction of line rate for large NCCL all-to-all messages over RoCE
COLLECTIVE_LATENCY_S = 50e-6  # fixed cost of one inter-node all-to-all call

# The paper's evaluation clusters (HeterMoE paper, "Evaluation").
CLUSTER_PRESETS: dict[str, tuple[str, float]] = {
    "O1": ("6xA40,6xV100", 100.0),
    "O2": ("4xA40,8xV100", 100.0),
    "O3": ("6xA40,3xV100", 100.0),
    "C1": ("2xL40S,6xT4", 200.0),
    "C2": ("2xL40S,8xT4", 200.0),
}
DEFAULT_LINK_GBPS = 100.0

_ENTRY = re.compile(r"^\s*(\d+)\s*[xX*]\s*([A-Za-z0-9_.\-]+)\s*$")


@dataclass(frozen=True, kw_only=True)
class DeviceGroup:
    """`count` identical GPUs that play one role and do identical work."""

    count: int
    device: DeviceCosts

    @property
    def name(self) -> str:
        return self.device.name


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    attention: DeviceGroup  # M GPUs, global ranks 0..M-1
    expert: DeviceGroup  # N GPUs, global ranks M..M+N-1
    link_gbps: float = DEFAULT_LINK_GBPS
    name: str = ""
    latency_s: float = COLLECTIVE_LATENCY_S
    link_efficiency: float = LINK_EFFICIENCY

    def __post_init__(self) -> None:
        if not self.link_gbps > 0:
            raise ValueError(f"planner: `link_gbps` must be positive, got {self.link_gbps!r}. Use e.g. 100.")

    @property
    def num_attention(self) -> int:  # M
        return self.attention.count

    @property
    def num_expert(self) -> int:  # N
        return self.expert.count

    @property
    def world_size(self) -> int:
        return self.attention.count + self.expert.count

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8 * self.link_efficiency

    @property
    def attention_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_attention))

    @property
    def expert_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_attention, self.world_size))

    @property
    def labels(self) -> tuple[str, str]:
        """Display names of the attention and expert pools, e.g. ("6xA40", "6xV100"); distinct even if equal GPUs."""
        att, exp = f"{self.attention.count}x{self.attention.name}", f"{self.expert.count}x{self.expert.name}"
        return (f"{att} attention", f"{exp} experts") if att == exp else (att, exp)

    def describe(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return (f"{label}{self.attention.count}x{self.attention.name} (attention, ranks 0-{self.num_attention - 1}) + "
                f"{self.expert.count}x{self.expert.name} (experts, ranks {self.num_attention}-{self.world_size - 1}), "
                f"{self.link_gbps:g} Gbps per GPU")


def parse_cluster(text: str, *, link_gbps: float | None = None,
                  measured: dict[str, DeviceCosts] | None = None) -> ClusterSpec:
    """Parse `6xA40,6xV100` or a preset name (O1, O2, O3, C1, C2) into a ClusterSpec.

    `measured` maps device names to measured profiles; they take precedence over the built-in table.
    """
    measured = measured or {}
    name = ""
    preset = CLUSTER_PRESETS.get(text.strip().upper()) if isinstance(text, str) else None
    if preset is not None:
        name, (text, preset_gbps) = text.strip().upper(), preset
        link_gbps = preset_gbps if link_gbps is None else link_gbps
    known = sorted(set(BUILTIN_GPUS) | set(measured))
    fix = (f"Write COUNTxGPU,COUNTxGPU (e.g. 6xA40,6xV100) with GPUs from {', '.join(known)}, "
           f"or a preset ({', '.join(CLUSTER_PRESETS)}).")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"planner: --cluster is empty. {fix}")
    entries: list[tuple[int, DeviceCosts]] = []
    for part in text.split(","):
        match = _ENTRY.match(part)
        if match is None:
            raise ValueError(f"planner: --cluster entry {part.strip()!r} is malformed. {fix}")
        count = int(match.group(1))
        if count < 1:
            raise ValueError(f"planner: --cluster entry {part.strip()!r} has no GPUs. Counts start at 1.")
        entries.append((count, _resolve_device(match.group(2), measured, fix)))
    names = [device.name for _, device in entries]
    distinct = list(dict.fromkeys(names))
    if len(distinct) == 1:
        if len(entries) != 2:
            raise ValueError(
                f"planner: --cluster {text!r} names one device type in {len(entries)} entries; a homogeneous "
                "cluster needs exactly two entries (attention pool first, e.g. 2xA40,2xA40)."
            )
        att, exp = entries
    elif len(distinct) == 2:
        merged = {n: (sum(c for c, d in entries if d.name == n), next(d for _, d in entries if d.name == n))
                  for n in distinct}
        # Newest generation attends; `sorted` is stable, so a tie keeps the order the user wrote.
        order = sorted(distinct, key=lambda n: merged[n][1].generation, reverse=True)
        att, exp = merged[order[0]], merged[order[1]]
    else:
        raise ValueError(
            f"planner: --cluster {text!r} mixes {len(distinct)} device types ({', '.join(distinct)}); "
            "HeterMoE pairs one attention pool with one expert pool. Name two device types."
        )
    return ClusterSpec(
        attention=DeviceGroup(count=att[0], device=att[1]), expert=DeviceGroup(count=exp[0], device=exp[1]),
        link_gbps=DEFAULT_LINK_GBPS if link_gbps is None else float(link_gbps), name=name,
    )


def _resolve_device(name: str, measured: dict[str, DeviceCosts], fix: str) -> DeviceCosts:
    for table in (measured, BUILTIN_GPUS):
        for key, device in table.items():
            if key.lower() == name.lower():
                return device
    raise ValueError(f"planner: --cluster names unknown GPU {name!r}. {fix}")
