"""apply_hetermoe / revert_hetermoe: swap each MoE block's routed experts for remote ones, and back, exactly.

Applying (on every attention rank, in the same order):
1. check the model against the config (supported family, experts divisible over the holders);
2. make the attention replicas identical (broadcast from attention rank 0, as DDP does when it wraps), a bounded
   bucket at a time;
3. layer by layer: take this rank's experts into its expert shard, send every expert server its experts
   (leader), release the layer's full expert tensors and put a `HeterMoEExperts` stand-in in place of
   `mlp.experts` (setup's peak stays near the model's own size);
4. register the state-dict hooks that keep checkpoints complete and stock.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
from torch import nn

from model_patches import get_family

from .block import HeterMoEExperts
from .checkpoint import ExpertStateHooks
from .transport import wait
from .config import HeterMoEConfig
from . import protocol
from .engine import HeterMoEEngine
from .expert_server import build_setup_payload
from .expert_keys import ExpertTensorKey
from .expert_shard import ExpertShard, select_experts
from .groups import HeterMoEGroups
from .asym_ea import auto_placement_counts, check_fits, describe_offloads, model_expert_bytes, placement_for
from .versions import check_versions
from .zebra import ZebraRunner

logger = logging.getLogger(__name__)

_ENGINE_ATTR = "_hetermoe_engine"
_HOOKS_ATTR = "_hetermoe_state_hooks"
_RUNNER_ATTR = "_hetermoe_zebra_runner"


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT's wrappers (PeftModel -> LoraModel -> model), or `model` itself.

    HeterMoE patches, hooks and reverts that model; its MoE blocks, config and `base_model` are the stock ones."""
    import sys

    if "peft" not in sys.modules:  # nothing can be wrapped by PEFT unless it was imported
        return model
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    while True:
        if isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


def get_engine(model: nn.Module) -> HeterMoEEngine | None:
    return unwrap_adapters(model).__dict__.get(_ENGINE_ATTR)


def _refuse_adapters_on_experts(model: nn.Module, slot_paths: list[str]) -> None:
    """PEFT adapters on the routed experts (LoRA's `target_parameters` on fused 3-D expert tensors) would run on the
    attention ranks, where the experts are not: refused before anything is patched."""
    import sys

    if "peft" not in sys.modules:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = sorted({name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
                      and any(path == name or path.startswith(name + ".") for path in slot_paths)})
    if wrapped:
        raise ValueError(
            f"hetermoe: a PEFT adapter wraps the routed experts ({', '.join(wrapped[:3])}"
            f"{', ...' if len(wrapped) > 3 else ''}), e.g. LoRA `target_parameters` on the fused expert tensors; "
            "HeterMoE holds the routed experts on other ranks and cannot train adapters on them. What works: LoRA "
            "on attention and router modules (`target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate']`) "
            "with the experts frozen, or full fine-tuning of the experts without an adapter on them."
        )


def _experts_frozen(model: nn.Module, family, slots) -> bool:
    """True when every routed expert tensor has requires_grad=False (whatever froze them: PEFT's frozen base model,
    or the user); False when all train. Read once, when the model is patched."""
    flags = {getattr(model.get_submodule(slot.path), name).requires_grad
             for slot in slots for name in family.expert_param_names}
    if len(flags) > 1:
        raise ValueError(
            "hetermoe: some routed expert tensors have requires_grad=False and others do not; HeterMoE trains or "
            "freezes all routed experts together. Freeze all of them (e.g. `p.requires_grad_(False)` for every "
            "parameter under `.mlp.experts.`) or none, before the Trainer is built."
        )
    return flags == {False}


def default_groups(config: HeterMoEConfig, device: torch.device | None = None) -> HeterMoEGroups:
    """Groups for a script that was not started by the HeterMoE launcher: colocated over its own world."""
    if config.mode == "disaggregated" and (config.attention_ranks is not None or config.expert_ranks is not None):
        raise ValueError(
            "hetermoe: disaggregated mode (separate expert ranks) needs the HeterMoE launcher: run the script with "
            "`hetermoe launch --config CFG.yaml ...`. Without it, use `mode: colocated`."
        )
    colocated = HeterMoEConfig(mode="colocated", zebra=config.zebra, timeout_s=config.timeout_s)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        device = device or _default_device()
        return HeterMoEGroups.from_default_group(
            topology=colocated.resolve_topology(world), timeout_s=config.timeout_s, device=device
        )
    return HeterMoEGroups.single_process(
        topology=colocated.resolve_topology(1), timeout_s=config.timeout_s, device=device or _default_device()
    )


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Small tensors travel together in buckets of at most this many bytes (fewer collectives); larger ones are
# broadcast in place, one at a time. Either way the broadcast never holds more than one bucket besides the model.
_BROADCAST_BUCKET_BYTES = 16 * 2**20


def _broadcast_from_first_attention_rank(model: nn.Module, groups: HeterMoEGroups) -> None:
    """Make every attention replica equal to attention rank 0's (DDP does this when it wraps a model).

    Every attention rank walks the same parameters and buffers in the same order, so the buckets match."""
    group = groups.attention
    if group is None:
        return
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.timeout = datetime.timedelta(seconds=groups.timeout_s)

    def broadcast(tensor: torch.Tensor) -> None:
        wait(group.broadcast([tensor], opts), "the initial parameter broadcast", groups.rank)

    bucket: list[torch.Tensor] = []
    bucket_bytes = 0

    def flush() -> None:
        nonlocal bucket_bytes
        if bucket:
            flat = torch._utils._flatten_dense_tensors(bucket)
            broadcast(flat)
            for t, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                t.copy_(synced)
        bucket.clear()
        bucket_bytes = 0

    with torch.no_grad():
        for t in [t.data for t in list(model.parameters()) + list(model.buffers())]:
            size = t.numel() * t.element_size()
            if size == 0:
                continue
            if size >= _BROADCAST_BUCKET_BYTES and t.is_contiguous():
                broadcast(t)  # in place: no copy of a large tensor
                continue
            if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device
                           or bucket_bytes + size > _BROADCAST_BUCKET_BYTES):
                flush()
            bucket.append(t)
            bucket_bytes += size
        flush()


def _take_experts(full: torch.Tensor, experts: tuple[int, ...]) -> torch.Tensor:
    """This rank's rows of a model's full expert tensor, to become its shard's storage: the tensor itself when it
    holds every expert (the model's copy is released right after, so nothing is copied), else a copy of the rows
    (a view would keep the whole tensor alive)."""
    if list(experts) == list(range(full.shape[0])):
        return full
    return select_experts(full, experts)


def _refuse_transformers_expert_parallel(model: nn.Module) -> None:
    dist_config = getattr(model.config, "distributed_config", None)
    if getattr(dist_config, "enable_expert_parallel", False) or any(
        getattr(m, "_is_expert_parallel", False) for m in model.modules()
    ):
        raise ValueError(
            "hetermoe: this model uses transformers' own expert parallelism (DistributedConfig("
            "enable_expert_parallel=True)); HeterMoE places the experts itself. Load the model without it."
        )


def apply_hetermoe(model: nn.Module, config: HeterMoEConfig | None = None, groups: HeterMoEGroups | None = None,
                   *, workload: tuple[int, int] | None = None) -> HeterMoEEngine:
    """Patch `model` in place for HeterMoE on this attention rank and return its engine (idempotent).

    Every attention rank must call this, in the same order, with the same model architecture. `workload`
    (sequences per stripe, tokens per sequence) is what `asym_ea: auto` profiles.
    """
    existing = get_engine(model)
    if existing is not None:
        return existing
    # Under PEFT the Trainer holds the PeftModel; the patch, hooks and engine go on the transformers model inside.
    model = unwrap_adapters(model)
    check_versions()
    config = config or HeterMoEConfig(mode="colocated")
    groups = groups or default_groups(config)
    if not groups.is_attention:
        raise ValueError(f"hetermoe: rank {groups.rank} is an expert rank; only attention ranks run the model.")
    family = get_family(getattr(model.config, "model_type", None))
    config.check_model(model.config, groups.topology)
    if config.emulation is not None:
        config.emulation.check_world(groups.world_size)
    _refuse_transformers_expert_parallel(model)

    slots = family.experts_slots(model)
    _refuse_adapters_on_experts(model, [slot.path for slot in slots])
    if not slots:
        raise ValueError(f"hetermoe: found no routed-experts modules ({family.experts_class.__name__}) in the model.")
    if sorted(s.layer for s in slots) != list(family.moe_layers(model.config)):
        raise ValueError(
            f"hetermoe: the model has routed experts in layers {[s.layer for s in slots]} but its config describes "
            f"MoE layers {list(family.moe_layers(model.config))}."
        )
    offloads = None
    if config.asym_ea == "auto" and groups.topology.mode == "disaggregated":
        if workload is None:
            raise ValueError(
                "hetermoe: asym_ea: auto plans from one stripe's shape, which is unknown here; pass "
                "workload=(sequences per stripe, tokens per sequence) to apply_hetermoe, or use the Trainer callback."
            )
        offloads = auto_placement_counts(model, family, config, groups, num_seqs=workload[0], seq_len=workload[1])
    placement = placement_for(
        config, layers=family.moe_layers(model.config), num_experts=family.num_experts(model.config),
        topology=groups.topology, offloads=offloads, device_names=groups.device_names, model_config=model.config,
    )
    frozen = _experts_frozen(model, family, slots)
    first = model.get_submodule(slots[0].path)
    dtype = getattr(first, family.expert_param_names[0]).dtype
    bytes_per_expert = sum(getattr(first, n)[0].numel() * getattr(first, n).element_size()
                           for n in family.expert_param_names)
    # Every layer's fused expert tensors share one shape; revert_hetermoe allocates from it.
    expert_specs = {name: (tuple(getattr(first, name).shape), getattr(first, name).dtype)
                    for name in family.expert_param_names}
    # Before anything waits on another rank; the model's expert tensors are released below, so they count as free.
    check_fits(placement, rank=groups.rank, bytes_per_expert=bytes_per_expert, device=groups.device,
               released_bytes=model_expert_bytes(model, family, groups.device))
    _broadcast_from_first_attention_rank(model, groups)

    shard = None
    if placement.holds_any(groups.rank):
        # Unallocated until each layer's slices arrive below: the shard is built from the model's tensors as
        # they are released, never beside a full copy.
        shard = ExpertShard(
            family=family, model_config=model.config, placement=placement, rank=groups.rank, device=groups.device,
            dtype=dtype, num_replicas=groups.topology.num_attention, allocate=False,
        )
        shard.check_finite = config.check_finite
        shard.freeze(frozen)

    engine = HeterMoEEngine(
        groups=groups, config=config, family=family, model_config=model.config, placement=placement, shard=shard,
        slot_paths={slot.layer: slot.path for slot in slots}, expert_specs=expert_specs,
    )
    send_to_servers = groups.is_leader and engine.has_servers
    if send_to_servers:
        payload = build_setup_payload(
            model_config=model.config, placement=placement, dtype=dtype, num_replicas=groups.topology.num_attention,
            expert_recompute=config.zebra.expert_recompute, emulation=config.emulation,
            check_finite=config.check_finite,
        )
        engine.command(protocol.Setup(config=payload, frozen=frozen))
    engine.state.frozen = frozen

    # Layer by layer, in ascending order (the order the servers receive in): send each server its experts (views,
    # no copy here), then tensor by tensor take this rank's experts and release the full tensor, so setup needs
    # at most one fused tensor's local slice beyond the model itself.
    for slot in sorted(slots, key=lambda s: s.layer):
        original = model.get_submodule(slot.path)
        tensors = {name: getattr(original, name).detach() for name in family.expert_param_names}
        if send_to_servers:
            engine.state.send_layer_to_servers(slot.layer, tensors)
        mine = {}
        for name in family.expert_param_names:
            full = tensors.pop(name)
            if shard is not None and slot.layer in shard.local:
                mine[ExpertTensorKey.weight(slot.layer, name).encode()] = _take_experts(full, shard.local[slot.layer])
            del full
            # Release the model's copy (freed here unless the shard took it whole): the experts live on their
            # holders now.
            param = getattr(original, name)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        if mine:
            shard.load_layer_weights(slot.layer, mine)
        del mine
        parent_path, _, attr = slot.path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, HeterMoEExperts(
            engine=engine, layer=slot.layer, num_experts=placement.num_experts, original=original
        ))
    if shard is not None:
        shard.check_loaded()
    model.__dict__[_ENGINE_ATTR] = engine
    model.__dict__[_HOOKS_ATTR] = ExpertStateHooks(model, engine.state)
    if config.rebalance.enabled:
        from .rebalancer import Rebalancer

        engine.rebalancer = Rebalancer(engine, config.rebalance)
    engine.install_model_hooks(model)
    stripes = config.zebra.stripes(groups.topology.mode)
    if stripes > 1 and not engine.has_servers:
        raise ValueError(
            f"hetermoe: zebra.microbatches={stripes} needs expert ranks (disaggregated mode); use microbatches 1 here."
        )
    if engine.has_servers:
        # With expert servers, training always runs the zebra runner; R = 1 is the DistEP schedule.
        runner = ZebraRunner(base_model=model.base_model, engine=engine, microbatches=stripes,
                             moe_layers=placement.layers)
        runner.install()
        model.__dict__[_RUNNER_ATTR] = runner
    logger.info("hetermoe: %s; experts:\n%s", groups.topology.describe(), placement.describe())
    if groups.is_leader and groups.topology.mode == "disaggregated":
        logger.info("hetermoe: Asym-EA: %s", describe_offloads(placement, groups.topology))
    return engine


def state_hooks(model: nn.Module) -> ExpertStateHooks:
    return unwrap_adapters(model).__dict__[_HOOKS_ATTR]


def gather_expert_weights(model: nn.Module) -> dict | None:
    """Collective over attention ranks: full expert tensors on attention rank 0 (None elsewhere)."""
    return get_engine(model).state.gather_expert_weights(collective=True)


def move_experts(model: nn.Module, placement) -> list:
    """Collective over the attention ranks, at an optimizer-step boundary: re-place the routed experts of a
    HeterMoE-patched model to `placement` (an `ExpertPlacement`, or its `to_dict()`), moving weights and optimizer
    state holder to holder (expert_moves.py). Every attention rank passes the same placement. Returns the
    transfers made (`expert_moves.Transfer`: layer, source rank, destination rank, experts).

    Refused with a ValueError (on every attention rank, before anything moves) mid-accumulation (expert gradients
    not yet stepped), with activations saved for a backward, or for a placement that does not fit the model."""
    from .expert_moves import apply_move
    from .placement import ExpertPlacement

    engine = get_engine(model)
    if engine is None:
        raise ValueError("hetermoe: move_experts needs a model patched with HeterMoE (apply_hetermoe, the Trainer "
                         "callback or hf_hetermoe.prepare).")
    if isinstance(placement, dict):
        placement = ExpertPlacement.from_dict(placement)
    return apply_move(engine, placement)


def revert_hetermoe(model: nn.Module) -> nn.Module:
    """Undo `apply_hetermoe`: put the stock experts modules back, holding the current (trained) weights.

    A collective over the attention ranks: every attention rank calls it and ends with the full model. Returns the
    model it was given (a PEFT wrapper stays a wrapper, so `merge_and_unload()` works on the result).
    """
    wrapper = model
    model = unwrap_adapters(model)
    engine = get_engine(model)
    if engine is None:
        return wrapper
    full = engine.state.gather_expert_weights(collective=True)
    group = engine.groups.attention
    if group is not None:
        # Share the gathered experts with every attention replica.
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for layer in sorted(engine.slot_paths):
            for name, (shape, dtype) in engine.expert_specs.items():
                if full is None or layer not in full or name not in full[layer]:
                    tensor = torch.empty(shape, dtype=dtype, device=engine.groups.device)
                else:
                    tensor = full[layer][name].to(engine.groups.device).contiguous()
                wait(group.broadcast([tensor], opts), "the expert broadcast", engine.groups.rank)
                full = full if full is not None else {}
                full.setdefault(layer, {})[name] = tensor
    for layer, path in engine.slot_paths.items():
        stand_in = model.get_submodule(path)
        original = stand_in._original_experts
        for name in engine.family.expert_param_names:
            getattr(original, name).data = full[layer][name].to(engine.groups.device).clone()
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, original)
    state_hooks(model).remove()
    runner = model.__dict__.pop(_RUNNER_ATTR, None)
    if runner is not None:
        runner.uninstall()
    engine.remove_model_hooks()
    del model.__dict__[_ENGINE_ATTR]
    del model.__dict__[_HOOKS_ATTR]
    return wrapper

