"""Mixtral: MixtralSparseMoeBlock = router `gate` (softmax in fp32, top-k, renormalise) + fused `experts`.

In memory (transformers 5.x): `model.layers.N.mlp.gate.weight` (E, H), `model.layers.N.mlp.experts.gate_up_proj`
(E, 2I, H) and `...down_proj` (E, H, I). On disk (stock Mixtral files): `model.layers.N.block_sparse_moe.gate.weight`
and per expert `...block_sparse_moe.experts.e.w1.weight` (gate, I x H), `w3` (up, I x H), `w2` (down, H x I).
transformers converts on `from_pretrained` and converts back on `save_pretrained`; the Trainer's resume path
(`load_state_dict(strict=False)` on the file's keys) does not, so the family converts with transformers' own
"mixtral" mapping (`MoEFamily.checkpoint_to_model_keys`).
"""

from __future__ import annotations

from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from .base import MoEFamily, register_family


class MixtralFamily(MoEFamily):
    model_type = "mixtral"
    experts_class = MixtralExperts
    expert_param_names = ("gate_up_proj", "down_proj")
    num_experts_attr = "num_local_experts"


MIXTRAL = register_family(MixtralFamily())
