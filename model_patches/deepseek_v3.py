"""DeepSeek-V3: DeepseekV3MoE = router `gate` + fused `experts` + `shared_experts`; the first layers are dense.

- Router (`DeepseekV3TopkRouter`, fp32 weight): sigmoid scores; the choice adds `e_score_correction_bias` (a
  buffer of the router) and is restricted to the best `topk_group` of `n_group` expert groups; the weights are the
  uncorrected scores of the chosen experts, renormalised when `norm_topk_prob`, times `routed_scaling_factor`.
  All of that happens inside the router, so the bias and the scaling stay on attention ranks and the experts
  receive the final weights (the stand-in applies them on combine, as the stock experts do).
- `shared_experts` is a child of the block, not of `experts`: it stays on attention ranks.
- Layers `0 .. first_k_dense_replace - 1` hold a dense `DeepseekV3MLP` and stay local.
- The config stores the expert count as `n_routed_experts` (`num_local_experts` is an alias).
- No router aux loss in transformers' DeepSeek-V3 (it balances with the correction bias instead).
- In memory: `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I), I = moe_intermediate_size.
  On disk: per expert `mlp.experts.e.{gate,up,down}_proj.weight` (the "qwen2_moe" conversion).
"""

from __future__ import annotations

from typing import Any

from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from .base import MoEFamily, register_family


class DeepseekV3Family(MoEFamily):
    model_type = "deepseek_v3"
    experts_class = DeepseekV3Experts
    expert_param_names = ("gate_up_proj", "down_proj")
    num_experts_attr = "n_routed_experts"

    def moe_layers(self, config: Any) -> tuple[int, ...]:
        # The decoder layer's rule: `layer_idx >= config.first_k_dense_replace` is MoE.
        first = int(config.first_k_dense_replace or 0)
        return tuple(range(first, int(config.num_hidden_layers)))


DEEPSEEK_V3 = register_family(DeepseekV3Family())
