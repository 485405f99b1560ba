"""The one encoding of the zebra compute order (hf_hetermoe/schedule_order.py): paper order and batched head."""

import itertools

import pytest

from hf_hetermoe.planner.schedules import ATTN, EXP, ZebraCosts, build_zebra
from hf_hetermoe.planner.simulator import COMPUTE
from hf_hetermoe.schedule_order import (
    BackwardStep,
    Step,
    attention_order,
    expert_order,
    segmented_backward_order,
    timeline_order,
)

# Written out for 3 MoE layers and 2 stripes, in the runtime's timeline keys.
FORWARD = [("A", "F", l, j) for l in range(3) for j in range(2)]
BOTTOM = [("A", "B", l, j) for l in (1, 0, -1) for j in range(2)]
BATCHED = FORWARD + [("A", "F", 3, 0), ("A", "F", 3, 1), ("H", "F", -1, -1), ("H", "B", -1, -1),
                     ("A", "B", 2, 0), ("A", "B", 2, 1)] + BOTTOM
PAPER = FORWARD + [("A", "F", 3, 0), ("H", "F", -1, 0), ("H", "B", -1, 0), ("A", "B", 2, 0),
                   ("A", "F", 3, 1), ("H", "F", -1, 1), ("H", "B", -1, 1), ("A", "B", 2, 1)] + BOTTOM
EXPERTS = ([("E", "F", l, j) for l in range(3) for j in range(2)]
           + [("E", "B", l, j) for l in (2, 1, 0) for j in range(2)])


def test_timeline_keys_of_the_batched_head_variant():
    assert timeline_order(3, 2, batched_head=True) == (BATCHED, EXPERTS)


def test_timeline_keys_of_the_paper_order():
    assert timeline_order(3, 2, batched_head=False) == (PAPER, EXPERTS)


@pytest.mark.parametrize("stages,stripes", [(2, 1), (3, 2), (5, 4)])
def test_variants_differ_only_at_the_top(stages, stripes):
    paper = attention_order(stages, stripes, batched_head=False)
    batched = attention_order(stages, stripes, batched_head=True)
    top = [s for s in paper if s.stage == stages]
    assert [s for s in paper if s.stage != stages] == [s for s in batched if s.stage != stages]
    assert sorted(s for s in top if s.kind == "A") == sorted(s for s in batched if s.kind == "A" and s.stage == stages)
    assert [s for s in batched if s.kind == "H"] == [Step("H", "F", stages, None), Step("H", "B", stages, None)]
    for order in (paper, batched):  # every attention stage once per stripe and direction
        a = [s for s in order if s.kind == "A"]
        assert len(a) == len(set(a)) == 2 * stages * stripes


def test_asym_ea_steps_follow_forward_and_precede_backward_attention():
    order = attention_order(3, 2, batched_head=False, asym_ea_stages=[2])
    assert order[2:6] == [Step("A", "F", 2, 0), Step("A", "F", 2, 1), Step("X", "F", 2, 0), Step("X", "F", 2, 1)]
    back = order[order.index(Step("A", "B", 3, 1)) + 1:]
    assert back[:4] == [Step("X", "B", 2, 0), Step("X", "B", 2, 1), Step("A", "B", 2, 0), Step("A", "B", 2, 1)]


def test_expert_order_is_layer_by_layer_up_then_down():
    assert expert_order(3, 2) == [Step("E", "F", 1, 0), Step("E", "F", 1, 1), Step("E", "F", 2, 0),
                                  Step("E", "F", 2, 1), Step("E", "B", 2, 0), Step("E", "B", 2, 1),
                                  Step("E", "B", 1, 0), Step("E", "B", 1, 1)]


def test_orders_refuse_degenerate_sizes():
    with pytest.raises(ValueError):
        attention_order(1, 2, batched_head=True)
    with pytest.raises(ValueError):
        expert_order(3, 0)
    with pytest.raises(ValueError):
        segmented_backward_order(0, 2)


def test_segmented_backward_order_written_out():
    assert segmented_backward_order(2, 2) == [
        BackwardStep(1, 1, 0), BackwardStep(1, 1, 1),
        BackwardStep(2, 1, 0), BackwardStep(1, 0, 0), BackwardStep(2, 1, 1), BackwardStep(1, 0, 1),
        BackwardStep(2, 0, 0), BackwardStep(2, 0, 1),
    ]


@pytest.mark.parametrize("layers,stripes", [(1, 1), (1, 3), (4, 2), (5, 4)])
def test_segmented_backward_order_contract(layers, stripes):
    order = segmented_backward_order(layers, stripes)
    where = {step: i for i, step in enumerate(order)}
    assert len(where) == len(order) == 2 * layers * stripes
    for layer, j in itertools.product(range(layers), range(stripes)):
        assert where[BackwardStep(1, layer, j)] < where[BackwardStep(2, layer, j)]
        if layer > 0:
            assert where[BackwardStep(2, layer, j)] + 1 == where[BackwardStep(1, layer - 1, j)]
            assert where[BackwardStep(2, layer, j)] < where[BackwardStep(2, layer - 1, j)]
        if j > 0:  # stripes in order within a layer
            assert where[BackwardStep(2, layer, j - 1)] < where[BackwardStep(2, layer, j)]


def _costs(stages, r, asym):
    one = [[1.0] * r for _ in range(stages)]
    xa = [[1.0 if l + 1 in asym else 0.0] * r for l in range(stages - 1)]
    empty = [[{}] * r for _ in range(stages - 1)]
    return ZebraCosts(attn_f=one, attn_b=one, exp_f=one[1:], exp_b=one[1:], xa_f=xa, xa_b=xa,
                      dispatch=empty, combine=empty)


@pytest.mark.parametrize("stages,r,batched,asym", [(2, 1, False, ()), (3, 2, True, (1,)), (5, 3, False, (2, 4)),
                                                    (4, 4, True, ())])
def test_simulator_streams_follow_the_shared_order(stages, r, batched, asym):
    g = build_zebra(_costs(stages, r, asym), batched_head=batched)
    names = {ATTN: [g.tasks[i].name for i in g.orders[ATTN]], EXP: [g.tasks[i].name for i in g.orders[EXP]]}
    label = lambda s: f"{s.kind}^{s.direction}[{s.stage},{s.stripe + 1}]"  # noqa: E731
    assert names[ATTN] == [label(s) for s in attention_order(stages, r, batched_head=batched, asym_ea_stages=asym)
                           if s.kind != "H"]
    assert names[EXP] == [label(s) for s in expert_order(stages, r)]
    created = {}  # tasks are created in the same order (collectives break ties by creation)
    for task in g.tasks:
        if task.stream == COMPUTE:
            created.setdefault(task.groups[0], []).append(task.id)
    assert created == g.orders
