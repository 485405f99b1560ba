"""Re-placement: the policy (pure, rebalance.py), its config, the transfer plan, and the refusals of move_experts
(one process; the multi-process moves are in tests/test_moves_golden.py)."""

import pytest
import torch
from transformers import MixtralForCausalLM

from hf_hetermoe import HeterMoEConfig, apply_hetermoe, move_experts
from hf_hetermoe.expert_moves import check_placement, plan_transfers
from hf_hetermoe.placement import ExpertPlacement
from hf_hetermoe.rebalance import RebalanceConfig, imbalance, predicted_time, propose
from tests._jobs import tiny_mixtral_config

EVEN = {0: (2, 2, 2, 2, 3, 3, 3, 3)}


def held(row, rank):
    return sorted(e for e, r in enumerate(row) if r == rank)


# ---- config ----------------------------------------------------------------------------------------------------
def test_rebalance_is_off_by_default_and_round_trips():
    assert not HeterMoEConfig().rebalance.enabled
    config = HeterMoEConfig.from_dict({"rebalance": {"every_steps": 25, "min_gain": 1.2, "max_per_rank": 6}})
    assert config.rebalance == RebalanceConfig(every_steps=25, min_gain=1.2, max_per_rank=6, decay=0.5)
    assert HeterMoEConfig.from_yaml_text(config.to_yaml()).rebalance == config.rebalance
    assert not HeterMoEConfig.from_dict({"rebalance": False}).rebalance.enabled  # YAML's bare `off`


@pytest.mark.parametrize("value, field", [
    ({"every_steps": 0}, "rebalance.every_steps"),
    ({"every_steps": 2.5}, "rebalance.every_steps"),
    ({"every_steps": True}, "rebalance.every_steps"),
    ({"every_steps": 10, "min_gain": 0.9}, "rebalance.min_gain"),
    ({"every_steps": 10, "min_gain": float("nan")}, "rebalance.min_gain"),
    ({"every_steps": 10, "min_gain": "1.1"}, "rebalance.min_gain"),
    ({"every_steps": 10, "max_per_rank": 0}, "rebalance.max_per_rank"),
    ({"every_steps": 10, "decay": 1.5}, "rebalance.decay"),
    ({"every_steps": 10, "every": 3}, "rebalance"),
    ({"min_gain": 1.1}, "rebalance"),
    ([10], "rebalance"),
])
def test_bad_rebalance_values_name_the_field(value, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        HeterMoEConfig.from_dict({"rebalance": value})


# ---- the policy ----------------------------------------------------------------------------------------------------
def test_skewed_layer_is_balanced_with_the_same_counts_per_rank():
    counts = {0: [800, 400, 300, 200, 100, 50, 50, 100]}
    p = propose(counts=counts, owner=EVEN)
    assert p.move and p.gain == pytest.approx(predicted_time(EVEN, counts, {}) / predicted_time(p.owner, counts, {}))
    assert p.gain >= 1.05 and p.imbalance_after < p.imbalance_before
    assert len(held(p.owner[0], 2)) == len(held(p.owner[0], 3)) == 4  # memory bound: counts kept
    loads = [sum(counts[0][e] for e in held(p.owner[0], r)) for r in (2, 3)]
    assert max(loads) == 1000  # the best split of these counts into 4 + 4 experts
    assert p.moves and all(src != dst for _, _, src, dst in p.moves)


def test_balanced_or_uniform_routing_moves_nothing():
    p = propose(counts={0: [100] * 8}, owner=EVEN)
    assert not p.move and p.moves == [] and p.owner == EVEN and p.gain == pytest.approx(1.0)
    # Already balanced (hot experts on different ranks): the equal outcome with no moves is kept.
    balanced = {0: [800, 50, 50, 100, 800, 50, 50, 100]}
    assert not propose(counts=balanced, owner=EVEN).move


def test_fewest_moves_keeps_groups_on_the_rank_that_holds_most_of_them():
    counts = {0: [500, 10, 10, 10, 10, 10, 10, 480]}  # hot experts 0 and 7 already apart: only cold ones differ
    p = propose(counts=counts, owner=EVEN, min_gain=1.0)
    assert not p.move  # no strictly better busiest load exists: nothing moves
    counts = {0: [500, 480, 10, 10, 10, 10, 10, 10]}
    p = propose(counts=counts, owner=EVEN)
    assert p.move and len(p.moves) == 2  # one swap suffices, and one swap is what is proposed


def test_min_gain_threshold():
    counts = {0: [120, 120, 100, 100, 100, 100, 100, 100]}  # small skew: 440 -> 420, gain 1.048
    assert not propose(counts=counts, owner=EVEN, min_gain=1.05).move
    p = propose(counts=counts, owner=EVEN, min_gain=1.0)
    assert p.move and 1.0 < p.gain < 1.05


def test_faster_ranks_take_more_load():
    counts = {0: [100] * 8}
    p = propose(counts=counts, owner=EVEN, speeds={2: 3.0, 3: 1.0}, max_per_rank=8, min_gain=1.0)
    assert p.move and len(held(p.owner[0], 2)) == 6 and len(held(p.owner[0], 3)) == 2


def test_attention_holders_take_experts_within_their_budget():
    # Rank 0 (attention) holds one expert, a hot one: the policy gives it a cold one and balances the servers.
    owner = {0: (0, 2, 2, 2, 3, 3, 3, 3)}
    counts = {0: [400, 300, 300, 200, 100, 100, 50, 50]}
    p = propose(counts=counts, owner=owner, attention_ranks=(0, 1))
    assert p.move and len(held(p.owner[0], 0)) == 1
    (cold,) = held(p.owner[0], 0)
    assert counts[0][cold] <= sum(counts[0]) / 8  # within Algorithm 1's budget (its slots x the mean load)


def test_max_per_rank_allows_uneven_counts_for_a_hot_expert():
    counts = {0: [1000, 100, 100, 100, 100, 100, 100, 100]}
    kept = propose(counts=counts, owner=EVEN)
    free = propose(counts=counts, owner=EVEN, max_per_rank=7)
    assert predicted_time(free.owner, counts, {}) < predicted_time(kept.owner, counts, {})
    assert held(free.owner[0], 2) == [0] or held(free.owner[0], 3) == [0]  # the hot expert alone on a rank


def test_imbalance_matches_the_logged_definition():
    assert imbalance(EVEN, {0: [3, 3, 3, 3, 1, 1, 1, 1]}) == pytest.approx(12 / 8)


# ---- the transfer plan -------------------------------------------------------------------------------------------
def test_transfers_are_grouped_and_globally_ordered():
    old = ExpertPlacement(num_experts=4, owner={0: (2, 2, 3, 3), 1: (2, 2, 3, 3)})
    new = ExpertPlacement(num_experts=4, owner={0: (3, 0, 2, 3), 1: (2, 2, 3, 3)})
    assert [(t.layer, t.src, t.dst, t.experts) for t in plan_transfers(old, new)] == [
        (0, 2, 0, (1,)), (0, 2, 3, (0,)), (0, 3, 2, (2,))]
    with pytest.raises(ValueError, match="rank\\(s\\) \\[5\\]"):
        check_placement(old, ExpertPlacement(num_experts=4, owner={0: (5, 2, 3, 3), 1: (2, 2, 3, 3)}),
                        world_size=4, holder_ranks=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="every expert of every MoE layer"):
        check_placement(old, ExpertPlacement(num_experts=4, owner={0: (2, 2, 3, 3)}), world_size=4,
                        holder_ranks=(0, 1, 2, 3))


# ---- refusals of move_experts (one process) ----------------------------------------------------------------------
def patched():
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    return model


def test_move_refused_mid_accumulation_and_with_saved_activations():
    model = patched()
    same = {"num_experts": 4, "owner": {str(layer): [0] * 4 for layer in range(3)}}
    ids = torch.randint(0, 96, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(ValueError, match="kept activations"):
        move_experts(model, same)
    loss.backward()
    with pytest.raises(ValueError, match="mid-accumulation"):
        move_experts(model, same)
    with pytest.raises(ValueError, match="rank\\(s\\) \\[1\\]"):
        move_experts(model, {"num_experts": 4, "owner": {str(layer): [1] * 4 for layer in range(3)}})
    with pytest.raises(ValueError, match="patched with HeterMoE"):
        move_experts(MixtralForCausalLM(tiny_mixtral_config()), same)


def test_invariants_on_random_loads():
    """Over random skews and placements: counts per rank kept, never worse than the current placement, moves only
    at or above the threshold, and the same input always gives the same proposal (ranks decide independently)."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        experts = rng.choice([4, 8, 12, 24])
        ranks = rng.choice([(2, 3), (2, 3, 4), (2, 3, 4, 5)])
        layers = rng.randint(1, 3)
        owner = {}
        for layer in range(layers):
            row = [ranks[e * len(ranks) // experts] for e in range(experts)]
            rng.shuffle(row)
            if rng.random() < 0.3:
                row[rng.randrange(experts)] = rng.choice((0, 1))  # an Asym-EA holder
            owner[layer] = tuple(row)
        counts = {layer: [rng.paretovariate(1.2) * 100 for _ in range(experts)] for layer in owner}
        speeds = {r: rng.choice([1.0, 1.0, 2.0]) for r in (0, 1, *ranks)}
        min_gain = rng.choice([1.0, 1.05, 1.2])
        p = propose(counts=counts, owner=owner, attention_ranks=(0, 1), speeds=speeds, min_gain=min_gain)
        assert p == propose(counts=counts, owner=owner, attention_ranks=(0, 1), speeds=speeds, min_gain=min_gain)
        for layer, row in owner.items():
            assert sorted(p.owner[layer]) == sorted(row)  # same number of experts on every rank
        assert p.after_s <= p.before_s * (1 + 1e-9)
        if p.move:
            assert p.gain >= min_gain and p.moves
        else:
            assert p.owner == owner and not p.moves
