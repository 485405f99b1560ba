"""PoolStats: how busy each pool was and how evenly routing spread the tokens, for the Trainer's training logs."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable

import torch

from . import protocol as cmds

if TYPE_CHECKING:
    from .control import CommandChannel
    from .groups import HeterMoEGroups
    from .placement import ExpertPlacement
    from .timeline import Timeline

logger = logging.getLogger(__name__)


class PoolStats:
    def __init__(
        self, *, groups: HeterMoEGroups, placement: ExpertPlacement, timeline: Timeline, holds_experts: bool,
        command: Callable[..., None], channel: CommandChannel,
    ):
        self.groups = groups
        self.placement = placement
        self.timeline = timeline
        self.holds_experts = holds_experts
        self.command = command  # the engine's: leader -> every expert server
        self.channel = channel
        # Routed (token, k) pairs per expert since the last call, per layer (the engine's exchanges add to it):
        # real routing is not uniform.
        self.expert_load = {layer: torch.zeros(placement.num_experts, dtype=torch.int64) for layer in placement.layers}
        # Routed pairs per expert of training forwards since the last re-placement decision (rebalancer.py); the
        # logging above does not reset it.
        self.window_load = {layer: torch.zeros(placement.num_experts, dtype=torch.int64) for layer in placement.layers}
        # HETERMOE_ROUTING_LOG=DIR: cumulative counts, for `hetermoe plan --routing DIR` (planner/routing.py).
        self.routing_log = os.environ.get("HETERMOE_ROUTING_LOG") or None
        self.routed_total = {layer: torch.zeros(placement.num_experts, dtype=torch.int64) for layer in placement.layers}

    def pool_busy(self, since: float) -> dict[str, float]:
        """Busy fractions since `since`: this rank's attention work, and (leader) the expert servers' work."""
        now = time.perf_counter()
        window = max(now - since, 1e-9)
        stats = {"attention_busy": self.timeline.busy_time(since, now, kinds=("A", "H")) / window}
        if self.holds_experts:
            stats["expert_busy_here"] = self.timeline.busy_time(since, now, kinds=("E",)) / window
        stats.update(self._load_stats())
        servers = self.groups.topology.expert_ranks
        if self.groups.is_leader and servers:
            self.command(cmds.Stats())
            busy = total = 0.0
            for server in servers:
                server_busy, server_window = self.channel.recv_tensor_dict(server)["stats"].tolist()
                busy, total = busy + server_busy, total + server_window
            stats["expert_busy"] = busy / max(total, 1e-9)
        return stats

    def _load_stats(self) -> dict[str, float]:
        """This rank's routing since the last call: worst layer's (busiest holder / mean holder) load, and the
        busiest expert's share of its layer. Per-layer, per-rank detail goes to the debug log."""
        worst_rank, worst_expert = 1.0, 0.0
        if self.routing_log:
            for layer, load in self.expert_load.items():
                self.routed_total[layer] += load
            from .planner.routing import write_counts

            write_counts(self.routing_log, self.groups.rank,
                         {layer: total.tolist() for layer, total in self.routed_total.items()})
        for layer, load in self.expert_load.items():
            total = int(load.sum())
            if total == 0:
                continue
            per_rank: dict[int, int] = {}
            for expert, rank in enumerate(self.placement.owner[layer]):
                per_rank[rank] = per_rank.get(rank, 0) + int(load[expert])
            mean = total / len(per_rank)
            worst_rank = max(worst_rank, max(per_rank.values()) / mean)
            worst_expert = max(worst_expert, int(load.max()) / total)
            logger.debug("hetermoe: layer %d routed pairs per expert %s, per rank %s", layer, load.tolist(), per_rank)
            load.zero_()
        return {"load_imbalance": worst_rank, "busiest_expert_share": worst_expert}
