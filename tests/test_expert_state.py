"""Unit tests: the typed expert tensor keys, and the check of the Trainer methods HeterMoE overrides."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_hetermoe.expert_keys import ExpertTensorKey, parse_stock_state_name, stock_state_name
from hf_hetermoe.integrations.trainer_overrides import TRAINER_OVERRIDES, check_trainer_overrides


# ---- typed keys ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, text", [
    (ExpertTensorKey.weight(3, "gate_up_proj"), "3/gate_up_proj"),
    (ExpertTensorKey.optimizer(0, "down_proj", "exp_avg", per_expert=True), "E|0/down_proj/exp_avg"),
    (ExpertTensorKey.optimizer(12, "gate_up_proj_bias", "step", per_expert=False), "S|12/gate_up_proj_bias/step"),
    (ExpertTensorKey.optimizer(1, "w", "a/b", per_expert=True), "E|1/w/a/b"),  # a state key may hold '/'
])
def test_key_round_trip(key, text):
    assert key.encode() == text
    assert ExpertTensorKey.decode(text) == key
    assert hash(ExpertTensorKey.decode(text)) == hash(key)  # usable as a dict key


@pytest.mark.parametrize("text", ["", "x/y", "3", "3/a/b", "X|3/a/s", "E|3/a", "E|x/a/s"])
def test_key_decode_refuses_garbage(text):
    with pytest.raises(ValueError, match="not an expert tensor key"):
        ExpertTensorKey.decode(text)


def test_key_refuses_separators_in_names():
    with pytest.raises(ValueError):
        ExpertTensorKey.weight(0, "a/b")
    with pytest.raises(ValueError):
        ExpertTensorKey(layer=0, name="w", state=None, per_expert=False)


def test_stock_state_name_round_trip():
    text = stock_state_name("model.layers.2.mlp.experts", "gate_up_proj", "exp_avg_sq")
    assert text == "model.layers.2.mlp.experts.gate_up_proj#exp_avg_sq"
    assert parse_stock_state_name(text) == ("model.layers.2.mlp.experts", "gate_up_proj", "exp_avg_sq")
    with pytest.raises(ValueError):
        parse_stock_state_name("model.layers.2.mlp.experts.gate_up_proj")


def test_shard_uses_the_keys():
    """ExpertShard's weight and optimizer-state dicts are keyed by encoded ExpertTensorKeys and load back."""
    from transformers import MixtralConfig

    from model_patches import get_family
    from hf_hetermoe.expert_shard import ExpertShard
    from hf_hetermoe.placement import ExpertPlacement

    config = MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=32)
    family = get_family("mixtral")
    placement = ExpertPlacement.even(layers=(0,), num_experts=4, host_ranks=(0,))
    shard = ExpertShard(family=family, model_config=config, placement=placement, rank=0,
                        device=torch.device("cpu"), dtype=torch.float32, num_replicas=1)
    weights = shard.local_weights()
    assert {ExpertTensorKey.decode(k) for k in weights} == {
        ExpertTensorKey.weight(0, n) for n in family.expert_param_names}
    shard.load_local_weights({k: torch.ones_like(v) for k, v in weights.items()})
    assert all(bool((p == 1).all()) for p in shard.parameters())
    shard.build_optimizer("torch.optim:AdamW", [{"hyperparams": {"lr": 0.1}, "params": list(family.expert_param_names)}])
    for p in shard.parameters():
        p.grad = torch.ones_like(p)
    shard.step(lrs=[0.1], clip_coef=1.0, skipped=False)
    state = shard.optimizer_state()
    keys = {ExpertTensorKey.decode(k) for k in state}
    assert ExpertTensorKey.optimizer(0, family.expert_param_names[0], "exp_avg", per_expert=True) in keys
    assert ExpertTensorKey.optimizer(0, family.expert_param_names[0], "step", per_expert=False) in keys
    shard.load_optimizer_state({k: v.clone() + 1 for k, v in state.items()})
    reloaded = shard.optimizer_state()
    assert all(torch.equal(reloaded[k], state[k] + 1) for k in state)


# ---- Trainer override check ----------------------------------------------------------------------------------
def _fake_trainer(**replace):
    """A class with every overridden method, as the installed Trainer spells it, except `replace`."""
    namespace = {o.name: getattr(Trainer, o.name) for o in TRAINER_OVERRIDES}
    namespace.update(replace)
    return type("FakeTrainer", (), {k: v for k, v in namespace.items() if v is not None})


def test_installed_trainer_passes():
    check_trainer_overrides(Trainer)
    check_trainer_overrides(_fake_trainer())


def test_subclass_with_compatible_overrides_passes():
    class Custom(Trainer):
        def save_model(self, output_dir=None, _internal_call=False, extra=1):
            pass

        def _clip_grad_norm(self, *args, **kwargs):
            pass

    check_trainer_overrides(Custom)


def test_missing_method_is_refused():
    with pytest.raises(RuntimeError) as info:
        check_trainer_overrides(_fake_trainer(_get_grad_norm=None))
    message = str(info.value)
    assert "FakeTrainer._get_grad_norm is missing" in message
    assert "supports transformers >=5,<6" in message


def test_changed_signature_is_refused():
    def renamed(self, model, norm=None):  # grad_norm renamed: the Trainer's keyword call would break
        pass

    def new_required(self, output_dir, storage):  # a new required parameter
        pass

    with pytest.raises(RuntimeError) as info:
        check_trainer_overrides(_fake_trainer(_get_grad_norm=renamed, _save_optimizer_and_scheduler=new_required))
    message = str(info.value)
    assert "FakeTrainer._get_grad_norm takes (self, model, norm=None), expected parameters (model, grad_norm)" in message
    assert "FakeTrainer._save_optimizer_and_scheduler takes (self, output_dir, storage)" in message
    assert "adds required parameters" in message
    assert "supports transformers" in message


def test_every_override_says_why():
    names = [o.name for o in TRAINER_OVERRIDES]
    assert len(names) == len(set(names))
    assert all(len(o.why) > 20 for o in TRAINER_OVERRIDES)
