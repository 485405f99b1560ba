"""One zebra forward's shared state, and what a stripe thread does at a routed-experts call.

`ZebraRunner` (zebra.py) starts one thread per stripe; the threads share a `ZebraRun` (segments, outputs, the
baton) and find it through a thread-local. The baton enforces the Theorem-1 order: one stripe computes at a
time, round robin; at each routed-experts call a stripe issues its dispatch, hands the baton on, and waits.
See docs/architecture.md ("Zebra").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .engine import _in_backward
from .transport import ExchangeKey, ExchangePlan

if TYPE_CHECKING:
    from .engine import HeterMoEEngine
    from .zebra import ZebraRunner

_local = threading.local()  # .ctx = (run, stripe) while a stripe runs; .task_start for the timeline


def active_stripe() -> tuple["ZebraRun", int] | None:
    return getattr(_local, "ctx", None)


class _Aborted(Exception):
    """Another stripe failed; this one stops."""


class Baton:
    """Round-robin turn among stripe threads: stripe j computes only while it holds the baton."""

    def __init__(self, num_stripes: int):
        self._cv = threading.Condition()
        self._turn = 0
        self._done = [False] * num_stripes
        self._failed = False

    def acquire(self, stripe: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == stripe or self._failed)
            if self._failed:
                raise _Aborted()

    def pass_on(self, stripe: int) -> None:
        with self._cv:
            n = len(self._done)
            self._turn = next((k for k in ((stripe + s) % n for s in range(1, n + 1)) if not self._done[k]), -1)
            self._cv.notify_all()

    def finish(self, stripe: int) -> None:
        with self._cv:
            self._done[stripe] = True
        self.pass_on(stripe)

    def fail(self) -> None:
        with self._cv:
            self._failed = True
            self._cv.notify_all()


@dataclass
class Exchange:
    x_PH: torch.Tensor  # gathered rows, attached to the segment graph (dx enters here)
    y_leaf: torch.Tensor  # expert results (leaf; dy is its gradient)
    key: ExchangeKey
    plan: ExchangePlan


@dataclass
class Segment:
    h_src: torch.Tensor | None = None  # the layer input as the stock loop passed it (attached below)
    h_in: torch.Tensor | None = None  # the same values as a leaf: where this segment's graph starts
    out: torch.Tensor | None = None
    exchange: Exchange | None = None


@dataclass
class ZebraRun:
    """One zebra forward: per-stripe graphs, kept (by the join's ctx) until its backward."""

    runner: "ZebraRunner"
    session: int
    rows: list[tuple[int, int]]  # (start, stop) batch rows of each stripe
    baton: Baton
    segments: dict[tuple[int, int], Segment] = field(default_factory=dict)
    inputs: list[torch.Tensor | None] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)  # the stock base-model output of each stripe (None: no rows)
    error: BaseException | None = None

    @property
    def num_stripes(self) -> int:
        return len(self.rows)

    def hidden(self, stripe: int) -> torch.Tensor | None:
        result = self.results[stripe]
        return None if result is None else result.last_hidden_state

    def logits(self, stripe: int) -> tuple | None:
        return getattr(self.results[stripe], "router_logits", None)

    def segment(self, layer: int, stripe: int) -> Segment:
        return self.segments.setdefault((layer, stripe), Segment())


def exchange_in_stripe(engine: "HeterMoEEngine", layer: int, x_PH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Called by the experts stand-in inside a stripe: dispatch, let the next stripe run, return results."""
    run, stripe = active_stripe()
    seg = run.segment(layer, stripe)
    if _in_backward():
        return seg.exchange.y_leaf  # a checkpointed layer recomputed: the experts already ran
    key = ExchangeKey(session=run.session, layer=layer, stripe=stripe)
    keep = torch.is_grad_enabled() and x_PH.requires_grad
    autocast_on, autocast_dtype = _autocast_state(x_PH.device.type)
    start, stop = run.rows[stripe]
    issued = engine.instruments.attention_done("F", layer, stripe, _local.task_start, num_seqs=stop - start)
    last = stripe == run.num_stripes - 1
    pending, plan = engine.issue_forward(key, x_PH.detach(), counts_E, keep=keep,
                                         autocast=autocast_dtype if autocast_on else None)
    if last:
        engine.finish_layer(layer)  # Asym-EA: experts held here run after all stripes' attention
    run.baton.pass_on(stripe)
    y_PH = pending.wait()
    engine.instruments.exchange_done("D", "F", key, issued)
    run.baton.acquire(stripe)
    _local.task_start = engine.instruments.now()
    y_leaf = y_PH.detach().requires_grad_(keep)
    seg.exchange = Exchange(x_PH=x_PH, y_leaf=y_leaf, key=key, plan=plan)
    return y_leaf


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
