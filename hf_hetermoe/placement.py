"""ExpertPlacement: which global rank holds each routed expert of each MoE layer.

Nothing is replicated: every (layer, expert) has exactly one owner. The default placement splits each layer's
experts into equal contiguous blocks over the expert-holding ranks (the expert servers, or every rank when
colocated). Asym-EA placements move whole experts of chosen layers onto attention ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertPlacement:
    num_layers: int
    num_experts: int
    owner: tuple[tuple[int, ...], ...]  # owner[layer][expert] = global rank

    def __post_init__(self) -> None:
        assert len(self.owner) == self.num_layers
        assert all(len(row) == self.num_experts for row in self.owner)

    @classmethod
    def even(cls, *, num_layers: int, num_experts: int, host_ranks: tuple[int, ...]) -> "ExpertPlacement":
        if num_experts % len(host_ranks) != 0:
            raise ValueError(
                f"hetermoe: {num_experts} experts per layer do not divide evenly over {len(host_ranks)} "
                f"expert-holding ranks {list(host_ranks)}."
            )
        per_rank = num_experts // len(host_ranks)
        row = tuple(host_ranks[e // per_rank] for e in range(num_experts))
        return cls(num_layers=num_layers, num_experts=num_experts, owner=tuple(row for _ in range(num_layers)))

    def local_experts(self, rank: int, layer: int) -> tuple[int, ...]:
        """Experts of `layer` held by `rank`, in expert order (the order of its fused local tensors)."""
        return tuple(e for e, r in enumerate(self.owner[layer]) if r == rank)

    def holds_any(self, rank: int) -> bool:
        return any(rank in row for row in self.owner)

    def ranks_holding(self) -> tuple[int, ...]:
        return tuple(sorted({r for row in self.owner for r in row}))

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "owner": [list(r) for r in self.owner]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertPlacement":
        return cls(
            num_layers=int(data["num_layers"]),
            num_experts=int(data["num_experts"]),
            owner=tuple(tuple(int(r) for r in row) for row in data["owner"]),
        )

    def describe(self) -> str:
        lines = []
        for rank in self.ranks_holding():
            layers = {tuple(self.local_experts(rank, layer)) for layer in range(self.num_layers)}
            if len(layers) == 1:
                lines.append(f"rank {rank}: experts {list(next(iter(layers)))} of every layer")
            else:
                per = ", ".join(f"L{layer}:{list(self.local_experts(rank, layer))}" for layer in range(self.num_layers))
                lines.append(f"rank {rank}: {per}")
        return "\n".join(lines)
