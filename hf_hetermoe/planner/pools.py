"""Mixed-speed expert pools: how many experts of each layer each expert GPU holds (docs/planner.md,
"Mixed-speed expert pools").

The even split gives every expert GPU n/N experts, so in a V100+T4 pool the T4s pace every all-to-all while
the V100s wait. The proportional split gives each expert GPU experts in proportion to its *expert speed*
(one expert's rows per second on its device profile, forward + backward, at the rows one expert receives from
one micro-batch: `expert_speed`), bounded by the experts its memory holds (planner/memory.py), with the integer
rounding of `hf_hetermoe.placement.split_counts` (largest remainder, contiguous blocks in expert order; the
runtime uses the same function, so the plan's counts are what it places). Every layer is split alike.
"""

from __future__ import annotations

from .memory import expert_caps_per_layer
from .model_shape import ModelShape
from .profiles import DeviceCosts
from .workload import Setup


def expert_speed(device: DeviceCosts, shape: ModelShape, *, tokens_per_expert: float) -> float:
    """Rows per second of one expert on `device` (forward + backward) at `tokens_per_expert` routed rows.

    Includes the per-expert launch overhead, so the ratio between two devices is the ratio of the times
    the simulator charges them for the same expert."""
    fwd, bwd = device.expert_s(shape, num_tokens=tokens_per_expert)
    return tokens_per_expert / (fwd + bwd)


def stripe_tokens_per_expert(setup: Setup, r: int) -> float:
    """Routed rows one expert receives from one micro-batch (the largest stripe) under uniform routing."""
    c, shape = setup.cluster, setup.shape
    return c.num_attention * shape.top_k * max(setup.microbatch_seqs(r)) * setup.seq_len / shape.num_experts


def expert_speeds(setup: Setup, r: int) -> tuple[float, ...]:
    """Each expert rank's expert speed (rows/s), in expert-rank order."""
    tokens = stripe_tokens_per_expert(setup, r)
    return tuple(expert_speed(d, setup.shape, tokens_per_expert=tokens) for d in setup.cluster.expert_devices)


def proportional_counts(setup: Setup, r: int) -> tuple[int, ...]:
    """Experts per layer of each expert rank: proportional to its expert speed, at most what its memory holds."""
    from ..placement import split_counts

    return split_counts(setup.shape.num_experts, expert_speeds(setup, r), expert_caps_per_layer(setup))


def split_rows(setup: Setup, counts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """owner[layer][expert] rows (planner ranks) for per-expert-rank counts, every layer alike."""
    from ..placement import ExpertPlacement

    placement = ExpertPlacement.weighted(layers=tuple(range(setup.shape.num_layers)),
                                         num_experts=setup.shape.num_experts,
                                         host_ranks=setup.cluster.expert_ranks, weights=counts)
    return tuple(placement.owner[layer] for layer in placement.layers)
