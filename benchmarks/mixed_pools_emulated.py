"""Mixed-speed expert pool under device emulation: the even vs the proportional expert split, measured against
the planner.

    python benchmarks/mixed_pools_emulated.py [--seq-len 16384] [--seqs 4] [--steps 6]

4 processes emulate 2 A40 (attention ranks 0-1) + 1 V100 and 1 T4 (expert ranks 2-3), 100 Gbps each, training a
tiny Mixtral-shaped model (8 layers, 24 experts, top-2: the paper's D1 layout) whose every compute task takes the
time the planner's device profiles give for the D1 shape at the emulated sequence length, and whose every
exchange takes its modelled link time (hf_hetermoe/emulation.py). Numbers stay exact; what is measured is the
schedule. Side by side in one launch, with the same zebra R (the planner's best for the proportional split):
  even          `expert_split: even`: 12 experts of every layer on the V100, 12 on the T4 (the T4 paces)
  proportional  `expert_split: proportional`: experts in proportion to each expert rank's expert speed
                (hf_hetermoe/expert_speeds.py: the emulated device's profile, D1 shape)
Each run logs its routing (HETERMOE_ROUTING_LOG), and the simulator predicts it with that routing, the placement
the run used (an explicit placement: `simulate_zebra(..., placement=...)`), the same link and the schedule the
runtime runs (batched head; no activation checkpointing, as the tiny model trains). The last line is the
measured throughput ratio. Every figure is EMULATED: a model of A40/V100/T4 timings, not a measurement on them.
Memory is not modelled here (the planner's GPU-memory caps would not fit D1 on one V100 and one T4 at all).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from zebra_emulated import LINK_GBPS, MODEL, REAL_SEQ_LEN, launch, summarise  # noqa: E402

DEVICES = ["A40", "A40", "V100", "T4"]
CLUSTER = "2xA40,1xV100,1xT4"  # the planner's ranks are the launch's: attention 0-1, V100 2, T4 3
MAX_R = 4


def simulator_setup(seq_len: int, global_seqs: int, routing=None):
    from hf_hetermoe.planner.cluster import parse_cluster
    from hf_hetermoe.planner.presets import resolve_model
    from hf_hetermoe.planner.routing import UNIFORM
    from hf_hetermoe.planner.workload import Setup

    return Setup(cluster=parse_cluster(CLUSTER, link_gbps=LINK_GBPS), shape=resolve_model("D1"), seq_len=seq_len,
                 global_batch=global_seqs, checkpointing=False, routing=routing or UNIFORM)


def best_r(setup) -> int:
    """The planner's best R for the proportional split (2..MAX_R), without its GPU-memory caps: emulated ranks
    hold tiny experts (D1 itself on one V100 and one T4 would not fit, whatever the split)."""
    from hf_hetermoe.placement import split_counts
    from hf_hetermoe.planner.pools import expert_speeds
    from hf_hetermoe.planner.strategies import run_zp_split

    def time_s(r: int) -> float:
        counts = split_counts(setup.shape.num_experts, expert_speeds(setup, r))
        return run_zp_split(setup, r, counts=counts).iteration_s

    return min(range(2, min(MAX_R, setup.seqs_per_attention_gpu) + 1), key=time_s)


def predicted_s(setup, r: int, placement: dict) -> float:
    from hf_hetermoe.placement import ExpertPlacement
    from hf_hetermoe.planner.strategies import simulate_zebra

    return simulate_zebra(setup, r, placement=ExpertPlacement.from_dict(placement).owner).makespan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 16K rather than 8K: an emulated task is padded up to its modelled time but never shortened, so the host's own
    # compute of the tiny model must stay well below the V100's per-expert time (~0.4 ms forward at 8K on this
    # 2-core host it does not: the proportional run then measures ~25% over its prediction).
    parser.add_argument("--seq-len", type=int, default=16384, help="emulated tokens per sequence")
    parser.add_argument("--seqs", type=int, default=4, help="sequences per attention rank per step")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ns = parser.parse_args(argv)
    from hf_hetermoe.planner.routing import observed

    uniform = simulator_setup(ns.seq_len, 2 * ns.seqs)
    r = best_r(uniform)
    print(f"EMULATED devices {DEVICES} (attention ranks 0-1, expert ranks 2-3) at {LINK_GBPS} Gbps, D1 costs at "
          f"{ns.seq_len} tokens, {ns.seqs} sequences per attention rank, R={r}, {ns.steps} steps per run", flush=True)
    emulation = {"devices": DEVICES, "model": "D1", "seq_len": ns.seq_len, "link_gbps": LINK_GBPS}
    base = {"model": MODEL, "seq_len": REAL_SEQ_LEN, "steps": ns.steps, "attention_ranks": 2}
    splits = ("even", "proportional")
    with tempfile.TemporaryDirectory() as workdir:
        specs = [{"name": split, "batch_size": ns.seqs,
                  "hetermoe": {"attention_ranks": [0, 1], "zebra": {"microbatches": r}, "expert_split": split,
                               "emulation": emulation},
                  "routing_log": os.path.join(workdir, "routing", split)} for split in splits]
        results = launch({"attention_ranks": [0, 1], "emulation": emulation}, specs, base, workdir, "pools")
        rows = {}
        for spec, result in zip(specs, results):
            setup = simulator_setup(ns.seq_len, 2 * ns.seqs, observed(spec["routing_log"]))
            owner = result["placement"]["owner"]
            counts = [list(next(iter(owner.values()))).count(rank) for rank in (2, 3)]
            rows[spec["name"]] = dict(summarise(result), counts=counts,
                                      predicted=predicted_s(setup, r, result["placement"]),
                                      uniform=predicted_s(uniform, r, result["placement"]))
    print(f"\n{'EMULATED':<13} {'V100/T4 experts':>15} {'iter (s)':>9} {'predicted':>10} {'meas/pred':>10} "
          f"{'uniform':>8} {'tokens/s':>9} {'attn busy':>10} {'expert busy':>12}")
    for name, row in rows.items():
        meas, pred = row["iteration_s"], row["predicted"]
        busy = lambda v: f"{v:.0%}" if v is not None else "-"  # noqa: E731
        print(f"{name:<13} {'/'.join(map(str, row['counts'])):>15} {meas:>9.3f} {pred:>10.3f} {meas / pred:>10.3f} "
              f"{row['uniform']:>8.3f} {2 * ns.seqs * ns.seq_len / meas:>9.0f} {busy(row['attention_busy']):>10} "
              f"{busy(row['expert_busy']):>12}")
    print("('predicted': the simulator with each run's logged routing and placement; 'uniform': with uniform routing)")
    even, prop = rows["even"], rows["proportional"]
    errors = [abs(row["iteration_s"] / row["predicted"] - 1) for row in rows.values()]
    print(f"predicted proportional/even: {even['predicted'] / prop['predicted']:.2f}x; prediction error: max "
          f"{max(errors):.1%}")
    print(f"proportional/even: {even['iteration_s'] / prop['iteration_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
