"""One layer's token exchange between attention ranks and expert holders (dispatch -> experts -> combine).

Every rank of the world takes part in every exchange, so every collective is entered in the same order
everywhere: attention ranks send rows and get results back, expert holders receive rows and return results,
and a rank that is both (colocated mode) does both in the same all-to-all. Splits are uneven and may be zero.

Legend: P = (token, k) pairs a rank sends (rows sorted by (owner rank, expert)), R = rows a holder receives,
H = hidden size, E = experts per layer.

Forward  : counts all-to-all (dispatch group) -> rows all-to-all (dispatch) -> experts -> rows all-to-all (combine)
Backward : output-grad rows all-to-all (dispatch) -> expert backward -> input-grad rows all-to-all (combine)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import health
from .groups import HeterMoEGroups
from .placement import ExpertPlacement

# Dtypes travel in command headers as small integer codes (None: autocast off).
DTYPE_CODES = {None: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class ExchangeKey:
    session: int
    layer: int
    stripe: int


@dataclass
class ExchangePlan:
    """Row counts of one (layer, stripe) exchange, as seen by this rank."""

    send_splits: list[int]  # rows this rank dispatches to each rank
    recv_splits: list[int]  # rows this rank receives from each rank
    recv_local_expert_R: torch.Tensor | None  # holders: local expert index of each received row
    row_dtype: torch.dtype


def wait(work: Any, what: str, rank: int) -> None:
    """Wait for a collective and name the operation if it fails (dead peer, timeout)."""
    # (issue 6) health.wait marks the wait (so a rank stopped by its launcher can say what it waited for) and,
    # on failure, adds which peers stopped: dead, frozen, silent or failed, with their pids.
    health.wait(work, what, rank)


def alltoall(group: Any, send: torch.Tensor, send_splits: list[int], recv_splits: list[int], what: str, rank: int) -> torch.Tensor:
    """Uneven all-to-all of rows; returns the received rows (a new tensor)."""
    recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
    if group.size() == 1:
        recv.copy_(send)
        return recv
    work = group.alltoall_base(recv, send.contiguous(), recv_splits, send_splits, dist.AllToAllOptions())
    wait(work, what, rank)
    return recv


class ExpertExchanger:
    """Runs the exchanges of this rank: as attention rank (sends rows), as expert holder (computes), or both."""

    def __init__(self, *, groups: HeterMoEGroups, placement: ExpertPlacement, shard: Any | None, hidden_size: int):
        self.groups = groups
        self.placement = placement
        self.shard = shard  # ExpertShard or None
        self.hidden_size = hidden_size
        self.rank = groups.rank
        self.world = groups.world_size
        self.is_attention = groups.is_attention
        self.attention_mask = [groups.topology.is_attention(r) for r in range(self.world)]
        # local_of[layer][rank] = experts of `layer` held by `rank`, in local order
        self.local_of = {
            layer: [placement.local_experts(r, layer) for r in range(self.world)] for layer in placement.layers
        }
        # Expert servers send results without waiting (their buffers stay referenced here until gloo reports the
        # send complete), so they take the next stripe's rows while the previous results are still in flight.
        self._sends_in_flight: list[tuple[Any, str, torch.Tensor]] = []

    # ---- counts -----------------------------------------------------------------------------------------
    def plan(self, layer: int, counts_E: torch.Tensor | None, row_dtype: torch.dtype) -> ExchangePlan:
        """Exchange per-expert row counts so every holder knows what it receives (a collective)."""
        local_of = self.local_of[layer]
        if self.is_attention:
            assert counts_E is not None
            send = torch.cat([counts_E[list(local_of[d])] for d in range(self.world)]).to(torch.int64)
            send_count_splits = [len(local_of[d]) for d in range(self.world)]
        else:
            send = torch.zeros(0, dtype=torch.int64)
            send_count_splits = [0] * self.world
        mine = local_of[self.rank]
        recv_count_splits = [len(mine) if self.attention_mask[s] else 0 for s in range(self.world)]
        what = f"the expert-count exchange of layer {layer}"
        recv = alltoall(self.groups.dispatch, send, send_count_splits, recv_count_splits, what, self.rank)

        if self.is_attention:
            send_splits = [int(counts_E[list(local_of[d])].sum()) for d in range(self.world)]
        else:
            send_splits = [0] * self.world
        recv_splits = [0] * self.world
        local_expert_R = None
        if mine:
            per_src = recv.view(-1, len(mine)) if recv.numel() else recv.view(0, len(mine))
            srcs = [s for s in range(self.world) if self.attention_mask[s]]
            for i, s in enumerate(srcs):
                recv_splits[s] = int(per_src[i].sum())
            ids = torch.arange(len(mine), dtype=torch.int64).repeat(len(srcs))
            local_expert_R = torch.repeat_interleave(ids, per_src.reshape(-1))
        return ExchangePlan(
            send_splits=send_splits, recv_splits=recv_splits, recv_local_expert_R=local_expert_R, row_dtype=row_dtype
        )

    # ---- forward and backward ---------------------------------------------------------------------------
    def _rows(self, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if rows is not None:
            return rows
        return torch.empty(0, self.hidden_size, dtype=dtype, device=self.groups.device)

    def forward(
        self, key: ExchangeKey, x_PH: torch.Tensor | None, counts_E: torch.Tensor | None, *, keep: bool,
        autocast_dtype: torch.dtype | None, row_dtype: torch.dtype, seq_len: int = 1,
    ) -> tuple[torch.Tensor | None, ExchangePlan]:
        timeline = getattr(self.shard, "timeline", None)
        start = time.perf_counter()
        plan = self.plan(key.layer, counts_E, row_dtype)
        x_PH = self._rows(x_PH, row_dtype)
        x_RH = alltoall(self.groups.dispatch, x_PH, plan.send_splits, plan.recv_splits,
                        f"the dispatch of layer {key.layer} (forward)", self.rank)
        if timeline is not None:
            timeline.record("D", "F", key.layer, key.stripe, start)
        if plan.recv_local_expert_R is not None:
            y_RH = self.shard.forward(key, x_RH, plan.recv_local_expert_R, keep=keep, autocast_dtype=autocast_dtype,
                                      seq_len=seq_len)
        else:
            y_RH = x_RH  # nothing held here: empty
        start = time.perf_counter()
        what = f"the combine of layer {key.layer} (forward)"
        if not self.is_attention:
            self._send_without_waiting(y_RH.to(row_dtype), plan, what)
            return None, plan
        y_PH = alltoall(self.groups.combine, y_RH.to(row_dtype), plan.recv_splits, plan.send_splits, what, self.rank)
        if timeline is not None:
            timeline.record("C", "F", key.layer, key.stripe, start)
        return y_PH, plan

    def _send_without_waiting(self, send: torch.Tensor, plan: ExchangePlan, what: str) -> None:
        """Expert server: issue the combine (it only sends) and keep its buffer until complete."""
        still = []
        for work, name, tensor in self._sends_in_flight:
            if work.is_completed():
                wait(work, name, self.rank)  # surfaces a failed send
            else:
                still.append((work, name, tensor))
        recv = send.new_empty((0, *send.shape[1:]))
        work = self.groups.combine.alltoall_base(recv, send.contiguous(), plan.send_splits, plan.recv_splits,
                                                 dist.AllToAllOptions())
        self._sends_in_flight = still + [(work, what, send)]

    def flush(self) -> None:
        """Wait for every send still in flight (before the server answers anything else)."""
        for work, name, _ in self._sends_in_flight:
            wait(work, name, self.rank)
        self._sends_in_flight.clear()

    def backward(self, key: ExchangeKey, plan: ExchangePlan, dy_PH: torch.Tensor | None) -> torch.Tensor | None:
        dy_PH = self._rows(dy_PH, plan.row_dtype)
        dy_RH = alltoall(self.groups.dispatch, dy_PH, plan.send_splits, plan.recv_splits,
                         f"the dispatch of layer {key.layer} (backward)", self.rank)
        if plan.recv_local_expert_R is not None:
            dx_RH = self.shard.backward(key, dy_RH)
        else:
            dx_RH = dy_RH
        what = f"the combine of layer {key.layer} (backward)"
        if not self.is_attention:
            self._send_without_waiting(dx_RH.to(plan.row_dtype), plan, what)
            return None
        return alltoall(self.groups.combine, dx_RH.to(plan.row_dtype), plan.recv_splits, plan.send_splits, what,
                        self.rank)


# ---- asynchronous exchanges (zebra) --------------------------------------------------------------------------
class PendingExchange:
    """Collectives of one (layer, stripe) exchange; `wait()` returns the received rows.

    An attention rank that holds experts of the layer (Asym-EA) issues the combine only after computing its
    experts for every stripe of the layer, so the combine may be attached later (`attach`)."""

    def __init__(self, *, rank: int, result: torch.Tensor | None = None):
        self.rank = rank
        self.result = result
        self.works: list[tuple[Any, str]] = []
        self.keep_alive: list = []  # send buffers must live until their collective completes
        self._ready = threading.Event()

    def attach(self, works: list[tuple[Any, str]], result: torch.Tensor, keep_alive: tuple = ()) -> None:
        self.works += works
        self.result = result
        self.keep_alive += list(keep_alive)
        self._ready.set()

    def wait(self) -> torch.Tensor:
        self._ready.wait()
        for work, what in self.works:
            wait(work, what, self.rank)
        return self.result


class ReceiveBuffers:
    """Receive buffers reused across steps, one per (layer, stripe, use), grown when a step needs more rows."""

    def __init__(self, hidden_size: int, device: torch.device):
        self.hidden_size = hidden_size
        self.device = device
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows or buf.dtype != dtype:
            buf = torch.empty(max(rows, 1), self.hidden_size, dtype=dtype, device=self.device)
            self._buffers[key] = buf
        return buf[:rows]


def _issue(group: Any, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int], send_splits: list[int]):
    return group.alltoall_base(recv, send, recv_splits, send_splits, dist.AllToAllOptions())


@dataclass
class _HeldRows:
    """Rows this attention rank received for its own experts, waiting for the layer's local compute."""

    key: ExchangeKey
    plan: ExchangePlan
    rows: torch.Tensor
    work: Any
    pending: PendingExchange
    keep: bool = False
    autocast: torch.dtype | None = None
    seq_len: int = 1


class AsyncAttentionExchanger:
    """Exchanges of an attention rank, issued without waiting on expert servers.

    The count exchange on the dispatch group carries only the expert servers' counts (attention ranks receive
    none there), so an attention rank never waits for a busy server before issuing. Experts held by attention
    ranks (Asym-EA) get their counts over the attention group instead, among ranks that are in step anyway.
    Rows go to servers and attention holders in one all-to-all; results come back in one all-to-all too.
    """

    def __init__(self, exchanger: ExpertExchanger, buffers: ReceiveBuffers):
        assert exchanger.is_attention
        self.x = exchanger
        self.buffers = buffers
        topology = exchanger.groups.topology
        self.servers = set(topology.expert_ranks)
        self.attention_ranks = topology.attention_ranks
        self._held: dict[int, list[_HeldRows]] = {}  # layer -> rows waiting for local compute, in stripe order

    def holds(self, layer: int) -> bool:
        return bool(self.x.local_of[layer][self.x.rank])

    def _attention_held_counts(self, layer: int, counts_E: torch.Tensor) -> list[torch.Tensor] | None:
        """Per attention source, the counts of this rank's experts (None: no attention rank holds any)."""
        local_of = self.x.local_of[layer]
        if not any(local_of[a] for a in self.attention_ranks):
            return None
        send = torch.cat([counts_E[list(local_of[a])] for a in self.attention_ranks]).to(torch.int64)
        mine = len(local_of[self.x.rank])
        group = self.x.groups.attention
        if group is None:
            return [send]
        device = self.x.groups.device
        recv = torch.empty(mine * len(self.attention_ranks), dtype=torch.int64, device=device)
        work = _issue(group, recv, send.to(device), [mine] * len(self.attention_ranks),
                      [len(local_of[a]) for a in self.attention_ranks])
        wait(work, f"the attention-held expert counts of layer {layer}", self.x.rank)
        return list(recv.cpu().view(len(self.attention_ranks), mine)) if mine else None

    def forward(self, key: ExchangeKey, x_PH: torch.Tensor, counts_E: torch.Tensor, *, keep: bool = False,
                autocast: torch.dtype | None = None, seq_len: int = 1) -> tuple[PendingExchange, ExchangePlan]:
        x, world, rank = self.x, self.x.world, self.x.rank
        local_of = x.local_of[key.layer]
        to_servers = [d for d in range(world) if d in self.servers]
        counts = torch.cat([counts_E[list(local_of[d])] for d in to_servers]).to(torch.int64) if to_servers else \
            torch.zeros(0, dtype=torch.int64)
        count_splits = [len(local_of[d]) if d in self.servers else 0 for d in range(world)]
        send_splits = [int(counts_E[list(local_of[d])].sum()) for d in range(world)]
        held_counts = self._attention_held_counts(key.layer, counts_E)
        recv_splits, local_expert_R = [0] * world, None
        if self.holds(key.layer) and held_counts is not None:
            for src, per_expert in zip(self.attention_ranks, held_counts):
                recv_splits[src] = int(per_expert.sum())
            mine = len(local_of[rank])
            local_expert_R = torch.repeat_interleave(torch.arange(mine).repeat(len(held_counts)),
                                                     torch.cat(held_counts))
        plan = ExchangePlan(send_splits=send_splits, recv_splits=recv_splits, recv_local_expert_R=local_expert_R,
                            row_dtype=x_PH.dtype)
        x_PH = x_PH.contiguous()
        none = [0] * world
        empty_i = torch.empty(0, dtype=torch.int64)
        rows_in = self.buffers.get((key.layer, key.stripe, "held-F"), sum(recv_splits), x_PH.dtype)
        pending = PendingExchange(rank=rank)
        pending.keep_alive += [counts, x_PH, empty_i]
        pending.works += [
            (_issue(x.groups.dispatch, empty_i, counts, none, count_splits), f"the expert-count exchange of layer {key.layer}"),
        ]
        rows_work = _issue(x.groups.dispatch, rows_in, x_PH, recv_splits, send_splits)
        what = f"the dispatch of layer {key.layer} stripe {key.stripe} (forward)"
        if local_expert_R is None:
            pending.works.append((rows_work, what))
            self._issue_combine(pending, key, "F", x_PH.new_empty((0, x_PH.shape[1])), none, send_splits, x_PH.dtype)
        else:
            self._held.setdefault(key.layer, []).append(
                _HeldRows(key=key, plan=plan, rows=rows_in, work=(rows_work, what), pending=pending, keep=keep,
                          autocast=autocast, seq_len=seq_len))
        return pending, plan

    def _issue_combine(self, pending: PendingExchange, key: ExchangeKey, direction: str, send: torch.Tensor,
                       send_splits: list[int], recv_splits: list[int], dtype: torch.dtype) -> None:
        out = self.buffers.get((key.layer, key.stripe, direction), sum(recv_splits), dtype)
        work = _issue(self.x.groups.combine, out, send.contiguous(), recv_splits, send_splits)
        name = "forward" if direction == "F" else "backward"
        pending.attach([(work, f"the combine of layer {key.layer} stripe {key.stripe} ({name})")], out, (send,))

    def finish_layer_forward(self, layer: int, shard: Any) -> None:
        """Asym-EA: this rank's experts of `layer` for every stripe (after all stripes' attention), then combines."""
        for held in self._held.pop(layer, []):
            wait(*held.work, self.x.rank)
            y = shard.forward(held.key, held.rows, held.plan.recv_local_expert_R, keep=held.keep,
                              autocast_dtype=held.autocast, seq_len=held.seq_len)
            self._issue_combine(held.pending, held.key, "F", y.to(held.plan.row_dtype), held.plan.recv_splits,
                                held.plan.send_splits, held.plan.row_dtype)

    def backward(self, key: ExchangeKey, plan: ExchangePlan, dy_PH: torch.Tensor) -> PendingExchange:
        x, world = self.x, self.x.world
        none = [0] * world
        dy_PH = dy_PH.to(plan.row_dtype).contiguous()
        rows_in = self.buffers.get((key.layer, key.stripe, "held-B"), sum(plan.recv_splits), plan.row_dtype)
        pending = PendingExchange(rank=x.rank)
        pending.keep_alive.append(dy_PH)
        rows_work = _issue(x.groups.dispatch, rows_in, dy_PH, plan.recv_splits, plan.send_splits)
        what = f"the dispatch of layer {key.layer} stripe {key.stripe} (backward)"
        if plan.recv_local_expert_R is None:
            pending.works.append((rows_work, what))
            self._issue_combine(pending, key, "B", dy_PH.new_empty((0, dy_PH.shape[1])), none, plan.send_splits,
                                plan.row_dtype)
        else:
            self._held.setdefault(key.layer, []).append(
                _HeldRows(key=key, plan=plan, rows=rows_in, work=(rows_work, what), pending=pending))
        return pending

    def finish_layer_backward(self, layer: int, shard: Any) -> None:
        """Asym-EA: backward of this rank's experts of `layer` for every stripe, then the combines."""
        for held in self._held.pop(layer, []):
            wait(*held.work, self.x.rank)
            dx = shard.backward(held.key, held.rows)
            self._issue_combine(held.pending, held.key, "B", dx.to(held.plan.row_dtype), held.plan.recv_splits,
                                held.plan.send_splits, held.plan.row_dtype)
