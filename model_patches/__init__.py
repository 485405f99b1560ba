"""Model families HeterMoE can split, registered by `config.model_type` (one module per family)."""

from .base import ExpertsSlot, MoEFamily, get_family, register_family, supported_model_types
from . import mixtral  # noqa: F401  (registers the family)

__all__ = ["ExpertsSlot", "MoEFamily", "get_family", "register_family", "supported_model_types"]
