"""Simulate each training strategy for one setup and summarise it (iteration time, tokens/s, utilisation).

Strategies (HeterMoE paper, "Evaluation"): EP (colocated on all GPUs), EP(Ideal) (EP on each GPU type alone, the
throughputs summed: not a schedule, a bound for any non-disaggregated system), DistEP (disaggregated, one
micro-batch), ZP (zebra, Theorem-1 order) and ZP+Asym-EA (zebra with Algorithm 1's placement). The lower
bound (`lower_bound.py`) is reported beside them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .asym_ea import gather_and_squeeze
from .cluster import ClusterSpec
from .memory import memory_bounds
from .schedules import ATTN, EXP, build_colocated, build_zebra
from .simulator import GroupSpec, SimResult, simulate
from .workload import Setup, colocated_costs, zebra_costs

EP, EP_IDEAL, DISTEP, ZP, ZP_ASYM = "EP", "EP(Ideal)", "DistEP", "ZP", "ZP+Asym-EA"
STRATEGIES = (EP, EP_IDEAL, DISTEP, ZP, ZP_ASYM)
MAX_MICROBATCHES = 16


@dataclass(frozen=True, kw_only=True)
class StrategyResult:
    strategy: str
    iteration_s: float
    tokens_per_s: float
    microbatches: int = 1
    utilisation: dict[str, float] = field(default_factory=dict)  # "6xA40" -> busy fraction of each GPU
    bubble_s: dict[str, float] = field(default_factory=dict)  # idle seconds of each GPU per iteration
    offloads: tuple[int, ...] = ()  # Asym-EA: experts each expert GPU gives up, per MoE layer
    note: str = ""
    sim: SimResult | None = None


def _groups(cluster: ClusterSpec) -> dict[str, GroupSpec]:
    bw = cluster.link_bytes_per_s
    return {ATTN: GroupSpec(count=cluster.num_attention, link_bytes_per_s=bw),
            EXP: GroupSpec(count=cluster.num_expert, link_bytes_per_s=bw)}


def _labels(cluster: ClusterSpec) -> dict[str, str]:
    return dict(zip((ATTN, EXP), cluster.labels))


def _summarise(strategy: str, setup: Setup, sim: SimResult, r: int, offloads=()) -> StrategyResult:
    labels = _labels(setup.cluster)
    t = sim.makespan
    return StrategyResult(
        strategy=strategy, iteration_s=t, tokens_per_s=setup.tokens / t, microbatches=r,
        utilisation={labels[g]: sim.utilisation(g) for g in (ATTN, EXP)},
        bubble_s={labels[g]: sim.bubble(g) for g in (ATTN, EXP)}, offloads=tuple(offloads), sim=sim,
    )


def simulate_zebra(setup: Setup, r: int, offloads: list[int] | None = None, *, batched_head: bool = True,
                   placement=None) -> SimResult:
    """The schedule the runtime runs: Theorem 1 with a batched head (head and loss once per micro-batch, see
    schedules.build_zebra and docs/planner.md, "One schedule"). `batched_head=False` is exact Theorem 1, kept
    to measure what the batched head costs. `placement` (owner[layer][expert] = global rank, the runtime's
    `ExpertPlacement.owner` layout; see workload.owner_rows) replaces `offloads` with any explicit placement."""
    c = setup.cluster
    return simulate(build_zebra(zebra_costs(setup, r, offloads, placement=placement), batched_head=batched_head),
                    _groups(c), latency_s=c.latency_s)


def run_ep(setup: Setup) -> StrategyResult:
    c = setup.cluster
    groups = {ATTN: (c.num_attention, c.attention.device), EXP: (c.num_expert, c.expert.device)}
    costs = colocated_costs(setup, groups, setup.global_batch / c.world_size)
    sim = simulate(build_colocated(costs), _groups(c), latency_s=c.latency_s)
    return _summarise(EP, setup, sim, 1)


def run_ep_ideal(setup: Setup) -> StrategyResult:
    """EP on each GPU type alone, each GPU with EP's per-GPU batch; throughputs add up."""
    c = setup.cluster
    per_gpu = setup.global_batch / c.world_size
    labels = _labels(c)
    throughput, util = 0.0, {}
    for name, group in ((ATTN, c.attention), (EXP, c.expert)):
        costs = colocated_costs(setup, {name: (group.count, group.device)}, per_gpu)
        sim = simulate(build_colocated(costs), {name: _groups(c)[name]}, latency_s=c.latency_s)
        throughput += group.count * per_gpu * setup.seq_len / sim.makespan
        util[labels[name]] = sim.utilisation(name)
    return StrategyResult(strategy=EP_IDEAL, iteration_s=setup.tokens / throughput, tokens_per_s=throughput,
                          utilisation=util, note="two separate EP jobs (no schedule)")


def run_distep(setup: Setup) -> StrategyResult:
    return _summarise(DISTEP, setup, simulate_zebra(setup, 1), 1)


def microbatch_choices(setup: Setup, max_microbatches: int = MAX_MICROBATCHES) -> list[int]:
    return list(range(1, min(setup.seqs_per_attention_gpu, max_microbatches) + 1))


def run_zp(setup: Setup, r: int | None = None, *, max_microbatches: int = MAX_MICROBATCHES) -> StrategyResult:
    """ZP at R = r, or at the best R when r is None."""
    choices = [r] if r is not None else microbatch_choices(setup, max_microbatches)
    best = min((_summarise(ZP, setup, simulate_zebra(setup, x), x) for x in choices), key=lambda s: s.iteration_s)
    return best


ASYM_VARIANTS = ("paper", "head-aware")


def asym_offloads(setup: Setup, r: int, variant: str = "paper") -> list[int]:
    """Algorithm 1 for R = r micro-batches, with profiled per-micro-batch forward times and memory bounds.

    variant "paper": T_A^Attn is one layer's attention + router, as in the paper. "head-aware": T_A^Attn also
    carries the LM head and loss spread over the layers; the head runs only on attention GPUs, so on shallow
    models with a large vocabulary the paper's inputs overstate the attention GPUs' bubble.
    Raises ValueError when the GPU counts do not allow Asym-EA (M, N not multiples) or memory cannot fit.
    """
    if variant not in ASYM_VARIANTS:
        raise ValueError(f"asym_ea: unknown variant {variant!r}. Use one of {ASYM_VARIANTS}.")
    c, shape, S = setup.cluster, setup.shape, setup.seq_len
    s = max(setup.microbatch_seqs(r))  # plan on the largest stripe
    per_expert = c.num_attention * shape.top_k * s * S / shape.num_experts
    share = shape.num_experts // c.num_expert  # n/N: one expert GPU's experts
    bounds = memory_bounds(setup, r)
    t_attn = c.attention.device.attention_s(shape, num_seqs=s, seq_len=S)[0]
    if variant == "head-aware":
        t_attn += c.attention.device.head_s(shape, num_tokens=s * S)[0] / shape.num_layers
    return gather_and_squeeze(
        num_experts=shape.num_experts, num_layers=shape.num_layers, num_attention=c.num_attention,
        num_expert=c.num_expert, t_attn=t_attn,
        t_exp_on_attention=share * c.attention.device.expert_s(shape, num_tokens=per_expert)[0],
        t_exp_on_expert=share * c.expert.device.expert_s(shape, num_tokens=per_expert)[0],
        n_min=bounds.n_min, n_max=bounds.n_max,
    )


def run_zp_asym(setup: Setup, r: int | None = None, *, max_microbatches: int = MAX_MICROBATCHES,
                offloads: list[int] | None = None, variants: tuple[str, ...] = ASYM_VARIANTS) -> StrategyResult:
    """ZP with Algorithm 1's offloads (or the given ones) at R = r, or at the best R when r is None.

    Without given offloads, every variant of Algorithm 1's inputs is simulated at every R and the fastest
    kept; its variant is named in `note`.
    """
    choices = [r] if r is not None else microbatch_choices(setup, max_microbatches)
    results, problems = [], []
    for x in choices:
        if offloads is not None:
            results.append(_summarise(ZP_ASYM, setup, simulate_zebra(setup, x, list(offloads)), x, offloads))
            continue
        seen: dict[tuple[int, ...], str] = {}
        for variant in variants:
            try:
                seen.setdefault(tuple(asym_offloads(setup, x, variant)), variant)
            except ValueError as exc:  # this R does not fit (or M, N forbid Asym-EA): try the others
                problems.append(str(exc))
        for o, variant in seen.items():
            res = _summarise(ZP_ASYM, setup, simulate_zebra(setup, x, list(o)), x, o)
            results.append(dataclasses.replace(res, note=f"Algorithm 1 ({variant} inputs)"))
    if not results:
        raise ValueError(problems[-1])
    return min(results, key=lambda s: s.iteration_s)
