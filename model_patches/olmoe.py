"""OLMoE: OlmoeSparseMoeBlock = router `gate` + fused `experts`; every decoder layer is MoE.

- Router (`OlmoeTopKRouter`): softmax in fp32, top-k, renormalised when `config.norm_topk_prob`, cast back to the
  logits' (input) dtype; it stays on attention ranks.
- The config stores the expert count as `num_experts` (`num_local_experts` is an alias, which `OlmoeExperts`
  reads); `intermediate_size` is the expert width.
- In memory: `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I). On disk: per expert
  `mlp.experts.e.{gate,up,down}_proj.weight` (transformers maps olmoe to the "qwen2_moe" conversion).
"""

from __future__ import annotations

from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from .base import MoEFamily, register_family


class OlmoeFamily(MoEFamily):
    model_type = "olmoe"
    experts_class = OlmoeExperts
    expert_param_names = ("gate_up_proj", "down_proj")
    num_experts_attr = "num_experts"


OLMOE = register_family(OlmoeFamily())
