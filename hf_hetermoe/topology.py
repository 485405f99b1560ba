"""Topology: the role of every global rank (attention or expert server), resolved from the config and the world.

Stage 2 of the config's validation (docs/architecture.md): `HeterMoEConfig.resolve_topology` calls
`resolve_topology` here. Pure Python; config.py re-exports `Topology` and `MAX_WORLD_SIZE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_messages import fail as _fail
from .config_messages import show as _show

# Larger worlds are refused rather than resolved: a topology holds every rank, so an absurd WORLD_SIZE or
# --num-processes (a typo such as 40000000) would otherwise spend minutes building tuples before failing.
MAX_WORLD_SIZE = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The resolved role of every global rank (docs/architecture.md)."""

    world_size: int
    mode: str
    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]  # pure expert servers (empty in colocated mode)

    @property
    def num_attention(self) -> int:
        return len(self.attention_ranks)

    @property
    def host_ranks(self) -> tuple[int, ...]:
        """Ranks that hold routed experts by default: the servers, or every rank when colocated."""
        return self.attention_ranks if self.mode == "colocated" else self.expert_ranks

    def is_attention(self, rank: int) -> bool:
        return rank in self.attention_ranks

    def attention_index(self, rank: int) -> int:
        return self.attention_ranks.index(rank)

    def describe(self) -> str:
        if self.mode == "colocated":
            return f"colocated: {self.world_size} ranks, each runs attention and holds 1/{self.world_size} of the experts"
        return (
            f"disaggregated: attention ranks {list(self.attention_ranks)}, "
            f"expert ranks {list(self.expert_ranks)} (world size {self.world_size})"
        )



def resolve_topology(*, world_size: int, mode: str, attention_ranks: tuple[int, ...] | str | None,
                     expert_ranks: tuple[int, ...] | None, emulation: Any = None,
                     device_capabilities: list[tuple[int, int]] | None = None,
                     attention_machines: tuple[int, ...] | None = None, expert_machines: tuple[int, ...] | None = None,
                     rank_machines: list[int] | None = None) -> Topology:
    """Decide each rank's role for `world_size` processes (the fields of a validated HeterMoEConfig).

    `device_capabilities[r]` is rank r's device generation (CUDA compute capability); it is only needed for
    `attention_ranks: auto`, which picks the ranks on the newest devices. `rank_machines[r]` is rank r's machine
    (the launcher's machine rank); it is only needed for roles named per machine (`attention_machines`,
    `expert_machines`), which become the ranks of those machines.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"hetermoe: the world size (WORLD_SIZE, --num-processes) must be a positive integer, got "
            f"{_show(world_size)}. Launch with `hetermoe launch --num-processes N`."
        )
    if world_size > MAX_WORLD_SIZE:
        raise ValueError(
            f"hetermoe: the world size (WORLD_SIZE, --num-processes) is {world_size}, more than the largest "
            f"supported ({MAX_WORLD_SIZE}). Check the number of processes."
        )
    if emulation is not None:
        emulation.check_world(world_size)
    if device_capabilities is not None and (
        not isinstance(device_capabilities, (list, tuple)) or len(device_capabilities) != world_size
    ):
        raise ValueError(
            f"hetermoe: {_show(device_capabilities)} does not give one device generation per rank of the world "
            f"of {world_size}. Every rank reports its device; list `attention_ranks` explicitly to skip this."
        )
    if mode == "colocated":
        if attention_ranks not in (None, "auto"):
            if tuple(attention_ranks) != tuple(range(world_size)):
                raise _fail(
                    "attention_ranks", f"is {_show(list(attention_ranks))} but colocated mode uses every rank "
                    f"of the world of {world_size}", "Leave `attention_ranks` out in colocated mode.",
                )
        ranks = tuple(range(world_size))
        return Topology(world_size=world_size, mode="colocated", attention_ranks=ranks, expert_ranks=())

    if attention_machines is not None or expert_machines is not None:
        attention_ranks, expert_ranks = ranks_of_machines(world_size, attention_machines, expert_machines,
                                                          rank_machines)
    att = attention_ranks
    if att is None or att == "auto":
        if expert_ranks is not None:
            att = tuple(r for r in range(world_size) if r not in expert_ranks)
        else:
            att = auto_attention_ranks(world_size, device_capabilities)
    for name, ranks in (("attention_ranks", att), ("expert_ranks", expert_ranks or ())):
        bad = [r for r in ranks if r >= world_size]
        if bad:
            raise _fail(
                name, f"lists rank(s) {_show(bad)}, outside the world of {world_size} processes (ranks 0..{world_size - 1})",
                "Launch more processes or list ranks that exist.",
            )
    exp = expert_ranks if expert_ranks is not None else tuple(r for r in range(world_size) if r not in att)
    if not exp:
        raise _fail(
            "attention_ranks", f"covers all {world_size} ranks, leaving no expert ranks",
            "List fewer attention ranks, launch more processes, or use `mode: colocated`.",
        )
    covered = set(att) | set(exp)
    if len(covered) != world_size:
        missing = sorted(set(range(world_size)) - covered)
        raise ValueError(
            f"hetermoe config: `attention_ranks` {_show(list(att))} and `expert_ranks` {_show(list(exp))} cover "
            f"{len(covered)} ranks but {world_size} processes were launched (rank(s) {_show(missing)} have no role). "
            f"Launch {len(covered)} processes or give every rank a role."
        )
    return Topology(world_size=world_size, mode="disaggregated", attention_ranks=tuple(att), expert_ranks=tuple(exp))


def ranks_of_machines(world_size: int, attention_machines: tuple[int, ...] | None,
                      expert_machines: tuple[int, ...] | None, rank_machines: list[int] | None,
                      ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(attention ranks, expert ranks) from roles named per machine; a machine named in neither list takes the
    role the config leaves over (expert when only `attention_machines` is given, and the other way round)."""
    field_name = "attention_machines" if attention_machines is not None else "expert_machines"
    if rank_machines is None:
        raise _fail(field_name, "names roles per machine, which needs every rank's machine, and none was given",
                    "Start the job with `hetermoe launch` (or torchrun / accelerate launch), which report it.")
    if not isinstance(rank_machines, (list, tuple)) or len(rank_machines) != world_size:
        raise ValueError(f"hetermoe: {_show(rank_machines)} does not give one machine per rank of the world of "
                         f"{world_size}.")
    machines = sorted(set(rank_machines))
    for name, listed in (("attention_machines", attention_machines), ("expert_machines", expert_machines)):
        bad = [m for m in listed or () if m not in machines]
        if bad:
            raise _fail(name, f"names machine(s) {_show(bad)}, but this job runs on machines {_show(machines)}",
                        "Name machines by their --machine-rank (0 .. --num-machines - 1).")
    if attention_machines is not None:
        att = tuple(r for r in range(world_size) if rank_machines[r] in attention_machines)
        exp_set = expert_machines if expert_machines is not None else [m for m in machines if m not in attention_machines]
        exp = tuple(r for r in range(world_size) if rank_machines[r] in exp_set)
    else:
        exp = tuple(r for r in range(world_size) if rank_machines[r] in expert_machines)
        att = tuple(r for r in range(world_size) if r not in exp)
    if not att:
        raise _fail(field_name, f"leaves no attention rank on machines {_show(machines)}",
                    "Name at least one machine with attention ranks.")
    if not exp:
        raise _fail(field_name, f"leaves no expert rank on machines {_show(machines)}",
                    "Leave at least one machine for the experts, or use `mode: colocated`.")
    missing = [m for m in machines if not any(rank_machines[r] == m for r in att + exp)]
    if missing:
        raise _fail("expert_machines", f"and attention_machines give machine(s) {_show(missing)} no role",
                    "Name every machine of the job in one of the two lists.")
    return att, exp


def auto_attention_ranks(world_size: int, caps: list[tuple[int, int]] | None) -> tuple[int, ...]:
    if not caps:
        raise _fail(
            "attention_ranks", "is auto, which needs every rank's device generation, and none was given",
            "List `attention_ranks` explicitly (CPU runs always must).",
        )
    try:
        caps = [tuple(int(v) for v in c) for c in caps]
    except (TypeError, ValueError):
        raise _fail("attention_ranks", f"is auto, and the device generations {_show(caps)} are not (major, minor) "
                    "pairs", "List `attention_ranks` explicitly.") from None
    newest = max(caps)
    att = tuple(r for r, c in enumerate(caps) if c == newest)
    if len(att) == world_size:
        raise _fail(
            "attention_ranks", f"is auto but all {world_size} ranks have the same device generation {newest}",
            "List `attention_ranks` explicitly, or use `mode: colocated`.",
        )
    return att
