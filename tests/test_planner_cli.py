"""Planner: `hetermoe plan` and `hetermoe simulate` through their entry points (no subprocesses)."""

from __future__ import annotations

import json

import pytest

from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.planner.asym_ea import Placement, placement_from_offloads
from hf_hetermoe.planner.plan_cli import PLAN_PLACEMENT, PLAN_PNG, PLAN_YAML, main_plan, main_simulate
from hf_hetermoe.planner.strategies import STRATEGIES

D1_O1 = ["--cluster", "6xA40,6xV100", "--model", "D1", "--seq-len", "8192"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    return out, main_plan(D1_O1 + ["--out", str(out)])


def test_plan_writes_a_launchable_config_a_placement_and_a_gantt_chart(planned):
    out, code = planned
    assert code == 0
    cfg = HeterMoEConfig.from_yaml(out / PLAN_YAML)
    assert cfg.mode == "disaggregated"
    assert cfg.attention_ranks == (0, 1, 2, 3, 4, 5) and cfg.expert_ranks == (6, 7, 8, 9, 10, 11)
    topo = cfg.resolve_topology(12)
    assert topo.num_attention == 6
    assert 1 <= cfg.zebra.microbatches <= 4  # default batch: 24 sequences, 4 per A40
    # At 8K tokens D1's V100 experts outlast A40 attention, so Asym-EA moves experts.
    assert isinstance(cfg.asym_ea, dict) and all(0 <= layer < 8 for layer in cfg.asym_ea)
    placement = Placement.from_dict(json.loads((out / PLAN_PLACEMENT).read_text()))
    offloads = [cfg.asym_ea.get(layer, 0) for layer in range(8)]
    assert placement == placement_from_offloads(num_experts=24, attention_ranks=topo.attention_ranks,
                                                expert_ranks=topo.expert_ranks, offloads=offloads)
    assert (out / PLAN_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_prints_every_strategy_and_writes_to_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main_plan(["--cluster", "C1", "--model", "W1", "--seq-len", "4096"]) == 0
    printed = capsys.readouterr().out
    for name in STRATEGIES + ("lower bound",):
        assert name in printed
    assert {p.name for p in tmp_path.iterdir()} == {PLAN_YAML, PLAN_PNG, PLAN_PLACEMENT}


@pytest.mark.parametrize("argv,needles", [
    (["--cluster", "6xA40,6xV100", "--model", "Z9", "--seq-len", "4096"], ["Z9", "W1, W2, D1, D2, D3"]),
    (["--cluster", "6A40,6xV100", "--model", "D1", "--seq-len", "4096"], ["6A40", "COUNTxGPU"]),
    (["--cluster", "6xA40,5xV100", "--model", "D1", "--seq-len", "4096"], ["24 experts", "5 expert GPUs"]),
    (["--cluster", "6xA40,6xV100", "--model", "D1", "--seq-len", "4096", "--global-batch", "10"], ["10", "6"]),
    (["--model", "D1", "--seq-len", "4096"], ["--cluster"]),
    (["--cluster", "O1", "--model", "D1"], ["--seq-len"]),
    (["--cluster", "O1", "--model", "D1", "--seq-len", "many"], ["many"]),
])
def test_plan_user_mistakes_exit_2_with_one_clear_line(argv, needles, tmp_path, capsys):
    assert main_plan(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hetermoe plan: error:")
    for needle in needles:
        assert needle in err
    assert not any(tmp_path.iterdir())


def test_simulate_one_strategy_and_a_written_config(planned, capsys):
    out, _ = planned
    assert main_simulate(D1_O1 + ["--strategy", "zp", "--microbatches", "2"]) == 0
    assert main_simulate(D1_O1 + ["--config", str(out / PLAN_YAML), "--gantt", str(out / "sim.png")]) == 0
    assert (out / "sim.png").exists()
    assert main_simulate(D1_O1 + ["--strategy", "zp+asym-ea", "--asym-ea", "1,1,1,1,1,1,1,1"]) == 0
    printed = capsys.readouterr().out
    assert "ZP+Asym-EA" in printed and "[1, 1, 1, 1, 1, 1, 1, 1]" in printed


@pytest.mark.parametrize("extra,needle", [(["--strategy", "pipeline"], "pipeline"),
                                          (["--asym-ea", "1,0"], "2 per-layer counts"),
                                          (["--asym-ea", "5,0,0,0,0,0,0,0"], "holds 4"),
                                          (["--asym-ea", '{"9": 1}'], "[9]"),
                                          (["--strategy", "zp", "--microbatches", "9"], "9 micro-batches")])
def test_simulate_user_mistakes_exit_2(extra, needle, capsys):
    assert main_simulate(D1_O1 + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
