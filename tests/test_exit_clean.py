"""No rank may abort at interpreter exit: the health monitor's threads are joined (not just told to stop), the
HeterMoE groups are released before teardown, and short launched jobs exit 0 without "terminate called"."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest
import torch
import torch.distributed as dist

from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.groups import SHUTDOWN_ORDER, HeterMoEGroups
from hf_hetermoe.health_monitor import HealthMonitor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A rank's life in miniature: the store lives in another process (as the launcher agent hosts it), the heartbeat
# is nearly always inside a TCPStore call (which releases the GIL), then the rank ends as run_rank ends it.
_STORE_HOST = ("import datetime, sys, time, torch.distributed as d; s = d.TCPStore('127.0.0.1', 0, None, is_master=True, "
               "timeout=datetime.timedelta(seconds=30)); print(s.port, flush=True); time.sleep(120)")
_RANK = textwrap.dedent("""
    import sys, time
    from hf_hetermoe.health_monitor import HealthMonitor

    monitor = HealthMonitor.connect(host="127.0.0.1", port=int(sys.argv[1]), rank=0, world_size=1,
                                    role="attention rank 0", timeout_s=2)
    monitor.period_s = 1e-6
    monitor.start()
    time.sleep(0.3)
    monitor.record_exit("ok")
    monitor.close()
""")


def test_closing_the_monitor_joins_its_heartbeat_so_the_process_exits_cleanly():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST], stdout=subprocess.PIPE, text=True)
    try:
        port = host.stdout.readline().strip()
        for _ in range(3):
            result = subprocess.run([sys.executable, "-c", _RANK, port], capture_output=True, text=True, timeout=60,
                                    env=env)
            assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-2000:]
    finally:
        host.kill()
        host.wait()


def test_stop_ends_both_threads_and_close_drops_the_store():
    monitor = HealthMonitor(store=dist.HashStore(), rank=0, world_size=2, role="attention rank 0", period_s=0.01)
    monitor.start()
    installed = monitor.install_sigterm_report()
    monitor.stop()
    names = {t.name for t in threading.enumerate()}
    assert "hetermoe-health" not in names and "hetermoe-sigterm" not in names
    if installed:
        assert monitor._wakeup_fds is None  # the watcher's pipe is closed
    monitor.record_exit("ok")  # the store stays usable after stop
    monitor.close()
    assert monitor.store is None
    assert monitor.peer_report(settle_s=0).startswith("Peer check: unavailable")  # best effort, never raises
    monitor.close()  # idempotent


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_groups_shutdown_releases_every_group_and_its_threads():
    before = _os_threads()
    topology = HeterMoEConfig.from_dict({"mode": "colocated"}).resolve_topology(1)
    groups = HeterMoEGroups.single_process(topology=topology, timeout_s=30, device=torch.device("cpu"))
    spare = HeterMoEGroups.single_process(topology=topology, timeout_s=30, device=torch.device("cpu"))
    groups.attention, groups.attention_counts = spare.dispatch, spare.counts  # every slot filled
    del spare
    refs = [weakref.ref(getattr(groups, name)) for name in SHUTDOWN_ORDER]
    x = torch.ones(4)
    groups.dispatch.allreduce([x]).wait()  # the group has started its threads and done work
    assert _os_threads() > before
    cycle = {"groups": groups}
    cycle["self"] = cycle  # a finished script's reference cycle holding the groups
    del cycle
    assert groups.shutdown() == []
    assert all(ref() is None for ref in refs)
    assert all(getattr(groups, name) is None for name in SHUTDOWN_ORDER) and groups.closed
    gc.collect()
    assert _os_threads() == before
    assert groups.shutdown() == []  # idempotent


@pytest.mark.slow
def test_short_launched_jobs_exit_cleanly():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from exit_loop import run_loop, summary_table
    finally:
        sys.path.pop(0)
    outcomes = run_loop(launches=2, demos=0, steps=4, echo=False)  # about 20-45 s each on 2 busy cores
    assert all(o.ok for o in outcomes), summary_table(outcomes)
