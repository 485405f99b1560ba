"""Rank health: who is alive, who stopped, and what each rank was waiting for when a job failed.

A dead peer surfaces in gloo as "Connection closed by peer [ip]:port" (or a timeout), which names no rank.
So every rank of a launched job keeps a few keys in the rendezvous store (the launcher agent's, which outlives
the ranks), on its own store connection:

    hetermoe/health/<rank>/info   {"pid", "host", "started", "role"}      written once at start
    hetermoe/health/<rank>/beat   a counter a daemon thread increments every `period_s`
    hetermoe/health/<rank>/exit   "ok", or why the rank failed            written when the rank ends

When a wait fails, `peer_report()` classifies every other rank: ended (with the reason it recorded), gone
(its process ended without recording anything: SIGKILL, out of memory, a crash), frozen (SIGSTOP), silent
(another host, no heartbeat for 2.5 periods) or alive. Same-host peers are checked by pid, at once; peers on
other hosts by whether their heartbeat still advances.

`waiting(what)` names the collective a thread is blocked in (comm.wait and the control channel use it), so a
rank stopped by its launcher can say what it was waiting for: torchrun/accelerate's agent SIGTERMs the
survivors a moment after it sees one rank die, usually while they are still blocked in the collective that
involved the dead rank. A watcher thread (woken through `signal.set_wakeup_fd`, so it runs even while the main
thread is blocked inside a C++ wait) prints that report and exits with status 143.

The monitor itself (heartbeat, peer classification, the SIGTERM watcher) is health_monitor.py; this module
holds what the data path calls: named waits and the peer report of the current monitor. Everything is best
effort and bounded in time: diagnosing must never hang or hide the original error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .health_monitor import HealthMonitor

PREFIX = "hetermoe/health"
REPORT_MARK = "Peer check:"  # starts every peer report, so a message is never given two
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
_STORE_TIMEOUT = datetime.timedelta(seconds=10)

# thread id -> (operation, monotonic start); written by `waiting`, read by the SIGTERM report.
_WAITS: dict[int, tuple[str, float]] = {}
_CURRENT: "HealthMonitor | None" = None  # this process's monitor (one launched rank per process)


# ---- what this process is waiting for ------------------------------------------------------------------------
@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """Mark the calling thread as blocked in `what` (nested marks restore the outer one)."""
    tid = threading.get_ident()
    outer = _WAITS.get(tid)
    _WAITS[tid] = (what, time.monotonic())
    try:
        yield
    finally:
        if outer is None:
            _WAITS.pop(tid, None)
        else:
            _WAITS[tid] = outer


def current_waits() -> list[str]:
    """What each thread of this process waits for: HeterMoE's named waits, and collectives of others (the
    Trainer's, Accelerate's) found on the threads' stacks."""
    now = time.monotonic()
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for tid, (what, since) in list(_WAITS.items()):
        thread = names.get(tid, "a thread")
        where = "" if thread == "MainThread" else f" in {thread}"
        out.append(f"{what}{where} (for {now - since:.1f} s)")
    for tid, frame in sys._current_frames().items():
        if tid in _WAITS or names.get(tid) in ("hetermoe-health", "hetermoe-sigterm"):
            continue
        call = blocking_call(traceback.extract_stack(frame))
        if call is not None:
            thread = names.get(tid, "a thread")
            out.append(call + ("" if thread == "MainThread" else f" in {thread}"))
    return out


_DIST = os.sep + os.path.join("torch", "distributed") + os.sep
_GLUE = (_DIST, os.sep + "accelerate" + os.sep, os.sep + os.path.join("torch", "nn") + os.sep)


def blocking_call(frames: list[traceback.FrameSummary]) -> str | None:
    """Name the torch.distributed call at the bottom of `frames` (outermost first) and who made it, e.g.
    "a torch.distributed all_gather (called by _get_num_items_in_batch in transformers/trainer.py)": for
    collectives HeterMoE does not make itself (the Trainer's, Accelerate's), which carry no name of their own."""
    inner = [i for i, f in enumerate(frames) if _DIST in f.filename and "distributed_c10d" in f.filename]
    if not inner:
        return None
    call = frames[inner[-1]].name
    caller = next((f for f in reversed(frames[: inner[-1]]) if not any(g in f.filename for g in _GLUE)), None)
    if caller is None:
        return f"a torch.distributed {call}"
    parts = os.path.normpath(caller.filename).split(os.sep)
    where = "/".join(parts[-2:])
    return f"a torch.distributed {call} (called by {caller.name} in {where})"


def wait(work: Any, what: str, rank: int) -> None:
    """Wait for a collective's Work; if it fails, raise an error naming the operation and the peers that stopped.

    A gloo Work's wait() blocks the thread and raises when the collective fails or times out. An NCCL Work's
    wait() only makes the current CUDA stream wait and returns at once, so a dead peer would surface later as an
    unnamed stream sync that hangs until NCCL's watchdog: such Works arrive here as `DeviceWork` (groups.py wraps
    every NCCL group) and are polled instead (`_wait_on_device`)."""
    with waiting(what):
        if isinstance(work, DeviceWork):
            _wait_on_device(work, what, rank)
            return
        try:
            work.wait()
        except RuntimeError as exc:
            raise _named(rank, what, exc) from exc


def _named(rank: int, what: str, cause: BaseException | str) -> RuntimeError:
    return RuntimeError(f"hetermoe: rank {rank} failed waiting for {what}: {cause}{peer_report()}")


# ---- Works that complete on the device (NCCL) ---------------------------------------------------------------
_POLL_FIRST_S = 50e-6  # the first pause between polls; doubles up to _POLL_MAX_S
_POLL_MAX_S = 1e-3  # a long wait (a server computing) costs at most this much latency per exchange
_ABORT_JOIN_S = 10.0  # ncclCommAbort can itself hang on a broken fabric; the error must come out regardless


class DeviceAbort:
    """What the Works of one rank's NCCL groups share: the data-path timeout, and the abort of those groups.

    `abort(reason)` aborts `groups` once (later calls return at once): every Work waiting on a device group
    then fails too, naming the first reason, instead of polling a communicator that no longer exists."""

    def __init__(self, timeout_s: float, groups: list[Any] | None = None):
        self.timeout_s = timeout_s
        self.groups: list[Any] = list(groups or [])  # the NCCL groups (anything with abort())
        self.reason: str | None = None
        self._lock = threading.Lock()

    def _abort_groups(self) -> None:
        for group in list(self.groups):
            try:
                group.abort()
            except Exception:  # abort the others regardless
                pass

    def abort(self, reason: str) -> bool:
        """Abort the groups (bounded in time); False if they were already aborted."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
        done = threading.Event()

        def run() -> None:
            try:
                self._abort_groups()
            except Exception:  # aborting is best effort: the named error is what matters
                pass
            finally:
                done.set()

        threading.Thread(target=run, name="hetermoe-abort", daemon=True).start()
        done.wait(_ABORT_JOIN_S)
        return True


class DeviceWork:
    """A Work of an NCCL group (see `wait`): the Work itself, and the rank's `DeviceAbort`."""

    def __init__(self, work: Any, device_abort: DeviceAbort):
        self.work = work
        self.device_abort = device_abort

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self, *args: Any) -> Any:
        return self.work.wait(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.work, name)


def _wait_on_device(work: DeviceWork, what: str, rank: int) -> None:
    """Poll `is_completed()` (completion on the device, for NCCL) within the groups' timeout; on the timeout abort
    the rank's NCCL groups and raise the named error; then `wait()`, which orders the current stream after the
    collective (already complete: it costs nothing) and raises the error the Work recorded, if any.

    An NCCL Work that failed (a communicator error, NCCL's own timeout) reports itself completed, and its wait()
    raises that error (WorkNCCL::synchronize). `Work.exception()` is not used: it is deprecated in torch 2.13."""
    guard = work.device_abort
    deadline = time.monotonic() + guard.timeout_s
    pause = _POLL_FIRST_S
    while True:
        if guard.reason is not None:
            raise _named(rank, what, f"the HeterMoE NCCL groups were aborted ({guard.reason})")
        try:
            done = work.is_completed()
        except RuntimeError as exc:
            _fail(work, what, rank, exc)
        if done:
            break
        if time.monotonic() >= deadline:
            _fail(work, what, rank, f"not complete on the device after {guard.timeout_s:g} s (timeout_s); a peer "
                  "that stopped never enters the collective")
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX_S)
    try:
        work.wait()
    except RuntimeError as exc:
        _fail(work, what, rank, exc)


def _fail(work: DeviceWork, what: str, rank: int, cause: BaseException | str) -> None:
    """Abort the NCCL groups (a collective left queued would block the next stream sync forever), then raise."""
    work.device_abort.abort(f"rank {rank} failed waiting for {what}")
    error = _named(rank, what, cause)
    if isinstance(cause, BaseException):
        raise error from cause
    raise error


def peer_report() -> str:
    """The peer check of this process's monitor (with a leading space), or "" without one (no launcher)."""
    monitor = _CURRENT
    if monitor is None:
        return ""
    try:
        return " " + monitor.peer_report()
    except Exception as exc:  # a diagnosis must never replace the error it explains
        return f" {REPORT_MARK} unavailable ({type(exc).__name__}: {exc})."


def current() -> "HealthMonitor | None":
    return _CURRENT


def set_current(monitor: "HealthMonitor | None") -> None:
    """The monitor whose peer check errors include (health_monitor.HealthMonitor.start/stop set it)."""
    global _CURRENT
    _CURRENT = monitor
