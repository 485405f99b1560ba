"""A rank killed in the middle of a training step ends the whole job quickly and clearly.

Through the real `hetermoe launch` (accelerate's elastic agent included): 3 processes, attention ranks 0-1 and
expert rank 2, `timeout_s: 20`. When rank 0 begins step 3, the test freezes the victim (SIGSTOP) so that every
other rank blocks in a collective that needs it, then kills it (SIGKILL). Every surviving rank must exit within
`timeout_s` plus a margin, each printing one line that names the dead rank and the operation it was waiting
for; the launcher must return non-zero, with every rank's exit status non-zero, and leave no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow  # every test here runs multi-process jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 20  # the job's timeout_s
MARGIN_S = 10  # process teardown and the agent's 0.1 s monitor interval, on 2 busy cores
FREEZE_S = 2.0  # long enough for the survivors to block on the victim


WORLD = 3
VICTIMS = {"expert_server": 2, "attention_rank": 1}


def _launch(tmp_path, world: int):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"attention_ranks: [0, 1]\ntimeout_s: {TIMEOUT_S}\n")
    ready = tmp_path / "ready"
    log = open(tmp_path / "launcher.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--config", str(config), "--num-processes", str(world),
         os.path.join(REPO, "tests", "_reliability_script.py"), "--output_dir", str(tmp_path / "out"),
         "--ready_file", str(ready), "--ready_step", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, ready, log


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launched ranks, by global rank (from the environment the agent gave each)."""
    ranks = {}
    for child in launcher.children(recursive=True):
        try:
            env = child.environ()
            if "RANK" in env and "hf_hetermoe.launch" in " ".join(child.cmdline()):
                ranks[int(env["RANK"])] = child
        except psutil.Error:
            pass
    return ranks


def _ended(proc: psutil.Process) -> bool:
    try:
        return proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def _agent_exit_codes(log: str) -> dict[int, int]:
    """The elastic agent's failure summary: exit status of every rank it saw fail."""
    return {int(r): int(c) for r, c in re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", log)}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both jobs start together (their start-up, mostly imports, overlaps); each test then kills its victim."""
    started = {}
    for name in VICTIMS:
        tmp_path = tmp_path_factory.mktemp(name)
        started[name] = (tmp_path, *_launch(tmp_path, WORLD))
    yield started
    for tmp_path, proc, ready, log_file in started.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


@pytest.mark.parametrize("name", list(VICTIMS))
def test_a_killed_rank_stops_every_rank_with_a_clear_error(jobs, name):
    victim, world = VICTIMS[name], WORLD
    tmp_path, proc, ready, log_file = jobs[name]
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never reached step 3"
            time.sleep(0.02)
        launcher = psutil.Process(proc.pid)
        ranks = _ranks(launcher)
        assert sorted(ranks) == list(range(world)), ranks
        descendants = launcher.children(recursive=True)
        ranks[victim].send_signal(signal.SIGSTOP)  # frozen mid-step: the others block on it
        time.sleep(FREEZE_S)
        ranks[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        exit_after: dict[int, float] = {}
        while (len(exit_after) < world or proc.poll() is None) and time.monotonic() - killed_at < TIMEOUT_S + 60:
            for r, p in ranks.items():
                if r not in exit_after and _ended(p):
                    exit_after[r] = time.monotonic() - killed_at
            time.sleep(0.01)
        launcher_after = time.monotonic() - killed_at
        returncode = proc.poll()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.flush()
    log = (tmp_path / "launcher.log").read_text()
    survivors = [r for r in range(world) if r != victim]
    print(f"\nkilled rank {victim}: exits after " + ", ".join(f"rank {r} {t:.2f} s" for r, t in sorted(exit_after.items()))
          + f"; launcher returned {returncode} after {launcher_after:.2f} s")

    # Every survivor exits within the timeout (plus margin), and the launcher fails.
    assert sorted(exit_after) == list(range(world)), f"ranks still running: {exit_after}\n{log[-3000:]}"
    for r in survivors:
        assert exit_after[r] <= TIMEOUT_S + MARGIN_S, (r, exit_after)
    assert returncode not in (None, 0), log[-3000:]
    codes = _agent_exit_codes(log)
    assert codes.get(victim) == -signal.SIGKILL, codes
    assert all(codes.get(r) not in (None, 0) for r in survivors), codes

    # Each survivor says, in one line, which rank died and what it was waiting for.
    for r in survivors:
        lines = [line for line in log.splitlines() if line.startswith(f"hetermoe: rank {r} (")]
        assert len(lines) == 1, f"rank {r}: {lines}\n{log[-3000:]}"
        assert f"rank {victim} (" in lines[0] and "is dead" in lines[0], lines[0]
        assert re.search(r"waiting for (the|a) ", lines[0]), lines[0]

    # Nothing is left behind: no rank, no agent, no helper.
    time.sleep(0.5)
    alive = [p.pid for p in descendants if not _ended(p)]
    assert not alive, f"orphan processes: {alive}"
    strays = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not strays, f"processes of this job still running: {strays}"
