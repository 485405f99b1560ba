"""Peak memory of `apply_hetermoe`: one process of a job that patches a few-hundred-MB Mixtral and measures itself.

Each rank resets its peak resident set (`/proc/self/clear_refs`, Linux) just before the setup and reads it back
(`VmHWM`) right after, so the number is what the setup itself adds on top of what was already resident (the
model, torch). Attention ranks patch the model; expert ranks serve until the leader stops them.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); return the current VmRSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def model_config(**overrides: Any):
    from transformers import MixtralConfig

    # ~320 MB in fp32, nearly all of it routed experts (as in real MoE models): 4 layers of 8 experts of
    # 3 x 512 x 1536 weights.
    kwargs = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=1024,
                  max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def setup_memory_job(hetermoe_config: dict, config_overrides: dict | None = None) -> dict:
    """One rank: attention ranks build the model and run `apply_hetermoe`; expert ranks serve its setup."""
    from transformers import MixtralForCausalLM

    from hf_hetermoe import apply_hetermoe
    from hf_hetermoe import protocol
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.control import CommandChannel
    from hf_hetermoe.expert_server import ExpertServer
    from hf_hetermoe.groups import HeterMoEGroups
    from hf_hetermoe.launch import connect_store

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = HeterMoEConfig.from_dict(hetermoe_config)
    topology = config.resolve_topology(world)
    store = connect_store(rank=rank, world_size=world, timeout_s=config.timeout_s)
    groups = HeterMoEGroups.from_store(store, rank=rank, topology=topology, timeout_s=config.timeout_s,
                                       device=torch.device("cpu"))
    if not topology.is_attention(rank):
        server = ExpertServer(groups, config)
        before = _reset_peak()
        setup = server.channel.receive()
        assert isinstance(setup, protocol.Setup), setup
        server.handle(setup)
        peak = _peak()
        held = sum(p.numel() * p.element_size() for p in server.shard.parameters())
        stop = server.channel.receive()
        assert isinstance(stop, protocol.Stop), stop
        return {"role": "expert", "before": before, "peak": peak, "held_bytes": held}

    torch.manual_seed(0)
    model = MixtralForCausalLM(model_config(**(config_overrides or {})))
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    before = _reset_peak()
    engine = apply_hetermoe(model, config, groups)
    peak = _peak()
    after = _status_kib("VmRSS") * 1024
    held = sum(p.numel() * p.element_size() for p in engine.shard.parameters()) if engine.shard else 0
    if groups.is_leader:
        channel = CommandChannel(groups.control, rank=rank, leader=groups.leader, servers=topology.expert_ranks)
        channel.broadcast(protocol.Stop())
        channel.flush()
    return {"role": "attention", "before": before, "peak": peak, "after": after, "model_bytes": model_bytes,
            "held_bytes": held}


def single_process_main() -> None:
    """`python -m tests._setup_memory_jobs`: one colocated process holding every expert; prints its numbers."""
    import json

    from transformers import MixtralForCausalLM

    from hf_hetermoe import HeterMoEConfig, apply_hetermoe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MixtralForCausalLM(model_config())
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    before = _reset_peak()
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    print(json.dumps({"before": before, "peak": _peak(), "model_bytes": model_bytes}))


if __name__ == "__main__":
    single_process_main()
