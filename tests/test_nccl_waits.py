"""Waits on NCCL Works, checked on CPU with stand-ins.

An NCCL Work's wait() returns at once (it only makes the current CUDA stream wait), so `health.wait` polls
`is_completed()` for Works of NCCL groups (`health.DeviceWork`), gives up after the groups' timeout, aborts the
NCCL groups and raises the same named error as a failed gloo wait. Gloo Works keep the blocking wait.
"""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

from hf_hetermoe import health
from hf_hetermoe.config import HeterMoEConfig
from hf_hetermoe.groups import DATA_BACKEND_ENV, DeviceGroup, HeterMoEGroups, data_backend


class NcclLikeWork:
    """An NCCL Work as torch 2.13 behaves: wait() returns at once; is_completed() says whether the device is done."""

    def __init__(self, completes_after_polls: int | None = None, error: BaseException | None = None):
        self.completes_after = completes_after_polls  # None: never (a peer that died)
        self.error = error
        self.polls = 0
        self.waits = 0

    def is_completed(self) -> bool:
        self.polls += 1
        # A failed NCCL Work counts as completed (its error recorded); wait() then raises it.
        return self.error is not None or (self.completes_after is not None and self.polls > self.completes_after)

    def exception(self):
        raise AssertionError("Work.exception() is deprecated in torch 2.13 and not to be used")

    def wait(self, *args) -> bool:
        self.waits += 1
        if self.error is not None:
            raise self.error
        return True


class FakeNcclGroup:
    def __init__(self):
        self.aborts = 0
        self.shutdowns = 0

    def abort(self) -> None:
        self.aborts += 1

    def shutdown(self) -> None:
        self.shutdowns += 1


class FakeMonitor:
    def peer_report(self) -> str:
        return "Peer check: rank 2 (expert server, pid 4242) is dead: killed."


@pytest.fixture
def monitor():
    health.set_current(FakeMonitor())
    yield
    health.set_current(None)


def _device_work(work, timeout_s=0.3):
    groups = [FakeNcclGroup(), FakeNcclGroup()]
    return health.DeviceWork(work, health.DeviceAbort(timeout_s, groups)), groups


def test_a_never_completing_nccl_work_times_out_named_and_aborts_the_groups(monitor):
    work, groups = _device_work(NcclLikeWork(completes_after_polls=None), timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        health.wait(work, "the dispatch of layer 1 stripe 0 (forward)", 0)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith("hetermoe: rank 0 failed waiting for the dispatch of layer 1 stripe 0 (forward): ")
    assert "not complete on the device after 0.3 s" in message
    assert message.endswith("Peer check: rank 2 (expert server, pid 4242) is dead: killed.")
    assert 0.3 <= elapsed < 2.0, elapsed
    assert [g.aborts for g in groups] == [1, 1]
    assert work.work.waits == 0  # never ordered a stream after a collective that did not finish
    assert work.work.polls > 10  # it polled, rather than trusting wait()


def test_an_error_recorded_by_the_work_is_named_and_aborts(monitor):
    error = RuntimeError("NCCL communicator was aborted: remote process exited or there was a network error")
    work, groups = _device_work(NcclLikeWork(completes_after_polls=None, error=error), timeout_s=5)
    with pytest.raises(RuntimeError) as info:
        health.wait(work, "the combine of layer 0 (forward)", 2)
    message = str(info.value)
    assert message.startswith("hetermoe: rank 2 failed waiting for the combine of layer 0 (forward): NCCL communicator")
    assert "Peer check:" in message
    assert info.value.__cause__ is error
    assert [g.aborts for g in groups] == [1, 1]


def test_a_failing_completion_check_is_named_and_aborts():
    class Broken(NcclLikeWork):
        def is_completed(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    work, groups = _device_work(Broken(), timeout_s=5)
    with pytest.raises(RuntimeError, match=r"^hetermoe: rank 0 failed waiting for the combine of layer 2 "
                       r"\(backward\): CUDA error: an illegal memory access"):
        health.wait(work, "the combine of layer 2 (backward)", 0)
    assert [g.aborts for g in groups] == [1, 1]


def test_a_completing_work_returns_and_orders_the_stream_once():
    work, groups = _device_work(NcclLikeWork(completes_after_polls=3), timeout_s=5)
    health.wait(work, "the dispatch of layer 0 (forward)", 1)
    assert work.work.waits == 1
    assert work.work.polls == 4
    assert [g.aborts for g in groups] == [0, 0]
    assert work.device_abort.reason is None


def test_after_an_abort_every_other_wait_fails_at_once_naming_the_first_failure():
    stuck, groups = _device_work(NcclLikeWork(completes_after_polls=None), timeout_s=0.2)
    other = health.DeviceWork(NcclLikeWork(completes_after_polls=None), stuck.device_abort)
    with pytest.raises(RuntimeError):
        health.wait(stuck, "the dispatch of layer 0 stripe 0 (forward)", 0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"failed waiting for the dispatch of layer 0 stripe 1 \(forward\): the "
                       r"HeterMoE NCCL groups were aborted \(rank 0 failed waiting for the dispatch of layer 0 stripe 0"):
        health.wait(other, "the dispatch of layer 0 stripe 1 (forward)", 0)
    assert time.monotonic() - start < 0.1
    assert [g.aborts for g in groups] == [1, 1]  # once


def test_the_wait_is_named_while_it_polls():
    """A rank stopped by its launcher (SIGTERM) reports what it waits for: the poll runs inside `waiting`."""
    work, _ = _device_work(NcclLikeWork(completes_after_polls=None), timeout_s=0.5)
    seen: list[list[str]] = []
    thread = threading.Thread(target=lambda: pytest.raises(RuntimeError, health.wait, work, "the combine of layer 3", 0))
    thread.start()
    time.sleep(0.15)
    seen.append(health.current_waits())
    thread.join()
    assert any(w.startswith("the combine of layer 3 in ") for w in seen[0]), seen


def test_a_hanging_abort_does_not_hold_the_error(monkeypatch):
    monkeypatch.setattr(health, "_ABORT_JOIN_S", 0.2)

    class Hangs(FakeNcclGroup):
        def abort(self):
            time.sleep(30)

    work = health.DeviceWork(NcclLikeWork(completes_after_polls=None), health.DeviceAbort(0.1, [Hangs()]))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed waiting for"):
        health.wait(work, "the dispatch of layer 0 (forward)", 0)
    assert time.monotonic() - start < 1.5


def test_gloo_waits_are_unchanged(monitor):
    class GlooWork:
        polled = False

        def is_completed(self):
            self.polled = True
            return False

        def wait(self):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    work = GlooWork()
    with pytest.raises(RuntimeError) as info:
        health.wait(work, "the expert-count exchange of layer 0", 1)
    assert str(info.value).startswith("hetermoe: rank 1 failed waiting for the expert-count exchange of layer 0: [")
    assert "Peer check:" in str(info.value)
    assert not work.polled


def _gloo_group():
    return dist.ProcessGroupGloo(dist.HashStore(), 0, 1, datetime.timedelta(seconds=10))


def test_a_device_group_hands_out_device_works_and_keeps_the_rest():
    """DeviceGroup wraps NCCL groups; a gloo group of one process stands in (its Works also report completion)."""
    inner = _gloo_group()
    group = DeviceGroup(inner, health.DeviceAbort(5.0, [inner]))
    t = torch.ones(3)
    work = group.allreduce([t])
    assert isinstance(work, health.DeviceWork)
    health.wait(work, "an all-reduce", 0)
    out, inp = torch.empty(2), torch.arange(2.0)
    health.wait(group.alltoall_base(out, inp, [2], [2], dist.AllToAllOptions()), "an all-to-all", 0)
    assert torch.equal(out, inp)
    assert group.size() == 1 and group.rank() == 0  # not Works: passed through
    assert group.abort == inner.abort and group.shutdown == inner.shutdown


def _groups(device_abort):
    topology = HeterMoEConfig(mode="colocated").resolve_topology(1)
    g = _gloo_group()
    return HeterMoEGroups(rank=0, topology=topology, dispatch=DeviceGroup(device_abort.groups[0], device_abort),
                          combine=DeviceGroup(device_abort.groups[1], device_abort), control=g, attention=None,
                          counts=_gloo_group(), attention_counts=None, device=torch.device("cpu"), timeout_s=5.0,
                          device_abort=device_abort)


def test_groups_abort_is_idempotent_and_aborts_only_the_nccl_groups():
    nccl = [FakeNcclGroup(), FakeNcclGroup()]
    groups = _groups(health.DeviceAbort(5.0, nccl))
    assert groups.abort("rank 0 failed") is True
    assert groups.abort("again") is False
    assert [g.aborts for g in nccl] == [1, 1]
    assert groups.device_abort.reason == "rank 0 failed"
    assert groups.shutdown() == []  # the rank is exiting: nothing to release, nothing destroyed
    assert [g.shutdowns for g in nccl] == [0, 0]


def test_groups_shutdown_still_releases_nccl_groups_on_success():
    nccl = [FakeNcclGroup(), FakeNcclGroup()]
    groups = _groups(health.DeviceAbort(5.0, nccl))
    groups.shutdown()
    assert [g.shutdowns for g in nccl] == [1, 1]
    assert [g.aborts for g in nccl] == [0, 0]
    assert groups.device_abort.groups == []
    assert groups.abort() is True  # harmless after shutdown: nothing left to abort


def test_groups_without_nccl_have_nothing_to_abort():
    topology = HeterMoEConfig(mode="colocated").resolve_topology(1)
    groups = HeterMoEGroups.single_process(topology=topology, timeout_s=5.0, device=torch.device("cpu"))
    assert groups.abort() is False
    assert groups.shutdown() == []


def test_data_backend_choice(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(DATA_BACKEND_ENV, raising=False)
    assert data_backend(cuda) == "nccl" and data_backend(cpu) == "gloo"
    monkeypatch.setenv(DATA_BACKEND_ENV, "gloo")
    assert data_backend(cuda) == "gloo" and data_backend(cpu) == "gloo"
    monkeypatch.setenv(DATA_BACKEND_ENV, "auto")
    assert data_backend(cuda) == "nccl"
    monkeypatch.setenv(DATA_BACKEND_ENV, "NCCL")
    assert data_backend(cuda) == "nccl"
    with pytest.raises(ValueError, match=r"HETERMOE_DATA_BACKEND=nccl needs CUDA devices.*unset it"):
        data_backend(cpu)
    monkeypatch.setenv(DATA_BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match=r"HETERMOE_DATA_BACKEND='mpi' is not a data backend; use `auto`"):
        data_backend(cuda)


def test_from_store_reads_the_data_backend_once_and_refuses_a_wrong_one_before_any_group(monkeypatch):
    topology = HeterMoEConfig(mode="colocated").resolve_topology(1)
    monkeypatch.setenv(DATA_BACKEND_ENV, "gloo")
    groups = HeterMoEGroups.from_store(dist.HashStore(), rank=0, topology=topology, timeout_s=5.0,
                                       device=torch.device("cpu"))
    assert groups.device_abort is None and not isinstance(groups.dispatch, DeviceGroup)
    groups.shutdown()
    monkeypatch.setenv(DATA_BACKEND_ENV, "nccl")
    built = []
    monkeypatch.setattr(dist, "ProcessGroupGloo", lambda *args: built.append(args))
    with pytest.raises(ValueError, match="HETERMOE_DATA_BACKEND=nccl needs CUDA devices"):
        HeterMoEGroups.from_store(dist.HashStore(), rank=0, topology=topology, timeout_s=5.0, device=torch.device("cpu"))
    assert not built
