"""Mixtral: MixtralSparseMoeBlock = router `gate` (softmax in fp32, top-k, renormalise) + fused `experts`.

In memory (transformers 5.x): `model.layers.N.mlp.gate.weight` (E, H), `model.layers.N.mlp.experts.gate_up_proj`
(E, 2I, H) and `...down_proj` (E, H, I). On disk (stock Mixtral files): `model.layers.N.block_sparse_moe.gate.weight`
and per expert `...block_sparse_moe.experts.e.w1.weight` (gate, I x H), `w3` (up, I x H), `w2` (down, H x I).
transformers converts on `from_pretrained` and converts back on `save_pretrained`; the Trainer's resume path
(`load_state_dict(strict=False)` on the file's keys) does not, so `checkpoint_to_model_keys` does it here.
"""

from __future__ import annotations

import re

import torch
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from .base import MoEFamily, register_family

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")


class MixtralFamily(MoEFamily):
    model_type = "mixtral"
    experts_class = MixtralExperts
    expert_param_names = ("gate_up_proj", "down_proj")
    num_experts_attr = "num_local_experts"

    def checkpoint_to_model_keys(self, state_dict: dict) -> dict:
        per_layer: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        out = {}
        for key, value in state_dict.items():
            match = _EXPERT_KEY.match(key)
            if match:
                per_layer.setdefault(match["prefix"], {}).setdefault(int(match["e"]), {})[match["w"]] = value
            else:
                out[key.replace(".block_sparse_moe.", ".mlp.")] = value
        for prefix, experts in per_layer.items():
            num = len(experts)
            if sorted(experts) != list(range(num)) or any(set(w) != {"w1", "w2", "w3"} for w in experts.values()):
                raise ValueError(f"hetermoe: checkpoint holds an incomplete set of experts under {prefix}.")
            gate_up = [torch.cat([experts[e]["w1"], experts[e]["w3"]], dim=0) for e in range(num)]
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
            out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([experts[e]["w2"] for e in range(num)])
        return out


MIXTRAL = register_family(MixtralFamily())
