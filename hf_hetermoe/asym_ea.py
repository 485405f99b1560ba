"""Asym-EA at run time: where every expert lives, from the config's `asym_ea`.

- `off`: each layer's experts split evenly over the expert servers (or all ranks when colocated);
- `{layer: count}`: at each listed MoE layer, every expert server gives up `count` experts to the attention
  ranks (the planner's convention, `planner.asym_ea.placement_from_offloads`, used here too);
- a path to a placement JSON (`hetermoe_placement.json` from `hetermoe plan`): `{layer: {expert: rank}}`;
- `auto`: profile, then Algorithm 1 (see `auto_offloads`, called by apply_hetermoe with the engine).

Experts moved to an attention rank live in that rank's expert shard, computed after the attention of all
stripes of their layer; each exists on one rank only (nothing replicated).

`placement_for` (the placement a config asks for) lives in asym_ea_placement.py, pure Python, so config.py can
validate with it without importing this module; it is re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .asym_ea_placement import placement_for
from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .config import HeterMoEConfig
    from .topology import Topology

__all__ = ["TRAINING_COPIES", "auto_offloads", "auto_placement_counts", "check_fits", "describe_offloads",
           "family_top_k", "free_bytes", "measure_times", "model_expert_bytes", "placement_for"]

# What one expert parameter costs in memory while training: weight, gradient and two Adam-style moments.
TRAINING_COPIES = 4


def check_fits(placement: ExpertPlacement, *, rank: int, bytes_per_expert: int, device: torch.device,
               released_bytes: int = 0) -> None:
    """ValueError when this rank's experts (weights, grads, optimizer moments) do not fit its memory.

    Called before setup, while the model still holds every expert: `released_bytes` is what setup frees on this
    device (the model's own expert tensors, which the shard replaces), so it counts as free."""
    held = sum(len(placement.local_experts(rank, layer)) for layer in placement.layers)
    need = held * bytes_per_expert * TRAINING_COPIES
    free = free_bytes(device)
    if free is None:  # cannot tell; let the allocator speak
        return
    free += released_bytes
    if need > 0.9 * free:
        raise ValueError(
            f"hetermoe: rank {rank} would hold {held} experts needing about {need / 2**30:.2f} GiB (weights, grads and "
            f"optimizer state) but has {free / 2**30:.2f} GiB free once the model's own expert tensors are released. "
            "Move fewer experts onto it (asym_ea) or use more ranks."
        )


def free_bytes(device: torch.device) -> int | None:
    """Memory this process can still allocate on `device` (None if unknown). On CUDA, blocks the caching
    allocator holds but does not use count as free: this process's next tensors reuse them."""
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def auto_offloads(*, layers: tuple[int, ...], num_experts: int, topology: Topology, t_attn: float,
                  t_exp_on_attention: float, t_exp_on_expert: float, n_max: int | None = None) -> dict[int, int]:
    """Algorithm 1 (the planner's implementation) on measured times; `{layer: count}`."""
    from .planner.asym_ea import gather_and_squeeze

    offloads = gather_and_squeeze(
        num_experts=num_experts, num_layers=len(layers), num_attention=topology.num_attention,
        num_expert=len(topology.expert_ranks), t_attn=t_attn, t_exp_on_attention=t_exp_on_attention,
        t_exp_on_expert=t_exp_on_expert, n_max=n_max,
    )
    return {layer: o for layer, o in zip(layers, offloads) if o}


def describe_offloads(placement: ExpertPlacement, topology: Topology) -> str:
    lines = []
    for layer in placement.layers:
        moved = {a: placement.local_experts(a, layer) for a in topology.attention_ranks}
        moved = {a: e for a, e in moved.items() if e}
        if moved:
            lines.append(f"layer {layer}: " + ", ".join(f"rank {a} <- experts {list(e)}" for a, e in moved.items()))
    return "\n".join(lines) if lines else "no experts moved to attention ranks"



# ---- auto: profile at start-up, then Algorithm 1 -------------------------------------------------------------
def _time(fn, device: torch.device | None = None, repeats: int = 3) -> float:
    """Best wall time of `fn()` over `repeats` runs after a warm-up. CUDA kernels run asynchronously, so the
    device is synchronised before each clock read: the time is the work's, not its launch's."""
    import time

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_times(model: torch.nn.Module, family, *, num_seqs: int, seq_len: int, experts_per_server: int,
                  device: torch.device, num_attention: int = 1) -> tuple[float, float]:
    """(T_A^Attn per layer, T_E^Attn for `experts_per_server` experts) of one stripe, measured here, forward.

    An expert's rows come from every attention rank, hence `num_attention` times one rank's stripe."""
    config = model.config
    hidden = config.hidden_size
    slots = family.experts_slots(model)
    originals = {}

    class _NoExperts(torch.nn.Module):  # attention, router and the rest of the layer, without expert compute
        def forward(self, x, index, weights):
            return torch.zeros_like(x)

    try:
        for slot in slots:
            parent_path, _, attr = slot.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            originals[slot.path] = (parent, attr, getattr(parent, attr))
            setattr(parent, attr, _NoExperts())
        embeds = torch.randn(num_seqs, seq_len, hidden, device=device, dtype=model.dtype)
        with torch.no_grad():
            t_layers = _time(lambda: model.base_model(inputs_embeds=embeds), device)
    finally:
        for parent, attr, module in originals.values():
            setattr(parent, attr, module)
    experts = family.make_local_experts(config, experts_per_server).to(device=device, dtype=model.dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rows = num_attention * num_seqs * seq_len * family_top_k(config) * experts_per_server // family.num_experts(config)
    x = torch.randn(max(rows, 1), hidden, device=device, dtype=model.dtype)
    index = torch.arange(x.shape[0], device=device).remainder(experts_per_server).unsqueeze(1)
    weight = torch.ones(index.shape, device=device)
    with torch.no_grad():
        t_experts = _time(lambda: experts(x, index, weight), device)
    return t_layers / len(slots), t_experts


def family_top_k(config) -> int:
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 1


def auto_placement_counts(model: torch.nn.Module, family, config: HeterMoEConfig, groups, *,
                          num_seqs: int, seq_len: int) -> dict[int, int]:
    """Leader: profile one stripe (or read the emulated devices' times), run Algorithm 1 with the memory bound of
    this attention rank, and share the result with every attention rank (all must place experts alike)."""
    import logging

    topology = groups.topology
    layers = family.moe_layers(model.config)
    num_experts = family.num_experts(model.config)
    per_server = num_experts // len(topology.expert_ranks)
    counts = torch.zeros(len(layers), dtype=torch.int64)
    if groups.is_leader:
        if config.emulation is not None:
            from .emulation import DeviceEmulator

            mine = DeviceEmulator(config.emulation, rank=groups.rank, model_config=model.config)
            server = DeviceEmulator(config.emulation, rank=topology.expert_ranks[0], model_config=model.config)
            rows = [topology.num_attention * num_seqs * seq_len * family_top_k(model.config) // num_experts] * per_server
            t_attn = mine.attention_s("F", num_seqs=num_seqs, real_seq_len=seq_len)
            t_e_attn = mine.experts_s("F", rows_per_expert=rows, real_seq_len=seq_len)
            t_e_exp = server.experts_s("F", rows_per_expert=rows, real_seq_len=seq_len)
            source = f"emulated {mine.device_name} / {server.device_name}"
        else:
            # Expert ranks here run the same kind of device as this one (CPU runs, or a homogeneous check);
            # measured profiles of other devices come through `hetermoe plan --profile`.
            # Random probe inputs must not move the training's random stream.
            with torch.random.fork_rng(devices=[groups.device] if groups.device.type == "cuda" else []):
                t_attn, t_e_attn = measure_times(model, family, num_seqs=num_seqs, seq_len=seq_len,
                                                 experts_per_server=per_server, device=groups.device,
                                                 num_attention=topology.num_attention)
            t_e_exp = t_e_attn
            source = f"measured on {groups.device}"
        first = model.get_submodule(family.experts_slots(model)[0].path)
        free = free_bytes(groups.device)
        if free is not None:  # the model's own expert tensors are released at setup
            free += model_expert_bytes(model, family, groups.device)
        per_expert = sum(getattr(first, n)[0].numel() * getattr(first, n).element_size()
                         for n in family.expert_param_names) * TRAINING_COPIES
        n_max = None if free is None else int(0.5 * free // per_expert) * topology.num_attention // len(topology.expert_ranks)
        offloads = auto_offloads(layers=layers, num_experts=num_experts, topology=topology, t_attn=t_attn,
                                 t_exp_on_attention=t_e_attn, t_exp_on_expert=t_e_exp, n_max=n_max)
        counts = torch.tensor([offloads.get(layer, 0) for layer in layers], dtype=torch.int64)
        logging.getLogger(__name__).warning(
            "hetermoe: asym_ea auto (%s): T_A^Attn %.3g s, T_E^Attn %.3g s, T_E^Exp %.3g s per stripe of %d x %d tokens "
            "-> experts moved per expert rank by layer %s", source, t_attn, t_e_attn, t_e_exp, num_seqs, seq_len,
            counts.tolist())
    if groups.attention is not None:
        import torch.distributed as dist

        from .transport import wait

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        buf = counts.to(groups.device)
        wait(groups.attention.broadcast([buf], opts), "the asym_ea auto plan broadcast", groups.rank)
        counts = buf.cpu()
    return {layer: int(c) for layer, c in zip(layers, counts.tolist()) if c}


def model_expert_bytes(model: torch.nn.Module, family, device: torch.device) -> int:
    """Bytes of the model's routed-expert tensors on `device`'s kind of device (what setup releases there)."""
    total = 0
    for slot in family.experts_slots(model):
        module = model.get_submodule(slot.path)
        for name in family.expert_param_names:
            t = getattr(module, name)
            if t.device.type == device.type:
                total += t.numel() * t.element_size()
    return total
