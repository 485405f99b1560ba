"""The re-placement trigger at run time: every K optimizer steps, decide from the routing and move experts.

Every attention rank calls `after_step()` right after the experts' optimizer step (the Trainer callback at
`on_step_end`, `hf_hetermoe.prepare`'s optimizer step), so all of them take part together. The routed pairs per
expert of the last K steps' training forwards (each attention rank counts its own, `PoolStats.window_load`) are
summed over the attention ranks in one all-reduce (gloo, CPU: counts are host metadata anyway); every attention
rank then runs the same pure policy (rebalance.py) on the same numbers, so all reach the same proposal without a
broadcast, and `expert_moves.apply_move` checks that they agree before anything moves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping

import torch

from .expert_moves import apply_move, describe_transfers
from .placement import ExpertPlacement
from .rebalance import Proposal, RebalanceConfig, propose

if TYPE_CHECKING:
    from .engine import HeterMoEEngine

logger = logging.getLogger(__name__)


class Rebalancer:
    def __init__(self, engine: HeterMoEEngine, config: RebalanceConfig, speeds: Mapping[int, float] | None = None):
        self.engine = engine
        self.config = config
        # Relative expert throughput per global rank (default 1.0 each); see rebalance.py.
        self.speeds = dict(speeds or {})
        self.steps = 0
        self.decisions: list[Proposal] = []  # every decision, for the logs (the callback drains `pending_log`)
        self.pending_log: Proposal | None = None
        self.history: dict[int, list[float]] | None = None  # the counts of the previous decision (decayed next)

    def global_counts(self) -> dict[int, list[int]]:
        """Routed pairs per expert of the window, summed over the attention ranks (once), then reset."""
        stats, groups = self.engine.stats, self.engine.groups
        layers = sorted(stats.window_load)
        counts = torch.stack([stats.window_load[layer] for layer in layers]).to(torch.int64)
        if groups.attention_counts is not None:
            from .transport import wait

            wait(groups.attention_counts.allreduce([counts]), "the re-placement routing counts", groups.rank)
        for layer in layers:
            stats.window_load[layer].zero_()
        return {layer: row for layer, row in zip(layers, counts.tolist())}

    def after_step(self) -> Proposal | None:
        """Collective over attention ranks, after each optimizer step; decides (and moves) every K steps."""
        self.steps += 1
        if not self.config.enabled or self.steps % self.config.every_steps:
            return None
        engine = self.engine
        topology = engine.topology
        placement = engine.placement
        window = self.global_counts()
        decay = self.config.decay
        counts = {layer: [c + decay * h for c, h in zip(row, self.history[layer])] if self.history else list(map(float, row))
                  for layer, row in window.items()}
        self.history = counts
        # Attention ranks hold experts by Algorithm 1's budget only when they are not the expert pool itself.
        attention = tuple(topology.attention_ranks) if topology.mode == "disaggregated" else ()
        proposal = propose(counts=counts, owner=dict(placement.owner), attention_ranks=attention, speeds=self.speeds,
                           min_gain=self.config.min_gain, max_per_rank=self.config.max_per_rank)
        if proposal.move:
            transfers = apply_move(engine, ExpertPlacement(num_experts=placement.num_experts, owner=proposal.owner))
            moved = describe_transfers(transfers)
        else:
            moved = "no move"
        if engine.groups.is_leader:
            logger.warning(
                "hetermoe: re-placement after step %d: predicted expert time (sum over layers of the busiest holder's "
                "routed pairs / speed) %.6g -> %.6g, gain %.3fx (threshold %.3fx); imbalance (busiest holder / mean, "
                "worst layer) %.3f -> %.3f; %s", self.steps, proposal.before_s, proposal.after_s, proposal.gain,
                self.config.min_gain, proposal.imbalance_before,
                proposal.imbalance_after if proposal.move else proposal.imbalance_before, moved)
        self.decisions.append(proposal)
        self.pending_log = proposal
        return proposal

    def log_entries(self) -> dict[str, float]:
        """Trainer log keys for the decision since the last log (empty when none)."""
        p, self.pending_log = self.pending_log, None
        if p is None:
            return {}
        return {
            "hetermoe_rebalance_gain": round(p.gain, 4),
            "hetermoe_rebalance_moved_experts": float(len(p.moves)),
            "hetermoe_rebalance_imbalance_before": round(p.imbalance_before, 4),
            "hetermoe_rebalance_imbalance_after": round(p.imbalance_after if p.move else p.imbalance_before, 4),
        }
