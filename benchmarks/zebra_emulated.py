"""Zebra parallelism under device emulation: EP vs DistEP vs ZP on the same 4 CPU processes.

    python benchmarks/zebra_emulated.py [--seq-len auto|N] [--steps 6] [--batch 8]

4 processes emulate 2 A40 (attention ranks) + 2 V100 (expert ranks) training a tiny Mixtral-shaped model
(8 layers, 24 experts, top-2: the paper's D1 layout) whose every compute task takes the time the planner's
device profiles give for the D1 shape at the emulated sequence length (hf_hetermoe/emulation.py). Numbers
stay exact; what is measured is the schedule. Runs, side by side:
  EP      colocated: all 4 emulated GPUs run attention and hold 6 experts each (global batch split 4 ways)
  DistEP  disaggregated, R = 1
  ZP      disaggregated, R = 2 and R = 4
Printed: iteration time, emulated tokens/s, each pool's busy fraction, and the ratios ZP/DistEP, ZP/EP.
Every figure is EMULATED: a model of A40/V100 timings, not a measurement on those GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["A40", "A40", "V100", "V100"]
MODEL = {  # tiny, D1-shaped (D1: hidden 1024, 8 layers, 24 experts top-2, vocab 32000)
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 24, "num_experts_per_tok": 2,
    "max_position_embeddings": 256, "output_router_logits": True, "tie_word_embeddings": False,
}
REAL_SEQ_LEN = 32


def balanced_seq_len(batch: int, stripes: int = 2) -> int:
    """The emulated length where one stripe's attention (A40) and its experts (one V100) take about as long."""
    from hf_hetermoe.planner.presets import resolve_model
    from hf_hetermoe.planner.profiles import builtin_profile

    shape, a40, v100 = resolve_model("D1"), builtin_profile("A40"), builtin_profile("V100")
    best, best_gap = 4096, float("inf")
    for seq in range(2048, 65537, 1024):
        seqs = batch // stripes
        attention = a40.attention_s(shape, num_seqs=seqs, seq_len=seq)[0]
        # each V100 holds 12 of 24 experts and gets this stripe's rows from both attention ranks
        tokens_per_expert = 2 * seqs * seq * shape.top_k / shape.num_experts
        experts = 12 * v100.expert_s(shape, num_tokens=tokens_per_expert)[0]
        gap = abs(attention / experts - 1)
        if gap < best_gap:
            best, best_gap = seq, gap
    return best


def launch(config: dict, runs: list[dict], base: dict, workdir: str, name: str) -> list[dict]:
    config_path = os.path.join(workdir, f"{name}.yaml")
    spec_path = os.path.join(workdir, f"{name}.json")
    import yaml

    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    spec = dict(base, runs=runs, output=os.path.join(workdir, name))
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", config_path, "--num-processes", "4",
           os.path.join(HERE, "_emulated_runs.py"), spec_path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"benchmark launch {name} failed ({result.returncode})")
    with open(spec["output"] + ".json") as fh:
        return json.load(fh)


def summarise(result: dict, global_seqs: int, seq_len: int) -> dict:
    ends = result["step_ends"]
    steps = [b - a for a, b in zip(ends[1:], ends[2:])] or [ends[-1] - ends[0]]  # skip the first (warm-up)
    iteration = statistics.mean(steps)
    logs = [h for h in result["log_history"] if "hetermoe_attention_busy" in h][2:]
    mean = lambda key: statistics.mean(h[key] for h in logs if key in h) if any(key in h for h in logs) else None  # noqa: E731
    return {
        "iteration_s": iteration,
        "tokens_per_s": global_seqs * seq_len / iteration,
        "attention_busy": mean("hetermoe_attention_busy"),
        "expert_busy": mean("hetermoe_expert_busy") if mean("hetermoe_expert_busy") is not None
        else mean("hetermoe_expert_busy_here"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", default="auto", help="emulated tokens per sequence, or auto (balanced)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="sequences per attention rank per step")
    ns = parser.parse_args(argv)
    seq_len = balanced_seq_len(ns.batch) if ns.seq_len == "auto" else int(ns.seq_len)
    emulation = {"devices": DEVICES, "model": "D1", "seq_len": seq_len}
    base = {"model": MODEL, "seq_len": REAL_SEQ_LEN, "steps": ns.steps}
    global_seqs = 2 * ns.batch
    print(f"EMULATED devices {DEVICES} (ranks 0-3), D1 costs at {seq_len} tokens per sequence, "
          f"global batch {global_seqs} sequences, {ns.steps} steps per run", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        ep = launch({"mode": "colocated", "emulation": emulation},
                    [{"name": "EP", "batch_size": ns.batch // 2, "hetermoe": {"mode": "colocated", "emulation": emulation}}],
                    dict(base, attention_ranks=4), workdir, "ep")
        disaggregated = {"attention_ranks": [0, 1], "emulation": emulation}
        runs = [{"name": name, "batch_size": ns.batch,
                 "hetermoe": dict(disaggregated, zebra={"microbatches": r})} for name, r in
                (("DistEP", 1), ("ZP R=2", 2), ("ZP R=4", 4))]
        others = launch(disaggregated, runs, dict(base, attention_ranks=2), workdir, "zp")
    rows = {r["name"]: summarise(r, global_seqs, seq_len) for r in ep + others}
    print(f"\n{'EMULATED':<8} {'iter (s)':>9} {'tokens/s':>10} {'attn busy':>10} {'expert busy':>12}")
    for name, row in rows.items():
        fmt = lambda v: f"{v:.0%}" if v is not None else "-"  # noqa: E731
        print(f"{name:<8} {row['iteration_s']:>9.3f} {row['tokens_per_s']:>10.0f} {fmt(row['attention_busy']):>10} "
              f"{fmt(row['expert_busy']):>12}")
    best = min((n for n in rows if n.startswith("ZP")), key=lambda n: rows[n]["iteration_s"])
    print(f"\nEMULATED ratios ({best}): ZP/DistEP {rows['DistEP']['iteration_s'] / rows[best]['iteration_s']:.2f}x, "
          f"ZP/EP {rows['EP']['iteration_s'] / rows[best]['iteration_s']:.2f}x (throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
