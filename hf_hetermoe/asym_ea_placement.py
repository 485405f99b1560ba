"""The expert placement a config asks for: its `asym_ea` and `expert_split` (pure Python, no torch).

config.py builds it while validating (a placement that does not fit fails before any process group waits);
asym_ea.py (the run time: memory checks, `auto` profiling) re-exports `placement_for`. The conventions of
`asym_ea` are described in asym_ea.py. `expert_split` (with `asym_ea: off` only; config.py refuses both):
`even` splits each layer's experts into equal blocks over the expert ranks, `proportional` into blocks
proportional to each expert rank's expert speed (expert_speeds.py), a list into blocks proportional to those
weights (`ExpertPlacement.weighted`: largest remainder, contiguous blocks in expert order).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .config import HeterMoEConfig
    from .topology import Topology


def placement_for(config: HeterMoEConfig, *, layers: tuple[int, ...], num_experts: int, topology: Topology,
                  offloads: dict[int, int] | None = None, speeds: dict[int, float] | None = None,
                  device_names: list[str] | tuple[str, ...] | None = None, model_config=None) -> ExpertPlacement:
    """The placement the config asks for (`offloads` replaces `auto` once Algorithm 1 has run).

    `expert_split: proportional` takes the expert ranks' `speeds` when given, else computes them
    (expert_speeds.py) from the emulated devices or `device_names` (every rank's reported GPU) and the
    model's shape (`model_config`)."""
    if topology.mode == "colocated":
        if config.asym_ea != "off":
            raise ValueError("hetermoe config: `asym_ea` moves experts from expert ranks to attention ranks; it needs "
                             "`mode: disaggregated`. Set `asym_ea: off` in colocated mode.")
        return ExpertPlacement.even(layers=layers, num_experts=num_experts, host_ranks=topology.host_ranks)
    asym = offloads if offloads is not None else config.asym_ea
    if asym == "off":
        return _split(config, layers=layers, num_experts=num_experts, topology=topology, speeds=speeds,
                      device_names=device_names, model_config=model_config)
    if isinstance(asym, dict):
        return _from_offloads(asym, layers=layers, num_experts=num_experts, topology=topology)
    if isinstance(asym, str) and asym.endswith(".json"):
        return _from_file(asym, layers=layers, num_experts=num_experts, topology=topology)
    raise AssertionError(f"unresolved asym_ea {asym!r}")


def _split(config: HeterMoEConfig, *, layers, num_experts: int, topology: Topology, speeds, device_names,
           model_config) -> ExpertPlacement:
    split = getattr(config, "expert_split", "even")
    if split == "even":
        return ExpertPlacement.even(layers=layers, num_experts=num_experts, host_ranks=topology.expert_ranks)
    if split == "proportional":
        if speeds is None:
            from .expert_speeds import expert_speeds

            speeds = expert_speeds(ranks=topology.expert_ranks, emulation=config.emulation, device_names=device_names,
                                   model_config=model_config)
        missing = [r for r in topology.expert_ranks if r not in speeds]
        if missing:
            raise ValueError(f"hetermoe: `expert_split: proportional` has no speed for expert rank(s) {missing}.")
        weights = [speeds[r] for r in topology.expert_ranks]
    else:
        weights = list(split)
    try:
        return ExpertPlacement.weighted(layers=layers, num_experts=num_experts, host_ranks=topology.expert_ranks,
                                        weights=weights)
    except ValueError as exc:
        raise ValueError(f"hetermoe config: `expert_split`: {exc}") from None


def _from_offloads(counts: dict[int, int], *, layers, num_experts: int, topology: Topology) -> ExpertPlacement:
    from .planner.asym_ea import check_divisibility, placement_from_offloads

    unknown = sorted(set(counts) - set(layers))
    if unknown:
        raise ValueError(f"hetermoe config: `asym_ea` names layer(s) {unknown}, which have no routed experts "
                         f"(MoE layers: {list(layers)}).")
    if any(counts.values()):
        try:
            check_divisibility(num_attention=topology.num_attention, num_expert=len(topology.expert_ranks))
        except ValueError as exc:
            raise ValueError(f"hetermoe config: `asym_ea`: {exc}") from None
    try:
        planned = placement_from_offloads(
            num_experts=num_experts, attention_ranks=topology.attention_ranks, expert_ranks=topology.expert_ranks,
            offloads=[counts.get(layer, 0) for layer in layers],
        )
    except ValueError as exc:
        raise ValueError(f"hetermoe config: `asym_ea`: {exc} Choose counts whose moved experts split evenly "
                         "over the attention ranks.") from None
    rows = planned.owner_rows()
    return ExpertPlacement(num_experts=num_experts, owner={layer: rows[i] for i, layer in enumerate(layers)})


def _from_file(path: str, *, layers, num_experts: int, topology: Topology) -> ExpertPlacement:
    if not os.path.isfile(path):
        raise ValueError(f"hetermoe config: `asym_ea` names placement file {path!r}, which does not exist.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        owners = {int(layer): {int(e): int(r) for e, r in experts.items()} for layer, experts in data.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"hetermoe config: placement file {path} is not {{layer: {{expert: rank}}}} JSON ({exc}).") from None
    if sorted(owners) != sorted(layers):
        raise ValueError(f"hetermoe config: placement file {path} covers layers {sorted(owners)} but the model's MoE "
                         f"layers are {list(layers)}.")
    world = set(range(topology.world_size))
    rows = {}
    for layer, experts in owners.items():
        if sorted(experts) != list(range(num_experts)):
            raise ValueError(f"hetermoe config: placement file {path}, layer {layer}: every expert 0..{num_experts - 1} "
                             "needs exactly one owner.")
        bad = sorted({r for r in experts.values() if r not in world})
        if bad:
            raise ValueError(f"hetermoe config: placement file {path}, layer {layer}: rank(s) {bad} do not exist in a "
                             f"world of {topology.world_size}.")
        rows[layer] = tuple(experts[e] for e in range(num_experts))
    return ExpertPlacement(num_experts=num_experts, owner=rows)
