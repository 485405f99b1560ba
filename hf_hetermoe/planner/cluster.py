"""Cluster descriptions: which GPUs, how many, which of them run attention, and the network between them.

`--cluster 6xA40,6xV100` (or a preset name such as O1) becomes a `ClusterSpec` with an attention pool and an
expert pool. The attention pool is the newest generation, numbered first (global ranks 0..M-1); the expert
pool is every other device type (ranks M..M+N-1, kinds in the order written: `2xA100,4xV100,4xT4` gives a
V100+T4 expert pool). When every entry names the same device, the first entry is the attention pool (a
homogeneous cluster split in two). `attention:...;experts:...` gives the roles explicitly, so either pool
may mix kinds (see docs/planner.md, "Mixed-speed expert pools").

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


class ClusterSpec:
    """The GPUs of a disaggregated cluster: attention ranks 0..M-1, then expert ranks M..W-1, and the network.

    `attention` and `expert` are one `DeviceGroup` each (a pool of one kind) or a sequence of groups (a pool of
    several kinds, ranks numbered group by group in the order given). Per-rank devices: `device_of(rank)`,
    `attention_devices`, `expert_devices`. The `.attention` / `.expert` accessors return a pool's one group
    and refuse a mixed pool (code that assumes one kind must say how it treats several).
    """

    __slots__ = ("attention_pool", "expert_pool", "link_gbps", "name", "latency_s", "link_efficiency")

    def __init__(self, *, attention: DeviceGroup | tuple[DeviceGroup, ...] | list[DeviceGroup],
                 expert: DeviceGroup | tuple[DeviceGroup, ...] | list[DeviceGroup],
                 link_gbps: float = DEFAULT_LINK_GBPS, name: str = "", latency_s: float = COLLECTIVE_LATENCY_S,
                 link_efficiency: float = LINK_EFFICIENCY) -> None:
        pools = []
        for role, value in (("attention", attention), ("expert", expert)):
            groups = (value,) if isinstance(value, DeviceGroup) else tuple(value)
            if not groups or not all(isinstance(g, DeviceGroup) and g.count >= 1 for g in groups):
                raise ValueError(f"planner: the {role} pool must be one or more groups of at least one GPU.")
            pools.append(groups)
        if not link_gbps > 0:
            raise ValueError(f"planner: `link_gbps` must be positive, got {link_gbps!r}. Use e.g. 100.")
        for key, value in zip(self.__slots__, (*pools, link_gbps, name, latency_s, link_efficiency)):
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError("ClusterSpec is immutable")

    def __eq__(self, other) -> bool:
        return isinstance(other, ClusterSpec) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    def __repr__(self) -> str:
        return f"ClusterSpec({self.describe()})"

    # ---- pools of one kind (the paper's case) ----------------------------------------------------------
    @property
    def attention(self) -> DeviceGroup:
        return self._single(self.attention_pool, "attention")

    @property
    def expert(self) -> DeviceGroup:
        return self._single(self.expert_pool, "expert")

    @staticmethod
    def _single(pool: tuple[DeviceGroup, ...], role: str) -> DeviceGroup:
        names = list(dict.fromkeys(g.name for g in pool))
        if len(names) != 1:
            raise ValueError(f"planner: the {role} pool mixes {', '.join(names)}; this step needs one GPU kind per "
                             "pool (see docs/planner.md, \"Mixed-speed expert pools\").")
        return pool[0] if len(pool) == 1 else DeviceGroup(count=sum(g.count for g in pool), device=pool[0].device)

    @property
    def mixed_attention(self) -> bool:
        return len({d.name for d in self.attention_devices}) > 1

    @property
    def mixed_expert(self) -> bool:
        return len({d.name for d in self.expert_devices}) > 1

    # ---- per rank --------------------------------------------------------------------------------------
    @property
    def attention_devices(self) -> tuple[DeviceCosts, ...]:
        return tuple(g.device for g in self.attention_pool for _ in range(g.count))

    @property
    def expert_devices(self) -> tuple[DeviceCosts, ...]:
        return tuple(g.device for g in self.expert_pool for _ in range(g.count))

    @property
    def devices(self) -> tuple[DeviceCosts, ...]:
        """Every global rank's device, in rank order."""
        return self.attention_devices + self.expert_devices

    def device_of(self, rank: int) -> DeviceCosts:
        return self.devices[rank]

    @property
    def slowest_attention(self) -> DeviceCosts:
        """The attention device that paces: every attention rank gets the same batch share (the stock Trainer
        gives each data-parallel rank the same per-device batch), so the slowest one sets the pace. "Slowest" is
        the lowest generation, then the lowest fp16 peak where profiles have one; `workload` takes the max of
        every attention device's modelled times, this is only for one-device summaries."""
        return min(self.attention_devices, key=lambda d: (d.generation, getattr(d, "fp16_tflops", 0.0)))

    # ---- sizes and network -----------------------------------------------------------------------------
    @property
    def num_attention(self) -> int:  # M
        return sum(g.count for g in self.attention_pool)

    @property
    def num_expert(self) -> int:  # N
        return sum(g.count for g in self.expert_pool)

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_expert

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8 * self.link_efficiency

    @property
    def attention_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_attention))

    @property
    def expert_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_attention, self.world_size))

    @staticmethod
    def _pool_label(pool: tuple[DeviceGroup, ...]) -> str:
        merged: dict[str, int] = {}
        for g in pool:
            merged[g.name] = merged.get(g.name, 0) + g.count
        return "+".join(f"{count}x{name}" for name, count in merged.items())

    @property
    def labels(self) -> tuple[str, str]:
        """Display names of the attention and expert pools, e.g. ("6xA40", "6xV100"); distinct even if equal GPUs."""
        att, exp = self._pool_label(self.attention_pool), self._pool_label(self.expert_pool)
        return (f"{att} attention", f"{exp} experts") if att == exp else (att, exp)

    def describe(self) -> str:
        label = f"{self.name}: " if self.name else ""
        att, exp = self._pool_label(self.attention_pool), self._pool_label(self.expert_pool)
        return (f"{label}{att} (attention, ranks 0-{self.num_attention - 1}) + "
                f"{exp} (experts, ranks {self.num_attention}-{self.world_size - 1}), "
                f"{self.link_gbps:g} Gbps per GPU")


def _rebuild_cluster(attention_pool, expert_pool, link_gbps, name, latency_s, link_efficiency) -> ClusterSpec:
    return ClusterSpec(attention=attention_pool, expert=expert_pool, link_gbps=link_gbps, name=name,
                       latency_s=latency_s, link_efficiency=link_efficiency)


ClusterSpec.__reduce__ = lambda self: (_rebuild_cluster, tuple(getattr(self, k) for k in ClusterSpec.__slots__))

_ROLES = {"attention": "attention", "attn": "attention", "experts": "expert", "expert": "expert"}


def parse_cluster(text: str, *, link_gbps: float | None = None,
                  measured: dict[str, DeviceCosts] | None = None) -> ClusterSpec:
    """Parse a cluster into a ClusterSpec:

        6xA40,6xV100                      two kinds: the newest generation attends, the other holds experts
        2xA100,4xV100,4xT4                several kinds: the newest attends; every other kind is an expert GPU
        attention:2xA100;experts:4xV100,4xT4   roles given explicitly (any kinds on either side)
        2xA40,2xA40                       one kind: exactly two entries, the first attends
        O1 (O2, O3, C1, C2)               the paper's clusters

    Expert ranks are numbered in the order their kinds are first written. `measured` maps device names to
    measured profiles; they take precedence over the built-in table.
    """
    measured = measured or {}
    name = ""
    preset = CLUSTER_PRESETS.get(text.strip().upper()) if isinstance(text, str) else None
    if preset is not None:
        name, (text, preset_gbps) = text.strip().upper(), preset
        link_gbps = preset_gbps if link_gbps is None else link_gbps
    known = sorted(set(BUILTIN_GPUS) | set(measured))
    fix = (f"Write COUNTxGPU,COUNTxGPU (e.g. 6xA40,6xV100 or 2xA100,4xV100,4xT4), roles explicitly "
           f"(attention:2xA100;experts:4xV100,4xT4), with GPUs from {', '.join(known)}, "
           f"or a preset ({', '.join(CLUSTER_PRESETS)}).")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"planner: --cluster is empty. {fix}")
    gbps = DEFAULT_LINK_GBPS if link_gbps is None else float(link_gbps)
    if ":" in text:
        pools = _explicit_roles(text, measured, fix)
        return ClusterSpec(attention=pools["attention"], expert=pools["expert"], link_gbps=gbps, name=name)
    entries = _entries(text, measured, fix)
    names = [device.name for _, device in entries]
    distinct = list(dict.fromkeys(names))
    if len(distinct) == 1:
        if len(entries) != 2:
            raise ValueError(
                f"planner: --cluster {text!r} names one device type in {len(entries)} entries; a homogeneous "
                "cluster needs exactly two entries (attention pool first, e.g. 2xA40,2xA40), or explicit roles "
                "(attention:2xA40;experts:4xA40)."
            )
        (ca, da), (ce, de) = entries
        return ClusterSpec(attention=DeviceGroup(count=ca, device=da), expert=DeviceGroup(count=ce, device=de),
                           link_gbps=gbps, name=name)
    merged = {n: (sum(c for c, d in entries if d.name == n), next(d for _, d in entries if d.name == n))
              for n in distinct}
    # Newest generation attends; `sorted` is stable, so a tie keeps the order the user wrote.
    order = sorted(distinct, key=lambda n: merged[n][1].generation, reverse=True)
    att = merged[order[0]]
    experts = tuple(DeviceGroup(count=merged[n][0], device=merged[n][1]) for n in distinct if n != order[0])
    return ClusterSpec(attention=DeviceGroup(count=att[0], device=att[1]),
                       expert=experts[0] if len(experts) == 1 else experts, link_gbps=gbps, name=name)


def _entries(text: str, measured: dict[str, DeviceCosts], fix: str) -> list[tuple[int, DeviceCosts]]:
    entries: list[tuple[int, DeviceCosts]] = []
    for part in text.split(","):
        match = _ENTRY.match(part)
        if match is None:
            raise ValueError(f"planner: --cluster entry {part.strip()!r} is malformed. {fix}")
        count = int(match.group(1))
        if count < 1:
            raise ValueError(f"planner: --cluster entry {part.strip()!r} has no GPUs. Counts start at 1.")
        entries.append((count, _resolve_device(match.group(2), measured, fix)))
    return entries


def _explicit_roles(text: str, measured: dict[str, DeviceCosts], fix: str) -> dict[str, tuple[DeviceGroup, ...]]:
    pools: dict[str, tuple[DeviceGroup, ...]] = {}
    for section in text.split(";"):
        role, sep, body = section.partition(":")
        key = _ROLES.get(role.strip().lower())
        if not sep or key is None:
            raise ValueError(f"planner: --cluster section {section.strip()!r} names no role (attention or experts). "
                             f"{fix}")
        if key in pools:
            raise ValueError(f"planner: --cluster names the {key} pool twice. List each role once. {fix}")
        pools[key] = tuple(DeviceGroup(count=c, device=d) for c, d in _entries(body, measured, fix))
    missing = [role for role in ("attention", "expert") if role not in pools]
    if missing:
        raise ValueError(f"planner: --cluster {text!r} gives no {missing[0]} GPUs. Write both roles, e.g. "
                         "attention:2xA100;experts:4xV100,4xT4.")
    return pools


def _resolve_device(name: str, measured: dict[str, DeviceCosts], fix: str) -> DeviceCosts:
    for table in (measured, BUILTIN_GPUS):
        for key, device in table.items():
            if key.lower() == name.lower():
                return device
    raise ValueError(f"planner: --cluster names unknown GPU {name!r}. {fix}")
