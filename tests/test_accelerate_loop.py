"""The Accelerate plugin: a custom loop on `Accelerator` with `hf_hetermoe.prepare` equals the same loop without it.

The loop is the shipped recipe (hf_hetermoe/recipes/train_loop.py): gradient accumulation 2 with
`accelerator.accumulate`, `accelerator.backward`, `clip_grad_norm_` on sync steps, AdamW with decay and no-decay
groups, a warm-up schedule, `save_state`/`load_state`, `get_state_dict` + `save_pretrained`. Here it runs
colocated over 2 gloo ranks without the launcher (each rank holds 2 of the 4 experts, so saving gathers from both);
tests/test_multinode.py runs it with expert ranks on other machines.
"""

import os

import pytest
import torch

from tests._accelerate_loop_jobs import loop_args, refusals, results, run_loop, stock_ddp
from tests._assertions import assert_same_weights
from tests._dist import spawn

pytestmark = pytest.mark.slow


def test_colocated_loop_equals_stock_ddp_and_resumes_exactly(tmp_path, tmp_path_factory):
    stock_dir, stock = stock_ddp(tmp_path_factory.getbasetemp())
    straight = str(tmp_path / "straight")
    spawn(2, run_loop, loop_args(straight, "--save_state_at", "4"))
    ours = results(straight)
    assert ours["experts"] == "rank 0: experts [0, 1] of every layer\nrank 1: experts [2, 3] of every layer"
    assert len(ours["losses"]) == 16
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(ours["grad_norms"]), torch.tensor(stock["grad_norms"]), rtol=1e-5, atol=0)
    assert_same_weights(os.path.join(stock_dir, "final"), os.path.join(straight, "final"))
    assert "hetermoe_experts_optimizer.safetensors" in os.listdir(os.path.join(straight, "state-4"))

    resumed = str(tmp_path / "resumed")
    spawn(2, run_loop, loop_args(resumed, "--resume_from", os.path.join(straight, "state-4")))
    after = results(resumed)
    torch.testing.assert_close(torch.tensor(after["losses"]), torch.tensor(stock["losses"][8:]), rtol=1e-5, atol=0)
    assert_same_weights(os.path.join(stock_dir, "final"), os.path.join(resumed, "final"))


def test_what_prepare_refuses():
    messages = spawn(1, refusals)[0]
    assert "does not hold the experts' `gate_up_proj`" in messages["optimizer"]
    assert "does not sync" in messages["clip_norm"] and "if accelerator.sync_gradients" in messages["clip_norm"]
    assert "clip_grad_value_ is not supported" in messages["clip_value"]
    assert "already" in messages["twice"]
    assert messages["other_norm"] > 0
