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

With an emulated link (`emulation.link_gbps`), the same points also carry the exchanges' link time: an
attention task's end is when its rows leave (forward: the dispatch of that layer; backward: the gradients for
the layer below), an expert task's end is when its results leave; a receiver pads up to when the rows would
have arrived (`DeviceEmulator.link_ready`): expert holders before their compute, attention ranks after a
forward exchange's wait (`exchange_done`, outside the stripe baton) and at the start of the backward task that
consumes the returned gradients.
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
        self.link = emulator if emulator is not None and emulator.emulates_link else None
        self._sent_bytes: dict[tuple[int, int], float] = {}  # (layer, stripe) -> bytes this rank dispatched
        self._results_ready: dict[tuple[int, int], float] = {}  # (layer, stripe) -> when its results arrived
        self._busy_until = 0.0  # modelled end of this rank's last compute task

    def attention_done(self, direction: str, layer: int, stripe: int, start: float, *, num_seqs: int) -> float:
        """Pad to the modelled attention time of `num_seqs` sequences, record, return the end time."""
        if self.emulator is not None:
            if self.link is not None:
                start = self._modelled_start(direction, layer, stripe, start)
            self.emulator.pad(start, self.emulator.attention_s(direction, num_seqs=num_seqs, real_seq_len=self.seq_len))
        end = self.now()
        self.timeline.record("A", direction, layer, stripe, start, end)
        if self.link is not None:
            self._busy_until = end
            if layer >= 0 and (num_seqs or direction == "B"):
                if direction == "F":
                    self._sent_bytes[(layer, stripe)] = self.link.copies_bytes(num_seqs)
                if (layer, stripe) in self._sent_bytes:  # backward sends the forward's rows back as gradients
                    self.link.board.publish("issue", direction, layer, stripe, self.rank, end,
                                            self._sent_bytes[(layer, stripe)])
        return end

    def _modelled_start(self, direction: str, layer: int, stripe: int, start: float) -> float:
        """When this attention task would start on the emulated GPU: once its input is there and the previous
        compute task ended. A GPU runs queued kernels back to back, so the host's bookkeeping between two
        tasks (baton hand-off, issuing an exchange) is not charged; only a task without a tracked input
        starts at its real start."""
        if direction == "B" and (layer + 1, stripe) in self._sent_bytes:
            # This task consumed the gradients returned by layer + 1's backward exchange.
            ready = self.link.link_ready("send", "B", layer + 1, stripe, self._sent_bytes[(layer + 1, stripe)])
        elif direction == "F" and (layer - 1, stripe) in self._results_ready:
            ready = self._results_ready.pop((layer - 1, stripe))  # set by exchange_done
        elif direction == "F" and layer == 0 and stripe > 0:
            ready = 0.0  # embeddings are ready from the forward's start: only the previous stripe's task counts
        else:
            return start
        return min(start, max(ready, self._busy_until)) if ready <= start else ready

    def _arrival(self, kind: str, direction: str, layer: int, stripe: int, received_bytes: float, now: float) -> float:
        """Sleep until rows of this exchange would have arrived over the emulated link; return that time."""
        ready = self.link.link_ready(kind, direction, layer, stripe, received_bytes)
        if ready > now:
            self.link.pad(now, ready - now)
        return ready

    def head_done(self, direction: str, start: float, *, num_tokens: int) -> None:
        if self.emulator is not None:
            if self.link is not None:
                # The head follows the last stripe's top stage and its results (forward), or the head's forward
                # (backward), at once.
                ready = max([self._busy_until, *self._results_ready.values()])
                self._results_ready.clear()
                if 0 < ready <= start:
                    start = ready
            self.emulator.pad(start, self.emulator.head_s(direction, num_tokens=num_tokens, real_seq_len=self.seq_len))
        self.timeline.record("H", direction, -1, -1, start)
        if self.link is not None:
            self._busy_until = self.now()

    def experts_done(self, direction: str, layer: int, stripe: int, start: float, *, rows_per_expert: list[int],
                     seq_len: int) -> None:
        if self.emulator is not None:
            if self.link is not None:  # the rows could not be used before they arrived, nor before the last task ended
                received = self.link.row_bytes(sum(rows_per_expert), seq_len)
                ready = self._arrival("issue", direction, layer, stripe, received, start)
                start = ready if ready > start else min(start, max(ready, self._busy_until))
            self.emulator.pad(start, self.emulator.experts_s(direction, rows_per_expert=rows_per_expert,
                                                             real_seq_len=seq_len))
        self.timeline.record("E", direction, layer, stripe, start)
        if self.link is not None:
            self._busy_until = self.now()
            self.link.board.publish("send", direction, layer, stripe, self.rank, self._busy_until,
                                    self.link.row_bytes(sum(rows_per_expert), seq_len))

    @property
    def needs_rows_per_expert(self) -> bool:
        return self.emulator is not None

    def exchange_done(self, kind: str, direction: str, key: Any, start: float, end: float | None = None) -> None:
        if self.link is not None and direction == "F" and end is None and (key.layer, key.stripe) in self._sent_bytes:
            # An attention rank has its results: pad until the holders' results would have arrived.
            self._results_ready[(key.layer, key.stripe)] = self._arrival(
                "send", "F", key.layer, key.stripe, self._sent_bytes[(key.layer, key.stripe)], self.now())
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
