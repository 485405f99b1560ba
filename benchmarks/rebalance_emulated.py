"""Re-placement under skewed routing, emulated: static placement vs dynamic re-placement, side by side in one run.

    python benchmarks/rebalance_emulated.py [--steps 12] [--every 3] [--length 8192] [--tokens 65536]
                                            [--exponent 1.0] [--logit-scale 3] [--real-seq-len 128] [--lr 1e-5]

4 processes emulate 2 A40 (attention ranks 0-1) + 2 V100 (expert ranks 2-3), 100 Gbps each, training a tiny
D1-shaped Mixtral (8 layers, 24 experts, top-2; as benchmarks/zebra_emulated.py) with zebra R = 2, whose every
compute task and exchange takes the time the planner's profiles give for D1 at the emulated length
(hf_hetermoe/emulation.py). The router is skewed on purpose: every gate's weights are scaled by `--logit-scale`
(token-dependent logits with a spread like a trained router's) and a fixed Zipf bias is added to its logits by a
forward hook, bias[e] = -S * ln(rank_l(e) + 1) with S = `--exponent` and rank_l a seeded random permutation of
the experts per layer (expert e's routing weight times 1 / (rank + 1)^S; benchmarks/_rebalance_runs.py).

Two runs under one launcher session, same model, data and routing (moves do not change the math):
  static    the default placement (12 + 12 experts per layer on the two V100s), no re-placement;
  dynamic   `rebalance: {every_steps: K, min_gain: 1.05}`: after step K the policy re-places from the routing of
            those K steps (same counts per rank), experts move with their optimizer state.
Measured: mean iteration time over steps K+2 .. end, leaving out the decision steps (multiples of K: their
interval contains the decision, and a move if one is made) in both runs. Predicted: the planner's simulator (the runtime's
schedule) with the routing each run logged and each run's final placement. The last line is the measured
throughput ratio. Every figure is EMULATED: a model of A40/V100 timings, not a measurement on those GPUs.
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
sys.path.insert(0, HERE)

from zebra_emulated import DEVICES, LINK_GBPS, MODEL, simulator_setup  # noqa: E402

R = 2


def launch(config: dict, base: dict, workdir: str) -> list[dict]:
    import yaml

    config_path = os.path.join(workdir, "rebalance.yaml")
    spec_path = os.path.join(workdir, "rebalance.json")
    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    spec = dict(base, output=os.path.join(workdir, "rebalance"))
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", config_path, "--num-processes", "4",
           os.path.join(HERE, "_rebalance_runs.py"), spec_path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        raise SystemExit(f"benchmark launch failed ({result.returncode})")
    moves = [line for line in result.stderr.splitlines() if "re-placement after step" in line]
    with open(spec["output"] + ".json") as fh:
        return json.load(fh), moves


def predicted_s(length: int, global_seqs: int, routing_log: str, placement: dict) -> float:
    from hf_hetermoe.planner.routing import observed
    from hf_hetermoe.planner.strategies import simulate_zebra

    setup = simulator_setup(length, global_seqs, observed(routing_log))
    owner = {int(layer): tuple(row) for layer, row in placement.items()}
    return simulate_zebra(setup, R, placement=owner).makespan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--every", type=int, default=3, help="K: the dynamic run decides every K steps")
    parser.add_argument("--length", type=int, default=8192, help="emulated tokens per sequence")
    parser.add_argument("--tokens", type=int, default=65536, help="emulated tokens per attention rank per step")
    parser.add_argument("--exponent", type=float, default=1.0, help="S of the Zipf router bias")
    parser.add_argument("--real-seq-len", type=int, default=128,
                        help="real tokens per sequence (each stands for length / real-seq-len emulated tokens); more "
                             "real tokens, less routing noise per step")
    parser.add_argument("--lr", type=float, default=1e-5,
                        help="learning rate: small, so the routing is the stated skew rather than the fast drift of a "
                             "fresh tiny model's embeddings (1e-3 moves them ~5%% a step)")
    parser.add_argument("--logit-scale", type=float, default=3.0, help="router weights scaled by this at init")
    ns = parser.parse_args(argv)
    seqs = max(ns.tokens // ns.length, R)
    print(f"EMULATED devices {DEVICES} (ranks 0-3) at {LINK_GBPS} Gbps, D1 costs at {ns.length} tokens, R={R}, "
          f"{seqs} sequences per attention rank per step, {ns.steps} steps; router: logits x{ns.logit_scale:g} "
          f"at init + Zipf bias -{ns.exponent:g}*ln(rank+1) (per-layer random expert order)", flush=True)
    emulation = {"devices": DEVICES, "model": "D1", "seq_len": ns.length, "link_gbps": LINK_GBPS}
    common = {"attention_ranks": [0, 1], "zebra": {"microbatches": R}, "emulation": emulation}
    with tempfile.TemporaryDirectory() as workdir:
        runs = [
            {"name": "static", "batch_size": seqs, "hetermoe": common,
             "routing_log": os.path.join(workdir, "routing_static")},
            {"name": "dynamic", "batch_size": seqs,
             "hetermoe": dict(common, rebalance={"every_steps": ns.every, "min_gain": 1.05}),
             "routing_log": os.path.join(workdir, "routing_dynamic")},
        ]
        base = {"learning_rate": ns.lr, "model": MODEL, "seq_len": ns.real_seq_len, "steps": ns.steps, "attention_ranks": 2, "runs": runs,
                "skew": {"exponent": ns.exponent, "logit_scale": ns.logit_scale}}
        results, decisions = launch(dict(common, emulation=dict(emulation, seq_len=None)), base, workdir)
        timed_steps = [s for s in range(ns.every + 2, ns.steps + 1) if s % ns.every]
        by = {}
        for run, result in zip(runs, results):
            ends = result["step_ends"]
            # Step s ended at ends[s - 1]; time steps K+2 .. end, except the decision steps (multiples of K), in both.
            timed = [ends[s - 1] - ends[s - 2] for s in timed_steps]
            pred = predicted_s(ns.length, 2 * seqs, run["routing_log"], result["placement"])
            imbalance = [h["hetermoe_load_imbalance"] for h in result["log_history"] if "hetermoe_load_imbalance" in h]
            by[run["name"]] = {"iteration_s": statistics.mean(timed), "predicted_s": pred, "timed_steps": len(timed),
                               "imbalance_last": imbalance[-1] if imbalance else None}
    for line in decisions:
        print(line[line.index("re-placement"):])
    print(f"\n{'EMULATED':<10} {'iter (s)':>9} {'predicted':>10} {'meas/pred':>10} {'load imbalance':>15}")
    for name, row in by.items():
        print(f"{name:<10} {row['iteration_s']:>9.3f} {row['predicted_s']:>10.3f} "
              f"{row['iteration_s'] / row['predicted_s']:>10.3f} {row['imbalance_last']:>15.3f}")
    static, dynamic = by["static"], by["dynamic"]
    print(f"(mean over steps {timed_steps} of each run: after the first decision, without the decision steps; load "
          "imbalance: busiest V100's routed pairs / mean, worst layer, last logged step)")
    print(f"predicted dynamic/static: {static['predicted_s'] / dynamic['predicted_s']:.2f}x; prediction error: max "
          f"{max(abs(r['iteration_s'] / r['predicted_s'] - 1) for r in by.values()):.1%}")
    print(f"dynamic/static: {static['iteration_s'] / dynamic['iteration_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
