"""From a setup (cluster, model, sequence length, global batch) to the simulator's per-task costs.

Legend: B global batch (sequences), S sequence length, M / N attention / expert GPUs, W = M + N, n experts per
layer, k top-k, h hidden size, b bytes per element, L = MoE layers + 1 attention stages (Theorem 1), R
micro-batches, s_j sequences of micro-batch j on one attention GPU, T_j = s_j S its tokens, C_j = k T_j its
routed token copies, P_j = M C_j / n the copies one expert receives, o_l experts each expert GPU gives up at
MoE layer l (Asym-EA), e_l = n/N - o_l experts left on an expert GPU, a_l = o_l N / M experts on an
attention GPU.

Routing is assumed uniform (the paper's profiler assumes the same). Experts are computed one after another
(a loop over local experts), so a GPU's expert time is its expert count times one expert's time. With
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
from .schedules import ATTN, EXP, ColocatedCosts, Loads, ZebraCosts


@dataclass(frozen=True, kw_only=True)
class Setup:
    cluster: ClusterSpec
    shape: ModelShape
    seq_len: int  # S
    global_batch: int  # B, sequences per iteration
    checkpointing: bool = True

    def __post_init__(self) -> None:
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


def zebra_costs(setup: Setup, r: int, offloads: list[int] | None = None) -> ZebraCosts:
    """Disaggregated costs for R = r micro-batches and Asym-EA offloads o_l (None: no Asym-EA)."""
    c, shape, S = setup.cluster, setup.shape, setup.seq_len
    m, n_exp, n, k = c.num_attention, c.num_expert, shape.num_experts, shape.top_k
    hb = shape.hidden_size * shape.bytes_per_element
    dev_a, dev_e = c.attention.device, c.expert.device
    offloads = offloads or [0] * shape.num_layers
    check_offloads(setup, offloads)
    seqs = setup.microbatch_seqs(r)
    ck = setup.checkpointing

    attn = [_train(dev_a.attention_s(shape, num_seqs=s, seq_len=S), ck) for s in seqs]
    head = [_train(dev_a.head_s(shape, num_tokens=s * S), False) for s in seqs]
    attn_f = [[a[0] for a in attn] for _ in range(shape.num_layers)] + [[h[0] for h in head]]
    attn_b = [[a[1] for a in attn] for _ in range(shape.num_layers)] + [[h[1] for h in head]]
    exp_f, exp_b, xa_f, xa_b, dispatch, combine = [], [], [], [], [], []
    for o in offloads:
        e_l, a_l = n // n_exp - o, o * n_exp / m
        rows = {"ef": [], "eb": [], "xf": [], "xb": [], "d": [], "c": []}
        for s in seqs:
            copies = k * s * S  # C_j
            per_expert = m * copies / n  # P_j
            on_e = _train(dev_e.expert_s(shape, num_tokens=per_expert), ck)
            on_a = _train(dev_a.expert_s(shape, num_tokens=per_expert), ck) if a_l else (0.0, 0.0)
            rows["ef"].append(e_l * on_e[0])
            rows["eb"].append(e_l * on_e[1])
            rows["xf"].append(a_l * on_a[0])
            rows["xb"].append(a_l * on_a[1])
            loads: Loads = {
                (ATTN, "send"): copies * (1 - a_l / n) * hb,  # everything but the copies for its own experts
                (ATTN, "recv"): (m - 1) * copies * a_l / n * hb,  # other attention GPUs' copies for its experts
                (EXP, "recv"): e_l * per_expert * hb,
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
    attn_f, attn_b, exp_f, exp_b = {}, {}, {}, {}
    for name, (_, dev) in groups.items():
        a = _train(dev.attention_s(shape, num_seqs=seqs_per_gpu, seq_len=S), ck)
        hd = _train(dev.head_s(shape, num_tokens=tokens), False)
        e = _train(dev.expert_s(shape, num_tokens=per_expert), ck)
        attn_f[name] = [a[0]] * shape.num_layers + [hd[0]]
        attn_b[name] = [a[1]] * shape.num_layers + [hd[1]]
        exp_f[name] = [n / world * e[0]] * shape.num_layers
        exp_b[name] = [n / world * e[1]] * shape.num_layers
    moved = k * tokens * (world - 1) / world * hb  # all copies except those for its own experts
    loads: Loads = {(g, d): moved for g in groups for d in ("send", "recv")}
    return ColocatedCosts(groups=tuple(groups), attn_f=attn_f, attn_b=attn_b, exp_f=exp_f, exp_b=exp_b,
                          alltoall=[loads] * shape.num_layers)


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
