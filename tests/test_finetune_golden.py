"""Golden tests for existing fine-tuning scripts: TRL's SFTTrainer (full, with padding and with packing), SFTTrainer +
PEFT LoRA on attention, and frozen routed experts equal stock training, under 1 attention + 2 expert ranks (against
stock single-process) and colocated over 2 ranks (against stock DDP): per-micro-batch losses and aux losses
(rtol 1e-5), logged gradient norms, adapter and final weights (atol 1e-5), all fp32. Plus: `report_to="tensorboard"`
gets the hetermoe_* metrics into the event files, and bf16 autocast equals stock bf16, which is what the old
callback (model prepared before SFTTrainer replaced its forward) got wrong.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_hetermoe.checkpoint import EXPERT_OPTIMIZER_FILE
from tests._assertions import assert_same_weights, logged, max_weight_difference, stock_weights
from tests._dist import spawn
from tests._finetune_jobs import build_model, sft_each, sft_each_under_launcher

pytestmark = pytest.mark.slow  # every test here runs multi-process jobs

M1 = {"attention_ranks": [0]}  # rank 0 attention, ranks 1 and 2 expert servers
STEPS = 6


def _runs(base, tag: str, *, colocated: bool = False) -> list[dict]:
    """The fine-tuning runs every topology trains, in this order; `tag` names this topology's folders."""
    def spec(name: str, **extra) -> dict:
        return {"output_dir": str(base / f"{tag}_{name}"), "final_dir": str(base / f"{tag}_{name}_final"),
                "max_steps": STEPS, "colocated_callback": colocated, **extra}

    return [
        spec("padding", tensorboard=True),
        spec("packing", packing=True),
        spec("lora", lora=True, merged_dir=str(base / f"{tag}_lora_merged")),
        spec("frozen", freeze_experts=True, save_steps=STEPS),
    ]


NAMES = ["padding", "packing", "lora", "frozen"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def stock_single(base):
    return dict(zip(NAMES, spawn(1, sft_each, _runs(base, "single"))[0]))


@pytest.fixture(scope="module")
def stock_ddp(base):
    runs = _runs(base, "ddp") + [
        {"output_dir": str(base / "ddp_bf16"), "final_dir": str(base / "ddp_bf16_final"), "max_steps": STEPS,
         "bf16": True},
        # The same stock run with the clipping threshold moved by two float32 ulps: how far bf16 autocast carries
        # a last-bit change of the clip coefficient (the bf16 check below is held to this measured distance).
        {"output_dir": str(base / "ddp_bf16_nudged"), "final_dir": str(base / "ddp_bf16_nudged_final"),
         "max_steps": STEPS, "bf16": True, "max_grad_norm": 0.5 * (1 + 2.0 ** -22)},
    ]
    return dict(zip(NAMES + ["bf16", "bf16_nudged"], spawn(2, sft_each, runs)[0]))


def _close(ours: list[float], reference: list[float], rtol: float = 1e-5) -> None:
    assert len(ours) == len(reference) == 2 * STEPS
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference), rtol=rtol, atol=0)


def _check_same_as_stock(base, tag: str, ref_tag: str, ours: dict, reference: dict) -> None:
    for name in NAMES:
        _close(ours[name]["losses"], reference[name]["losses"])
        _close(ours[name]["aux_losses"], reference[name]["aux_losses"])
        assert logged(ours[name], "grad_norm") == pytest.approx(logged(reference[name], "grad_norm"), rel=1e-5)
    for name in ("padding", "packing", "frozen"):
        assert_same_weights(base / f"{ref_tag}_{name}_final", base / f"{tag}_{name}_final")

    # LoRA: the stock adapter file, equal to stock's; the base model untouched; merging works after training.
    adapter = load_file(base / f"{tag}_lora_final" / "adapter_model.safetensors")
    stock_adapter = load_file(base / f"{ref_tag}_lora_final" / "adapter_model.safetensors")
    assert set(adapter) == set(stock_adapter) and any("q_proj.lora_B" in k for k in adapter)
    assert max((adapter[k] - stock_adapter[k]).abs().max().item() for k in adapter) <= 1e-5
    assert_same_weights(base / f"{ref_tag}_lora_merged", base / f"{tag}_lora_merged")
    initial = build_model({}).state_dict()
    merged = stock_weights(base / f"{tag}_lora_merged")
    assert all(torch.equal(merged[k], initial[k]) for k in initial if ".experts." in k)
    assert any(not torch.equal(merged[k], initial[k]) for k in initial if "q_proj" in k)  # the adapter was merged

    # Frozen experts: never updated, no optimizer state on any holder (no expert-optimizer file in the checkpoint,
    # which gathers every holder's state), nothing in the global norm (grad_norm equal above); the rest trains.
    frozen = stock_weights(base / f"{tag}_frozen_final")
    assert all(torch.equal(frozen[k], initial[k]) for k in initial if ".experts." in k)
    assert any(not torch.equal(frozen[k], initial[k]) for k in initial if "q_proj" in k)
    checkpoint = base / f"{tag}_frozen" / f"checkpoint-{STEPS}"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / EXPERT_OPTIMIZER_FILE).exists()


def _tensorboard_tags(output_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(output_dir, "runs", "*", "events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {output_dir}/runs"
    tags: set[str] = set()
    for path in files:
        events = EventAccumulator(path)
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    return tags


def test_sft_lora_frozen_1_attention_2_expert_ranks(base, stock_single):
    ours = dict(zip(NAMES, spawn(3, sft_each_under_launcher, M1, _runs(base, "m1n2"))[0]))
    _check_same_as_stock(base, "m1n2", "single", ours, stock_single)
    tags = _tensorboard_tags(base / "m1n2_padding")
    assert {"train/hetermoe_attention_busy", "train/hetermoe_expert_busy", "train/loss"} <= tags


def test_sft_lora_frozen_colocated_and_bf16(base, stock_ddp):
    runs = _runs(base, "coloc", colocated=True) + [
        {"output_dir": str(base / "coloc_bf16"), "final_dir": str(base / "coloc_bf16_final"), "max_steps": STEPS,
         "bf16": True, "colocated_callback": True},
        # The old callback's order (model prepared before SFTTrainer replaced its forward): autocast silently off.
        {"output_dir": str(base / "coloc_bf16_old"), "final_dir": str(base / "coloc_bf16_old_final"),
         "max_steps": STEPS, "bf16": True, "colocated_callback": True, "prepare_at_init": True},
    ]
    results = spawn(2, sft_each, runs)[0]
    ours = dict(zip(NAMES, results))
    _check_same_as_stock(base, "coloc", "ddp", ours, stock_ddp)
    # Colocated ranks hold their experts in-process: frozen means no trainable tensor and no optimizer state here.
    assert ours["frozen"]["shard_trainable"] == 0 and ours["frozen"]["shard_optimizer_state"] == 0
    assert ours["padding"]["shard_trainable"] > 0 and ours["padding"]["shard_optimizer_state"] > 0
    assert {"train/hetermoe_attention_busy", "train/loss"} <= _tensorboard_tags(base / "coloc_padding")

    # bf16 autocast (SFTConfig's default): equal to stock bf16 within what stock itself moves when its clip
    # coefficient changes in the last bit. The global norm is summed in a different grouping than one process's
    # (experts' squares over ranks), so its last bit can differ, and bf16 autocast rounds that into the weights.
    # The old callback order (autocast silently off) is far outside that distance.
    _close(results[4]["losses"], stock_ddp["bf16"]["losses"])
    sensitivity = max_weight_difference(base / "ddp_bf16_final", base / "ddp_bf16_nudged_final")
    tolerance = max(2 * sensitivity, 1e-5)
    ours_bf16 = max_weight_difference(base / "ddp_bf16_final", base / "coloc_bf16_final")
    old_bf16 = max_weight_difference(base / "ddp_bf16_final", base / "coloc_bf16_old_final")
    print(f"bf16 autocast weights: stock vs nudged stock {sensitivity:.3g}, ours {ours_bf16:.3g}, "
          f"old order {old_bf16:.3g}")
    assert ours_bf16 <= tolerance, f"bf16 weights differ by {ours_bf16:.3g} (stock's own sensitivity {sensitivity:.3g})"
    assert old_bf16 > 10 * tolerance
