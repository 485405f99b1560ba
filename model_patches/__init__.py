"""Model families HeterMoE can split, registered by `config.model_type` (one module per family)."""

from .base import ExpertsSlot, MoEFamily, get_family, register_family, supported_model_types
from . import deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (registers)

__all__ = ["ExpertsSlot", "MoEFamily", "get_family", "register_family", "supported_model_types"]
