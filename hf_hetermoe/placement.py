"""ExpertPlacement: which global rank holds each routed expert of each MoE layer.

Layers are the decoder-layer indices that have routed experts (a family may keep some layers dense, e.g.
DeepSeek-V3's first layers). Nothing is replicated: every (layer, expert) has exactly one owner. The default
placement splits each layer's experts into equal contiguous blocks over the expert-holding ranks (the expert
servers, or every rank when colocated); `weighted` splits them into contiguous blocks of sizes proportional to
per-rank weights (the expert speeds of a mixed-speed pool, docs/planner.md "Mixed-speed expert pools"), and
`even` is its equal-weights case. Asym-EA placements move whole experts of chosen layers onto attention ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


def split_counts(num_experts: int, weights: Sequence[float], caps: Sequence[int] | None = None) -> tuple[int, ...]:
    """Integer expert counts, one per rank, summing to `num_experts`, proportional to `weights` and at most `caps`.

    Largest remainder: each rank gets the floor of its quota num_experts * w / sum(w), and the experts left go one
    each to the largest fractional parts (ties: the earlier rank). A rank whose quota exceeds its cap (memory)
    gets its cap, and the rest is re-split over the others in proportion to their weights. Equal weights over
    ranks that divide `num_experts` give exactly num_experts / len(weights) each.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("hetermoe: an expert split needs at least one rank.")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"hetermoe: expert split weights {list(weights)} must be finite, >= 0 and not all 0. "
                         "Give each expert rank a relative speed, e.g. [2, 1].")
    cap = [num_experts if caps is None else max(0, int(c)) for c in (caps or [None] * n)]
    if len(cap) != n:
        raise ValueError(f"hetermoe: {len(cap)} memory caps for {n} ranks.")
    if sum(c for c, x in zip(cap, w) if x > 0) < num_experts:
        raise ValueError(f"hetermoe: the {n} expert ranks fit {sum(cap)} experts per layer (memory caps {cap}, "
                         f"weights {w}) but the model has {num_experts}. Use more or larger expert GPUs.")
    counts = [0] * n
    fixed: set[int] = set()
    while True:  # water-filling: cap the ranks that overflow, re-split the rest
        left = num_experts - sum(counts[i] for i in fixed)
        free = [i for i in range(n) if i not in fixed and w[i] > 0]
        total = sum(w[i] for i in free)
        quota = {i: left * w[i] / total for i in free}
        over = [i for i in free if quota[i] > cap[i]]
        if not over:
            break
        for i in over:
            counts[i] = cap[i]
            fixed.add(i)
    for i in free:
        counts[i] = math.floor(quota[i] + 1e-9)
    rest = num_experts - sum(counts)
    by_remainder = sorted((i for i in free if counts[i] < cap[i]), key=lambda i: (-(quota[i] - counts[i]), i))
    for i in by_remainder[:rest]:
        counts[i] += 1
    assert sum(counts) == num_experts and all(0 <= c <= k for c, k in zip(counts, cap))
    return tuple(counts)


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    owner: dict[int, tuple[int, ...]]  # owner[layer][expert] = global rank, for every MoE layer

    def __post_init__(self) -> None:
        assert all(len(row) == self.num_experts for row in self.owner.values())

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.owner))

    @classmethod
    def even(cls, *, layers: tuple[int, ...], num_experts: int, host_ranks: tuple[int, ...]) -> "ExpertPlacement":
        if num_experts % len(host_ranks) != 0:
            raise ValueError(
                f"hetermoe: {num_experts} experts per layer do not divide evenly over {len(host_ranks)} "
                f"expert-holding ranks {list(host_ranks)}."
            )
        per_rank = num_experts // len(host_ranks)
        row = tuple(host_ranks[e // per_rank] for e in range(num_experts))
        return cls(num_experts=num_experts, owner={layer: row for layer in layers})

    @classmethod
    def weighted(cls, *, layers: tuple[int, ...], num_experts: int, host_ranks: tuple[int, ...],
                 weights: Sequence[float], caps: Sequence[int] | None = None) -> "ExpertPlacement":
        """Every layer alike: contiguous blocks in expert order, sizes from `split_counts(weights, caps)`."""
        if len(weights) != len(host_ranks):
            raise ValueError(f"hetermoe: {len(weights)} expert split weights for {len(host_ranks)} expert ranks "
                             f"{list(host_ranks)}. Give one weight per expert rank.")
        counts = split_counts(num_experts, weights, caps)
        row = tuple(rank for rank, count in zip(host_ranks, counts) for _ in range(count))
        return cls(num_experts=num_experts, owner={layer: row for layer in layers})

    def local_experts(self, rank: int, layer: int) -> tuple[int, ...]:
        """Experts of `layer` held by `rank`, in expert order (the order of its fused local tensors)."""
        return tuple(e for e, r in enumerate(self.owner[layer]) if r == rank)

    def holds_any(self, rank: int) -> bool:
        return any(rank in row for row in self.owner.values())

    def ranks_holding(self) -> tuple[int, ...]:
        return tuple(sorted({r for row in self.owner.values() for r in row}))

    def to_dict(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "owner": {str(k): list(v) for k, v in sorted(self.owner.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertPlacement":
        return cls(
            num_experts=int(data["num_experts"]),
            owner={int(layer): tuple(int(r) for r in row) for layer, row in data["owner"].items()},
        )

    def describe(self) -> str:
        lines = []
        for rank in self.ranks_holding():
            held = {self.local_experts(rank, layer) for layer in self.layers}
            if len(held) == 1:
                lines.append(f"rank {rank}: experts {list(next(iter(held)))} of every layer")
            else:
                per = ", ".join(f"L{layer}:{list(self.local_experts(rank, layer))}" for layer in self.layers)
                lines.append(f"rank {rank}: {per}")
        return "\n".join(lines)
