"""Several machines on one host: `hetermoe launch` started once per machine, golden against stock DDP.

Each `hetermoe launch` process acts as one machine (same --main-process-ip/--main-process-port, its own
--machine-rank). The job is the Accelerate-loop recipe (hf_hetermoe/recipes/train_loop.py), whose stock run is DDP
over 2 ranks; in both jobs below the attention world is 2 ranks too, so losses, gradient norms and weights must
equal stock's:
- 2 + 2 processes (accelerate launch, static rendezvous): machine 0 runs attention, machine 1 serves the experts;
  it saves its state after step 4;
- 1 + 2 processes (torchrun, c10d rendezvous: accelerate cannot start uneven machines): machine 1's two processes
  run attention, machine 0's one process serves all experts, whatever global ranks the rendezvous hands out; it
  resumes from the 2 + 2 job's step-4 state (another expert layout) and must end at stock's final weights.
"""

import os
import re

import pytest
import torch

from hf_hetermoe.recipes import recipe_path
from tests._accelerate_loop_jobs import loop_args, results, stock_ddp
from tests._assertions import assert_same_weights
from tests._machines import launch_machines

pytestmark = pytest.mark.slow


def test_two_machines_then_uneven_machines_resuming_equal_stock_ddp(tmp_path, tmp_path_factory):
    stock_dir, stock = stock_ddp(tmp_path_factory.getbasetemp())
    script = recipe_path("train_loop.py")

    two = str(tmp_path / "two")
    launch_machines(recipe_path("two_machines.yaml"), [script, *loop_args(two, "--save_state_at", "4")],
                    num_machines=2, machine_args=["--num-processes", "4"], log_dir=str(tmp_path))
    ours = results(two)
    assert ours["world"] == 2  # Accelerate on the attention ranks sees the attention world
    assert ours["experts"] == "rank 2: experts [0, 1] of every layer\nrank 3: experts [2, 3] of every layer"
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(ours["grad_norms"]), torch.tensor(stock["grad_norms"]), rtol=1e-5, atol=0)
    assert_same_weights(os.path.join(stock_dir, "final"), os.path.join(two, "final"))

    config = tmp_path / "uneven.yaml"
    config.write_text("attention_machines: [1]\n")
    uneven = str(tmp_path / "uneven")
    launch_machines(str(config), [script, *loop_args(uneven, "--resume_from", os.path.join(two, "state-4"))],
                           num_machines=2, machine_args=["--processes-per-machine", "1,2"], log_dir=str(tmp_path))
    resumed = results(uneven)
    assert resumed["world"] == 2
    assert re.fullmatch(r"rank \d: experts \[0, 1, 2, 3\] of every layer", resumed["experts"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(stock["losses"][8:]), rtol=1e-5, atol=0)
    assert_same_weights(os.path.join(stock_dir, "final"), os.path.join(uneven, "final"))
