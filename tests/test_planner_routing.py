"""Planner: routing skew (uniform, Zipf, the runtime's logged counts) sets each all-to-all's busiest holder."""

from __future__ import annotations

import json

import pytest

from hf_hetermoe.planner.cluster import parse_cluster
from hf_hetermoe.planner.plan_cli import main_simulate
from hf_hetermoe.planner.presets import resolve_model
from hf_hetermoe.planner.routing import UNIFORM, Routing, parse_routing, write_counts, zipf
from hf_hetermoe.planner.schedules import ATTN, EXP
from hf_hetermoe.planner.strategies import run_ep, simulate_zebra
from hf_hetermoe.planner.workload import Setup, zebra_costs


def _setup(routing: Routing = UNIFORM, cluster: str = "2xA40,2xV100") -> Setup:
    return Setup(cluster=parse_cluster(cluster), shape=resolve_model("D1"), seq_len=8192, global_batch=8,
                 routing=routing)


def test_uniform_shares_reproduce_the_expert_count_times_one_expert():
    setup = _setup()
    costs = zebra_costs(setup, 2)
    shape, dev = setup.shape, setup.cluster.expert.device
    per_expert = 2 * shape.top_k * 2 * 8192 / shape.num_experts  # 2 attention GPUs x C_j / n
    one = dev.expert_s(shape, num_tokens=per_expert)
    assert costs.exp_f[0][0] == pytest.approx(12 * one[0])
    assert costs.dispatch[0][0][(EXP, "recv")] == pytest.approx(12 * per_expert * shape.hidden_size * 2)


def test_the_busiest_holder_sets_compute_and_bytes():
    n, layers = 24, 8
    hot = tuple([3.0 / n] * 12 + [1.0 / n] * 12)  # expert GPU 0 (experts 0-11) gets 3/4 of the copies
    hot = tuple(x / sum(hot) for x in hot)
    skewed = _setup(Routing(name="hot", shares=(hot,) * layers))
    uni, skw = zebra_costs(_setup(), 2), zebra_costs(skewed, 2)
    assert skw.exp_f[0][0] > 1.4 * uni.exp_f[0][0]  # 1.5x the rows on the busiest V100 (minus launch overheads)
    assert skw.dispatch[0][0][(EXP, "recv")] == pytest.approx(1.5 * uni.dispatch[0][0][(EXP, "recv")])
    assert simulate_zebra(skewed, 2).makespan > 1.1 * simulate_zebra(_setup(), 2).makespan
    assert run_ep(skewed).iteration_s > run_ep(_setup()).iteration_s


def test_zipf_is_normalised_shuffled_and_steeper_with_the_exponent():
    mild, steep = (zipf(s, num_layers=8, num_experts=24) for s in (0.5, 1.5))
    for routing in (mild, steep):
        assert all(sum(row) == pytest.approx(1) for row in routing.shares)
        assert routing.shares[0] != routing.shares[1]  # each layer has its own hot experts
    assert max(steep.shares[0]) > max(mild.shares[0])
    assert simulate_zebra(_setup(steep), 2).makespan > simulate_zebra(_setup(mild), 2).makespan


def test_logged_counts_round_trip_through_the_planner_cli(tmp_path, capsys):
    counts = {layer: [10] * 12 + [30] * 12 for layer in range(8)}
    write_counts(str(tmp_path), 0, counts)
    write_counts(str(tmp_path), 1, counts)
    routing = parse_routing(str(tmp_path), num_layers=8, num_experts=24)
    assert routing.shares[0][0] == pytest.approx(20 / (2 * 480))  # two ranks' files summed
    argv = ["--cluster", "2xA40,2xV100", "--model", "D1", "--seq-len", "8192", "--strategy", "zp",
            "--microbatches", "2"]
    assert main_simulate(argv + ["--routing", str(tmp_path)]) == 0
    assert main_simulate(argv + ["--routing", "zipf:1.2"]) == 0
    out = capsys.readouterr().out
    assert f"routing  {tmp_path.name}" in out and "routing  zipf:1.2" in out


@pytest.mark.parametrize("text, needle", [("zipf:x", "zipf:S"), ("zipf:-1", "positive"),
                                           ("/no/such/file.json", "existing routing log")])
def test_bad_routing_is_a_clear_value_error(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_routing(text, num_layers=8, num_experts=24)


def test_a_log_of_another_model_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"layers": {"0": [1, 2, 3]}}))
    with pytest.raises(ValueError, match="8 MoE layers x 24 experts"):
        parse_routing(str(path), num_layers=8, num_experts=24)
