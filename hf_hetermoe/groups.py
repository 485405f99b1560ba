"""HeterMoEGroups: every process group HeterMoE uses, owned by one object and passed as an argument.

Groups (see docs/architecture.md), all built from one rendezvous store with their own key prefix:
- dispatch: all ranks; carries tokens (forward) and output gradients (backward) towards expert holders.
- combine: all ranks; carries expert outputs (forward) and input gradients (backward) back. Separate from
  dispatch so the two directions have independent operation orders (the paper's two streams).
- control: all ranks, always gloo on CPU tensors; commands from the leader (global attention rank 0) to expert
  servers and small reductions (gradient norms). Its timeout is long because an expert server waits on it while
  the attention ranks do work without experts (data loading, saving); a peer that dies still surfaces at once
  as "connection closed". Gloo closes a connection when a wait times out, so a short timeout cannot be polled.
- attention: attention ranks only; the data-parallel gradient all-reduce (replaces DDP).
- counts, attention_counts: gloo on CPU tensors, like their namesakes above (all ranks / attention ranks); the
  per-expert row counts of each exchange. Counts must reach the host anyway (all-to-all splits are Python
  ints), and NCCL accepts only device tensors, so they travel on their own CPU groups on every backend.

The groups are constructed directly (`ProcessGroupGloo(PrefixStore(...), rank, size, timeout)`), not registered
with torch.distributed: the attention ranks' own default group (Accelerate's world) spans attention ranks only.

`shutdown()` releases them before the interpreter exits. In torch 2.13 `ProcessGroupGloo.shutdown()` and
`abort()` are no-ops (the Backend defaults); a gloo group lets go of its worker threads, its device loop thread and
its sockets only in its destructor, i.e. when the last Python reference to it goes. Left to interpreter teardown,
that destructor runs (if at all) while the interpreter is finalizing, where any C++ thread that still needs the
GIL is ended by pthread_exit from inside a noexcept destructor: "terminate called without an active exception".
(Without it, an attention rank entered teardown with its four groups alive: 8 `pt_gloo_runloop` worker threads
and 4 `gloo_tcp_loop` device threads, held by the finished script's patched model through reference cycles.)
So shutdown drops every reference it holds, in one fixed order, and collects the finished script's reference
cycles (patched models, exchangers, command channels) so the destructors run now, on the main thread.

On GPUs the data groups (dispatch, combine, attention) are NCCL. An NCCL Work's wait() does not block the thread
(it only makes the current stream wait), so each NCCL group is wrapped (`DeviceGroup`) and hands out its Works as
`health.DeviceWork`, which `health.wait` polls within `timeout_s`. `abort()` is the failure path: it aborts the
NCCL groups (ncclCommAbort), so no kernel or stream sync keeps waiting for a dead peer; idempotent. The NCCL groups
get a longer timeout than `timeout_s` (`NCCL_TIMEOUT_MARGIN_S`) and NCCL's CleanUpOnly error handling, so that
HeterMoE's named error, not NCCL's watchdog tearing the process down, reports a dead peer.

`HETERMOE_DATA_BACKEND=gloo` (read by `data_backend`) keeps the data groups on gloo with CUDA tensors: NCCL refuses
two ranks on one GPU, so several processes sharing one GPU (a smoke test) need it. Unset, or `auto`: NCCL on
CUDA devices, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import health
from .config import Topology

# An expert server can sit idle on the control group while attention ranks run evaluation-free stretches
# (tokenising a data set, writing a checkpoint). A dead peer is still reported at once by the socket.
CONTROL_TIMEOUT = datetime.timedelta(days=7)

# Reverse order of construction, the same on every rank (the attention groups exist on attention ranks only).
SHUTDOWN_ORDER = ("attention_counts", "attention", "counts", "control", "combine", "dispatch")

logger = logging.getLogger("hf_hetermoe.groups")

DATA_BACKEND_ENV = "HETERMOE_DATA_BACKEND"
# NCCL's own watchdog acts on a group's timeout by tearing the process down (or at least aborting the
# communicators); HeterMoE's wait gives up at `timeout_s` and names what it waited for, so NCCL's comes later.
NCCL_TIMEOUT_MARGIN_S = 60.0
_NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_NCCL_CLEAN_UP_ONLY = "2"  # abort the communicators on an error, leave the process to report it


def data_backend(device: torch.device) -> str:
    """The backend of the data groups (dispatch, combine, attention): NCCL on CUDA devices, gloo on CPU, or what
    HETERMOE_DATA_BACKEND says (`gloo`, `nccl`, `auto`)."""
    choice = os.environ.get(DATA_BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "gloo", "nccl"):
        raise ValueError(
            f"hetermoe: {DATA_BACKEND_ENV}={os.environ[DATA_BACKEND_ENV]!r} is not a data backend; use `auto` (NCCL "
            "on GPUs, gloo on CPU), `gloo` (several ranks on one GPU) or `nccl`, or unset it.")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ValueError(
            f"hetermoe: {DATA_BACKEND_ENV}=nccl needs CUDA devices, and this rank runs on {device}; unset it (gloo "
            "is used on CPU).")
    return choice


@contextlib.contextmanager
def _nccl_error_handling() -> "contextlib.AbstractContextManager[None]":
    """CleanUpOnly error handling for the NCCL groups built inside (it is read per group, at construction), unless
    the user chose a mode; other groups (Accelerate's) keep torch's default."""
    if _NCCL_ERROR_HANDLING_ENV in os.environ:
        yield
        return
    os.environ[_NCCL_ERROR_HANDLING_ENV] = _NCCL_CLEAN_UP_ONLY
    try:
        yield
    finally:
        os.environ.pop(_NCCL_ERROR_HANDLING_ENV, None)


class DeviceGroup:
    """An NCCL group whose Works come back as `health.DeviceWork` (polled by `health.wait`, see the module
    docstring); everything else is the group's own."""

    def __init__(self, group: Any, device_abort: health.DeviceAbort):
        self.group = group
        self.device_abort = device_abort

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.group, name)
        if not callable(attr) or name in ("abort", "shutdown"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            return health.DeviceWork(out, self.device_abort) if isinstance(out, dist.Work) else out

        return call


def _unwrap(group: Any) -> Any:
    return group.group if isinstance(group, DeviceGroup) else group


@dataclass
class HeterMoEGroups:
    rank: int  # global rank
    topology: Topology
    dispatch: Any
    combine: Any
    control: Any
    attention: Any | None  # None on expert servers, and when there is one attention rank
    counts: Any  # gloo, all ranks: per-expert row counts for the expert servers
    attention_counts: Any | None  # gloo, attention ranks: counts for experts held on attention ranks
    device: torch.device
    timeout_s: float
    # Incremented each time a model is patched over these groups: the expert servers then hold that model's
    # experts, and an older patched model must not use them.
    generation: int = 0
    device_abort: health.DeviceAbort | None = None  # shared by the NCCL groups' Works; None without NCCL groups
    # Every global rank's reported GPU name (launch_facts.py), in rank order; None outside `hetermoe launch`.
    device_names: tuple[str, ...] | None = None
    closed: bool = field(default=False, init=False)

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def leader(self) -> int:
        """Global rank of attention rank 0, the only source of commands to expert servers."""
        return self.topology.attention_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def is_attention(self) -> bool:
        return self.topology.is_attention(self.rank)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_store(
        cls, store: Any, *, rank: int, topology: Topology, timeout_s: float, device: torch.device
    ) -> "HeterMoEGroups":
        """Build the groups over all `topology.world_size` ranks from a rendezvous store (the launcher path)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        world = topology.world_size
        backend = data_backend(device)
        device_abort = health.DeviceAbort(timeout_s) if backend == "nccl" else None

        def make(name: str, group_rank: int, size: int, backend: str, group_timeout: datetime.timedelta):
            prefixed = dist.PrefixStore(f"hetermoe/{name}", store)
            if backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = group_timeout + datetime.timedelta(seconds=NCCL_TIMEOUT_MARGIN_S)
                with _nccl_error_handling():
                    group = dist.ProcessGroupNCCL(prefixed, group_rank, size, options)
                device_abort.groups.append(group)
                return DeviceGroup(group, device_abort)
            return dist.ProcessGroupGloo(prefixed, group_rank, size, group_timeout)

        dispatch = make("dispatch", rank, world, backend, timeout)
        combine = make("combine", rank, world, backend, timeout)
        control = make("control", rank, world, "gloo", CONTROL_TIMEOUT)
        counts = make("counts", rank, world, "gloo", timeout)
        attention = attention_counts = None
        if topology.is_attention(rank) and topology.num_attention > 1:
            index, num = topology.attention_index(rank), topology.num_attention
            attention = make("attention", index, num, backend, timeout)
            attention_counts = make("attention_counts", index, num, "gloo", timeout)
        return cls(
            rank=rank, topology=topology, dispatch=dispatch, combine=combine, control=control,
            attention=attention, counts=counts, attention_counts=attention_counts, device=device,
            timeout_s=timeout_s, device_abort=device_abort,
        )

    @classmethod
    def from_default_group(cls, *, topology: Topology, timeout_s: float, device: torch.device) -> "HeterMoEGroups":
        """Build the groups over torch.distributed's default world (the callback path without the launcher).

        Every rank of that world runs attention (colocated mode), so the attention group is the world.
        """
        assert topology.mode == "colocated" and topology.world_size == dist.get_world_size()
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = data_backend(device)
        device_abort = health.DeviceAbort(timeout_s) if backend == "nccl" else None

        def data_group() -> Any:
            if backend != "nccl":
                return dist.new_group(backend=backend, timeout=timeout)
            with _nccl_error_handling():
                group = dist.new_group(backend=backend, timeout=timeout + datetime.timedelta(
                    seconds=NCCL_TIMEOUT_MARGIN_S))
            device_abort.groups.append(group)
            return DeviceGroup(group, device_abort)

        # new_group is collective: every rank calls these in the same order (each builds the same Trainer).
        dispatch = data_group()
        combine = data_group()
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        counts = dist.new_group(backend="gloo", timeout=timeout)
        attention = attention_counts = None
        if topology.world_size > 1:
            attention = data_group()
            attention_counts = dist.new_group(backend="gloo", timeout=timeout)
        return cls(
            rank=dist.get_rank(), topology=topology, dispatch=dispatch, combine=combine, control=control,
            attention=attention, counts=counts, attention_counts=attention_counts, device=device,
            timeout_s=timeout_s, device_abort=device_abort,
        )

    @classmethod
    def single_process(cls, *, topology: Topology, timeout_s: float, device: torch.device) -> "HeterMoEGroups":
        """A world of one process (colocated: it runs attention and holds every expert)."""
        assert topology.world_size == 1
        timeout = datetime.timedelta(seconds=timeout_s)

        def make():
            return dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timeout)

        return cls(
            rank=0, topology=topology, dispatch=make(), combine=make(), control=make(), attention=None,
            counts=make(), attention_counts=None, device=device, timeout_s=timeout_s,
        )

    # ---- abort (the failure path) ---------------------------------------------------------------------
    def abort(self, reason: str = "the rank failed") -> bool:
        """Abort this rank's NCCL groups (ncclCommAbort): a collective still queued on a dead or stuck peer stops,
        and every wait on these groups fails at once, named, instead of hanging in a stream sync. Idempotent
        (False when already aborted, or without NCCL groups); bounded in time. Gloo groups are left alone: their
        waits raise by themselves, and the control group must still carry the leader's ABORT to the servers.
        After it the groups are unusable; `shutdown()` then releases nothing more (the rank is exiting)."""
        if self.device_abort is None:
            return False
        aborted = self.device_abort.abort(reason)
        self.closed = True  # destroying an aborted communicator is not needed, and may block
        return aborted

    # ---- shutdown -------------------------------------------------------------------------------------
    def shutdown(self) -> list[str]:
        """Release every group of this rank, in `SHUTDOWN_ORDER` on every rank; idempotent.

        Call it when nothing is in flight any more (the leader has flushed its commands, the servers their
        results), on the success path: a gloo destructor waits for its queued collectives, which with a dead
        peer would take the group's timeout. Returns the names of groups still referenced elsewhere (a model
        the caller keeps alive), which are then released whenever that holder goes."""
        if self.closed:
            return []
        self.closed = True
        if self.device_abort is not None and self.device_abort.reason is not None:
            return []  # aborted (a wait failed): the rank is exiting, and its communicators are gone
        watched: list[tuple[str, weakref.ref]] = []
        for name in SHUTDOWN_ORDER:
            group = getattr(self, name)
            if group is None:
                continue
            setattr(self, name, None)
            _shut(group)
            group = _unwrap(group)
            try:
                watched.append((name, weakref.ref(group)))
            except TypeError:  # a group type without weak references: nothing to check
                pass
            del group
        if self.device_abort is not None:
            self.device_abort.groups.clear()  # its references to the NCCL groups were the last ones here
        gc.collect()  # the finished script's cycles (model <-> engine <-> channel) hold the groups too
        alive = [name for name, ref in watched if ref() is not None]
        if alive:
            logger.debug("hetermoe: rank %d: groups %s are still referenced after shutdown.", self.rank, alive)
        return alive


def _shut(group: Any) -> None:
    """Shut one group down: through torch.distributed if registered there (colocated groups from `new_group`),
    else directly (NCCL frees its communicators here; gloo's is a no-op and its destructor does the work)."""
    import torch.distributed.distributed_c10d as c10d

    group = _unwrap(group)
    if dist.is_initialized() and group in c10d._world.pg_map:
        dist.destroy_process_group(group)
        return
    shutdown = getattr(group, "shutdown", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception as exc:  # releasing must go on with the other groups
            logger.debug("hetermoe: shutting a group down failed: %s", exc)
