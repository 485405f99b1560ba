"""The expert-rank loop: hold experts, follow the leader's commands, exit 0 on STOP.

An expert server never runs the user's script. It waits for SETUP (model config, placement, its expert
weights), then serves FORWARD/BACKWARD exchanges, gradient norms, optimizer steps and checkpoint transfers in
the order the leader (global attention rank 0) issues them.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from transformers import AutoConfig

from model_patches import get_family

from .comm import DTYPES, ExchangeKey, ExchangePlan, ExpertExchanger, wait
from .config import HeterMoEConfig
from .control import CommandChannel, Op
from .emulation import DeviceEmulator, EmulationConfig
from .expert_shard import ExpertShard
from .groups import HeterMoEGroups
from .placement import ExpertPlacement
from .timeline import Timeline

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


def _setup_shard(groups: HeterMoEGroups, channel: CommandChannel, setup: dict) -> tuple[ExpertShard, ExpertExchanger]:
    family = get_family(setup["model_type"])
    config_dict = dict(setup["model_config"])
    config_dict.pop("model_type", None)
    model_config = AutoConfig.for_model(setup["model_type"], **config_dict)
    if setup.get("experts_implementation") is not None:
        model_config._experts_implementation = setup["experts_implementation"]
    placement = ExpertPlacement.from_dict(setup["placement"])
    dtype = getattr(torch, setup["dtype"].removeprefix("torch."))
    shard = ExpertShard(
        family=family, model_config=model_config, placement=placement, rank=groups.rank, device=groups.device,
        dtype=dtype, num_replicas=int(setup["num_replicas"]), recompute=bool(setup.get("expert_recompute", False)),
    )
    shard.load_local_weights(channel.recv_tensor_dict(groups.leader))
    emulation = EmulationConfig.from_dict(setup.get("emulation"))
    if emulation is not None:
        shard.emulator = DeviceEmulator(emulation, rank=groups.rank, model_config=model_config)
    exchanger = ExpertExchanger(groups=groups, placement=placement, shard=shard, hidden_size=model_config.hidden_size)
    logger.info("hetermoe: expert rank %d holds %s", groups.rank, {layer: list(e) for layer, e in shard.local.items()})
    return shard, exchanger


def serve(groups: HeterMoEGroups, config: HeterMoEConfig | None = None) -> None:
    """Run the expert server on this rank until the leader sends STOP.

    Each SETUP (one per model the attention ranks patch) replaces the experts held here. `config` is the
    launcher's config (this rank reads the same file); the server takes `check_finite` from it.
    """
    channel = CommandChannel(groups.control, rank=groups.rank, leader=groups.leader, servers=groups.topology.expert_ranks)
    shard: ExpertShard | None = None
    exchanger: ExpertExchanger | None = None
    plans: dict[ExchangeKey, ExchangePlan] = {}
    timeline = Timeline(groups.rank)
    stats_since = time.perf_counter()

    while True:
        cmd = channel.receive()
        op = cmd.op
        if op == Op.STOP:
            if exchanger is not None:
                exchanger.flush()  # results sent without waiting must leave before the process does
            if os.environ.get("HETERMOE_TRACE"):
                timeline.write_chrome_trace(os.environ["HETERMOE_TRACE"])
            return
        _check_not_aborted(cmd, groups.rank, groups.leader)
        if op == Op.SETUP:
            shard, exchanger = _setup_shard(groups, channel, cmd.payload)
            shard.timeline = timeline
            launcher_default = config.check_finite if config is not None else True
            shard.check_finite = bool(cmd.payload.get("check_finite", launcher_default))
            plans.clear()
            continue
        if shard is None:
            raise RuntimeError(f"hetermoe: expert rank {groups.rank} got {op.name} before any model was set up.")
        if op == Op.FORWARD:
            layer, stripe, session, keep, autocast_code, row_code, seq_len = cmd.ints[:7]
            key = ExchangeKey(session=session, layer=layer, stripe=stripe)
            if keep:
                for stale in [k for k in plans if k.session < session]:
                    del plans[stale]
            _, plan = exchanger.forward(
                key, None, None, keep=bool(keep), autocast_dtype=DTYPES[autocast_code], row_dtype=DTYPES[row_code],
                seq_len=seq_len,
            )
            if keep:
                plans[key] = plan
        elif op == Op.BACKWARD:
            layer, stripe, session = cmd.ints[:3]
            key = ExchangeKey(session=session, layer=layer, stripe=stripe)
            if key not in plans:
                raise RuntimeError(f"hetermoe: expert rank {groups.rank} got BACKWARD for unknown forward {key}.")
            exchanger.backward(key, plans.pop(key), None)
        elif op == Op.STATS:
            now = time.perf_counter()
            busy = timeline.busy_time(stats_since, now, kinds=("E",))
            channel.send_tensor_dict(groups.leader, {"stats": torch.tensor([busy, now - stats_since], dtype=torch.float64)})
            stats_since = now
        elif op == Op.OPTIM_SETUP:
            shard.build_optimizer(cmd.payload["class"], cmd.payload["groups"])
        elif op == Op.GRAD_NORM:
            sq = torch.tensor([shard.prepare_grads(cmd.floats[0])], dtype=torch.float64)
            wait(groups.control.allreduce([sq]), "the gradient-norm all-reduce", groups.rank)
        elif op == Op.STEP:
            shard.step(lrs=list(cmd.floats[1:]), clip_coef=cmd.floats[0], skipped=bool(cmd.ints[0]))
        elif op == Op.FETCH_WEIGHTS:
            channel.send_tensor_dict(groups.leader, shard.local_weights())
        elif op == Op.LOAD_WEIGHTS:
            shard.load_local_weights(channel.recv_tensor_dict(groups.leader))
        elif op == Op.FETCH_OPTIM:
            channel.send_tensor_dict(groups.leader, shard.optimizer_state())
        elif op == Op.LOAD_OPTIM:
            shard.load_optimizer_state(channel.recv_tensor_dict(groups.leader))
        else:
            raise RuntimeError(f"hetermoe: expert rank {groups.rank} got unexpected command {op.name}.")


def _check_not_aborted(cmd, rank: int, leader: int) -> None:
    if cmd.op == Op.ABORT:
        reason = (cmd.payload or {}).get("reason", "no reason given")
        raise ServerAborted(f"hetermoe: expert rank {rank} stopped because the attention ranks failed (it was waiting "
                            f"for the next command from the leader, rank {leader}): {reason}")
