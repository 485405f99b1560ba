"""`hetermoe launch` on GPUs, checked on CPU with an injected GPU list: attention ranks are local ranks 0..A-1
(so Accelerate's local main process runs attention), `attention_ranks: auto` orders CUDA_VISIBLE_DEVICES newest
generation first, and impossible launches fail before any process starts."""

from __future__ import annotations

import pytest
import torch

from hf_hetermoe import cli, launch
from hf_hetermoe.cli import Gpu
from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.launch import check_attention_ranks_first, planned_facts
from hf_hetermoe.recipes import recipe_path

V100, A100, H100 = ("Tesla V100-SXM2-32GB", (7, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA H100", (9, 0))


def gpus(*kinds, ids=None):
    ids = ids or [str(i) for i in range(len(kinds))]
    return [Gpu(i, name, cap) for i, (name, cap) in zip(ids, kinds)]


@pytest.fixture
def started(monkeypatch):
    """Captures the launcher command instead of starting processes."""
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return calls


def launch_with(tmp_path, monkeypatch, config_text, nproc, visible):
    monkeypatch.setattr(cli, "query_gpus", lambda: visible)
    config = tmp_path / "cfg.yaml"
    config.write_text(config_text)
    return cli.main(["launch", "--config", str(config), "--num-processes", str(nproc), recipe_path("train_clm.py")])


def test_auto_orders_the_gpus_newest_first(tmp_path, monkeypatch, capsys, started):
    assert launch_with(tmp_path, monkeypatch, "attention_ranks: auto\n", 4, gpus(V100, A100, V100, A100)) == 0
    (cmd, env), = started
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3,0,2"
    assert "ACCELERATE_USE_CPU" not in env
    assert "CUDA_VISIBLE_DEVICES=1,3,0,2" in capsys.readouterr().err
    # What the ranks then see: local rank i on the i-th GPU of the new order; auto picks local ranks 0 and 1.
    caps = [A100[1], A100[1], V100[1], V100[1]]
    topology = HeterMoEConfig.from_dict({"attention_ranks": "auto"}).resolve_topology(4, caps)
    assert topology.attention_ranks == (0, 1)
    check_attention_ranks_first(topology, 4)


def test_auto_keeps_visible_ids_and_an_order_that_is_already_right(monkeypatch):
    config = HeterMoEConfig.from_dict({"attention_ranks": "auto"})
    uuids = ["GPU-aa", "GPU-bb", "GPU-cc"]
    assert cli.gpu_environment(config, 3, gpus(V100, H100, A100, ids=uuids)) == {
        "CUDA_VISIBLE_DEVICES": "GPU-bb,GPU-cc,GPU-aa"}
    assert cli.gpu_environment(config, 3, gpus(H100, A100, V100)) == {}
    # Fewer processes than GPUs: the newest ones are used.
    assert cli.gpu_environment(config, 2, gpus(V100, V100, H100)) == {"CUDA_VISIBLE_DEVICES": "2,0,1"}


def test_auto_on_one_generation_fails_before_starting(tmp_path, monkeypatch, capsys, started):
    assert launch_with(tmp_path, monkeypatch, "attention_ranks: auto\n", 2, gpus(A100, A100)) == 2
    assert not started
    err = capsys.readouterr().err
    assert "attention_ranks" in err and "same device generation" in err


def test_explicit_attention_ranks_must_be_the_first_local_ranks(tmp_path, monkeypatch, capsys, started):
    text = "attention_ranks: [2, 3]\nexpert_ranks: [0, 1]\n"
    assert launch_with(tmp_path, monkeypatch, text, 4, gpus(V100, V100, A100, A100)) == 2
    assert not started
    err = capsys.readouterr().err
    assert "`attention_ranks` [2, 3]" in err and "local ranks [2, 3]" in err
    assert "local rank 0" in err and "as [0, 1]" in err and "CUDA_VISIBLE_DEVICES=2,3,0,1" in err
    assert "attention_ranks: auto" in err
    # The same ranks listed first start.
    assert launch_with(tmp_path, monkeypatch, "attention_ranks: [0, 1]\n", 4, gpus(A100, A100, V100, V100)) == 0
    assert len(started) == 1 and "CUDA_VISIBLE_DEVICES" not in started[0][1]


def test_more_processes_than_gpus_fails_before_starting(tmp_path, monkeypatch, capsys, started):
    assert launch_with(tmp_path, monkeypatch, "attention_ranks: [0]\n", 3, gpus(H100, V100)) == 2
    assert not started
    err = capsys.readouterr().err
    assert "--num-processes 3" in err and "2 GPU(s)" in err
    assert "at most 2 processes" in err and "ACCELERATE_USE_CPU=1" in err


def test_colocated_on_gpus_needs_only_a_gpu_per_process(tmp_path, monkeypatch, started):
    assert launch_with(tmp_path, monkeypatch, "mode: colocated\n", 2, gpus(V100, H100)) == 0
    assert "CUDA_VISIBLE_DEVICES" not in started[0][1]


def test_cpu_launches_do_not_ask_for_gpus(tmp_path, monkeypatch, capsys, started):
    def no_query():
        raise AssertionError("GPUs queried for a CPU launch")

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    config = tmp_path / "cfg.yaml"
    config.write_text("attention_ranks: [2, 3]\nexpert_ranks: [0, 1]\n")  # any order is fine on CPU
    monkeypatch.setattr(cli, "query_gpus", no_query)
    assert cli.main(["launch", "--config", str(config), "--num-processes", "4", recipe_path("train_clm.py")]) == 0
    assert started[0][1]["ACCELERATE_USE_CPU"] == "1"
    # No GPU at all: CPU processes; `auto` cannot work there and says so before starting.
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert launch_with(tmp_path, monkeypatch, "attention_ranks: auto\n", 2, []) == 2
    assert "same device generation" in capsys.readouterr().err
    assert len(started) == 1


def test_the_check_is_per_node():
    config = HeterMoEConfig.from_dict({"attention_ranks": [0, 1, 4, 5]})
    check_attention_ranks_first(config.resolve_topology(8), 4)
    check_attention_ranks_first(HeterMoEConfig.from_dict({"attention_ranks": [0, 1, 2, 3]}).resolve_topology(8), 4)
    with pytest.raises(ValueError, match=r"node 1 on its local ranks \[0, 2\].*as \[4, 5\].*CUDA_VISIBLE_DEVICES=0,2,1,3"):
        check_attention_ranks_first(HeterMoEConfig.from_dict({"attention_ranks": [0, 1, 4, 6]}).resolve_topology(8), 4)


def test_every_rank_refuses_attention_off_local_rank_0_on_gpus(monkeypatch):
    """Ranks started by plain `accelerate launch` (no GPU ordering) fail alike, before any group is built."""
    monkeypatch.setattr(launch, "_device", lambda local_rank: torch.device("cuda", local_rank))
    monkeypatch.setattr(launch, "connect_store", lambda **kwargs: object())
    monkeypatch.setattr(launch, "_capability", lambda device: (8, 0))
    # What the four ranks of one machine report (launch_facts.py); the check reads machines from these facts.
    monkeypatch.setattr(launch.launch_facts, "exchange_facts", lambda store, mine, world, timeout: planned_facts([4]))
    monkeypatch.setattr(launch, "_start_health", lambda *args: pytest.fail("got past the check"))
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    config = HeterMoEConfig.from_dict({"attention_ranks": [2, 3]})
    with pytest.raises(ValueError, match="must be the node's first local ranks"):
        launch.run_rank(config, lambda: None)


def test_a_rank_beyond_the_visible_gpus_is_named(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set an invalid device"))
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2, but 2 GPU\(s\) are visible.*at most 2 processes per node"):
        launch._device(2)


def test_auto_across_machines_uses_every_ranks_reported_gpu(monkeypatch):
    """Machine 0 has 2 H100s, machine 1 has 3 V100s (uneven); every rank reports its GPU, and `auto` picks the
    H100 ranks. The facts, not rank arithmetic, also tell each attention rank its local world."""
    from hf_hetermoe.launch_facts import RankFacts

    facts = [RankFacts(r, 0 if r < 2 else 1, "h100-node" if r < 2 else "v100-node", r if r < 2 else r - 2,
                       (9, 0) if r < 2 else (7, 0)) for r in range(5)]
    seen = {}
    monkeypatch.setattr(launch, "_device", lambda local_rank: torch.device("cuda", local_rank))
    monkeypatch.setattr(launch, "connect_store", lambda **kwargs: object())
    monkeypatch.setattr(launch, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(launch.launch_facts, "exchange_facts", lambda store, mine, world, timeout: facts)
    monkeypatch.setattr(launch, "_start_health", lambda *args: None)
    monkeypatch.setattr(launch, "_run_role", lambda config, main, store, topology, *rest: seen.update(topology=topology))
    for name, value in {"RANK": "1", "WORLD_SIZE": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    launch.run_rank(HeterMoEConfig.from_dict({"attention_ranks": "auto"}), lambda: None)
    assert seen["topology"].attention_ranks == (0, 1) and seen["topology"].expert_ranks == (2, 3, 4)
