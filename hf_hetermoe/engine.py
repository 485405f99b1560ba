"""HeterMoEEngine: the attention-rank side of HeterMoE for one patched model.

It owns the exchanges of every MoE layer (and the rank's own expert shard, if it holds experts), commands the
expert servers (on the leader), and does what DDP and the optimizer would otherwise do for the experts:
- attention gradients: averaged over the attention world (DDP semantics) once per optimizer step;
- the gradient norm and clip coefficient over attention and expert parameters of all ranks;
- the expert step, with the Trainer's optimizer class, hyperparameters and current learning rate;
- gathering and scattering full expert tensors and expert optimizer state for checkpoints.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import protocol as cmds
from .config import HeterMoEConfig
from .control import CommandChannel
from .emulation import DeviceEmulator
from .expert_shard import ExpertShard, optimizer_hyperparams
from .groups import HeterMoEGroups
from .instrumentation import Instruments, ModelHooks
from .placement import ExpertPlacement
from .transport import ExchangeKey, ExchangePlan, PendingExchange, TokenTransport, wait

logger = logging.getLogger(__name__)

MAX_EXPERT_GROUPS = 3  # learning rates travel in the Step command's float slots, after the clip coefficient


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed layer)."""
    return torch._C._current_graph_task_id() != -1


class HeterMoEEngine:
    def __init__(
        self, *, groups: HeterMoEGroups, config: HeterMoEConfig, family: Any, model_config: Any,
        placement: ExpertPlacement, shard: ExpertShard | None, slot_paths: dict[int, str],
    ):
        self.groups = groups
        self.config = config
        self.family = family
        self.model_config = model_config
        self.placement = placement
        self.shard = shard
        self.slot_paths = slot_paths  # layer -> module path of its experts ("model.layers.0.mlp.experts")
        self.topology = groups.topology
        self.num_replicas = self.topology.num_attention
        self.owner_E = {layer: torch.tensor(row, dtype=torch.int64) for layer, row in placement.owner.items()}
        self.first_layer = min(slot_paths)
        emulator = (
            DeviceEmulator(config.emulation, rank=groups.rank, model_config=model_config) if config.emulation else None
        )
        self.instruments = Instruments(groups.rank, emulator)
        self.model_hooks = ModelHooks(self.instruments)
        self.transport = TokenTransport(groups=groups, placement=placement, hidden_size=model_config.hidden_size,
                                        observer=self.instruments)
        if shard is not None:
            shard.observer = self.instruments
        self.channel = CommandChannel(
            groups.control, rank=groups.rank, leader=groups.leader, servers=self.topology.expert_ranks
        )
        self.session = 0
        groups.generation += 1
        self.generation = groups.generation
        # Expert outputs of the current forward, by layer: a checkpointed layer's recompute reuses them
        # instead of running the experts again.
        self._outputs: dict[int, tuple[torch.Tensor, tuple[ExchangeKey, ExchangePlan, int]]] = {}
        self._grads_finished = False
        # Per-layer gradient all-reduces issued during the zebra backward: (flat buffer, grads, work).
        self._pending_reduce: list[tuple[torch.Tensor, list[torch.Tensor], Any]] = []
        self._reduced: set[int] = set()
        # Routed (token, k) pairs per expert since the last log, per layer: real routing is not uniform.
        self.expert_load = {layer: torch.zeros(placement.num_experts, dtype=torch.int64) for layer in placement.layers}
        self.clip_coef = 1.0
        self.optimizer_spec: dict | None = None  # what the expert holders' optimizer was built from
        self.weights_version = 0

    # ---- helpers ----------------------------------------------------------------------------------------
    @property
    def has_servers(self) -> bool:
        return bool(self.topology.expert_ranks)

    @property
    def timeline(self):
        return self.instruments.timeline

    @property
    def seq_len(self) -> int:
        """Tokens per sequence of the current forward (set by the base model's pre-hook)."""
        return self.instruments.seq_len

    def command(self, command: cmds.Command) -> None:
        """Leader: send a command to every expert server (no-op elsewhere or without servers)."""
        self._check_current()
        if self.groups.is_leader and self.has_servers:
            self.channel.broadcast(command)

    def install_model_hooks(self, model: torch.nn.Module) -> None:
        self.model_hooks.install(model)

    def remove_model_hooks(self) -> None:
        self.model_hooks.remove()

    # ---- the synchronous path (outside zebra): issue, then wait ----------------------------------------------
    @staticmethod
    def forward_context(x_PH: torch.Tensor, num_tokens: int) -> tuple[bool, torch.dtype | None, bool, int]:
        """(keep activations for backward, autocast dtype or None, inside a backward pass, tokens)."""
        device_type = x_PH.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return torch.is_grad_enabled() and x_PH.requires_grad, autocast, _in_backward(), num_tokens

    def _attention_task(self, direction: str, layer: int, num_tokens: int) -> None:
        """Close the attention task that ends at this exchange (synchronous path)."""
        resumed = self.model_hooks.attention_resumed
        num_seqs = max(num_tokens // max(self.seq_len, 1), 1)
        self.instruments.attention_done(direction, layer, 0, resumed[direction], num_seqs=num_seqs)

    def forward_exchange(self, layer: int, x_PH: torch.Tensor, counts_E: torch.Tensor, context: tuple):
        keep, autocast, recompute, num_tokens = context
        if recompute and layer in self._outputs:
            # Recompute of a checkpointed layer: routing is deterministic, so reuse the experts' outputs.
            y_PH, handle = self._outputs[layer]
            return y_PH.detach(), handle
        if layer == self.first_layer and not recompute:
            self.session += 1
            self._outputs.clear()
        key = ExchangeKey(session=self.session, layer=layer, stripe=0)
        self._attention_task("F", layer, num_tokens)
        start = self.instruments.now()
        # Fresh receive buffers: the results may be kept (checkpoint recompute) past the next forward.
        pending, plan = self.issue_forward(key, x_PH.detach(), counts_E, keep=keep, autocast=autocast,
                                           last_stripe=True, reuse_buffers=False)
        self.finish_layer(layer)
        y_PH = pending.wait()
        self.instruments.exchange_done("D", "F", key, start)
        self.model_hooks.attention_resumed["F"] = self.instruments.now()
        result = (y_PH, (key, plan, num_tokens))
        if keep:
            self._outputs[layer] = result
        return result

    def backward_exchange(self, handle: tuple, dy_PH: torch.Tensor) -> torch.Tensor:
        key, plan, num_tokens = handle
        self._attention_task("B", key.layer, num_tokens)
        self._outputs.pop(key.layer, None)
        pending = self.issue_backward(key, plan, dy_PH, last_stripe=True, reuse_buffers=False)
        self.finish_layer(key.layer)
        dx = pending.wait()
        self.model_hooks.attention_resumed["B"] = self.instruments.now()
        return dx

    # ---- asynchronous exchanges (zebra; the synchronous path waits on them at once) --------------------------
    def begin_session(self) -> int:
        """A new model forward: expert holders drop activations of older forwards when it keeps its own."""
        self._check_current()
        self.session += 1
        self._outputs.clear()
        return self.session

    def _check_current(self) -> None:
        if self.generation != self.groups.generation and self.has_servers:
            raise ValueError(
                "hetermoe: a newer model was patched with HeterMoE on the same expert ranks, so they no longer hold "
                "this model's experts. Use one patched model at a time (revert_hetermoe the old one first to keep it)."
            )

    def issue_forward(
        self, key: ExchangeKey, x_PH: torch.Tensor, counts_E: torch.Tensor, *, keep: bool, autocast: torch.dtype | None,
        last_stripe: bool, reuse_buffers: bool = True,
    ) -> tuple[PendingExchange, ExchangePlan]:
        """Send one stripe's rows to the expert holders without waiting; `wait()` on the result gives y_PH."""
        self.expert_load[key.layer] += counts_E
        self.command(cmds.Forward(layer=key.layer, stripe=key.stripe, session=key.session, keep=keep,
                                  autocast=autocast, row_dtype=x_PH.dtype, seq_len=self.seq_len,
                                  last_stripe=last_stripe))
        return self.transport.dispatch_forward(key, x_PH, counts_E, keep=keep, autocast=autocast,
                                               seq_len=self.seq_len, reuse_buffers=reuse_buffers)

    def issue_backward(self, key: ExchangeKey, plan: ExchangePlan, dy_PH: torch.Tensor, *, last_stripe: bool,
                       reuse_buffers: bool = True) -> PendingExchange:
        self.command(cmds.Backward(layer=key.layer, stripe=key.stripe, session=key.session, last_stripe=last_stripe))
        return self.transport.dispatch_backward(key, plan, dy_PH, reuse_buffers=reuse_buffers)

    def holds_layer(self, layer: int) -> bool:
        """Asym-EA: this attention rank holds some experts of `layer`."""
        return self.shard is not None and layer in self.shard.local

    def finish_layer(self, layer: int) -> None:
        """After the last stripe's exchange of `layer` was issued (forward or backward): run the experts held
        here (Asym-EA, colocated) for every stripe, then issue the combines deferred until now."""
        self.transport.finish_layer(layer, self.shard)

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
        """L2 norm of all gradients: attention (replicated) and experts (held once each, on any rank)."""
        self.finish_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        attn_sq = sum((g.detach().double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64, device=self.groups.device))
        self.command(cmds.GradNorm(unscale=unscale))
        expert_sq = torch.tensor([self.shard.prepare_grads(unscale) if self.shard else 0.0], dtype=torch.float64)
        wait(self.groups.control.allreduce([expert_sq]), "the gradient-norm all-reduce", self.groups.rank)
        total = torch.sqrt(attn_sq.cpu() + expert_sq[0])
        dtype = grads[0].dtype if grads else torch.float32
        return total.to(dtype=dtype, device=self.groups.device)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float, *, unscale: float = 1.0) -> torch.Tensor:
        """Clip like `torch.nn.utils.clip_grad_norm_`, but over the global norm; experts get the same coefficient."""
        total = self.global_grad_norm(params, unscale=unscale)
        if max_norm == float("inf"):
            return total
        coef = max_norm / (float(total) + 1e-6)
        self.clip_coef = min(coef, 1.0)
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
        self.optimizer_groups = indices  # Trainer group index of each expert param group, in order
        self.command(cmds.OptimSetup(spec=spec))
        if self.shard is not None:
            self.shard.build_optimizer(class_path, groups)
        logger.info("hetermoe: experts use %s with groups %s", class_path, groups)

    def step(self, *, lrs: list[float], skipped: bool) -> None:
        """Step the experts with the learning rates the Trainer's optimizer just used, then zero their grads."""
        self.command(cmds.Step(clip_coef=self.clip_coef, lrs=tuple(lrs), skipped=skipped))
        if self.shard is not None:
            self.shard.step(lrs=lrs, clip_coef=self.clip_coef, skipped=skipped)
        self.clip_coef = 1.0
        self._grads_finished = False
        if not skipped:
            self.weights_version += 1

    # ---- expert weights --------------------------------------------------------------------------------------
    def _holders_among_attention(self) -> list[int]:
        return [r for r in self.topology.attention_ranks if self.placement.holds_any(r)]

    def can_gather_alone(self) -> bool:
        """True when the leader alone can assemble every expert (no other attention rank holds any)."""
        return all(r == self.groups.leader for r in self._holders_among_attention())

    def gather_expert_weights(self, *, collective: bool) -> dict[int, dict[str, torch.Tensor]] | None:
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

    def _gather_to_leader(self, op: cmds.Command, local, *, from_attention: bool = True) -> dict[int, dict] | None:
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
        for holder in self.placement.ranks_holding():
            if holder != rank and (from_attention or holder in self.topology.expert_ranks):
                pieces[holder] = self.channel.recv_tensor_dict(holder)
        return pieces

    def send_slices_to_servers(self, full: dict[int, dict[str, torch.Tensor]]) -> None:
        """Leader: send every expert server its experts' slices of full `(E, ...)` tensors."""
        for server in self.topology.expert_ranks:
            index = {layer: torch.tensor(self.placement.local_experts(server, layer)) for layer in full}
            self.channel.send_tensor_dict(server, {
                f"{layer}/{name}": tensor.index_select(0, index[layer])
                for layer, tensors in full.items() if len(index[layer]) for name, tensor in tensors.items()
            })

    def _assemble(self, pieces: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        full: dict[int, dict[str, torch.Tensor]] = {}
        for layer in self.placement.layers:
            for name in self.family.expert_param_names:
                parts = []
                for holder, tensors in pieces.items():
                    experts = self.placement.local_experts(holder, layer)
                    if experts:
                        parts.append((experts, tensors[f"{layer}/{name}"]))
                sample = parts[0][1]
                out = sample.new_empty((self.placement.num_experts, *sample.shape[1:]))
                for experts, tensor in parts:
                    out[list(experts)] = tensor
                full.setdefault(layer, {})[name] = out
        return full

    def load_expert_weights(self, full: dict[int, dict[str, torch.Tensor]]) -> None:
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
        (`<experts path>.<param>#<state>`), on the leader; None elsewhere."""
        pieces = self._gather_to_leader(cmds.FetchOptim(), lambda shard: shard.optimizer_state())
        if pieces is None:
            return None
        out: dict[str, torch.Tensor] = {}
        for holder, tensors in pieces.items():
            for key, value in tensors.items():
                kind, _, rest = key.partition("|")
                layer_s, name, state_key = rest.split("/", 2)
                layer = int(layer_s)
                full_key = f"{self.slot_paths[layer]}.{name}#{state_key}"
                if kind == "S":
                    out.setdefault(full_key, value)
                    continue
                if full_key not in out:
                    out[full_key] = value.new_zeros((self.placement.num_experts, *value.shape[1:]))
                out[full_key][list(self.placement.local_experts(holder, layer))] = value
        return out

    def load_optimizer_state(self, full: dict[str, torch.Tensor]) -> None:
        """Every attention rank calls this with the same full state; each holder gets its slice."""
        by_layer_key: dict[tuple[int, str, str], torch.Tensor] = {}
        path_to_layer = {path: layer for layer, path in self.slot_paths.items()}
        for key, value in full.items():
            stem, _, state_key = key.partition("#")
            path, _, name = stem.rpartition(".")
            if path not in path_to_layer:
                raise ValueError(f"hetermoe: expert optimizer state {key!r} does not match any MoE layer of this model.")
            by_layer_key[(path_to_layer[path], name, state_key)] = value

        def slice_for(holder: int) -> dict[str, torch.Tensor]:
            out = {}
            for (layer, name, state_key), value in by_layer_key.items():
                experts = self.placement.local_experts(holder, layer)
                if not experts:
                    continue
                if value.dim() >= 1 and value.shape[0] == self.placement.num_experts:
                    out[f"E|{layer}/{name}/{state_key}"] = value[list(experts)]
                else:
                    out[f"S|{layer}/{name}/{state_key}"] = value
            return out

        if self.groups.is_leader and self.has_servers:
            self.command(cmds.LoadOptim())
            for server in self.topology.expert_ranks:
                self.channel.send_tensor_dict(server, slice_for(server))
        if self.shard is not None:
            self.shard.load_optimizer_state(slice_for(self.groups.rank))

    # ---- statistics -------------------------------------------------------------------------------------------
    def pool_busy(self, since: float) -> dict[str, float]:
        """Busy fractions since `since`: this rank's attention work, and (leader) the expert servers' work."""
        now = time.perf_counter()
        window = max(now - since, 1e-9)
        stats = {"attention_busy": self.timeline.busy_time(since, now, kinds=("A", "H")) / window}
        if self.shard is not None:
            stats["expert_busy_here"] = self.timeline.busy_time(since, now, kinds=("E",)) / window
        stats.update(self._load_stats())
        if self.groups.is_leader and self.has_servers:
            self.command(cmds.Stats())
            busy = total = 0.0
            for server in self.topology.expert_ranks:
                server_busy, server_window = self.channel.recv_tensor_dict(server)["stats"].tolist()
                busy, total = busy + server_busy, total + server_window
            stats["expert_busy"] = busy / max(total, 1e-9)
        return stats

    def _load_stats(self) -> dict[str, float]:
        """This rank's routing since the last call: worst layer's (busiest holder / mean holder) load, and the
        busiest expert's share of its layer. Per-layer, per-rank detail goes to the debug log."""
        worst_rank, worst_expert = 1.0, 0.0
        for layer, load in self.expert_load.items():
            total = int(load.sum())
            if total == 0:
                continue
            per_rank = {}
            for expert, rank in enumerate(self.placement.owner[layer]):
                per_rank[rank] = per_rank.get(rank, 0) + int(load[expert])
            mean = total / len(per_rank)
            worst_rank = max(worst_rank, max(per_rank.values()) / mean)
            worst_expert = max(worst_expert, int(load.max()) / total)
            logger.debug("hetermoe: layer %d routed pairs per expert %s, per rank %s", layer, load.tolist(), per_rank)
            load.zero_()
        return {"load_imbalance": worst_rank, "busiest_expert_share": worst_expert}

    # ---- lifetime ---------------------------------------------------------------------------------------------
    def stop_servers(self) -> None:
        self.command(cmds.Stop())

    def abort_servers(self, reason: str) -> None:
        self.command(cmds.Abort(reason=reason))


def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t)
    return out
