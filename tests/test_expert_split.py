"""`expert_split` at run time: config validation, the placement it builds, and the expert speeds behind
`proportional` (emulated devices or the GPU names ranks report). No processes; the golden run is in
tests/test_golden_mixed_pools.py."""

from __future__ import annotations

import pytest

from hf_hetermoe.asym_ea_placement import placement_for
from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.expert_speeds import device_profile_name, expert_speeds
from tests._jobs import tiny_mixtral_config

EMULATED = {"devices": ["A40", "V100", "T4"], "model": "D1"}


def _placement(cfg: HeterMoEConfig, world: int = 3, **kw):
    topology = cfg.resolve_topology(world)
    model = tiny_mixtral_config()
    cfg.check_model(model, topology)
    return placement_for(cfg, layers=(0, 1, 2), num_experts=4, topology=topology, model_config=model, **kw)


def test_weights_even_and_round_trip():
    cfg = HeterMoEConfig.from_yaml_text("attention_ranks: [0]\nexpert_split: [2, 1]\n")
    assert cfg.expert_split == (2.0, 1.0)
    assert HeterMoEConfig.from_yaml_text(cfg.to_yaml()) == cfg and "- 2\n" in cfg.to_yaml()
    assert _placement(cfg).owner[0] == (1, 1, 1, 2)
    assert _placement(HeterMoEConfig(attention_ranks=[0])).owner[0] == (1, 1, 2, 2)  # default: even
    # A weighted split need not divide the experts evenly: 4 experts over 3 expert ranks.
    three = HeterMoEConfig(attention_ranks=[0], expert_split=[1, 1, 1])
    assert _placement(three, world=4).owner[2] == (1, 1, 2, 3)


def test_proportional_under_emulation_follows_the_devices():
    cfg = HeterMoEConfig(attention_ranks=[0], expert_split="proportional", emulation=EMULATED)
    assert _placement(cfg).owner[1] == (1, 1, 1, 2)  # V100 ~2.8x a T4 on D1's experts
    same = HeterMoEConfig(attention_ranks=[0], expert_split="proportional",
                          emulation={"devices": ["A40", "V100", "V100"], "model": "D1"})
    assert _placement(same).owner[1] == (1, 1, 2, 2)
    # explicit speeds (what a re-placement policy passes) win
    assert _placement(cfg, speeds={1: 1.0, 2: 3.0}).owner[0] == (1, 2, 2, 2)


def test_expert_speeds_for_any_rank_from_reported_names():
    names = ["NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-32GB", "Tesla T4"]
    speeds = expert_speeds(ranks=range(3), device_names=names, model_config=tiny_mixtral_config())
    assert speeds[0] > speeds[1] > speeds[2] > 0  # attention ranks too
    d1 = expert_speeds(ranks=[1, 2], emulation=HeterMoEConfig(emulation=EMULATED, attention_ranks=[0]).emulation)
    assert 2.3 < d1[1] / d1[2] < 3.3
    assert device_profile_name("NVIDIA H200") == "H200" and device_profile_name("cpu") is None
    # a policy that can live without speeds (equal weights) asks for a default instead of an error
    assert expert_speeds(ranks=[0, 1], device_names=["cpu", "cpu"], model_config=tiny_mixtral_config(),
                         unknown=1.0) == {0: 1.0, 1: 1.0}
    assert expert_speeds(ranks=[3], unknown=1.0, model_config=tiny_mixtral_config()) == {3: 1.0}


@pytest.mark.parametrize("data,words", [
    ({"expert_split": "fast"}, ["`expert_split`", "even, proportional"]),
    ({"expert_split": [1, -2]}, ["`expert_split`", ">= 0"]),
    ({"expert_split": [0, 0]}, ["all 0"]),
    ({"expert_split": [1, True]}, ["`expert_split`", "True"]),
    ({"expert_split": []}, ["`expert_split`", "one weight per expert rank"]),
    ({"mode": "colocated", "expert_split": [1, 2]}, ["colocated"]),
    ({"expert_split": "proportional", "asym_ea": "auto"}, ["asym_ea", "placement.json"]),
])
def test_bad_expert_split_names_the_field_and_the_fix(data, words):
    with pytest.raises(ValueError) as info:
        HeterMoEConfig.from_dict(data)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_refusals_that_need_the_world_or_the_devices():
    with pytest.raises(ValueError, match="3 weights for 2 expert ranks"):
        _placement(HeterMoEConfig(attention_ranks=[0], expert_split=[1, 1, 1]))
    cfg = HeterMoEConfig(attention_ranks=[0], expert_split="proportional")
    topology = cfg.resolve_topology(3)
    cfg.check_model(tiny_mixtral_config(), topology)  # the devices are not known yet: checked at placement
    for names, needle in ((["cpu"] * 3, "'cpu', which has none"), (None, "none is known")):
        with pytest.raises(ValueError, match=needle) as info:
            placement_for(cfg, layers=(0, 1, 2), num_experts=4, topology=topology, device_names=names,
                          model_config=tiny_mixtral_config())
        assert "expert_split: [2, 1]" in str(info.value)
