"""The paper's evaluation models W1, W2, D1, D2, D3 (HeterMoE paper, "Evaluation") and model lookup by name or path.

The paper gives layers, hidden size and experts; the rest follows Mixtral-8x7B's proportions (Mixtral
architecture, top-2): expert FFN size 3.5 h (14336 / 4096), head_dim 128, grouped-query attention with 4 query
heads per KV head (32 / 8), vocabulary 32000, fp16. With these the parameter counts come out at the paper's
sizes within ~6% (W1 2.29B vs 2.2B, W2 4.40B vs 4.3B, D1 2.22B vs 2.1B, D2 1.27B vs 1.2B, D3 3.64B vs 3.5B).
"""

from __future__ import annotations

import os

from .model_shape import ModelShape

_PRESET_GEOMETRY = {  # name: (layers, hidden, experts)
    "W1": (4, 2048, 12),
    "W2": (4, 2048, 24),
    "D1": (8, 1024, 24),
    "D2": (6, 1024, 18),
    "D3": (8, 1024, 40),
}


def _mixtral_like(name: str, layers: int, hidden: int, experts: int) -> ModelShape:
    heads = hidden // 128
    return ModelShape(
        name=name, num_layers=layers, hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_experts=experts,
        top_k=2, num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=128, vocab_size=32000, dtype="fp16",
    )


MODEL_PRESETS: dict[str, ModelShape] = {name: _mixtral_like(name, *geo) for name, geo in _PRESET_GEOMETRY.items()}


def resolve_model(name_or_path: str, *, dtype: str = "fp16") -> ModelShape:
    """A preset name (W1, W2, D1, D2, D3) or the path of a HF config.json (or of a folder holding one)."""
    preset = MODEL_PRESETS.get(name_or_path.strip().upper())
    if preset is not None:
        if dtype != preset.dtype:
            return ModelShape.from_dict({**preset.to_dict(), "dtype": dtype})
        return preset
    if os.path.exists(name_or_path):
        return ModelShape.from_config_path(name_or_path, dtype=dtype)
    raise ValueError(
        f"planner: unknown model {name_or_path!r}. Use a preset ({', '.join(MODEL_PRESETS)}) or the path of a "
        "Hugging Face config.json."
    )
