"""Planner: the discrete-event engine, and Theorem 1 checked against exhaustive search over stream orders."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hetermoe.planner.schedules import ATTN, EXP, ZebraCosts, build_zebra
from hf_hetermoe.planner.simulator import COMBINE, COMPUTE, DISPATCH, DeadlockError, GroupSpec, TaskGraph, simulate

GROUPS = {ATTN: GroupSpec(count=1, link_bytes_per_s=1.0), EXP: GroupSpec(count=1, link_bytes_per_s=1.0)}


# ---- the engine ---------------------------------------------------------------------------------------------
def test_compute_chain_and_collective_latency_add_up():
    g = TaskGraph()
    a = g.add(name="a", kind="attn_f", stream=COMPUTE, groups=(ATTN,), duration=2.0)
    d = g.add(name="d", kind="dispatch_f", stream=DISPATCH, groups=(ATTN, EXP), loads={(ATTN, "send"): 3.0},
              deps=(a,))
    g.add(name="e", kind="exp_f", stream=COMPUTE, groups=(EXP,), duration=1.0, deps=(d,))
    sim = simulate(g, GROUPS, latency_s=0.5)
    assert sim.end == pytest.approx([2.0, 5.5, 6.5])
    assert sim.utilisation(EXP) == pytest.approx(1 / 6.5)


def _two_collectives(dir_a: str, dir_b: str) -> list[float]:
    g = TaskGraph()
    g.add(name="x", kind="dispatch_f", stream=DISPATCH, groups=(ATTN, EXP), loads={(ATTN, dir_a): 4.0})
    g.add(name="y", kind="combine_f", stream=COMBINE, groups=(ATTN, EXP), loads={(ATTN, dir_b): 4.0})
    return simulate(g, GROUPS).end


def test_links_are_shared_fairly_per_direction_and_full_duplex():
    assert _two_collectives("send", "send") == pytest.approx([8.0, 8.0])  # same direction: half speed each
    assert _two_collectives("send", "recv") == pytest.approx([4.0, 4.0])  # opposite directions: no contention


def test_one_stream_runs_one_collective_at_a_time_first_ready_first():
    g = TaskGraph()
    g.add(name="x", kind="dispatch_f", stream=DISPATCH, groups=(ATTN, EXP), loads={(ATTN, "send"): 2.0})
    g.add(name="y", kind="dispatch_f", stream=DISPATCH, groups=(ATTN, EXP), loads={(EXP, "send"): 2.0})
    assert simulate(g, GROUPS).end == pytest.approx([2.0, 4.0])


def test_an_order_against_the_dependencies_is_reported():
    g = TaskGraph()
    a = g.add(name="a", kind="attn_f", stream=COMPUTE, groups=(ATTN,), duration=1.0)
    g.add(name="b", kind="attn_f", stream=COMPUTE, groups=(ATTN,), duration=1.0, deps=(a,))
    g.orders[ATTN] = [1, 0]
    with pytest.raises(DeadlockError):
        simulate(g, GROUPS)


# ---- Theorem 1 ----------------------------------------------------------------------------------------------
def uniform_costs(stages: int, r: int, *, a: float, e: float, head: float, comm: float) -> ZebraCosts:
    """Identical micro-batches; attention stages cost `a` (the head `head`), expert stages `e`; backward 2x."""
    d = {(ATTN, "send"): comm, (EXP, "recv"): comm}
    c = {(ATTN, "recv"): comm, (EXP, "send"): comm}
    rows = stages - 1
    return ZebraCosts(
        attn_f=[[a] * r for _ in range(rows)] + [[head] * r], attn_b=[[2 * a] * r for _ in range(rows)] + [[2 * head] * r],
        exp_f=[[e] * r for _ in range(rows)], exp_b=[[2 * e] * r for _ in range(rows)],
        xa_f=[[0.0] * r for _ in range(rows)], xa_b=[[0.0] * r for _ in range(rows)],
        dispatch=[[dict(d) for _ in range(r)] for _ in range(rows)],
        combine=[[dict(c) for _ in range(r)] for _ in range(rows)],
    )


def _ancestors(g: TaskGraph) -> list[set[int]]:
    anc: list[set[int]] = [set() for _ in g.tasks]
    for t in g.tasks:  # tasks are created after their dependencies
        for dep in t.deps:
            anc[t.id] |= anc[dep] | {dep}
    return anc


def _stream_orders(ids: list[int], anc: list[set[int]]):
    """Every order of one stream's tasks that respects the data dependencies among them."""
    def rec(prefix: list[int], remaining: set[int]):
        if not remaining:
            yield list(prefix)
            return
        for t in sorted(remaining):
            if not anc[t] & remaining:
                prefix.append(t)
                remaining.discard(t)
                yield from rec(prefix, remaining)
                remaining.add(t)
                prefix.pop()
    yield from rec([], set(ids))


def _consistent(g: TaskGraph, order_a: list[int], order_e: list[int]) -> bool:
    """No cycle through dependencies and both stream orders (else the pair deadlocks)."""
    n = len(g.tasks)
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    edges = [(d, t.id) for t in g.tasks for d in t.deps] + list(zip(order_a, order_a[1:])) + list(zip(order_e, order_e[1:]))
    for x, y in edges:
        succ[x].append(y)
        indeg[y] += 1
    stack, seen = [i for i in range(n) if indeg[i] == 0], 0
    while stack:
        x = stack.pop()
        seen += 1
        for y in succ[x]:
            indeg[y] -= 1
            if indeg[y] == 0:
                stack.append(y)
    return seen == n


def _best_other_order(stages: int, r: int, relabel_symmetry: bool, **costs) -> tuple[float, float, int]:
    """(Theorem-1 makespan, best makespan over all consistent order pairs, number of pairs simulated)."""
    g = build_zebra(uniform_costs(stages, r, **costs))
    theorem = simulate(g, GROUPS, latency_s=0.01).makespan
    anc = _ancestors(g)
    orders_a = list(_stream_orders(g.orders[ATTN], anc))
    orders_e = list(_stream_orders(g.orders[EXP], anc))
    if relabel_symmetry:
        # Micro-batches are identical, so renaming them maps a schedule to one with the same makespan:
        # keep the orders whose first attention task belongs to micro-batch 1.
        orders_a = [o for o in orders_a if g.tasks[o[0]].microbatch == 1]
    best, count = float("inf"), 0
    for oa in orders_a:
        for oe in orders_e:
            if not _consistent(g, oa, oe):
                continue
            g.orders = {ATTN: oa, EXP: oe}
            best = min(best, simulate(g, GROUPS, latency_s=0.01).makespan)
            count += 1
    return theorem, best, count


@pytest.mark.parametrize("costs", [dict(a=1.0, e=1.3, head=1.0, comm=0.2),  # experts slower
                                   dict(a=1.0, e=0.5, head=1.0, comm=0.2),  # attention slower
                                   dict(a=0.5, e=1.5, head=0.5, comm=0.9)])  # communication-heavy
def test_theorem1_order_is_optimal_two_stages_two_microbatches_exhaustive(costs):
    theorem, best, count = _best_other_order(2, 2, relabel_symmetry=False, **costs)
    assert count == 206  # every dependency-consistent pair of attention / expert stream orders
    assert theorem <= best + 1e-9


@pytest.mark.parametrize("costs", [dict(a=1.0, e=1.3, head=1.0, comm=0.2), dict(a=1.5, e=0.5, head=1.5, comm=0.6)])
def test_theorem1_order_is_optimal_three_stages_two_microbatches_exhaustive(costs):
    theorem, best, count = _best_other_order(3, 2, relabel_symmetry=True, **costs)
    assert count > 6000
    assert theorem <= best + 1e-9


def _random_consistent_orders(g: TaskGraph, rng: random.Random) -> tuple[list[int], list[int]]:
    """A random topological order of the whole graph, projected on each compute stream: always consistent."""
    indeg = [len(t.deps) for t in g.tasks]
    users: list[list[int]] = [[] for _ in g.tasks]
    for t in g.tasks:
        for dep in t.deps:
            users[dep].append(t.id)
    ready, out = [i for i, d in enumerate(indeg) if d == 0], []
    while ready:
        x = ready.pop(rng.randrange(len(ready)))
        out.append(x)
        for y in users[x]:
            indeg[y] -= 1
            if indeg[y] == 0:
                ready.append(y)
    on = {t.id: t.groups[0] for t in g.tasks if t.stream == COMPUTE}
    return [x for x in out if on.get(x) == ATTN], [x for x in out if on.get(x) == EXP]


@settings(max_examples=20, deadline=None)
@given(stages=st.integers(2, 3), r=st.integers(2, 3), a=st.floats(0.2, 2.0), e=st.floats(0.2, 2.0),
       comm=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_theorem1_order_beats_random_orders_with_uniform_stages(stages, r, a, e, comm, seed):
    g = build_zebra(uniform_costs(stages, r, a=a, e=e, head=a, comm=comm))
    theorem = simulate(g, GROUPS, latency_s=0.01).makespan
    rng = random.Random(seed)
    for _ in range(30):
        oa, oe = _random_consistent_orders(g, rng)
        g.orders = {ATTN: oa, EXP: oe}
        assert simulate(g, GROUPS, latency_s=0.01).makespan >= theorem - 1e-9


def test_theorem1_is_not_optimal_when_the_head_dwarfs_the_layers():
    # A known limit (reported in docs/planner.md): with an LM head 10x an attention layer, starting the first
    # micro-batch's head before the others' lower layers finish keeps the expert GPU busy and wins.
    theorem, best, _ = _best_other_order(3, 2, relabel_symmetry=True, a=0.5, e=1.5, head=5.0, comm=0.2)
    assert best < theorem * 0.99
