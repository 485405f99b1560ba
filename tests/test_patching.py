"""apply_hetermoe / revert_hetermoe in one process (colocated, world of 1): the reference path of the engine.

The same block computed through HeterMoE must equal the stock one (megablocks-style reference check), state
dicts must be stock, and revert must restore a model equal to an untouched one.
"""

import copy
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from hf_hetermoe import HeterMoEConfig, apply_hetermoe, get_engine, revert_hetermoe
from hf_hetermoe.block import HeterMoEExperts
from hf_hetermoe.checkpoint import load_trainer_checkpoint
from hf_hetermoe.patching import state_hooks
from hf_hetermoe.expert_shard import ExpertShard
from tests._jobs import PROMPT, tiny_mixtral_config, train


def fresh_model(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_mixtral_config())


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def assert_state_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_forward_backward_equal_stock():
    stock, ours = fresh_model(), fresh_model()
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    assert sum(isinstance(m, HeterMoEExperts) for m in ours.modules()) == 3
    assert not any(isinstance(m, MixtralExperts) for m in ours.modules())
    out_s, out_o = stock(**batch()), ours(**batch())
    torch.testing.assert_close(out_o.logits, out_s.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_o.aux_loss, out_s.aux_loss, atol=1e-7, rtol=1e-6)
    assert len(out_o.router_logits) == 3
    out_s.loss.backward()
    out_o.loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, p in stock.named_parameters():
        if ".experts." in name:
            continue  # held by the expert shard
        torch.testing.assert_close(ours_grads[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    shard = get_engine(ours).shard
    for layer, name, p in shard.named_parameters():
        stock_grad = getattr(stock.model.layers[layer].mlp.experts, name).grad
        torch.testing.assert_close(p.grad, stock_grad, atol=1e-6, rtol=1e-4)


def test_experts_are_not_model_parameters():
    model = fresh_model()
    stock_count = sum(p.numel() for p in model.parameters())
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    expert_count = sum(p.numel() for p in get_engine(model).shard.parameters())
    assert sum(p.numel() for p in model.parameters()) == stock_count - expert_count


def test_state_dict_is_stock_and_saves_a_stock_checkpoint(tmp_path):
    stock, ours = fresh_model(), fresh_model()
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    assert_state_equal(ours.state_dict(), stock.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "ours")
    assert_state_equal(loaded.state_dict(), stock.state_dict())


def test_load_state_dict_accepts_memory_and_disk_keys(tmp_path):
    other = fresh_model(seed=7)
    other.save_pretrained(tmp_path / "other")
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "other" / "model.safetensors")
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in on_disk)
    for source in (other.state_dict(), on_disk):
        ours = fresh_model()
        apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
        result = ours.load_state_dict(source, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert_state_equal(ours.state_dict(), other.state_dict())


def _expert_keys(state: dict) -> set:
    return {k for k in state if ".mlp.experts." in k}


def test_partial_expert_state_loads_what_it_holds(tmp_path):
    """A file of a sharded checkpoint may hold some experts of a tensor: its pieces wait for the others; each call
    loads what is complete and reports the expert tensors it did not load as missing."""
    other, untouched = fresh_model(seed=7), fresh_model()
    other.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "model.safetensors")
    low = {k: v for k, v in on_disk.items() if not re.search(r"\.experts\.[23]\.", k)}  # + experts 0-1
    high = {k: v for k, v in on_disk.items() if re.search(r"\.experts\.[23]\.", k)}
    ours = fresh_model()
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    result = ours.load_state_dict(low, strict=False)
    assert _expert_keys(result.missing_keys) == _expert_keys(untouched.state_dict())
    expert_state = {k: v for k, v in ours.state_dict().items() if k in _expert_keys(v_ := untouched.state_dict())}
    assert_state_equal(expert_state, {k: v_[k] for k in expert_state})  # nothing loaded yet
    result = ours.load_state_dict(high, strict=False)
    assert not _expert_keys(result.missing_keys) and state_hooks(ours).pieces == {}
    assert_state_equal(ours.state_dict(), other.state_dict())

    # In-memory names, one layer only: that layer loads, the others are reported missing.
    ours = fresh_model()
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    layer0 = {k: v for k, v in other.state_dict().items() if "layers.0.mlp.experts" in k}
    result = ours.load_state_dict(layer0, strict=False)
    assert _expert_keys(result.missing_keys) == {k for k in _expert_keys(untouched.state_dict()) if "layers.0." not in k}
    loaded = ours.state_dict()
    for key in _expert_keys(loaded):
        torch.testing.assert_close(loaded[key], (other if "layers.0." in key else untouched).state_dict()[key],
                                   atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict, as stock: a partial state dict is refused
        ours.load_state_dict(layer0, strict=True)


def test_sharded_checkpoint_with_a_lost_file_is_named(tmp_path):
    from transformers.trainer_utils import load_sharded_checkpoint

    other = fresh_model(seed=7)
    other.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    # transformers shards the in-memory tensors, then splits them into stock keys: gate_up_proj's w1 and w3
    # land in different files, so no single file completes that tensor.
    gate_up_files = {f for k, f in index["weight_map"].items() if re.search(r"layers\.1\..*experts\.\d+\.w[13]", k)}
    assert len(files) > 3 and len(gate_up_files) > 1, "the shards must split an expert tensor over files"

    def load(ours):
        return load_trainer_checkpoint(state_hooks(ours), str(tmp_path),
                                       lambda: load_sharded_checkpoint(ours, str(tmp_path), strict=False))

    ours = fresh_model()
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    load(ours)
    assert_state_equal(ours.state_dict(), other.state_dict())

    lost = index["weight_map"]["model.layers.1.block_sparse_moe.experts.0.w1.weight"]
    (tmp_path / lost).rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=re.escape(lost)):
        load(fresh_model_patched())
    # The index no longer names the file either: gate_up_proj of layer 1 gets w3 and never w1.
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != lost}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"incomplete: \['model.layers.1.block_sparse_moe.experts.\*.w3.weight'\]"):
        load(fresh_model_patched())


def fresh_model_patched() -> MixtralForCausalLM:
    model = fresh_model()
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    return model


def test_revert_restores_an_untouched_model():
    untouched, model = fresh_model(), fresh_model()
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    revert_hetermoe(model)
    assert get_engine(model) is None
    assert sum(isinstance(m, MixtralExperts) for m in model.modules()) == 3
    assert repr(model) == repr(untouched)
    assert_state_equal(model.state_dict(), untouched.state_dict())
    torch.testing.assert_close(model(**batch()).logits, untouched(**batch()).logits, atol=0, rtol=0)


def test_revert_keeps_trained_expert_weights():
    model = fresh_model()
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    with torch.no_grad():
        for p in get_engine(model).shard.parameters():
            p.add_(1.0)
    expected = copy.deepcopy(model.state_dict())
    revert_hetermoe(model)
    assert_state_equal(model.state_dict(), expected)


def test_generate_equals_stock():
    stock, ours = fresh_model(), fresh_model()
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        a = stock.generate(prompt, max_new_tokens=10, do_sample=False)
        b = ours.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)


def test_unsupported_model_and_bad_modes_are_clear_errors():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"'llama' is not supported.*\[.*'mixtral'.*\]"):
        apply_hetermoe(llama, HeterMoEConfig(mode="colocated"))
    with pytest.raises(ValueError, match="needs the HeterMoE launcher"):
        apply_hetermoe(fresh_model(), HeterMoEConfig(attention_ranks=[0], expert_ranks=[1]))


def _assert_same_run(a: dict, b: dict, dir_a, dir_b) -> None:
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-5, atol=0)
    sa = MixtralForCausalLM.from_pretrained(dir_a).state_dict()
    sb = MixtralForCausalLM.from_pretrained(dir_b).state_dict()
    assert_state_equal(sb, sa, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_trainer_golden_single_process(tmp_path, monkeypatch, checkpointing):
    """8 optimizer steps (AdamW, warm-up + linear decay, clipping, accumulation 2, aux loss) equal stock."""
    spec = {"gradient_checkpointing": checkpointing}
    stock = train(spec | {"output_dir": str(tmp_path / "s"), "final_dir": str(tmp_path / "s_final")})
    calls = []
    original = ExpertShard.forward
    monkeypatch.setattr(ExpertShard, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ours = train(spec | {"output_dir": str(tmp_path / "h"), "final_dir": str(tmp_path / "h_final"),
                         "colocated_callback": True})
    assert len(ours["losses"]) == 16
    # Experts run once per layer and micro-batch, also when checkpointed layers are recomputed.
    assert len(calls) == 16 * 3
    _assert_same_run(stock, ours, tmp_path / "s_final", tmp_path / "h_final")
    grad_norms = lambda r: [h["grad_norm"] for h in r["log_history"] if "grad_norm" in h]  # noqa: E731
    torch.testing.assert_close(torch.tensor(grad_norms(ours)), torch.tensor(grad_norms(stock)), rtol=1e-5, atol=0)


def test_asym_ea_needs_expert_ranks():
    with pytest.raises(ValueError, match="colocated"):
        apply_hetermoe(fresh_model(), HeterMoEConfig(mode="colocated", asym_ea={1: 1}))
