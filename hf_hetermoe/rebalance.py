"""Re-placement policy: from observed routing counts, propose where every expert should live (pure Python).

Inputs: the global routed (token, k) pairs per expert of each MoE layer (summed over attention ranks; the
runtime passes the last window of K optimizer steps plus `decay` times the counts of the previous decision),
each holder's relative expert throughput (`speeds`, rank -> number, default 1.0),
and the current placement (`owner[layer][expert] = rank`).

Cost model (what "predicted" means here): a holder's expert time in one layer is the pairs routed to its experts
divided by its speed; one layer's exchange waits for its busiest holder; the predicted expert time of a
placement is the sum over layers of that busiest holder's time. Predicted gain = predicted expert time of the
current placement / of the proposed one. Fixed per-expert costs (weights read once per expert) do not change
when no rank's expert count changes, which is what the policy keeps by default.

Per layer:
- slots: every rank keeps the number of experts it holds now (memory bound: no rank holds more than it does, so
  the attention ranks keep the counts Algorithm 1 gave them), unless `max_per_rank` allows more;
- expert ranks: longest-processing-time greedy (hottest expert first, to the holder whose load/speed after
  taking it is least, among holders with a free slot), then pairwise swaps between the busiest holder and the
  others while they lower the busiest load;
- attention-rank holders (Asym-EA): Algorithm 1 sized their share for uniform routing, i.e. a time budget of
  (their slots x the mean expert load); they take the hottest experts that fit that budget, and otherwise the
  coldest, so the experts that overlap with attention stay within the bubble they were sized for;
- fewest moves: ranks of equal role, speed and slots are interchangeable, so each proposed group goes to the rank of
  its class that already holds most of it; a layer whose busiest load would not drop keeps its row unchanged.
The whole proposal is taken only when the predicted gain reaches `min_gain`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config_messages import fail as _fail
from .config_messages import show as _show

Owner = dict[int, tuple[int, ...]]


@dataclass(frozen=True, kw_only=True)
class RebalanceConfig:
    """`rebalance:` in the HeterMoE config. Off unless `every_steps` is set.

    every_steps: decide every K optimizer steps, from the routing of those K steps;
    min_gain: move only when predicted expert time before / after reaches this (>= 1.0);
    max_per_rank: None keeps every rank's expert count per layer; N lets a holder take up to N experts of a layer
      (never fewer than it holds now), for skew that equal counts cannot balance (memory: N experts' weights and
      optimizer state per layer on that rank);
    decay: a decision uses this window's counts plus `decay` times the counts the previous decision used (an
      exponential average over windows). 0 uses the last K steps alone, which over-fits the routing noise of a
      short window (a placement tuned to one window's counts predicts a gain the next window does not show);
      1 keeps every window since the start."""

    every_steps: int | None = None
    min_gain: float = 1.05
    max_per_rank: int | None = None
    decay: float = 0.5

    def __post_init__(self) -> None:
        k = self.every_steps
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1_000_000):
            raise _fail("rebalance.every_steps", f"must be an integer number of optimizer steps from 1 to 1000000, "
                        f"got {_show(k)}", "Use e.g. `rebalance: {every_steps: 50}`, or leave `rebalance` out (off).")
        g = self.min_gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 1.0 <= g <= 100.0:
            raise _fail("rebalance.min_gain", f"must be a number from 1.0 to 100, got {_show(g)}",
                        "Use e.g. 1.05 (move when the busiest holder's predicted expert time drops by 5%).")
        object.__setattr__(self, "min_gain", float(g))
        n = self.max_per_rank
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000):
            raise _fail("rebalance.max_per_rank", f"must be a positive integer number of experts per layer, got "
                        f"{_show(n)}", "Leave it out to keep every rank's expert count, or give e.g. 4.")
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise _fail("rebalance.decay", f"must be a number from 0 to 1, got {_show(d)}",
                        "Use e.g. 0.5 (older windows count half as much at each decision).")
        object.__setattr__(self, "decay", float(d))

    @property
    def enabled(self) -> bool:
        return self.every_steps is not None

    @classmethod
    def from_dict(cls, data: Any) -> "RebalanceConfig":
        if isinstance(data, RebalanceConfig):
            return data
        if data is None or data is False or data == "off":
            return cls()
        if not isinstance(data, dict):
            raise _fail("rebalance", f"must be a mapping, got {_show(data)}",
                        "Write e.g. `rebalance: {every_steps: 50, min_gain: 1.05}`, or `rebalance: off`.")
        known = ("every_steps", "min_gain", "max_per_rank", "decay")
        unknown = sorted(_show(k) if not isinstance(k, str) else k for k in data if k not in known)
        if unknown:
            raise _fail("rebalance", f"has unknown key(s) {unknown}", f"Known keys: {', '.join(known)}.")
        if "every_steps" not in data:
            raise _fail("rebalance", "has no `every_steps`", "Say how often to decide, e.g. `every_steps: 50`.")
        return cls(every_steps=data["every_steps"], min_gain=data.get("min_gain", 1.05),
                   max_per_rank=data.get("max_per_rank"), decay=data.get("decay", 0.5))

    def to_dict(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        out: dict[str, Any] = {"every_steps": self.every_steps, "min_gain": self.min_gain, "decay": self.decay}
        if self.max_per_rank is not None:
            out["max_per_rank"] = self.max_per_rank
        return out


@dataclass(frozen=True)
class Proposal:
    """What the policy proposes, and why (all predictions in pairs / speed, see the module docstring)."""

    owner: Owner  # the proposed placement (the current one when `move` is false)
    move: bool  # predicted gain >= min_gain and something changes
    gain: float  # predicted expert time before / after
    before_s: float  # sum over layers of the busiest holder's load / speed, current placement
    after_s: float  # the same for the proposal
    imbalance_before: float  # worst layer's busiest holder / mean holder, by the counts
    imbalance_after: float
    moves: list[tuple[int, int, int, int]] = field(default_factory=list)  # (layer, expert, from rank, to rank)

    def describe(self) -> str:
        head = (f"predicted expert time {self.before_s:.4g} -> {self.after_s:.4g} (gain {self.gain:.3f}x), imbalance "
                f"(busiest holder / mean) {self.imbalance_before:.3f} -> {self.imbalance_after:.3f}")
        if not self.move:
            return head + ": no move"
        by_layer: dict[int, list[str]] = {}
        for layer, expert, src, dst in self.moves:
            by_layer.setdefault(layer, []).append(f"expert {expert} rank {src}->{dst}")
        return head + "; " + "; ".join(f"layer {layer}: {', '.join(v)}" for layer, v in sorted(by_layer.items()))


def holder_loads(row: tuple[int, ...], counts: list[float], speeds: Mapping[int, float]) -> dict[int, float]:
    """Each holder's load / speed for one layer's owner row."""
    out: dict[int, float] = {}
    for expert, rank in enumerate(row):
        out[rank] = out.get(rank, 0.0) + counts[expert] / speeds.get(rank, 1.0)
    return out


def predicted_time(owner: Owner, counts: Mapping[int, list[float]], speeds: Mapping[int, float]) -> float:
    """Sum over layers of the busiest holder's load / speed."""
    return sum(max(holder_loads(row, list(counts[layer]), speeds).values()) for layer, row in owner.items())


def imbalance(owner: Owner, counts: Mapping[int, list[float]]) -> float:
    """Worst layer's (busiest holder / mean holder) by raw counts, as stats.py logs `load_imbalance`."""
    worst = 1.0
    for layer, row in owner.items():
        loads = holder_loads(row, list(counts[layer]), {})
        total = sum(loads.values())
        if total > 0:
            worst = max(worst, max(loads.values()) / (total / len(loads)))
    return worst


def _balance_layer(row: tuple[int, ...], counts: list[float], speeds: Mapping[int, float],
                   attention: set[int], max_per_rank: int | None) -> tuple[int, ...]:
    """One layer's proposed owner row (before relabelling for fewest moves)."""
    held: dict[int, int] = {}
    for rank in row:
        held[rank] = held.get(rank, 0) + 1
    slots = {r: n if max_per_rank is None else max(n, max_per_rank) for r, n in held.items()}
    num = len(row)
    mean = sum(counts) / num if num else 0.0
    budget = {r: slots[r] * mean for r in slots if r in attention}
    order = sorted(range(num), key=lambda e: (-counts[e], e))
    load = {r: 0.0 for r in slots}
    taken = {r: 0 for r in slots}
    new = [-1] * num
    for e in order:
        # Kept counts: the slots add up to the experts, so every rank ends with exactly its count.
        candidates = [r for r in slots if taken[r] < slots[r]]
        fits = [r for r in candidates if r not in attention or load[r] + counts[e] <= budget[r] + 1e-9]
        # Attention holders take experts that fit their budget; when none fits, they take the remaining
        # (coldest) experts only as their reserved slots demand.
        pool = fits or [r for r in candidates if r in attention] or candidates
        best = min(pool, key=lambda r: ((load[r] + counts[e]) / speeds.get(r, 1.0), r != row[e], r))
        new[e] = best
        load[best] += counts[e]
        taken[best] += 1
    return _swap_down(tuple(new), counts, speeds, attention, budget)


def _swap_down(row: tuple[int, ...], counts: list[float], speeds: Mapping[int, float], attention: set[int],
               budget: dict[int, float]) -> tuple[int, ...]:
    """Swap an expert of the busiest expert-rank holder with one of another expert-rank holder while that lowers
    the busiest load (attention holders keep what the greedy pass gave them)."""
    row = list(row)
    for _ in range(4 * len(row)):
        loads = holder_loads(tuple(row), counts, speeds)
        servers = {r: v for r, v in loads.items() if r not in attention}
        if len(servers) < 2:
            break
        top = max(servers, key=lambda r: (servers[r], -r))
        best = None
        for a in (e for e, r in enumerate(row) if r == top):
            for b in (e for e, r in enumerate(row) if r != top and r not in attention):
                other = row[b]
                new_top = loads[top] + (counts[b] - counts[a]) / speeds.get(top, 1.0)
                new_other = loads[other] + (counts[a] - counts[b]) / speeds.get(other, 1.0)
                worst = max(new_top, new_other)
                if worst < loads[top] - 1e-9 and (best is None or worst < best[0]):
                    best = (worst, a, b)
        if best is None:
            break
        _, a, b = best
        row[a], row[b] = row[b], row[a]
    return tuple(row)


def _relabel(old: tuple[int, ...], new: tuple[int, ...], speeds: Mapping[int, float],
             attention: set[int]) -> tuple[int, ...]:
    """Give each proposed group to the rank of its class (same role, same speed, same size) that holds most of it
    now."""
    groups: dict[int, set[int]] = {}
    for e, r in enumerate(new):
        groups.setdefault(r, set()).add(e)
    classes: dict[tuple[float, int], list[int]] = {}
    for r, experts in groups.items():
        classes.setdefault((r in attention, speeds.get(r, 1.0), len(experts)), []).append(r)
    mapping: dict[int, int] = {}
    for ranks in classes.values():
        free = set(ranks)
        pairs = sorted(((-sum(1 for e in groups[g] if old[e] == r), g, r) for g in ranks for r in ranks))
        done: set[int] = set()
        for _, g, r in pairs:
            if g in done or r not in free:
                continue
            mapping[g] = r
            done.add(g)
            free.discard(r)
    return tuple(mapping[r] for r in new)


def propose(*, counts: Mapping[int, list[float]], owner: Owner, attention_ranks: tuple[int, ...] = (),
            speeds: Mapping[int, float] | None = None, min_gain: float = 1.05,
            max_per_rank: int | None = None) -> Proposal:
    """The re-placement proposal for these counts (see the module docstring)."""
    speeds = dict(speeds or {})
    attention = set(attention_ranks)
    proposed: Owner = {}
    for layer, row in sorted(owner.items()):
        layer_counts = [float(c) for c in counts[layer]]
        if sum(layer_counts) <= 0:
            proposed[layer] = tuple(row)
            continue
        new = _relabel(tuple(row), _balance_layer(tuple(row), layer_counts, speeds, attention, max_per_rank), speeds,
                       attention)
        old_top = max(holder_loads(tuple(row), layer_counts, speeds).values())
        new_top = max(holder_loads(new, layer_counts, speeds).values())
        proposed[layer] = new if new_top < old_top * (1 - 1e-9) else tuple(row)
    before = predicted_time(owner, counts, speeds)
    after = predicted_time(proposed, counts, speeds)
    gain = before / after if after > 0 else 1.0
    moves = [(layer, e, owner[layer][e], proposed[layer][e]) for layer in sorted(owner)
             for e in range(len(owner[layer])) if owner[layer][e] != proposed[layer][e]]
    move = bool(moves) and gain >= min_gain
    final = proposed if move else {layer: tuple(row) for layer, row in owner.items()}
    return Proposal(owner=final, move=move, gain=gain, before_s=before, after_s=after,
                    imbalance_before=imbalance(owner, counts), imbalance_after=imbalance(proposed, counts),
                    moves=moves if move else [])
