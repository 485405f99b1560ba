"""What HeterMoE needs to know about one MoE family, and the registry keyed by `config.model_type`.

A family describes how its decoder layer splits (docs/architecture.md). HeterMoE keeps the stock MoE block and
its forward (router called through `__call__`, shared experts, residual) and swaps only the block's routed
`experts` submodule for a remote one with the same call signature. So a family says:
- which modules are the routed-experts submodules (and in which layer),
- which fused expert parameters they hold (expert axis first),
- how to build a stock experts module for a subset of experts (what an expert rank computes with),
- how a checkpoint's on-disk keys map to the in-memory names (the Trainer's resume path loads on-disk keys).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .conversion import checkpoint_to_model_keys


@dataclass(frozen=True)
class ExpertsSlot:
    """One routed-experts submodule of the model: `model.get_submodule(path)` is it, in MoE layer `layer`."""

    layer: int
    path: str  # e.g. "model.layers.3.mlp.experts"


class MoEFamily:
    """Base class; one subclass per `model_type`."""

    model_type: str = ""
    experts_class: type[nn.Module]
    expert_param_names: tuple[str, ...] = ()
    # Name of the config attribute holding the number of routed experts per layer.
    num_experts_attr: str = "num_local_experts"

    # ---- shapes ----------------------------------------------------------------------------------------
    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_attr))

    def moe_layers(self, config: Any) -> tuple[int, ...]:
        """Decoder-layer indices that have routed experts (all of them unless the family keeps some dense)."""
        return tuple(range(int(config.num_hidden_layers)))

    # ---- the model -------------------------------------------------------------------------------------
    def experts_slots(self, model: nn.Module) -> list[ExpertsSlot]:
        """Every routed-experts submodule, in layer order. The layer index is the decoder layer's index."""
        slots = []
        for name, module in model.named_modules():
            if isinstance(module, self.experts_class):
                match = re.search(r"layers\.(\d+)\.", name)
                if match is None:
                    raise ValueError(f"hetermoe: cannot tell which decoder layer {name!r} belongs to.")
                slots.append(ExpertsSlot(layer=int(match.group(1)), path=name))
        return sorted(slots, key=lambda s: s.layer)

    def make_local_experts(self, config: Any, num_local: int) -> nn.Module:
        """A stock experts module that holds `num_local` experts (an expert rank's share of one layer)."""
        local_config = copy.copy(config)
        setattr(local_config, self.num_experts_attr, num_local)
        return self.experts_class(local_config)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_to_model_keys(self, state_dict: dict) -> dict:
        """Map a checkpoint state dict with on-disk (stock file) keys to in-memory names, with the conversion
        transformers' `from_pretrained` applies for this model type (identity where it has none)."""
        return checkpoint_to_model_keys(self.model_type, state_dict)


_REGISTRY: dict[str, MoEFamily] = {}


def register_family(family: MoEFamily) -> MoEFamily:
    if family.model_type in _REGISTRY:
        raise ValueError(f"hetermoe: model type {family.model_type!r} is already registered.")
    _REGISTRY[family.model_type] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(model_type: str | None) -> MoEFamily:
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hetermoe: model type {model_type!r} is not supported. Supported model types: "
            f"{supported_model_types()}. Use one of these families, or add a module to model_patches/."
        )
    return _REGISTRY[model_type]
