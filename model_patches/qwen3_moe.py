"""Qwen3-MoE: Qwen3MoeSparseMoeBlock = router `gate` + fused `experts` (no shared expert).

- Router (`Qwen3MoeTopKRouter`): softmax in fp32, top-k, renormalised when `config.norm_topk_prob`, then cast
  back to the logits' (input) dtype; it stays on attention ranks, called through `__call__`.
- Dense layers follow the same rule as Qwen2-MoE (`mlp_only_layers`, `decoder_sparse_step`).
- The config stores the expert count as `num_local_experts` (`num_experts` is an alias).
- In memory: `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I). On disk: per expert
  `mlp.experts.e.{gate,up,down}_proj.weight` (transformers maps qwen3_moe to the "qwen2_moe" conversion).
"""

from __future__ import annotations

from typing import Any

from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from .base import MoEFamily, register_family
from .qwen2_moe import sparse_step_layers


class Qwen3MoeFamily(MoEFamily):
    model_type = "qwen3_moe"
    experts_class = Qwen3MoeExperts
    expert_param_names = ("gate_up_proj", "down_proj")
    num_experts_attr = "num_local_experts"

    def moe_layers(self, config: Any) -> tuple[int, ...]:
        return sparse_step_layers(config, self.num_experts(config))


QWEN3_MOE = register_family(Qwen3MoeFamily())
