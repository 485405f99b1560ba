"""The zebra compute order of one micro-batch (HeterMoE paper, Theorem 1), in one place.

Pure Python (no torch): the planner's simulator (`planner/schedules.build_zebra`), the runtime
(`zebra.ZebraRunner`) and the tests all take the order from here.

Indexing follows the paper. A micro-batch is split into R *stripes* (the paper's micro-batches), numbered
0..R-1 here. Attention *stage* s = 1..L is the work between combine s-1 and dispatch s: stage 1 is embedding +
attention 1 + router 1, stage L (the top) is what follows the last combine: the rest of the last layer, the
final norm, the LM head and the loss. Expert stages are s = 1..L-1, one per MoE layer.

Step kinds:
  "A"  an attention stage on an attention GPU;
  "H"  head and loss: the tail of stage L's forward and the start of its backward. The runtime runs and
       records it on its own; the simulator folds it into stage L's "A" steps (it has no duration of its own);
  "X"  Asym-EA: the experts of one MoE layer held on an attention GPU, after that layer's attention of all stripes;
  "E"  the experts of one MoE layer on an expert GPU.

Two variants of the attention order, the same for expert GPUs:
  batched_head=False  the paper's order: at the top, forward and backward alternate per stripe
                      (A^F[L,j], H^F, H^B, A^B[L,j] for j = 0..R-1);
  batched_head=True   the runtime's order: the stock Trainer computes one loss per micro-batch, so the top
                      stage's forwards of all stripes come first, then the head and loss once over the whole
                      micro-batch (stripe None), then the top stage's backwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

FORWARD, BACKWARD = "F", "B"


class Step(NamedTuple):
    """One compute task of one pool, in paper indexing."""

    kind: str  # "A", "H", "X" or "E" (see the module docstring)
    direction: str  # "F" or "B"
    stage: int  # 1-based paper stage; "H" steps carry L
    stripe: int | None  # 0-based; None: the whole micro-batch (the batched head)


def attention_order(num_stages: int, num_stripes: int, *, batched_head: bool,
                    asym_ea_stages: Iterable[int] = ()) -> list[Step]:
    """Compute order of an attention GPU for one micro-batch of `num_stages` stages (L >= 2) and R stripes.

    `asym_ea_stages`: the MoE layers (1..L-1) whose Asym-EA experts this GPU runs ("X" steps): in forward
    after that layer's attention of all stripes, in backward before it.
    """
    _check(num_stages, num_stripes)
    L, stripes, local = num_stages, range(num_stripes), frozenset(asym_ea_stages)
    order: list[Step] = []
    for s in range(1, L):
        order += [Step("A", FORWARD, s, j) for j in stripes]
        if s in local:
            order += [Step("X", FORWARD, s, j) for j in stripes]
    if batched_head:
        order += [Step("A", FORWARD, L, j) for j in stripes]
        order += [Step("H", FORWARD, L, None), Step("H", BACKWARD, L, None)]
        order += [Step("A", BACKWARD, L, j) for j in stripes]
    else:
        for j in stripes:
            order += [Step("A", FORWARD, L, j), Step("H", FORWARD, L, j), Step("H", BACKWARD, L, j),
                      Step("A", BACKWARD, L, j)]
    for s in range(L - 1, 0, -1):
        if s in local:
            order += [Step("X", BACKWARD, s, j) for j in stripes]
        order += [Step("A", BACKWARD, s, j) for j in stripes]
    return order


def expert_order(num_stages: int, num_stripes: int) -> list[Step]:
    """Compute order of an expert GPU: E^F layer by layer upwards, then E^B downwards; stripes in order."""
    _check(num_stages, num_stripes)
    stripes = range(num_stripes)
    order = [Step("E", FORWARD, s, j) for s in range(1, num_stages) for j in stripes]
    order += [Step("E", BACKWARD, s, j) for s in range(num_stages - 1, 0, -1) for j in stripes]
    return order


TimelineKey = tuple[str, str, int, int]  # (kind, direction, layer, stripe) as the runtime's timeline records them


def timeline_order(num_layers: int, num_stripes: int, *,
                   batched_head: bool = True) -> tuple[list[TimelineKey], list[TimelineKey]]:
    """The same orders as the runtime's timeline keys, for `num_layers` MoE decoder layers (all layers MoE).

    Returns (attention keys, expert-server keys). The runtime labels a task by the event that ends it, with
    0-based layers: an attention forward ("A", "F", l, j) ends at the dispatch of layer l (l = num_layers: the
    top, after the last combine), an attention backward ("A", "B", l, j) at the dispatch of layer l's output
    gradients (l = -1: the bottom, after the first layer); ("E", d, l, j) is layer l's experts. Head and loss
    are ("H", d, -1, j), with j = -1 for the batched head. In paper stages: A^F[s] -> s-1, A^B[s] -> s-2,
    E[s] -> s-1.
    """
    stages = num_layers + 1
    shift = {("A", FORWARD): 1, ("A", BACKWARD): 2, ("E", FORWARD): 1, ("E", BACKWARD): 1}

    def key(step: Step) -> TimelineKey:
        if step.kind == "H":
            return ("H", step.direction, -1, -1 if step.stripe is None else step.stripe)
        return (step.kind, step.direction, step.stage - shift[(step.kind, step.direction)], step.stripe)

    attention = [key(s) for s in attention_order(stages, num_stripes, batched_head=batched_head)]
    return attention, [key(s) for s in expert_order(stages, num_stripes)]


class BackwardStep(NamedTuple):
    """One step of the runtime's segmented backward (see `segmented_backward_order`)."""

    stage: int  # 1: dy of the segment's experts, sent at once; 2: the rest of the segment, once dx is back
    layer: int  # 0-based decoder layer (segment = one decoder layer of one stripe)
    stripe: int  # 0-based


def segmented_backward_order(num_layers: int, num_stripes: int) -> list[BackwardStep]:
    """The (stage, layer, stripe) order in which the runtime walks its segments backward (Theorem 1, batched head).

    Contract, for T = num_layers - 1 (the top decoder layer) and R = num_stripes:
      1. (1, T, j) for j = 0..R-1: the top layer's dy of every stripe, right after the batched head's backward;
      2. for l = T..0, for j = 0..R-1: (2, l, j), then (1, l-1, j) if l > 0; so stage 2 of layer l of stripe j
         is followed at once by stage 1 of layer l-1 of the same stripe, and its dy leaves before stripe j+1's
         work.
    Every (layer, stripe) appears once per stage; stage 1 of a segment always precedes its stage 2, and stage 2
    of (l, j) precedes stage 2 of (l-1, j) (its output gradient is that segment's input). Boundaries a caller
    acts on: layer m's dys are all issued right after the step (1, m, R-1); layer l's stage 2 is complete for
    all stripes right after (2, l, R-1), i.e. (for l > 0) after the step (1, l-1, R-1) that follows it.
    Stage 1 of a non-MoE layer has nothing to send (the caller skips it); empty stripes keep their steps.
    """
    if num_layers < 1 or num_stripes < 1:
        raise ValueError(f"need at least one layer and one stripe, got {num_layers} and {num_stripes}")
    top, stripes = num_layers - 1, range(num_stripes)
    order = [BackwardStep(1, top, j) for j in stripes]
    for layer in range(top, -1, -1):
        for j in stripes:
            order.append(BackwardStep(2, layer, j))
            if layer > 0:
                order.append(BackwardStep(1, layer - 1, j))
    return order


def _check(num_stages: int, num_stripes: int) -> None:
    if num_stages < 2 or num_stripes < 1:
        raise ValueError(f"need at least two stages (one MoE layer) and one stripe, got {num_stages} and {num_stripes}")
