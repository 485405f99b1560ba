"""ModelShape: the few numbers of an MoE transformer that the planner's cost model needs.

A shape is built from a preset name (see `presets.py`), from a Hugging Face `config.json` (a file or a
directory holding one) or from a config object/dict. Only the decoder geometry matters here; weights never
exist in the planner.

Legend: h = hidden size, f = expert FFN (intermediate) size, n = routed experts per layer, k = top-k,
V = vocabulary size, L = number of MoE decoder layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

# Bytes per parameter under fp16 mixed-precision Adam without ZeRO (DeepSpeed-MoE's default, which the paper's
# baselines use): fp16 weight 2 + fp16 grad 2 + fp32 master weight 4 + Adam m 4 + Adam v 4.
BYTES_PER_PARAM_TRAINED = 16

_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def dtype_bytes(dtype: str) -> int:
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"planner: dtype {dtype!r} is not known. Use one of {sorted(_DTYPE_BYTES)}.")
    return _DTYPE_BYTES[dtype]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Geometry of a Mixtral-style MoE decoder (every layer is MoE, top-k routing, SwiGLU experts)."""

    name: str
    num_layers: int  # L
    hidden_size: int  # h
    intermediate_size: int  # f, of one routed expert
    num_experts: int  # n, per layer
    top_k: int  # k
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # V
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_experts", "top_k", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"planner: model `{name}` must be a positive integer, got {value!r}.")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"planner: model `top_k` ({self.top_k}) exceeds `num_experts` ({self.num_experts}). "
                "Route to at most as many experts as exist."
            )
        dtype_bytes(self.dtype)

    # ---- parameter counts (used by the memory model and printed by the CLI) ----------------------------
    @property
    def attention_params_per_layer(self) -> int:
        q_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        router = self.hidden_size * self.num_experts
        norms = 2 * self.hidden_size
        return q_o + k_v + router + norms

    @property
    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def replicated_params(self) -> int:
        """Everything except routed experts: embeddings, LM head, attention, norms, routers."""
        return 2 * self.vocab_size * self.hidden_size + self.num_layers * self.attention_params_per_layer + self.hidden_size

    @property
    def total_params(self) -> int:
        return self.replicated_params + self.num_layers * self.num_experts * self.expert_params

    @property
    def bytes_per_element(self) -> int:
        return dtype_bytes(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelShape":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"planner: model shape has unknown key(s) {unknown}. Known keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, config: Any, *, name: str | None = None, dtype: str = "fp16") -> "ModelShape":
        """Read a Hugging Face MoE config (object or dict): Mixtral, Qwen2/3-MoE and OLMoE key spellings."""
        get = (lambda key: config.get(key)) if isinstance(config, dict) else (lambda key: getattr(config, key, None))

        def first(*keys: str) -> Any:
            for key in keys:
                value = get(key)
                if value is not None:
                    return value
            return None

        num_experts = first("num_local_experts", "num_experts", "n_routed_experts")
        if num_experts is None:
            raise ValueError(
                "planner: the model config has no routed experts (none of num_local_experts, num_experts, "
                "n_routed_experts). Pass a Mixture-of-Experts config, e.g. a Mixtral config.json."
            )
        hidden = first("hidden_size")
        heads = first("num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("planner: the model config lacks `hidden_size` or `num_attention_heads`. Pass a decoder config.")
        head_dim = first("head_dim") or hidden // heads
        return cls(
            name=name or str(first("_name_or_path", "model_type") or "model"),
            num_layers=int(first("num_hidden_layers")),
            hidden_size=int(hidden),
            # Qwen-style MoE configs keep the dense FFN size in intermediate_size and the expert size apart.
            intermediate_size=int(first("moe_intermediate_size", "intermediate_size")),
            num_experts=int(num_experts),
            top_k=int(first("num_experts_per_tok", "top_k") or 2),
            num_heads=int(heads),
            num_kv_heads=int(first("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(first("vocab_size")),
            dtype=dtype,
        )

    @classmethod
    def from_config_path(cls, path: str | os.PathLike, *, dtype: str = "fp16") -> "ModelShape":
        """A `config.json` file, or a directory that holds one (a local HF model folder)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"planner: no model config at {path!r}. Pass a preset name or a config.json path.")
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"planner: {file} is not valid JSON ({exc}). Pass a Hugging Face config.json.") from None
        if not isinstance(data, dict):
            raise ValueError(f"planner: {file} does not hold a JSON object. Pass a Hugging Face config.json.")
        folder = os.path.basename(os.path.dirname(os.path.abspath(file)))  # a model folder names the model
        return cls.from_hf_config(data, name=data.get("_name_or_path") or folder or "model", dtype=dtype)
