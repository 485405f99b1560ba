"""The expert-rank loop: hold experts, follow the leader's commands, exit 0 on STOP.

An expert server never runs the user's script. It waits for SETUP (model config, placement; its expert weights
follow, one tensor dict per layer), then serves FORWARD/BACKWARD exchanges, gradient norms, optimizer steps and
checkpoint transfers in the order the leader (global attention rank 0) issues them.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoConfig

from model_patches import get_family

from . import protocol as cmds
from .config import HeterMoEConfig
from .control import CommandChannel
from .emulation import DeviceEmulator, EmulationConfig
from .expert_shard import ExpertShard
from .grad_norm import combine_squares, to_host
from .groups import HeterMoEGroups
from .instrumentation import Instruments
from .placement import ExpertPlacement
from .precision import GROUPED_MM, check_compute_dtype, device_capability
from .transport import ExchangeKey, ExchangePlan, TokenTransport

logger = logging.getLogger(__name__)


class ServerAborted(RuntimeError):
    """The attention side failed and told the expert servers why."""


def build_setup_payload(
    *, model_config, placement: ExpertPlacement, dtype: torch.dtype, num_replicas: int, expert_recompute: bool = False,
    emulation: EmulationConfig | None = None, check_finite: bool = True,
) -> dict:
    return {
        "model_type": model_config.model_type,
        "model_config": model_config.to_dict(),
        # Not part of to_dict(): which experts kernel (grouped_mm, batched_mm, eager) the stock model uses.
        "experts_implementation": getattr(model_config, "_experts_implementation", None),
        "placement": placement.to_dict(),
        "dtype": str(dtype),
        "num_replicas": num_replicas,
        "expert_recompute": expert_recompute,
        "emulation": emulation.to_dict() if emulation is not None else None,
        "check_finite": check_finite,
    }


class ExpertServer:
    """One expert rank's state: the experts of the current model and their exchanges."""

    def __init__(self, groups: HeterMoEGroups, config: HeterMoEConfig | None = None):
        self.groups = groups
        self.config = config
        self.channel = CommandChannel(groups.control, rank=groups.rank, leader=groups.leader,
                                      servers=groups.topology.expert_ranks)
        self.instruments = Instruments(groups.rank, device=groups.device)
        self.shard: ExpertShard | None = None
        self.transport: TokenTransport | None = None
        self.plans: dict[ExchangeKey, ExchangePlan] = {}  # kept forwards, until their backward
        self.stats_since = time.perf_counter()
        # bf16 needs Ampere or newer (precision.check_compute_dtype); tests inject an older capability on CPU.
        self.capability = device_capability(groups.device)
        self.device_name = (torch.cuda.get_device_name(groups.device) if groups.device.type == "cuda"
                            else str(groups.device))
        self.experts_implementation: str | None = None
        # What a move (expert_moves.py) rebuilds the shard from: the optimizer spec, frozen, the model's setup.
        self.optimizer_spec: dict | None = None
        self.frozen = False
        self.model_config = None

    def setup(self, setup: dict) -> None:
        """A new model: build its experts here (replacing any earlier model's) and receive their weights."""
        groups = self.groups
        family = get_family(setup["model_type"])
        config_dict = dict(setup["model_config"])
        config_dict.pop("model_type", None)
        model_config = AutoConfig.for_model(setup["model_type"], **config_dict)
        if setup.get("experts_implementation") is not None:
            model_config._experts_implementation = setup["experts_implementation"]
        placement = ExpertPlacement.from_dict(setup["placement"])
        dtype = getattr(torch, setup["dtype"].removeprefix("torch."))
        # Refused here, before the weights arrive; the leader's weight send fails when this rank exits, and
        # the launcher reports this message (health.py) on every rank.
        self.check_dtype(dtype, "the model's expert weights dtype")
        self.experts_implementation = setup.get("experts_implementation")
        # Unallocated until its weights arrive: one tensor dict per layer this rank holds experts of, in ascending
        # layer order (ExpertState.send_layer_to_servers), each becoming that layer's storage (one copy, plus one
        # layer's transfer buffer on a GPU).
        shard = ExpertShard(
            family=family, model_config=model_config, placement=placement, rank=groups.rank, device=groups.device,
            dtype=dtype, num_replicas=int(setup["num_replicas"]), recompute=bool(setup.get("expert_recompute", False)),
            allocate=False,
        )
        for layer in sorted(shard.local):
            shard.load_layer_weights(layer, self.channel.recv_tensor_dict(groups.leader))
        shard.check_loaded()
        emulation = EmulationConfig.from_dict(setup.get("emulation"))
        if emulation is not None:
            self.instruments = Instruments(
                groups.rank, DeviceEmulator(emulation, rank=groups.rank, model_config=model_config), device=groups.device)
        shard.observer = self.instruments
        launcher_default = self.config.check_finite if self.config is not None else True
        shard.check_finite = bool(setup.get("check_finite", launcher_default))
        self.shard = shard
        self.model_config = model_config
        self.optimizer_spec = None
        self.transport = TokenTransport(groups=groups, placement=placement, hidden_size=model_config.hidden_size,
                                        observer=self.instruments)
        self.plans.clear()
        logger.info("hetermoe: expert rank %d holds %s", groups.rank, {layer: list(e) for layer, e in shard.local.items()})

    def move(self, cmd: cmds.Move) -> None:
        """Re-place the experts (expert_moves.py): this rank sends and receives its part of the moved experts, in
        the order every rank derives from the two placements, then routes by the new placement. A server that
        gives up every expert keeps an empty shard (it still takes part in every exchange, with no rows)."""
        from .expert_moves import move_shard

        old_shard = self.shard
        new = ExpertPlacement.from_dict(cmd.placement)
        self.transport.flush()
        self.plans.clear()

        def make_shard(placement: ExpertPlacement) -> ExpertShard:
            shard = ExpertShard(family=old_shard.family, model_config=self.model_config, placement=placement,
                                rank=self.groups.rank, device=self.groups.device, dtype=old_shard.dtype,
                                num_replicas=old_shard.num_replicas, recompute=old_shard.recompute, allocate=False)
            shard.observer = self.instruments
            return shard

        self.shard = move_shard(old_shard, old=old_shard.placement, new=new, rank=self.groups.rank,
                                channel=self.channel, make_shard=make_shard, optimizer_spec=self.optimizer_spec,
                                frozen=self.frozen, keep_empty=True)
        self.transport.set_placement(new)
        logger.info("hetermoe: expert rank %d now holds %s", self.groups.rank,
                    {layer: list(e) for layer, e in self.shard.local.items()})

    # ---- one handler per command ------------------------------------------------------------------------------
    def check_dtype(self, dtype: torch.dtype | None, what: str) -> None:
        check_compute_dtype(dtype, rank=self.groups.rank, capability=self.capability, device_name=self.device_name,
                            what=what)

    def check_forward_dtypes(self, cmd: cmds.Forward) -> None:
        """The experts compute in the row dtype (precision.wire_dtype), and under autocast in its dtype too for
        implementations other than grouped_mm (their matmuls are autocast ops). Checked before this rank enters
        the exchange's collectives: the attention ranks waiting in them fail when this rank exits, and every rank
        prints this message (launch.py reports a failed rank through the health keys)."""
        self.check_dtype(cmd.row_dtype, "the expert rows' dtype")
        if self.experts_implementation != GROUPED_MM:
            self.check_dtype(cmd.autocast, "the attention ranks' autocast dtype (mixed precision)")

    def forward(self, cmd: cmds.Forward) -> None:
        self.check_forward_dtypes(cmd)
        key = ExchangeKey(session=cmd.session, layer=cmd.layer, stripe=cmd.stripe)
        if cmd.keep:
            for stale in [k for k in self.plans if k.session < cmd.session]:
                del self.plans[stale]
        plan = self.transport.serve_forward(key, self.shard, keep=cmd.keep, autocast=cmd.autocast,
                                            row_dtype=cmd.row_dtype, seq_len=cmd.seq_len)
        if cmd.keep:
            self.plans[key] = plan

    def backward(self, cmd: cmds.Backward) -> None:
        key = ExchangeKey(session=cmd.session, layer=cmd.layer, stripe=cmd.stripe)
        if key not in self.plans:
            raise RuntimeError(f"hetermoe: expert rank {self.groups.rank} got Backward for unknown forward {key}.")
        self.transport.serve_backward(key, self.plans.pop(key), self.shard)

    def stats(self, cmd: cmds.Stats) -> None:
        now = time.perf_counter()
        busy = self.instruments.timeline.busy_time(self.stats_since, now, kinds=("E",))
        self.channel.send_tensor_dict(self.groups.leader,
                                      {"stats": torch.tensor([busy, now - self.stats_since], dtype=torch.float64)})
        self.stats_since = now

    def grad_norm(self, cmd: cmds.GradNorm) -> None:
        host = to_host(self.shard.grad_norm_parts(cmd.unscale))  # one device-to-host copy (grad_norm.py)
        self.shard.end_grad_norm(host)
        combine_squares(host[0] * host[0], self.groups.control, self.groups.rank)

    def handle(self, cmd: cmds.Command) -> None:
        leader = self.groups.leader
        if isinstance(cmd, cmds.Setup):
            self.setup(cmd.config)
            self.shard.freeze(cmd.frozen)
            self.frozen = cmd.frozen
            return
        if self.shard is None:
            raise RuntimeError(f"hetermoe: expert rank {self.groups.rank} got {type(cmd).__name__} before any model "
                               "was set up.")
        if isinstance(cmd, cmds.Forward):
            self.forward(cmd)
        elif isinstance(cmd, cmds.Backward):
            self.backward(cmd)
        elif isinstance(cmd, cmds.Stats):
            self.stats(cmd)
        elif isinstance(cmd, cmds.OptimSetup):
            self.shard.build_optimizer(cmd.spec["class"], cmd.spec["groups"])
            self.optimizer_spec = cmd.spec
        elif isinstance(cmd, cmds.Move):
            self.move(cmd)
        elif isinstance(cmd, cmds.GradNorm):
            self.grad_norm(cmd)
        elif isinstance(cmd, cmds.Step):
            self.shard.step(lrs=list(cmd.lrs), clip_coef=cmd.clip_coef, skipped=cmd.skipped)
        elif isinstance(cmd, cmds.FetchWeights):
            self.channel.send_tensor_dict(leader, self.shard.local_weights())
        elif isinstance(cmd, cmds.LoadWeights):
            self.shard.load_local_weights(self.channel.recv_tensor_dict(leader))
        elif isinstance(cmd, cmds.FetchOptim):
            self.channel.send_tensor_dict(leader, self.shard.optimizer_state())
        elif isinstance(cmd, cmds.LoadOptim):
            self.shard.load_optimizer_state(self.channel.recv_tensor_dict(leader))
        else:
            raise RuntimeError(f"hetermoe: expert rank {self.groups.rank} got unexpected command {cmd!r}.")

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.flush()  # results sent without waiting must leave before the process does
        self.instruments.write_trace_if_asked()


def serve(groups: HeterMoEGroups, config: HeterMoEConfig | None = None) -> None:
    """Run the expert server on this rank until the leader sends Stop.

    Each Setup (one per model the attention ranks patch) replaces the experts held here. `config` is the
    launcher's config (this rank reads the same file); the server takes `check_finite` from it.
    """
    server = ExpertServer(groups, config)
    while True:
        cmd = server.channel.receive()
        if isinstance(cmd, cmds.Stop):
            server.stop()
            return
        _check_not_aborted(cmd, groups.rank, groups.leader)
        server.handle(cmd)


def _check_not_aborted(cmd: cmds.Command, rank: int, leader: int) -> None:
    if isinstance(cmd, cmds.Abort):
        raise ServerAborted(f"hetermoe: expert rank {rank} stopped because the attention ranks failed (it was waiting "
                            f"for the next command from the leader, rank {leader}): {cmd.reason}")
