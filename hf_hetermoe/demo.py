"""`hetermoe demo`: the whole job on this machine, no arguments needed.

4 CPU processes (attention ranks 0-1 run the stock Trainer script, expert ranks 2-3 hold the experts) train a
small Mixtral on the bundled text; then this process reloads the written checkpoint with stock transformers,
generates a line of text and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .cli import launch_command
from .config import HeterMoEConfig
from .data import demo_corpus_path
from .placement import ExpertPlacement
from .recipes import recipe_path

DEMO_MODEL = {  # a small Mixtral: 8 experts top-2 per layer (Mixtral-8x7B: hidden 4096, 32 layers, vocab 32000)
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512,
}


def training_args(output_dir: str, max_steps: int) -> list[str]:
    args = ["--train_file", demo_corpus_path(), "--output_dir", output_dir, "--max_steps", str(max_steps),
            "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "10",
            "--lr_scheduler_type", "cosine", "--weight_decay", "0.01", "--max_grad_norm", "1.0",
            "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--include_num_input_tokens_seen", "true", "--block_size", "64", "--dataloader_num_workers", "0"]
    for key, value in DEMO_MODEL.items():
        args += [f"--{key}", str(value)]
    return args


def summarise(output_dir: str, config: HeterMoEConfig, wall_s: float) -> dict:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    train = [h for h in state["log_history"] if "train_loss" in h][-1]  # the end-of-training entry
    topology = config.resolve_topology(4)
    placement = ExpertPlacement.even(
        layers=tuple(range(DEMO_MODEL["num_hidden_layers"])), num_experts=DEMO_MODEL["num_local_experts"],
        host_ranks=topology.host_ranks,
    )
    return {
        "steps": state["global_step"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_per_s": state.get("num_input_tokens_seen", 0) / max(train["train_runtime"], 1e-9),
        "train_runtime_s": train["train_runtime"],
        "topology": topology.describe(),
        "placement": placement.describe(),
        "wall_s": wall_s,
    }


def generate_line(output_dir: str, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output_dir)  # stock transformers, stock checkpoint
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, min_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return f"{type(model).__name__}: " + tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetermoe demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="hetermoe-demo", help="where the checkpoint goes")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--prompt", default="This module provides")
    ns = parser.parse_args(argv)
    config_path = recipe_path("cpu_2attn_2exp.yaml")
    config = HeterMoEConfig.from_yaml(config_path)
    output_dir = os.path.abspath(ns.output_dir)
    print(f"hetermoe demo: {config.resolve_topology(4).describe()}")
    print(f"training a small Mixtral on {os.path.basename(demo_corpus_path())} for {ns.max_steps} steps ...", flush=True)
    start = time.time()
    cmd, env = launch_command(config_path, 4, recipe_path("train_clm.py"), training_args(output_dir, ns.max_steps))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"hetermoe demo: training failed (exit code {code}).", file=sys.stderr)
        return code
    train_wall = time.time() - start
    summary = summarise(output_dir, config, train_wall)
    line = generate_line(output_dir, ns.prompt)
    total = time.time() - start
    print("\n==== hetermoe demo summary ====")
    print(f"steps            {summary['steps']}")
    print(f"loss             {summary['loss_first']:.3f} (first log) -> {summary['loss_last']:.3f} (last log)")
    print(f"tokens/s         {summary['tokens_per_s']:.0f} (training, 2 attention ranks, CPU)")
    print(f"roles            {summary['topology']}")
    print("experts          " + summary["placement"].replace("\n", "\n                 "))
    print(f"checkpoint       {output_dir} (stock format)")
    print(f"reloaded + generate ({ns.prompt!r}):\n                 {line}")
    print(f"wall time        {total:.0f} s (launch + training {train_wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
