"""Health keys and peer checks (hf_hetermoe/health.py) without a launcher: an in-process store, a few helper
processes standing in for dead, frozen and live peers, and one process stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import pytest
import torch.distributed as dist

from hf_hetermoe import health
from hf_hetermoe.health_monitor import HealthMonitor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def monitor(store, rank, *, host=None, pid=None, role="expert server") -> HealthMonitor:
    return HealthMonitor(store=store, rank=rank, world_size=4, role=role, period_s=0.2, host=host, pid=pid).start()


@pytest.fixture
def sleeper():
    procs = []

    def start():
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_peer_check_names_dead_frozen_silent_and_ended_ranks(sleeper):
    store = dist.HashStore()
    me = HealthMonitor(store=store, rank=0, world_size=4, role="attention rank 0", period_s=0.2)
    dead, frozen = sleeper(), sleeper()
    peers = [monitor(store, 1, pid=dead.pid), monitor(store, 2, pid=frozen.pid),
             monitor(store, 3, host="another-host", role="attention rank 1")]
    try:
        assert me.peer_report(settle_s=0) == f"{health.REPORT_MARK} every other rank is alive."
        dead.kill(), dead.wait()
        frozen.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        peers[2].stop()  # its heartbeat stops: on another host, only that tells it is gone
        report = me.peer_report(settle_s=0)
        assert f"rank 1 (expert server, pid {dead.pid}) is dead" in report
        assert f"rank 2 (expert server, pid {frozen.pid}) is frozen" in report
        assert "rank 3 (attention rank 1, pid" in report and "on another-host) is not responding" in report
        peers[0].record_exit("RuntimeError: boom")
        peers[2].record_exit("ok")  # finished normally: not a problem any more
        report = me.peer_report(settle_s=0)
        assert "rank 1 (expert server" in report and "ended: RuntimeError: boom" in report
        assert "rank 3" not in report
    finally:
        for peer in peers:
            peer.stop()


class _BrokenWork:
    def wait(self):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")


def test_a_failed_wait_names_the_operation_and_the_stopped_peer(sleeper):
    store = dist.HashStore()
    me = HealthMonitor(store=store, rank=0, world_size=2, role="attention rank 0", period_s=0.2).start()
    victim = sleeper()
    peer = HealthMonitor(store=store, rank=1, world_size=2, role="expert server", period_s=0.2, pid=victim.pid).start()
    health.set_current(me)  # the last started monitor is this process's; the test plays rank 0
    try:
        victim.kill(), victim.wait()
        with pytest.raises(RuntimeError) as info:
            health.wait(_BrokenWork(), "the dispatch of layer 3 (forward)", 0)
        message = str(info.value)
        assert message.startswith("hetermoe: rank 0 failed waiting for the dispatch of layer 3 (forward)")
        assert f"rank 1 (expert server, pid {victim.pid}) is dead" in message
        assert health.current_waits() == []  # the wait mark is gone once the wait ended
    finally:
        peer.stop()
        me.stop()


def test_collectives_of_others_are_named_from_the_stack():
    frame = traceback.FrameSummary
    stack = [frame("/x/train.py", 41, "main"), frame("/site/transformers/trainer.py", 2350, "_get_num_items_in_batch"),
             frame("/site/accelerate/utils/operations.py", 355, "_gpu_gather_one"),
             frame("/site/torch/distributed/c10d_logger.py", 83, "wrapper"),
             frame("/site/torch/distributed/distributed_c10d.py", 4287, "all_gather")]
    assert health.blocking_call(stack) == (
        "a torch.distributed all_gather (called by _get_num_items_in_batch in transformers/trainer.py)")
    assert health.blocking_call(stack[:2]) is None


STOPPED_CHILD = textwrap.dedent("""
    import sys, threading, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    from hf_hetermoe import health
    from hf_hetermoe.health_monitor import HealthMonitor
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True)
    monitor = HealthMonitor(store=store, rank=1, world_size=2, role="expert server", period_s=0.2).start()
    assert monitor.install_sigterm_report()
    with health.waiting("the combine of layer 2 stripe 1 (forward)"):
        print("waiting", flush=True)
        threading.Event().wait()  # blocked like a collective: only the watcher thread can act
""")


@pytest.mark.slow  # a child interpreter that imports torch.distributed (seconds)
def test_a_rank_stopped_by_its_launcher_says_what_it_was_waiting_for():
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_CHILD.format(repo=REPO)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = next(line for line in err.splitlines() if line.startswith("hetermoe: rank 1"))
    assert "was stopped by its launcher (SIGTERM)" in line
    assert "while waiting for the combine of layer 2 stripe 1 (forward)" in line
    assert "rank 0 (role unknown) is unknown" in line  # rank 0 never registered in this store
