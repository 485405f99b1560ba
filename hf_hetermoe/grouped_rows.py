"""The experts of one layer on the rows a holder received, with the experts module's own grouped matmuls.

A holder's rows arrive already grouped: by source rank, then by local expert (transport.py). Called as a stock
module (top-1, weight 1), transformers' `grouped_mm_experts_forward` would sort them again, gather them, multiply
by the weights (all 1), scatter them back and sum over k = 1: five passes over the rows, and their backward, that
change no value. Here the module's own grouped matmuls (`_grouped_linear` in transformers/integrations/moe.py,
the same kernels, weights, gate and bias) run on the rows in place; rows from several sources are put in expert
order with one permutation that the exchange plan computed once for the forward and its backward
(`ExchangePlan.recv_grouping`).

Other experts implementations (eager loops, kernels from the Hub), modules without transformers' experts
interface, or a transformers without `_grouped_linear` take the stock call, which is always correct.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # private in transformers: the fallback below keeps working without it
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_linear = None

from .precision import GROUPED_MM


def uses_grouped_mm(module: nn.Module) -> bool:
    """True when `module` computes with transformers' grouped_mm experts forward, whose steps this mirrors."""
    config = getattr(module, "config", None)
    return (
        _grouped_linear is not None
        and getattr(config, "_experts_implementation", None) == GROUPED_MM
        and getattr(module, "has_gate", None) is not None
        and not getattr(module, "_is_expert_parallel", False)
    )


def expert_order(local_expert_R: torch.Tensor, sources_with_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(permutation into expert order, its inverse) for rows grouped by source then expert; None when they are
    already in expert order (at most one source sent rows)."""
    if sources_with_rows <= 1:
        return None
    perm_R = torch.argsort(local_expert_R, stable=True)
    inverse_R = torch.empty_like(perm_R)
    inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
    return perm_R, inverse_R


def run_experts(module: nn.Module, x_RH: torch.Tensor, local_expert_R: torch.Tensor,
                grouping: tuple[torch.Tensor, torch.Tensor] | None, num_local: int,
                autocast: bool = False) -> torch.Tensor:
    """y_RH = the experts of `module` on rows `x_RH` (row r through local expert `local_expert_R[r]`), rows in
    the order received. `grouping`: `expert_order`'s result for these rows.

    Under autocast the stock call is taken: a bf16-autocast fine-tuning run (TRL's SFTTrainer) measured 1.8e-4
    from stock on the weights through this path and 3e-6 through the stock call, while the paths are bitwise
    equal on the same rows outside training; until that is explained, autocast keeps the stock call."""
    if autocast or not uses_grouped_mm(module):
        index_R1 = local_expert_R.unsqueeze(1)
        return module(x_RH, index_R1, torch.ones(index_R1.shape, dtype=torch.float32, device=x_RH.device))
    expert_R = local_expert_R
    x_grouped = x_RH
    if grouping is not None:
        perm_R, _ = grouping
        expert_R = local_expert_R[perm_R]
        x_grouped = x_RH[perm_R]
    # The offsets as the stock forward makes them (histc on CPU/MPS floats, ints elsewhere): no host sync.
    histc_input = expert_R.float() if x_RH.device.type in ("cpu", "mps") else expert_R.int()
    rows_per_expert = torch.histc(histc_input, bins=num_local, min=0, max=num_local - 1)
    offsets = torch.cumsum(rows_per_expert, dim=0, dtype=torch.int32)
    if module.has_gate:
        weight = module.gate_up_proj
        bias = module.gate_up_proj_bias[expert_R] if module.has_bias else None
    else:
        weight = module.up_proj
        bias = module.up_proj_bias[expert_R] if module.has_bias else None
    h = _grouped_linear(x_grouped, weight, offsets, bias=bias, is_transposed=module.is_transposed)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    bias = module.down_proj_bias[expert_R] if module.has_bias else None
    y = _grouped_linear(h, module.down_proj, offsets, bias=bias, is_transposed=module.is_transposed)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    if grouping is not None:
        y = y[grouping[1]]
    return y.to(x_RH.dtype)
