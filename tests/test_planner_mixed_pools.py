"""Planner: explicit placements in the simulator, clusters of several GPU kinds, the proportional expert split."""

from __future__ import annotations

import pytest

from hf_hetermoe.planner.asym_ea import placement_from_offloads
from hf_hetermoe.planner.cluster import parse_cluster
from hf_hetermoe.planner.presets import resolve_model
from hf_hetermoe.planner.routing import zipf
from hf_hetermoe.planner.strategies import simulate_zebra
from hf_hetermoe.planner.workload import Setup, zebra_costs


def _setup(cluster: str = "2xA40,2xV100", **kw) -> Setup:
    return Setup(cluster=parse_cluster(cluster), shape=resolve_model("D1"), seq_len=8192, global_batch=8, **kw)


@pytest.mark.parametrize("routing", [None, "zipf"])
def test_an_explicit_placement_simulates_like_the_same_offloads(routing):
    kw = {} if routing is None else {"routing": zipf(1.2, num_layers=8, num_experts=24)}
    setup = _setup(**kw)
    offloads = [0, 2, 0, 4, 0, 2, 0, 0]
    rows = placement_from_offloads(num_experts=24, attention_ranks=(0, 1), expert_ranks=(2, 3),
                                   offloads=offloads).owner_rows()
    by_offloads = simulate_zebra(setup, 2, offloads).makespan
    assert simulate_zebra(setup, 2, placement=rows).makespan == by_offloads
    # the runtime's ExpertPlacement.owner layout: {MoE layer: row}, any layer numbers, in ascending order
    owner = {10 + 3 * i: row for i, row in enumerate(rows)}
    assert simulate_zebra(setup, 2, placement=owner).makespan == by_offloads
    assert zebra_costs(setup, 2, placement=rows) == zebra_costs(setup, 2, offloads)


def test_an_explicit_placement_charges_each_holder_its_own_experts():
    setup = _setup()
    even = [tuple(2 + e // 12 for e in range(24))] * 8
    lopsided = [tuple(2 if e < 18 else 3 for e in range(24))] * 8  # rank 2 holds 18 experts, rank 3 holds 6
    assert zebra_costs(setup, 2, placement=lopsided).exp_f[0][0] == pytest.approx(
        1.5 * zebra_costs(setup, 2, placement=even).exp_f[0][0])
    assert simulate_zebra(setup, 2, placement=lopsided).makespan > simulate_zebra(setup, 2, placement=even).makespan


@pytest.mark.parametrize("bad,needle", [([(2,) * 24] * 7, "7 layers"), ([(2,) * 23] * 8, "23 experts"),
                                        ([(4,) * 24] * 8, r"rank\(s\) \[4\]")])
def test_a_bad_explicit_placement_is_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        zebra_costs(_setup(), 2, placement=bad)
    with pytest.raises(ValueError, match="not both"):
        zebra_costs(_setup(), 2, [0] * 8, placement=[(2,) * 24] * 8)
