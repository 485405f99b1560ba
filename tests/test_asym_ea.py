"""Asym-EA at run time: experts of chosen layers on attention ranks, golden against stock training.

Placements: the paper's pattern (one expert per expert rank moved in layers 2 and 3, i.e. 1 and 2 zero-based),
an irregular explicit placement file, every expert of a layer on the attention rank, and `auto` (profile, then
Algorithm 1) under device emulation; M=1 N=2 and M=2 N=1; R in {1, 2}; checkpoints and resume.
"""

import json
import os

import pytest
from transformers import MixtralForCausalLM

from tests._assertions import assert_same_losses, assert_same_weights
from tests._dist import spawn
from tests._jobs import train
from tests._zebra_jobs import train_each

M1 = {"attention_ranks": [0]}      # rank 0 attention, ranks 1-2 expert servers (2 experts each of 4)
M2 = {"attention_ranks": [0, 1]}   # ranks 0-1 attention, rank 2 the expert server (4 experts)
PAPER = {1: 1, 2: 1}
IRREGULAR = {0: {0: 1, 1: 2, 2: 0, 3: 1}, 1: {0: 0, 1: 0, 2: 2, 3: 2}, 2: {0: 1, 1: 1, 2: 2, 3: 0}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("asym")


@pytest.fixture(scope="module")
def stock(base):
    return train({"output_dir": str(base / "stock"), "final_dir": str(base / "stock_final")})


def held_by(placement: dict, rank: int) -> dict:
    return {int(layer): sorted(int(e) for e, r in row.items() if r == rank) if isinstance(row, dict)
            else [e for e, r in enumerate(row) if r == rank] for layer, row in placement["owner"].items()}


@pytest.fixture(scope="module")
def placements_m1_n2(base):
    """Five placements trained under one launcher session (M=1, N=2); paper_r2 writes checkpoint-4."""
    placement_file = base / "placement.json"
    placement_file.write_text(json.dumps(IRREGULAR))
    emulation = {"devices": ["L40S", "T4", "T4"], "model": "D1", "seq_len": 2048}
    cases = {
        "paper_r2": ({"asym_ea": PAPER, "zebra": {"microbatches": 2}}, {"save_steps": 4}),
        "paper_r1": ({"asym_ea": PAPER, "zebra": {"microbatches": 1}}, {}),
        "irregular_r2": ({"asym_ea": str(placement_file), "zebra": {"microbatches": 2}}, {}),
        "whole_layer_r1": ({"asym_ea": {1: 2}, "zebra": {"microbatches": 1}}, {}),
        "auto_emulated": ({"asym_ea": "auto", "emulation": emulation}, {}),
    }
    runs = [(config, {"output_dir": str(base / name), "final_dir": str(base / f"{name}_final")} | extra)
            for name, (config, extra) in cases.items()]
    return dict(zip(cases, spawn(3, train_each, dict(M1, emulation=emulation), runs)[0]))


@pytest.mark.slow
def test_placements_m1_n2(base, stock, placements_m1_n2):
    results = placements_m1_n2
    for name, ours in results.items():
        assert_same_losses(stock, ours)
        assert_same_weights(base / "stock_final", base / f"{name}_final")
    assert held_by(results["paper_r2"]["placement"], 0) == {0: [], 1: [1, 3], 2: [1, 3]}
    assert held_by(results["irregular_r2"]["placement"], 0) == {0: [2], 1: [0, 1], 2: [3]}
    assert held_by(results["whole_layer_r1"]["placement"], 0)[1] == [0, 1, 2, 3]
    assert held_by(results["whole_layer_r1"]["placement"], 1)[1] == []
    moved = held_by(results["auto_emulated"]["placement"], 0)
    assert any(moved.values()), "Algorithm 1 should move experts when T4 experts are this much slower"
    # The checkpoint written mid-run is stock, experts from the attention rank included.
    stock_class = MixtralForCausalLM.from_pretrained(base / "paper_r2" / "checkpoint-4")
    assert stock_class.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4


@pytest.mark.slow
def test_resume_with_experts_on_attention_ranks(base, placements_m1_n2):
    checkpoint = str(base / "paper_r2" / "checkpoint-4")  # written by the placements_m1_n2 job
    assert os.path.isdir(checkpoint)
    runs = [({"asym_ea": PAPER}, {"output_dir": str(base / "resume_same"), "final_dir": str(base / "resume_same_final"),
                                  "resume_from": checkpoint}),
            ({"asym_ea": "off"}, {"output_dir": str(base / "resume_off"), "final_dir": str(base / "resume_off_final"),
                                  "resume_from": checkpoint})]
    spawn(3, train_each, M1, runs)
    # Same placement, and a different one: the experts' optimizer state (moved experts' too) is placement independent.
    assert_same_weights(base / "paper_r2_final", base / "resume_same_final")
    assert_same_weights(base / "paper_r2_final", base / "resume_off_final")


@pytest.mark.slow
def test_m2_n1(base):
    ddp = spawn(2, train, {"output_dir": str(base / "ddp"), "final_dir": str(base / "ddp_final")})[0]
    runs = [({"asym_ea": {1: 2, 2: 2}, "zebra": {"microbatches": r}},
             {"output_dir": str(base / f"m2n1_r{r}"), "final_dir": str(base / f"m2n1_r{r}_final")}) for r in (1, 2)]
    results = spawn(3, train_each, M2, runs)[0]
    for (config, spec), ours in zip(runs, results):
        assert_same_losses(ddp, ours)
        assert_same_weights(base / "ddp_final", spec["final_dir"])
        assert held_by(ours["placement"], 0)[1] == [2] and held_by(ours["placement"], 1)[1] == [3]


def test_bad_placements_are_clear_errors(tmp_path):
    from hf_hetermoe import HeterMoEConfig
    from hf_hetermoe.asym_ea import placement_for

    topology = HeterMoEConfig(attention_ranks=[0]).resolve_topology(3)
    three = HeterMoEConfig(attention_ranks=[0, 1]).resolve_topology(5)  # M=2, N=3: neither divides the other
    with pytest.raises(ValueError, match="multiple"):
        placement_for(HeterMoEConfig(asym_ea={1: 1}), layers=(0, 1, 2), num_experts=6, topology=three)
    with pytest.raises(ValueError, match="no routed experts"):
        placement_for(HeterMoEConfig(asym_ea={7: 1}), layers=(0, 1, 2), num_experts=4, topology=topology)
    missing = tmp_path / "missing_expert.json"
    missing.write_text(json.dumps({"0": {"0": 1, "1": 2, "2": 0}, "1": IRREGULAR[1], "2": IRREGULAR[2]}))
    with pytest.raises(ValueError, match="exactly one owner"):
        placement_for(HeterMoEConfig(asym_ea=str(missing)), layers=(0, 1, 2), num_experts=4, topology=topology)
    with pytest.raises(ValueError, match="does not exist"):
        placement_for(HeterMoEConfig(asym_ea=str(tmp_path / "nope.json")), layers=(0, 1, 2), num_experts=4,
                      topology=topology)


def test_the_plan_placement_file_is_what_the_runtime_builds(tmp_path):
    """`hetermoe plan` writes counts and a placement file; both give the runtime the same placement."""
    from hf_hetermoe import HeterMoEConfig
    from hf_hetermoe.asym_ea import placement_for
    from hf_hetermoe.planner.asym_ea import placement_from_offloads

    topology = HeterMoEConfig(attention_ranks=[0, 1]).resolve_topology(4)
    offloads = [0, 1, 2, 1]
    planned = placement_from_offloads(num_experts=8, attention_ranks=(0, 1), expert_ranks=(2, 3), offloads=offloads)
    path = tmp_path / "hetermoe_placement.json"
    path.write_text(json.dumps(planned.to_dict()))
    layers = (0, 1, 2, 3)
    from_file = placement_for(HeterMoEConfig(asym_ea=str(path)), layers=layers, num_experts=8, topology=topology)
    from_counts = placement_for(HeterMoEConfig(asym_ea={1: 1, 2: 2, 3: 1}), layers=layers, num_experts=8,
                                topology=topology)
    assert from_file == from_counts
    assert from_file.local_experts(0, 2) == (2, 3) and from_file.local_experts(2, 2) == (0, 1)
