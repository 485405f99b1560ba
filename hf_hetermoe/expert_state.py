"""ExpertState: what DDP and the optimizer would do for a HeterMoE model, done across attention and expert ranks.

The attention-rank side of the model's trainable state (one per patched model, `engine.state`):
- attention gradients: averaged over the attention world (DDP semantics) once per optimizer step, layer by layer
  while the backward runs (`reduce_gradients_async`) and the rest at the end (`finish_gradients`);
- the gradient norm and clip coefficient over attention and expert parameters of all ranks;
- the experts' optimizer: built on every holder with the Trainer's optimizer class and hyperparameters, stepped
  with the learning rates the Trainer's optimizer just used;
- gathering and scattering full expert tensors and expert optimizer state (checkpoints, `revert_hetermoe`).

Expert servers are reached through the engine's command call (typed commands of protocol.py) and its command
channel; see docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import protocol as cmds
from .expert_keys import ExpertTensorKey, parse_stock_state_name, stock_state_name
from .expert_shard import optimizer_hyperparams, select_experts
from .grad_norm import clip_coefficient, combine_squares, local_norm, to_host
from .transport import wait

if TYPE_CHECKING:
    from model_patches.base import MoEFamily

    from .control import CommandChannel
    from .expert_shard import ExpertShard
    from .groups import HeterMoEGroups
    from .placement import ExpertPlacement

logger = logging.getLogger(__name__)

# Learning rates travel in the Step command's float slots, after the clip coefficient.
MAX_EXPERT_GROUPS = cmds.NUM_FLOATS - 1

FullExperts = dict[int, dict[str, torch.Tensor]]  # {layer: {fused tensor name: (E, ...) tensor}}


class ExpertState:
    def __init__(
        self, *, groups: HeterMoEGroups, placement: ExpertPlacement, shard: ExpertShard | None, family: MoEFamily,
        slot_paths: dict[int, str], command: Callable[..., None], channel: CommandChannel,
    ):
        self.groups = groups
        self.topology = groups.topology
        self.placement = placement
        self.shard = shard
        self.family = family
        self.slot_paths = slot_paths  # layer -> module path of its experts ("model.layers.0.mlp.experts")
        self.command = command  # the engine's: leader -> every expert server, no-op elsewhere
        self.channel = channel
        self.num_replicas = self.topology.num_attention
        # Gradients
        self._grads_finished = False
        # A backward reached the experts since their last step (mid-accumulation): experts may not move now.
        self.grads_pending = False
        # Per-layer gradient all-reduces issued during the zebra backward: (flat buffer, grads, work).
        self._pending_reduce: list[tuple[torch.Tensor, list[torch.Tensor], Any]] = []
        self._reduced: set[int] = set()
        self.clip_coef = 1.0
        self.last_norm = 0.0  # the step's global gradient norm, on the host (global_grad_norm)
        # fp16: the loss scaler skips this step (a non-finite global norm; precision.scaled_clip_grad_norm).
        self.overflow = False
        # Optimizer
        self.optimizer_spec: dict | None = None  # what the expert holders' optimizer was built from
        self.optimizer_groups: list[int] = []  # Trainer param-group index of each expert param group, in order
        # Bumped whenever the expert weights change (a step or a load): checkpoint caches compare it.
        self.weights_version = 0
        # The routed experts do not train (requires_grad=False when the model was patched; every holder's shard
        # is frozen too): no gradients, no optimizer state, nothing in the global norm.
        self.frozen = False

    @property
    def has_servers(self) -> bool:
        return bool(self.topology.expert_ranks)

    # ---- gradients ----------------------------------------------------------------------------------------
    @staticmethod
    def _sync_step() -> bool:
        from accelerate.state import GradientState

        return GradientState().sync_gradients

    def reduce_gradients_async(self, params: list[torch.nn.Parameter]) -> None:
        """Start averaging these gradients over the attention world now (their backward is complete), if this
        backward ends an optimizer step; `finish_gradients` waits for it."""
        group = self.groups.attention
        if group is None or not self._sync_step():
            return
        todo = [p for p in params if p.grad is not None and id(p) not in self._reduced]
        self._reduced.update(id(p) for p in todo)
        grads = [p.grad for p in todo]
        for same in _by_dtype(grads).values():
            flat = _flatten_dense_tensors(same).div_(self.num_replicas)
            self._pending_reduce.append((flat, same, group.allreduce([flat])))

    def finish_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average attention gradients over the attention world, once per optimizer step (DDP semantics)."""
        if self._grads_finished:
            return
        self._grads_finished = True
        group = self.groups.attention
        if group is None:
            return
        for flat, same, work in self._pending_reduce:
            wait(work, "a per-layer attention-gradient all-reduce", self.groups.rank)
            for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(synced)
        rest = [p.grad for p in params if p.grad is not None and id(p) not in self._reduced]
        self._pending_reduce.clear()
        self._reduced.clear()
        for same in _by_dtype(rest).values():
            flat = _flatten_dense_tensors(same)
            flat.div_(self.num_replicas)
            wait(group.allreduce([flat]), "the attention-gradient all-reduce", self.groups.rank)
            for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(synced)

    def global_grad_norm(self, params: list[torch.nn.Parameter], *, unscale: float = 1.0) -> torch.Tensor:
        """L2 norm of all gradients: attention (replicated) and experts (held once each, on any rank).

        Computed as stock clipping computes it (grad_norm.py): foreach norms in the gradients' dtype on the device,
        the rank's parts to the host in one copy, the experts' squares summed over ranks in one all-reduce."""
        self.finish_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        self.command(cmds.GradNorm(unscale=unscale))
        parts = [local_norm(grads, self.groups.device)]
        if self.shard is not None:
            parts += self.shard.grad_norm_parts(unscale)
        host = to_host(parts)
        if self.shard is not None:
            self.shard.end_grad_norm(host[1:])
        expert_norm = host[1] if self.shard is not None else 0.0
        expert_sq = combine_squares(expert_norm * expert_norm, self.groups.control, self.groups.rank)
        self.last_norm = math.sqrt(host[0] * host[0] + expert_sq)
        dtype = grads[0].dtype if grads else torch.float32
        return torch.full((), self.last_norm, dtype=dtype, device=self.groups.device)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float, *, unscale: float = 1.0,
                       skip_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip like `torch.nn.utils.clip_grad_norm_`, but over the global norm; experts get the same coefficient.

        `skip_if_nonfinite`: a non-finite norm clips nothing (the step will be skipped: fp16 loss scaling, see
        precision.scaled_clip_grad_norm); otherwise it clips by max_norm / inf = 0, as torch does."""
        total = self.global_grad_norm(params, unscale=unscale)
        if max_norm == float("inf"):
            return total
        if skip_if_nonfinite and not math.isfinite(self.last_norm):
            self.clip_coef = 1.0
            return total
        self.clip_coef = clip_coefficient(max_norm, self.last_norm, total.dtype)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.clip_coef)
        return total

    # ---- optimizer ------------------------------------------------------------------------------------------
    def setup_optimizer(self, optimizer: torch.optim.Optimizer, group_of: dict[str, int]) -> None:
        """Give the expert holders an optimizer of the Trainer's class: each fused expert tensor (by name) gets the
        hyperparameters of the Trainer param group it would be in (`group_of`), e.g. no weight decay for biases."""
        inner = getattr(optimizer, "optimizer", optimizer)  # unwrap AcceleratedOptimizer
        cls = type(inner)
        class_path = f"{cls.__module__}:{cls.__qualname__}"
        indices = sorted(set(group_of.values()))
        if len(indices) > MAX_EXPERT_GROUPS:
            raise ValueError(f"hetermoe: experts can use at most {MAX_EXPERT_GROUPS} optimizer param groups.")
        groups = [
            {"hyperparams": optimizer_hyperparams(inner, i), "params": sorted(n for n, g in group_of.items() if g == i)}
            for i in indices
        ]
        spec = {"class": class_path, "groups": groups}
        if spec == self.optimizer_spec:
            return
        self.optimizer_spec = spec
        self.optimizer_groups = indices
        self.command(cmds.OptimSetup(spec=spec))
        if self.shard is not None:
            self.shard.build_optimizer(class_path, groups)
        logger.info("hetermoe: experts use %s with groups %s", class_path, groups)

    def step(self, *, lrs: list[float], skipped: bool) -> None:
        """Step the experts with the learning rates the Trainer's optimizer just used (one per entry of
        `optimizer_groups`), then zero their grads. A step the loss scaler skipped (`overflow`) is skipped here
        even when `skipped` says otherwise: a fused optimizer (`_step_supports_amp_scaling`, e.g. the Trainer's
        default fused AdamW) is called by the scaler and skips inside, so accelerate's `step_was_skipped` stays
        False."""
        skipped = skipped or self.overflow
        self.overflow = False
        self.command(cmds.Step(clip_coef=self.clip_coef, lrs=tuple(lrs), skipped=skipped))
        if self.shard is not None:
            self.shard.step(lrs=lrs, clip_coef=self.clip_coef, skipped=skipped)
        self.clip_coef = 1.0
        self._grads_finished = False
        self.grads_pending = False
        if not skipped:
            self.weights_version += 1

    # ---- expert weights --------------------------------------------------------------------------------------
    def can_gather_alone(self) -> bool:
        """True when the leader alone can assemble every expert (no other attention rank holds any)."""
        holders = [r for r in self.topology.attention_ranks if self.placement.holds_any(r)]
        return all(r == self.groups.leader for r in holders)

    def gather_expert_weights(self, *, collective: bool) -> FullExperts | None:
        """Full `(E, ...)` expert tensors `{layer: {name: tensor}}` on the leader (None elsewhere).

        `collective=True`: every attention rank calls this (experts held on attention ranks are sent too).
        `collective=False`: only the leader calls it; valid when `can_gather_alone()`.
        """
        if not collective and not self.can_gather_alone():
            raise ValueError(
                "hetermoe: other attention ranks hold experts, so the full expert weights can only be gathered "
                "when every attention rank takes part: call `trainer.save_model()` on all ranks (the Trainer "
                "does this for checkpoints) or `hf_hetermoe.gather_expert_weights(model)` on all ranks first."
            )
        pieces = self._gather_to_leader(cmds.FetchWeights(), lambda shard: shard.local_weights(),
                                        from_attention=collective)
        return self._assemble(pieces) if pieces is not None else None

    def _gather_to_leader(self, op: cmds.Command, local: Callable[[ExpertShard], dict[str, torch.Tensor]], *,
                          from_attention: bool = True) -> dict[int, dict[ExpertTensorKey, torch.Tensor]] | None:
        """Leader: `{holder rank: tensors}` from every expert holder (servers answer `op`; attention holders,
        which make this call too when `from_attention`, send theirs). Elsewhere: send this rank's, return None."""
        rank, leader = self.groups.rank, self.groups.leader
        if rank != leader:
            if self.shard is not None:
                self.channel.send_tensor_dict(leader, local(self.shard))
            return None
        self.command(op)
        pieces: dict[int, dict[str, torch.Tensor]] = {}
        if self.shard is not None:
            pieces[rank] = {k: v.cpu() for k, v in local(self.shard).items()}
        # Every server answers `op`, also one that holds no experts now (a move can empty it: expert_moves.py).
        for holder in sorted(set(self.placement.ranks_holding()) | set(self.topology.expert_ranks)):
            if holder != rank and (from_attention or holder in self.topology.expert_ranks):
                pieces[holder] = self.channel.recv_tensor_dict(holder)
        return {holder: {ExpertTensorKey.decode(k): v for k, v in tensors.items()}
                for holder, tensors in pieces.items()}

    def _assemble(self, pieces: dict[int, dict[ExpertTensorKey, torch.Tensor]]) -> FullExperts:
        full: FullExperts = {}
        for layer in self.placement.layers:
            for name in self.family.expert_param_names:
                key = ExpertTensorKey.weight(layer, name)
                parts = []
                for holder, tensors in pieces.items():
                    experts = self.placement.local_experts(holder, layer)
                    if experts:
                        parts.append((experts, tensors[key]))
                sample = parts[0][1]
                out = sample.new_empty((self.placement.num_experts, *sample.shape[1:]))
                for experts, tensor in parts:
                    _put_experts(out, experts, tensor)
                full.setdefault(layer, {})[name] = out
        return full

    def send_slices_to_servers(self, full: FullExperts) -> None:
        """Leader: send every expert server its experts' slices of full `(E, ...)` tensors, one dict per server
        (what a server's LoadWeights receives)."""
        for server in self.topology.expert_ranks:
            self.channel.send_tensor_dict(server, {
                ExpertTensorKey.weight(layer, name).encode(): select_experts(tensor, experts, view_ok=True)
                for layer, tensors in full.items() if (experts := self.placement.local_experts(server, layer))
                for name, tensor in tensors.items()
            })

    def send_layer_to_servers(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Leader, at setup: send every server that holds experts of `layer` their slices of its full `(E, ...)`
        tensors `{name: tensor}`, one dict per server and layer (what `ExpertServer.setup` receives, layer by
        layer in ascending order). Consecutive experts go as views of the full tensors: on a GPU only the host copy
        control.py makes for sending exists, one server's slices of one layer at a time."""
        for server in self.topology.expert_ranks:
            experts = self.placement.local_experts(server, layer)
            if experts:
                self.channel.send_tensor_dict(server, {
                    ExpertTensorKey.weight(layer, name).encode(): select_experts(tensor, experts, view_ok=True)
                    for name, tensor in tensors.items()
                })

    def load_expert_weights(self, full: FullExperts) -> None:
        """Scatter full expert tensors: the leader sends each server its slice; holders here take theirs."""
        if self.groups.is_leader and self.has_servers:
            self.command(cmds.LoadWeights())
            self.send_slices_to_servers(full)
        if self.shard is not None:
            self.shard.load_local_weights(self.shard.slice_full(full))
        self.weights_version += 1

    # ---- expert optimizer state ------------------------------------------------------------------------------
    def gather_optimizer_state(self) -> dict[str, torch.Tensor] | None:
        """Collective over attention ranks: the experts' optimizer state as full tensors keyed by stock names
        (`stock_state_name`), on the leader; None elsewhere."""
        pieces = self._gather_to_leader(cmds.FetchOptim(), lambda shard: shard.optimizer_state())
        if pieces is None:
            return None
        out: dict[str, torch.Tensor] = {}
        for holder, tensors in pieces.items():
            for key, value in tensors.items():
                full_key = stock_state_name(self.slot_paths[key.layer], key.name, key.state)
                if not key.per_expert:
                    out.setdefault(full_key, value)
                    continue
                if full_key not in out:
                    out[full_key] = value.new_zeros((self.placement.num_experts, *value.shape[1:]))
                _put_experts(out[full_key], self.placement.local_experts(holder, key.layer), value)
        return out

    def load_optimizer_state(self, full: dict[str, torch.Tensor]) -> None:
        """Every attention rank calls this with the same full state; each holder gets its slice."""
        by_key: dict[tuple[int, str, str], torch.Tensor] = {}
        path_to_layer = {path: layer for layer, path in self.slot_paths.items()}
        for text, value in full.items():
            path, name, state = parse_stock_state_name(text)
            if path not in path_to_layer:
                raise ValueError(
                    f"hetermoe: expert optimizer state {text!r} does not match any MoE layer of this model."
                )
            by_key[(path_to_layer[path], name, state)] = value

        def slice_for(holder: int) -> dict[str, torch.Tensor]:
            out = {}
            for (layer, name, state), value in by_key.items():
                experts = self.placement.local_experts(holder, layer)
                if not experts:
                    continue
                per_expert = value.dim() >= 1 and value.shape[0] == self.placement.num_experts
                key = ExpertTensorKey.optimizer(layer, name, state, per_expert=per_expert)
                out[key.encode()] = select_experts(value, experts) if per_expert else value
            return out

        if self.groups.is_leader and self.has_servers:
            self.command(cmds.LoadOptim())
            for server in self.topology.expert_ranks:
                self.channel.send_tensor_dict(server, slice_for(server))
        if self.shard is not None:
            self.shard.load_optimizer_state(slice_for(self.groups.rank))


def _put_experts(out: torch.Tensor, experts: tuple[int, ...], rows: torch.Tensor) -> None:
    """`out[experts] = rows` for a full `(E, ...)` tensor, with the index on `out`'s device (a CPU index list
    into a CUDA tensor would be copied over synchronously, and index_copy_ refuses a mismatched device)."""
    index = torch.tensor(list(experts), dtype=torch.int64, device=out.device)
    out.index_copy_(0, index, rows.to(device=out.device, dtype=out.dtype))


def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t)
    return out
