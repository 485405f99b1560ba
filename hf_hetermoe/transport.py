"""The token transport: one asynchronous dispatch/combine exchange per (layer, stripe), for every rank.

Every rank of the world takes part in every exchange, with uneven (possibly zero) splits, so every collective
is entered in the same order everywhere. Three kinds of rank use the same code:
- an attention rank sends rows and gets results back (`dispatch_forward` / `dispatch_backward`, then `wait()`);
- an expert server receives rows, computes, and returns results (`serve_forward` / `serve_backward`);
- an attention rank that holds experts (Asym-EA, colocated mode) does both: rows for its own experts wait
  until `finish_layer`, which computes them for every stripe of the layer and returns their results.
The synchronous case (outside zebra) is issue-then-wait. See docs/architecture.md ("Token transport").

One exchange, forward (backward is the same without the counts, with gradients):
  1. counts for experts held on attention ranks: all-to-all among attention ranks (in step anyway);
  2. counts for experts held on servers: all-to-all over all ranks (attention ranks only send, so an
     attention rank never waits for a busy server). Counts are host metadata: splits must be Python ints, so
     they are CPU int64 tensors on CPU (gloo) groups of their own, whatever carries the rows;
  3. rows: one all-to-all on the dispatch group reaches servers and attention holders;
  4. results from servers: one all-to-all on the combine group, issued with the dispatch;
  5. results from attention holders: one all-to-all on the attention group, issued by `finish_layer` (only on
     layers where an attention rank holds experts).
Operation order: every rank issues D0 C0 D1 C1 .. (dispatch, combine, by stripe) on the two communicators it
shares with the servers, on every layer, so the servers return each stripe at once; results computed on
attention ranks travel among attention ranks only, which all issue them at the same point. NCCL needs one
order of operations across its communicators on all ranks (kernels of two communicators may not progress
concurrently); tests/test_transport.py checks the order on every rank.

Legend: P = (token, k) pairs a rank sends (rows sorted by (holder rank, expert)), R = rows a holder receives,
H = hidden size, E = experts per layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from . import health
from .grouped_rows import expert_order
from .instrumentation import DataPathObserver
from .streams import to_device

if TYPE_CHECKING:
    from .expert_shard import ExpertShard
    from .groups import HeterMoEGroups
    from .placement import ExpertPlacement


@dataclass(frozen=True)
class ExchangeKey:
    session: int  # which model forward
    layer: int
    stripe: int


@dataclass
class ExchangePlan:
    """Row counts of one (layer, stripe) exchange, as seen by this rank."""

    send_splits: list[int]  # rows this rank dispatches to each rank
    recv_splits: list[int]  # rows this rank receives from each rank
    recv_local_expert_R: torch.Tensor | None  # holders: local expert index of each received row (on the device)
    row_dtype: torch.dtype
    # Holders: (permutation into expert order, inverse) of the received rows, made once for the forward and its
    # backward; None when they arrive in expert order (one source). grouped_rows.py.
    recv_grouping: tuple[torch.Tensor, torch.Tensor] | None = None


def wait(work: Any, what: str, rank: int) -> None:
    """Wait for a collective and name the operation if it fails (dead peer, timeout); see health.py."""
    health.wait(work, what, rank)


def _all_to_all(group: Any, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int], send_splits: list[int]):
    return group.alltoall_base(recv, send.contiguous(), recv_splits, send_splits, dist.AllToAllOptions())


class PendingExchange:
    """The collectives of one exchange in flight; `wait()` returns the results, rows in send order.

    Results arrive in up to two parts: from the servers (combine group, issued with the dispatch) and from
    attention holders (attention group, issued by `finish_layer`). Each part's buffer holds its source ranks'
    rows in rank order; with both parts, `wait()` interleaves them back into send order."""

    def __init__(self, *, rank: int, send_splits: list[int], out: Callable[[], torch.Tensor], parts: int):
        self.rank = rank
        self.send_splits = send_splits
        self._out = out  # gives the buffer where two parts are assembled (or the empty result of none)
        self.works: list[tuple[Any, str]] = []
        self.keep_alive: list[torch.Tensor] = []  # send buffers must live until their collective completes
        self._parts: list[tuple[torch.Tensor, set[int]]] = []  # (buffer, source ranks) per part
        self._expected = parts
        self._ready = threading.Event()
        if parts == 0:
            self._ready.set()

    def add_part(self, work: tuple[Any, str], buffer: torch.Tensor, sources: set[int], keep_alive: tuple = ()) -> None:
        self.works.append(work)
        self.keep_alive += list(keep_alive)
        self._parts.append((buffer, sources))
        if len(self._parts) == self._expected:
            self._ready.set()

    def wait(self) -> torch.Tensor:
        self._ready.wait()
        for work, what in self.works:
            wait(work, what, self.rank)
        if not self._parts:
            return self._out()
        if len(self._parts) == 1:
            return self._parts[0][0]
        out = self._out()
        offsets = [0] * len(self._parts)
        position = 0
        for src, rows in enumerate(self.send_splits):
            if rows:
                part = next(i for i, (_, sources) in enumerate(self._parts) if src in sources)
                out[position : position + rows] = self._parts[part][0][offsets[part] : offsets[part] + rows]
                offsets[part] += rows
                position += rows
        return out


class _Done:
    """A finished collective (one process: its rows and results to itself)."""

    @staticmethod
    def wait(*args: Any) -> bool:
        return True

    @staticmethod
    def is_completed() -> bool:
        return True


class ReceiveBuffers:
    """Receive buffers reused across steps, one per (layer, stripe, use), grown when a step needs more rows.

    Memory bound on an attention rank: per MoE layer, stripe and direction (forward results, backward input
    gradients) one `(rows, H)` buffer, where rows is the most (token, k) pairs one stripe of this rank ever sent
    (tokens per stripe x top_k), in the wire dtype (precision.wire_dtype: bf16 rows take half the bytes of
    fp32). An attention rank that holds experts (Asym-EA, colocated) adds one per (layer, stripe, direction) for
    the rows it receives, at most the pairs of all attention ranks routed to its experts. The synchronous path
    and expert servers use fresh buffers (`key=None`)."""

    def __init__(self, hidden_size: int, device: torch.device):
        self.hidden_size = hidden_size
        self.device = device
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple | None, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """A `(rows, H)` buffer; `key=None` gives a fresh tensor (the caller keeps it beyond the next step)."""
        if key is None:
            return torch.empty(rows, self.hidden_size, dtype=dtype, device=self.device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows or buf.dtype != dtype:
            buf = torch.empty(max(rows, 1), self.hidden_size, dtype=dtype, device=self.device)
            self._buffers[key] = buf
        return buf[:rows]


@dataclass
class _HeldRows:
    """Rows this attention rank received for its own experts, waiting for `finish_layer`."""

    key: ExchangeKey
    direction: str
    plan: ExchangePlan
    rows: torch.Tensor
    work: tuple[Any, str] | None  # None: nothing to compute here, only the attention part to take part in
    pending: PendingExchange
    keep: bool = False
    autocast: torch.dtype | None = None
    seq_len: int = 1
    reuse: bool = True


@dataclass
class SplitArithmetic:
    """Who holds which experts, and the splits that follow from per-expert counts (no communication)."""

    placement: "ExpertPlacement"
    world: int
    attention_ranks: tuple[int, ...]
    servers: tuple[int, ...]
    local_of: dict[int, list[tuple[int, ...]]] = field(init=False)  # layer -> rank -> its experts, local order
    # layer -> expert ids of the servers' (attention holders') experts, holder by holder: the counts one exchange
    # sends are counts_E at these ids, one index operation (made once per layer, reused by every exchange).
    _server_ids: dict[int, torch.Tensor] = field(init=False)
    _attention_ids: dict[int, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.local_of = {
            layer: [self.placement.local_experts(r, layer) for r in range(self.world)] for layer in self.placement.layers
        }

        def ids(layer: int, ranks: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor([e for r in ranks for e in self.local_of[layer][r]], dtype=torch.int64)

        self._server_ids = {layer: ids(layer, self.servers) for layer in self.placement.layers}
        self._attention_ids = {layer: ids(layer, self.attention_ranks) for layer in self.placement.layers}

    def send_splits(self, layer: int, counts_E: torch.Tensor) -> list[int]:
        """Rows an attention rank sends to each rank: the pairs routed to that rank's experts."""
        counts = counts_E.tolist()  # one read of the (host) counts, then Python sums
        return [sum(counts[e] for e in experts) for experts in self.local_of[layer]]

    def server_counts(self, layer: int, counts_E: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The per-expert counts an attention rank sends to the servers, and their splits per rank."""
        local_of = self.local_of[layer]
        send = counts_E[self._server_ids[layer]].to(torch.int64)
        splits = [len(local_of[d]) if d in self.servers else 0 for d in range(self.world)]
        return send, splits

    def server_recv_count_splits(self, layer: int, rank: int) -> list[int]:
        """A server receives, from every attention rank, one count per expert it holds."""
        mine = len(self.local_of[layer][rank])
        return [mine if r in self.attention_ranks else 0 for r in range(self.world)]

    def attention_holds_any(self, layer: int) -> bool:
        return any(self.local_of[layer][a] for a in self.attention_ranks)

    def attention_counts(self, layer: int, counts_E: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Counts an attention rank sends to each attention rank (its experts of `layer`), in attention order."""
        local_of = self.local_of[layer]
        send = counts_E[self._attention_ids[layer]].to(torch.int64)
        return send, [len(local_of[a]) for a in self.attention_ranks]

    def holder_plan(self, layer: int, rank: int, sources: tuple[int, ...], per_source_counts: torch.Tensor,
                    send_splits: list[int], row_dtype: torch.dtype,
                    device: torch.device = torch.device("cpu")) -> ExchangePlan:
        """A holder's plan from the counts it received: `per_source_counts` is (len(sources), experts held)."""
        mine = len(self.local_of[layer][rank])
        recv_splits = [0] * self.world
        local_expert_R = None
        grouping = None
        if mine:
            per_source_counts = per_source_counts.reshape(len(sources), mine)
            for src, rows in zip(sources, per_source_counts.sum(dim=1).tolist()):
                recv_splits[src] = rows
            # Host counts, host arithmetic: numpy's repeat takes microseconds where torch.repeat_interleave on
            # CPU tensors takes ~100x longer for the same few thousand ids.
            ids = np.tile(np.arange(mine, dtype=np.int64), len(sources))
            rows = np.repeat(ids, per_source_counts.reshape(-1).numpy())
            local_expert_R = to_device(torch.from_numpy(rows), device)
            grouping = expert_order(local_expert_R, sum(1 for rows in recv_splits if rows))
        return ExchangePlan(send_splits=send_splits, recv_splits=recv_splits, recv_local_expert_R=local_expert_R,
                            row_dtype=row_dtype, recv_grouping=grouping)


class TokenTransport:
    """The exchanges of one rank for one patched model."""

    def __init__(self, *, groups: "HeterMoEGroups", placement: "ExpertPlacement", hidden_size: int,
                 observer: DataPathObserver | None = None):
        topology = groups.topology
        self.groups = groups
        self.rank = groups.rank
        self.world = groups.world_size
        self.splits = SplitArithmetic(placement=placement, world=self.world,
                                      attention_ranks=tuple(topology.attention_ranks),
                                      servers=tuple(topology.expert_ranks))
        self.buffers = ReceiveBuffers(hidden_size, groups.device)
        self.observer = observer or DataPathObserver()
        self._held: dict[int, list[_HeldRows]] = {}  # layer -> rows waiting for local compute, in issue order
        # Servers send results without waiting (their buffers stay referenced here until gloo reports the send
        # complete), so they take the next stripe's rows while the previous results are still in flight.
        self._sends_in_flight: list[tuple[Any, str, torch.Tensor]] = []

    def holds(self, layer: int) -> bool:
        return bool(self.splits.local_of[layer][self.rank])

    def set_placement(self, placement: "ExpertPlacement") -> None:
        """Route by a new placement (expert_moves.py), between steps: nothing may be in flight or held. The receive
        buffers stay: their sizes follow the rows routed, not who holds them."""
        if any(self._held.values()):
            raise RuntimeError(f"hetermoe: rank {self.rank} still holds rows for its experts; a placement changes only "
                               "between steps.")
        self.flush()
        self.splits = SplitArithmetic(placement=placement, world=self.world, attention_ranks=self.splits.attention_ranks,
                                      servers=self.splits.servers)

    # ---- attention side -------------------------------------------------------------------------------------
    def _counts_from_attention(self, layer: int, counts_E: torch.Tensor) -> torch.Tensor | None:
        """Counts of this rank's experts from every attention rank (None: no attention rank holds any)."""
        if not self.splits.attention_holds_any(layer):
            return None
        send, send_splits = self.splits.attention_counts(layer, counts_E)
        mine = len(self.splits.local_of[layer][self.rank])
        group = self.groups.attention_counts
        if group is None:
            return send
        num = len(self.splits.attention_ranks)
        recv = torch.empty(mine * num, dtype=torch.int64)
        work = _all_to_all(group, recv, send, [mine] * num, send_splits)
        wait(work, f"the attention-held expert counts of layer {layer}", self.rank)
        return recv

    def dispatch_forward(self, key: ExchangeKey, x_PH: torch.Tensor, counts_E: torch.Tensor, *, keep: bool,
                         autocast: torch.dtype | None, seq_len: int, reuse_buffers: bool = True,
                         ) -> tuple[PendingExchange, ExchangePlan]:
        """Issue one forward exchange of rows sorted by (holder, expert); `wait()` on the result gives y_PH."""
        layer, split = key.layer, self.splits
        send_splits = split.send_splits(layer, counts_E)
        held_counts = self._counts_from_attention(layer, counts_E)
        if held_counts is not None and self.holds(layer):
            plan = split.holder_plan(layer, self.rank, split.attention_ranks, held_counts, send_splits, x_PH.dtype,
                                     self.groups.device)
        else:
            plan = ExchangePlan(send_splits=send_splits, recv_splits=[0] * self.world, recv_local_expert_R=None,
                                row_dtype=x_PH.dtype)
        keep_alive: list[torch.Tensor] = []
        count_work = None
        if split.servers:
            counts, count_splits = split.server_counts(layer, counts_E)
            empty = torch.empty(0, dtype=torch.int64)
            keep_alive += [counts, empty]
            count_work = (_all_to_all(self.groups.counts, empty, counts, [0] * self.world, count_splits),
                          f"the expert-count exchange of layer {layer}")
        pending = self._dispatch(key, "F", x_PH.contiguous(), plan, reuse_buffers,
                                 keep=keep, autocast=autocast, seq_len=seq_len)
        pending.keep_alive += keep_alive
        if count_work is not None:
            pending.works.append(count_work)
        return pending, plan

    def dispatch_backward(self, key: ExchangeKey, plan: ExchangePlan, dy_PH: torch.Tensor, *,
                          reuse_buffers: bool = True) -> PendingExchange:
        """Issue the backward exchange of a forward: output gradients out, input gradients back."""
        return self._dispatch(key, "B", dy_PH.to(plan.row_dtype).contiguous(), plan, reuse_buffers)

    def _dispatch(self, key: ExchangeKey, direction: str, send: torch.Tensor, plan: ExchangePlan, reuse: bool,
                  **held_info: Any) -> PendingExchange:
        """Rows out (dispatch group), the servers' results back (combine group, issued now), and the attention
        holders' part left to `finish_layer`."""
        name = "forward" if direction == "F" else "backward"
        split, layer = self.splits, key.layer
        attention_part = split.attention_holds_any(layer)
        parts = int(bool(split.servers)) + int(attention_part)
        pending = PendingExchange(
            rank=self.rank, send_splits=plan.send_splits, parts=parts,
            out=lambda: self._buffer(key, direction, "out", sum(plan.send_splits), plan.row_dtype, reuse))
        pending.keep_alive.append(send)
        what = f"the dispatch of layer {layer} stripe {key.stripe} ({name})"
        if self.world == 1:
            # One process (colocated): every row is for this rank, already in order; the all-to-all would only
            # copy them.
            rows_in, rows_work = send, (_Done(), what)
        else:
            rows_in = self._buffer(key, direction, "held", sum(plan.recv_splits), plan.row_dtype, reuse)
            rows_work = (_all_to_all(self.groups.dispatch, rows_in, send, plan.recv_splits, plan.send_splits), what)
        if split.servers:
            from_servers = [n if r in split.servers else 0 for r, n in enumerate(plan.send_splits)]
            buffer = self._buffer(key, direction, "servers", sum(from_servers), plan.row_dtype, reuse)
            nothing = send.new_empty((0, send.shape[1]))
            work = _all_to_all(self.groups.combine, buffer, nothing, from_servers, [0] * self.world)
            pending.add_part((work, f"the combine of layer {layer} stripe {key.stripe} ({name})"), buffer,
                             set(split.servers), (nothing,))
        if plan.recv_local_expert_R is None:
            pending.works.append(rows_work)
            rows_work = None
        if attention_part:
            self._held.setdefault(layer, []).append(_HeldRows(
                key=key, direction=direction, plan=plan, rows=rows_in, work=rows_work, pending=pending, reuse=reuse,
                **held_info))
        return pending

    def _buffer(self, key: ExchangeKey, direction: str, use: str, rows: int, dtype: torch.dtype,
                reuse: bool) -> torch.Tensor:
        return self.buffers.get((key.layer, key.stripe, direction, use) if reuse else None, rows, dtype)

    def finish_layer(self, layer: int, shard: "ExpertShard | None") -> None:
        """After the last stripe's exchange of `layer` was issued (forward or backward): compute this rank's
        experts for every stripe (Asym-EA, colocated), then exchange the attention holders' results among the
        attention ranks; every attention rank calls it, holder or not (zebra: after all stripes' attention of
        the layer; synchronous path: right after the dispatch)."""
        attention = self.splits.attention_ranks
        for held in self._held.pop(layer, []):
            plan, key = held.plan, held.key
            if held.work is None:
                result = held.rows  # nothing of this layer held here: empty
            else:
                wait(*held.work, self.rank)
                result = (shard.forward(key, held.rows, plan.recv_local_expert_R, keep=held.keep,
                                        autocast_dtype=held.autocast, seq_len=held.seq_len,
                                        grouping=plan.recv_grouping)
                          if held.direction == "F" else shard.backward(key, held.rows))
            result = result.to(plan.row_dtype).contiguous()
            name = "forward" if held.direction == "F" else "backward"
            what = f"the attention holders' results of layer {layer} stripe {key.stripe} ({name})"
            if self.groups.attention is None:
                # The only attention rank: its results are its own, already in send order; no copy. (The
                # result is a fresh tensor, so it may outlive the step like a fresh receive buffer.)
                held.pending.add_part((_Done(), what), result, set(attention))
                continue
            from_attention = [plan.send_splits[a] for a in attention]
            buffer = self._buffer(key, held.direction, "attention", sum(from_attention), plan.row_dtype, held.reuse)
            work = _all_to_all(self.groups.attention, buffer, result, from_attention,
                               [plan.recv_splits[a] for a in attention])
            held.pending.add_part((work, what), buffer, set(attention), (result,))

    # ---- server side ------------------------------------------------------------------------------------------
    def serve_forward(self, key: ExchangeKey, shard: "ExpertShard", *, keep: bool, autocast: torch.dtype | None,
                      row_dtype: torch.dtype, seq_len: int) -> ExchangePlan:
        """Expert server: receive the counts and rows of one exchange, run the experts, send the results."""
        layer, split = key.layer, self.splits
        start = self.observer.now()
        recv_count_splits = split.server_recv_count_splits(layer, self.rank)
        counts = torch.empty(sum(recv_count_splits), dtype=torch.int64)
        wait(_all_to_all(self.groups.counts, counts, torch.empty(0, dtype=torch.int64), recv_count_splits,
                         [0] * self.world), f"the expert-count exchange of layer {layer}", self.rank)
        plan = split.holder_plan(layer, self.rank, split.attention_ranks, counts, [0] * self.world, row_dtype,
                                 self.groups.device)
        x_RH = self._receive_rows(key, "forward", plan)
        self.observer.exchange_done("D", "F", key, start)
        if plan.recv_local_expert_R is not None:
            y_RH = shard.forward(key, x_RH, plan.recv_local_expert_R, keep=keep, autocast_dtype=autocast,
                                 seq_len=seq_len, grouping=plan.recv_grouping)
        else:
            y_RH = x_RH  # nothing of this layer held here: empty
        self._send_without_waiting(y_RH.to(row_dtype), plan, f"the combine of layer {layer} (forward)")
        return plan

    def serve_backward(self, key: ExchangeKey, plan: ExchangePlan, shard: "ExpertShard") -> None:
        dy_RH = self._receive_rows(key, "backward", plan)
        dx_RH = shard.backward(key, dy_RH) if plan.recv_local_expert_R is not None else dy_RH
        self._send_without_waiting(dx_RH.to(plan.row_dtype), plan, f"the combine of layer {key.layer} (backward)")

    def _receive_rows(self, key: ExchangeKey, name: str, plan: ExchangePlan) -> torch.Tensor:
        rows = self.buffers.get(None, sum(plan.recv_splits), plan.row_dtype)
        empty = rows.new_empty((0, rows.shape[1]))
        wait(_all_to_all(self.groups.dispatch, rows, empty, plan.recv_splits, [0] * self.world),
             f"the dispatch of layer {key.layer} ({name})", self.rank)
        return rows

    def _send_without_waiting(self, send: torch.Tensor, plan: ExchangePlan, what: str) -> None:
        still = []
        for work, name, tensor in self._sends_in_flight:
            if work.is_completed():
                wait(work, name, self.rank)  # surfaces a failed send
            else:
                still.append((work, name, tensor))
        recv = send.new_empty((0, *send.shape[1:]))
        work = _all_to_all(self.groups.combine, recv, send, [0] * self.world, plan.recv_splits)
        self._sends_in_flight = still + [(work, what, send)]

    def flush(self) -> None:
        """Wait for every send still in flight (before the server answers anything else, and before exit)."""
        for work, name, _ in self._sends_in_flight:
            wait(work, name, self.rank)
        self._sends_in_flight.clear()
