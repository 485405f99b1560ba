"""The `hetermoe` command: argument errors without processes; real launches of the stock recipe and the demo."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from hf_hetermoe import cli
from hf_hetermoe.data import demo_corpus_path
from hf_hetermoe.recipes import recipe_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "hf_hetermoe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_usage(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "launch" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2


@pytest.mark.parametrize("config_text, nproc, words", [
    ("attention_ranks: [0, 1]\nexpert_ranks: [2]\n", 4, ["cover 3 ranks", "4 processes"]),
    ("attention_ranks: [0, 1]\nfoo: 1\n", 4, ["unknown key", "foo"]),
    ("mode: colocated\n", 1, ["at least 2"]),
])
def test_launch_rejects_bad_input_before_starting_processes(tmp_path, capsys, config_text, nproc, words):
    config = tmp_path / "cfg.yaml"
    config.write_text(config_text)
    assert cli.main(["launch", "--config", str(config), "--num-processes", str(nproc), recipe_path("train_clm.py")]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_launch_rejects_missing_script(capsys):
    code = cli.main(["launch", "--config", recipe_path("cpu_2attn_2exp.yaml"), "--num-processes", "4", "nope.py"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_stock_script_runs_unmodified_on_2_attention_and_2_expert_ranks(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "launch", "--config", os.path.join(REPO, "recipes", "hetermoe", "cpu_2attn_2exp.yaml"), "--num-processes", "4",
        os.path.join(REPO, "recipes", "train_clm.py"), "--train_file", demo_corpus_path(), "--output_dir", str(out),
        "--max_steps", "12", "--per_device_train_batch_size", "4", "--logging_steps", "4", "--save_steps", "6",
        "--report_to", "none", "--do_eval", "--eval_strategy", "steps", "--eval_steps", "6", "--seed", "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = MixtralForCausalLM.from_pretrained(out)  # stock transformers reads the output folder
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_local_experts == 8
    assert os.path.isdir(out / "checkpoint-12") and os.path.isdir(out / "checkpoint-6")
    ids = tokenizer("This module", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


@pytest.mark.slow
def test_launch_exits_nonzero_when_a_rank_fails(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("attention_ranks: [0]\n")
    result = run_cli("launch", "--config", str(config), "--num-processes", "2",
                     os.path.join(REPO, "recipes", "train_clm.py"), "--no_such_flag", "1")
    assert result.returncode != 0
    assert "no_such_flag" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = run_cli("demo", "--max-steps", "12", "--output-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "hetermoe demo summary" in out and "rank 2: experts [0, 1, 2, 3] of every layer" in out
    assert "MixtralForCausalLM:" in out  # reloaded with stock transformers and generated
    assert isinstance(MixtralForCausalLM.from_pretrained(tmp_path / "demo"), MixtralForCausalLM)
