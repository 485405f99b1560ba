"""Finite checks on expert outputs and gradients, reported with layer, expert and rank (`check_finite: true`).

A NaN or inf that appears in one expert spreads to every weight within a step, and the loss alone says only
that something broke. The expert holder knows which expert produced it, so it reports:

    hetermoe: rank 2: NaN/inf in the output of expert 2 of layer 1 (37 rows in step 4)

Cheap by construction (benchmarks/check_finite_cost.py measures it):
- rows: per exchange one fp32 row sum (non-finite iff the row holds a NaN or inf) and an `index_add_` of the
  bad rows into per-expert counters that stay on the device (no host synchronisation in the data path);
- once per optimizer step the counters' total travels to the host in the same copy as the gradient norm
  (grad_norm.py), so a step with nothing wrong reads nothing more; only a non-zero total reads the counters;
- parameter gradients cost nothing more unless the gradient norm (computed anyway) is not finite;
  then each expert's slice of each fused gradient is checked to name the experts.

Detection does not change training: the Trainer's own handling (`logging_nan_inf_filter`, skipped steps under
a GradScaler) stays in charge. Reports of one (what, layer, expert) are thinned out to occurrences 1, 10, 100, ...
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)


class FiniteMonitor:
    def __init__(self, rank: int):
        self.rank = rank
        self._pending: dict[tuple[str, int], torch.Tensor] = {}  # (what, layer) -> bad rows per local expert
        self._occurrences: dict[tuple[str, int, int], int] = {}
        self.step = 0  # optimizer steps seen by this rank (end_step calls): the Trainer's global_step after it
        self.reports: list[str] = []  # every report made (tests and post-mortems read it)

    def rows(self, what: str, layer: int, values_RH: torch.Tensor, local_expert_R: torch.Tensor, num_local: int) -> None:
        """Count, per local expert, the rows of `values_RH` that hold a NaN or inf (no synchronisation)."""
        if values_RH.numel() == 0:
            return
        # A NaN or inf anywhere in a row makes its sum NaN or inf (inf - inf is NaN); summing in fp32 is one
        # pass with no (R, H) temporary, ~40x cheaper on CPU than isfinite(...).all(dim=1). Only finite rows
        # summing past 3.4e38 would be reported too, and those are as broken.
        bad_R = ~torch.isfinite(values_RH.sum(dim=1, dtype=torch.float32))
        counts = self._pending.get((what, layer))
        if counts is None:
            counts = self._pending[(what, layer)] = torch.zeros(num_local, dtype=torch.float32, device=values_RH.device)
        counts.index_add_(0, local_expert_R.to(values_RH.device), bad_R.to(torch.float32))

    def pending_bad_rows(self, device: torch.device) -> torch.Tensor:
        """The non-finite rows counted since the last step, all layers together: a 0-dim fp32 tensor on the
        device (no synchronisation), which travels to the host with the gradient norm."""
        if not self._pending:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([counts.sum() for counts in self._pending.values()]).sum()

    def end_step(self, grad_norm: float | None, shard: Any, *, bad_rows: float | None) -> None:
        """Once per optimizer step: report the rows counted since the last call, and name the experts whose
        gradients are not finite when the norm of the shard's gradients is not. `grad_norm` and `bad_rows` are
        the host values of this step's one copy (`pending_bad_rows`); when both are finite and no row was bad,
        nothing is read from the device. None: not known, read them here (a step without a norm)."""
        self.step += 1
        pending, self._pending = self._pending, {}
        if bad_rows is None or bad_rows != 0:
            for (what, layer), counts in pending.items():
                for index, count in enumerate(counts.tolist()):
                    if count:
                        self._report(what, layer, shard.local[layer][index], f"{int(count)} rows in step {self.step}")
        if grad_norm is None:
            from .grad_norm import local_norm

            grad_norm = float(local_norm((p.grad for p in shard.parameters() if p.grad is not None), shard.device))
        if math.isfinite(grad_norm):
            return
        for layer, name, param in shard.named_parameters():
            if param.grad is None:
                continue
            bad = ~torch.isfinite(param.grad.detach()).reshape(param.grad.shape[0], -1).all(dim=1)
            for index in bad.nonzero().flatten().tolist():
                self._report(f"the gradient of {name}", layer, shard.local[layer][index], f"in step {self.step}")

    def _report(self, what: str, layer: int, expert: int, detail: str) -> None:
        key = (what, layer, expert)
        n = self._occurrences[key] = self._occurrences.get(key, 0) + 1
        if str(n).rstrip("0") != "1":  # thin out repeats: occurrences 1, 10, 100, ...
            return
        repeat = f", occurrence {n}" if n > 1 else ""
        message = (f"hetermoe: rank {self.rank}: NaN/inf in {what} of expert {expert} of layer {layer} "
                   f"({detail}{repeat}). Check the learning rate and the data; `check_finite: false` turns this "
                   "check off.")
        self.reports.append(message)
        logger.warning(message)
