"""Timeline: what each rank computed and communicated, and when.

Every rank records tasks (kind, direction, layer, stripe, start, end):
- kind: "A" attention compute (everything between two expert exchanges), "E" expert compute,
  "D" dispatch, "C" combine, "H" head and loss (whole micro-batch, main thread);
- direction: "F" forward or "B" backward.
Tests read the order of compute tasks from it (Theorem 1), benchmarks the busy fractions, and
`HETERMOE_TRACE=dir` writes one Chrome-trace JSON per rank (open in chrome://tracing or Perfetto).

Start and end are marks of the rank's clock (instrumentation.py): `perf_counter()` seconds on CPU, CUDA events
on a GPU (which time what the GPU did, not when the host launched it). Marks are turned into seconds only
when tasks are read, so recording never waits for the GPU.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

COMPUTE_KINDS = ("A", "E", "H")


@dataclass(frozen=True)
class Task:
    kind: str
    direction: str
    layer: int
    stripe: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class Clock(Protocol):
    def now(self) -> Any: ...

    def seconds(self, mark: Any) -> float: ...


class HostClock:
    """Marks are `time.perf_counter()` seconds."""

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    @staticmethod
    def seconds(mark: Any) -> float:
        return mark


class Timeline:
    """Thread-safe list of tasks of one rank; times are marks of `clock`, read back as seconds."""

    def __init__(self, rank: int, *, max_tasks: int = 200_000, clock: Clock | None = None):
        self.rank = rank
        self.max_tasks = max_tasks
        self.clock = clock or HostClock()
        self._tasks: list[Task] = []  # start/end may still be clock marks until `tasks()` resolves them
        self._resolved = 0  # tasks before this index hold seconds
        self._lock = threading.Lock()
        self.enabled = True

    def record(self, kind: str, direction: str, layer: int, stripe: int, start: Any, end: Any = None) -> None:
        if not self.enabled:
            return
        task = Task(kind, direction, layer, stripe, start, self.clock.now() if end is None else end)
        with self._lock:
            if len(self._tasks) >= self.max_tasks:
                self._resolve()
                del self._tasks[: self.max_tasks // 2]  # keep memory bounded on long runs
                self._resolved -= self.max_tasks // 2
            self._tasks.append(task)

    def _resolve(self) -> None:
        seconds = self.clock.seconds
        for i in range(self._resolved, len(self._tasks)):
            t = self._tasks[i]
            self._tasks[i] = Task(t.kind, t.direction, t.layer, t.stripe, seconds(t.start), seconds(t.end))
        self._resolved = len(self._tasks)

    def tasks(self, since: float = float("-inf")) -> list[Task]:
        with self._lock:
            self._resolve()
            return [t for t in self._tasks if t.start >= since]

    def clear(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._resolved = 0

    def busy_time(self, start: float, end: float, kinds: tuple[str, ...] = COMPUTE_KINDS) -> float:
        """Seconds of compute inside [start, end] (tasks of one rank never overlap in compute)."""
        total = 0.0
        for t in self.tasks():
            if t.kind in kinds:
                total += max(0.0, min(t.end, end) - max(t.start, start))
        return total

    def chrome_trace(self) -> dict:
        events = []
        for t in self.tasks():
            name = f"{t.kind}{t.direction} L{t.layer} s{t.stripe}"
            tid = {"A": 0, "H": 0, "E": 0, "D": 1, "C": 2}.get(t.kind, 3)
            events.append({
                "name": name, "cat": t.kind, "ph": "X", "pid": self.rank, "tid": tid,
                "ts": t.start * 1e6, "dur": max(t.duration, 0.0) * 1e6,
                "args": {"layer": t.layer, "stripe": t.stripe, "direction": t.direction},
            })
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"rank": self.rank, "note": "compute on tid 0, dispatch tid 1, combine tid 2"}}

    def write_chrome_trace(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"hetermoe-trace-rank{self.rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.chrome_trace(), fh)
        return path


def compute_order(tasks: list[Task], kinds: tuple[str, ...] = COMPUTE_KINDS) -> list[tuple[str, str, int, int]]:
    """(kind, direction, layer, stripe) of compute tasks, in start order."""
    return [(t.kind, t.direction, t.layer, t.stripe) for t in sorted(tasks, key=lambda t: t.start) if t.kind in kinds]
