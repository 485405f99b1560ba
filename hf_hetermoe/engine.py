"""HeterMoEEngine: the attention-rank side of HeterMoE for one patched model.

It owns the exchanges of every MoE layer (and the rank's own expert shard, if it holds experts), commands the
expert servers (on the leader), and holds the model's other components:
- `state` (ExpertState, expert_state.py): attention-gradient averaging, the global gradient norm and clipping,
  the experts' optimizer, and gathering/scattering expert weights and optimizer state;
- `stats` (PoolStats, stats.py): pool busy fractions and routing balance for the training logs;
- `timeline` and `emulator`: task records and emulated device time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .comm import (
    DTYPE_CODES,
    AsyncAttentionExchanger,
    ExchangeKey,
    ExchangePlan,
    ExpertExchanger,
    PendingExchange,
    ReceiveBuffers,
)
from .config import HeterMoEConfig
from .control import CommandChannel, Op
from .emulation import DeviceEmulator
from .expert_state import ExpertState
from .stats import PoolStats
from .timeline import Timeline

if TYPE_CHECKING:
    from model_patches.base import MoEFamily
    from transformers import PretrainedConfig

    from .expert_shard import ExpertShard
    from .groups import HeterMoEGroups
    from .placement import ExpertPlacement


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
        self.owner_E = {layer: torch.tensor(row, dtype=torch.int64) for layer, row in placement.owner.items()}
        self.first_layer = min(slot_paths)
        self.exchanger = ExpertExchanger(
            groups=groups, placement=placement, shard=shard, hidden_size=model_config.hidden_size
        )
        self.channel = CommandChannel(
            groups.control, rank=groups.rank, leader=groups.leader, servers=self.topology.expert_ranks
        )
        self.session = 0
        groups.generation += 1
        self.generation = groups.generation
        # Expert outputs of the current forward, by layer: a checkpointed layer's recompute reuses them
        # instead of running the experts again.
        self._outputs: dict[int, tuple[torch.Tensor, tuple[ExchangeKey, ExchangePlan]]] = {}
        self.timeline = Timeline(groups.rank)
        self.emulator = (
            DeviceEmulator(config.emulation, rank=groups.rank, model_config=model_config) if config.emulation else None
        )
        if shard is not None:
            shard.timeline = self.timeline
            shard.emulator = self.emulator
        self.seq_len = 1  # tokens per sequence of the current forward (set by the base model's pre-hook)
        self._attention_resumed = {"F": time.perf_counter(), "B": time.perf_counter()}
        self._hook_handles: list[Any] = []
        self.buffers = ReceiveBuffers(model_config.hidden_size, groups.device)
        self.async_exchanger = AsyncAttentionExchanger(self.exchanger, self.buffers) if self.has_servers else None
        self.state = ExpertState(
            groups=groups, placement=placement, shard=shard, family=family, slot_paths=slot_paths,
            command=self.command, channel=self.channel,
        )
        self.stats = PoolStats(
            groups=groups, placement=placement, timeline=self.timeline, holds_experts=shard is not None,
            command=self.command, channel=self.channel,
        )
        self.expert_load = self.stats.expert_load  # the exchanges count routed pairs per expert into it

    # ---- helpers ----------------------------------------------------------------------------------------
    @property
    def has_servers(self) -> bool:
        return bool(self.topology.expert_ranks)

    def command(self, op: Op, **kwargs: Any) -> None:
        """Leader: send a command to every expert server (no-op elsewhere or without servers)."""
        self._check_current()
        if self.groups.is_leader and self.has_servers:
            self.channel.broadcast(op, **kwargs)

    # ---- hooks: sequence length, head timing, attention resume points --------------------------------------
    def install_model_hooks(self, model: torch.nn.Module) -> None:
        base = model.base_model

        def base_pre(module, args, kwargs):
            x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
            if x is None and args:
                x = args[0]
            if x is not None and x.dim() >= 2:
                self.seq_len = int(x.shape[1])
            self._attention_resumed["F"] = time.perf_counter()

        self._hook_handles.append(base.register_forward_pre_hook(base_pre, with_kwargs=True))
        head = model.get_output_embeddings()
        if head is None:
            return
        starts: dict[str, float] = {}

        def head_pre(module, args):
            starts["F"] = time.perf_counter()

        def head_post(module, args, output):
            self._head_done("F", args[0], starts["F"])

        def head_bwd_pre(module, grad_output):
            starts["B"] = time.perf_counter()

        def head_bwd(module, grad_input, grad_output):
            self._head_done("B", grad_output[0], starts["B"])
            self._attention_resumed["B"] = time.perf_counter()

        self._hook_handles += [
            head.register_forward_pre_hook(head_pre), head.register_forward_hook(head_post),
            head.register_full_backward_pre_hook(head_bwd_pre), head.register_full_backward_hook(head_bwd),
        ]

    def _head_done(self, direction: str, x: torch.Tensor, start: float) -> None:
        if self.emulator is not None:
            tokens = x.numel() // x.shape[-1]
            self.emulator.pad(start, self.emulator.head_s(direction, num_tokens=tokens, real_seq_len=self.seq_len))
        self.timeline.record("H", direction, -1, -1, start)

    def remove_model_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def pad_attention(self, direction: str, num_seqs: int, start: float) -> None:
        """Emulation: make the attention work since `start` take its modelled time on this rank's device."""
        if self.emulator is not None:
            self.emulator.pad(start, self.emulator.attention_s(direction, num_seqs=num_seqs, real_seq_len=self.seq_len))

    def _attention_task(self, direction: str, layer: int, num_tokens: int) -> None:
        """Close the attention task that ends at this exchange (synchronous path)."""
        start = self._attention_resumed[direction]
        self.pad_attention(direction, max(num_tokens // max(self.seq_len, 1), 1), start)
        self.timeline.record("A", direction, layer, 0, start)

    # ---- data path ----------------------------------------------------------------------------------------
    @staticmethod
    def forward_context(x_PH: torch.Tensor, num_tokens: int) -> tuple[bool, torch.dtype | None, bool, int]:
        """(keep activations for backward, autocast dtype or None, inside a backward pass, tokens)."""
        device_type = x_PH.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return torch.is_grad_enabled() and x_PH.requires_grad, autocast, _in_backward(), num_tokens

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
        self.expert_load[layer] += counts_E
        self._attention_task("F", layer, num_tokens)
        self.command(
            Op.FORWARD,
            ints=(layer, 0, self.session, int(keep), DTYPE_CODES[autocast], DTYPE_CODES[x_PH.dtype], self.seq_len),
        )
        y_PH, plan = self.exchanger.forward(
            key, x_PH.detach(), counts_E, keep=keep, autocast_dtype=autocast, row_dtype=x_PH.dtype,
            seq_len=self.seq_len,
        )
        self._attention_resumed["F"] = time.perf_counter()
        result = (y_PH, (key, plan, num_tokens))
        if keep:
            self._outputs[layer] = result
        return result

    def backward_exchange(self, handle: tuple, dy_PH: torch.Tensor) -> torch.Tensor:
        key, plan, num_tokens = handle
        self._attention_task("B", key.layer, num_tokens)
        self.command(Op.BACKWARD, ints=(key.layer, key.stripe, key.session))
        self._outputs.pop(key.layer, None)
        dx = self.exchanger.backward(key, plan, dy_PH)
        self._attention_resumed["B"] = time.perf_counter()
        return dx

    # ---- asynchronous exchanges (zebra) -----------------------------------------------------------------------
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
        self, key: ExchangeKey, x_PH: torch.Tensor, counts_E: torch.Tensor, *, keep: bool, autocast: torch.dtype | None
    ) -> tuple[PendingExchange, ExchangePlan]:
        """Send one stripe's rows to the expert servers without waiting; `wait()` on the result gives y_PH."""
        self.expert_load[key.layer] += counts_E
        self.command(
            Op.FORWARD,
            ints=(key.layer, key.stripe, key.session, int(keep), DTYPE_CODES[autocast], DTYPE_CODES[x_PH.dtype],
                  self.seq_len),
        )
        return self.async_exchanger.forward(key, x_PH, counts_E, keep=keep, autocast=autocast, seq_len=self.seq_len)

    def issue_backward(self, key: ExchangeKey, plan: ExchangePlan, dy_PH: torch.Tensor) -> PendingExchange:
        self.command(Op.BACKWARD, ints=(key.layer, key.stripe, key.session))
        return self.async_exchanger.backward(key, plan, dy_PH)

    def holds_layer(self, layer: int) -> bool:
        """Asym-EA: this attention rank holds some experts of `layer`."""
        return self.shard is not None and layer in self.shard.local

    def finish_local_forward(self, layer: int) -> None:
        """Asym-EA: after every stripe's attention of `layer`, run this rank's experts of it (then combine)."""
        if self.holds_layer(layer):
            self.async_exchanger.finish_layer_forward(layer, self.shard)

    def finish_local_backward(self, layer: int) -> None:
        if self.holds_layer(layer):
            self.async_exchanger.finish_layer_backward(layer, self.shard)

    # ---- gradients: ExpertState owns them; zebra's backward starts the per-layer all-reduces ---------------
    def reduce_gradients_async(self, params: list[torch.nn.Parameter]) -> None:
        self.state.reduce_gradients_async(params)

    # ---- lifetime ---------------------------------------------------------------------------------------------
    def stop_servers(self) -> None:
        self.command(Op.STOP)

    def abort_servers(self, reason: str) -> None:
        self.command(Op.ABORT, payload={"reason": reason})

