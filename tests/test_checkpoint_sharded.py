"""Pretrained and sharded checkpoints: `from_pretrained` of a sharded checkpoint (several safetensors files and an
index) trains equal to stock, and resuming from a sharded checkpoint written during training reaches the weights
of an uninterrupted stock run, under 1 attention + 2 expert ranks and colocated.

transformers shards the in-memory tensors and then splits them into stock keys, so the w1 and w3 halves of a
layer's fused `gate_up_proj` land in different files: the Trainer's resume loads one file at a time and no
single file completes that tensor (the test checks the checkpoint it resumes from is laid out so).

The resume reference is an uninterrupted stock run, not a stock resume: stock transformers 5.x resume of Mixtral
does not convert the file's keys (it loads them with `strict=False` and leaves the router and experts as they
were), so a stock resume ends measurably off its own uninterrupted run (README, "Honest limits").
"""

from __future__ import annotations

import json
import os
import re

import pytest
from transformers import MixtralForCausalLM

from tests._assertions import assert_same_losses, stock_weights
from tests._checkpoint_jobs import SHARD_SIZE, run, write_pretrained
from tests._dist import spawn

pytestmark = pytest.mark.slow  # multi-process jobs

M1 = {"attention_ranks": [0]}  # rank 0 attention, ranks 1-2 expert servers


def assert_same_weights(folder_a, folder_b, atol=1e-5) -> None:
    a, b = stock_weights(folder_a), stock_weights(folder_b)
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\n{folder_b.name} vs {folder_a.name}: weights max {worst:.3g}")
    assert worst <= atol, f"weights differ by {worst:.3g}"


def assert_sharded_with_split_experts(folder) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert not (folder / "model.safetensors").exists()
    files = set(index.values())
    gate_up = {f for k, f in index.items() if re.search(r"layers\.0\..*experts\.\d+\.w[13]\.", k)}
    assert len(files) > 3 and len(gate_up) > 1, (len(files), gate_up)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    write_pretrained(str(base / "pretrained"), max_shard_size=SHARD_SIZE)
    assert_sharded_with_split_experts(base / "pretrained")
    return base


def spec(base, name: str, **extra) -> dict:
    return {"pretrained": str(base / "pretrained"), "output_dir": str(base / name),
            "final_dir": str(base / f"{name}_final"), **extra}


@pytest.fixture(scope="module")
def stock(base):
    """Stock transformers, one process, 8 steps from the sharded pretrained checkpoint, uninterrupted."""
    return run(None, spec(base, "stock"))


def test_sharded_pretrained_trains_equal_to_stock_and_resumes(base, stock):
    # Load: HeterMoE from the same sharded checkpoint, writing sharded checkpoints at step 4.
    saving = {"save_steps": 4, "max_shard_size": SHARD_SIZE}
    disaggregated = spawn(3, run, M1, spec(base, "m1", **saving))[0]
    colocated = run(None, spec(base, "colocated", colocated_callback=True, **saving))
    for ours, name in ((disaggregated, "m1"), (colocated, "colocated")):
        assert_same_losses(stock, ours)
        assert_same_weights(base / "stock_final", base / f"{name}_final")
        checkpoint = base / name / "checkpoint-4"
        assert_sharded_with_split_experts(checkpoint)
        assert isinstance(MixtralForCausalLM.from_pretrained(checkpoint), MixtralForCausalLM)

    # Resume from step 4 of the other topology's sharded checkpoint (the expert optimizer state is topology
    # independent): both end at the uninterrupted stock run's weights.
    run(None, spec(base, "colocated_resumed", colocated_callback=True,
                   resume_from=str(base / "m1" / "checkpoint-4")))
    assert_same_weights(base / "stock_final", base / "colocated_resumed_final")
    spawn(3, run, M1, spec(base, "m1_resumed", resume_from=str(base / "colocated" / "checkpoint-4")))
    assert_same_weights(base / "stock_final", base / "m1_resumed_final")
    assert not os.path.exists(base / "m1_resumed" / "checkpoint-8")  # no saves configured: nothing written
