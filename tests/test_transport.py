"""The token transport on real gloo groups, one thread per rank in this process (no launcher needed).

Each rank's "experts" are a fake shard whose expert e multiplies its rows by (e + 1) in forward and its
gradients by 10 * (e + 1) in backward, so every returned row says which expert it met. Splits are uneven
and include zeros: experts nobody routes to, a rank that routes nothing, a server that holds nothing of a
layer, and experts moved onto an attention rank (Asym-EA), in the synchronous and the zebra order.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from hf_hetermoe.config import Topology
from hf_hetermoe.groups import HeterMoEGroups
from hf_hetermoe.placement import ExpertPlacement
from hf_hetermoe.transport import ExchangeKey, SplitArithmetic, TokenTransport

H = 4


class FakeShard:
    def __init__(self, placement: ExpertPlacement, rank: int):
        self.placement, self.rank = placement, rank
        self.saved: dict[ExchangeKey, torch.Tensor] = {}

    def _factor(self, key: ExchangeKey, local_expert_R: torch.Tensor) -> torch.Tensor:
        experts = torch.tensor(self.placement.local_experts(self.rank, key.layer), dtype=torch.float32)
        return (experts[local_expert_R] + 1).unsqueeze(1) if len(local_expert_R) else torch.zeros(0, 1)

    def forward(self, key, x_RH, local_expert_R, *, keep, autocast_dtype, seq_len=1, grouping=None):
        self.saved[key] = local_expert_R.clone()
        return x_RH * self._factor(key, local_expert_R)

    def backward(self, key, dy_RH):
        return dy_RH * 10 * self._factor(key, self.saved.pop(key))


class RecordingGroup:
    """Delegates to a process group and appends the group's name to `log` at each all-to-all issued."""

    def __init__(self, group, name: str, log: list[str]):
        self.group, self.name, self.log = group, name, log

    def alltoall_base(self, *args):
        self.log.append(self.name)
        return self.group.alltoall_base(*args)

    def __getattr__(self, attr):
        return getattr(self.group, attr)


def _groups(store, rank: int, topology: Topology, log: list[str]) -> HeterMoEGroups:
    groups = HeterMoEGroups.from_store(store, rank=rank, topology=topology, timeout_s=30, device=torch.device("cpu"))
    groups.dispatch = RecordingGroup(groups.dispatch, "D", log)
    groups.combine = RecordingGroup(groups.combine, "C", log)
    if groups.attention is not None:
        groups.attention = RecordingGroup(groups.attention, "A", log)
    return groups


def _routing(rank: int, layer: int, num_experts: int, tokens: int) -> torch.Tensor:
    """Top-1 expert per token; attention rank 0 routes nothing to expert 1, rank 1 routes no tokens on layer 1."""
    if rank == 1 and layer == 1:
        return torch.zeros(0, dtype=torch.int64)
    g = torch.Generator().manual_seed(100 * rank + layer)
    expert = torch.randint(0, num_experts, (tokens,), generator=g)
    if rank == 0:
        expert[expert == 1] = 0
    return expert


def _run_world(topology: Topology, placement: ExpertPlacement, *, stripes: int) -> dict[int, list]:
    store = dist.HashStore()
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    logs: dict[int, list[str]] = {r: [] for r in range(topology.world_size)}

    def attention(rank: int, transport: TokenTransport, shard) -> None:
        out = []
        pendings = []
        for layer in placement.layers:
            for stripe in range(stripes):
                expert_P = _routing(rank, layer, placement.num_experts, tokens=5 + stripe)
                owner_P = torch.tensor(placement.owner[layer])[expert_P]
                perm = torch.argsort(owner_P * placement.num_experts + expert_P, stable=True)
                expert_P = expert_P[perm]
                x = torch.arange(len(expert_P) * H, dtype=torch.float32).reshape(-1, H) + 1
                counts = torch.bincount(expert_P, minlength=placement.num_experts)
                key = ExchangeKey(session=1, layer=layer, stripe=stripe)
                pending, plan = transport.dispatch_forward(key, x, counts, keep=True, autocast=None, seq_len=1)
                pendings.append((key, plan, x, expert_P, pending))
            # zebra order: the rank's own experts (and deferred combines) after all stripes of the layer
            transport.finish_layer(layer, shard)
        ys = [pending.wait().clone() for *_, pending in pendings]
        backs = []
        for key, plan, x, expert_P, _ in pendings:
            backs.append(transport.dispatch_backward(key, plan, torch.ones_like(x)))
            if key.stripe == stripes - 1:
                transport.finish_layer(key.layer, shard)
        for (key, plan, x, expert_P, _), y, back in zip(pendings, ys, backs):
            out.append((x, expert_P, y, back.wait().clone()))
        results[rank] = out

    def server(rank: int, transport: TokenTransport, shard) -> None:
        plans = []
        for layer in placement.layers:
            for stripe in range(stripes):
                key = ExchangeKey(session=1, layer=layer, stripe=stripe)
                plans.append((key, transport.serve_forward(key, shard, keep=True, autocast=None,
                                                           row_dtype=torch.float32, seq_len=1)))
        for key, plan in plans:
            transport.serve_backward(key, plan, shard)
        transport.flush()

    def main(rank: int) -> None:
        try:
            groups = _groups(store, rank, topology, logs[rank])
            transport = TokenTransport(groups=groups, placement=placement, hidden_size=H)
            shard = FakeShard(placement, rank)
            (attention if topology.is_attention(rank) else server)(rank, transport, shard)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(topology.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a rank hung"
    # NCCL safety: every rank issues the operations of the communicators it shares in one and the same order,
    # or serialized kernels of two communicators can wait on each other forever: rows (D) and server results
    # (C) on all ranks, and with them the attention holders' results (A) on attention ranks.
    shared = {r: [op for op in log if op != "A"] for r, log in logs.items()}
    assert all(log == shared[0] for log in shared.values()), logs
    attention_logs = [logs[r] for r in topology.attention_ranks]
    assert all(log == attention_logs[0] for log in attention_logs), logs
    return results


def _check(results: dict[int, list]) -> None:
    for out in results.values():
        for x, expert_P, y, dx in out:
            factor = (expert_P.to(torch.float32) + 1).unsqueeze(1)
            torch.testing.assert_close(y, x * factor, rtol=0, atol=0)
            torch.testing.assert_close(dx, 10 * factor.expand_as(x), rtol=0, atol=0)


DISAGG = Topology(world_size=4, mode="disaggregated", attention_ranks=(0, 1), expert_ranks=(2, 3))


@pytest.mark.parametrize("stripes", [1, 2])
def test_servers_only_uneven_and_zero_splits(stripes):
    # layer 0: experts split 3/1 over the servers; layer 1: server 3 holds nothing.
    placement = ExpertPlacement(num_experts=4, owner={0: (2, 2, 2, 3), 1: (2, 2, 2, 2)})
    _check(_run_world(DISAGG, placement, stripes=stripes))


@pytest.mark.parametrize("stripes", [1, 3])
def test_experts_on_an_attention_rank_asym_ea(stripes):
    # layer 0: attention rank 1 holds experts 0 and 3 (Asym-EA); layer 1: attention rank 0 holds expert 1,
    # which rank 0 never routes to (zero rows from everyone but rank 1).
    placement = ExpertPlacement(num_experts=4, owner={0: (1, 2, 3, 1), 1: (2, 0, 3, 3)})
    _check(_run_world(DISAGG, placement, stripes=stripes))


def test_colocated_two_ranks_without_servers():
    topology = Topology(world_size=2, mode="colocated", attention_ranks=(0, 1), expert_ranks=())
    placement = ExpertPlacement.even(layers=(0, 1), num_experts=4, host_ranks=(0, 1))
    _check(_run_world(topology, placement, stripes=1))


def test_split_arithmetic_counts_what_each_rank_holds():
    placement = ExpertPlacement(num_experts=4, owner={0: (1, 2, 3, 1)})
    split = SplitArithmetic(placement=placement, world=4, attention_ranks=(0, 1), servers=(2, 3))
    counts = torch.tensor([5, 0, 2, 1])
    assert split.send_splits(0, counts) == [0, 6, 0, 2]
    send, splits = split.server_counts(0, counts)
    assert send.tolist() == [0, 2] and splits == [0, 0, 1, 1]
    assert split.server_recv_count_splits(0, 2) == [1, 1, 0, 0]
    assert split.attention_holds_any(0)
    plan = split.holder_plan(0, 1, (0, 1), torch.tensor([[5, 1], [0, 3]]), [0, 6, 0, 2], torch.float32)
    assert plan.recv_splits == [6, 3, 0, 0]
    assert plan.recv_local_expert_R.tolist() == [0] * 5 + [1] + [1] * 3
