"""hf-hetermoe: HeterMoE (attention on new GPUs, experts on old ones) for Hugging Face Transformers/Accelerate."""

__version__ = "0.1.0"

from .config import HeterMoEConfig, Topology, ZebraConfig  # noqa: E402
from .integrations.trainer import HeterMoECallback  # noqa: E402
from .patching import apply_hetermoe, gather_expert_weights, get_engine, revert_hetermoe  # noqa: E402

__all__ = [
    "HeterMoEConfig",
    "HeterMoECallback",
    "Topology",
    "ZebraConfig",
    "apply_hetermoe",
    "gather_expert_weights",
    "get_engine",
    "revert_hetermoe",
    "__version__",
]
