"""Planner: the profiler on this machine's CPU with a tiny Mixtral config, and the planner reading its output.

Tiny config (production size in brackets, Mixtral-8x7B): hidden 64 [4096], FFN 128 [14336], 2 layers [32],
4 heads [32], 2 KV heads [8], 4 experts [8], top-2 [2], vocabulary 256 [32000]; sequence length 64.
"""

from __future__ import annotations

import json

import pytest

from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.planner.cluster import parse_cluster
from hf_hetermoe.planner.plan_cli import PLAN_YAML, main_plan, main_profile, main_simulate
from hf_hetermoe.planner.profile_file import Affine, load_profiles
from hf_hetermoe.planner.profiler import canonical_device_name
from hf_hetermoe.planner.workload import Setup, zebra_costs

TINY = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    (d / "config.json").write_text(json.dumps(TINY))
    out = d / "profile.json"
    code = main_profile(["--model", str(d / "config.json"), "--seq-len", "64", "--micro-batch", "2",
                         "--device", "cpu", "--repeats", "2", "--out", str(out)])
    return d, out, code


def test_profiler_writes_a_readable_profile_on_cpu(profile):
    _, out, code = profile
    assert code == 0
    shape, seq_len, devices = load_profiles(out)
    assert seq_len == 64 and shape.hidden_size == 64 and shape.num_experts == 4 and shape.dtype == "fp32"
    cpu = devices["cpu"]
    assert cpu.kind == "cpu" and cpu.memory_bytes > 1e9
    for module in ("attention_s", "expert_s", "head_s"):
        kwargs = {"num_seqs": 2, "seq_len": 64} if module == "attention_s" else {"num_tokens": 64}
        fwd, bwd = getattr(cpu, module)(shape, **kwargs)
        assert fwd > 0 and bwd > 0
    # The attention half keeps at least its input, normed input and q/k/v per token; an expert at least h + 2f.
    assert cpu.activation_bytes_per_token_attention >= 4 * 64 * 4
    assert cpu.activation_bytes_per_copy_expert >= (64 + 2 * 128) * 4
    raw = json.loads(out.read_text())["devices"][0]
    assert raw["expert"]["num_tokens"] == [64, 128]  # 2 sequences x 64 tokens x top-2 / 4 experts, and twice that


def test_planner_accepts_the_measured_profile(profile, tmp_path):
    _, out, _ = profile
    assert main_plan(["--cluster", "2xcpu,2xcpu", "--profile", str(out), "--out", str(tmp_path)]) == 0
    cfg = HeterMoEConfig.from_yaml(tmp_path / PLAN_YAML)
    assert cfg.resolve_topology(4).num_attention == (4 if cfg.mode == "colocated" else 2)
    # The costs the simulator uses are the measured ones.
    shape, seq_len, devices = load_profiles(out)
    setup = Setup(cluster=parse_cluster("2xcpu,2xcpu", measured=devices), shape=shape, seq_len=seq_len,
                  global_batch=4)
    costs = zebra_costs(setup, 2)
    assert costs.attn_f[0][0] == pytest.approx(devices["cpu"].attention_fwd(1))
    assert costs.attn_f[-1][0] == pytest.approx(devices["cpu"].head_fwd(64))
    # Measured devices mix with built-in ones (the cpu is the older generation, so the A40 attends).
    assert main_simulate(["--cluster", "2xcpu,2xA40", "--profile", str(out), "--strategy", "zp"]) == 0


def test_a_profile_only_answers_for_its_model_and_length(profile, tmp_path, capsys):
    _, out, _ = profile
    assert main_plan(["--cluster", "2xcpu,2xcpu", "--profile", str(out), "--seq-len", "128",
                      "--out", str(tmp_path)]) == 2
    assert "--seq-len 64" in capsys.readouterr().err
    assert main_plan(["--cluster", "2xcpu,2xcpu", "--profile", str(out), "--model", "D1", "--seq-len", "64",
                      "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'D1'" in err and "num_layers=2" in err and "num_layers=8" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main_plan(["--cluster", "2xcpu,2xcpu", "--profile", str(bad), "--out", str(tmp_path)]) == 2
    assert "hetermoe-profile/1" in capsys.readouterr().err


def test_profile_bad_arguments_exit_2(capsys, tmp_path):
    assert main_profile(["--model", "D1", "--seq-len", "0", "--out", str(tmp_path / "p.json")]) == 2
    assert main_profile(["--model", "nope", "--seq-len", "8", "--device", "cpu", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "--seq-len" in err and "nope" in err


def test_affine_fit_and_device_names():
    fit = Affine.fit([1.0, 2.0], [3.0, 5.0])
    assert (fit.fixed, fit.per_unit) == pytest.approx((1.0, 2.0))
    noisy = Affine.fit([1.0, 2.0], [3.0, 1.0])  # slower at the smaller size: timing noise
    assert noisy.fixed >= 0 and noisy.per_unit >= 0
    assert canonical_device_name("Tesla V100-SXM2-32GB") == "V100"
    assert canonical_device_name("NVIDIA L40S") == "L40S"
    assert canonical_device_name("NVIDIA H200") == "H200"
    assert canonical_device_name("NVIDIA GeForce RTX 4090") == "NVIDIA-GeForce-RTX-4090"
