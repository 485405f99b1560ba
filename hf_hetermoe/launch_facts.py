"""What every rank of a job reports about itself before roles are decided: its machine, host, local rank and GPU
(generation and name; the name ranks expert speeds for `expert_split: proportional`, expert_speeds.py).

Roles (which ranks run attention, how ranks group into machines) are derived from these facts, never from
arithmetic such as `rank // LOCAL_WORLD_SIZE`, which is wrong when machines run different numbers of processes
(torchrun's c10d rendezvous with uneven `--nproc-per-node`) or when the rendezvous numbers the machines in
another order than their `--machine-rank`.

Each rank writes one JSON record under `hetermoe/facts/<rank>` in the rendezvous store and reads everybody's.
A rank that fails before it could report (no GPU for its LOCAL_RANK, ...) writes its error there instead, so
the others stop at once with a ValueError naming it rather than waiting out the store's timeout.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

MACHINE_RANK_ENV = "HETERMOE_MACHINE_RANK"  # set by `hetermoe launch`: the --machine-rank the user gave
_KEY = "hetermoe/facts/{rank}"
_POLL_S = 0.05


@dataclass(frozen=True)
class RankFacts:
    rank: int  # global rank
    machine: int  # the machine (node) this rank runs on: --machine-rank, else the launcher's group rank
    host: str
    local_rank: int
    capability: tuple[int, int]  # CUDA compute capability of its device; (0, 0) on CPU
    device_name: str = ""  # torch.cuda.get_device_name, or "cpu"

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "machine": self.machine, "host": self.host,
                           "local_rank": self.local_rank, "capability": list(self.capability),
                           "device_name": self.device_name})

    @classmethod
    def from_dict(cls, data: dict) -> "RankFacts":
        return cls(rank=data["rank"], machine=data["machine"], host=data["host"], local_rank=data["local_rank"],
                   capability=tuple(data["capability"]), device_name=data.get("device_name", ""))


def machine_of_this_process(environ: "os._Environ[str] | dict[str, str] | None" = None) -> int | None:
    """The machine rank the launcher gave this process: `hetermoe launch`'s --machine-rank, else the group rank
    torchrun / accelerate launch set (GROUP_RANK); None when started without either (tests, plain spawns)."""
    environ = os.environ if environ is None else environ
    for name in (MACHINE_RANK_ENV, "GROUP_RANK"):
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"hetermoe: environment variable {name} is {value!r}, not an integer machine "
                                 "rank. Let the launcher set it (--machine-rank).") from None
    return None


def facts_of_this_process(rank: int, local_rank: int, capability: tuple[int, int], device_name: str = "") -> RankFacts:
    machine = machine_of_this_process()
    return RankFacts(rank=rank, machine=-1 if machine is None else machine, host=socket.gethostname(),
                     local_rank=local_rank, capability=tuple(capability), device_name=device_name)


def report_failure(store: Any, rank: int, message: str) -> None:
    """Tell the other ranks, waiting in `exchange_facts`, that this rank failed before reporting."""
    try:
        store.set(_KEY.format(rank=rank), json.dumps({"error": message}))
    except Exception:  # the store is gone: the others fail on their own timeout
        pass


def exchange_facts(store: Any, mine: RankFacts, world_size: int, timeout_s: float) -> list[RankFacts]:
    """Publish this rank's facts and return every rank's, in rank order; a ValueError naming the first rank that
    reported a failure (or that did not report within `timeout_s`)."""
    store.set(_KEY.format(rank=mine.rank), mine.to_json())
    keys = [_KEY.format(rank=r) for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    known: dict[int, dict] = {}  # each key is read once, when it appears (W ranks poll W keys each)
    while True:
        for r in range(world_size):
            if r not in known and store.check([keys[r]]):
                known[r] = json.loads(store.get(keys[r]))
                if "error" in known[r] and r != mine.rank:
                    raise ValueError(f"hetermoe: rank {r} failed before the job started: {known[r]['error']}")
        if len(known) == world_size:
            break
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(known))
            raise ValueError(
                f"hetermoe: rank(s) {missing} did not report within {timeout_s:.0f} s. Start every machine's "
                "launcher (same --num-machines, --main-process-ip and --main-process-port), or raise `timeout_s`.")
        time.sleep(_POLL_S)
    facts = [RankFacts.from_dict(known[r]) for r in range(world_size)]
    return number_machines(facts)


def number_machines(facts: list[RankFacts]) -> list[RankFacts]:
    """Fill in machines no launcher named (processes started without GROUP_RANK, e.g. by hand): ranks are grouped
    by host, machines numbered in order of their lowest rank."""
    if all(f.machine >= 0 for f in facts):
        return facts
    if any(f.machine >= 0 for f in facts):
        raise ValueError("hetermoe: some ranks know their machine rank (GROUP_RANK / HETERMOE_MACHINE_RANK) and "
                         "others do not; start every machine with the same launcher.")
    hosts: dict[str, int] = {}
    for f in facts:
        hosts.setdefault(f.host, len(hosts))
    return [RankFacts(rank=f.rank, machine=hosts[f.host], host=f.host, local_rank=f.local_rank,
                      capability=f.capability, device_name=f.device_name) for f in facts]


def check_machines(facts: list[RankFacts]) -> None:
    """Machines are numbered 0..M-1, and no two ranks of one machine share a local rank."""
    machines = sorted({f.machine for f in facts})
    if machines != list(range(len(machines))):
        raise ValueError(f"hetermoe: the machines of this job have ranks {machines}; they must be 0..{len(machines) - 1}. "
                         "Give each machine's launcher its own --machine-rank from 0 to --num-machines - 1.")
    seen: dict[tuple[int, int], int] = {}
    for f in facts:
        other = seen.setdefault((f.machine, f.local_rank), f.rank)
        if other != f.rank:
            raise ValueError(f"hetermoe: ranks {other} and {f.rank} both report machine {f.machine}, local rank "
                             f"{f.local_rank}: two launchers were given the same --machine-rank.")


def machine_ranks(facts: list[RankFacts]) -> list[int]:
    """The machine of every global rank, in rank order."""
    return [f.machine for f in sorted(facts, key=lambda f: f.rank)]


def local_attention(facts: list[RankFacts], attention_ranks: tuple[int, ...], rank: int) -> list[int]:
    """The attention ranks on `rank`'s machine, ascending (the attention world's local ranks there)."""
    machine = facts[rank].machine
    return [r for r in attention_ranks if facts[r].machine == machine]
