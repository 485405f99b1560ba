"""Planner: built-in device profiles, their Figure-2 calibration, model shapes, presets and cluster parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hetermoe.planner.calibration import solve_figure2, table_values
from hf_hetermoe.planner.cluster import parse_cluster
from hf_hetermoe.planner.model_shape import ModelShape
from hf_hetermoe.planner.presets import MODEL_PRESETS, resolve_model
from hf_hetermoe.planner.profiles import BUILTIN_GPUS, MIXTRAL_8X7B, figure2_ratios, module_speed_ratio


def test_figure2_ratios_match_the_paper_within_3_percent():
    rows = figure2_ratios()
    assert len(rows) >= 10
    for row in rows:
        assert row["model"] == pytest.approx(row["paper"], rel=0.03), row


def test_attention_gap_grows_with_sequence_length_but_expert_gap_is_flat():
    g = BUILTIN_GPUS
    lengths = (4096, 8192, 16384, 32768, 65536)
    for fast, slow in (("A40", "V100"), ("L40S", "T4")):
        attn = [module_speed_ratio(g[fast], g[slow], "attention", s) for s in lengths]
        assert all(a < b for a, b in zip(attn, attn[1:])), (fast, slow, attn)
        expert = [module_speed_ratio(g[fast], g[slow], "expert", s) for s in lengths]
        assert max(expert) / min(expert) < 1.02, (fast, slow, expert)
        # Attention gaps exceed the expert (GEMM) gaps: the observation HeterMoE rests on.
        assert attn[0] > expert[0]


def test_solved_constants_are_the_table_constants():
    solved, table = solve_figure2(), table_values()
    for key, value in solved.items():
        assert table[key] == pytest.approx(value, rel=0.01), key


def test_flash_attention_2_only_on_ampere_or_newer():
    for gpu in BUILTIN_GPUS.values():
        assert gpu.flash_attn2 == (gpu.generation >= (8, 0)), gpu.name


def test_bf16_on_volta_is_a_user_error_naming_the_fix():
    shape = ModelShape.from_dict({**MODEL_PRESETS["D1"].to_dict(), "dtype": "bf16"})
    with pytest.raises(ValueError, match="fp16"):
        BUILTIN_GPUS["V100"].expert_s(shape, num_tokens=1024)
    assert BUILTIN_GPUS["A40"].expert_s(shape, num_tokens=1024)[0] > 0


@settings(max_examples=40, deadline=None)
@given(gpu=st.sampled_from(sorted(BUILTIN_GPUS)), a=st.floats(1, 1e5), b=st.floats(1, 1e5))
def test_split_work_never_costs_less_than_whole(gpu, a, b):
    # The lower bound relies on this: every cost is affine or a roofline max, hence superadditive.
    d, shape = BUILTIN_GPUS[gpu], MODEL_PRESETS["W1"]
    for f in (lambda x: d.expert_s(shape, num_tokens=x), lambda x: d.head_s(shape, num_tokens=x),
              lambda x: d.attention_s(shape, num_seqs=x / 1000, seq_len=4096)):
        assert sum(f(a)) + sum(f(b)) >= sum(f(a + b)) * (1 - 1e-12)
        assert f(a + b)[0] > f(min(a, b))[0]


@pytest.mark.parametrize("name,paper_billions", [("W1", 2.2), ("W2", 4.3), ("D1", 2.1), ("D2", 1.2), ("D3", 3.5)])
def test_presets_have_the_papers_sizes(name, paper_billions):
    shape = MODEL_PRESETS[name]
    assert shape.total_params / 1e9 == pytest.approx(paper_billions, rel=0.07)
    assert shape.top_k == 2 and shape.dtype == "fp16"


def test_model_shape_from_hf_config_objects_dicts_and_files(tmp_path):
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256)
    shape = ModelShape.from_hf_config(cfg, name="tiny")
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_experts, shape.head_dim) == \
        (64, 128, 2, 4, 16)
    qwen = {"hidden_size": 256, "intermediate_size": 1024, "moe_intermediate_size": 64, "num_experts": 8,
            "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 100}
    q = ModelShape.from_hf_config(qwen)
    assert q.intermediate_size == 64 and q.num_experts == 8 and q.num_kv_heads == 4
    with pytest.raises(ValueError, match="routed experts"):
        ModelShape.from_hf_config({"hidden_size": 64, "num_attention_heads": 4})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert resolve_model(str(tmp_path)).num_experts == 4
    assert resolve_model(str(tmp_path / "config.json")).hidden_size == 64
    with pytest.raises(ValueError, match="W1, W2, D1, D2, D3"):
        resolve_model("Z9")


def test_parse_cluster_puts_the_newest_gpus_first():
    c = parse_cluster("6xV100,6xA40")
    assert (c.attention.name, c.expert.name, c.num_attention, c.num_expert) == ("A40", "V100", 6, 6)
    assert c.attention_ranks == (0, 1, 2, 3, 4, 5) and c.expert_ranks == tuple(range(6, 12))
    assert parse_cluster("O3").num_expert == 3 and parse_cluster("O3").link_gbps == 100
    assert parse_cluster("C2").link_gbps == 200 and parse_cluster("C2").attention.name == "L40S"
    assert parse_cluster("c1", link_gbps=25).link_gbps == 25
    homo = parse_cluster("2xA40,3xA40")
    assert (homo.num_attention, homo.num_expert) == (2, 3)
    assert c.labels == ("6xA40", "6xV100")
    assert len(set(parse_cluster("2xA40,2xA40").labels)) == 2  # same GPUs on both sides stay distinguishable
    merged = parse_cluster("2xA40,4xV100,2xA40")
    assert (merged.num_attention, merged.num_expert) == (4, 4)


@pytest.mark.parametrize("text,needle", [("6A40,6xV100", "6A40"), ("6xB300,6xV100", "B300"), ("", "empty"),
                                         ("attention:2xA40", "no expert GPUs"), ("0xA40,2xV100", "no GPUs"),
                                         ("2xA40", "two entries"), ("gpus:2xA40;experts:2xV100", "no role"),
                                         ("attention:2xA40;attention:2xA40", "twice")])
def test_parse_cluster_errors_name_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_cluster(text)


def test_mixtral_8x7b_shape_is_the_real_one():
    assert MIXTRAL_8X7B.total_params / 1e9 == pytest.approx(46.7, rel=0.01)
