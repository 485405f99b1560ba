"""HeterMoEConfig: strict typed YAML, topology resolution, model checks (no processes)."""

import pytest

from hf_hetermoe import HeterMoEConfig
from hf_hetermoe.placement import ExpertPlacement
from tests._jobs import tiny_mixtral_config


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_a_complete_example_file_round_trips(tmp_path):
    cfg = HeterMoEConfig.from_yaml(write(tmp_path, """
attention_ranks: [0, 1]
expert_ranks: [2, 3]
mode: disaggregated
zebra: {microbatches: 1}
asym_ea: off
timeout_s: 300
"""))
    assert cfg.attention_ranks == (0, 1) and cfg.expert_ranks == (2, 3)
    assert cfg.asym_ea == "off" and cfg.zebra.microbatches == 1 and cfg.timeout_s == 300.0
    again = HeterMoEConfig.from_yaml(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("text", ["mode: colocated\n", "attention_ranks: [0, 1]\n"])
def test_minimal_files_are_valid(tmp_path, text):
    HeterMoEConfig.from_yaml(write(tmp_path, text))


def test_expert_ranks_default_to_the_rest():
    topo = HeterMoEConfig(attention_ranks=[1, 0]).resolve_topology(5)
    assert topo.attention_ranks == (0, 1) and topo.expert_ranks == (2, 3, 4)


def test_colocated_uses_every_rank():
    topo = HeterMoEConfig(mode="colocated").resolve_topology(3)
    assert topo.attention_ranks == (0, 1, 2) and topo.expert_ranks == () and topo.host_ranks == (0, 1, 2)


def test_asym_ea_mapping_and_auto():
    assert HeterMoEConfig.from_dict({"asym_ea": {1: 1, 2: 1}}).asym_ea == {1: 1, 2: 1}
    assert HeterMoEConfig.from_dict({"asym_ea": "auto"}).asym_ea == "auto"


@pytest.mark.parametrize("data, words", [
    ({"atention_ranks": [0]}, ["unknown key", "atention_ranks"]),
    ({"mode": "hybrid"}, ["mode", "colocated"]),
    ({"attention_ranks": "0,1"}, ["attention_ranks"]),
    ({"attention_ranks": [0, 0]}, ["more than once"]),
    ({"attention_ranks": [0, -1]}, ["negative"]),
    ({"attention_ranks": [0, 1.5]}, ["not an integer"]),
    ({"attention_ranks": [0, 1], "expert_ranks": [1, 2]}, ["overlaps", "[1]"]),
    ({"mode": "colocated", "expert_ranks": [1]}, ["colocated"]),
    ({"zebra": {"microbatches": 0}}, ["zebra.microbatches"]),
    ({"zebra": {"stripes": 2}}, ["zebra", "stripes"]),
    ({"zebra": 2}, ["zebra"]),
    ({"asym_ea": "sometimes"}, ["asym_ea"]),
    ({"asym_ea": {0: -1}}, ["asym_ea"]),
    ({"timeout_s": 0}, ["timeout_s"]),
    ({"timeout_s": "long"}, ["timeout_s"]),
    ([1, 2], ["mapping"]),
])
def test_bad_files_name_the_field(data, words):
    with pytest.raises(ValueError) as info:
        HeterMoEConfig.from_dict(data)
    for word in words:
        assert word in str(info.value)


def test_keyword_construction_is_validated_like_a_file():
    with pytest.raises(ValueError, match="overlaps"):
        HeterMoEConfig(attention_ranks=[0, 1], expert_ranks=[1])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        HeterMoEConfig.from_yaml(write(tmp_path, "attention_ranks: [0, 1\n"))
    with pytest.raises(ValueError, match="not valid YAML"):  # PyYAML's own IndexError on an empty tagged int
        HeterMoEConfig.from_yaml_text("!!int ")
    with pytest.raises(ValueError, match="no file"):
        HeterMoEConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("data, world, words", [
    ({"attention_ranks": [0, 4]}, 4, ["outside the world of 4"]),
    ({"attention_ranks": [0, 1, 2, 3]}, 4, ["no expert ranks"]),
    ({"attention_ranks": [0], "expert_ranks": [1]}, 4, ["cover 2 ranks", "4 processes"]),
    ({"mode": "colocated", "attention_ranks": [0]}, 2, ["colocated"]),
    ({}, 4, ["auto", "explicitly"]),
])
def test_topology_errors_name_both_numbers(data, world, words):
    with pytest.raises(ValueError) as info:
        HeterMoEConfig.from_dict(data).resolve_topology(world)
    for word in words:
        assert word in str(info.value)


def test_auto_picks_the_newest_devices():
    caps = [(7, 0), (8, 6), (7, 0), (8, 6)]
    topo = HeterMoEConfig().resolve_topology(4, caps)
    assert topo.attention_ranks == (1, 3) and topo.expert_ranks == (0, 2)
    with pytest.raises(ValueError, match="same device generation"):
        HeterMoEConfig().resolve_topology(2, [(8, 0), (8, 0)])


def test_model_checks():
    cfg = HeterMoEConfig(attention_ranks=[0])
    cfg.check_model(tiny_mixtral_config(), cfg.resolve_topology(3))  # 4 experts over 2 ranks
    with pytest.raises(ValueError, match=r"4 experts .* 3 expert-holding ranks"):
        cfg.check_model(tiny_mixtral_config(), cfg.resolve_topology(4))

    class Llama:
        model_type = "llama"

    with pytest.raises(ValueError, match=r"not supported.*mixtral"):
        cfg.check_model(Llama(), cfg.resolve_topology(3))
    with pytest.raises(ValueError, match="no routed experts"):
        HeterMoEConfig(attention_ranks=[0], asym_ea={7: 1}).check_model(tiny_mixtral_config(), cfg.resolve_topology(3))


def test_even_placement():
    placement = ExpertPlacement.even(layers=(0, 1), num_experts=4, host_ranks=(2, 3))
    assert placement.local_experts(2, 0) == (0, 1) and placement.local_experts(3, 1) == (2, 3)
    assert placement.local_experts(0, 0) == () and placement.ranks_holding() == (2, 3)
    assert ExpertPlacement.from_dict(placement.to_dict()) == placement
    with pytest.raises(ValueError, match="divide"):
        ExpertPlacement.even(layers=(0,), num_experts=4, host_ranks=(1, 2, 3))
