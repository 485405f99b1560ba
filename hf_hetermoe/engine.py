"""HeterMoEEngine: the attention-rank side of HeterMoE for one patched model.

It owns the exchanges of every MoE layer (and the rank's own expert shard, if it holds experts), commands the
expert servers (on the leader), and holds the model's other components:
- `state` (ExpertState, expert_state.py): attention-gradient averaging, the global gradient norm and clipping,
  the experts' optimizer, and gathering/scattering expert weights and optimizer state;
- `stats` (PoolStats, stats.py): pool busy fractions and routing balance for the training logs;
- `transport` (transport.py): the token exchanges; `instruments` (instrumentation.py): timeline and emulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import protocol as cmds
from .config import HeterMoEConfig
from .control import CommandChannel
from .emulation import DeviceEmulator
from .expert_shard import ExpertShard
from .expert_state import ExpertState
from .groups import HeterMoEGroups
from .instrumentation import Instruments, ModelHooks
from .placement import ExpertPlacement
from .precision import wire_dtype
from .stats import PoolStats
from .transport import ExchangeKey, ExchangePlan, PendingExchange, TokenTransport

if TYPE_CHECKING:
    from model_patches.base import MoEFamily
    from transformers import PretrainedConfig



def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed layer)."""
    return torch._C._current_graph_task_id() != -1


class HeterMoEEngine:
    def __init__(
        self, *, groups: HeterMoEGroups, config: HeterMoEConfig, family: MoEFamily, model_config: PretrainedConfig,
        placement: ExpertPlacement, shard: ExpertShard | None, slot_paths: dict[int, str],
        expert_specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    ):
        self.groups = groups
        self.config = config
        self.family = family
        self.model_config = model_config
        self.placement = placement
        self.shard = shard
        self.slot_paths = slot_paths  # layer -> module path of its experts ("model.layers.0.mlp.experts")
        # Shape and dtype of every layer's fused expert tensors (all layers share them); revert_hetermoe uses them.
        self.expert_specs = expert_specs
        self.topology = groups.topology
        self.num_replicas = self.topology.num_attention
        # Holder of each expert, per layer, on the device that routes tokens (the experts stand-in indexes it).
        self.owner_E = {layer: torch.tensor(row, dtype=torch.int64, device=groups.device)
                        for layer, row in placement.owner.items()}
        self.first_layer = min(slot_paths)
        emulator = (
            DeviceEmulator(config.emulation, rank=groups.rank, model_config=model_config) if config.emulation else None
        )
        self.instruments = Instruments(groups.rank, emulator, device=groups.device)
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
        self._outputs: dict[int, tuple[torch.Tensor, tuple[ExchangeKey, ExchangePlan, int, torch.dtype]]] = {}
        self.state = ExpertState(
            groups=groups, placement=placement, shard=shard, family=family, slot_paths=slot_paths,
            command=self.command, channel=self.channel,
        )
        self.stats = PoolStats(
            groups=groups, placement=placement, timeline=self.instruments.timeline, holds_experts=shard is not None,
            command=self.command, channel=self.channel,
        )
        self.expert_load = self.stats.expert_load  # the exchanges count routed pairs per expert into it
        # Exchanges of training forwards whose backward has not run yet: experts move only when none are left.
        self._kept: set[ExchangeKey] = set()
        self._kept_session: int | None = None
        self.rebalancer = None  # rebalancer.Rebalancer when the config's `rebalance` is on (apply_hetermoe)

    # ---- re-placement (expert_moves.py) ------------------------------------------------------------------
    def saved_forwards(self) -> bool:
        """True while a forward's activations wait for their backward (on this rank or on the holders)."""
        return bool(self._kept)

    def make_shard(self, placement: ExpertPlacement) -> ExpertShard:
        """An unallocated shard of this rank's experts under `placement` (a move fills it)."""
        dtype = next(iter(self.expert_specs.values()))[1]
        shard = ExpertShard(family=self.family, model_config=self.model_config, placement=placement,
                            rank=self.groups.rank, device=self.groups.device, dtype=dtype,
                            num_replicas=self.num_replicas, allocate=False)
        shard.observer = self.instruments
        shard.check_finite = self.config.check_finite
        return shard

    def set_placement(self, placement: ExpertPlacement, shard: ExpertShard | None) -> None:
        """Switch every component to a new placement and this rank's new shard (after a move)."""
        self.placement = placement
        self.shard = shard
        self.owner_E = {layer: torch.tensor(row, dtype=torch.int64, device=self.groups.device)
                        for layer, row in placement.owner.items()}
        self.transport.set_placement(placement)
        self.state.placement, self.state.shard = placement, shard
        self.state.weights_version += 1  # cached gathers keyed by it are rebuilt (same values, new holders)
        self.stats.placement, self.stats.holds_experts = placement, shard is not None

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
                                           reuse_buffers=False)
        self.finish_layer(layer)
        y_PH = pending.wait()
        self.instruments.exchange_done("D", "F", key, start)
        self.model_hooks.attention_resumed["F"] = self.instruments.now()
        # y_PH is in the wire dtype (precision.wire_dtype): the stand-in applies the routing weights in it.
        result = (y_PH, (key, plan, num_tokens, x_PH.dtype))
        if keep:
            self._outputs[layer] = result
        return result

    def backward_exchange(self, handle: tuple, dy_PH: torch.Tensor) -> torch.Tensor:
        key, plan, num_tokens, x_dtype = handle
        self._attention_task("B", key.layer, num_tokens)
        self._outputs.pop(key.layer, None)
        pending = self.issue_backward(key, plan, dy_PH, reuse_buffers=False)
        self.finish_layer(key.layer)
        dx = pending.wait()
        self.model_hooks.attention_resumed["B"] = self.instruments.now()
        return dx.to(x_dtype)  # the backward of stock's cast to the experts' compute dtype

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
        reuse_buffers: bool = True,
    ) -> tuple[PendingExchange, ExchangePlan]:
        """Send one stripe's rows to the expert holders without waiting; `wait()` on the result gives y_PH.

        Rows travel in the experts' compute dtype (`row_dtype`), and so do y_PH and the gradients of the backward
        exchange; the caller casts input gradients back to x_PH's dtype."""
        self.expert_load[key.layer] += counts_E
        if keep:
            self.stats.window_load[key.layer] += counts_E  # training forwards only: what re-placement balances
            if key.session != self._kept_session:
                self._kept.clear()  # holders drop an older forward's activations when a newer one keeps its own
                self._kept_session = key.session
            self._kept.add(key)
        row_dtype = self.row_dtype(autocast, x_PH.dtype)
        self.command(cmds.Forward(layer=key.layer, stripe=key.stripe, session=key.session, keep=keep,
                                  autocast=autocast, row_dtype=row_dtype, seq_len=self.seq_len))
        return self.transport.dispatch_forward(key, x_PH.to(row_dtype), counts_E, keep=keep, autocast=autocast,
                                               seq_len=self.seq_len, reuse_buffers=reuse_buffers)

    def row_dtype(self, autocast: torch.dtype | None, input_dtype: torch.dtype) -> torch.dtype:
        """Dtype of expert rows on the wire under `autocast` (precision.wire_dtype: exact, and no wider than the
        experts compute in)."""
        weight_dtype = next(iter(self.expert_specs.values()))[1]
        has_bias = any(name.endswith("bias") for name in self.expert_specs)
        implementation = getattr(self.model_config, "_experts_implementation", None)
        return wire_dtype(implementation, weight_dtype, autocast, input_dtype, has_bias=has_bias)

    def issue_backward(self, key: ExchangeKey, plan: ExchangePlan, dy_PH: torch.Tensor, *,
                       reuse_buffers: bool = True) -> PendingExchange:
        self.command(cmds.Backward(layer=key.layer, stripe=key.stripe, session=key.session))
        self._kept.discard(key)
        self.state.grads_pending = True
        return self.transport.dispatch_backward(key, plan, dy_PH, reuse_buffers=reuse_buffers)

    def finish_layer(self, layer: int) -> None:
        """After the last stripe's exchange of `layer` was issued (forward or backward): run the experts held
        here (Asym-EA, colocated) for every stripe and exchange their results among the attention ranks."""
        self.transport.finish_layer(layer, self.shard)

    # ---- gradients: ExpertState owns them; zebra's backward starts the per-layer all-reduces ---------------
    def reduce_gradients_async(self, params: list[torch.nn.Parameter]) -> None:
        self.state.reduce_gradients_async(params)
