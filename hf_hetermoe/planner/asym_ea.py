"""Asym-EA: Algorithm 1 ("gather and squeeze", HeterMoE paper) and the concrete expert placement it implies.

When one micro-batch's expert compute on an expert GPU (T_E^Exp) outlasts its attention on an attention GPU
(T_A^Attn), attention GPUs idle T_gather = T_E^Exp - T_A^Attn per layer. The algorithm gathers that bubble
layer by layer and, once a chunk's worth has accumulated, squeezes it out by moving a chunk of whole experts
of that layer from expert GPUs to attention GPUs (each attention GPU takes different experts; nothing is
replicated). Moving one expert saves N*T_E^Exp/n on each expert GPU and costs N*T_E^Attn/n on each attention
GPU, so a chunk (each attention GPU takes n1, each expert GPU gives n2) removes
T_squeeze = (T_E^Exp N/n) n2 + (T_E^Attn N/n) n1 of bubble. Times are forward times of one micro-batch
(backward scales the same way).

Legend: n experts per layer, L layers, M attention GPUs, N expert GPUs, o_l experts each expert GPU gives up
at layer l (0-based layer indices, as in the hetermoe config's `asym_ea` mapping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_TOL = 1e-9  # relative slack so that accumulated floating-point sums of exact chunks still count as whole


def check_divisibility(*, num_attention: int, num_expert: int) -> None:
    if num_attention % num_expert != 0 and num_expert % num_attention != 0:
        raise ValueError(
            f"asym_ea: {num_attention} attention GPUs and {num_expert} expert GPUs: Asym-EA needs one count to be a "
            f"multiple of the other (M a multiple of N or N a multiple of M). Change the GPU counts (e.g. "
            f"{num_expert} attention GPUs) or turn Asym-EA off."
        )


def chunk_sizes(*, num_attention: int, num_expert: int) -> tuple[int, int]:
    """(n1, n2): experts each attention GPU takes, and each expert GPU gives up, per chunk."""
    check_divisibility(num_attention=num_attention, num_expert=num_expert)
    n1 = max(1, num_expert // num_attention)
    n2 = n1 * num_attention // num_expert
    return n1, n2


def gather_and_squeeze(
    *, num_experts: int, num_layers: int, num_attention: int, num_expert: int,
    t_attn: float, t_exp_on_attention: float, t_exp_on_expert: float,
    n_min: int = 0, n_max: int | None = None,
) -> list[int]:
    """Algorithm 1: o_l for each layer (experts each expert GPU gives up at that layer).

    t_attn = T_A^Attn, t_exp_on_attention = T_E^Attn, t_exp_on_expert = T_E^Exp (one micro-batch, forward).
    n_min / n_max bound the total over layers of experts each expert GPU gives up (memory: at least n_min
    must leave, at most n_max fit on the attention GPUs).
    """
    if num_experts % num_expert != 0:
        raise ValueError(
            f"asym_ea: {num_experts} experts per layer do not divide over {num_expert} expert GPUs. "
            f"Use a number of expert GPUs that divides {num_experts}."
        )
    n1, n2 = chunk_sizes(num_attention=num_attention, num_expert=num_expert)
    per_gpu = num_experts // num_expert
    n_max = num_layers * per_gpu if n_max is None else min(n_max, num_layers * per_gpu)
    if n_min > n_max:
        raise ValueError(
            f"asym_ea: memory needs at least {n_min} experts moved off each expert GPU but the attention GPUs can "
            f"take at most {n_max}. Use GPUs with more memory, more GPUs, or a smaller model."
        )
    t_gather = t_exp_on_expert - t_attn
    t_squeeze = (t_exp_on_expert * num_expert / num_experts) * n2 + (t_exp_on_attention * num_expert / num_experts) * n1
    if t_gather <= 0:
        if n_min == 0:
            return [0] * num_layers
        # No bubble to gather, but memory forces moves: spread exactly ceil(n_min/n2) chunks over the layers.
        step = math.ceil(n_min / n2) * t_squeeze / num_layers
    else:
        alpha = min(math.floor(n_max / n2) * t_squeeze / (num_layers * t_gather), 1.0)
        beta = max(math.ceil(n_min / n2) * t_squeeze / (num_layers * t_gather), 1.0)
        step = alpha * beta * t_gather
    offloads, t, moved = [], 0.0, 0
    for _ in range(num_layers):
        t += step
        chunks = 0
        if t >= t_squeeze * (1 - _TOL):
            chunks = math.floor(t / t_squeeze + _TOL)
            # A layer cannot give more experts than each expert GPU holds, nor more than memory allows.
            chunks = min(chunks, per_gpu // n2, (n_max - moved) // n2)
            t -= chunks * t_squeeze
        offloads.append(chunks * n2)
        moved += chunks * n2
    if moved < n_min:
        raise ValueError(
            f"asym_ea: only {moved} experts per expert GPU could be moved (at most {per_gpu} per layer) but memory "
            f"needs {n_min}. Use GPUs with more memory or more expert GPUs."
        )
    return offloads


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Which expert of which layer lives on which global rank: owners[layer][expert] = rank (0-based layers)."""

    owners: dict[int, dict[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[int, dict[int, int]]:
        return {layer: dict(experts) for layer, experts in self.owners.items()}

    @classmethod
    def from_dict(cls, data: dict[Any, dict[Any, Any]]) -> "Placement":
        """Accepts int or string keys (JSON turns int keys into strings)."""
        try:
            owners = {int(layer): {int(e): int(r) for e, r in experts.items()} for layer, experts in data.items()}
        except (TypeError, ValueError, AttributeError):
            raise ValueError("placement: expected {layer: {expert: rank}} with integer keys and ranks.") from None
        return cls(owners=owners)

    def experts_on(self, rank: int, layer: int) -> list[int]:
        return sorted(e for e, r in self.owners[layer].items() if r == rank)

    def owner_rows(self) -> tuple[tuple[int, ...], ...]:
        """owner[layer][expert] rows, the layout of the runtime's `hf_hetermoe.placement.ExpertPlacement`."""
        return tuple(tuple(self.owners[layer][e] for e in sorted(self.owners[layer])) for layer in sorted(self.owners))

    def counts(self, layer: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for rank in self.owners[layer].values():
            out[rank] = out.get(rank, 0) + 1
        return out


def placement_from_offloads(
    *, num_experts: int, attention_ranks: tuple[int, ...], expert_ranks: tuple[int, ...], offloads: list[int],
) -> Placement:
    """The concrete placement for per-layer offload counts o_l (the single source of this convention).

    Without Asym-EA, expert rank i (i-th of `expert_ranks`) holds experts [i*q, (i+1)*q), q = n/N. At layer l
    it gives up its last o_l; the moved experts, listed by expert rank then expert id, go in consecutive
    blocks of o_l*N/M to the attention ranks in order.
    """
    m, n_exp = len(attention_ranks), len(expert_ranks)
    if num_experts % n_exp != 0:
        raise ValueError(f"placement: {num_experts} experts do not divide over {n_exp} expert ranks.")
    q = num_experts // n_exp
    owners: dict[int, dict[int, int]] = {}
    for layer, o in enumerate(offloads):
        if not 0 <= o <= q:
            raise ValueError(f"placement: layer {layer} moves {o} experts per expert rank; each holds {q}.")
        if o and (o * n_exp) % m != 0:
            raise ValueError(
                f"placement: layer {layer} moves {o * n_exp} experts, which do not split over {m} attention ranks."
            )
        layer_owner = {e: expert_ranks[e // q] for e in range(num_experts)}
        if o:
            moved = [i * q + k for i in range(n_exp) for k in range(q - o, q)]
            per_attention = o * n_exp // m
            for idx, expert in enumerate(moved):
                layer_owner[expert] = attention_ranks[idx // per_attention]
        owners[layer] = layer_owner
    return Placement(owners=owners)


def offloads_to_config(offloads: list[int]) -> dict[int, int] | str:
    """The hetermoe config's `asym_ea` value: {layer: experts moved per expert rank}, or "off"."""
    moved = {layer: o for layer, o in enumerate(offloads) if o > 0}
    return moved if moved else "off"
