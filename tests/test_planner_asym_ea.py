"""Planner: Algorithm 1 (gather and squeeze), its memory bounds, and the placement it implies.

Figure 6 of the paper: expert compute 33% slower than attention (4 vs 3 time units per micro-batch), three
micro-batches, three MoE layers, six experts per expert GPU, V100-like experts on the attention GPU at 0.8x
(3.2 units for a whole expert GPU's share). No communication, so the picture is the paper's.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.planner.asym_ea import (Placement, chunk_sizes, gather_and_squeeze, offloads_to_config,
                                         placement_from_offloads)
from hf_hetermoe.planner.schedules import ATTN, EXP, ZebraCosts, build_zebra
from hf_hetermoe.planner.simulator import GroupSpec, SimResult, simulate

FIG6 = dict(num_experts=6, num_layers=3, num_attention=1, num_expert=1, t_attn=3.0, t_exp_on_expert=4.0,
            t_exp_on_attention=3.2)


def figure6(offloads: list[int], r: int = 3) -> SimResult:
    n, a, e, ea = FIG6["num_experts"], FIG6["t_attn"], FIG6["t_exp_on_expert"], FIG6["t_exp_on_attention"]
    layers = len(offloads)
    costs = ZebraCosts(
        attn_f=[[a] * r for _ in range(layers)] + [[0.0] * r], attn_b=[[2 * a] * r for _ in range(layers)] + [[0.0] * r],
        exp_f=[[e * (n - o) / n] * r for o in offloads], exp_b=[[2 * e * (n - o) / n] * r for o in offloads],
        xa_f=[[ea * o / n] * r for o in offloads], xa_b=[[2 * ea * o / n] * r for o in offloads],
        dispatch=[[{}] * r for _ in range(layers)], combine=[[{}] * r for _ in range(layers)],
    )
    groups = {ATTN: GroupSpec(count=1, link_bytes_per_s=1.0), EXP: GroupSpec(count=1, link_bytes_per_s=1.0)}
    return simulate(build_zebra(costs), groups)


def forward_span(sim: SimResult) -> tuple[float, float]:
    return 0.0, max(sim.end[t.id] for t in sim.graph.tasks if t.kind.endswith("_f"))


def test_algorithm1_offloads_one_expert_in_layers_2_and_3_only():
    assert gather_and_squeeze(**FIG6) == [0, 1, 1]


def test_figure6_attention_is_busy_75_percent_under_zp():
    sim = figure6([0, 0, 0])
    # Steady state: while the expert GPU works through one layer (E^F[2,1] .. E^F[2,3]), attention is busy 9 of 12.
    window = (sim.start[sim.graph.by_name("E^F[2,1]").id], sim.end[sim.graph.by_name("E^F[2,3]").id])
    assert window[1] - window[0] == pytest.approx(12.0)
    assert sim.utilisation(ATTN, window) == pytest.approx(0.75)


def test_figure6_placement_removes_60_percent_of_bubbles_and_is_10_percent_faster():
    zp, asym = figure6([0, 0, 0]), figure6(gather_and_squeeze(**FIG6))
    span_zp, span_asym = forward_span(zp)[1], forward_span(asym)[1]
    bubbles_zp, bubbles_asym = zp.bubble(ATTN, forward_span(zp)), asym.bubble(ATTN, forward_span(asym))
    assert 1 - bubbles_asym / bubbles_zp == pytest.approx(0.60, abs=0.05)
    assert 1 - span_asym / span_zp == pytest.approx(0.10, abs=0.02)
    assert asym.makespan < zp.makespan  # and the whole iteration gains too


def test_figure6_also_moving_layer_1_gains_little_and_idles_the_expert_gpu():
    algo, every = figure6([0, 1, 1]), figure6([1, 1, 1])
    zp = figure6([0, 0, 0])
    gain_algo = forward_span(zp)[1] - forward_span(algo)[1]
    gain_extra = forward_span(algo)[1] - forward_span(every)[1]
    assert 0 <= gain_extra < gain_algo / 3
    # Steady state with every layer offloaded: one attention period (A^F[2,1] -> A^F[3,1]), experts idle ~6%.
    window = (every.start[every.graph.by_name("A^F[2,1]").id], every.start[every.graph.by_name("A^F[3,1]").id])
    assert 1 - every.utilisation(EXP, window) == pytest.approx(0.06, abs=0.01)


def test_no_bubble_means_no_offload():
    assert gather_and_squeeze(**{**FIG6, "t_attn": 4.0}) == [0, 0, 0]
    assert gather_and_squeeze(**{**FIG6, "t_attn": 5.0}) == [0, 0, 0]


def test_gpu_counts_must_be_multiples_and_the_error_names_both():
    with pytest.raises(ValueError, match=r"4 attention GPUs and 6 expert GPUs"):
        gather_and_squeeze(**{**FIG6, "num_experts": 12, "num_attention": 4, "num_expert": 6})


def test_chunk_sizes():
    assert chunk_sizes(num_attention=2, num_expert=6) == (3, 1)  # each attention GPU takes 3, each expert GPU gives 1
    assert chunk_sizes(num_attention=6, num_expert=3) == (1, 2)
    assert chunk_sizes(num_attention=4, num_expert=4) == (1, 1)


def test_memory_upper_bound_caps_the_total_and_lower_bound_forces_moves():
    big_bubble = {**FIG6, "t_exp_on_expert": 12.0, "t_exp_on_attention": 4.0}
    free = gather_and_squeeze(**big_bubble)
    assert sum(free) > 2
    assert sum(gather_and_squeeze(**big_bubble, n_max=2)) <= 2
    # No bubble at all, but the expert GPU cannot hold all 18 experts: at least 3 must move.
    forced = gather_and_squeeze(**{**FIG6, "t_attn": 6.0}, n_min=3)
    assert sum(forced) >= 3
    with pytest.raises(ValueError, match="at least 5"):
        gather_and_squeeze(**FIG6, n_min=5, n_max=4)


@settings(max_examples=60, deadline=None)
@given(m_n=st.sampled_from([(1, 1), (2, 6), (6, 3), (4, 8), (6, 6), (8, 2)]), per_gpu=st.integers(1, 6),
       layers=st.integers(1, 8), t_attn=st.floats(0.1, 10), t_exp=st.floats(0.1, 10), t_xa=st.floats(0.05, 10),
       n_min=st.integers(0, 6), n_max=st.integers(0, 30))
def test_offload_counts_respect_every_bound(m_n, per_gpu, layers, t_attn, t_exp, t_xa, n_min, n_max):
    m, n_exp = m_n
    n1, n2 = chunk_sizes(num_attention=m, num_expert=n_exp)
    per_gpu *= n2  # a chunk must fit in one layer
    kwargs = dict(num_experts=per_gpu * n_exp, num_layers=layers, num_attention=m, num_expert=n_exp, t_attn=t_attn,
                  t_exp_on_expert=t_exp, t_exp_on_attention=t_xa, n_min=n_min, n_max=n_max)
    try:
        out = gather_and_squeeze(**kwargs)
    except ValueError:
        assert n_min > 0  # only a memory floor can make it infeasible
        return
    assert len(out) == layers
    assert all(0 <= o <= per_gpu and o % n2 == 0 for o in out)
    assert n_min <= sum(out) <= n_max
    if t_attn >= t_exp and n_min == 0:
        assert out == [0] * layers


@settings(max_examples=60, deadline=None)
@given(m_n=st.sampled_from([(1, 1), (2, 6), (6, 3), (4, 8), (6, 6), (3, 6)]), per_gpu=st.integers(1, 4),
       data=st.data())
def test_placement_moves_whole_experts_without_replication(m_n, per_gpu, data):
    m, n_exp = m_n
    n1, n2 = chunk_sizes(num_attention=m, num_expert=n_exp)
    q = per_gpu * n2
    offloads = data.draw(st.lists(st.integers(0, q // n2).map(lambda c: c * n2), min_size=1, max_size=4))
    att, exp = tuple(range(m)), tuple(range(m, m + n_exp))
    p = placement_from_offloads(num_experts=q * n_exp, attention_ranks=att, expert_ranks=exp, offloads=offloads)
    for layer, o in enumerate(offloads):
        owners = p.owners[layer]
        assert sorted(owners) == list(range(q * n_exp))  # every expert exactly once
        counts = p.counts(layer)
        assert all(counts.get(r, 0) == q - o for r in exp)
        assert all(counts.get(r, 0) == o * n_exp // m for r in att)
        held = [set(p.experts_on(r, layer)) for r in att]
        assert sum(len(h) for h in held) == len(set().union(*held))  # different experts on each attention rank
    assert Placement.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert len(p.owner_rows()) == len(offloads)


def test_default_placement_is_the_even_contiguous_split():
    p = placement_from_offloads(num_experts=12, attention_ranks=(0, 1), expert_ranks=(2, 3, 4), offloads=[0, 2])
    assert p.owner_rows()[0] == (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
    assert p.owner_rows()[1] == (2, 2, 0, 0, 3, 3, 0, 1, 4, 4, 1, 1)


def test_offloads_become_a_valid_hetermoe_config():
    assert offloads_to_config([0, 0]) == "off"
    cfg = HeterMoEConfig(attention_ranks=(0, 1), expert_ranks=(2, 3), asym_ea=offloads_to_config([0, 1, 2]))
    assert cfg.asym_ea == {1: 1, 2: 2}
