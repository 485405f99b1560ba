"""Golden tests, multi-process on gloo: HeterMoE training equals stock training, step for step.

8 optimizer steps of a tiny Mixtral (random init from a fixed seed, AdamW, warm-up + linear decay, clipping,
gradient accumulation 2, aux loss on) through the stock Trainer: per-micro-batch losses (rtol 1e-5) and final
weights (atol 1e-5) equal stock transformers, single process for M=1 and stock DDP over M gloo ranks for M=2.
Disaggregated runs use zebra parallelism with the default R = 2 unless a test sets R (1 and 4 below).
Checkpoints load into stock MixtralForCausalLM; resuming from step 4 reaches the straight run's weights.
"""

import json
import os

import pytest
from safetensors import safe_open
from transformers import MixtralForCausalLM

from hf_hetermoe.checkpoint import EXPERT_OPTIMIZER_FILE
from tests._assertions import assert_same_losses, assert_same_weights, logged
from tests._dist import spawn
from tests._jobs import PROMPT, train, train_under_launcher
from tests._zebra_jobs import train_each

pytestmark = pytest.mark.slow  # every test here runs multi-process jobs

M1 = {"attention_ranks": [0]}          # rank 0 attention, the rest expert servers
M2 = {"attention_ranks": [0, 1]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="module")
def stock_single(base):
    """Stock transformers, one process (the reference for M = 1)."""
    runs = {}
    for checkpointing in (False, True):
        name = f"stock_single_gc{int(checkpointing)}"
        runs[checkpointing] = train({"output_dir": str(base / name), "final_dir": str(base / f"{name}_final"),
                                     "gradient_checkpointing": checkpointing})
    return runs


@pytest.fixture(scope="module")
def stock_ddp(base):
    """Stock transformers, DDP over 2 gloo ranks (the reference for M = 2), with evaluation and generate."""
    spec = {"output_dir": str(base / "ddp"), "final_dir": str(base / "ddp_final"), "eval_steps": 4, "generate": True}
    return spawn(2, train, spec)[0]


def test_m1_n1_gradient_checkpointing_and_push_to_hub(base, stock_single):
    hub = base / "hub"
    spec = {"output_dir": str(base / "m1n1"), "final_dir": str(base / "m1n1_final"),
            "gradient_checkpointing": True, "push_to_dir": str(hub)}
    ours = spawn(2, train_under_launcher, M1, spec)[0]
    assert_same_losses(stock_single[True], ours)
    assert_same_weights(base / "stock_single_gc1_final", base / "m1n1_final")
    # The uploaded folder is the complete stock checkpoint.
    pushed = hub / "local" / "tiny-mixtral"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(pushed))
    assert_same_weights(pushed, base / "m1n1_final", atol=0)


def test_m1_n2_and_resume(base, stock_single):
    straight = {"output_dir": str(base / "m1n2"), "final_dir": str(base / "m1n2_final"), "save_steps": 4}
    ours = spawn(3, train_under_launcher, M1, straight)[0]
    assert_same_losses(stock_single[False], ours)
    assert_same_weights(base / "stock_single_gc0_final", base / "m1n2_final")
    assert logged(ours, "grad_norm") == pytest.approx(logged(stock_single[False], "grad_norm"), rel=1e-5)

    checkpoint = base / "m1n2" / "checkpoint-4"
    # A mid-run checkpoint is stock too, with the experts' optimizer state beside the Trainer's.
    assert isinstance(MixtralForCausalLM.from_pretrained(checkpoint), MixtralForCausalLM)
    with safe_open(checkpoint / EXPERT_OPTIMIZER_FILE, "pt") as fh:
        keys = list(fh.keys())
        assert fh.metadata()["format"].startswith("hf-hetermoe")
        optimizer = json.loads(fh.metadata()["optimizer"])
    assert optimizer["class"] == "torch.optim.adamw:AdamW" and optimizer["groups"][0]["hyperparams"]["weight_decay"] == 0.01
    assert "model.layers.0.mlp.experts.gate_up_proj#exp_avg" in keys

    # Resume from step 4 in fresh processes: same topology, then a different number of expert ranks.
    resumed = {"output_dir": str(base / "m1n2"), "final_dir": str(base / "resumed_n2"), "resume_from": str(checkpoint)}
    spawn(3, train_under_launcher, M1, resumed)
    assert_same_weights(base / "m1n2_final", base / "resumed_n2")
    resumed_n1 = resumed | {"output_dir": str(base / "m1n1_resume"), "final_dir": str(base / "resumed_n1")}
    spawn(2, train_under_launcher, M1, resumed_n1)
    assert_same_weights(base / "m1n2_final", base / "resumed_n1")


def test_m2_n2_equals_stock_ddp_with_eval_and_generate(base, stock_ddp):
    spec = {"output_dir": str(base / "m2n2"), "final_dir": str(base / "m2n2_final"), "eval_steps": 4, "generate": True}
    ours = spawn(4, train_under_launcher, M2, spec)[0]
    assert_same_losses(stock_ddp, ours)
    assert_same_weights(base / "ddp_final", base / "m2n2_final")
    assert logged(ours, "eval_loss") == pytest.approx(logged(stock_ddp, "eval_loss"), rel=1e-5)
    assert len(logged(ours, "eval_loss")) == 2
    assert ours["generated"] == stock_ddp["generated"]
    assert ours["generated"][0][: len(PROMPT[0])] == PROMPT[0] and len(ours["generated"][0]) == len(PROMPT[0]) + 8


def test_zebra_r1_r4_and_checkpointing_m1(base, stock_single):
    """R = 1 (DistEP) and R = 4 stripes, plain and with gradient checkpointing, on 1 attention + 1 expert rank.
    (R = 2, the default, runs in the other tests.)"""
    runs = [({"zebra": {"microbatches": r}}, {"output_dir": str(base / f"z{r}gc{int(gc)}"),
                                              "final_dir": str(base / f"z{r}gc{int(gc)}_final"),
                                              "gradient_checkpointing": gc})
            for r, gc in ((1, False), (4, False), (4, True))]
    results = spawn(2, train_each, M1, runs)[0]
    for (config, spec), ours in zip(runs, results):
        gc = spec["gradient_checkpointing"]
        assert_same_losses(stock_single[gc], ours)
        assert_same_weights(base / f"stock_single_gc{int(gc)}_final", spec["final_dir"])


def test_zebra_r1_r4_m2(base, stock_ddp):
    runs = [({"zebra": {"microbatches": r}}, {"output_dir": str(base / f"m2z{r}"), "final_dir": str(base / f"m2z{r}_final")})
            for r in (1, 4)]
    results = spawn(4, train_each, M2, runs)[0]
    for (config, spec), ours in zip(runs, results):
        assert_same_losses(stock_ddp, ours)
        assert_same_weights(base / "ddp_final", spec["final_dir"])


def test_colocated_two_ranks_without_launcher_equals_stock_ddp(base, stock_ddp):
    spec = {"output_dir": str(base / "coloc"), "final_dir": str(base / "coloc_final"), "eval_steps": 4,
            "generate": True, "colocated_callback": True}
    ours = spawn(2, train, spec)[0]
    assert_same_losses(stock_ddp, ours)
    assert_same_weights(base / "ddp_final", base / "coloc_final")
    assert ours["generated"] == stock_ddp["generated"]


def _failing_job(hetermoe_config):
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    def attention_main():
        raise RuntimeError("the training script broke")

    run_rank(HeterMoEConfig.from_dict(hetermoe_config), attention_main)


def test_failure_on_attention_rank_stops_the_servers():
    with pytest.raises(AssertionError) as info:
        spawn(2, _failing_job, M1, timeout=120)
    message = str(info.value)
    assert "the training script broke" in message  # rank 0's own error
    assert "expert rank 1 stopped because the attention ranks failed" in message  # the server was told why
