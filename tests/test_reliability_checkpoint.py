"""Checkpoints survive interruption: checkpoint-N appears only complete; a process killed in the middle of a
save leaves the previous checkpoint complete and loadable, and resuming from it reaches the weights of an
uninterrupted run; resuming loads nothing with a full unpickler; versions are checked.

The interrupted run is a separate process (single process, HeterMoE colocated), killed with SIGKILL from inside
the Trainer's save of checkpoint-4, after the model and optimizer files and before the RNG and Trainer state.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralForCausalLM
from transformers.trainer_utils import get_last_checkpoint

from hf_hetermoe import atomic_checkpoint as ac
from hf_hetermoe.checkpoint import EXPERT_OPTIMIZER_FILE, EXPERT_OPTIMIZER_FORMAT, check_expert_optimizer_file
from hf_hetermoe.versions import UnsupportedVersionError, check_versions
from tests._jobs import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
COMPLETE = {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            EXPERT_OPTIMIZER_FILE}

KILL_IN_SAVE = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from transformers import Trainer
from tests._jobs import train

original = Trainer._save_rng_state

def killed_while_saving(self, output_dir):
    if self.state.global_step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a preempted node would
    return original(self, output_dir)

Trainer._save_rng_state = killed_while_saving
train(json.loads({spec!r}))
"""


def spec_for(base, name, **extra) -> dict:
    return {"output_dir": str(base / name), "final_dir": str(base / f"{name}_final"), "max_steps": STEPS,
            "save_steps": 2, "grad_accum": 1, **extra}


def weights(folder) -> dict:
    return MixtralForCausalLM.from_pretrained(folder).state_dict()


def max_difference(a_folder, b_folder) -> float:
    a, b = weights(a_folder), weights(b_folder)
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- the staging folder, without processes ------------------------------------------------------------------------
def _files(folder) -> set[str]:
    return set(os.listdir(folder))


def test_publish_replaces_atomically_and_recover_cleans_up(tmp_path):
    run = tmp_path / "run"
    root = ac.prepare(str(run), 7)
    staged = os.path.join(root, "checkpoint-7")
    os.makedirs(staged)
    (tmp_path / "run" / ".hetermoe-staging-7" / "checkpoint-7" / "a.bin").write_bytes(b"new")
    assert get_last_checkpoint(str(run)) is None  # a staging folder is never a checkpoint
    assert ac.publish(staged, str(run / "checkpoint-7"))
    assert _files(run) == {"checkpoint-7"} and (run / "checkpoint-7" / "a.bin").read_bytes() == b"new"
    assert not ac.publish(staged, str(run / "checkpoint-7"))  # already published (e.g. by another node)

    # Re-saving step 7 replaces the folder; a crash between the two renames is undone by recover().
    os.rename(run / "checkpoint-7", run / ".hetermoe-replaced-checkpoint-7")
    (run / ".hetermoe-staging-9").mkdir()
    assert len(ac.recover(str(run))) == 2
    assert _files(run) == {"checkpoint-7"}
    root = ac.prepare(str(run), 7)
    os.makedirs(os.path.join(root, "checkpoint-7"))
    (run / ".hetermoe-staging-7" / "checkpoint-7" / "a.bin").write_bytes(b"newer")
    ac.publish(os.path.join(root, "checkpoint-7"), str(run / "checkpoint-7"))
    assert _files(run) == {"checkpoint-7"} and (run / "checkpoint-7" / "a.bin").read_bytes() == b"newer"


# ---- a save killed half-way, then resume ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    spec = spec_for(base, "run", colocated_callback=True)
    code = KILL_IN_SAVE.format(repo=REPO, kill_at=4, spec=json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    return base, spec, result


@pytest.mark.slow
def test_a_save_killed_half_way_leaves_the_previous_checkpoint_complete(interrupted):
    base, spec, result = interrupted
    assert result.returncode == -9, result.stderr[-3000:]  # killed inside the save, as arranged
    run = base / "run"
    entries = _files(run)
    assert "checkpoint-2" in entries and "checkpoint-4" not in entries, entries
    # The interrupted save got as far as the model and optimizer files, in its staging folder only.
    partial = _files(run / ".hetermoe-staging-4" / "checkpoint-4")
    assert {"model.safetensors", "optimizer.pt", EXPERT_OPTIMIZER_FILE} <= partial and "trainer_state.json" not in partial
    assert COMPLETE <= _files(run / "checkpoint-2")
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert isinstance(MixtralForCausalLM.from_pretrained(run / "checkpoint-2"), MixtralForCausalLM)


@pytest.mark.slow
def test_resume_after_the_kill_reaches_the_uninterrupted_weights(interrupted, monkeypatch):
    base, spec, _ = interrupted
    # Uninterrupted references in this process: HeterMoE (colocated) and stock transformers.
    train(spec_for(base, "straight", colocated_callback=True))
    train(spec_for(base, "stock"))

    loads = []
    original_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append((str(args[0]) if args else "?", kwargs.get("weights_only")))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(spec | {"resume_from": True})  # resume_from_checkpoint=True: the Trainer picks checkpoint-2
    monkeypatch.undo()

    assert max_difference(base / "run_final", base / "straight_final") <= 1e-5
    assert max_difference(base / "straight_final", base / "stock_final") <= 1e-5
    # Every file the Trainer loaded on resume went through torch.load's restricted (weights-only) unpickler.
    assert loads and all(weights_only is True for _, weights_only in loads), loads
    assert any("checkpoint-2" in path for path, _ in loads)
    run = base / "run"
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6"} <= _files(run)
    assert not [name for name in _files(run) if name.startswith(".hetermoe-")]  # the stale staging folder is gone
    assert COMPLETE <= _files(run / "checkpoint-4")


# ---- versions ------------------------------------------------------------------------------------------------------
def test_versions_outside_the_supported_range_fail_clearly():
    check_versions()  # this environment is supported
    good = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "accelerate": "1.15.0"}
    check_versions(good | {"transformers": "5.3.0.dev0"})
    for package, version in [("transformers", "4.57.1"), ("transformers", "6.0.0"), ("accelerate", "1.9.0"),
                             ("torch", "2.5.1"), ("torch", "garbage")]:
        with pytest.raises(UnsupportedVersionError) as info:
            check_versions(good | {package: version})
        message = str(info.value)
        assert f"{package} {version}" in message and "pip install" in message, message
    assert issubclass(UnsupportedVersionError, ImportError)


def test_a_checkpoint_from_another_hf_hetermoe_version_warns(tmp_path, caplog):
    path = str(tmp_path / EXPERT_OPTIMIZER_FILE)
    tensors = {"model.layers.0.mlp.experts.down_proj#exp_avg": torch.zeros(2, 3)}
    save_file(tensors, path, metadata={"format": EXPERT_OPTIMIZER_FORMAT, "hf_hetermoe_version": "0.0.1"})
    with caplog.at_level(logging.WARNING, logger="hf_hetermoe.checkpoint"):
        check_expert_optimizer_file(path)
    assert "hf-hetermoe 0.0.1" in caplog.text
    caplog.clear()
    from hf_hetermoe import __version__

    save_file(tensors, path, metadata={"format": EXPERT_OPTIMIZER_FORMAT, "hf_hetermoe_version": __version__})
    with caplog.at_level(logging.WARNING, logger="hf_hetermoe.checkpoint"):
        check_expert_optimizer_file(path)
    assert caplog.text == ""
    save_file(tensors, path, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="format"):
        check_expert_optimizer_file(path)
    with open(path, "r+b") as fh:  # truncated: the atomic writer never leaves this, but a copy might
        fh.truncate(20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        check_expert_optimizer_file(path)
