"""The gradient norm computed the way stock computes it, in pieces that ranks combine.

`torch.nn.utils.clip_grad_norm_` (what the Trainer calls through Accelerate) groups the gradients by device and
dtype, takes `torch._foreach_norm` of each group in the gradients' own dtype, and reduces the per-tensor norms with
one `vector_norm`, all on the device, without a host synchronisation. HeterMoE's norm spans attention gradients
(replicated on the attention ranks) and expert gradients (each held once, anywhere), so each rank computes the
norm of its part exactly that way (`local_norm`), the parts of one rank travel to the host together in ONE copy
(`to_host`), and the squares of the parts are summed over ranks with one all-reduce of a single number on the
control group (`combine_squares`). Squaring happens on the host in Python floats (float64): a norm near the fp32 limit would
overflow if squared in fp32, and one scalar costs nothing.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from .transport import wait


def local_norm(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of `grads` viewed as one vector, as a 0-dim fp32 tensor on `device` (no host synchronisation).

    Stock's `torch.nn.utils.get_total_norm`: foreach norms per (device, dtype) group, in the gradients' dtype,
    then the norm of the per-tensor norms."""
    grads = [g.detach() for g in grads]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms: list[torch.Tensor] = []
    for (group_device, _), ([tensors], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _has_foreach_support(tensors, group_device):
            norms.extend(torch._foreach_norm(tensors, 2.0))
        else:
            norms.extend(torch.linalg.vector_norm(g, 2.0) for g in tensors)
    stacked = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    return torch.linalg.vector_norm(stacked, 2.0)


def to_host(values: list[torch.Tensor]) -> list[float]:
    """0-dim tensors of one rank (norms, counters) as Python floats, with one device-to-host copy for all."""
    if not values:
        return []
    device = values[0].device
    stacked = torch.stack([v.to(device=device, dtype=torch.float32) for v in values])
    return stacked.to("cpu").tolist()  # fp32 values are exact as Python floats (doubles): no float64 tensor


def combine_squares(local_sq: float, group: Any, rank: int) -> float:
    """Sum of every rank's squared partial norm: one all-reduce of one float64 on the (gloo) control group.
    A group of one process (colocated, one rank) needs no collective."""
    if group is None or group.size() == 1:
        return local_sq
    total = torch.tensor([local_sq], dtype=torch.float64)
    wait(group.allreduce([total]), "the gradient-norm all-reduce", rank)
    return float(total[0])


# numpy types for the dtypes whose arithmetic numpy does exactly as torch does (IEEE float32/float16).
_NUMPY_FLOAT = {torch.float32: np.float32, torch.float16: np.float16}


def clip_coefficient(max_norm: float, norm: float, dtype: torch.dtype) -> float:
    """min(max_norm / (norm + 1e-6), 1) computed as torch.nn.utils.clip_grads_with_norm_ computes it: in the
    norm's dtype (float32 for float32 gradients), not in Python's float64. A last-bit difference in the coefficient
    is what bf16 autocast carries into the weights. On the host, so it costs no device synchronisation; bfloat16,
    which numpy lacks, is computed in float64."""
    as_dtype = _NUMPY_FLOAT.get(dtype, np.float64)
    coef = as_dtype(max_norm) / (as_dtype(norm) + as_dtype(1e-6))
    return float(min(coef, as_dtype(1.0)))
