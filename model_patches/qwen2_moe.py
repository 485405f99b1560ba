"""Qwen2-MoE: Qwen2MoeSparseMoeBlock = router `gate` + fused `experts` + a shared expert with a sigmoid gate.

- Router (`Qwen2MoeTopKRouter`): softmax in fp32, top-k, renormalised when `config.norm_topk_prob`, weights cast
  back to the logits' dtype. It runs on attention ranks unchanged (HF's router-logits recorder and the aux loss
  keep working).
- `shared_expert` and `shared_expert_gate` are children of the block, not of `experts`, so they stay on attention
  ranks: only `mlp.experts` is swapped.
- Dense layers: a layer is MoE unless it is in `config.mlp_only_layers` or `(layer + 1) % decoder_sparse_step != 0`
  (the decoder layer's own rule); dense layers hold a plain `Qwen2MoeMLP` and stay local.
- In memory: `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I), I = moe_intermediate_size.
  On disk: per expert `mlp.experts.e.{gate,up,down}_proj.weight` (transformers' "qwen2_moe" mapping).
"""

from __future__ import annotations

from typing import Any

from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from .base import MoEFamily, register_family


def sparse_step_layers(config: Any, num_experts: int) -> tuple[int, ...]:
    """MoE layers under the Qwen-MoE rule (shared by qwen2_moe and qwen3_moe decoder layers)."""
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return tuple(
        layer for layer in range(int(config.num_hidden_layers))
        if layer not in dense and num_experts > 0 and (layer + 1) % step == 0
    )


class Qwen2MoeFamily(MoEFamily):
    model_type = "qwen2_moe"
    experts_class = Qwen2MoeExperts
    expert_param_names = ("gate_up_proj", "down_proj")
    num_experts_attr = "num_experts"

    def moe_layers(self, config: Any) -> tuple[int, ...]:
        return sparse_step_layers(config, self.num_experts(config))


QWEN2_MOE = register_family(Qwen2MoeFamily())
