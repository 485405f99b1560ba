"""Zebra parallelism under device emulation: EP vs DistEP vs ZP on the same 4 CPU processes.

    python benchmarks/zebra_emulated.py [--seq-len auto|N] [--steps 6] [--batch 8]

4 processes emulate 2 A40 (attention ranks) + 2 V100 (expert ranks) training a tiny Mixtral-shaped model
(8 layers, 24 experts, top-2: the paper's D1 layout) whose every compute task takes the time the planner's
device profiles give for the D1 shape at the emulated sequence length (hf_hetermoe/emulation.py). Numbers
stay exact; what is measured is the schedule. Runs, side by side:
  EP      colocated: all 4 emulated GPUs run attention and hold 6 experts each (global batch split 4 ways)
  DistEP  disaggregated, R = 1
  ZP      disaggregated, R = 2 and R = 4
  ZP+Asym-EA, and ZP beside it, at a short length where expert time exceeds attention (8K by default), with
  the experts moved per layer by Algorithm 1 (the planner's `asym_offloads`) on the same profiles
Printed: iteration time, emulated tokens/s, each pool's busy fraction, the ratios ZP/DistEP, ZP/EP and
ZP+Asym-EA/ZP, and for every disaggregated run the simulator's prediction for the same profiles (compute only:
the link is set very fast, as emulation pads compute and not communication; no activation checkpointing).
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


def simulator_setup(seq_len: int, global_seqs: int):
    from hf_hetermoe.planner.cluster import parse_cluster
    from hf_hetermoe.planner.presets import resolve_model
    from hf_hetermoe.planner.workload import Setup

    cluster = parse_cluster("2xA40,2xV100", link_gbps=1e6)
    return Setup(cluster=cluster, shape=resolve_model("D1"), seq_len=seq_len, global_batch=global_seqs,
                 checkpointing=False)


def predicted_s(seq_len: int, global_seqs: int, r: int, offloads: list[int] | None = None, *,
                batched_head: bool = True) -> float:
    """The simulator's iteration time; `batched_head` as the runtime does it (False: exact Theorem 1)."""
    from hf_hetermoe.planner.strategies import simulate_zebra

    return simulate_zebra(simulator_setup(seq_len, global_seqs), r, offloads, batched_head=batched_head).makespan


def algorithm1_offloads(seq_len: int, global_seqs: int, r: int) -> list[int]:
    """Algorithm 1 on one stripe's forward times (as the planner's `asym_offloads`, "paper" inputs), without its
    GPU-memory bounds: emulated ranks hold tiny experts, as the runtime's `asym_ea: auto` sees on this host."""
    from hf_hetermoe.planner.asym_ea import gather_and_squeeze

    setup = simulator_setup(seq_len, global_seqs)
    c, shape = setup.cluster, setup.shape
    seqs = max(setup.microbatch_seqs(r))
    per_expert = c.num_attention * shape.top_k * seqs * seq_len / shape.num_experts
    share = shape.num_experts // c.num_expert
    return gather_and_squeeze(
        num_experts=shape.num_experts, num_layers=shape.num_layers, num_attention=c.num_attention,
        num_expert=c.num_expert, t_attn=c.attention.device.attention_s(shape, num_seqs=seqs, seq_len=seq_len)[0],
        t_exp_on_attention=share * c.attention.device.expert_s(shape, num_tokens=per_expert)[0],
        t_exp_on_expert=share * c.expert.device.expert_s(shape, num_tokens=per_expert)[0],
    )


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
        errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
        sys.stderr.write("\n".join(errors[-10:]) + "\n" + result.stderr[-2000:])
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
    parser.add_argument("--short-seq-len", type=int, default=8192, help="emulated length for ZP vs ZP+Asym-EA")
    parser.add_argument("--short-batch", type=int, default=32,
                        help="sequences per attention rank at the short length (long tasks keep this host's "
                             "per-exchange overhead small against the emulated times)")
    ns = parser.parse_args(argv)
    seq_len = balanced_seq_len(ns.batch) if ns.seq_len == "auto" else int(ns.seq_len)
    short = ns.short_seq_len
    global_seqs = 2 * ns.batch
    emulation = {"devices": DEVICES, "model": "D1", "seq_len": seq_len}
    short_seqs = 2 * ns.short_batch
    offloads = algorithm1_offloads(short, short_seqs, 2)
    asym = {layer: o for layer, o in enumerate(offloads) if o} or "off"
    base = {"model": MODEL, "seq_len": REAL_SEQ_LEN, "steps": ns.steps}
    print(f"EMULATED devices {DEVICES} (ranks 0-3), D1 costs, {ns.steps} steps per run; balanced length {seq_len} "
          f"with {global_seqs} sequences per step; short length {short} with {short_seqs}; Algorithm 1 at {short}: "
          f"{asym}", flush=True)
    disaggregated = {"attention_ranks": [0, 1], "emulation": emulation}
    runs = [  # (name, R, emulated length, asym_ea, sequences per attention rank)
        ("DistEP", 1, seq_len, "off", ns.batch), ("ZP R=2", 2, seq_len, "off", ns.batch),
        ("ZP R=4", 4, seq_len, "off", ns.batch),
        (f"ZP R=2 @{short}", 2, short, "off", ns.short_batch),
        (f"ZP+Asym-EA R=2 @{short}", 2, short, asym, ns.short_batch),
    ]
    with tempfile.TemporaryDirectory() as workdir:
        ep = launch({"mode": "colocated", "emulation": emulation},
                    [{"name": "EP", "batch_size": ns.batch // 2, "hetermoe": {"mode": "colocated", "emulation": emulation}}],
                    dict(base, attention_ranks=4), workdir, "ep")
        specs = [{"name": name, "batch_size": batch,
                  "hetermoe": dict(disaggregated, zebra={"microbatches": r}, asym_ea=a,
                                   emulation=dict(emulation, seq_len=length))} for name, r, length, a, batch in runs]
        others = launch(disaggregated, specs, dict(base, attention_ranks=2), workdir, "zp")
    rows = {r["name"]: summarise(r, global_seqs, seq_len) for r in ep + others[:3]}
    rows.update({r["name"]: summarise(r, short_seqs, short) for r in others[3:]})
    predicted = {name: predicted_s(length, 2 * batch, r, offloads if a != "off" else None)
                 for name, r, length, a, batch in runs}
    theorem1 = {name: predicted_s(length, 2 * batch, r, offloads if a != "off" else None, batched_head=False)
                for name, r, length, a, batch in runs}
    print(f"\n{'EMULATED':<24} {'iter (s)':>9} {'simulated':>10} {'tokens/s':>10} {'attn busy':>10} {'expert busy':>12}")
    for name, row in rows.items():
        fmt = lambda v: f"{v:.0%}" if v is not None else "-"  # noqa: E731
        sim = f"{predicted[name]:.3f}" if name in predicted else "-"
        print(f"{name:<24} {row['iteration_s']:>9.3f} {sim:>10} {row['tokens_per_s']:>10.0f} "
              f"{fmt(row['attention_busy']):>10} {fmt(row['expert_busy']):>12}")
    best = min(("ZP R=2", "ZP R=4"), key=lambda n: rows[n]["iteration_s"])
    print(f"\nEMULATED ratios at {seq_len} ({best}): ZP/DistEP "
          f"{rows['DistEP']['iteration_s'] / rows[best]['iteration_s']:.2f}x, "
          f"ZP/EP {rows['EP']['iteration_s'] / rows[best]['iteration_s']:.2f}x (throughput)")
    zp, asym_row = rows[f"ZP R=2 @{short}"], rows[f"ZP+Asym-EA R=2 @{short}"]
    print(f"EMULATED ratio at {short}: ZP+Asym-EA/ZP {zp['iteration_s'] / asym_row['iteration_s']:.2f}x (throughput)")
    for name in predicted:
        print(f"measured / simulated, {name}: {rows[name]['iteration_s'] / predicted[name]:.2f} "
              f"(simulated cost of the batched head vs exact Theorem 1: {predicted[name] / theorem1[name]:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
