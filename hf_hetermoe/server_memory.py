"""The most memory an expert server needs, from the configs alone, under the worst routing.

Worst routing: every token of every attention rank picks this server's experts. A token sends at most one row
per expert and `top_k` rows in all, so one server receives at most `M * T * min(top_k, n)` rows per MoE layer
and micro-batch (M attention ranks, T tokens per micro-batch per attention rank, n experts of the layer held
here); one expert receives at most `M * T` (every token). Nothing else depends on the routing.

    static      = P b (weights) + P b (gradients) + s P b (optimizer state, s slots: 2 for Adam)
                  + s P b (the largest transfer in flight: optimizer state on resume)
    activations = L * R * a          kept from forward to backward, every held layer
    transient   = R * t              one layer's backward working set (plus one layer's activations when
                                     recomputing)
    runtime     = a fixed allowance for the allocator, gloo buffers and Python objects

with P = expert parameters held (n experts x L layers), b = bytes per element, R = M * T * min(top_k, n),
H = hidden size, I = an expert's intermediate size (from its parameter count: 3 H I for a SwiGLU expert),
a = (3 H + 4 I) b + 32 bytes per row (the received row and the output row, the gathered input, the SwiGLU
gate/up projection, its activation and product, and int64 routing indices; H b + 16 with
`zebra.expert_recompute`), t = (3 H + 6 I) b + 8 (n + 1) bytes per row (output and input gradients, the
projections' gradients, the stock experts' one-hot routing mask).

docs/reliability.md compares it with the measured peak of a server under forced worst-case routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

RUNTIME_ALLOWANCE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ServerMemoryBound:
    weights: int
    gradients: int
    optimizer: int
    transfer: int
    activations: int
    transient: int
    runtime: int
    rows_per_layer: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.transfer + self.activations + self.transient
                + self.runtime)

    def describe(self) -> str:
        mib = 2**20
        parts = ", ".join(f"{name} {getattr(self, name) / mib:.1f}" for name in
                          ("weights", "gradients", "optimizer", "transfer", "activations", "transient", "runtime"))
        return f"{self.total / mib:.1f} MiB ({parts}; {self.rows_per_layer} rows per layer)"


def params_per_expert(family: Any, model_config: Any) -> int:
    """Parameters of one routed expert, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        module = family.make_local_experts(model_config, 1)
    return sum(p.numel() for p in module.parameters())


def expert_server_memory_bound(
    *, family: Any, model_config: Any, num_local_experts: int, num_layers: int, tokens_per_microbatch: int,
    num_attention: int, bytes_per_element: int = 4, optimizer_slots: int = 2, recompute: bool = False,
) -> ServerMemoryBound:
    """The bound above for a server holding `num_local_experts` experts in each of `num_layers` MoE layers."""
    b, n = bytes_per_element, num_local_experts
    hidden = int(model_config.hidden_size)
    per_expert = params_per_expert(family, model_config)
    intermediate = math.ceil(per_expert / (3 * hidden))
    params = per_expert * n * num_layers
    top_k = int(getattr(model_config, "num_experts_per_tok"))
    rows = num_attention * tokens_per_microbatch * min(top_k, n)
    keep_full = (3 * hidden + 4 * intermediate) * b + 32
    keep = hidden * b + 16 if recompute else keep_full
    transient = rows * ((3 * hidden + 6 * intermediate) * b + 8 * (n + 1)) + (rows * keep_full if recompute else 0)
    return ServerMemoryBound(
        weights=params * b, gradients=params * b, optimizer=optimizer_slots * params * b,
        transfer=optimizer_slots * params * b, activations=num_layers * rows * keep, transient=transient,
        runtime=RUNTIME_ALLOWANCE_BYTES, rows_per_layer=rows,
    )
