"""What HeterMoE costs over stock training: the stock Trainer on the same small Mixtral, run side by side as
  stock          one process, no HeterMoE
  colocated      one process with `callbacks=[HeterMoECallback()]` (every expert on the one rank: no communication)
  disaggregated  `hetermoe launch`, 1 attention rank + 1 expert rank (zebra's default 2 stripes)

    python benchmarks/overhead.py [--hidden 256 512 1024] [--steps 5] [--repeats 2] [--threads 1] [--profile-hidden 512]
                                  [--baseline DIR]   # also time another source tree (before/after a change)
                                  [--alternate-steps N]   # also stock/colocated steps alternated in one process

Model: 4 layers, 8 experts top-2, intermediate 2 x hidden, vocab 1024; sequences of 128 tokens, batch 8.
Runs alternate (stock, colocated, disaggregated, stock, ...) so drift in the machine's load hits every setting
alike. Per-step time is the median of the intervals between the Trainer's step ends over all repeats, leaving out
each run's first `--warmup` steps; the CPU time per step (the process's, all threads; for disaggregated the
attention rank's only) is printed beside it: it moves much less than wall time when other work shares the cores.
Then one colocated run at `--profile-hidden` under cProfile, and its top
HeterMoE functions (hf_hetermoe/, model_patches/) by cumulative time.

Measured on the 2-core development machine while other jobs kept its load average at 9-16, so wall times say
little (a process got 15-40 % of a core); CPU time per step, one thread per process, is the figure to read.
Colocated / stock, CPU time per step (`--baseline` = the tree before the gradient-norm and holder changes):

    hidden   before (baseline)   after   after, --alternate-steps 6 (one process)
    256      1.28x               0.95x   -
    512      1.74x               1.15x   0.965x
    1024     1.54x (1.75x)       1.00x   1.017x

(1024 in parentheses: a second, separate run.) Profile after (hidden 512, 6 steps): the experts' backward and
forward (grouped matmuls) are all of HeterMoE's time; the gradient norm and clipping take 0.06 s, the experts'
step (AdamW) 0.45 s. Before, `ExpertShard.prepare_grads` alone took 9.9 s of a 26 s hidden-512 run.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_overhead_runs.py")
MODES = ("stock", "colocated", "disaggregated")
DISAGGREGATED = "attention_ranks: [0]\nexpert_ranks: [1]\nmode: disaggregated\n"


def run(mode: str, hidden: int, ns: argparse.Namespace, workdir: str, name: str, profile: str | None = None) -> dict:
    """One run in a fresh process. A mode ending in "@baseline" runs with `--baseline` first on PYTHONPATH."""
    mode, _, where = mode.partition("@")
    env = dict(os.environ)
    if where:
        env["PYTHONPATH"] = os.pathsep.join([ns.baseline, *filter(None, [env.get("PYTHONPATH")])])
    spec = {"mode": mode if mode in ("stock", "alternate") else "hetermoe", "hidden": hidden, "steps": ns.steps,
            "seq_len": ns.seq_len, "batch": ns.batch, "threads": ns.threads, "output": os.path.join(workdir, name + ".json"),
            "profile": profile}
    spec_path = os.path.join(workdir, name + ".spec.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    if mode == "disaggregated":
        config = os.path.join(workdir, "disaggregated.yaml")
        with open(config, "w") as fh:
            fh.write(DISAGGREGATED)
        cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", config, "--num-processes", "2",
               WORKER, spec_path]
    else:
        cmd = [sys.executable, WORKER, spec_path]
    # In the work folder: `python -m` puts the current folder first on sys.path, ahead of PYTHONPATH.
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        raise SystemExit(f"overhead benchmark: the {mode} run at hidden {hidden} failed ({result.returncode})")
    with open(spec["output"]) as fh:
        return json.load(fh)


def step_times(result: dict, warmup: int, key: str = "step_ends") -> list[float]:
    ends = result[key]
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def profile_summary(path: str, top: int) -> list[str]:
    stats = pstats.Stats(path)
    rows = []
    for (filename, line, function), (_, calls, _, cumulative, _) in stats.stats.items():
        if "hf_hetermoe" in filename or "model_patches" in filename:
            short = filename[filename.rfind("hf_hetermoe"):] if "hf_hetermoe" in filename else \
                filename[filename.rfind("model_patches"):]
            rows.append((cumulative, calls, f"{short}:{line}({function})"))
    rows.sort(reverse=True)
    return [f"  {cum:8.2f} s  {calls:7d} calls  {where}" for cum, calls, where in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (0: torch's default). 1 by default: on a shared machine "
                        "several threads per process spin in barriers whenever a core is taken, and CPU time per step "
                        "stops meaning anything")
    parser.add_argument("--alternate-steps", type=int, default=0,
                        help="also, per hidden size, this many training steps of stock and colocated models "
                        "alternated one by one in one process (CPU time; the steadiest figure on a loaded machine)")
    parser.add_argument("--profile-hidden", type=int, default=512, help="0: no profile")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--baseline", help="a source tree of hf-hetermoe to compare with (e.g. an older commit's "
                        "`git archive`): its colocated (and --baseline-modes) runs join the alternation")
    parser.add_argument("--baseline-modes", nargs="+", default=["colocated"], choices=MODES[1:])
    ns = parser.parse_args()
    if ns.baseline:
        ns.modes = [*ns.modes, *(f"{mode}@baseline" for mode in ns.baseline_modes)]
    if ns.repeats and ns.steps < ns.warmup + 2:
        raise SystemExit("overhead benchmark: --steps must exceed --warmup by at least 2 (one timed interval).")
    print(f"torch threads per process: {ns.threads or 'default'}; "
          f"CPU cores: {os.cpu_count()}. With 2 cores, the disaggregated figure includes its two processes "
          "(attention and expert rank) sharing those cores; stock and colocated run one process.", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        table = []
        for hidden in ns.hidden if ns.repeats else ():
            times = {mode: [] for mode in ns.modes}
            cpu = {mode: [] for mode in ns.modes}
            for repeat in range(ns.repeats):
                for mode in ns.modes:
                    result = run(mode, hidden, ns, workdir, f"{mode}-{hidden}-{repeat}")
                    times[mode] += step_times(result, ns.warmup)
                    cpu[mode] += step_times(result, ns.warmup, "cpu_ends")
            medians = {mode: statistics.median(t) for mode, t in times.items()}
            cpu_medians = {mode: statistics.median(t) for mode, t in cpu.items()}
            stock, stock_cpu = medians.get("stock"), cpu_medians.get("stock")
            row = [f"hidden {hidden:5d}"]
            for mode in ns.modes:
                ratio = f" ({medians[mode] / stock:.2f}x)" if stock else ""
                cpu_ratio = f" ({cpu_medians[mode] / stock_cpu:.2f}x)" if stock_cpu else ""
                row.append(f"{mode} {medians[mode]:.3f} s/step{ratio}, cpu {cpu_medians[mode]:.3f} s{cpu_ratio}")
            table.append(" | ".join(row))
            print(table[-1], flush=True)
        if table:
            print("\nmedian per-step wall time (ratio to stock), and median per-step CPU time of the (attention rank 0)"
                  " process (ratio):")
            print("\n".join(table))
        for hidden in ns.hidden if ns.alternate_steps else ():
            steps, ns.steps = ns.steps, ns.alternate_steps
            cpu = run("alternate", hidden, ns, workdir, f"alternate-{hidden}")
            ns.steps = steps
            stock, ours = statistics.median(cpu["stock"]), statistics.median(cpu["colocated"])
            print(f"hidden {hidden:5d}, one process, {ns.alternate_steps} steps of each alternated: stock "
                  f"{stock:.3f} s, colocated {ours:.3f} s CPU per step ({ours / stock:.3f}x)", flush=True)
        if ns.profile_hidden:
            path = os.path.join(workdir, "colocated.prof")
            steps, ns.steps = ns.steps, ns.profile_steps
            run("colocated", ns.profile_hidden, ns, workdir, "profile", profile=path)
            ns.steps = steps
            print(f"\ncolocated, hidden {ns.profile_hidden}, {ns.profile_steps} steps under cProfile: top HeterMoE "
                  "functions by cumulative time")
            print("\n".join(profile_summary(path, ns.top)))


if __name__ == "__main__":
    main()
