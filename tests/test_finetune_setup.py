"""Fine-tuning set-up in one process (colocated, world of 1): HeterMoE through PEFT wrappers, frozen routed experts,
adapters on the routed experts refused, and the Accelerator override (checked against the installed accelerate,
preparing our model without DDP when the Trainer asks)."""

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model

from hf_hetermoe import HeterMoEConfig, apply_hetermoe, get_engine, revert_hetermoe
from hf_hetermoe.block import HeterMoEExperts
from hf_hetermoe.integrations.trainer_overrides import (
    ACCELERATOR_OVERRIDES,
    check_accelerator_overrides,
    install_accelerator_overrides,
)
from hf_hetermoe.patching import unwrap_adapters
from tests._finetune_jobs import build_model, lora_config

COLOCATED = HeterMoEConfig(mode="colocated")


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "gate"]], ids=["attention", "router"])
def test_lora_model_is_patched_through_the_peft_wrappers(targets):
    stock = get_peft_model(build_model({}), lora_config({"lora_targets": targets}))
    ours = get_peft_model(build_model({}), lora_config({"lora_targets": targets}))
    engine = apply_hetermoe(ours, COLOCATED)
    assert unwrap_adapters(ours) is ours.base_model.model
    assert get_engine(ours) is engine is get_engine(ours.base_model) is get_engine(ours.get_base_model())
    assert sum(isinstance(m, HeterMoEExperts) for m in ours.modules()) == 3
    # PEFT froze the base model, experts included: the shard holds them frozen.
    assert engine.state.frozen and engine.shard.trainable_parameters() == []
    out_s, out_o = stock(**batch()), ours(**batch())
    torch.testing.assert_close(out_o.loss, out_s.loss, atol=1e-6, rtol=1e-5)
    out_s.loss.backward()
    out_o.loss.backward()
    assert all(p.grad is None for p in engine.shard.parameters())
    stock_grads = dict(stock.named_parameters())
    adapters = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert any(f"{targets[1]}.lora_A" in name for name, _ in adapters)
    for name, p in adapters:
        torch.testing.assert_close(p.grad, stock_grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    # The wrapper's state dict is stock: full expert tensors under the PEFT names.
    assert set(ours.state_dict()) == set(stock.state_dict())

    reverted = revert_hetermoe(ours)
    assert reverted is ours and isinstance(reverted, PeftModel) and get_engine(ours) is None
    merged, stock_merged = reverted.merge_and_unload(), stock.merge_and_unload()
    for name, tensor in stock_merged.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_lora_on_routed_experts_is_refused_with_what_works():
    model = get_peft_model(build_model({}), lora_config(
        {"lora_targets": ["q_proj"], "lora_target_parameters": ["mlp.experts.gate_up_proj"]}))
    with pytest.raises(ValueError, match=r"wraps the routed experts.*target_modules=\['q_proj'"):
        apply_hetermoe(model, COLOCATED)
    assert get_engine(model) is None


def test_frozen_experts_and_partly_frozen_refused():
    frozen = build_model({"freeze_experts": True})
    engine = apply_hetermoe(frozen, COLOCATED)
    assert engine.state.frozen and engine.shard.trainable_parameters() == []
    training = apply_hetermoe(build_model({}), COLOCATED)
    assert not training.state.frozen and len(training.shard.trainable_parameters()) == 6

    partly = build_model({})
    partly.model.layers[1].mlp.experts.down_proj.requires_grad_(False)
    with pytest.raises(ValueError, match="some routed expert tensors have requires_grad=False"):
        apply_hetermoe(partly, COLOCATED)


def test_frozen_shard_builds_no_optimizer_and_steps_nothing():
    engine = apply_hetermoe(build_model({"freeze_experts": True}), COLOCATED)
    shard = engine.shard
    shard.build_optimizer("torch.optim.adamw:AdamW",
                          [{"hyperparams": {"lr": 1e-3}, "params": ["gate_up_proj", "down_proj"]}])
    assert shard.optimizer is None
    before = [p.detach().clone() for p in shard.parameters()]
    assert shard.trainable_parameters() == []
    assert shard.grad_norm_parts()[0].item() == 0.0  # nothing in the global norm
    shard.step(lrs=[1e-3], clip_coef=1.0, skipped=False)
    assert all(torch.equal(a, p) for a, p in zip(before, shard.parameters()))
    assert shard.optimizer_state() == {}


def test_accelerator_overrides_match_installed_accelerate():
    check_accelerator_overrides(Accelerator)
    assert [o.name for o in ACCELERATOR_OVERRIDES] == ["prepare_model"]

    class Renamed:
        def prepare_model(self, module, device_placement=None, evaluation_mode=False):
            return module

    with pytest.raises(RuntimeError, match=r"Renamed.prepare_model takes .*expected parameters \(model, "):
        check_accelerator_overrides(Renamed)


def test_accelerator_prepares_our_model_without_ddp():
    calls = []

    class Recording(Accelerator):
        def prepare_model(self, model, device_placement=None, evaluation_mode=False):
            calls.append((model, evaluation_mode))
            return model

    accelerator = Recording(cpu=True)
    ours, other = build_model({}), build_model({})
    install_accelerator_overrides(type("T", (), {"accelerator": accelerator})(), is_hetermoe_model=lambda m: m is ours)
    accelerator.prepare(ours)
    accelerator.prepare_model(other)
    assert calls == [(ours, True), (other, False)]
