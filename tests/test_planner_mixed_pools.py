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
    # a job whose expert ranks come first: renumbered into the planner's ranks
    from hf_hetermoe.planner.workload import runtime_rows

    swapped = {layer: tuple({0: 2, 1: 3, 2: 0, 3: 1}[x] for x in row) for layer, row in enumerate(rows)}
    assert runtime_rows(swapped, attention_ranks=(2, 3), expert_ranks=(0, 1)) == rows


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


# ---- clusters of several kinds -------------------------------------------------------------------------------
def test_three_kinds_the_newest_attends_and_each_rank_keeps_its_device():
    c = parse_cluster("4xV100,2xA100,4xT4")
    assert (c.num_attention, c.num_expert, c.world_size) == (2, 8, 10)
    assert [d.name for d in c.devices] == ["A100"] * 2 + ["V100"] * 4 + ["T4"] * 4
    assert c.device_of(6).name == "T4" and c.mixed_expert and not c.mixed_attention
    assert c.labels == ("2xA100", "4xV100+4xT4")
    with pytest.raises(ValueError, match="mixes V100, T4"):
        c.expert  # noqa: B018 - code that assumes one expert kind is told so
    assert c.attention.name == "A100"


def test_explicit_roles_allow_mixed_attention_kinds():
    c = parse_cluster("attention:2xA100,2xA40;experts:4xV100")
    assert [d.name for d in c.attention_devices] == ["A100", "A100", "A40", "A40"]
    assert c.mixed_attention and not c.mixed_expert and c.expert.name == "V100"
    older = parse_cluster("attention:2xV100;experts:2xA100")  # roles as written, whatever the generations
    assert (older.attention.name, older.expert.name) == ("V100", "A100")


def test_each_rank_is_charged_on_its_own_device():
    """Expert ranks: each holder's experts on its own GPU; attention ranks: the slowest kind paces (equal batch)."""
    shape = resolve_model("D1")
    mixed = Setup(cluster=parse_cluster("2xA40,1xV100,1xT4"), shape=shape, seq_len=8192, global_batch=8)
    per_expert = 2 * shape.top_k * 2 * 8192 / shape.num_experts  # R = 2: 2 sequences per stripe
    from hf_hetermoe.planner.profiles import BUILTIN_GPUS

    t4 = BUILTIN_GPUS["T4"].expert_s(shape, num_tokens=per_expert)[0]
    v100 = BUILTIN_GPUS["V100"].expert_s(shape, num_tokens=per_expert)[0]
    assert zebra_costs(mixed, 2).exp_f[0][0] == pytest.approx(12 * t4)  # even: the T4's 12 experts pace
    rows = [tuple([2] * 18 + [3] * 6)] * 8
    assert zebra_costs(mixed, 2, placement=rows).exp_f[0][0] == pytest.approx(max(18 * v100, 6 * t4))
    att = Setup(cluster=parse_cluster("attention:1xA100,1xA40;experts:2xV100"), shape=shape, seq_len=8192,
                global_batch=8)
    a40 = BUILTIN_GPUS["A40"].attention_s(shape, num_seqs=2, seq_len=8192)[0]
    assert zebra_costs(att, 2).attn_f[0][0] == pytest.approx(a40)  # the A40, not the A100, sets the pace


# ---- the proportional split ----------------------------------------------------------------------------------
def test_split_counts_largest_remainder_caps_and_the_even_case():
    from hf_hetermoe.placement import ExpertPlacement, split_counts

    assert split_counts(4, [2, 1]) == (3, 1)
    assert split_counts(10, [1, 1, 1]) == (4, 3, 3)  # ties: the earlier rank
    assert split_counts(24, [2.8, 1]) == (18, 6)
    assert split_counts(8, [1, 0, 1]) == (4, 0, 4)
    assert split_counts(24, [5, 1, 1], caps=[6, 100, 100]) == (6, 9, 9)  # memory caps the fast rank
    even = ExpertPlacement.even(layers=(1, 3), num_experts=24, host_ranks=(2, 3, 4))
    assert ExpertPlacement.weighted(layers=(1, 3), num_experts=24, host_ranks=(2, 3, 4), weights=[7, 7, 7]) == even
    weighted = ExpertPlacement.weighted(layers=(1,), num_experts=6, host_ranks=(2, 3), weights=[2, 1])
    assert weighted.owner[1] == (2, 2, 2, 2, 3, 3)  # contiguous blocks in expert order
    for bad, needle in (([1, -1], ">= 0"), ([0, 0], "not all 0"), ([float("nan"), 1], "finite")):
        with pytest.raises(ValueError, match=needle):
            split_counts(4, bad)
    with pytest.raises(ValueError, match="fit 4 experts"):
        split_counts(8, [1, 1], caps=[2, 2])


def test_the_plan_picks_proportional_on_a_v100_t4_pool(tmp_path, capsys):
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.planner.plan_cli import main_plan
    from hf_hetermoe.planner.planning import make_plan
    from hf_hetermoe.planner.pools import proportional_counts

    setup = Setup(cluster=parse_cluster("2xA40,2xV100,2xT4"), shape=resolve_model("D1"), seq_len=8192,
                  global_batch=8)
    plan = make_plan(setup, max_microbatches=4)
    assert plan.chosen.strategy == "ZP+proportional"
    assert plan.results["ZP+proportional"].iteration_s < 0.9 * plan.results["ZP"].iteration_s
    split = plan.chosen.split
    assert sum(split) == 24 and split[0] == split[1] > split[2] == split[3]  # V100s hold more than T4s
    assert split == proportional_counts(setup, plan.chosen.microbatches)
    assert "ZP+Asym-EA" in plan.problems and "one kind" in plan.problems["ZP+Asym-EA"]
    assert plan.config.expert_split == tuple(float(x) for x in split) and plan.config.asym_ea == "off"
    rows = plan.placement.owner_rows()
    assert [rows[0].count(r) for r in (2, 3, 4, 5)] == list(split)
    # The CLI prints it and writes a config the runtime accepts.
    assert main_plan(["--cluster", "2xA40,2xV100,2xT4", "--model", "D1", "--seq-len", "8192", "--global-batch", "8",
                      "--max-microbatches", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ZP+proportional *" in out and "rank 4 (T4)" in out and "not applicable" in out
    cfg = HeterMoEConfig.from_yaml(tmp_path / "hetermoe_plan.yaml")
    assert cfg.expert_split == tuple(float(x) for x in split) and cfg.expert_ranks == (2, 3, 4, 5)
    # `hetermoe simulate --config` reads the split back and predicts the same iteration.
    from hf_hetermoe.planner.plan_cli import main_simulate

    assert main_simulate(["--cluster", "2xA40,2xV100,2xT4", "--model", "D1", "--seq-len", "8192", "--global-batch",
                          "8", "--config", str(tmp_path / "hetermoe_plan.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"{plan.chosen.iteration_s:.3f}" in out and f"per expert GPU: {list(split)}" in out


def test_mixed_attention_kinds_keep_asym_ea_and_say_what_they_assume(tmp_path, capsys):
    from hf_hetermoe.planner.plan_cli import main_plan

    assert main_plan(["--cluster", "attention:1xA100,1xA40;experts:2xV100", "--model", "D1", "--seq-len", "8192",
                      "--max-microbatches", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "same batch share" in out and "slowest" in out and "ZP+proportional" not in out


def test_experts_that_do_not_divide_over_a_mixed_pool_still_split_by_weight():
    from hf_hetermoe.planner.planning import make_plan

    setup = Setup(cluster=parse_cluster("2xA40,2xV100,3xT4"), shape=resolve_model("D1"), seq_len=8192,
                  global_batch=8)  # 24 experts over 5 expert GPUs
    plan = make_plan(setup, max_microbatches=2)
    assert "even split needs the 5 expert GPUs" in plan.problems["ZP"]
    assert plan.chosen.strategy == "ZP+proportional" and sum(plan.chosen.split) == 24

