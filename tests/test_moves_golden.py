"""Experts moving between holders during training, golden against stock DDP (multi-process, gloo).

2 attention ranks (0, 1) + 2 expert ranks (2, 3), 4 experts per layer, 8 optimizer steps with gradient
accumulation 2 (as tests/test_golden_distributed.py), zebra R = 2 (once R = 4 with expert recompute). Forced
moves at the end of steps 2, 4, 6 and 7 take experts from expert ranks to attention ranks and back, between
expert ranks, empty an expert rank of one layer and then of every layer, and give attention ranks their first
experts and take all of them away again; frozen experts take the same moves (weights only). A move tried
mid-accumulation is refused. The automatic policy runs on a Zipf-skewed router (with and without Asym-EA holders)
and must move experts; colocated, the Accelerate loop's optimizer step triggers it. Losses, gradient norms and final weights equal stock DDP; a checkpoint written right
after a move is stock, and resuming from it equals the uninterrupted run.
"""

import pytest
import torch
from transformers import MixtralForCausalLM

from tests._assertions import assert_same_losses, assert_same_weights, logged
from tests._dist import spawn
from tests._moves_jobs import (accelerate_loop, frozen_experts_mixtral, skewed_mixtral, train_each_stock,
                               train_each_with_moves)

pytestmark = pytest.mark.slow

M2 = {"attention_ranks": [0, 1], "timeout_s": 60}
DEFAULT = {0: [2, 2, 3, 3], 1: [2, 2, 3, 3], 2: [2, 2, 3, 3]}
SCHEDULE = {
    2: {0: [0, 2, 3, 2], 1: [3, 3, 2, 2], 2: [2, 1, 3, 3]},  # expert->attention ranks, swaps between expert ranks
    4: {0: [2, 2, 3, 3], 1: [3, 3, 3, 3], 2: [0, 1, 3, 3]},  # attention->expert rank, rank 2 empties layer 1
    6: {0: [2, 2, 2, 0], 1: [2, 2, 2, 1], 2: [2, 2, 2, 2]},  # rank 3 holds nothing at all
    7: DEFAULT,                                              # attention ranks hold nothing again
}


def placement(owner: dict) -> dict:
    return {"num_experts": 4, "owner": {str(layer): row for layer, row in owner.items()}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("moves")


@pytest.fixture(scope="module")
def stock(base):
    specs = [{"output_dir": str(base / "stock"), "final_dir": str(base / "stock_final")},
             {"output_dir": str(base / "stock_skew"), "final_dir": str(base / "stock_skew_final"),
              "model_factory": skewed_mixtral},
             {"output_dir": str(base / "stock_frozen"), "final_dir": str(base / "stock_frozen_final"),
              "model_factory": frozen_experts_mixtral}]
    return dict(zip(("plain", "skew", "frozen"), spawn(2, train_each_stock, specs)[0]))


@pytest.fixture(scope="module")
def ours(base):
    forced = {step: placement(owner) for step, owner in SCHEDULE.items()}
    runs = [
        ({}, {"output_dir": str(base / "forced"), "final_dir": str(base / "forced_final"), "save_steps": 6}, forced),
        ({}, {"output_dir": str(base / "forced"), "final_dir": str(base / "resumed_final"),
              "resume_from": str(base / "forced" / "checkpoint-6")}, {7: placement(SCHEDULE[2])}),
        ({"rebalance": {"every_steps": 2, "min_gain": 1.05}},
         {"output_dir": str(base / "policy"), "final_dir": str(base / "policy_final"), "model_factory": skewed_mixtral},
         None),
        ({"asym_ea": {1: 1}, "rebalance": {"every_steps": 2, "min_gain": 1.05}},
         {"output_dir": str(base / "policy_asym"), "final_dir": str(base / "policy_asym_final"),
          "model_factory": skewed_mixtral}, None),
        ({"zebra": {"microbatches": 4, "expert_recompute": True}},
         {"output_dir": str(base / "forced_r4"), "final_dir": str(base / "forced_r4_final")}, forced),
        ({}, {"output_dir": str(base / "forced_frozen"), "final_dir": str(base / "forced_frozen_final"),
              "model_factory": frozen_experts_mixtral}, forced),
    ]
    names = ("forced", "resumed", "policy", "policy_asym", "forced_r4", "forced_frozen")
    return dict(zip(names, spawn(4, train_each_with_moves, M2, runs, timeout=200)[0]))


def test_forced_moves_equal_stock_ddp(base, stock, ours):
    run = ours["forced"]
    assert [step for step, _ in run["moved"]] == [2, 4, 6, 7]
    assert all(transfers for _, transfers in run["moved"])
    # Experts went from expert ranks to attention ranks (step 2) and back (step 4, 7).
    assert (0, 2, 0, [0]) in run["moved"][0][1] and (0, 0, 2, [0]) in run["moved"][1][1]
    assert run["placement"]["owner"] == {str(k): v for k, v in DEFAULT.items()}
    assert "mid-accumulation" in run["refusal"]
    assert_same_losses(stock["plain"], run)
    assert logged(run, "grad_norm") == pytest.approx(logged(stock["plain"], "grad_norm"), rel=1e-5)
    assert_same_weights(base / "stock_final", base / "forced_final")


def test_forced_moves_with_four_stripes_and_expert_recompute(base, stock, ours):
    run = ours["forced_r4"]
    assert [step for step, _ in run["moved"]] == [2, 4, 6, 7]
    assert_same_losses(stock["plain"], run)
    assert_same_weights(base / "stock_final", base / "forced_r4_final")


def test_forced_moves_of_frozen_experts(base, stock, ours):
    run = ours["forced_frozen"]
    assert [step for step, _ in run["moved"]] == [2, 4, 6, 7]
    assert_same_losses(stock["frozen"], run)
    assert_same_weights(base / "stock_frozen_final", base / "forced_frozen_final")


def test_checkpoint_after_a_move_is_stock_and_resumes_exactly(base, ours):
    checkpoint = base / "forced" / "checkpoint-6"  # written at step 6, right after the move that emptied rank 3
    model = MixtralForCausalLM.from_pretrained(checkpoint)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4
    assert ours["resumed"]["moved"] and ours["resumed"]["moved"][0][0] == 7
    assert_same_weights(base / "forced_final", base / "resumed_final")


def test_policy_moves_experts_under_skew_and_equals_stock(base, stock, ours):
    run = ours["policy"]
    gains = logged(run, "hetermoe_rebalance_gain")
    moved = logged(run, "hetermoe_rebalance_moved_experts")
    assert len(gains) == 4  # a decision every 2 of 8 steps
    assert any(m > 0 for m in moved), f"the skewed router should make the policy move experts (gains {gains})"
    assert all(g >= 1.05 for g, m in zip(gains, moved) if m > 0)
    before = logged(run, "hetermoe_rebalance_imbalance_before")
    after = logged(run, "hetermoe_rebalance_imbalance_after")
    first_move = next(i for i, m in enumerate(moved) if m > 0)
    assert after[first_move] < before[first_move]
    assert run["placement"]["owner"] != {str(k): v for k, v in DEFAULT.items()}
    assert_same_losses(stock["skew"], run)
    assert_same_weights(base / "stock_skew_final", base / "policy_final")


def test_policy_with_experts_on_attention_ranks_equals_stock(base, stock, ours):
    """Asym-EA holders (one expert of layer 1 on each attention rank) keep their counts; the policy chooses which
    experts they hold, and training still equals stock."""
    run = ours["policy_asym"]
    assert any(m > 0 for m in logged(run, "hetermoe_rebalance_moved_experts"))
    owner = run["placement"]["owner"]
    assert sorted(owner["1"]).count(0) == 1 and sorted(owner["1"]).count(1) == 1  # counts kept
    assert_same_losses(stock["skew"], run)
    assert_same_weights(base / "stock_skew_final", base / "policy_asym_final")


def test_colocated_accelerate_loop_with_re_placement_equals_stock_ddp():
    """Colocated over 2 ranks (each an attention rank and a holder), `hf_hetermoe.prepare`'s optimizer step
    triggers the policy; the skewed router makes it move experts between the two ranks."""
    stock = spawn(2, accelerate_loop, False)[0]
    ours = spawn(2, accelerate_loop, True, {"every_steps": 2, "min_gain": 1.05})[0]
    assert len(ours["decisions"]) == 4 and any(move for move, _, _ in ours["decisions"])
    assert ours["placement"] != {layer: [0, 0, 1, 1] for layer in range(3)}
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(ours["norms"]), torch.tensor(stock["norms"]), rtol=1e-5, atol=0)
    assert set(ours["weights"]) == set(stock["weights"])
    for key, value in stock["weights"].items():
        torch.testing.assert_close(torch.from_numpy(ours["weights"][key]), torch.from_numpy(value), atol=1e-5, rtol=0,
                                   msg=key)
