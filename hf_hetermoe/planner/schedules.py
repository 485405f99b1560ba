"""Task graphs of one training iteration for the simulator: zebra (ZP, ZP+Asym-EA, DistEP) and EP.

Indexing follows Theorem 1 (HeterMoE paper; hf_hetermoe/schedule_order.py): attention *stage* l = 1..L is the work
between combine l-1 and dispatch l, so stage 1 is embedding + attention 1 + router 1, stage L is the final norm, LM
head and loss, and expert stages are l = 1..L-1 (one per MoE layer). Task names: A (attention stage), E (experts on
an expert GPU), X (experts moved onto an attention GPU by Asym-EA), D (dispatch), C (combine); ^F / ^B for forward
/ backward; [l, j] = stage l, micro-batch j.

Backward of combine (C^B) sends expert-output gradients attention -> experts on the combine stream; backward
of dispatch (D^B) returns expert-input gradients experts -> attention on the dispatch stream, so each
collective's backward moves the same bytes the other way on the same communicator.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule_order import Step, attention_order, expert_order
from .simulator import COMBINE, COMPUTE, DISPATCH, TaskGraph

Loads = dict[tuple[str, str], float]
ATTN, EXP = "attn", "exp"  # group names of the disaggregated schedules


def reverse(loads: Loads) -> Loads:
    """The same bytes flowing the other way (backward of a collective)."""
    flip = {"send": "recv", "recv": "send"}
    return {(g, flip[d]): b for (g, d), b in loads.items()}


@dataclass(frozen=True, kw_only=True)
class ZebraCosts:
    """Durations (s) and per-GPU bytes of a disaggregated iteration; index [stage-1][microbatch-1].

    attn_f/attn_b have L rows (last = head and loss); exp_*, xa_*, dispatch, combine have L-1 rows.
    Backward durations include activation recomputation when the setup uses it. `xa_*` are the Asym-EA
    experts' times on an attention GPU (all zero: no task is created).
    """

    attn_f: list[list[float]]
    attn_b: list[list[float]]
    exp_f: list[list[float]]
    exp_b: list[list[float]]
    xa_f: list[list[float]]
    xa_b: list[list[float]]
    dispatch: list[list[Loads]]  # forward dispatch loads; D^B uses them reversed
    combine: list[list[Loads]]  # forward combine loads; C^B uses them reversed

    @property
    def num_stages(self) -> int:
        return len(self.attn_f)

    @property
    def num_microbatches(self) -> int:
        return len(self.attn_f[0])

    def __post_init__(self) -> None:
        stages, r = self.num_stages, self.num_microbatches
        assert stages >= 2 and r >= 1, "need at least one MoE layer and one micro-batch"
        for name in ("exp_f", "exp_b", "xa_f", "xa_b", "dispatch", "combine"):
            rows = getattr(self, name)
            assert len(rows) == stages - 1 and all(len(row) == r for row in rows), f"{name} must be (L-1) x R"


def build_zebra(c: ZebraCosts, *, batched_head: bool = False) -> TaskGraph:
    """The Theorem-1 schedule (with Asym-EA's attention-side experts after each layer's attention).

    The compute streams' orders (`graph.orders`) come from `hf_hetermoe.schedule_order` (attention_order,
    expert_order); a test may replace them with any other order. Tasks are created in the same order, so
    collectives that become ready at the same time keep breaking ties as before. `batched_head=True` is the
    runtime's variant: the stock Trainer computes one loss per micro-batch, so the head starts after every
    micro-batch's last combine, the top stage's forwards of all micro-batches come first, then its backwards,
    and no output gradient leaves before the last one.
    """
    L, R = c.num_stages, c.num_microbatches
    g = TaskGraph()
    af: dict[tuple[int, int], int] = {}
    ab: dict[tuple[int, int], int] = {}
    cf: dict[tuple[int, int], int] = {}
    cb: dict[tuple[int, int], int] = {}
    both = (ATTN, EXP)

    def has_x(l: int) -> bool:
        return any(t > 0 for t in c.xa_f[l - 1])

    for l in range(1, L):
        df = {}
        for j in range(1, R + 1):
            deps = (cf[(l - 1, j)],) if l > 1 else ()
            af[(l, j)] = g.add(name=f"A^F[{l},{j}]", kind="attn_f", stream=COMPUTE, groups=(ATTN,),
                               duration=c.attn_f[l - 1][j - 1], deps=deps, layer=l, microbatch=j)
            df[j] = g.add(name=f"D^F[{l},{j}]", kind="dispatch_f", stream=DISPATCH, groups=both,
                          loads=c.dispatch[l - 1][j - 1], deps=(af[(l, j)],), layer=l, microbatch=j)
        ef = {j: g.add(name=f"E^F[{l},{j}]", kind="exp_f", stream=COMPUTE, groups=(EXP,),
                       duration=c.exp_f[l - 1][j - 1], deps=(df[j],), layer=l, microbatch=j) for j in range(1, R + 1)}
        xf = {}
        if has_x(l):
            xf = {j: g.add(name=f"X^F[{l},{j}]", kind="xexp_f", stream=COMPUTE, groups=(ATTN,),
                           duration=c.xa_f[l - 1][j - 1], deps=(df[j],), layer=l, microbatch=j) for j in range(1, R + 1)}
        for j in range(1, R + 1):
            deps = (ef[j],) + ((xf[j],) if xf else ())
            cf[(l, j)] = g.add(name=f"C^F[{l},{j}]", kind="combine_f", stream=COMBINE, groups=both,
                               loads=c.combine[l - 1][j - 1], deps=deps, layer=l, microbatch=j)
    if batched_head:
        # One head over the whole micro-batch: it starts once every stripe's top-layer results are back.
        every_top = tuple(cf[(L - 1, x)] for x in range(1, R + 1))
        for j in range(1, R + 1):
            af[(L, j)] = g.add(name=f"A^F[{L},{j}]", kind="head_f", stream=COMPUTE, groups=(ATTN,),
                               duration=c.attn_f[L - 1][j - 1], deps=every_top, layer=L, microbatch=j)
        for j in range(1, R + 1):
            ab[(L, j)] = g.add(name=f"A^B[{L},{j}]", kind="head_b", stream=COMPUTE, groups=(ATTN,),
                               duration=c.attn_b[L - 1][j - 1], deps=(af[(L, R)],), layer=L, microbatch=j)
        for j in range(1, R + 1):
            cb[(L - 1, j)] = g.add(name=f"C^B[{L - 1},{j}]", kind="combine_b", stream=COMBINE, groups=both,
                                   loads=reverse(c.combine[L - 2][j - 1]), deps=(ab[(L, R)],), layer=L - 1,
                                   microbatch=j)
    for j in range(1, R + 1) if not batched_head else ():  # the top: forward and backward of each alternate
        af[(L, j)] = g.add(name=f"A^F[{L},{j}]", kind="head_f", stream=COMPUTE, groups=(ATTN,),
                           duration=c.attn_f[L - 1][j - 1], deps=(cf[(L - 1, j)],), layer=L, microbatch=j)
        ab[(L, j)] = g.add(name=f"A^B[{L},{j}]", kind="head_b", stream=COMPUTE, groups=(ATTN,),
                           duration=c.attn_b[L - 1][j - 1], deps=(af[(L, j)],), layer=L, microbatch=j)
        cb[(L - 1, j)] = g.add(name=f"C^B[{L - 1},{j}]", kind="combine_b", stream=COMBINE, groups=both,
                               loads=reverse(c.combine[L - 2][j - 1]), deps=(ab[(L, j)],), layer=L - 1, microbatch=j)
    for l in range(L - 1, 0, -1):
        eb = {j: g.add(name=f"E^B[{l},{j}]", kind="exp_b", stream=COMPUTE, groups=(EXP,),
                       duration=c.exp_b[l - 1][j - 1], deps=(cb[(l, j)],), layer=l, microbatch=j) for j in range(1, R + 1)}
        xb = {}
        if has_x(l):
            xb = {j: g.add(name=f"X^B[{l},{j}]", kind="xexp_b", stream=COMPUTE, groups=(ATTN,),
                           duration=c.xa_b[l - 1][j - 1], deps=(cb[(l, j)],), layer=l, microbatch=j) for j in range(1, R + 1)}
        db = {j: g.add(name=f"D^B[{l},{j}]", kind="dispatch_b", stream=DISPATCH, groups=both,
                       loads=reverse(c.dispatch[l - 1][j - 1]), deps=(eb[j],) + ((xb[j],) if xb else ()),
                       layer=l, microbatch=j) for j in range(1, R + 1)}
        for j in range(1, R + 1):
            # Backward stops at the attention outputs until the expert-input gradients are back (router branch).
            ab[(l, j)] = g.add(name=f"A^B[{l},{j}]", kind="attn_b", stream=COMPUTE, groups=(ATTN,),
                               duration=c.attn_b[l - 1][j - 1], deps=(db[j], ab[(l + 1, j)]), layer=l, microbatch=j)
            if l > 1:
                cb[(l - 1, j)] = g.add(name=f"C^B[{l - 1},{j}]", kind="combine_b", stream=COMBINE, groups=both,
                                       loads=reverse(c.combine[l - 2][j - 1]), deps=(ab[(l, j)],), layer=l - 1,
                                       microbatch=j)
    asym_ea = [l for l in range(1, L) if has_x(l)]
    g.orders = {ATTN: _task_ids(g, attention_order(L, R, batched_head=batched_head, asym_ea_stages=asym_ea)),
                EXP: _task_ids(g, expert_order(L, R))}
    return g


def _task_ids(g: TaskGraph, order: list[Step]) -> list[int]:
    """Task ids of `order`'s steps ("H" is part of stage L's "A" tasks here; stripes are micro-batches 1..R)."""
    ids = {task.name: task.id for task in g.tasks}
    return [ids[f"{s.kind}^{s.direction}[{s.stage},{s.stripe + 1}]"] for s in order if s.kind != "H"]


@dataclass(frozen=True, kw_only=True)
class ColocatedCosts:
    """Expert parallelism: every group runs attention and holds experts; index [group][stage-1].

    attn_f/attn_b have L rows per group (last = head); exp_* have L-1 rows; `alltoall[l-1]` holds the per-GPU
    bytes of layer l's dispatch (combine and both backward collectives move the same amounts).
    """

    groups: tuple[str, ...]
    attn_f: dict[str, list[float]]
    attn_b: dict[str, list[float]]
    exp_f: dict[str, list[float]]
    exp_b: dict[str, list[float]]
    alltoall: list[Loads]


def build_colocated(c: ColocatedCosts) -> TaskGraph:
    """EP: layer by layer, one micro-batch, every collective over all GPUs (a synchronous all-to-all)."""
    g = TaskGraph()
    G = c.groups
    L = len(c.attn_f[G[0]])
    prev: tuple[int, ...] = ()
    for l in range(1, L):
        a = tuple(g.add(name=f"A^F[{l}]@{x}", kind="attn_f", stream=COMPUTE, groups=(x,), duration=c.attn_f[x][l - 1],
                        deps=prev, layer=l, microbatch=1) for x in G)
        d = g.add(name=f"D^F[{l}]", kind="dispatch_f", stream=DISPATCH, groups=G, loads=c.alltoall[l - 1], deps=a,
                  layer=l, microbatch=1)
        e = tuple(g.add(name=f"E^F[{l}]@{x}", kind="exp_f", stream=COMPUTE, groups=(x,), duration=c.exp_f[x][l - 1],
                        deps=(d,), layer=l, microbatch=1) for x in G)
        prev = (g.add(name=f"C^F[{l}]", kind="combine_f", stream=COMBINE, groups=G, loads=c.alltoall[l - 1], deps=e,
                      layer=l, microbatch=1),)
    top_b = {}
    for x in G:
        f = g.add(name=f"A^F[{L}]@{x}", kind="head_f", stream=COMPUTE, groups=(x,), duration=c.attn_f[x][L - 1],
                  deps=prev, layer=L, microbatch=1)
        top_b[x] = g.add(name=f"A^B[{L}]@{x}", kind="head_b", stream=COMPUTE, groups=(x,), duration=c.attn_b[x][L - 1],
                         deps=(f,), layer=L, microbatch=1)
    above = dict(top_b)
    for l in range(L - 1, 0, -1):
        cb = g.add(name=f"C^B[{l}]", kind="combine_b", stream=COMBINE, groups=G, loads=c.alltoall[l - 1],
                   deps=tuple(above.values()), layer=l, microbatch=1)
        e = tuple(g.add(name=f"E^B[{l}]@{x}", kind="exp_b", stream=COMPUTE, groups=(x,), duration=c.exp_b[x][l - 1],
                        deps=(cb,), layer=l, microbatch=1) for x in G)
        db = g.add(name=f"D^B[{l}]", kind="dispatch_b", stream=DISPATCH, groups=G, loads=c.alltoall[l - 1], deps=e,
                   layer=l, microbatch=1)
        above = {x: g.add(name=f"A^B[{l}]@{x}", kind="attn_b", stream=COMPUTE, groups=(x,), duration=c.attn_b[x][l - 1],
                          deps=(db, above[x]), layer=l, microbatch=1) for x in G}
    return g
