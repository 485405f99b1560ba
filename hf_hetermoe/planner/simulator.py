"""Discrete-event simulator of one training iteration over groups of identical GPUs.

Model (HeterMoE paper, "Zebra parallelism"): every GPU has one compute stream and two communication streams
(dispatch, combine). A *group* is a set of identical GPUs doing identical work (the attention pool, the
expert pool), so one timeline stands for all of its GPUs.

* Compute tasks run on their group's compute stream in the explicit order the schedule gives
  (`TaskGraph.orders`); a task starts when it is next in that order, the stream is free and its
  dependencies have finished.
* Communication tasks are collectives (all-to-all) over one or more groups. They are issued as soon as their
  dependencies finish and run one at a time per (group, stream), first-ready first (ties: creation order), so
  every group sees the same order and no collective can deadlock. A collective costs a fixed latency, then
  moves its bytes: `loads[(group, "send"|"recv")]` bytes per GPU of that group. Links are full duplex and
  shared fairly: while c collectives use the same (group, direction), each gets 1/c of the bandwidth, and a
  collective progresses at the pace of its most constrained (group, direction).

Nothing here knows about MoE; `schedules.py` builds the task graphs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

COMPUTE, DISPATCH, COMBINE = "compute", "dispatch", "combine"
STREAMS = (COMPUTE, DISPATCH, COMBINE)
_EPS = 1e-12


@dataclass(kw_only=True)
class Task:
    id: int
    name: str  # e.g. "A^F[2,1]"
    kind: str  # attn_f, attn_b, head_f, head_b, exp_f, exp_b, dispatch_f, dispatch_b, combine_f, combine_b
    stream: str
    groups: tuple[str, ...]  # one group for compute tasks; the participants for collectives
    duration: float = 0.0  # compute tasks
    loads: dict[tuple[str, str], float] = field(default_factory=dict)  # collectives: bytes per GPU
    deps: tuple[int, ...] = ()
    layer: int = 0  # 1-based stage index as in Theorem 1
    microbatch: int = 0  # 1-based


@dataclass(kw_only=True)
class GroupSpec:
    count: int  # GPUs in the group (for reporting)
    link_bytes_per_s: float  # per GPU, per direction


@dataclass(kw_only=True)
class TaskGraph:
    tasks: list[Task] = field(default_factory=list)
    orders: dict[str, list[int]] = field(default_factory=dict)  # group -> compute task ids in stream order

    def add(self, **kwargs) -> int:
        task = Task(id=len(self.tasks), **kwargs)
        self.tasks.append(task)
        if task.stream == COMPUTE:
            self.orders.setdefault(task.groups[0], []).append(task.id)
        return task.id

    def by_name(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)


@dataclass(kw_only=True)
class SimResult:
    start: list[float]
    end: list[float]
    graph: TaskGraph
    groups: dict[str, GroupSpec]

    @property
    def makespan(self) -> float:
        return max(self.end) if self.end else 0.0

    def busy(self, group: str, stream: str = COMPUTE, window: tuple[float, float] | None = None) -> float:
        """Seconds `group`'s `stream` is busy (within `window` if given)."""
        lo, hi = window if window is not None else (0.0, self.makespan)
        total = 0.0
        for task in self.graph.tasks:
            if task.stream == stream and group in task.groups:
                total += max(0.0, min(hi, self.end[task.id]) - max(lo, self.start[task.id]))
        return total

    def utilisation(self, group: str, window: tuple[float, float] | None = None) -> float:
        lo, hi = window if window is not None else (0.0, self.makespan)
        return self.busy(group, COMPUTE, window) / (hi - lo) if hi > lo else 0.0

    def bubble(self, group: str, window: tuple[float, float] | None = None) -> float:
        """Idle seconds of one GPU of `group`'s compute stream (within `window`)."""
        lo, hi = window if window is not None else (0.0, self.makespan)
        return (hi - lo) - self.busy(group, COMPUTE, window)


class DeadlockError(RuntimeError):
    """The given stream orders contradict the data dependencies (e.g. a task ordered before its input)."""


def simulate(graph: TaskGraph, groups: dict[str, GroupSpec], *, latency_s: float = 0.0) -> SimResult:
    tasks = graph.tasks
    n = len(tasks)
    start, end = [float("nan")] * n, [float("nan")] * n
    finished = [False] * n
    waiting = [len(t.deps) for t in tasks]
    users: list[list[int]] = [[] for _ in range(n)]
    for task in tasks:
        for dep in task.deps:
            users[dep].append(task.id)
    # Per collective: the (group, stream) slots it occupies and its (link, bytes) loads that move data.
    slots = [[(g, t.stream) for g in t.groups] if t.stream != COMPUTE else [] for t in tasks]
    moving = [[(key, b) for key, b in t.loads.items() if b > 0] for t in tasks]

    order_pos = {g: 0 for g in graph.orders}
    compute_busy: dict[str, int | None] = {g: None for g in groups}
    comm_busy: dict[tuple[str, str], int | None] = {(g, s): None for g in groups for s in (DISPATCH, COMBINE)}
    comm_ready: list[tuple[float, int]] = []  # heap of (ready time, id): issued collectives not yet started
    events: list[tuple[float, int, int]] = []  # heap of (time, seq, id) for compute ends and latency ends
    transfers: dict[int, float] = {}  # collective id -> remaining fraction of its bytes
    rate: dict[int, float] = {}  # collective id -> fraction per second at the current sharing
    seq = 0
    for task in tasks:
        if task.stream != COMPUTE and not task.deps:
            heapq.heappush(comm_ready, (0.0, task.id))

    def finish(tid: int, now: float) -> None:
        finished[tid] = True
        end[tid] = now
        task = tasks[tid]
        if task.stream == COMPUTE:
            compute_busy[task.groups[0]] = None
        else:
            for slot in slots[tid]:
                comm_busy[slot] = None
        for user in users[tid]:
            waiting[user] -= 1
            if waiting[user] == 0 and tasks[user].stream != COMPUTE:
                heapq.heappush(comm_ready, (now, user))

    def share_rates() -> None:
        share: dict[tuple[str, str], int] = {}
        for tid in transfers:
            for key, _ in moving[tid]:
                share[key] = share.get(key, 0) + 1
        rate.clear()
        for tid in transfers:
            rate[tid] = min(groups[key[0]].link_bytes_per_s / (share[key] * b) for key, b in moving[tid])

    now, done = 0.0, 0
    while done < n:
        # 1. start everything that can start now
        for g, order in graph.orders.items():
            if compute_busy[g] is None and order_pos[g] < len(order):
                tid = order[order_pos[g]]
                if waiting[tid] == 0:
                    order_pos[g] += 1
                    compute_busy[g] = tid
                    start[tid] = now
                    seq += 1
                    heapq.heappush(events, (now + tasks[tid].duration, seq, tid))
        if comm_ready:
            blocked: set[tuple[str, str]] = set()  # FIFO: a waiting collective blocks later ones on its streams
            keep: list[tuple[float, int]] = []
            while comm_ready:
                item = heapq.heappop(comm_ready)
                tid = item[1]
                if any(comm_busy[k] is not None or k in blocked for k in slots[tid]):
                    blocked.update(slots[tid])
                    keep.append(item)
                    continue
                for k in slots[tid]:
                    comm_busy[k] = tid
                start[tid] = now
                seq += 1
                heapq.heappush(events, (now + latency_s, seq, tid))  # the latency phase; bytes move after
            for item in keep:
                heapq.heappush(comm_ready, item)

        # 2. the next event: a compute end, a latency end, or a transfer finishing at current rates
        t_next, next_transfer = (events[0][0] if events else float("inf")), None
        for tid, r in rate.items():
            t_done = now + transfers[tid] / r
            if t_done < t_next:
                t_next, next_transfer = t_done, tid
        if t_next == float("inf"):
            stuck = [tasks[i].name for i in range(n) if not finished[i]][:6]
            raise DeadlockError(f"simulation cannot progress at t={now:.6g}s; unfinished tasks include {stuck}")
        for tid, r in rate.items():
            transfers[tid] -= r * (t_next - now)
        now = t_next

        # 3. complete what ends now
        changed = False
        if next_transfer is not None:
            transfers[next_transfer] = 0.0
        for tid in [t for t, left in transfers.items() if left <= _EPS]:
            del transfers[tid]
            finish(tid, now)
            done += 1
            changed = True
        while events and events[0][0] <= now + _EPS:
            tid = heapq.heappop(events)[2]
            if moving[tid]:
                transfers[tid] = 1.0  # latency over; start moving bytes
                changed = True
            else:
                finish(tid, now)
                done += 1
        if changed:
            share_rates()
    return SimResult(start=start, end=end, graph=graph, groups=groups)
