"""Several machines of one job on one host: `hetermoe launch` once per machine (127.0.0.1, one port), each
starting its launcher (accelerate launch or torchrun) and its processes as on a machine of its own."""

from __future__ import annotations

import os
import subprocess
import threading
import types
from unittest import mock

from hf_hetermoe import cli
from hf_hetermoe.launch_facts import MACHINE_RANK_ENV
from tests._dist import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_machines(config: str, script_args: list[str], *, num_machines: int, machine_args: list[str],
                    log_dir: str, timeout: float = 300) -> list[str]:
    """Run `hetermoe launch --num-machines N --machine-rank R ...` for every R at once and wait for all; returns
    each machine's output. Fails naming the machines that exited non-zero (with the end of their output).

    The `hetermoe launch` commands run in this process (one thread each, `cli.main`), so the test does not pay
    one more interpreter per machine; the launchers they start and their ranks are separate processes."""
    port = free_port()
    logs = [open(os.path.join(log_dir, f"machine{r}.log"), "w+") for r in range(num_machines)]
    codes: dict[int, int] = {}

    def call(cmd: list[str], env: dict[str, str]) -> int:  # what cmd_launch starts, with this machine's log
        machine = int(env[MACHINE_RANK_ENV])
        env = dict(env, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        proc = subprocess.Popen(cmd, env=env, stdout=logs[machine], stderr=subprocess.STDOUT, cwd=REPO)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def machine(rank: int) -> None:
        codes[rank] = cli.main(["launch", "--config", config, "--num-machines", str(num_machines), "--machine-rank",
                                str(rank), "--main-process-ip", "127.0.0.1", "--main-process-port", str(port),
                                *machine_args, *script_args])

    with mock.patch.object(cli, "subprocess", types.SimpleNamespace(call=call)):
        threads = [threading.Thread(target=machine, args=(r,)) for r in range(num_machines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [r for r in range(num_machines) if codes.get(r) != 0]
    assert not failed, "\n".join(f"machine {r} exited {codes.get(r)}:\n{outputs[r][-3000:]}" for r in failed)
    return outputs
