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
import threading
import time

import pytest
import torch
import torch.distributed as dist

from hf_hetermoe import cli, launch, launch_facts
from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.launch_facts import RankFacts
from hf_hetermoe.recipes import recipe_path
from tests._accelerate_loop_jobs import loop_args, results, stock_ddp
from tests._assertions import assert_same_weights
from tests._machines import launch_machines



@pytest.mark.slow
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


# ---- without processes: the launcher's arguments and the facts every rank reports ---------------------------------
@pytest.fixture
def started(monkeypatch):
    """Captures the launcher command instead of starting processes (CPU)."""
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    return calls


def launch_args(config, *args):
    return ["launch", "--config", config, *args, recipe_path("train_loop.py"), "--output_dir", "out"]


def test_equal_machines_start_accelerate_launch_with_its_multi_machine_arguments(started, tmp_path):
    accelerate_config = tmp_path / "acc.yaml"
    accelerate_config.write_text("distributed_type: MULTI_GPU\nmixed_precision: bf16\n")
    assert cli.main(launch_args(recipe_path("two_machines.yaml"), "--num-machines", "2", "--machine-rank", "1",
                                "--main-process-ip", "10.0.0.1", "--main-process-port", "29555",
                                "--num-processes", "4", "--config-file", str(accelerate_config))) == 0
    cmd, env = started[0]
    joined = " ".join(cmd)
    assert "accelerate.commands.launch --config_file" in joined and "--mixed_precision" not in cmd
    assert ("--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_port 29555 --main_process_ip "
            "10.0.0.1 -m hf_hetermoe.launch") in joined
    assert env[launch_facts.MACHINE_RANK_ENV] == "1"


def test_uneven_machines_start_torchrun_with_the_c10d_rendezvous(started):
    assert cli.main(launch_args(recipe_path("two_machines.yaml"), "--num-machines", "2", "--machine-rank", "1",
                                "--main-process-port", "29556", "--processes-per-machine", "1,2")) == 0
    cmd, env = started[0]
    joined = " ".join(cmd)
    assert "-m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d" in joined
    assert "--rdzv-endpoint 127.0.0.1:29556" in joined and "is_host=false" in joined
    assert env[launch_facts.MACHINE_RANK_ENV] == "1" and env["ACCELERATE_USE_CPU"] == "1"


@pytest.mark.parametrize("config_text, args, words", [
    ("attention_machines: [0]\n", ["--num-processes", "4", "--num-machines", "2", "--main-process-port", "1"],
     []),  # fine: the control case
    ("attention_machines: [0]\n", ["--num-processes", "3", "--num-machines", "2", "--main-process-port", "1"],
     ["does not divide over 2 machines", "--processes-per-machine"]),
    ("attention_machines: [0]\n", ["--num-processes", "4", "--num-machines", "2"], ["--main-process-port"]),
    ("attention_machines: [0]\n", ["--processes-per-machine", "1,2", "--num-machines", "3", "--main-process-port", "1"],
     ["one count", "3 machines"]),
    ("attention_machines: [0]\n", ["--processes-per-machine", "1,2", "--num-processes", "4", "--num-machines", "2",
                                    "--main-process-port", "1"], ["adds up to 3"]),
    ("attention_machines: [0]\n", ["--num-processes", "4", "--num-machines", "2", "--machine-rank", "2",
                                    "--main-process-port", "1"], ["--machine-rank 2"]),
    ("attention_machines: [0]\n", ["--num-processes", "4"], ["no expert rank"]),  # one machine: all attention
    ("attention_machines: [2]\n", ["--num-processes", "4", "--num-machines", "2", "--main-process-port", "1"],
     ["names machine(s) [2]"]),
])
def test_bad_launches_fail_before_any_process_starts(started, tmp_path, capsys, config_text, args, words):
    config = tmp_path / "cfg.yaml"
    config.write_text(config_text)
    code = cli.main(launch_args(str(config), *args))
    err = capsys.readouterr().err
    assert code == (0 if not words else 2), err
    assert len(started) == (0 if words else 1)
    for word in words:
        assert word in err


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA"])
def test_accelerate_configs_that_shard_the_model_are_refused(started, tmp_path, capsys, kind):
    accelerate_config = tmp_path / "acc.yaml"
    accelerate_config.write_text(f"distributed_type: {kind}\nnum_processes: 4\n")
    assert cli.main(launch_args(recipe_path("cpu_2attn_2exp.yaml"), "--config-file", str(accelerate_config))) == 2
    assert kind in capsys.readouterr().err and not started


def test_a_rank_that_fails_before_reporting_stops_the_others_at_once():
    store = dist.HashStore()
    errors: dict[int, BaseException] = {}

    def rank(r):
        try:
            launch_facts.exchange_facts(store, RankFacts(r, 0, "h", r, (0, 0)), 3, timeout_s=60)
        except ValueError as exc:
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    start = time.monotonic()
    for t in threads:
        t.start()
    launch_facts.report_failure(store, 2, "ValueError: LOCAL_RANK 2, but 2 GPU(s) are visible")
    for t in threads:
        t.join(timeout=30)
    assert time.monotonic() - start < 5  # not the 60 s timeout
    assert sorted(errors) == [0, 1] and "rank 2 failed before the job started: ValueError: LOCAL_RANK 2" in str(errors[0])
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] did not report within"):
        launch_facts.exchange_facts(dist.HashStore(), RankFacts(0, 0, "h", 0, (0, 0)), 2, timeout_s=0.2)


def test_machines_come_from_the_launcher_or_the_host():
    assert launch_facts.machine_of_this_process({"GROUP_RANK": "1", launch_facts.MACHINE_RANK_ENV: "0"}) == 0
    assert launch_facts.machine_of_this_process({"GROUP_RANK": "1"}) == 1
    assert launch_facts.machine_of_this_process({}) is None
    unnamed = [RankFacts(0, -1, "b", 0, (0, 0)), RankFacts(1, -1, "a", 0, (0, 0)), RankFacts(2, -1, "b", 1, (0, 0))]
    assert launch_facts.machine_ranks(launch_facts.number_machines(unnamed)) == [0, 1, 0]
    with pytest.raises(ValueError, match="same --machine-rank"):
        launch_facts.check_machines([RankFacts(0, 0, "a", 0, (0, 0)), RankFacts(1, 0, "b", 0, (0, 0))])
    with pytest.raises(ValueError, match="must be 0..1"):
        launch_facts.check_machines([RankFacts(0, 0, "a", 0, (0, 0)), RankFacts(1, 2, "b", 0, (0, 0))])


def test_attention_world_of_uneven_machines_comes_from_the_facts(monkeypatch):
    """Machine 0 runs one expert server (rank 0); machine 1 runs two attention ranks (1, 2). `rank //
    LOCAL_WORLD_SIZE` would put ranks 1 and 2 on different machines."""
    facts = [RankFacts(0, 0, "a", 0, (0, 0)), RankFacts(1, 1, "b", 0, (0, 0)), RankFacts(2, 1, "b", 1, (0, 0))]
    topology = HeterMoEConfig.from_dict({"attention_machines": [1]}).resolve_topology(
        3, None, launch_facts.machine_ranks(facts))
    for name, value in {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    launch._rewrite_env_for_attention_world(topology, 2, torch.device("cpu"), facts)
    assert [os.environ[n] for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["1", "2", "1", "2"]
    # On GPUs the same facts decide which local ranks must run attention (Accelerate's local main process).
    launch.check_attention_first(topology, facts)
    mixed = HeterMoEConfig.from_dict({"attention_ranks": [0, 2]}).resolve_topology(3)
    with pytest.raises(ValueError, match=r"node 1 on its local ranks \[1\]"):
        launch.check_attention_first(mixed, facts)
