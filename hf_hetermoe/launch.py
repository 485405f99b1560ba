"""`python -m hf_hetermoe.launch --hetermoe-config CFG.yaml SCRIPT.py [args]`: one process of a HeterMoE job.

Started by `accelerate launch` / torchrun (or `hetermoe launch`, which fills in those arguments). Each process:
1. reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and validates the config against the world
   (every rank does the same checks, so a bad config fails everywhere before any group waits);
2. connects to the rendezvous store, reports its machine, host, local rank and GPU there and reads every rank's
   (launch_facts.py): roles, and which ranks share a machine, come from these facts; then builds the HeterMoE
   groups over all ranks (see docs/architecture.md);
3. attention ranks rewrite RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE to the attention world and run the
   script with runpy, every `Trainer` it builds carrying a `HeterMoECallback`; at the end the leader tells the
   expert servers to stop (or why the job failed);
4. expert ranks run the expert server and exit 0 when told to stop;
5. every rank then shuts down in one order (`run_rank`): the attention world's default group, the HeterMoE
   groups, the health monitor's threads, the store connections, so nothing native is left running when the
   interpreter finalizes (where a thread that needs the GIL aborts the process: "terminate called without an
   active exception"). A failed rank skips the group teardown: it aborts its NCCL groups (`HeterMoEGroups.abort`)
   and leaves through `_exit_now`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import logging
import os
import runpy
import sys
import traceback
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from . import health
from .config import HeterMoEConfig, Topology
from . import protocol
from .control import CommandChannel
from .groups import HeterMoEGroups
from .health_monitor import HealthMonitor
from . import launch_facts
from .launch_facts import RankFacts
from .versions import check_versions

logger = logging.getLogger("hf_hetermoe.launch")

_ENV_ORIGINAL = "HETERMOE_GLOBAL_"  # prefix under which the launcher keeps the global values it rewrote
_FAILED_STOP_S = 1.0  # how long a failed rank waits for its health threads (its launcher is stopping the job)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(
            f"hetermoe: environment variable {name} is not set. Start the job with `hetermoe launch --config CFG "
            "--num-processes N SCRIPT.py` (or `accelerate launch --multi_gpu ... -m hf_hetermoe.launch`)."
        )
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"hetermoe: environment variable {name} is {value!r}, not an integer. Let the launcher set it "
            "(`hetermoe launch`, `accelerate launch` or torchrun)."
        ) from None


def connect_store(*, rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The rendezvous store: the launcher agent's (torchrun / accelerate launch) or one hosted by global rank 0."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT")
    timeout = datetime.timedelta(seconds=max(timeout_s, 60))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout, multi_tenant=True)
    # Without an agent, global rank 0 hosts the store; the attention world's own init_process_group must then
    # connect to it as a client rather than start a second server on the same port.
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    return store


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and not _uses_cpu(os.environ):
        count = torch.cuda.device_count()
        if not 0 <= local_rank < count:  # else torch's "invalid device ordinal", which names neither number
            raise ValueError(
                f"hetermoe: this process has LOCAL_RANK {local_rank}, but {count} GPU(s) are visible: each process "
                f"uses one GPU (local rank i uses GPU i). Start at most {count} processes per node, make more GPUs "
                "visible (CUDA_VISIBLE_DEVICES), or run on CPU with ACCELERATE_USE_CPU=1.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _capability(device: torch.device) -> tuple[int, int]:
    """The device generation every rank reports (CUDA compute capability); (0, 0) on CPU."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else (0, 0)


def _device_name(device: torch.device) -> str:
    """The GPU name every rank reports (it ranks expert speeds for `expert_split: proportional`); the device type
    where CUDA is absent."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type


def _uses_cpu(environ: "os._Environ[str] | dict[str, str]") -> bool:
    return environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def planned_facts(processes_per_machine: list[int]) -> list[RankFacts]:
    """The facts a launch of these per-machine process counts will report, ranks numbered machine by machine
    (what the launcher itself knows before any process starts; at run time every rank reports its own)."""
    facts, rank = [], 0
    for machine, count in enumerate(processes_per_machine):
        for local in range(count):
            facts.append(RankFacts(rank=rank, machine=machine, host=f"machine-{machine}", local_rank=local,
                                   capability=(0, 0)))
            rank += 1
    return facts


def check_attention_ranks_first(topology: Topology, local_world_size: int) -> None:
    """`check_attention_first` for machines of `local_world_size` processes each, ranks numbered machine by
    machine (one launch of equal machines)."""
    if local_world_size < 1:
        return
    world = topology.world_size
    counts = [min(local_world_size, world - first) for first in range(0, world, local_world_size)]
    check_attention_first(topology, planned_facts(counts))


def check_attention_first(topology: Topology, facts: list[RankFacts]) -> None:
    """On GPUs, the attention ranks of every machine must be its first local ranks (0..k-1).

    There LOCAL_RANK stays the device index (Accelerate selects the GPU with it), so Accelerate's local main
    process (local rank 0: data set preprocessing first, logging) is an attention rank only if local rank 0 is
    one; otherwise no process of the machine is its local main. Machines come from what every rank reported
    (launch_facts.py). Raises ValueError with the fix, before any group."""
    if topology.mode != "disaggregated":
        return
    for machine in sorted({f.machine for f in facts}):
        mine = sorted((f for f in facts if f.machine == machine), key=lambda f: f.local_rank)
        local = sorted(f.local_rank for f in mine if topology.is_attention(f.rank))
        if local and local != list(range(len(local))):
            order = local + [f.local_rank for f in mine if f.local_rank not in local]
            wanted = [f.rank for f in mine[: len(local)]]
            raise ValueError(
                f"hetermoe config: `attention_ranks` {list(topology.attention_ranks)} puts the attention ranks of node "
                f"{machine} on its local ranks {local}, but on GPUs they must be the node's first local ranks: "
                "Accelerate's local main process (local rank 0, which preprocesses data sets first and logs) must "
                f"run the script. List `attention_ranks` as {wanted} on this node and order its GPUs attention first "
                f"(CUDA_VISIBLE_DEVICES={','.join(map(str, order))}, in the node's current numbering), name roles per "
                "machine (`attention_machines`), or use `attention_ranks: auto` with `hetermoe launch`, which orders "
                "the GPUs newest first."
            )


def _rewrite_env_for_attention_world(topology: Topology, rank: int, device: torch.device,
                                     facts: list[RankFacts]) -> None:
    """Make Accelerate and the Trainer see only the attention ranks. The attention ranks of a machine are those
    that reported it (launch_facts.py), whatever the machines' process counts."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if name in os.environ:
            os.environ[_ENV_ORIGINAL + name] = os.environ[name]
    local_attention = launch_facts.local_attention(facts, topology.attention_ranks, rank)
    os.environ["RANK"] = str(topology.attention_index(rank))
    os.environ["WORLD_SIZE"] = str(topology.num_attention)
    os.environ["LOCAL_WORLD_SIZE"] = str(len(local_attention))
    if device.type != "cuda":
        # On GPUs LOCAL_RANK stays the physical device index Accelerate selects; on CPU it is the local index.
        os.environ["LOCAL_RANK"] = str(local_attention.index(rank))


@contextlib.contextmanager
def trainers_carry_callback(config: HeterMoEConfig, groups: HeterMoEGroups) -> Iterator[None]:
    """While active, every `transformers.Trainer` (and subclass) gets a HeterMoECallback with these groups."""
    from transformers import Trainer

    from .integrations.trainer import HeterMoECallback

    original_init = Trainer.__init__
    signature = inspect.signature(original_init)

    def patched_init(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        callbacks = list(bound.arguments.get("callbacks") or [])
        ours = [cb for cb in callbacks if isinstance(cb, HeterMoECallback) or cb is HeterMoECallback]
        if not ours:
            callbacks.append(HeterMoECallback(config, groups=groups))
        else:
            for i, cb in enumerate(callbacks):
                if cb is HeterMoECallback:
                    callbacks[i] = HeterMoECallback(config, groups=groups)
                elif isinstance(cb, HeterMoECallback) and cb.groups is None:
                    cb.groups = groups
                    cb.config = cb.config or config
        bound.arguments["callbacks"] = callbacks
        original_init(*bound.args, **bound.kwargs)

    Trainer.__init__ = patched_init
    try:
        yield
    finally:
        Trainer.__init__ = original_init


_JOB: list[tuple[HeterMoEConfig, HeterMoEGroups]] = []  # the job whose script runs now (attention ranks)


@contextlib.contextmanager
def current_job(config: HeterMoEConfig, groups: HeterMoEGroups) -> Iterator[None]:
    """While active, `job()` returns this rank's config and groups (`hf_hetermoe.prepare` uses them)."""
    _JOB.append((config, groups))
    try:
        yield
    finally:
        _JOB.pop()


def job() -> tuple[HeterMoEConfig, HeterMoEGroups] | None:
    """The config and groups of the HeterMoE job this attention rank's script runs in; None outside a launch."""
    return _JOB[-1] if _JOB else None


def run_script(script: str, args: list[str]) -> None:
    """Run a training script as `__main__`, with its own argv."""
    if not os.path.isfile(script):
        raise ValueError(f"hetermoe: training script {script!r} does not exist.")
    saved_argv = sys.argv
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved_argv


def _role(topology: Topology, rank: int) -> str:
    if not topology.is_attention(rank):
        return "expert server"
    index = topology.attention_index(rank)
    return f"attention rank {index}" + (", the leader" if index == 0 and topology.expert_ranks else "")


def _start_health(topology: Topology, rank: int, timeout_s: float) -> HealthMonitor | None:
    """Record this rank's pid and start its heartbeat in the rendezvous store (see health.py)."""
    if topology.world_size == 1:
        return None
    try:
        monitor = HealthMonitor.connect(
            host=os.environ.get("MASTER_ADDR", "127.0.0.1"), port=_env_int("MASTER_PORT"), rank=rank,
            world_size=topology.world_size, role=_role(topology, rank), timeout_s=timeout_s,
        )
        monitor.start()
    except Exception as exc:  # without health keys errors name fewer ranks, but the job itself is fine
        logger.warning("hetermoe: rank %d runs without health reporting (%s).", rank, exc)
        return None
    monitor.install_sigterm_report()
    return monitor


def run_rank(config: HeterMoEConfig, attention_main: Callable[[], None]) -> None:
    """Run this process's role in a HeterMoE job: `attention_main()` on attention ranks, the server elsewhere.

    Every rank records how it ends in the store; a rank that fails prints one line saying why (with the peers
    that stopped) before its traceback, so the first error of a job is easy to find in interleaved output."""
    check_versions()
    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not (config.uses_auto_roles or config.uses_machine_roles):
        config.resolve_topology(world_size)  # a config that cannot fit this world fails here, before any wait
    store = connect_store(rank=rank, world_size=world_size, timeout_s=config.timeout_s)
    try:
        device = _device(local_rank)
        capability = _capability(device)
        mine = launch_facts.facts_of_this_process(rank, local_rank, capability, _device_name(device))
    except Exception as exc:
        # The others wait for this rank's facts: tell them why it will not come, so they fail now, named.
        launch_facts.report_failure(store, rank, f"{type(exc).__name__}: {exc}")
        raise
    facts = launch_facts.exchange_facts(store, mine, world_size, config.timeout_s)
    # Every rank resolves the same topology from the same facts: all fail alike, before any group waits.
    launch_facts.check_machines(facts)
    topology = config.resolve_topology(
        world_size, [f.capability for f in facts] if config.uses_auto_roles else None,
        launch_facts.machine_ranks(facts) if config.uses_machine_roles else None)
    if device.type == "cuda":
        check_attention_first(topology, facts)
    monitor = _start_health(topology, rank, config.timeout_s)
    failed = True
    try:
        _run_role(config, attention_main, store, topology, rank, device, facts)
        failed = False
    except BaseException as exc:
        if monitor is not None:
            if isinstance(exc, SystemExit) and exc.code in (None, 0):
                failed = False
                monitor.record_exit("ok")
            else:
                monitor.report_failure(exc)
        raise
    else:
        if monitor is not None:
            monitor.record_exit("ok")
    finally:
        if monitor is not None:
            # Joined, not just told to stop: a heartbeat still inside a store call when the interpreter finalizes
            # aborts the process (see HealthMonitor.stop). A failed rank waits less: its store may be gone.
            monitor.close(timeout_s=_FAILED_STOP_S if failed else None)
        del store  # the groups let go of it in their shutdown; this was the last reference: the connection closes


def _run_role(config: HeterMoEConfig, attention_main: Callable[[], None], store: dist.Store, topology: Topology,
              rank: int, device: torch.device, facts: list[RankFacts]) -> None:
    groups = HeterMoEGroups.from_store(store, rank=rank, topology=topology, timeout_s=config.timeout_s, device=device)
    groups.device_names = tuple(f.device_name for f in facts)  # ranks expert speeds (expert_split: proportional)
    succeeded = False
    try:
        if topology.is_attention(rank):
            _run_attention(config, attention_main, groups, facts)
        else:
            from .expert_server import serve

            serve(groups, config=config)  # returns on STOP, its results flushed
        succeeded = True
    except SystemExit as exc:
        succeeded = exc.code in (None, 0)
        raise
    finally:
        # A failed rank skips this: a gloo destructor waits for collectives still queued, which with a dead peer
        # takes the group's timeout; main() ends a failed rank with os._exit, which runs no destructor at all.
        # Its NCCL groups are aborted instead (a no-op on gloo): kernels queued on a dead peer stop now.
        if succeeded:
            shutdown_rank(groups)
        else:
            groups.abort(f"rank {rank} failed")


def shutdown_rank(groups: HeterMoEGroups) -> None:
    """Release this rank's process groups before the interpreter finalizes, in one order on every rank: the
    attention world's default group (Accelerate's, attention ranks only), then the HeterMoE groups."""
    if groups.is_attention and dist.is_initialized():
        # Accelerate creates the default group and never destroys it; it would otherwise live until teardown.
        dist.destroy_process_group()
    groups.shutdown()


def _run_attention(config: HeterMoEConfig, attention_main: Callable[[], None], groups: HeterMoEGroups,
                   facts: list[RankFacts]) -> None:
    topology, rank, device = groups.topology, groups.rank, groups.device
    channel = CommandChannel(groups.control, rank=rank, leader=groups.leader, servers=topology.expert_ranks)
    if rank == groups.leader:
        logger.info("hetermoe: %s", topology.describe())
    _rewrite_env_for_attention_world(topology, rank, device, facts)
    try:
        with trainers_carry_callback(config, groups), current_job(config, groups):
            attention_main()
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            _stop_servers(channel, groups)
            raise
        # Report first: the launcher may stop this rank (SIGTERM) while it tells the servers.
        monitor = health.current()
        line = monitor.report_failure(exc) if monitor is not None else ""
        if rank == groups.leader and topology.expert_ranks:
            reason = line.removeprefix("hetermoe: ") or (
                "attention rank 0: " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
            with contextlib.suppress(Exception):
                channel.broadcast(protocol.Abort(reason=reason))
                channel.flush(timeout_s=min(config.timeout_s, 30.0))  # a dead or stuck server must not hold us
        raise
    _stop_servers(channel, groups)


def _stop_servers(channel: CommandChannel, groups: HeterMoEGroups) -> None:
    if groups.is_leader and groups.topology.expert_ranks:
        channel.broadcast(protocol.Stop())
        channel.flush()  # commands travel in order on one connection: STOP sent means all earlier ones were


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_hetermoe.launch",
        description="One process of a HeterMoE job (started by `hetermoe launch` or `accelerate launch`).",
    )
    parser.add_argument("--hetermoe-config", required=True, help="path of the hetermoe YAML config")
    parser.add_argument("script", help="training script run on the attention ranks")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("HETERMOE_LOG_LEVEL", "WARNING"))
    config = HeterMoEConfig.from_yaml(ns.hetermoe_config)
    try:
        run_rank(config, lambda: run_script(ns.script, ns.script_args))
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        _exit_now(exc.code if isinstance(exc.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    """Exit a failed rank at once, its failure reported: interpreter teardown would wait on, or abort in
    ("terminate called without an active exception"), process groups whose peers are gone, for seconds,
    while the launcher is stopping the job anyway."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    # Run the imported module's main, not this `__main__` copy: the script looks up the running job
    # (`hf_hetermoe.prepare` calls `hf_hetermoe.launch.job()`), which must be the one `main` registers.
    from hf_hetermoe.launch import main as _main

    _main()
