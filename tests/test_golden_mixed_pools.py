"""Golden test of an uneven expert split: 1 attention rank + 2 expert ranks, `expert_split: proportional` under
emulated A40 / V100 / T4 devices (the V100 takes 3 of each layer's 4 experts, the T4 one), equals stock
single-process training step for step (losses, grad norms, final weights), and its checkpoint is stock: it loads
in plain transformers, and a run resumed from it with the even split reaches the same weights."""

import pytest
from transformers import MixtralForCausalLM

from tests._assertions import assert_same_losses, assert_same_weights, logged
from tests._dist import spawn
from tests._jobs import train, train_under_launcher

pytestmark = pytest.mark.slow

PROPORTIONAL = {"attention_ranks": [0], "expert_split": "proportional",
                # D1's expert costs rank the devices (V100 ~2.8x a T4); the tiny model's numbers are untouched.
                "emulation": {"devices": ["A40", "V100", "T4"], "model": "D1"}}


def test_proportional_split_over_v100_and_t4_equals_stock(tmp_path):
    stock = train({"output_dir": str(tmp_path / "stock"), "final_dir": str(tmp_path / "stock_final")})
    spec = {"output_dir": str(tmp_path / "mixed"), "final_dir": str(tmp_path / "mixed_final"), "save_steps": 4}
    ours = spawn(3, train_under_launcher, PROPORTIONAL, spec)[0]
    owner = ours["placement"]["owner"]
    assert all(row == [1, 1, 1, 2] for row in owner.values()), owner  # uneven: 3 experts on the V100, 1 on the T4
    assert_same_losses(stock, ours)
    assert logged(ours, "grad_norm") == pytest.approx(logged(stock, "grad_norm"), rel=1e-5)
    assert_same_weights(tmp_path / "stock_final", tmp_path / "mixed_final")
    # The mid-run checkpoint written with the uneven split loads in plain transformers.
    assert isinstance(MixtralForCausalLM.from_pretrained(tmp_path / "mixed" / "checkpoint-4"), MixtralForCausalLM)
    resumed = {"output_dir": str(tmp_path / "mixed"), "final_dir": str(tmp_path / "resumed_even"),
               "resume_from": str(tmp_path / "mixed" / "checkpoint-4")}
    spawn(3, train_under_launcher, {"attention_ranks": [0]}, resumed)
    assert_same_weights(tmp_path / "stock_final", tmp_path / "resumed_even")


def test_proportional_on_devices_without_a_profile_fails_at_once_everywhere(tmp_path):
    """CPU ranks without emulation cannot be ranked by speed: every rank stops within seconds, told why."""
    with pytest.raises(AssertionError) as info:
        spawn(3, train_under_launcher, {"attention_ranks": [0], "expert_split": "proportional"},
              {"output_dir": str(tmp_path / "cpu"), "max_steps": 2}, timeout=120)
    message = str(info.value)
    assert "rank 1 runs on the reported device 'cpu'" in message and "expert_split: [2, 1]" in message
    assert "expert rank 2 stopped because the attention ranks failed" in message
