"""Memory model behind Algorithm 1's bounds: n_min (experts that must leave each expert GPU) and n_max (the
most each expert GPU can give up before the attention GPUs are full). Totals over all layers, per expert GPU.

Rough by design (it only has to tell "fits" from "does not fit"):
* states: fp16 mixed-precision Adam, `BYTES_PER_PARAM_TRAINED` = 16 bytes per parameter;
* an expert also keeps, from forward to backward, its input rows of every micro-batch (with checkpointing;
  without it, also its SwiGLU intermediates);
* an attention GPU keeps each layer's input (checkpointing; else ~34 h bytes-per-element per token per layer,
  Korthikanti et al.'s count without the s^2 term that FlashAttention-class kernels remove), one layer's
  working set during recomputation, and fp32 logits plus their gradient for one micro-batch;
* usable memory is 90% of the device minus 1.5 GB for the CUDA context, NCCL buffers and fragmentation.

Measured profiles may carry the activation bytes one attention half keeps per token
(`activation_bytes_per_token_attention`) and one expert per routed copy (`activation_bytes_per_copy_expert`),
both without checkpointing; they replace the estimates (34 h b and (h + 3 f) b) when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .asym_ea import chunk_sizes
from .model_shape import BYTES_PER_PARAM_TRAINED
from .workload import Setup

USABLE_FRACTION = 0.9
RESERVED_BYTES = 1.5e9
_ACT_NO_CKPT = 34  # activation bytes per token per layer / (h * bytes per element), without checkpointing


@dataclass(frozen=True, kw_only=True)
class MemoryBounds:
    n_min: int
    n_max: int
    attention_fits: bool  # False: the replicated weights and activations alone overflow an attention GPU
    attention_free_bytes: float
    expert_capacity_experts: int  # experts (over all layers) one expert GPU can hold


def _usable(device) -> float:
    return device.memory_bytes * USABLE_FRACTION - RESERVED_BYTES


def _expert_bytes(setup: Setup, device) -> float:
    """Memory one expert (one layer's) takes on `device` while training: states plus its kept activations."""
    shape, b, h = setup.shape, setup.shape.bytes_per_element, setup.shape.hidden_size
    copies_per_expert = shape.top_k * setup.tokens / shape.num_experts  # routed copies one expert sees per iteration
    full = getattr(device, "activation_bytes_per_copy_expert", None) or (h + 3 * shape.intermediate_size) * b
    per_copy = h * b if setup.checkpointing else full  # checkpointing keeps only the input rows
    return shape.expert_params * BYTES_PER_PARAM_TRAINED + copies_per_expert * per_copy


def expert_capacity(setup: Setup, device) -> int:
    """Experts (over all layers) one expert GPU of `device` can hold."""
    return max(0, math.floor(_usable(device) / _expert_bytes(setup, device)))


def expert_caps_per_layer(setup: Setup) -> tuple[int, ...]:
    """Per expert rank, the most experts of one layer it can hold when every layer is split alike."""
    layers = setup.shape.num_layers
    return tuple(expert_capacity(setup, d) // layers for d in setup.cluster.expert_devices)


def memory_bounds(setup: Setup, r: int) -> MemoryBounds:
    """Algorithm 1's bounds. In a pool of several kinds the tightest device stands for the pool: the attention
    GPU with the least memory (each takes the same experts), the expert GPU that fits the fewest experts."""
    c, shape, S = setup.cluster, setup.shape, setup.seq_len
    b, h = shape.bytes_per_element, shape.hidden_size
    m, n_exp, n, L = c.num_attention, c.num_expert, shape.num_experts, shape.num_layers
    tokens_att = setup.seqs_per_attention_gpu * S  # per attention GPU per iteration
    tokens_mb = max(setup.microbatch_seqs(r)) * S

    def expert_bytes(device) -> float:
        return _expert_bytes(setup, device)

    dev_a = min(c.attention_devices, key=lambda d: d.memory_bytes)
    dev_e = min(c.expert_devices, key=lambda d: expert_capacity(setup, d))
    layer_full = getattr(dev_a, "activation_bytes_per_token_attention", None) or _ACT_NO_CKPT * h * b
    if setup.checkpointing:  # each layer's input, plus one layer's full activations while it is recomputed
        activations = L * tokens_att * h * b + tokens_mb * layer_full
    else:
        activations = L * tokens_att * layer_full
    attention_base = (
        shape.replicated_params * BYTES_PER_PARAM_TRAINED + activations
        + tokens_mb * shape.vocab_size * 4 * 2  # fp32 logits and their gradient
    )
    free_a = _usable(dev_a) - attention_base
    n1, n2 = chunk_sizes(num_attention=m, num_expert=n_exp) if (m % n_exp == 0 or n_exp % m == 0) else (1, 0)
    per_gpu_total = L * n // n_exp
    n_max = min(per_gpu_total, math.floor(max(free_a, 0.0) / (n1 * expert_bytes(dev_a))) * n2) if n2 else 0
    fit = expert_capacity(setup, dev_e)
    return MemoryBounds(n_min=max(0, per_gpu_total - fit), n_max=n_max, attention_fits=free_a >= 0,
                        attention_free_bytes=free_a,
                        expert_capacity_experts=fit)
