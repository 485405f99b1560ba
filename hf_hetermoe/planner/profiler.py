"""The profiler (HeterMoE paper, "Profiler"): time one attention half + router, one expert FFN and the LM head on
each device present, measure the activation memory they keep, and write a profile file (`profile_file.py`).

Only what is needed is built, from the model config with random weights: one decoder layer's attention half
(input RMSNorm, self-attention with rotary embeddings through HF's SDPA path, residual, post-attention
RMSNorm, router), one SwiGLU expert and the final norm + LM head + loss. They are Mixtral modules built from
the config's geometry (`ModelShape`); family-specific extras (qk-norm, biases, sliding windows) are ignored,
since they barely move the time. All-to-alls are not run (the planner models the network separately).

T_A^Attn = attention half on `micro_batch` sequences, T_E = one expert on the copies it receives from one
attention GPU's micro-batch, both measured on every device (the attention device's expert time is T_E^Attn,
the expert device's is T_E^Exp). Each module is measured at two sizes (x1, x2) so the planner can scale.

Memory: on CUDA the peak allocated bytes during forward+backward; everywhere, the bytes of the tensors
autograd saves for backward (excluding parameters), which is the activation memory without checkpointing.

Legend: B sequences, S sequence length, H hidden size, T = B*S tokens, F expert FFN size, V vocabulary.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .model_shape import ModelShape
from .profiles import canonical_device_name

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _mixtral_config(shape: ModelShape, seq_len: int):
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=1, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
        max_position_embeddings=max(seq_len, 4096),
    )
    config._attn_implementation = "sdpa"
    return config


class AttentionHalf(nn.Module):
    """Input norm -> self-attention -> residual -> post-attention norm -> router (one decoder layer's top half)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.mixtral import modeling_mixtral as mm

        self.input_layernorm = mm.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = mm.MixtralAttention(config, layer_idx=0)
        self.post_attention_layernorm = mm.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gate = mm.MixtralTopKRouter(config)
        self.rotary_emb = mm.MixtralRotaryEmbedding(config)

    def forward(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x_BSH.shape
        position_ids = torch.arange(s, device=x_BSH.device).unsqueeze(0).expand(b, s)
        h_BSH = self.input_layernorm(x_BSH)
        attn_BSH, _ = self.self_attn(h_BSH, self.rotary_emb(h_BSH, position_ids), attention_mask=None)
        resid_BSH = x_BSH + attn_BSH
        moe_in_BSH = self.post_attention_layernorm(resid_BSH)
        _, weights_Tk, _ = self.gate(moe_in_BSH)
        return resid_BSH, moe_in_BSH, weights_Tk


class Expert(nn.Module):
    """One routed SwiGLU expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate_TF, up_TF = self.gate_up(x_TH).chunk(2, dim=-1)
        return (self.down(nn.functional.silu(gate_TF) * up_TF),)


class Head(nn.Module):
    """Final norm, LM head and the loss as HF computes it (fp32 logits)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.mixtral import modeling_mixtral as mm

        self.norm = mm.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, x_TH: torch.Tensor, labels_T: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits_TV = self.lm_head(self.norm(x_TH)).float()
        return (nn.functional.cross_entropy(logits_TV, labels_T),)


def _init_random(module: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:  # matrices random, norm weights stay at one
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(module: nn.Module, make_inputs: Callable[[], tuple], device: torch.device, repeats: int,
             warmup: int) -> dict[str, float]:
    """Median forward and backward seconds, saved-activation bytes and (CUDA) peak extra bytes."""
    params = {p.data_ptr() for p in module.parameters()}
    fwd, bwd, saved_bytes, peak = [], [], 0, 0
    for i in range(warmup + repeats):
        inputs = make_inputs()
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in params:
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = module(*inputs)
        _sync(device)
        t1 = time.perf_counter()
        grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outputs if o.requires_grad]
        torch.autograd.backward([o for o in outputs if o.requires_grad], grads)
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            saved_bytes = max(saved_bytes, sum(seen.values()))
            if device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        module.zero_grad(set_to_none=True)
    return {"fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd), "saved_bytes": saved_bytes,
            "peak_bytes": peak}


def _device_facts(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"description": props.name, "kind": "cuda", "generation": [props.major, props.minor],
                "memory_bytes": int(props.total_memory), "name": canonical_device_name(props.name)}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"description": "CPU", "kind": "cpu", "generation": [0, 0], "memory_bytes": int(memory), "name": "cpu"}


def default_devices() -> list[torch.device]:
    """One device per distinct CUDA model present, or the CPU when there is no CUDA device."""
    if not torch.cuda.is_available():
        return [torch.device("cpu")]
    out, names = [], set()
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        if name not in names:
            names.add(name)
            out.append(torch.device("cuda", i))
    return out


def profile_device(shape: ModelShape, *, seq_len: int, micro_batch: int, device: torch.device,
                   repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Measure one device; returns its entry of the profile file."""
    dtype = _TORCH_DTYPES[shape.dtype]
    config = _mixtral_config(shape, seq_len)
    gen = torch.Generator().manual_seed(seed)
    attn = _init_random(AttentionHalf(config), gen).to(device=device, dtype=dtype)
    attn.rotary_emb.to(torch.float32)  # rotary frequencies stay fp32, as in HF models
    expert = _init_random(Expert(shape.hidden_size, shape.intermediate_size), gen).to(device=device, dtype=dtype)
    head = _init_random(Head(config), gen).to(device=device, dtype=dtype)
    h = shape.hidden_size
    # Routed copies one expert receives from one attention GPU's micro-batch (uniform routing).
    copies = max(1, round(micro_batch * seq_len * shape.top_k / shape.num_experts))
    entry: dict[str, Any] = _device_facts(device)
    sizes = {"attention": [micro_batch, 2 * micro_batch], "expert": [copies, 2 * copies],
             "head": [micro_batch * seq_len, 2 * micro_batch * seq_len]}

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, device=device, dtype=dtype, requires_grad=True)

    makers = {
        "attention": (attn, lambda n: (lambda: (randn(n, seq_len, h),))),
        "expert": (expert, lambda n: (lambda: (randn(n, h),))),
        "head": (head, lambda n: (lambda: (randn(n, h), torch.randint(0, shape.vocab_size, (n,), device=device)))),
    }
    memory: dict[str, Any] = {"method": "saved tensors" + (" + cuda peak" if device.type == "cuda" else "")}
    for module_name, (module, make) in makers.items():
        key = "num_seqs" if module_name == "attention" else "num_tokens"
        runs = [_measure(module, make(n), device, repeats, warmup) for n in sizes[module_name]]
        entry[module_name] = {key: sizes[module_name], "fwd_s": [r["fwd_s"] for r in runs],
                              "bwd_s": [r["bwd_s"] for r in runs]}
        if module_name == "attention":
            memory["activation_bytes_per_token_attention"] = runs[0]["saved_bytes"] / (micro_batch * seq_len)
            memory["peak_attention_bytes"] = runs[0]["peak_bytes"]
        elif module_name == "expert":
            memory["activation_bytes_per_copy_expert"] = runs[0]["saved_bytes"] / copies
            memory["peak_expert_bytes"] = runs[0]["peak_bytes"]
    entry["memory"] = memory
    entry["dtype"] = shape.dtype
    entry["micro_batch"] = micro_batch
    return entry
