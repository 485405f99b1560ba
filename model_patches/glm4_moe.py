"""GLM-4.5 / 4.6 (`glm4_moe`): the DeepSeek-V3 MoE block (sigmoid router with `e_score_correction_bias`, grouped
top-k, `routed_scaling_factor`, shared experts, first `first_k_dense_replace` layers dense) under GQA attention.

Everything DeepSeek-V3's description says holds here (model_patches/deepseek_v3.py): the router with its bias
and scaling and the shared experts stay on attention ranks; only `mlp.experts` is swapped. transformers records
the router logits but computes no aux loss for this family. On disk: the "qwen2_moe" per-expert conversion.
"""

from __future__ import annotations

from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeExperts

from .base import register_family
from .deepseek_v3 import DeepseekV3Family


class Glm4MoeFamily(DeepseekV3Family):
    model_type = "glm4_moe"
    experts_class = Glm4MoeExperts


GLM4_MOE = register_family(Glm4MoeFamily())
