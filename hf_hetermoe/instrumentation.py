"""Instrumentation: what the data path reports at its named points, and who listens.

The data path (engine, transport, expert shard, zebra runner, expert server) calls one observer at named
points and knows nothing of what happens there:

    attention_done(direction, key, start, num_seqs)  an attention task ended (at a dispatch, or a layer's backward)
    head_done(direction, start, num_tokens)          the LM head (and loss) ended
    experts_done(direction, key, start, rows_per_expert)  a holder's expert task ended
    exchange_done(kind, direction, key, start)       a dispatch ("D") or combine ("C") ended

`DataPathObserver` ignores them. `Instruments` records each task in the rank's `Timeline` (busy fractions, the
Theorem-1 order tests, Chrome traces with `HETERMOE_TRACE=dir`) and, when device emulation is on, first pads
the task to its modelled duration on the emulated GPU. Times are marks of the rank's clock: CUDA events on a
GPU (recorded on the calling thread's current stream, so a stripe's task is timed on its own stream), host
`perf_counter()` seconds on CPU and under emulation (which sleeps on the host). See docs/architecture.md
("Instrumentation").
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import torch

from .timeline import Clock, HostClock, Timeline

if TYPE_CHECKING:
    from .emulation import DeviceEmulator


class CudaEventClock:
    """Marks are CUDA events recorded on the current stream; `seconds` maps them onto the host clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self._origin = torch.cuda.Event(enable_timing=True)
        self._origin.record(torch.cuda.current_stream(device))
        self._origin.synchronize()  # once, at construction: the origin's host time is then known
        self._origin_host = time.perf_counter()

    def now(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, mark: Any) -> float:
        if isinstance(mark, float):
            return mark
        mark.synchronize()
        return self._origin_host + self._origin.elapsed_time(mark) / 1e3


def clock_for(device: torch.device, *, emulating: bool) -> Clock:
    return CudaEventClock(device) if device.type == "cuda" and not emulating else HostClock()


class DataPathObserver:
    """Receives the data path's named events; this base ignores them."""

    seq_len = 1  # tokens per sequence of the current forward (emulated costs scale by it)
    clock: Clock = HostClock()

    def now(self) -> Any:
        return self.clock.now()

    def attention_done(self, direction: str, layer: int, stripe: int, start: float, *, num_seqs: int) -> float:
        return self.now()

    def head_done(self, direction: str, start: float, *, num_tokens: int) -> None:
        pass

    def experts_done(self, direction: str, layer: int, stripe: int, start: float, *, rows_per_expert: list[int],
                     seq_len: int) -> None:
        pass

    @property
    def needs_rows_per_expert(self) -> bool:
        """Whether `experts_done` uses `rows_per_expert` (counting them costs a device sync on a GPU)."""
        return False

    def exchange_done(self, kind: str, direction: str, key: Any, start: float, end: float | None = None) -> None:
        pass


class Instruments(DataPathObserver):
    """Timeline recording, with device emulation padding when an emulator is given."""

    def __init__(self, rank: int, emulator: "DeviceEmulator | None" = None, *,
                 device: torch.device = torch.device("cpu")):
        self.rank = rank
        self.emulator = emulator
        self.clock = clock_for(device, emulating=emulator is not None)
        self.timeline = Timeline(rank, clock=self.clock)

    def attention_done(self, direction: str, layer: int, stripe: int, start: float, *, num_seqs: int) -> float:
        """Pad to the modelled attention time of `num_seqs` sequences, record, return the end time."""
        if self.emulator is not None:
            self.emulator.pad(start, self.emulator.attention_s(direction, num_seqs=num_seqs, real_seq_len=self.seq_len))
        end = self.now()
        self.timeline.record("A", direction, layer, stripe, start, end)
        return end

    def head_done(self, direction: str, start: float, *, num_tokens: int) -> None:
        if self.emulator is not None:
            self.emulator.pad(start, self.emulator.head_s(direction, num_tokens=num_tokens, real_seq_len=self.seq_len))
        self.timeline.record("H", direction, -1, -1, start)

    def experts_done(self, direction: str, layer: int, stripe: int, start: float, *, rows_per_expert: list[int],
                     seq_len: int) -> None:
        if self.emulator is not None:
            self.emulator.pad(start, self.emulator.experts_s(direction, rows_per_expert=rows_per_expert,
                                                             real_seq_len=seq_len))
        self.timeline.record("E", direction, layer, stripe, start)

    @property
    def needs_rows_per_expert(self) -> bool:
        return self.emulator is not None

    def exchange_done(self, kind: str, direction: str, key: Any, start: float, end: float | None = None) -> None:
        self.timeline.record(kind, direction, key.layer, key.stripe, start, end)

    def write_trace_if_asked(self) -> str | None:
        """`HETERMOE_TRACE=dir`: write this rank's Chrome trace there."""
        folder = os.environ.get("HETERMOE_TRACE")
        return self.timeline.write_chrome_trace(folder) if folder else None


class ModelHooks:
    """Hooks on the patched model that feed the observer: the sequence length of each forward (from the base
    model's inputs) and the LM head's forward and backward tasks."""

    def __init__(self, observer: DataPathObserver):
        self.observer = observer
        self.attention_resumed = {"F": observer.now(), "B": observer.now()}  # where the current attention task began
        self._handles: list[Any] = []

    def install(self, model: Any) -> None:
        observer, resumed = self.observer, self.attention_resumed

        def base_pre(module, args, kwargs):
            x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
            if x is None and args:
                x = args[0]
            if x is not None and x.dim() >= 2:
                observer.seq_len = int(x.shape[1])
            resumed["F"] = observer.now()

        self._handles.append(model.base_model.register_forward_pre_hook(base_pre, with_kwargs=True))
        head = model.get_output_embeddings()
        if head is None:
            return
        starts: dict[str, float] = {}

        def tokens(x) -> int:
            return x.numel() // x.shape[-1]

        def head_pre(module, args):
            starts["F"] = observer.now()

        def head_post(module, args, output):
            observer.head_done("F", starts["F"], num_tokens=tokens(args[0]))

        def head_bwd_pre(module, grad_output):
            starts["B"] = observer.now()

        def head_bwd(module, grad_input, grad_output):
            observer.head_done("B", starts["B"], num_tokens=tokens(grad_output[0]))
            resumed["B"] = observer.now()

        self._handles += [
            head.register_forward_pre_hook(head_pre), head.register_forward_hook(head_post),
            head.register_full_backward_pre_hook(head_bwd_pre), head.register_full_backward_hook(head_bwd),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
