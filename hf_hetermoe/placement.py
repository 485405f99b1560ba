"""ExpertPlacement: which global rank holds each routed expert of each MoE layer.

Layers are the decoder-layer indices that have routed experts (a family may keep some layers dense, e.g.
DeepSeek-V3's first layers). Nothing is replicated: every (layer, expert) has exactly one owner. The default
placement splits each layer's experts into equal contiguous blocks over the expert-holding ranks (the expert
servers, or every rank when colocated). Asym-EA placements move whole experts of chosen layers onto attention
ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
