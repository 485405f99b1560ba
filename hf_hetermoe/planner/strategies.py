"""Simulate each training strategy for one setup and summarise it (iteration time, tokens/s, utilisation).

Strategies (HeterMoE paper, "Evaluation"): EP (colocated on all GPUs), EP(Ideal) (EP on each GPU type alone, the
throughputs summed: not a schedule, a bound for any non-disaggregated system), DistEP (disaggregated, one
micro-batch), ZP (zebra, Theorem-1 order) and ZP+Asym-EA (zebra with Algorithm 1's placement). With an expert pool of several
GPU kinds, ZP+proportional is zebra with the proportional expert split (pools.py; ZP and DistEP keep the even
split, and ZP+Asym-EA is not offered: Algorithm 1's counts assume expert GPUs of one kind). The lower bound
(`lower_bound.py`) is reported beside them.
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

EP, EP_IDEAL, DISTEP, ZP, ZP_ASYM, ZP_PROP = "EP", "EP(Ideal)", "DistEP", "ZP", "ZP+Asym-EA", "ZP+proportional"
STRATEGIES = (EP, EP_IDEAL, DISTEP, ZP, ZP_ASYM)  # the paper's
TABLE_ORDER = STRATEGIES + (ZP_PROP,)  # ZP+proportional exists for mixed expert pools only
MIXED_POOL_ASYM = ("Asym-EA's per-layer counts move the same number of experts off every expert GPU, which assumes "
                   "expert GPUs of one kind; with a mixed expert pool the planner uses the proportional split "
                   "(ZP+proportional) instead")
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
    split: tuple[int, ...] = ()  # experts of every layer on each expert GPU when not the even split
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


def _kinds(cluster: ClusterSpec) -> dict[str, tuple[int, object]]:
    """Every GPU kind of the cluster over both pools: {name: (count, device)}, in rank order."""
    kinds: dict[str, tuple[int, object]] = {}
    for d in cluster.devices:
        count = kinds.get(d.name, (0, d))[0]
        kinds[d.name] = (count + 1, d)
    return kinds


def run_ep(setup: Setup) -> StrategyResult:
    c = setup.cluster
    if not (c.mixed_attention or c.mixed_expert):
        groups = {ATTN: (c.num_attention, c.attention.device), EXP: (c.num_expert, c.expert.device)}
        costs = colocated_costs(setup, groups, setup.global_batch / c.world_size)
        sim = simulate(build_colocated(costs), _groups(c), latency_s=c.latency_s)
        return _summarise(EP, setup, sim, 1)
    # Several kinds: one group per kind, every GPU with EP's per-GPU batch and n/W experts.
    groups = {f"{count}x{name}": (count, dev) for name, (count, dev) in _kinds(c).items()}
    costs = colocated_costs(setup, groups, setup.global_batch / c.world_size)
    specs = {g: GroupSpec(count=count, link_bytes_per_s=c.link_bytes_per_s) for g, (count, _) in groups.items()}
    sim = simulate(build_colocated(costs), specs, latency_s=c.latency_s)
    return StrategyResult(strategy=EP, iteration_s=sim.makespan, tokens_per_s=setup.tokens / sim.makespan,
                          utilisation={g: sim.utilisation(g) for g in groups},
                          bubble_s={g: sim.bubble(g) for g in groups}, sim=sim, note="one group per GPU kind")


def run_ep_ideal(setup: Setup) -> StrategyResult:
    """EP on each GPU type alone, each GPU with EP's per-GPU batch; throughputs add up."""
    c = setup.cluster
    per_gpu = setup.global_batch / c.world_size
    labels = _labels(c)
    if c.mixed_attention or c.mixed_expert:
        pools = [(f"{count}x{name}", count, dev) for name, (count, dev) in _kinds(c).items()]
    else:
        pools = [(name, group.count, group.device) for name, group in ((ATTN, c.attention), (EXP, c.expert))]
    throughput, util = 0.0, {}
    for name, count, device in pools:
        costs = colocated_costs(setup, {name: (count, device)}, per_gpu)
        spec = {name: GroupSpec(count=count, link_bytes_per_s=c.link_bytes_per_s)}
        sim = simulate(build_colocated(costs), spec, latency_s=c.latency_s)
        throughput += count * per_gpu * setup.seq_len / sim.makespan
        util[labels.get(name, name)] = sim.utilisation(name)
    return StrategyResult(strategy=EP_IDEAL, iteration_s=setup.tokens / throughput, tokens_per_s=throughput,
                          utilisation=util, note=f"{len(pools)} separate EP jobs, one per GPU kind (no schedule)"
                          if len(pools) != 2 else "two separate EP jobs (no schedule)")


def run_distep(setup: Setup) -> StrategyResult:
    return _summarise(DISTEP, setup, simulate_zebra(setup, 1), 1)


def microbatch_choices(setup: Setup, max_microbatches: int = MAX_MICROBATCHES) -> list[int]:
    return list(range(1, min(setup.seqs_per_attention_gpu, max_microbatches) + 1))


def run_zp(setup: Setup, r: int | None = None, *, max_microbatches: int = MAX_MICROBATCHES) -> StrategyResult:
    """ZP at R = r, or at the best R when r is None."""
    choices = [r] if r is not None else microbatch_choices(setup, max_microbatches)
    best = min((_summarise(ZP, setup, simulate_zebra(setup, x), x) for x in choices), key=lambda s: s.iteration_s)
    return best


def run_zp_split(setup: Setup, r: int | None = None, *, max_microbatches: int = MAX_MICROBATCHES,
                 counts: tuple[int, ...] | None = None) -> StrategyResult:
    """ZP with a weighted expert split: the proportional counts for each R (pools.py), or the given counts."""
    from .pools import proportional_counts, split_rows

    choices = [r] if r is not None else microbatch_choices(setup, max_microbatches)
    results = []
    for x in choices:
        split = tuple(counts) if counts is not None else proportional_counts(setup, x)
        sim = simulate_zebra(setup, x, placement=split_rows(setup, split))
        res = dataclasses.replace(_summarise(ZP_PROP, setup, sim, x), split=split)
        results.append(dataclasses.replace(res, note=f"experts per expert GPU {list(split)}"))
    return min(results, key=lambda s: s.iteration_s)


def pacing_attention_device(setup: Setup, seqs: int):
    """The attention device whose attention half takes longest on `seqs` sequences: with equal batch shares
    (the stock Trainer's equal per-device batch) it paces every attention rank."""
    c, shape, S = setup.cluster, setup.shape, setup.seq_len
    return max(c.attention_devices, key=lambda d: d.attention_s(shape, num_seqs=seqs, seq_len=S)[0])


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
    if c.mixed_expert:
        raise ValueError(f"asym_ea: {MIXED_POOL_ASYM}.")
    s = max(setup.microbatch_seqs(r))  # plan on the largest stripe
    per_expert = c.num_attention * shape.top_k * s * S / shape.num_experts
    share = shape.num_experts // c.num_expert  # n/N: one expert GPU's experts
    bounds = memory_bounds(setup, r)
    dev_a = pacing_attention_device(setup, s)  # the attention pool's one kind, or its slowest
    t_attn = dev_a.attention_s(shape, num_seqs=s, seq_len=S)[0]
    if variant == "head-aware":
        t_attn += dev_a.head_s(shape, num_tokens=s * S)[0] / shape.num_layers
    return gather_and_squeeze(
        num_experts=shape.num_experts, num_layers=shape.num_layers, num_attention=c.num_attention,
        num_expert=c.num_expert, t_attn=t_attn,
        t_exp_on_attention=share * dev_a.expert_s(shape, num_tokens=per_expert)[0],
        t_exp_on_expert=share * c.expert.device.expert_s(shape, num_tokens=per_expert)[0],
        n_min=bounds.n_min, n_max=bounds.n_max,
    )


def run_zp_asym(setup: Setup, r: int | None = None, *, max_microbatches: int = MAX_MICROBATCHES,
                offloads: list[int] | None = None, variants: tuple[str, ...] = ASYM_VARIANTS) -> StrategyResult:
    """ZP with Algorithm 1's offloads (or the given ones) at R = r, or at the best R when r is None.

    Without given offloads, every variant of Algorithm 1's inputs is simulated at every R and the fastest
    kept; its variant is named in `note`.
    """
    if setup.cluster.mixed_expert:
        raise ValueError(f"asym_ea: {MIXED_POOL_ASYM}.")
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
