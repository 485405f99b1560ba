"""From a setup (cluster, model, sequence length, global batch) to the simulator's per-task costs.

Legend: B global batch (sequences), S sequence length, M / N attention / expert GPUs, W = M + N, n experts per
layer, k top-k, h hidden size, b bytes per element, L = MoE layers + 1 attention stages (Theorem 1), R
micro-batches, s_j sequences of micro-batch j on one attention GPU, T_j = s_j S its tokens, C_j = k T_j its
routed token copies, P_j = M C_j / n the copies one expert receives, o_l experts each expert GPU gives up at
MoE layer l (Asym-EA), e_l = n/N - o_l experts left on an expert GPU, a_l = o_l N / M experts on an
attention GPU.

Routing is uniform unless the setup gives per-expert shares (`routing.py`: Zipf or counts the runtime logged);
every expert receives its share of the M C_j copies of a micro-batch, and each holder's time and bytes follow
from the experts it holds (`asym_ea.placement_from_offloads`, the runtime's convention); the *busiest* holder
sets the pace, as in a real all-to-all. Experts are computed one after another (a loop over local experts), so
a GPU's expert time is the sum of its experts' times (under uniform routing: its expert count times one). With
activation checkpointing (the paper's setups use it) every backward of an attention half or an expert adds
one forward for the recomputation; the head is not checkpointed. Recomputation repeats no communication
(each module is checkpointed on its own, so no all-to-all is replayed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cluster import ClusterSpec
from .model_shape import ModelShape
from .profiles import DeviceCosts
from .routing import UNIFORM, Routing
from .schedules import ATTN, EXP, ColocatedCosts, Loads, ZebraCosts


@dataclass(frozen=True, kw_only=True)
class Setup:
    cluster: ClusterSpec
    shape: ModelShape
    seq_len: int  # S
    global_batch: int  # B, sequences per iteration
    checkpointing: bool = True
    routing: Routing = UNIFORM  # per-expert shares of each MoE layer's routed copies

    def __post_init__(self) -> None:
        self.routing.check(num_layers=self.shape.num_layers, num_experts=self.shape.num_experts)
        for name in ("seq_len", "global_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"planner: `{name}` must be a positive integer, got {value!r}.")
        m, n_exp, n = self.cluster.num_attention, self.cluster.num_expert, self.shape.num_experts
        if self.global_batch % m != 0:
            raise ValueError(
                f"planner: --global-batch {self.global_batch} does not split over {m} attention GPUs. "
                f"Use a multiple of {m} (e.g. {default_global_batch(self.cluster)})."
            )
        if n % n_exp != 0:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"planner: the model's {n} experts per layer do not divide over {n_exp} expert GPUs "
                f"({self.cluster.expert.name}). Use a number of expert GPUs that divides {n} (one of {divisors})."
            )

    @property
    def num_stages(self) -> int:  # L of Theorem 1
        return self.shape.num_layers + 1

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def seqs_per_attention_gpu(self) -> int:
        return self.global_batch // self.cluster.num_attention

    def microbatch_seqs(self, r: int) -> list[int]:
        """Stripes of one attention GPU's sequences: as even as possible, larger ones first."""
        s = self.seqs_per_attention_gpu
        if not 1 <= r <= s:
            raise ValueError(
                f"planner: {r} micro-batches need at least {r} sequences per attention GPU, which gets {s} "
                f"(global batch {self.global_batch} over {self.cluster.num_attention}). Use 1..{s} micro-batches "
                "or a larger --global-batch."
            )
        return [s // r + (1 if j < s % r else 0) for j in range(r)]


def default_global_batch(cluster: ClusterSpec) -> int:
    """Smallest batch giving every GPU whole sequences under EP and >= 4 per attention GPU under ZP.

    (The paper does not state its batch sizes; 4 per attention GPU lets zebra use up to 4 micro-batches.)
    """
    unit = math.lcm(cluster.num_attention, cluster.world_size)
    return unit * math.ceil(4 * cluster.num_attention / unit)


def check_offloads(setup: Setup, offloads: list[int]) -> None:
    """Asym-EA counts given by a user (CLI, YAML) must describe a placement that exists."""
    m, n_exp, n, layers = setup.cluster.num_attention, setup.cluster.num_expert, setup.shape.num_experts, setup.shape.num_layers
    if len(offloads) != layers:
        raise ValueError(f"asym_ea: {len(offloads)} per-layer counts given but the model has {layers} layers.")
    for layer, o in enumerate(offloads):
        if not 0 <= o <= n // n_exp or (o * n_exp) % m:
            raise ValueError(
                f"asym_ea: layer {layer} moves {o} experts per expert GPU; each of the {n_exp} expert GPUs holds "
                f"{n // n_exp} and the {o * n_exp} moved must split evenly over {m} attention GPUs."
            )


def _train(fwd_bwd: tuple[float, float], recompute: bool) -> tuple[float, float]:
    fwd, bwd = fwd_bwd
    return fwd, bwd + (fwd if recompute else 0.0)


def paced(devices, cost) -> tuple[float, float]:
    """(forward, backward) of the device whose forward + backward `cost(device)` is the longest: ranks that
    do the same work wait for the slowest of them at the next collective."""
    return max((cost(d) for d in {d.name: d for d in devices}.values()), key=lambda t: t[0] + t[1])


def _experts_s(dev: DeviceCosts, shape: ModelShape, tokens: list[float], recompute: bool) -> tuple[float, float]:
    """One holder's experts run one after another; an expert that receives no rows is skipped (as at run time)."""
    fwd = bwd = 0.0
    for t in tokens:
        if t > 0:
            f, b = _train(dev.expert_s(shape, num_tokens=t), recompute)
            fwd, bwd = fwd + f, bwd + b
    return fwd, bwd


def owner_rows(placement, *, num_layers: int, num_experts: int, world_size: int) -> tuple[tuple[int, ...], ...]:
    """An explicit placement as owner[layer][expert] = global rank rows, checked against the setup.

    Accepts the runtime's `ExpertPlacement.owner` ({MoE layer: row}, rows taken in ascending layer order, so
    the i-th MoE layer is the planner's layer i), a sequence of rows, or an `ExpertPlacement` /
    `asym_ea.Placement`. Ranks are the planner's: attention ranks 0..M-1, expert ranks M..W-1.
    """
    if hasattr(placement, "owner_rows"):  # planner.asym_ea.Placement
        rows = placement.owner_rows()
    else:
        if hasattr(placement, "owner"):  # hf_hetermoe.placement.ExpertPlacement
            placement = placement.owner
        rows = tuple(placement[k] for k in sorted(placement)) if isinstance(placement, dict) else tuple(placement)
    rows = tuple(tuple(int(r) for r in row) for row in rows)
    if len(rows) != num_layers:
        raise ValueError(f"planner: the placement has {len(rows)} layers but the model has {num_layers} MoE layers. "
                         "Give one owner row per MoE layer.")
    for layer, row in enumerate(rows):
        if len(row) != num_experts:
            raise ValueError(f"planner: placement layer {layer} names owners of {len(row)} experts; the model has "
                             f"{num_experts}. Give one owner (global rank) per expert.")
        bad = sorted({r for r in row if not 0 <= r < world_size})
        if bad:
            raise ValueError(f"planner: placement layer {layer} names rank(s) {bad}, outside the cluster's "
                             f"{world_size} ranks (attention 0..M-1, then experts).")
    return rows


def zebra_costs(setup: Setup, r: int, offloads: list[int] | None = None, *,
                placement=None) -> ZebraCosts:
    """Disaggregated costs for R = r micro-batches, with Asym-EA offloads o_l (None: no Asym-EA) or an explicit
    `placement` (owner[layer][expert] = global rank, see `owner_rows`; not with `offloads`).

    Every holder's expert time comes from its own experts' routing shares on its own device; the busiest
    expert rank (and the busiest attention rank, for experts held there) paces its group.
    """
    from .asym_ea import placement_from_offloads  # asym_ea imports this module

    c, shape, S = setup.cluster, setup.shape, setup.seq_len
    m, n_exp, n, k = c.num_attention, c.num_expert, shape.num_experts, shape.top_k
    hb = shape.hidden_size * shape.bytes_per_element
    seqs = setup.microbatch_seqs(r)
    ck = setup.checkpointing
    attention_ranks, expert_ranks = tuple(range(m)), tuple(range(m, m + n_exp))
    if placement is not None:
        if offloads is not None:
            raise ValueError("planner: give Asym-EA `offloads` or an explicit `placement`, not both.")
        owners = owner_rows(placement, num_layers=shape.num_layers, num_experts=n, world_size=c.world_size)
    else:
        offloads = offloads or [0] * shape.num_layers
        check_offloads(setup, offloads)
        owners = placement_from_offloads(num_experts=n, attention_ranks=attention_ranks,
                                         expert_ranks=expert_ranks, offloads=offloads).owner_rows()

    # Every attention rank gets the same stripe (the stock Trainer's equal per-device batch): the slowest paces.
    attn = [paced(c.attention_devices, lambda d: _train(d.attention_s(shape, num_seqs=s, seq_len=S), ck)) for s in seqs]
    head = [paced(c.attention_devices, lambda d: _train(d.head_s(shape, num_tokens=s * S), False)) for s in seqs]
    attn_f = [[a[0] for a in attn] for _ in range(shape.num_layers)] + [[h[0] for h in head]]
    attn_b = [[a[1] for a in attn] for _ in range(shape.num_layers)] + [[h[1] for h in head]]
    exp_f, exp_b, xa_f, xa_b, dispatch, combine = [], [], [], [], [], []
    for layer in range(shape.num_layers):
        shares = setup.routing.layer_shares(layer, n)
        held: dict[int, list[int]] = {rank: [] for rank in attention_ranks + expert_ranks}
        for expert, rank in enumerate(owners[layer]):
            held[rank].append(expert)
        share = {rank: sum(shares[e] for e in experts) for rank, experts in held.items()}
        moved = any(held[rank] for rank in attention_ranks)
        rows = {"ef": [], "eb": [], "xf": [], "xb": [], "d": [], "c": []}
        for s in seqs:
            copies = k * s * S  # C_j, from one attention GPU
            routed = m * copies  # the micro-batch's copies over all attention GPUs
            on_e = max((_experts_s(c.device_of(x), shape, [routed * shares[e] for e in held[x]], ck)
                        for x in expert_ranks), key=lambda t: t[0] + t[1])
            on_a = (max((_experts_s(c.device_of(x), shape, [routed * shares[e] for e in held[x]], ck)
                         for x in attention_ranks), key=lambda t: t[0] + t[1]) if moved else (0.0, 0.0))
            rows["ef"].append(on_e[0])
            rows["eb"].append(on_e[1])
            rows["xf"].append(on_a[0])
            rows["xb"].append(on_a[1])
            own_min = min(share[x] for x in attention_ranks)
            own_max = max(share[x] for x in attention_ranks)
            loads: Loads = {
                (ATTN, "send"): copies * (1 - own_min) * hb,  # everything but the copies for its own experts
                (ATTN, "recv"): (m - 1) * copies * own_max * hb,  # other attention GPUs' copies for its experts
                (EXP, "recv"): max(routed * share[x] for x in expert_ranks) * hb,
                (EXP, "send"): 0.0,
            }
            rows["d"].append(loads)
            rows["c"].append({(g, {"send": "recv", "recv": "send"}[d]): v for (g, d), v in loads.items()})
        for key, target in (("ef", exp_f), ("eb", exp_b), ("xf", xa_f), ("xb", xa_b), ("d", dispatch), ("c", combine)):
            target.append(rows[key])
    return ZebraCosts(attn_f=attn_f, attn_b=attn_b, exp_f=exp_f, exp_b=exp_b, xa_f=xa_f, xa_b=xa_b,
                      dispatch=dispatch, combine=combine)


def colocated_costs(setup: Setup, groups: dict[str, tuple[int, DeviceCosts]], seqs_per_gpu: float) -> ColocatedCosts:
    """EP over `groups` {name: (count, device)}: every GPU gets `seqs_per_gpu` sequences and n/W experts.

    Fractional expert counts and sequence counts are allowed: they stand for the average GPU, which gives EP
    the benefit of the doubt when n or B does not divide by W.
    """
    shape, S, k, n = setup.shape, setup.seq_len, setup.shape.top_k, setup.shape.num_experts
    hb = shape.hidden_size * shape.bytes_per_element
    world = sum(count for count, _ in groups.values())
    tokens = seqs_per_gpu * S
    per_expert = world * k * tokens / n
    ck = setup.checkpointing
    skewed = not setup.routing.is_uniform and n % world == 0  # whole experts per GPU: GPU g holds [g q, (g+1) q)
    q = n // world
    attn_f, attn_b, exp_f, exp_b = {}, {}, {}, {}
    first = 0  # global index of the group's first GPU
    # per group and layer: the largest and smallest share of the copies one of its GPUs' experts receive
    busiest: dict[str, list[float]] = {}
    idlest: dict[str, list[float]] = {}
    for name, (count, dev) in groups.items():
        a = _train(dev.attention_s(shape, num_seqs=seqs_per_gpu, seq_len=S), ck)
        hd = _train(dev.head_s(shape, num_tokens=tokens), False)
        attn_f[name] = [a[0]] * shape.num_layers + [hd[0]]
        attn_b[name] = [a[1]] * shape.num_layers + [hd[1]]
        if not skewed:
            e = _train(dev.expert_s(shape, num_tokens=per_expert), ck)
            exp_f[name] = [n / world * e[0]] * shape.num_layers
            exp_b[name] = [n / world * e[1]] * shape.num_layers
            busiest[name] = idlest[name] = [1 / world] * shape.num_layers
        else:
            exp_f[name], exp_b[name], busiest[name], idlest[name] = [], [], [], []
            routed = world * k * tokens
            for layer in range(shape.num_layers):
                shares = setup.routing.layer_shares(layer, n)
                gpus = [shares[g * q:(g + 1) * q] for g in range(first, first + count)]
                f, b = max((_experts_s(dev, shape, [routed * x for x in held], ck) for held in gpus),
                           key=lambda t: t[0] + t[1])
                exp_f[name].append(f)
                exp_b[name].append(b)
                busiest[name].append(max(sum(held) for held in gpus))
                idlest[name].append(min(sum(held) for held in gpus))
        first += count
    alltoall = []
    for layer in range(shape.num_layers):
        loads: Loads = {}
        for g in groups:
            # all copies except those for its own experts leave; every other GPU sends its share for them in
            loads[(g, "send")] = k * tokens * (1 - idlest[g][layer]) * hb
            loads[(g, "recv")] = k * tokens * (world - 1) * busiest[g][layer] * hb
        alltoall.append(loads)
    return ColocatedCosts(groups=tuple(groups), attn_f=attn_f, attn_b=attn_b, exp_f=exp_f, exp_b=exp_b,
                          alltoall=alltoall)


def iteration_work(setup: Setup, device: DeviceCosts) -> tuple[float, float]:
    """(attention seconds, expert seconds) for ONE GPU of `device` to do the whole batch's work alone.

    Each module is costed as one piece per layer; every cost function is affine or a roofline max, so any
    split of that work costs at least its share (the lower bound relies on this).
    """
    shape, S, B, ck = setup.shape, setup.seq_len, setup.global_batch, setup.checkpointing
    attn = sum(_train(device.attention_s(shape, num_seqs=B, seq_len=S), ck)) * shape.num_layers
    attn += sum(_train(device.head_s(shape, num_tokens=B * S), False))
    per_expert = shape.top_k * B * S / shape.num_experts
    exp = sum(_train(device.expert_s(shape, num_tokens=per_expert), ck)) * shape.num_experts * shape.num_layers
    return attn, exp
