"""GPT-OSS: GptOssMLP = `router` (with bias) + fused `experts` (with biases); every decoder layer is MoE.

- Router (`GptOssTopKRouter`): linear with bias, top-k on the logits, softmax over the k chosen; it stays on
  attention ranks. The block returns `(hidden, router_scores)`; its forward is unchanged.
- Experts (`GptOssExperts`) are stored transposed (x @ W) with gate/up interleaved along the last axis
  (gate = [..., ::2], up = [..., 1::2]) and a clamped SwiGLU (`swiglu_limit`, `swiglu_alpha`). Every fused
  tensor has the expert axis first, so slicing by expert is the same as for the other families:
  `gate_up_proj` (E, H, 2I), `gate_up_proj_bias` (E, 2I), `down_proj` (E, I, H), `down_proj_bias` (E, H).
- transformers has no conversion mapping for gpt_oss: on-disk names are the in-memory names.
"""

from __future__ import annotations

from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from .base import MoEFamily, register_family


class GptOssFamily(MoEFamily):
    model_type = "gpt_oss"
    experts_class = GptOssExperts
    expert_param_names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    num_experts_attr = "num_local_experts"


GPT_OSS = register_family(GptOssFamily())
