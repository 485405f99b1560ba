"""The plan: every strategy's prediction for a setup, the lower bound, the chosen strategy, its placement and
the hetermoe config that launches it.

The chosen strategy is the fastest runnable one (EP, DistEP, ZP or ZP+Asym-EA; EP(Ideal) is a bound, not a
system). ZP+Asym-EA is simulated with Algorithm 1's placement at every R; when it cannot apply (GPU counts not
multiples of each other, memory, a mixed expert pool), the row says why and ZP stands in. With an expert pool of
several GPU kinds, ZP+proportional (the proportional expert split, pools.py) runs beside ZP (the even split), and
the faster one is chosen; its config carries the split as `expert_split` weights (the counts themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import HeterMoEConfig, ZebraConfig
from .asym_ea import Placement, offloads_to_config, placement_from_offloads
from .lower_bound import LowerBound, lower_bound
from .memory import memory_bounds
from .strategies import (DISTEP, EP, EP_IDEAL, MAX_MICROBATCHES, ZP, ZP_ASYM, ZP_PROP, StrategyResult, run_distep,
                         run_ep, run_ep_ideal, run_zp, run_zp_asym, run_zp_split)
from .workload import Setup

RUNNABLE = (EP, DISTEP, ZP, ZP_ASYM, ZP_PROP)


@dataclass(frozen=True, kw_only=True)
class Plan:
    setup: Setup
    results: dict[str, StrategyResult]
    problems: dict[str, str] = field(default_factory=dict)  # strategy -> why it has no result
    lower_bound: LowerBound
    chosen: StrategyResult
    placement: Placement
    config: HeterMoEConfig
    warnings: tuple[str, ...] = ()

    def fraction_of_bound(self, strategy: str) -> float:
        return self.lower_bound.iteration_s / self.results[strategy].iteration_s


def evaluate(setup: Setup, *, max_microbatches: int = MAX_MICROBATCHES) -> tuple[dict[str, StrategyResult], dict[str, str]]:
    results = {EP: run_ep(setup), EP_IDEAL: run_ep_ideal(setup)}
    problems: dict[str, str] = {}
    runners = {DISTEP: lambda: run_distep(setup), ZP: lambda: run_zp(setup, max_microbatches=max_microbatches),
               ZP_ASYM: lambda: run_zp_asym(setup, max_microbatches=max_microbatches)}
    if setup.cluster.mixed_expert:
        runners[ZP_PROP] = lambda: run_zp_split(setup, max_microbatches=max_microbatches)
    for name, run in runners.items():
        try:
            results[name] = run()
        except ValueError as exc:  # e.g. the even split of a mixed pool whose GPUs do not divide the experts
            problems[name] = str(exc)
    return results, problems


def config_for(setup: Setup, result: StrategyResult) -> tuple[HeterMoEConfig, Placement]:
    c, n = setup.cluster, setup.shape.num_experts
    if result.strategy == EP:
        ranks = tuple(range(c.world_size))
        return (HeterMoEConfig(mode="colocated", zebra=ZebraConfig(microbatches=1)),
                placement_from_offloads(num_experts=n, attention_ranks=(), expert_ranks=ranks,
                                        offloads=[0] * setup.shape.num_layers))
    if result.split:
        from .pools import split_rows

        rows = split_rows(setup, result.split)
        placement = Placement(owners={layer: dict(enumerate(row)) for layer, row in enumerate(rows)})
        config = HeterMoEConfig(
            attention_ranks=c.attention_ranks, expert_ranks=c.expert_ranks, mode="disaggregated",
            zebra=ZebraConfig(microbatches=result.microbatches), expert_split=tuple(result.split),
        )
        return config, placement
    offloads = list(result.offloads) or [0] * setup.shape.num_layers
    placement = placement_from_offloads(num_experts=n, attention_ranks=c.attention_ranks,
                                        expert_ranks=c.expert_ranks, offloads=offloads)
    config = HeterMoEConfig(
        attention_ranks=c.attention_ranks, expert_ranks=c.expert_ranks, mode="disaggregated",
        zebra=ZebraConfig(microbatches=result.microbatches), asym_ea=offloads_to_config(offloads),
    )
    return config, placement


def make_plan(setup: Setup, *, max_microbatches: int = MAX_MICROBATCHES) -> Plan:
    results, problems = evaluate(setup, max_microbatches=max_microbatches)
    candidates = [results[s] for s in RUNNABLE if s in results]
    if setup.shape.num_experts % setup.cluster.world_size != 0:
        # Colocated mode splits experts evenly over all ranks; the EP row stays as a prediction only.
        candidates = [r for r in candidates if r.strategy != EP]
    chosen = min(candidates, key=lambda r: r.iteration_s)
    config, placement = config_for(setup, chosen)
    warnings = []
    if chosen.strategy != EP:
        bounds = memory_bounds(setup, chosen.microbatches)
        c = setup.cluster
        att_label, exp_label = ("/".join(dict.fromkeys(d.name for d in ds)) for ds in (c.attention_devices,
                                                                                     c.expert_devices))
        if not bounds.attention_fits:
            warnings.append(
                f"memory: an attention GPU ({att_label}) is predicted to overflow by "
                f"{-bounds.attention_free_bytes / 1e9:.1f} GB at R={chosen.microbatches}; lower --global-batch."
            )
        moved = sum(chosen.offloads)
        if moved < bounds.n_min and not chosen.split:  # a weighted split is bounded by each GPU's memory already
            warnings.append(
                f"memory: the expert GPUs ({exp_label}) are predicted to overflow unless "
                f"{bounds.n_min} experts each move to attention GPUs (the plan moves {moved})."
            )
    return Plan(setup=setup, results=results, problems=problems, lower_bound=lower_bound(setup), chosen=chosen,
                placement=placement, config=config, warnings=tuple(warnings))
