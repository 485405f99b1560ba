"""Several `hetermoe launch` commands on one host, each acting as one machine of a job (127.0.0.1, one port)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests._dist import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_machines(config: str, script_args: list[str], *, num_machines: int, machine_args: list[str],
                    log_dir: str, timeout: float = 300) -> list[str]:
    """Start `hetermoe launch --num-machines N --machine-rank R ...` for every R and wait for all; returns each
    machine's output. Fails naming the machines that exited non-zero (with the end of their output)."""
    port = free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    procs, logs = [], []
    for rank in range(num_machines):
        log = open(os.path.join(log_dir, f"machine{rank}.log"), "w+")
        logs.append(log)
        cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", config,
               "--num-machines", str(num_machines), "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
               "--main-process-port", str(port), *machine_args, *script_args]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(f"machine {r} exited {procs[r].returncode}:\n{outputs[r][-3000:]}" for r in failed)
    return outputs
