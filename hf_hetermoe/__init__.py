"""hf-hetermoe: HeterMoE (attention on new GPUs, experts on old ones) for Hugging Face Transformers/Accelerate.

The public names load on first use (PEP 562), so `import hf_hetermoe.planner` or `hf_hetermoe.config` (pure
Python) does not import torch, transformers' Trainer or the runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .config import HeterMoEConfig, Topology, ZebraConfig
    from .integrations.accelerate_loop import prepare
    from .integrations.trainer import HeterMoECallback
    from .patching import apply_hetermoe, gather_expert_weights, get_engine, move_experts, revert_hetermoe

__all__ = [
    "HeterMoEConfig",
    "HeterMoECallback",
    "Topology",
    "ZebraConfig",
    "apply_hetermoe",
    "gather_expert_weights",
    "get_engine",
    "move_experts",
    "prepare",
    "revert_hetermoe",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("HeterMoEConfig", "Topology", "ZebraConfig"):
        from . import config as module
    elif name == "HeterMoECallback":
        from .integrations import trainer as module
    elif name == "prepare":
        from .integrations import accelerate_loop as module
    elif name in ("apply_hetermoe", "gather_expert_weights", "get_engine", "move_experts", "revert_hetermoe"):
        from . import patching as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
