"""The health monitor of one launched rank: its heartbeat and exit record in the rendezvous store, the
classification of its peers when a wait fails, and the SIGTERM watcher that says what the rank was waiting for.
The store keys and the peer kinds are described in health.py; docs/reliability.md tells the whole story.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from . import health
from .health import PREFIX, REPORT_MARK, SIGTERM_EXIT_CODE, _STORE_TIMEOUT, blocking_call, current_waits


# ---- peers -----------------------------------------------------------------------------------------------------
@dataclass
class PeerState:
    rank: int
    label: str  # "rank 2 (expert server, pid 4242)"
    kind: str  # ended | failed | gone | frozen | silent | alive | unknown
    detail: str = ""
    conclusive: bool = True


def _process_state(pid: int, started: float | None) -> str:
    """gone | frozen | alive, for a process on this host."""
    import psutil  # an Accelerate dependency

    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return "gone"  # the pid was reused by another process
        status = proc.status()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "gone"
    if status in (psutil.STATUS_STOPPED, getattr(psutil, "STATUS_TRACING_STOP", "tracing-stop")):
        return "frozen"
    return "alive"


class HealthMonitor:
    """This rank's health keys and heartbeat, and the view of its peers (see the module docstring)."""

    def __init__(self, *, store: Any, rank: int, world_size: int, role: str, period_s: float = 1.0,
                 host: str | None = None, pid: int | None = None):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.role = role
        self.period_s = period_s
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()
        self.started = time.monotonic()
        self._store_lock = threading.Lock()
        self._store_broken = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report_lock = threading.Lock()
        self._reported = False
        self._reporting = False  # the main thread is composing its failure report
        self._sigterm_installed = False
        self._watcher: threading.Thread | None = None
        self._wakeup_fds: tuple[int, int] | None = None  # (read, write) of the SIGTERM watcher's pipe
        self._exit_recorded = False

    # ---- construction and lifetime ------------------------------------------------------------------------
    @classmethod
    def connect(cls, *, host: str, port: int, rank: int, world_size: int, role: str, timeout_s: float) -> "HealthMonitor":
        """A monitor on its own connection to the rendezvous store at host:port (the heartbeat must not queue
        behind, or be queued behind, anything else using the store)."""
        import torch.distributed as dist

        store = dist.TCPStore(host, port, None, is_master=False, timeout=_STORE_TIMEOUT)
        # Beat often enough that a silent peer is told from a live one well within the data-path timeout.
        period = min(2.0, max(0.2, timeout_s / 10))
        return cls(store=store, rank=rank, world_size=world_size, role=role, period_s=period)

    def start(self) -> "HealthMonitor":
        import psutil

        info = {"pid": self.pid, "host": self.host, "role": self.role,
                "started": psutil.Process(self.pid).create_time()}
        self._store_call(lambda s: s.set(self._key(self.rank, "info"), json.dumps(info)))
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="hetermoe-health", daemon=True)
        self._thread.start()
        health.set_current(self)
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the heartbeat and the SIGTERM watcher and wait for both threads (the store stays usable).

        The threads must be finished, not just told to stop, before the interpreter finalizes: a daemon thread
        still inside a store call then (the call releases the GIL) is ended by pthread_exit when it takes the GIL
        back, from inside pybind11's noexcept gil_scoped_release destructor, and the process aborts with
        "terminate called without an active exception" (SIGABRT) after a successful run. `timeout_s` bounds
        each wait (default: the store timeout, the longest a beat can take)."""
        bound = _STORE_TIMEOUT.total_seconds() + self.period_s if timeout_s is None else timeout_s
        self._stop.set()
        if health.current() is self:
            health.set_current(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(bound)
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            # Back to the default action: during interpreter teardown the watcher thread can no longer run, and
            # a launcher's SIGTERM must then end the process at once rather than be swallowed.
            with contextlib.suppress(Exception):
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._sigterm_installed = False
            self._stop_watcher(bound)

    def close(self, timeout_s: float | None = None) -> None:
        """`stop()`, then close the store connection (the last reference to it): the rank's last use of it."""
        self.stop(timeout_s)
        bound = _STORE_TIMEOUT.total_seconds() if timeout_s is None else timeout_s
        self._store_broken = True  # from now on every store call returns its default at once
        if self._store_lock.acquire(timeout=bound):  # no peer check is using the connection now
            try:
                self.store = None  # its socket closes here, not during interpreter teardown
            finally:
                self._store_lock.release()

    def _stop_watcher(self, timeout_s: float) -> None:
        """Wake the SIGTERM watcher (a byte that is no signal number), wait for it, close its pipe."""
        if self._wakeup_fds is None:
            return
        read_fd, write_fd = self._wakeup_fds
        with contextlib.suppress(OSError):
            os.write(write_fd, b"\0")
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout_s)
        if self._watcher is None or not self._watcher.is_alive():  # a watcher still reporting keeps its pipe
            for fd in (read_fd, write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wakeup_fds = None

    def record_exit(self, status: str) -> None:
        """Record how this rank ends ("ok" or the reason); the first record wins."""
        if self._exit_recorded:
            return
        self._exit_recorded = True
        self._store_call(lambda s: s.set(self._key(self.rank, "exit"), status[:500]))

    # ---- store access (best effort) -------------------------------------------------------------------------
    @staticmethod
    def _key(rank: int, name: str) -> str:
        return f"{PREFIX}/{rank}/{name}"

    def _store_call(self, fn: Callable[[Any], Any], default: Any = None) -> Any:
        if self._store_broken:
            return default
        try:
            with self._store_lock:
                return fn(self.store)
        except Exception:  # the store's host may be gone too; a health check must not raise
            # One failure and the store is left alone: with its host unreachable every call would take the
            # store's full timeout, and a diagnosis must stay quick.
            self._store_broken = True
            return default

    def _read(self, rank: int, name: str) -> str | None:
        key = self._key(rank, name)
        return self._store_call(lambda s: s.get(key).decode() if s.check([key]) else None)

    def _beat(self) -> None:
        self._store_call(lambda s: s.add(self._key(self.rank, "beat"), 1))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._beat()

    # ---- peers ------------------------------------------------------------------------------------------------
    def peer_states(self, budget_s: float | None = None) -> list[PeerState]:
        """Classify every other rank, waiting at most `budget_s` for heartbeats of peers on other hosts."""
        budget = 2.5 * self.period_s if budget_s is None else budget_s
        peers = [r for r in range(self.world_size) if r != self.rank]
        infos: dict[int, dict | None] = {}
        for r in peers:
            raw = self._read(r, "info")
            try:
                infos[r] = json.loads(raw) if raw else None
            except ValueError:
                infos[r] = None
        first_beat = {r: self._store_call(lambda s, r=r: s.add(self._key(r, "beat"), 0)) for r in peers}
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            states = [self._classify(r, infos[r], first_beat[r], elapsed, budget) for r in peers]
            if all(s.conclusive for s in states) or elapsed >= budget:
                return states
            time.sleep(min(0.1, self.period_s / 4))

    def _classify(self, rank: int, info: dict | None, first_beat: int | None, elapsed: float, budget: float) -> PeerState:
        role = (info or {}).get("role", "role unknown")
        pid = (info or {}).get("pid")
        label = f"rank {rank} ({role}" + (f", pid {pid}" if pid else "") + (
            f" on {info['host']}" if info and info.get("host") != self.host else "") + ")"
        ended = self._read(rank, "exit")
        if ended is not None:
            if ended == "ok":
                return PeerState(rank, label, "ended", "finished normally")
            return PeerState(rank, label, "failed", ended)
        if info is None:
            return PeerState(rank, label, "unknown", "never reported its health (not started yet, or no launcher)")
        if info.get("host") == self.host and pid:
            state = _process_state(int(pid), info.get("started"))
            if state == "gone":
                return PeerState(rank, label, "gone", "its process ended without recording why (killed: SIGKILL, "
                                 "out of memory or a crash)")
            if state == "frozen":
                return PeerState(rank, label, "frozen", "its process is stopped (SIGSTOP or a debugger)")
            return PeerState(rank, label, "alive")
        beat = self._store_call(lambda s: s.add(self._key(rank, "beat"), 0))
        if beat is not None and first_beat is not None and beat != first_beat:
            return PeerState(rank, label, "alive")
        if elapsed >= min(budget, 2.5 * self.period_s):
            return PeerState(rank, label, "silent", f"no heartbeat for {elapsed:.1f} s (host down, process frozen "
                             "or network cut)")
        return PeerState(rank, label, "alive", conclusive=False)

    def peer_report(self, budget_s: float | None = None, settle_s: float = 1.0) -> str:
        """One sentence naming the peers that stopped. Called because something failed: a peer whose socket
        just closed may take a moment to be reaped, so look again for up to `settle_s` before saying that
        every peer is alive."""
        # Root causes first: ranks that vanished, then ranks that failed (usually because of them).
        order = {"gone": 0, "frozen": 0, "silent": 0, "failed": 1, "unknown": 2}
        deadline = time.monotonic() + settle_s
        while True:
            states = self.peer_states(budget_s)
            if self._store_broken:
                return (f"{REPORT_MARK} unavailable: the rendezvous store does not answer (it lives in the launcher "
                        "agent, or in rank 0 without one).")
            bad = sorted((s for s in states if s.kind in order), key=lambda s: (order[s.kind], s.rank))
            if bad or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not bad:
            return f"{REPORT_MARK} every other rank is alive."
        words = {"gone": "is dead", "frozen": "is frozen", "silent": "is not responding", "failed": "ended",
                 "unknown": "is unknown"}
        parts = [f"{s.label} {words[s.kind]}: {_clip(s.detail, 300)}" for s in bad]
        return f"{REPORT_MARK} " + "; ".join(parts) + "."

    # ---- reports -----------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def report_failure(self, exc: BaseException) -> str:
        """Print one line saying why this rank fails and record it (both once per process)."""
        if self._reported:
            return ""
        self._reporting = True
        message = _clip(" ".join(f"{type(exc).__name__}: {exc}".split()), 2000)
        doing = ""
        if "failed waiting for" not in message:  # not one of HeterMoE's named waits: name the collective
            call = blocking_call(traceback.extract_tb(exc.__traceback__))
            doing = f" while waiting for {call}" if call else ""
        if REPORT_MARK not in message and isinstance(exc, RuntimeError):
            message += health.peer_report()
        line = f"hetermoe: rank {self.rank} ({self.role}) failed after {self._elapsed():.1f} s{doing}: {message}"
        self._emit(line)
        self.record_exit(message)
        return line

    def _emit(self, line: str) -> bool:
        with self._report_lock:
            if self._reported:
                return False
            self._reported = True
            # Ranks share the launcher's stderr: one write, starting on a line of its own, so the line cannot be
            # glued to (or split by) another rank's half-written traceback.
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            try:
                os.write(sys.stderr.fileno(), ("\n" + line + "\n").encode("utf-8", "replace"))
            except (OSError, ValueError, AttributeError):  # stderr replaced by something without a descriptor
                print(line, file=sys.stderr, flush=True)
            return True

    def install_sigterm_report(self) -> bool:
        """On SIGTERM (the launcher stopping this rank), report what it was waiting for and exit 143.

        Only from the main thread, and only if SIGTERM still has its default action (a handler the script set
        wins). Returns whether it was installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            os.close(read_fd), os.close(write_fd)
            return False
        if previous != -1:  # someone else (an event loop) listens for signals: leave it to them
            signal.set_wakeup_fd(previous)
            os.close(read_fd), os.close(write_fd)
            return False
        owner = os.getpid()

        def on_sigterm(signum, frame):  # runs in the main thread whenever it gets to Python code; the watcher acts
            if os.getpid() != owner:  # a forked child kept this handler: behave as if it were not there
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        def in_forked_child():
            with contextlib.suppress(Exception):
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._sigterm_installed = True
        os.register_at_fork(after_in_child=in_forked_child)
        self._wakeup_fds = (read_fd, write_fd)
        self._watcher = threading.Thread(target=self._watch_signals, args=(read_fd, owner), name="hetermoe-sigterm",
                                         daemon=True)
        self._watcher.start()
        return True

    def _watch_signals(self, read_fd: int, owner: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if os.getpid() != owner or not data:
                return
            if signal.SIGTERM in data:
                self._on_sigterm()
            if self._stop.is_set():  # stop() woke us: the monitor is done
                return

    def _on_sigterm(self) -> None:
        waits = current_waits()
        deadline = time.monotonic() + 5.0
        while self._reporting and not self._reported and time.monotonic() < deadline:
            time.sleep(0.05)  # the main thread's own report (with its error) is the better one: let it finish
        doing = f"while waiting for {'; '.join(waits)}" if waits else "while not waiting on another rank"
        line = (f"hetermoe: rank {self.rank} ({self.role}) was stopped by its launcher (SIGTERM) after "
                f"{self._elapsed():.1f} s, {doing}. {self.peer_report()}")
        if not self._emit(line):
            # The main thread already reported this rank's failure and is exiting; give it a moment to finish.
            time.sleep(1.0)
        self.record_exit("stopped by its launcher (SIGTERM)")
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(SIGTERM_EXIT_CODE)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
