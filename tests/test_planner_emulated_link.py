"""The emulated link and the routing log, end to end: an emulated run's exchanges take the planner's link time,
and the counts it logs are what `--routing` reads."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from hf_hetermoe.planner.cluster import parse_cluster
from hf_hetermoe.planner.presets import resolve_model
from hf_hetermoe.planner.routing import parse_routing
from hf_hetermoe.planner.strategies import simulate_zebra
from hf_hetermoe.planner.workload import Setup
from tests._dist import spawn
from tests._zebra_jobs import train_each

EMULATION = {"devices": ["A40", "V100"], "model": "D1", "seq_len": 16384}
LAYERS, BATCH, R = 4, 4, 2


def _iteration(result) -> float:
    ends = result["step_ends"]
    return statistics.mean(b - a for a, b in zip(ends[1:], ends[2:]))


def _predicted(link_gbps: float, routing) -> float:
    shape = dataclasses.replace(resolve_model("D1"), num_layers=LAYERS)  # D1's per-layer costs, the test's depth
    setup = Setup(cluster=parse_cluster("1xA40,1xV100", link_gbps=link_gbps), shape=shape, seq_len=16384,
                  global_batch=BATCH, checkpointing=False, routing=routing)
    return simulate_zebra(setup, R).makespan


@pytest.mark.slow
def test_emulated_link_time_matches_the_simulators_and_routing_is_logged(tmp_path):
    model = {"num_hidden_layers": LAYERS, "num_local_experts": 24}
    runs = [({"zebra": {"microbatches": R}, "emulation": dict(EMULATION, **link)},
             {"output_dir": str(tmp_path / name), "model": model, "batch_size": BATCH, "grad_accum": 1,
              "max_steps": 5}) for name, link in (("fast", {}), ("link", {"link_gbps": 25}))]
    log = tmp_path / "routing"
    results = spawn(2, train_each, {"attention_ranks": [0], "emulation": EMULATION}, runs,
                    env={"HETERMOE_ROUTING_LOG": str(log)})[0]
    routing = parse_routing(str(log), num_layers=LAYERS, num_experts=24)
    assert all(abs(sum(row) - 1) < 1e-9 for row in routing.shares)
    measured = _iteration(results[1]) - _iteration(results[0])
    predicted = _predicted(25, routing) - _predicted(1e6, routing)
    assert predicted > 0.1  # the link is a visible part of the iteration
    assert 0.7 * predicted < measured < 1.3 * predicted, (measured, predicted)


@pytest.mark.parametrize("value", [0, -1, "fast", True, 2e6])
def test_a_bad_link_speed_is_a_clear_value_error(value):
    from hf_hetermoe.emulation import EmulationConfig

    with pytest.raises(ValueError, match="link_gbps"):
        EmulationConfig.from_dict({"devices": ["A40", "V100"], "link_gbps": value})
    assert EmulationConfig.from_dict({"devices": ["A40", "V100"], "link_gbps": 100}).to_dict()["link_gbps"] == 100
