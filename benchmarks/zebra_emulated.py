"""Zebra parallelism under device emulation: EP, DistEP, ZP and ZP+Asym-EA at 4K-32K, measured against the planner.

    python benchmarks/zebra_emulated.py [--lengths 4096,8192,16384,32768] [--steps 5] [--tokens 131072]

4 processes emulate 2 A40 (attention ranks) + 2 V100 (expert ranks), 100 Gbps each, training a tiny
Mixtral-shaped model (8 layers, 24 experts, top-2: the paper's D1 layout) whose every compute task takes the
time the planner's device profiles give for the D1 shape at the emulated sequence length, and whose every
exchange takes its modelled link time (hf_hetermoe/emulation.py). Numbers stay exact; what is measured is the
schedule. At every length (the same tokens per attention rank at every length: `--tokens`), side by side:
  EP          colocated: all 4 emulated GPUs run attention and hold 6 experts each
  DistEP      disaggregated, R = 1
  ZP          disaggregated, R = the planner's best for this setup (2..4)
  ZP+Asym-EA  the same R with the experts Algorithm 1 moves (not run where it moves none: then it is ZP)
Each run logs its routing (HETERMOE_ROUTING_LOG), and the simulator predicts it with that routing, the same
link and the schedule the runtime runs (batched head; no activation checkpointing, as the tiny model trains).
The table gives every run's measured / predicted iteration; the last line is the largest |measured/predicted
- 1| over the disaggregated runs. Every figure is EMULATED: a model of A40/V100 timings, not a measurement on
those GPUs.
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
LINK_GBPS = 100
MODEL = {  # tiny, D1-shaped (D1: hidden 1024, 8 layers, 24 experts top-2, vocab 32000)
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 24, "num_experts_per_tok": 2,
    "max_position_embeddings": 256, "output_router_logits": True, "tie_word_embeddings": False,
}
REAL_SEQ_LEN = 32
MAX_R = 4


def simulator_setup(seq_len: int, global_seqs: int, routing=None):
    from hf_hetermoe.planner.cluster import parse_cluster
    from hf_hetermoe.planner.presets import resolve_model
    from hf_hetermoe.planner.routing import UNIFORM
    from hf_hetermoe.planner.workload import Setup

    cluster = parse_cluster("2xA40,2xV100", link_gbps=LINK_GBPS)
    return Setup(cluster=cluster, shape=resolve_model("D1"), seq_len=seq_len, global_batch=global_seqs,
                 checkpointing=False, routing=routing or UNIFORM)


def predicted_s(setup, strategy: str, r: int, offloads: list[int] | None = None, *, batched_head: bool = True) -> float:
    """The simulator's iteration time for what the runtime runs (`batched_head=False`: exact Theorem 1)."""
    from hf_hetermoe.planner.strategies import run_ep, simulate_zebra

    if strategy == "EP":
        return run_ep(setup).iteration_s
    return simulate_zebra(setup, r, offloads, batched_head=batched_head).makespan


def best_r(seq_len: int, global_seqs: int) -> int:
    setup = simulator_setup(seq_len, global_seqs)
    choices = range(2, min(MAX_R, setup.seqs_per_attention_gpu) + 1)
    return min(choices, key=lambda r: predicted_s(setup, "ZP", r))


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


def summarise(result: dict) -> dict:
    ends = result["step_ends"]
    steps = [b - a for a, b in zip(ends[1:], ends[2:])] or [ends[-1] - ends[0]]  # skip the first (warm-up)
    logs = [h for h in result["log_history"] if "hetermoe_attention_busy" in h][2:]
    mean = lambda key: statistics.mean(h[key] for h in logs if key in h) if any(key in h for h in logs) else None  # noqa: E731
    expert = mean("hetermoe_expert_busy")
    return {"iteration_s": statistics.mean(steps), "attention_busy": mean("hetermoe_attention_busy"),
            "expert_busy": expert if expert is not None else mean("hetermoe_expert_busy_here")}


def plan_runs(lengths: list[int], tokens: int) -> list[dict]:
    """Every run: name, strategy, length, sequences per attention rank, R, Asym-EA offloads."""
    runs = []
    for length in lengths:
        seqs = max(tokens // length, 1)
        r = best_r(length, 2 * seqs) if seqs >= 2 else 1
        offloads = algorithm1_offloads(length, 2 * seqs, r)
        common = {"length": length, "seqs": seqs}
        runs += [dict(common, strategy="EP", r=1, offloads=None), dict(common, strategy="DistEP", r=1, offloads=None),
                 dict(common, strategy="ZP", r=r, offloads=None)]
        if any(offloads):
            runs.append(dict(common, strategy="ZP+Asym-EA", r=r, offloads=offloads))
    for run in runs:
        run["name"] = f"{run['strategy']} @{run['length']}"
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="emulated tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--tokens", type=int, default=131072,
                        help="emulated tokens per attention rank per step (sequences = tokens / length)")
    ns = parser.parse_args(argv)
    lengths = [int(x) for x in ns.lengths.split(",")]
    runs = plan_runs(lengths, ns.tokens)
    print(f"EMULATED devices {DEVICES} (ranks 0-3) at {LINK_GBPS} Gbps, D1 costs, {ns.steps} steps per run, "
          f"{ns.tokens} tokens per attention rank per step", flush=True)
    base = {"model": MODEL, "seq_len": REAL_SEQ_LEN, "steps": ns.steps}
    from hf_hetermoe.planner.routing import observed

    with tempfile.TemporaryDirectory() as workdir:
        def spec(run: dict, mode: str, batch: int) -> dict:
            emulation = {"devices": DEVICES, "model": "D1", "seq_len": run["length"], "link_gbps": LINK_GBPS}
            hetermoe = {"mode": mode, "emulation": emulation}
            if mode == "disaggregated":
                asym = {layer: o for layer, o in enumerate(run["offloads"]) if o} if run["offloads"] else "off"
                hetermoe.update(attention_ranks=[0, 1], zebra={"microbatches": run["r"]}, asym_ea=asym)
            return {"name": run["name"], "batch_size": batch, "hetermoe": hetermoe,
                    "routing_log": os.path.join(workdir, "routing", run["name"].replace(" ", "_"))}

        emulation0 = {"devices": DEVICES, "model": "D1", "link_gbps": LINK_GBPS}
        ep = [r for r in runs if r["strategy"] == "EP"]
        zp = [r for r in runs if r["strategy"] != "EP"]
        ep_specs = [spec(r, "colocated", r["seqs"] // 2) for r in ep]
        zp_specs = [spec(r, "disaggregated", r["seqs"]) for r in zp]
        results = launch({"mode": "colocated", "emulation": emulation0}, ep_specs, dict(base, attention_ranks=4),
                         workdir, "ep")
        results += launch({"attention_ranks": [0, 1], "emulation": emulation0}, zp_specs,
                          dict(base, attention_ranks=2), workdir, "zp")
        measured = {r["name"]: summarise(r) for r in results}
        for s in ep_specs + zp_specs:
            run = next(r for r in runs if r["name"] == s["name"])
            setup = simulator_setup(run["length"], 2 * run["seqs"], observed(s["routing_log"]))
            run["predicted"] = predicted_s(setup, run["strategy"], run["r"], run["offloads"])
            run["uniform"] = predicted_s(simulator_setup(run["length"], 2 * run["seqs"]), run["strategy"], run["r"],
                                         run["offloads"])
            run.update(measured[run["name"]])
    print(f"\n{'EMULATED':<22} {'R':>2} {'iter (s)':>9} {'predicted':>10} {'meas/pred':>10} {'uniform':>8} "
          f"{'tokens/s':>9} {'vs EP':>6} {'vs DistEP':>10} {'attn busy':>10} {'expert busy':>12}")
    by = {(r["strategy"], r["length"]): r for r in runs}
    pct = lambda v: f"{v:.0%}" if v is not None else "-"  # noqa: E731
    for run in runs:
        ep_run, dist = by[("EP", run["length"])], by.get(("DistEP", run["length"]))
        meas, pred = run["iteration_s"], run["predicted"]
        vs = lambda other: (f"{other['iteration_s'] / meas:.2f}x/{other['predicted'] / pred:.2f}x"  # noqa: E731
                            if other is not None and other is not run else "-")
        print(f"{run['name']:<22} {run['r']:>2} {meas:>9.3f} {pred:>10.3f} {meas / pred:>10.3f} {run['uniform']:>8.3f} "
              f"{2 * run['seqs'] * run['length'] / meas:>9.0f} {vs(ep_run):>6} {vs(dist):>10} "
              f"{pct(run['attention_busy']):>10} {pct(run['expert_busy']):>12}")
    print("(vs EP / vs DistEP: throughput ratio measured/predicted; 'uniform': prediction with uniform routing)")
    for length in lengths:
        zp_run, asym = by[("ZP", length)], by.get(("ZP+Asym-EA", length))
        if asym is None:
            print(f"{length}: Algorithm 1 moves no expert: ZP+Asym-EA is ZP (R={zp_run['r']})")
        else:
            print(f"{length}: ZP+Asym-EA / ZP {zp_run['iteration_s'] / asym['iteration_s']:.2f}x measured, "
                  f"{zp_run['predicted'] / asym['predicted']:.2f}x predicted (throughput; offloads {asym['offloads']})")
    errors = [abs(r["iteration_s"] / r["predicted"] - 1) for r in runs if r["strategy"] != "EP"]
    print(f"prediction error: max {max(errors):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
