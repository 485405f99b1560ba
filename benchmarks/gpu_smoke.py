"""GPU smoke check of the HeterMoE GPU path: one script, PASS/FAIL/SKIP per step, at most ~8 minutes on one GPU.

    python benchmarks/gpu_smoke.py [--out DIR] [--budget-s 450]   # or benchmarks/gpu_smoke.sh
    python benchmarks/gpu_smoke.py --dry-run                       # list the steps, run nothing
    python benchmarks/gpu_smoke.py --cpu-rehearsal                 # run the training steps on CPU (checks this script)

Steps (GPU steps are SKIPped, clearly, on a machine without one; the 2-GPU steps with fewer than 2 GPUs):
  versions                torch, CUDA, NCCL, transformers, accelerate, every GPU's name and compute capability
  probe-thread-device     the current device is per host thread; StripeStreams sets device and stream per stripe
  probe-nccl-wait         NCCL work.wait() returns before completion; health.wait blocks until it; a too-slow
                          collective is aborted and named
  probe-side-stream       a collective issued on a side stream, consumed there, read on the main stream
  probe-bf16              bf16 support and autocast
  colocated-fp32/bf16/fp16  one process, HeterMoE colocated vs stock transformers on the same GPU; tolerances in
                          TOLERANCES (fp32 exact up to GPU reduction order; bf16 autocast; fp16 with GradScaler)
  disaggregated-1gpu      1 attention + 2 expert processes on GPU 0 with zebra (2 stripes): NCCL refuses two ranks
                          on one GPU, so the data groups run gloo with CUDA tensors (HETERMOE_DATA_BACKEND=gloo);
                          equal to stock fp32; Chrome traces (HETERMOE_TRACE) of every rank
  nccl-launch             2+ GPUs: `hetermoe launch`, 1 attention + 1-2 expert ranks on NCCL, equal to stock fp32
  nccl-killed-server      2+ GPUs: SIGKILL an expert server mid-run; survivors exit within timeout_s (+ margin),
                          each with one line naming what it waited for and the dead rank

Everything goes under $OUT if set, else ./gpu_smoke_out: gpu_smoke.log (this output), logs/<step>.log (each
step's processes), traces/, work/. Exits 1 if any step FAILs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

# (loss rtol, final-weight atol) against stock transformers in the same precision on the same device.
# fp32: only the order of GPU reductions differs (TF32 off, torch's default for matmuls). bf16/fp16: expert
# matmuls see other row groupings than the stock loop, and Adam turns tiny gradient differences into steps of up
# to the learning rate (3e-3) for parameters whose gradient is near zero, over 8 steps.
TOLERANCES = {"fp32": (1e-4, 1e-4), "bf16": (2e-2, 3e-2), "fp16": (1e-2, 3e-2)}
KILL_TIMEOUT_S = 20  # the killed-server job's timeout_s
KILL_MARGIN_S = 15  # process teardown and the launcher agent's reaction


@dataclass
class Step:
    name: str
    needs: int  # GPUs needed: 0, 1 or 2
    limit_s: int  # the step's own time limit
    what: str


STEPS = [
    Step("versions", 0, 60, "torch, CUDA, NCCL, transformers, accelerate, GPUs"),
    Step("probe-thread-device", 1, 60, "per-thread current device; StripeStreams device and stream"),
    Step("probe-nccl-wait", 1, 90, "NCCL wait() returns early; health.wait polls, times out, aborts, names"),
    Step("probe-side-stream", 1, 60, "collective on a side stream"),
    Step("probe-bf16", 1, 60, "bf16 support"),
    Step("colocated-fp32", 1, 150, "colocated HeterMoE == stock, fp32"),
    Step("colocated-bf16", 1, 150, "colocated HeterMoE ~= stock, bf16 autocast"),
    Step("colocated-fp16", 1, 150, "colocated HeterMoE ~= stock, fp16 + GradScaler"),
    Step("disaggregated-1gpu", 1, 240, "1 attention + 2 expert processes on one GPU (gloo, CUDA tensors), traces"),
    Step("nccl-launch", 2, 240, "hetermoe launch on NCCL == stock"),
    Step("nccl-killed-server", 2, 180, "SIGKILL an expert server: named errors within timeout_s"),
]


class Log:
    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.fh.write(line + "\n")


# ---- the driver ----------------------------------------------------------------------------------------------------
def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def versions(log: Log) -> tuple[str, str]:
    import accelerate
    import torch
    import transformers

    log(f"  python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}")
    cuda = torch.version.cuda or "none (CPU build of torch)"
    nccl = "n/a"
    if torch.cuda.is_available():
        try:
            found = torch.cuda.nccl.version()
            nccl = ".".join(map(str, found)) if isinstance(found, tuple) else str(found)
        except Exception as exc:
            nccl = f"unknown ({exc})"
    log(f"  CUDA {cuda}, NCCL {nccl}, cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else 'n/a'}")
    n = gpu_count()
    for i in range(n):
        log(f"  GPU {i}: {torch.cuda.get_device_name(i)}, compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))}, "
            f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
    if n == 0:
        log("  no GPU visible: GPU steps are SKIPped")
    return "PASS", f"{n} GPU(s)"


def run_step(step: Step, out: str, device: str, log: Log, limit_s: float) -> tuple[str, str]:
    """Run one step's job in its own process (a hang or a crash stays in it), within `limit_s`."""
    result_path = os.path.join(out, "results", step.name + ".json")
    if os.path.exists(result_path):
        os.remove(result_path)
    step_log = os.path.join(out, "logs", step.name + ".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, os.path.abspath(__file__), "--job", step.name, "--out", out, "--device", device]
    with open(step_log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "FAIL", f"did not finish within {limit_s:.0f} s (killed); see {step_log}"
    if os.path.exists(result_path):
        with open(result_path) as fh:
            result = json.load(fh)
        return result["status"], result["detail"]
    with open(step_log) as fh:
        tail = fh.read()[-1500:]
    return "FAIL", f"exited {proc.returncode} without a result; end of {step_log}:\n{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_smoke_out)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and what they need; run nothing")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run the training steps on CPU (gloo) to check this script without a GPU")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting steps after this (default 450)")
    parser.add_argument("--steps", default=None, help="comma-separated step names to run (default: all)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    out = os.path.abspath(ns.out or os.environ.get("OUT") or "gpu_smoke_out")
    if ns.job:
        return run_job(ns.job, out, ns.device)
    if ns.dry_run:
        print("gpu_smoke steps (GPUs needed, time limit):")
        for step in STEPS:
            print(f"  {step.name:<20} {step.needs} GPU  {step.limit_s:>4} s  {step.what}")
        print(f"tolerances (loss rtol, weight atol) vs stock: {TOLERANCES}")
        print(f"output: {out}")
        return 0
    for sub in ("logs", "results", "traces", "work"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    log = Log(os.path.join(out, "gpu_smoke.log"))
    start = time.monotonic()
    n = gpu_count()
    device = "cpu" if ns.cpu_rehearsal else "cuda"
    log(f"hetermoe gpu smoke: {n} GPU(s){', CPU REHEARSAL (training steps on CPU, probes skipped)' if ns.cpu_rehearsal else ''}; output {out}")
    outcomes: list[tuple[str, str, float]] = []
    chosen = [name.strip() for name in ns.steps.split(",")] if ns.steps else [step.name for step in STEPS]
    unknown = sorted(set(chosen) - {step.name for step in STEPS})
    if unknown:
        log(f"unknown step(s) {unknown}; see --dry-run")
        return 2
    for step in (step for step in STEPS if step.name in chosen):
        t0 = time.monotonic()
        log(f"[{step.name}] {step.what}")
        left = ns.budget_s - (t0 - start)
        rehearsable = ns.cpu_rehearsal and step.name not in ("versions",) and not step.name.startswith("probe-")
        if step.needs > n and not rehearsable:
            status, detail = "SKIP", (f"needs {step.needs} GPU(s), {n} visible" if n or step.needs > 1 else
                                      "no GPU on this machine")
        elif left < 20:
            status, detail = "FAIL", f"not run: the {ns.budget_s:.0f} s budget is spent"
        elif step.name == "versions":
            try:
                status, detail = versions(log)
            except Exception as exc:
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        else:
            status, detail = run_step(step, out, device, log, min(step.limit_s * (3 if ns.cpu_rehearsal else 1), left))
        elapsed = time.monotonic() - t0
        outcomes.append((step.name, status, elapsed))
        log(f"[{step.name}] {status} ({elapsed:.1f} s): {detail}")
    log()
    log("summary:")
    for name, status, elapsed in outcomes:
        log(f"  {status:<4}  {name:<20} {elapsed:6.1f} s")
    failed = [name for name, status, _ in outcomes if status == "FAIL"]
    counts = {s: sum(1 for _, st, _ in outcomes if st == s) for s in ("PASS", "FAIL", "SKIP")}
    log(f"gpu smoke: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
        f"{time.monotonic() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ---- the jobs (each runs in its own process: `--job NAME`) -----------------------------------------------------------
def run_job(name: str, out: str, device: str) -> int:
    try:
        if name.startswith("probe-"):
            from _gpu_smoke_jobs import PROBES

            ok, detail = PROBES[name]()
            status = "PASS" if ok else "FAIL"
        elif name.startswith("colocated-"):
            status, detail = job_colocated(out, name.split("-", 1)[1], device)
        elif name == "disaggregated-1gpu":
            status, detail = job_disaggregated(out, device)
        elif name == "nccl-launch":
            status, detail = job_launch(out, device)
        elif name == "nccl-killed-server":
            status, detail = job_killed_server(out, device)
        else:
            raise ValueError(f"unknown job {name}")
    except BaseException as exc:
        traceback.print_exc()
        status, detail = "FAIL", f"{type(exc).__name__}: {str(exc)[-1500:]}"
    print(f"{name}: {status}: {detail}", flush=True)
    with open(os.path.join(out, "results", name + ".json"), "w") as fh:
        json.dump({"status": status, "detail": detail}, fh)
    return 0


def _stock(out: str, tag: str, precision: str, device: str) -> tuple[dict, str]:
    from _gpu_smoke_jobs import train_gpu

    work = os.path.join(out, "work", tag)
    final = os.path.join(work, "stock-final")
    return train_gpu({"output_dir": os.path.join(work, "stock"), "final_dir": final, "precision": precision,
                      "device": device}), final


def _compare(reference: dict, ref_dir: str, ours: dict, our_dir: str, precision: str) -> tuple[str, str]:
    import torch

    from tests._assertions import stock_weights

    loss_rtol, weight_atol = TOLERANCES[precision]
    a, b = torch.tensor(reference["losses"]), torch.tensor(ours["losses"])
    if a.shape != b.shape:
        return "FAIL", f"{len(ours['losses'])} losses against stock's {len(reference['losses'])}"
    loss_rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    wa, wb = stock_weights(ref_dir), stock_weights(our_dir)  # stock from_pretrained reads both folders
    if set(wa) != set(wb):
        return "FAIL", f"checkpoint keys differ: {sorted(set(wa) ^ set(wb))[:5]}"
    weight_abs = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    ok = loss_rel <= loss_rtol and weight_abs <= weight_atol
    detail = (f"{len(a)} losses, worst relative difference {loss_rel:.2e} (<= {loss_rtol:g}); final weights worst "
              f"absolute difference {weight_abs:.2e} (<= {weight_atol:g}); first/last loss {b[0]:.4f}/{b[-1]:.4f} on "
              f"{ours.get('device')}")
    return ("PASS" if ok else "FAIL"), detail


def job_colocated(out: str, precision: str, device: str) -> tuple[str, str]:
    from _gpu_smoke_jobs import train_gpu

    if device == "cpu" and precision == "fp16":
        return "SKIP", "fp16 training needs a GPU"
    reference, ref_dir = _stock(out, f"colocated-{precision}", precision, device)
    work = os.path.join(out, "work", f"colocated-{precision}")
    our_dir = os.path.join(work, "hetermoe-final")
    ours = train_gpu({"output_dir": os.path.join(work, "hetermoe"), "final_dir": our_dir, "precision": precision,
                      "device": device, "hetermoe": "colocated"})
    return _compare(reference, ref_dir, ours, our_dir, precision)


def job_disaggregated(out: str, device: str) -> tuple[str, str]:
    from _gpu_smoke_jobs import launched_rank

    from tests._dist import spawn

    reference, ref_dir = _stock(out, "disaggregated-1gpu", "fp32", device)
    work = os.path.join(out, "work", "disaggregated-1gpu")
    trace_dir = os.path.join(out, "traces", "disaggregated-1gpu")
    our_dir = os.path.join(work, "hetermoe-final")
    config = {"attention_ranks": [0], "expert_ranks": [1, 2], "zebra": {"microbatches": 2}, "timeout_s": 60}
    spec = {"output_dir": os.path.join(work, "hetermoe"), "final_dir": our_dir, "precision": "fp32",
            "device": device, "trace_dir": trace_dir}
    # Three processes on one GPU: every rank uses device 0 (LOCAL_RANK 0), and the data groups run on gloo with CUDA
    # tensors, because NCCL refuses two ranks on one device.
    env = {"LOCAL_RANK": "0", "HETERMOE_DATA_BACKEND": "gloo", "HETERMOE_TRACE": trace_dir,  # servers' traces too
           "ACCELERATE_USE_CPU": "1" if device == "cpu" else "0"}
    print("disaggregated-1gpu: 3 processes share GPU 0; data groups on gloo with CUDA tensors "
          "(HETERMOE_DATA_BACKEND=gloo): NCCL refuses two ranks on one GPU", flush=True)
    results = spawn(3, launched_rank, config, spec, env=env, timeout=200)
    status, detail = _compare(reference, ref_dir, results[0], our_dir, "fp32")
    traces = sorted(os.listdir(trace_dir)) if os.path.isdir(trace_dir) else []
    if len(traces) < 3:
        status, detail = "FAIL", detail + "; FEWER THAN 3 TRACES (one per rank expected)"
    groups = ("gloo on CPU (CPU rehearsal)" if device == "cpu" else
              "gloo data groups with CUDA tensors (NCCL refuses 2 ranks on 1 GPU)")
    return status, f"{groups}; {detail}; {len(traces)} trace file(s) in {trace_dir}: {traces}"


def _launch(out: str, tag: str, device: str, processes: int, spec: dict, timeout_s: int, log_path: str):
    work = os.path.join(out, "work", tag)
    os.makedirs(work, exist_ok=True)
    config = os.path.join(work, "hetermoe.yaml")
    with open(config, "w") as fh:
        fh.write(f"attention_ranks: [0]\ntimeout_s: {timeout_s}\n")
    spec_path = os.path.join(work, "spec.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    env = dict(os.environ)
    env.pop("HETERMOE_DATA_BACKEND", None)  # the real thing: NCCL on GPUs
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", config, "--num-processes", str(processes),
         os.path.join(HERE, "_gpu_smoke_script.py"), spec_path],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _processes(device: str) -> int:
    if device == "cpu":
        return 3
    import torch

    return min(torch.cuda.device_count(), 3)


def job_launch(out: str, device: str) -> tuple[str, str]:
    reference, ref_dir = _stock(out, "nccl-launch", "fp32", device)
    work = os.path.join(out, "work", "nccl-launch")
    our_dir = os.path.join(work, "hetermoe-final")
    result_json = os.path.join(work, "result.json")
    spec = {"output_dir": os.path.join(work, "hetermoe"), "final_dir": our_dir, "precision": "fp32",
            "device": device, "result_json": result_json}
    n = _processes(device)
    log_path = os.path.join(out, "logs", "nccl-launch.launcher.log")
    proc, log = _launch(out, "nccl-launch", device, n, spec, 60, log_path)
    try:
        code = proc.wait(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "FAIL", f"hetermoe launch did not finish in 200 s; see {log_path}"
    finally:
        log.close()
    if code != 0 or not os.path.exists(result_json):
        with open(log_path) as fh:
            return "FAIL", f"hetermoe launch returned {code}; end of {log_path}:\n{fh.read()[-1500:]}"
    with open(result_json) as fh:
        ours = json.load(fh)
    status, detail = _compare(reference, ref_dir, ours, our_dir, "fp32")
    backend = "gloo (CPU rehearsal)" if device == "cpu" else "NCCL"
    return status, f"{n} processes (1 attention + {n - 1} expert), data groups on {backend}; {detail}"


def _clip_report(line: str) -> str:
    """The start of a rank's failure line and its peer check (the part that names the dead rank)."""
    mark = line.find("Peer check:")
    if len(line) <= 600 or mark < 0:
        return line[:600]
    return line[:300] + " [...] " + line[mark:mark + 300]


def job_killed_server(out: str, device: str) -> tuple[str, str]:
    import psutil

    work = os.path.join(out, "work", "nccl-killed-server")
    ready = os.path.join(work, "ready")
    spec = {"output_dir": os.path.join(work, "hetermoe"), "precision": "fp32", "device": device,
            "max_steps": 400, "ready_file": ready, "ready_step": 2}
    n = _processes(device)
    victim = n - 1  # an expert server
    log_path = os.path.join(out, "logs", "nccl-killed-server.launcher.log")
    proc, log = _launch(out, "nccl-killed-server", device, n, spec, KILL_TIMEOUT_S, log_path)
    exits: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                return "FAIL", f"training never reached step 3 (launcher: {proc.poll()}); see {log_path}"
            time.sleep(0.05)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "hf_hetermoe.launch" in " ".join(child.cmdline()) and "RANK" in child.environ():
                    ranks[int(child.environ()["RANK"])] = child
            except psutil.Error:
                pass
        if sorted(ranks) != list(range(n)):
            return "FAIL", f"found ranks {sorted(ranks)} of {n}"
        ranks[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < KILL_TIMEOUT_S + KILL_MARGIN_S + 30:
            for r, p in ranks.items():
                if r not in exits:
                    try:
                        gone = p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
                    except psutil.NoSuchProcess:
                        gone = True
                    if gone:
                        exits[r] = time.monotonic() - killed
            if len(exits) == n and proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    with open(log_path) as fh:
        text = fh.read()
    survivors = [r for r in range(n) if r != victim]
    problems = []
    lines = {}
    for r in survivors:
        if exits.get(r, float("inf")) > KILL_TIMEOUT_S + KILL_MARGIN_S:
            problems.append(f"rank {r} exited after {exits.get(r, 'never')} s")
        found = [line for line in text.splitlines() if line.startswith(f"hetermoe: rank {r} (")]
        lines[r] = found
        if len(found) != 1 or "waiting for" not in found[0] or f"rank {victim} (" not in found[0]:
            problems.append(f"rank {r}'s report: {found}")
    if proc.returncode in (None, 0):
        problems.append(f"the launcher returned {proc.returncode}")
    timing = ", ".join(f"rank {r} {t:.2f} s" for r, t in sorted(exits.items()))
    reports = " | ".join(_clip_report(v[0]) for v in lines.values() if v)
    detail = (f"killed rank {victim} (expert server, SIGKILL); exits after the kill: {timing}; launcher returned "
              f"{proc.returncode}; reports: {reports}")
    if problems:
        return "FAIL", detail + "; problems: " + "; ".join(problems)
    return "PASS", detail


if __name__ == "__main__":
    sys.exit(main())
