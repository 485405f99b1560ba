"""Model families beyond Mixtral: Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, GLM-4.5 (glm4_moe).

Per family, with a tiny config built here (production sizes beside the shrunk values):
- reference path (colocated, world of 1): forward (logits, loss, aux loss) and backward equal stock; routers,
  shared experts and dense layers stay model modules, only the routed `experts` are swapped;
- checkpoints: `save_pretrained` writes the stock file (same on-disk keys, same tensors), the on-disk keys load
  back (the Trainer's resume path) and `from_pretrained` of the stock class reads the file;
- `revert_hetermoe` gives back a model equal to an untouched one;
- golden: 8 optimizer steps through the stock Trainer (AdamW, warm-up + linear decay, clipping, accumulation 2,
  aux loss where the family has one) on 1 attention + 2 expert ranks equal stock single-process training
  (losses and grad norms rtol 1e-5, final weights atol 1e-5), and the HeterMoE checkpoint is the stock file.
  All families train in ONE 3-process job (a spawn costs ~20 s here); the expert servers take a new SETUP per
  model. Weight decay is on (0.01): GPT-OSS's expert biases must land in the Trainer's no-decay group.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hf_hetermoe import HeterMoEConfig, apply_hetermoe, get_engine, revert_hetermoe
from hf_hetermoe.block import HeterMoEExperts
from model_patches import get_family, supported_model_types
from tests._dist import spawn
from tests._jobs import train

VOCAB = 96  # tests._jobs.tiny_dataset draws token ids below 96


# ---- tiny configs (production values in comments) -------------------------------------------------------------
def tiny_qwen2_moe_config(**overrides) -> Qwen2MoeConfig:
    """Qwen1.5-MoE-A2.7B shape, shrunk."""
    values = dict(
        vocab_size=VOCAB,                    # 151936
        hidden_size=32,                      # 2048
        intermediate_size=48,                # 5632 (dense layers)
        moe_intermediate_size=24,            # 1408
        shared_expert_intermediate_size=40,  # 5632
        num_hidden_layers=3,                 # 24
        num_attention_heads=4,               # 16
        num_key_value_heads=2,               # 16
        num_experts=4,                       # 60
        num_experts_per_tok=2,               # 4
        norm_topk_prob=False,                # False
        mlp_only_layers=[1],                 # [] (here layer 1 is dense, to check dense layers stay local)
        decoder_sparse_step=1,               # 1
        max_position_embeddings=64,          # 8192
        output_router_logits=True,           # aux loss on
        router_aux_loss_coef=0.02,           # 0.001
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Qwen2MoeConfig(**values)


def tiny_qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    """Qwen3-30B-A3B shape, shrunk."""
    values = dict(
        vocab_size=VOCAB,            # 151936
        hidden_size=32,              # 2048
        intermediate_size=48,        # 6144 (dense layers)
        moe_intermediate_size=24,    # 768
        num_hidden_layers=4,         # 48
        num_attention_heads=4,       # 32
        num_key_value_heads=2,       # 4
        head_dim=8,                  # 128
        num_experts=4,               # 128
        num_experts_per_tok=2,       # 8
        norm_topk_prob=True,         # True
        decoder_sparse_step=2,       # 1 (here layers 1 and 3 are MoE, 0 and 2 dense)
        max_position_embeddings=64,  # 40960
        output_router_logits=True,   # aux loss on
        router_aux_loss_coef=0.02,   # 0.001
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Qwen3MoeConfig(**values)


def tiny_olmoe_config(**overrides) -> OlmoeConfig:
    """OLMoE-1B-7B shape, shrunk."""
    values = dict(
        vocab_size=VOCAB,            # 50304
        hidden_size=32,              # 2048
        intermediate_size=24,        # 1024 (per expert)
        num_hidden_layers=2,         # 16
        num_attention_heads=4,       # 16
        num_key_value_heads=2,       # 16
        num_experts=4,               # 64
        num_experts_per_tok=2,       # 8
        norm_topk_prob=False,        # False
        max_position_embeddings=64,  # 4096
        output_router_logits=True,   # aux loss on
        router_aux_loss_coef=0.02,   # 0.01
        pad_token_id=1,              # 1
        eos_token_id=2,              # 50279
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return OlmoeConfig(**values)


def tiny_deepseek_v3_config(**overrides) -> DeepseekV3Config:
    """DeepSeek-V3 shape, shrunk."""
    values = dict(
        vocab_size=VOCAB,            # 129280
        hidden_size=32,              # 7168
        intermediate_size=48,        # 18432 (dense layers)
        moe_intermediate_size=16,    # 2048
        num_hidden_layers=3,         # 61
        first_k_dense_replace=1,     # 3
        num_attention_heads=4,       # 128
        num_key_value_heads=4,       # 128
        q_lora_rank=24,              # 1536
        kv_lora_rank=16,             # 512
        qk_rope_head_dim=4,          # 64
        qk_nope_head_dim=8,          # 128
        v_head_dim=8,                # 128
        n_routed_experts=8,          # 256
        n_shared_experts=1,          # 1
        num_experts_per_tok=2,       # 8
        n_group=4,                   # 8
        topk_group=2,                # 4
        routed_scaling_factor=2.5,   # 2.5
        norm_topk_prob=True,         # True
        max_position_embeddings=64,  # 163840
        rope_parameters={            # yarn, factor 40, original 4096
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return DeepseekV3Config(**values)


def tiny_glm4_moe_config(**overrides) -> Glm4MoeConfig:
    """GLM-4.5 shape, shrunk."""
    values = dict(
        vocab_size=VOCAB,             # 151552
        hidden_size=32,               # 5120
        intermediate_size=48,         # 12288 (dense layers)
        moe_intermediate_size=16,     # 1536
        num_hidden_layers=3,          # 92
        first_k_dense_replace=1,      # 3
        num_attention_heads=4,        # 96
        num_key_value_heads=2,        # 8
        head_dim=8,                   # 128
        partial_rotary_factor=0.5,    # 0.5
        use_qk_norm=True,             # True
        n_routed_experts=4,           # 160
        n_shared_experts=1,           # 1
        num_experts_per_tok=2,        # 8
        n_group=1,                    # 1
        topk_group=1,                 # 1
        routed_scaling_factor=2.5,    # 2.5
        norm_topk_prob=True,          # True
        max_position_embeddings=64,   # 131072
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Glm4MoeConfig(**values)


def tiny_gpt_oss_config(**overrides) -> GptOssConfig:
    """gpt-oss-20b shape, shrunk."""
    values = dict(
        vocab_size=VOCAB,            # 201088
        hidden_size=32,              # 2880
        intermediate_size=24,        # 2880
        num_hidden_layers=2,         # 24 (sliding and full attention alternate)
        num_attention_heads=4,       # 64
        num_key_value_heads=2,       # 8
        head_dim=8,                  # 64
        sliding_window=8,            # 128
        num_local_experts=4,         # 32
        num_experts_per_tok=2,       # 4
        swiglu_limit=0.1,            # 7.0 (shrunk with the weights' scale, so the clamp is active here)
        max_position_embeddings=64,  # 131072
        rope_parameters={            # yarn, factor 32, original 4096
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        },
        output_router_logits=True,   # aux loss on
        router_aux_loss_coef=0.02,   # 0.001
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return GptOssConfig(**values)


# ---- models (module level: spawned ranks import them) ------------------------------------------------------------
def _random_(tensor: torch.Tensor, std: float, seed: int) -> None:
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)) * std)


def qwen2_moe_model() -> Qwen2MoeForCausalLM:
    return Qwen2MoeForCausalLM(tiny_qwen2_moe_config())


def qwen3_moe_model() -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM(tiny_qwen3_moe_config())


def olmoe_model() -> OlmoeForCausalLM:
    return OlmoeForCausalLM(tiny_olmoe_config())


def deepseek_v3_model() -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(tiny_deepseek_v3_config())
    # Stock init leaves the correction bias at zero; a non-zero bias makes the expert choice differ from the
    # weights' order, as in a trained model (the bias is a router buffer: it must stay on attention ranks).
    for index, layer in enumerate(model.model.layers[model.config.first_k_dense_replace:]):
        _random_(layer.mlp.gate.e_score_correction_bias, 0.05, seed=100 + index)
    return model


def glm4_moe_model() -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(tiny_glm4_moe_config())
    for index, layer in enumerate(model.model.layers[model.config.first_k_dense_replace:]):
        _random_(layer.mlp.gate.e_score_correction_bias, 0.05, seed=400 + index)
    return model


def gpt_oss_model() -> GptOssForCausalLM:
    model = GptOssForCausalLM(tiny_gpt_oss_config())
    # Stock init zeroes the expert biases; non-zero ones check that they are sliced by expert with the weights.
    for index, layer in enumerate(model.model.layers):
        _random_(layer.mlp.experts.gate_up_proj_bias, 0.02, seed=200 + index)
        _random_(layer.mlp.experts.down_proj_bias, 0.02, seed=300 + index)
    return model


FACTORIES = {
    "qwen2_moe": qwen2_moe_model,
    "qwen3_moe": qwen3_moe_model,
    "olmoe": olmoe_model,
    "deepseek_v3": deepseek_v3_model,
    "gpt_oss": gpt_oss_model,
    "glm4_moe": glm4_moe_model,
}
HAS_AUX_LOSS = {"qwen2_moe": True, "qwen3_moe": True, "olmoe": True, "deepseek_v3": False, "gpt_oss": True,
                "glm4_moe": False}
FAMILIES = list(FACTORIES)


def fresh(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[name]()


def batch() -> dict:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def assert_state_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# ---- the family descriptions ---------------------------------------------------------------------------------
def test_every_family_is_registered_and_unsupported_types_list_them():
    assert set(FAMILIES) | {"mixtral"} <= set(supported_model_types())
    with pytest.raises(ValueError, match=r"'llama' is not supported") as info:
        get_family("llama")
    assert all(f"'{name}'" in str(info.value) for name in [*FAMILIES, "mixtral"])


@pytest.mark.parametrize(
    "config, expected",
    [
        (tiny_qwen2_moe_config(), (0, 2)),
        (tiny_qwen2_moe_config(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]), (1, 5)),
        (tiny_qwen3_moe_config(), (1, 3)),
        (tiny_qwen3_moe_config(num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[0, 2]), (1,)),
        (tiny_deepseek_v3_config(), (1, 2)),
        (tiny_deepseek_v3_config(first_k_dense_replace=0), (0, 1, 2)),
        (tiny_olmoe_config(), (0, 1)),
        (tiny_gpt_oss_config(), (0, 1)),
        (tiny_glm4_moe_config(), (1, 2)),
    ],
    ids=["qwen2_moe", "qwen2_moe_step2", "qwen3_moe_step2", "qwen3_moe_mlp_only", "deepseek_v3", "deepseek_v3_no_dense",
         "olmoe", "gpt_oss", "glm4_moe"],
)
def test_moe_layers_follow_the_decoder_layers_rule(config, expected):
    family = get_family(config.model_type)
    assert family.moe_layers(config) == expected
    # The rule is the decoder layer's own: build the stock model and see which layers hold routed experts.
    model = AutoModelForCausalLM.from_config(config)
    assert tuple(slot.layer for slot in family.experts_slots(model)) == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_backward_equal_stock(name):
    stock, ours = fresh(name), fresh(name)
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    family = get_family(ours.config.model_type)
    moe_layers = family.moe_layers(ours.config)
    swapped = [n for n, m in ours.named_modules() if isinstance(m, HeterMoEExperts)]
    assert [int(n.split(".")[2]) for n in swapped] == list(moe_layers)
    assert all(n.endswith(".mlp.experts") for n in swapped)
    assert not any(isinstance(m, family.experts_class) for m in ours.modules())

    out_s, out_o = stock(**batch()), ours(**batch())
    torch.testing.assert_close(out_o.logits, out_s.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_o.loss, out_s.loss, atol=0, rtol=1e-6)
    if HAS_AUX_LOSS[name]:
        assert out_s.aux_loss is not None
        torch.testing.assert_close(out_o.aux_loss, out_s.aux_loss, atol=1e-7, rtol=1e-6)
        assert len(out_o.router_logits) == len(moe_layers)
    out_s.loss.backward()
    out_o.loss.backward()
    ours_params = dict(ours.named_parameters())
    for param_name, p in stock.named_parameters():
        if ".mlp.experts." in param_name:
            assert param_name not in ours_params  # held by the expert shard, not by the model
            continue
        assert p.grad is not None, param_name
        torch.testing.assert_close(ours_params[param_name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=param_name)
    engine = get_engine(ours)
    for layer, param_name, p in engine.shard.named_parameters():
        stock_grad = getattr(stock.get_submodule(engine.slot_paths[layer]), param_name).grad
        torch.testing.assert_close(p.grad, stock_grad, atol=1e-6, rtol=1e-4, msg=f"{layer}/{param_name}")


def test_deepseek_v3_router_stays_fp32_in_a_bf16_model(tmp_path):
    """from_pretrained(dtype=bf16) keeps DeepSeek-V3's router weight and correction bias in fp32
    (`_keep_in_fp32_modules_strict`), so the experts get fp32 routing weights with bf16 activations."""
    fresh("deepseek_v3").save_pretrained(tmp_path)
    stock = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    gate = ours.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in get_engine(ours).shard.parameters())
    out_s, out_o = stock(**batch()), ours(**batch())
    assert out_o.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out_o.logits, out_s.logits)
    out_s.loss.backward()
    out_o.loss.backward()
    torch.testing.assert_close(gate.weight.grad, stock.model.layers[1].mlp.gate.weight.grad)


@pytest.mark.parametrize("name", FAMILIES)
def test_router_shared_experts_and_dense_layers_stay_on_attention_ranks(name):
    model = fresh(name)
    before = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    after = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    # Exactly the routed experts' tensors left the model; everything else of the block is still here.
    assert before - after == {n for n in before if ".mlp.experts." in n}
    kept = {
        "qwen2_moe": ["mlp.gate.weight", "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert_gate.weight",
                      "model.layers.1.mlp.gate_proj.weight"],  # layer 1 is dense
        "qwen3_moe": ["mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight"],
        "olmoe": ["mlp.gate.weight"],
        "deepseek_v3": ["mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                        "mlp.shared_experts.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight"],
        "gpt_oss": ["mlp.router.weight", "mlp.router.bias"],
        "glm4_moe": ["mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                     "mlp.shared_experts.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight"],
    }[name]
    for suffix in kept:
        assert any(n.endswith(suffix) for n in after), suffix


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoints_are_stock(name, tmp_path):
    stock, ours = fresh(name), fresh(name)
    apply_hetermoe(ours, HeterMoEConfig(mode="colocated"))
    assert_state_equal(ours.state_dict(), stock.state_dict())
    stock.save_pretrained(tmp_path / "stock")
    ours.save_pretrained(tmp_path / "ours")
    on_disk = load_file(tmp_path / "stock" / "model.safetensors")
    assert_state_equal(load_file(tmp_path / "ours" / "model.safetensors"), on_disk)
    if name == "gpt_oss":  # no conversion mapping: the file holds the in-memory names
        assert set(on_disk) == set(stock.state_dict())
    else:  # per-expert tensors on disk, fused in memory
        assert any(".mlp.experts.0.gate_proj.weight" in k for k in on_disk)
    # The generic conversion (transformers' own mapping) turns the file back into the in-memory state exactly.
    assert_state_equal(get_family(name).checkpoint_to_model_keys(on_disk), stock.state_dict())
    loaded = type(stock).from_pretrained(tmp_path / "ours")
    assert_state_equal(loaded.state_dict(), stock.state_dict())

    # The Trainer's resume path: load the file's own keys into a patched model holding other weights.
    other = fresh(name, seed=7)
    apply_hetermoe(other, HeterMoEConfig(mode="colocated"))
    result = other.load_state_dict(on_disk, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_state_equal(other.state_dict(), stock.state_dict())


def test_checkpoint_with_a_missing_expert_is_refused(tmp_path):
    stock = fresh("qwen3_moe")
    stock.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    gap = {k: v for k, v in on_disk.items() if ".layers.1.mlp.experts.2." not in k}
    gap_message = r"experts \[0, 1, 3\] for .model\.layers\.1\.mlp\.experts\.(gate_up|down)_proj"
    with pytest.raises(ValueError, match=gap_message):
        get_family("qwen3_moe").checkpoint_to_model_keys(gap)
    no_up = {k: v for k, v in on_disk.items() if not k.endswith("up_proj.weight") or "gate" in k}
    with pytest.raises(ValueError, match="incomplete set of tensors"):
        get_family("qwen3_moe").checkpoint_to_model_keys(no_up)


@pytest.mark.parametrize("name", FAMILIES)
def test_revert_restores_an_untouched_model(name):
    untouched, model = fresh(name), fresh(name)
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    revert_hetermoe(model)
    assert get_engine(model) is None
    assert repr(model) == repr(untouched)
    assert_state_equal(model.state_dict(), untouched.state_dict())
    torch.testing.assert_close(model(**batch()).logits, untouched(**batch()).logits, atol=0, rtol=0)


# ---- golden: every family on 1 attention + 2 expert ranks --------------------------------------------------------
M1 = {"attention_ranks": [0], "timeout_s": 120}  # rank 0 attention, ranks 1-2 expert servers


def _spec(name: str, base) -> dict:
    return {"model_factory": FACTORIES[name], "output_dir": str(base / name), "final_dir": str(base / f"{name}_final"),
            "weight_decay": 0.01}


def train_families_under_launcher(hetermoe_config: dict, specs: list[dict]) -> list | None:
    """One process of a HeterMoE job whose attention rank trains every spec in turn, each with its own Trainer
    and model; the expert servers take a new SETUP for each model."""
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    results: list = []
    run_rank(HeterMoEConfig.from_dict(hetermoe_config), lambda: results.extend(train(spec) for spec in specs))
    return results or None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def golden(base):
    """(stock single-process runs, HeterMoE runs on 1 attention + 2 expert ranks), by family."""
    stock = {name: train(_spec(name, base / "stock")) for name in FAMILIES}
    ours = spawn(3, train_families_under_launcher, M1, [_spec(name, base / "hetermoe") for name in FAMILIES])[0]
    return stock, dict(zip(FAMILIES, ours))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_golden_1_attention_2_expert_ranks(name, base, golden):
    stock, ours = golden[0][name], golden[1][name]
    assert len(ours["losses"]) == len(stock["losses"]) == 16
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock["losses"]), rtol=1e-5, atol=0)
    grad_norms = lambda r: [h["grad_norm"] for h in r["log_history"] if "grad_norm" in h]  # noqa: E731
    torch.testing.assert_close(torch.tensor(grad_norms(ours)), torch.tensor(grad_norms(stock)), rtol=1e-5, atol=0)

    stock_dir, ours_dir = base / "stock" / f"{name}_final", base / "hetermoe" / f"{name}_final"
    # The HeterMoE checkpoint is the stock file: same on-disk names, and the stock class loads it.
    stock_file, ours_file = load_file(stock_dir / "model.safetensors"), load_file(ours_dir / "model.safetensors")
    assert set(ours_file) == set(stock_file)
    model_class = type(fresh(name))
    trained = model_class.from_pretrained(stock_dir).state_dict()
    assert_state_equal(model_class.from_pretrained(ours_dir).state_dict(), trained, atol=1e-5)
    # Training moved the experts (the comparison above is not between two untouched models).
    untouched = fresh(name).state_dict()
    moved = [k for k in trained if ".mlp.experts." in k and not torch.allclose(trained[k], untouched[k], atol=1e-4)]
    assert moved
