"""Moving experts between holders during training, at an optimizer-step boundary.

Given the current and a new `ExpertPlacement`, every (layer, expert) whose owner changes travels directly from its
old holder to its new holder, point-to-point on the control group (never gathered through the leader), with its
weight rows and its optimizer-state rows (per-expert state such as Adam's `exp_avg`; state shared by all experts
of a tensor, such as Adam's `step`, is equal on every holder and travels once per (layer, source, destination)
for a holder that had none). Every participant computes the same list of transfers from the two placements and
walks it in one global order, (layer, source rank, destination rank), so blocking sends and receives cannot
deadlock: the earliest transfer not yet done always has both of its ranks at it.

Layer by layer (ascending), a rank first sends and receives that layer's rows, then assembles its new experts
of the layer (kept rows from its old module, received rows in expert order) into a fresh stock experts module,
and drops the old module of the layer. Layers whose local experts do not change keep their module (same tensors,
same optimizer state objects). Peak memory beyond the rank's old shard is one layer: the new module of that layer
and its optimizer rows on the device, plus the host copies of that layer's moved rows (control.py moves tensor
dicts through the host on gloo, fine for an event this rare). Afterwards the optimizer is rebuilt from the same
spec (class and param-group hyperparameters) and given the assembled state, so the next step continues exactly
where a stock optimizer would. Frozen experts move weights only.

`hf_hetermoe.move_experts(model, placement)` (patching.py) is the public, collective entry (every attention rank, at a step boundary); the
expert servers take part when the leader sends them `protocol.Move`. docs/architecture.md, "Re-placement during
training", has the protocol and the ordering.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .asym_ea import TRAINING_COPIES
from .expert_keys import ExpertTensorKey
from .expert_shard import ExpertShard, select_experts
from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .control import CommandChannel
    from .engine import HeterMoEEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    """The experts of one layer that go from `src` to `dst`, ascending."""

    layer: int
    src: int
    dst: int
    experts: tuple[int, ...]


def plan_transfers(old: ExpertPlacement, new: ExpertPlacement) -> list[Transfer]:
    """Every (layer, source, destination) group of moved experts, in the global order all ranks walk."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for layer in old.layers:
        for expert, (src, dst) in enumerate(zip(old.owner[layer], new.owner[layer])):
            if src != dst:
                groups.setdefault((layer, src, dst), []).append(expert)
    return [Transfer(layer, src, dst, tuple(experts)) for (layer, src, dst), experts in sorted(groups.items())]


def describe_transfers(transfers: list[Transfer]) -> str:
    """One line per transfer: `layer 1: experts [0, 3] rank 2 -> rank 0`."""
    if not transfers:
        return "no experts move"
    return "; ".join(f"layer {t.layer}: experts {list(t.experts)} rank {t.src} -> rank {t.dst}" for t in transfers)


def check_placement(old: ExpertPlacement, new: ExpertPlacement, *, world_size: int,
                    holder_ranks: tuple[int, ...]) -> None:
    """ValueError unless `new` places the same layers and experts as `old` on ranks that may hold experts."""
    if new.num_experts != old.num_experts or new.layers != old.layers:
        raise ValueError(
            f"hetermoe: the new placement covers layers {list(new.layers)} with {new.num_experts} experts each; the "
            f"model has MoE layers {list(old.layers)} with {old.num_experts} experts. Give an owner for every expert "
            "of every MoE layer (start from `engine.placement.owner`).")
    allowed = set(holder_ranks)
    for layer, row in new.owner.items():
        bad = sorted({r for r in row if r not in allowed})
        if bad:
            raise ValueError(
                f"hetermoe: the new placement gives experts of layer {layer} to rank(s) {bad}, which cannot hold "
                f"experts here (ranks {sorted(allowed)} of a world of {world_size}).")


def placement_digest(placement: ExpertPlacement) -> int:
    """A 52-bit digest of a placement: attention ranks compare theirs before anything moves."""
    text = json.dumps(placement.to_dict(), sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 12


# ---- the holder side: one rank's shard before -> after --------------------------------------------------------
def _state_of(shard: ExpertShard) -> dict[tuple[int, str], dict[str, Any]]:
    """Optimizer state per (layer, tensor name), taken out of the shard's optimizer (which is dropped)."""
    if shard.optimizer is None:
        return {}
    out = {}
    for layer, name, p in shard.named_parameters():
        state = shard.optimizer.state.get(p)
        if state:
            out[(layer, name)] = dict(state)
    return out


def _is_per_expert(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def _outgoing(shard: ExpertShard, states: dict, transfer: Transfer) -> dict[str, torch.Tensor]:
    """Weight rows, per-expert optimizer rows and shared optimizer state of the experts `transfer` sends."""
    local = shard.local[transfer.layer]
    index = [local.index(e) for e in transfer.experts]
    out = {}
    for name in shard.family.expert_param_names:
        p = getattr(shard.modules[transfer.layer], name)
        out[ExpertTensorKey.weight(transfer.layer, name).encode()] = select_experts(p.detach(), index, view_ok=True)
        for state_key, value in states.get((transfer.layer, name), {}).items():
            per_expert = _is_per_expert(value, p.shape[0])
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            key = ExpertTensorKey.optimizer(transfer.layer, name, state_key, per_expert=per_expert).encode()
            out[key] = select_experts(value, index, view_ok=True) if per_expert else value
    return out


def _assemble(rows: int, pieces: list[tuple[list[int], torch.Tensor]], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """A `(rows, ...)` tensor on `device` from (positions, rows) pieces that cover every position once."""
    sample = pieces[0][1]
    out = torch.empty((rows, *sample.shape[1:]), dtype=dtype, device=device)
    for positions, tensor in pieces:
        index = torch.tensor(positions, dtype=torch.int64, device=device)
        out.index_copy_(0, index, tensor.to(device=device, dtype=dtype))
    return out


def move_shard(
    shard: ExpertShard | None, *, old: ExpertPlacement, new: ExpertPlacement, rank: int, channel: CommandChannel,
    make_shard: Callable[[ExpertPlacement], ExpertShard], optimizer_spec: dict | None, frozen: bool,
    keep_empty: bool,
) -> ExpertShard | None:
    """This rank's part of a move: send and receive the moved experts in the global order, and return its shard for
    `new` (None when it holds nothing and `keep_empty` is false; expert servers keep an empty shard).

    `make_shard(placement)` builds an unallocated shard (`ExpertShard(allocate=False)`) for this rank."""
    transfers = plan_transfers(old, new)
    states = _state_of(shard) if shard is not None else {}
    if shard is not None:
        stale = [layer for layer, name, p in shard.named_parameters() if p.grad is not None]
        if stale:
            raise RuntimeError(f"hetermoe: rank {rank} still holds expert gradients of layers {sorted(set(stale))}; "
                               "experts move only at an optimizer-step boundary.")
        shard.optimizer = None  # it refers to the old parameters; rebuilt below from the same spec
    holds_new = new.holds_any(rank)
    target = make_shard(new) if (holds_new or keep_empty) else None
    if target is not None:
        target.freeze(frozen)
    new_states: dict[tuple[int, str], dict[str, Any]] = {}
    for layer in old.layers:
        received: list[tuple[Transfer, dict[str, torch.Tensor]]] = []
        for transfer in (t for t in transfers if t.layer == layer):
            if transfer.src == rank:
                channel.send_tensor_dict(transfer.dst, _outgoing(shard, states, transfer))
            elif transfer.dst == rank:
                received.append((transfer, channel.recv_tensor_dict(transfer.src)))
        mine_old = old.local_experts(rank, layer)
        mine_new = new.local_experts(rank, layer)
        if target is None or not mine_new:
            pass
        elif mine_old == mine_new:
            # Nothing of this layer changes here: the module itself (and its optimizer state) carries over.
            target.modules[layer] = shard.modules[layer]
            for name in shard.family.expert_param_names:
                if (layer, name) in states:
                    new_states[(layer, name)] = states[(layer, name)]
        else:
            _build_layer(target, shard, states, new_states, layer, mine_old, mine_new, received)
        if shard is not None and layer in shard.modules:
            del shard.modules[layer]  # the old layer goes before the next layer's new one is built
            for name in shard.family.expert_param_names:
                states.pop((layer, name), None)
        del received
    if target is None:
        return None
    target.check_loaded()
    if optimizer_spec is not None:
        target.build_optimizer(optimizer_spec["class"], optimizer_spec["groups"])
        if target.optimizer is not None:
            for layer, name, p in target.named_parameters():
                if p.requires_grad and (layer, name) in new_states:
                    target.optimizer.state[p] = new_states[(layer, name)]
    if shard is not None:
        target.observer, target.check_finite, target.finite = shard.observer, shard.check_finite, shard.finite
    return target


def _build_layer(target: ExpertShard, shard: ExpertShard | None, states: dict, new_states: dict, layer: int,
                 mine_old: tuple[int, ...], mine_new: tuple[int, ...],
                 received: list[tuple[Transfer, dict[str, torch.Tensor]]]) -> None:
    """The new module of `layer` on this rank: kept rows from the old module, received rows from the senders, in
    expert order; with the optimizer state assembled the same way."""
    position = {e: i for i, e in enumerate(mine_new)}
    kept = [e for e in mine_new if e in mine_old]
    kept_src = [mine_old.index(e) for e in kept]
    kept_dst = [position[e] for e in kept]
    rows = len(mine_new)
    for name in target.family.expert_param_names:
        weight_pieces: list[tuple[list[int], torch.Tensor]] = []
        state_pieces: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        shared: dict[str, Any] = {}
        if kept:
            old_p = getattr(shard.modules[layer], name)
            weight_pieces.append((kept_dst, select_experts(old_p.detach(), kept_src, view_ok=True)))
            for state_key, value in states.get((layer, name), {}).items():
                if _is_per_expert(value, old_p.shape[0]):
                    state_pieces.setdefault(state_key, []).append((kept_dst, select_experts(value, kept_src,
                                                                                            view_ok=True)))
                else:
                    shared[state_key] = value
        for transfer, tensors in received:
            positions = [position[e] for e in transfer.experts]
            for text, value in tensors.items():
                key = ExpertTensorKey.decode(text)
                if key.name != name:
                    continue
                if key.is_weight:
                    weight_pieces.append((positions, value))
                elif key.per_expert:
                    state_pieces.setdefault(key.state, []).append((positions, value))
                elif key.state not in shared:
                    shared[key.state] = value.clone()
        weight = _assemble(rows, weight_pieces, target.device, target.dtype)
        target._load_tensor(layer, name, weight)
        p = getattr(target.modules[layer], name)
        state: dict[str, Any] = {}
        for state_key, pieces in state_pieces.items():
            dtype = pieces[0][1].dtype
            state[state_key] = _assemble(rows, pieces, p.device, dtype)
        state.update(shared)
        if state:
            new_states[(layer, name)] = state


# ---- the attention side: the public entry -------------------------------------------------------------------
def _refusal(engine: HeterMoEEngine, placement: ExpertPlacement) -> str | None:
    from .asym_ea import check_fits

    per_expert = sum(math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
                     for shape, dtype in engine.expert_specs.values())
    rank = engine.groups.rank
    held_now = sum(len(engine.placement.local_experts(rank, layer)) for layer in engine.placement.layers)
    try:  # this attention rank's new experts must fit beside what it frees (weights, grads, optimizer moments)
        check_fits(placement, rank=rank, bytes_per_expert=per_expert, device=engine.groups.device,
                   released_bytes=held_now * per_expert * TRAINING_COPIES)
    except ValueError as exc:
        return str(exc).removeprefix("hetermoe: ")
    if engine.state.grads_pending:
        return ("a backward ran since the last optimizer step (mid-accumulation): the experts' gradients are "
                "partial. Move experts after `optimizer.step()` (the Trainer callback does so at `on_step_end`)")
    if engine.saved_forwards():
        return ("a forward kept activations for a backward that has not run. Move experts between optimizer steps, "
                "after the backward")
    return None


def apply_move(engine: HeterMoEEngine, placement: ExpertPlacement) -> list[Transfer]:
    """`move_experts` on an engine (every attention rank)."""
    from . import protocol as cmds

    groups = engine.groups
    old = engine.placement
    check_placement(old, placement, world_size=groups.world_size, holder_ranks=tuple(range(groups.world_size)))
    refusal = _refusal(engine, placement)
    # The attention ranks agree before anything moves: the same placement everywhere, and nobody refuses.
    flags = torch.tensor([placement_digest(placement), -placement_digest(placement), int(refusal is not None)],
                         dtype=torch.int64)
    if groups.attention_counts is not None:
        import torch.distributed as dist

        from .transport import wait

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        wait(groups.attention_counts.allreduce([flags], opts), "the expert-move agreement", groups.rank)
    if int(flags[2]):
        raise ValueError(f"hetermoe: experts cannot move now: {refusal or 'another attention rank refused'}.")
    if int(flags[0]) != -int(flags[1]):
        raise ValueError("hetermoe: move_experts was given different placements on different attention ranks; pass "
                         "the same placement everywhere.")
    transfers = plan_transfers(old, placement)
    if not transfers:
        return transfers
    start = time.perf_counter()
    engine.command(cmds.Move(placement=placement.to_dict()))
    shard = move_shard(
        engine.shard, old=old, new=placement, rank=groups.rank, channel=engine.channel,
        make_shard=engine.make_shard, optimizer_spec=engine.state.optimizer_spec, frozen=engine.state.frozen,
        keep_empty=False,
    )
    engine.set_placement(placement, shard)
    if groups.is_leader:
        logger.info("hetermoe: moved experts in %.3f s (this rank's part): %s", time.perf_counter() - start,
                    describe_transfers(transfers))
    return transfers
