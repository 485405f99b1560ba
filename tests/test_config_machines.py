"""Roles named per machine (`attention_machines`, `expert_machines`): validated with the file, resolved with
every rank's machine (reported at launch, launch_facts.py), never from rank arithmetic."""

import pytest

from hf_hetermoe.config import HeterMoEConfig


def test_attention_machines_take_every_rank_of_those_machines_whatever_the_rank_order():
    config = HeterMoEConfig.from_dict({"attention_machines": [1]})
    assert config.uses_machine_roles and not config.uses_auto_roles
    # Uneven machines (1 + 2) numbered by the rendezvous in join order: machine 1 got global ranks 0 and 2.
    topo = config.resolve_topology(3, None, [1, 0, 1])
    assert topo.attention_ranks == (0, 2) and topo.expert_ranks == (1,)
    assert HeterMoEConfig.from_dict({"expert_machines": [0]}).resolve_topology(3, None, [1, 0, 1]).expert_ranks == (1,)
    both = HeterMoEConfig.from_dict({"attention_machines": [0], "expert_machines": [1, 2]})
    assert both.resolve_topology(4, None, [0, 0, 1, 2]).expert_ranks == (2, 3)
    assert HeterMoEConfig.from_yaml_text(both.to_yaml()) == both


@pytest.mark.parametrize("data, words", [
    ({"attention_machines": 0}, ["attention_machines", "list"]),
    ({"attention_machines": [0], "attention_ranks": [0]}, ["either per machine or per rank"]),
    ({"expert_machines": [1], "expert_ranks": [2]}, ["either per machine or per rank"]),
    ({"attention_machines": [0], "expert_machines": [0, 1]}, ["overlaps", "machine(s) [0]"]),
    ({"attention_machines": [0], "mode": "colocated"}, ["colocated"]),
    ({"attention_machines": [-1]}, ["negative"]),
])
def test_bad_machine_roles_name_the_field(data, words):
    with pytest.raises(ValueError) as info:
        HeterMoEConfig.from_dict(data)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("data, world, machines, words", [
    ({"attention_machines": [2]}, 4, [0, 0, 1, 1], ["names machine(s) [2]", "machines [0, 1]"]),
    ({"attention_machines": [0, 1]}, 4, [0, 0, 1, 1], ["no expert rank"]),
    ({"expert_machines": [0, 1]}, 2, [0, 1], ["no attention rank"]),
    ({"attention_machines": [0], "expert_machines": [1]}, 3, [0, 1, 2], ["machine(s) [2] no role"]),
    ({"attention_machines": [0]}, 4, None, ["needs every rank's machine"]),
    ({"attention_machines": [0]}, 4, [0, 1, 1], ["one machine per rank"]),
])
def test_machine_roles_that_do_not_fit_the_job_fail_before_any_wait(data, world, machines, words):
    with pytest.raises(ValueError) as info:
        HeterMoEConfig.from_dict(data).resolve_topology(world, None, machines)
    for word in words:
        assert word in str(info.value)
