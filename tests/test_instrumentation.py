"""The data path's observer: named events become timeline tasks; clock marks are resolved only when read."""

from __future__ import annotations

import torch

from hf_hetermoe.instrumentation import DataPathObserver, Instruments, clock_for
from hf_hetermoe.timeline import HostClock, Timeline
from hf_hetermoe.transport import ExchangeKey


class FakeEventClock:
    """Marks are opaque objects (like CUDA events) that only `seconds` turns into times, counting calls."""

    def __init__(self):
        self.ticks = 0
        self.resolved = 0

    def now(self):
        self.ticks += 1
        return ("mark", float(self.ticks))

    def seconds(self, mark):
        if isinstance(mark, float):
            return mark
        self.resolved += 1
        return mark[1]


def test_marks_are_resolved_when_read_not_when_recorded():
    clock = FakeEventClock()
    timeline = Timeline(0, clock=clock)
    start = clock.now()
    timeline.record("A", "F", 0, 0, start)  # end taken from the clock
    timeline.record("E", "F", 0, 1, clock.now(), clock.now())
    assert clock.resolved == 0
    tasks = timeline.tasks()
    assert [(t.kind, t.start, t.end) for t in tasks] == [("A", 1.0, 2.0), ("E", 3.0, 4.0)]
    assert clock.resolved == 4
    assert timeline.busy_time(0.0, 10.0, kinds=("A",)) == 1.0
    timeline.tasks()
    assert clock.resolved == 4  # resolved once


def test_bounded_timeline_keeps_resolving_after_trimming():
    clock = FakeEventClock()
    timeline = Timeline(0, clock=clock, max_tasks=4)
    for _ in range(9):
        timeline.record("A", "F", 0, 0, clock.now())
    tasks = timeline.tasks()
    assert all(isinstance(t.start, float) and t.end > t.start for t in tasks)
    assert len(tasks) <= 4


def test_instruments_record_every_named_event():
    observer = Instruments(rank=3)
    key = ExchangeKey(session=1, layer=2, stripe=1)
    start = observer.now()
    end = observer.attention_done("F", 2, 1, start, num_seqs=4)
    observer.exchange_done("D", "F", key, end)
    observer.experts_done("B", 2, 1, observer.now(), rows_per_expert=[], seq_len=8)
    observer.head_done("F", observer.now(), num_tokens=16)
    kinds = [(t.kind, t.direction, t.layer, t.stripe) for t in observer.timeline.tasks()]
    assert kinds == [("A", "F", 2, 1), ("D", "F", 2, 1), ("E", "B", 2, 1), ("H", "F", -1, -1)]
    assert not observer.needs_rows_per_expert  # no emulation: the shard does not count rows per expert


def test_null_observer_accepts_every_event():
    observer = DataPathObserver()
    start = observer.now()
    observer.attention_done("B", 0, 0, start, num_seqs=1)
    observer.experts_done("F", 0, 0, start, rows_per_expert=[1], seq_len=1)
    observer.exchange_done("C", "B", ExchangeKey(0, 0, 0), start)
    observer.head_done("B", start, num_tokens=1)


def test_cpu_and_emulation_use_the_host_clock():
    assert isinstance(clock_for(torch.device("cpu"), emulating=False), HostClock)
    assert isinstance(clock_for(torch.device("cuda", 0), emulating=True), HostClock)  # emulation sleeps on the host
