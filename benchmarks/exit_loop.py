"""Loop short HeterMoE jobs and count how they exit: every rank must leave cleanly, with no abort at exit.

    python benchmarks/exit_loop.py [--launches 30] [--demos 5] [--steps 8] [--demo-steps 400] [--keep-logs DIR]

Runs `--launches` short `hetermoe launch` jobs (1 attention rank + 2 expert ranks, `--steps` steps of the stock
recipe) and `--demos` full `hetermoe demo` runs, one after another. A run fails when it exits non-zero or when
its output says "terminate called" (a C++ std::thread destroyed while joinable, or an exception thrown through
a destructor: SIGABRT at interpreter exit). Prints one line per run and a summary table; exits 1 if any failed.

Run it with the code under test first on PYTHONPATH (the `hetermoe` command of the subprocesses is
`python -m hf_hetermoe.cli`, so it imports whatever `python` imports).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABORT_MARK = "terminate called"
ONE_ATTENTION_TWO_EXPERTS = """\
attention_ranks: [0]
expert_ranks: [1, 2]
mode: disaggregated
zebra: {microbatches: 1}
asym_ea: off
timeout_s: 300
"""


@dataclass
class Outcome:
    kind: str
    index: int
    code: int
    aborted: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.aborted


def _run(cmd: list[str], log_path: str | None, timeout_s: float) -> tuple[int, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = 124
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (exc.stdout, exc.stderr)) + "\n[exit_loop] timed out\n"
    if log_path is not None:
        with open(log_path, "w", encoding="utf-8") as fh:
            fh.write(output)
    return code, output


def launch_cmd(config_path: str, output_dir: str, steps: int) -> list[str]:
    from hf_hetermoe.data import demo_corpus_path

    return [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", config_path, "--num-processes", "3",
            os.path.join(REPO, "recipes", "train_clm.py"), "--train_file", demo_corpus_path(),
            "--output_dir", output_dir, "--max_steps", str(steps), "--per_device_train_batch_size", "4",
            "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0"]


def demo_cmd(output_dir: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "hf_hetermoe.cli", "demo", "--output-dir", output_dir, "--max-steps", str(steps)]


def run_loop(launches: int, demos: int, steps: int = 8, demo_steps: int = 400, keep_logs: str | None = None,
             timeout_s: float = 900.0, echo: bool = True) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="hetermoe-exit-loop-") as tmp:
        config_path = os.path.join(tmp, "1attn_2exp.yaml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(ONE_ATTENTION_TWO_EXPERTS)
        plan = [("launch", i) for i in range(launches)] + [("demo", i) for i in range(demos)]
        for kind, i in plan:
            out_dir = os.path.join(tmp, f"{kind}-{i}")
            cmd = launch_cmd(config_path, out_dir, steps) if kind == "launch" else demo_cmd(out_dir, demo_steps)
            log = os.path.join(keep_logs, f"{kind}-{i}.log") if keep_logs else None
            start = time.monotonic()
            code, output = _run(cmd, log, timeout_s)
            outcome = Outcome(kind, i, code, ABORT_MARK in output, time.monotonic() - start)
            outcomes.append(outcome)
            if echo:
                status = "ok" if outcome.ok else "FAILED" + (" (terminate called)" if outcome.aborted else "")
                print(f"{kind} {i}: exit {code}, {outcome.wall_s:.0f} s, {status}", flush=True)
    return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    rows = ["kind     runs  exit 0  exit !=0  'terminate called'  failed"]
    for kind in ("launch", "demo"):
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        rows.append(f"{kind:<8} {len(mine):>4}  {sum(o.code == 0 for o in mine):>6}  {sum(o.code != 0 for o in mine):>8}"
                    f"  {sum(o.aborted for o in mine):>18}  {sum(not o.ok for o in mine):>6}")
    codes = sorted({o.code for o in outcomes if o.code != 0})
    if codes:
        rows.append(f"non-zero exit codes seen: {codes}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=30, help="short `hetermoe launch` jobs (1 attn + 2 experts)")
    parser.add_argument("--demos", type=int, default=5, help="`hetermoe demo` runs (about 2 minutes each)")
    parser.add_argument("--steps", type=int, default=8, help="training steps of each launch job")
    parser.add_argument("--demo-steps", type=int, default=400, help="training steps of each demo run")
    parser.add_argument("--keep-logs", default=None, help="folder for each run's combined output")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    ns = parser.parse_args(argv)
    if min(ns.launches, ns.demos) < 0 or ns.steps < 1 or ns.demo_steps < 1:
        raise ValueError("exit_loop: run counts must be >= 0 and step counts >= 1.")
    if ns.keep_logs:
        os.makedirs(ns.keep_logs, exist_ok=True)
    outcomes = run_loop(ns.launches, ns.demos, ns.steps, ns.demo_steps, ns.keep_logs, ns.timeout_s)
    print("\n" + summary_table(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
