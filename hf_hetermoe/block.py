"""HeterMoEExperts: the stand-in for a MoE block's routed `experts` on attention ranks.

The stock MoE block keeps running its own forward (router through `__call__`, so HF's router-logits recorder
and the aux loss work unchanged; jitter; shared experts where the family has them). Only its `experts`
submodule is swapped for this one, which has the stock call signature `(hidden_TH, top_k_index_TK,
top_k_weights_TK)` and sends each (token, k) pair to the rank that holds its expert.

Legend: T tokens, K top-k, P = T*K pairs, H hidden, E experts per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import zebra_run

if TYPE_CHECKING:
    from .engine import HeterMoEEngine


class ExpertExchange(torch.autograd.Function):
    """forward: dispatch rows to their experts' holders, run the experts there, combine the outputs (y_PH).
    backward: dispatch the output gradients dy_PH to the same holders, combine the input gradients dx_PH."""

    @staticmethod
    def forward(ctx, x_PH: torch.Tensor, engine: "HeterMoEEngine", layer: int, counts_E: torch.Tensor,
                context: tuple) -> torch.Tensor:
        y_PH, handle = engine.forward_exchange(layer, x_PH, counts_E, context)
        ctx.engine = engine
        ctx.handle = handle
        return y_PH

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_PH: torch.Tensor):
        dx_PH = ctx.engine.backward_exchange(ctx.handle, dy_PH.contiguous())
        return dx_PH, None, None, None, None


class HeterMoEExperts(nn.Module):
    """Routed experts of one MoE layer, held on other ranks (or partly here). Has no parameters of its own:
    its state-dict entries (`gate_up_proj`, `down_proj`, full `(E, ...)` tensors) are gathered from the holders."""

    def __init__(self, *, engine: "HeterMoEEngine", layer: int, num_experts: int, original: nn.Module):
        super().__init__()
        self.engine = engine
        self.layer = layer
        self.num_experts = num_experts
        # The stock module, emptied, kept outside the module tree so `revert_hetermoe` can put it back.
        self.__dict__["_original_experts"] = original

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, held remotely"

    def forward(self, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = top_k_index_TK.shape
        hidden = hidden_TH.shape[-1]
        expert_P = top_k_index_TK.reshape(-1)
        owner_P = self.engine.owner_E[self.layer][expert_P]
        # Rows go out grouped by (holder rank, expert), the order each holder's counts describe.
        perm_P = torch.argsort(owner_P * self.num_experts + expert_P, stable=True)
        # The one device-to-host copy of an exchange, on purpose: all-to-all splits are host integers.
        counts_E = torch.bincount(expert_P, minlength=self.num_experts).cpu()
        x_PH = hidden_TH[perm_P // top_k]
        if zebra_run.active_stripe() is not None:
            # Inside a zebra stripe: dispatch asynchronously and let the next stripe run (see zebra_run.py).
            y_PH = zebra_run.exchange_in_stripe(self.engine, self.layer, x_PH, counts_E)
        else:
            # Grad mode and autocast are read here: inside an autograd Function's forward grad mode is off.
            context = self.engine.forward_context(x_PH, num_tokens)
            y_PH = ExpertExchange.apply(x_PH, self.engine, self.layer, counts_E, context)
        inv_perm_P = torch.empty_like(perm_P)
        inv_perm_P[perm_P] = torch.arange(perm_P.numel(), device=perm_P.device)
        # Weights are applied on combine, as the stock experts forward does: (y * w) summed over k.
        weighted_PH = y_PH[inv_perm_P] * top_k_weights_TK.reshape(-1, 1)
        return weighted_PH.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_TH.dtype)
