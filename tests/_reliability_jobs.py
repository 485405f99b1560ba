"""Jobs for the worst-case routing, memory and NaN tests (module level, so spawned ranks can import them).

Forced routing: a forward hook on every router adds a large bias to experts 0 and 1, so every token picks
both. With 4 experts over 2 expert servers (experts 0-1 on rank 1, 2-3 on rank 2) the first server receives
every row and the second none at all (empty stripes at every layer).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from transformers import MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tests._jobs import tiny_dataset, tiny_mixtral_config, train

FORCED_BIAS = (20.0, 19.5, 0.0, 0.0)  # softmax weights ~0.62 / 0.38 on experts 0 and 1; the others ~1e-9

# The medium model and batch of the memory run: activations dominate the server's memory (production values:
# hidden 4096, intermediate 14336, 32 layers, 8 experts, 4096 tokens per micro-batch).
MEDIUM = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, max_position_embeddings=128)
MEDIUM_BATCH, MEDIUM_SEQ = 8, 64


def _force_routing(router, args, output):
    """Recompute the stock router's choice (MixtralTopKRouter.forward) from biased logits."""
    logits = output[0] + torch.tensor(FORCED_BIAS, dtype=output[0].dtype, device=output[0].device)
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = torch.topk(probs, router.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), index


def _with_forced_routing(model: MixtralForCausalLM) -> MixtralForCausalLM:
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_force_routing)
    return model


def forced_tiny() -> MixtralForCausalLM:
    return _with_forced_routing(MixtralForCausalLM(tiny_mixtral_config()))


def forced_medium() -> MixtralForCausalLM:
    return _with_forced_routing(MixtralForCausalLM(tiny_mixtral_config(**MEDIUM)))


class InjectNaN(TrainerCallback):
    """At the start of optimizer step `step`, make one expert's down projection NaN (through the model's state
    dict, so under HeterMoE it reaches the expert server that holds it)."""

    def __init__(self, step: int, layer: int, expert: int):
        self.step, self.layer, self.expert = step, layer, expert

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            state_dict = model.state_dict()
            key = f"model.layers.{self.layer}.mlp.experts.down_proj"
            poisoned = state_dict[key].clone()
            poisoned[self.expert] = float("nan")
            state_dict[key] = poisoned
            model.load_state_dict(state_dict)


def train_medium(spec: dict) -> None:
    """Two optimizer steps of the medium model under forced routing (the memory run)."""
    torch.manual_seed(0)
    model = forced_medium()
    args = TrainingArguments(output_dir=spec["output_dir"], per_device_train_batch_size=MEDIUM_BATCH, max_steps=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             logging_steps=1, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=tiny_dataset(num_rows=2 * MEDIUM_BATCH, seq_len=MEDIUM_SEQ)).train()


def _hwm_and_rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as fh:
        status = fh.read()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak resident set size (Linux >= 4.0)
        fh.write("5")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def train_or_serve(launcher_config: dict, runs: list[tuple[str, dict]]) -> dict[str, Any]:
    """One process of a HeterMoE session: attention rank 0 runs `runs` in turn ("tiny" specs go to
    tests._jobs.train, "medium" to train_medium); each expert server returns, per model it served, its peak
    resident memory above what it used when that model arrived, and its NaN/inf reports."""
    from hf_hetermoe import expert_server
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    results: list[Any] = []
    peaks_kib: list[int] = []
    base: list[int] = []
    collect = _Collect()
    logging.getLogger("hf_hetermoe.numerics").addHandler(collect)
    original_setup = expert_server.ExpertServer.setup

    def measured_setup(server, payload):
        if base:  # the previous model's peak, above its baseline
            peaks_kib.append(_hwm_and_rss_kib()[0] - base[-1])
        _reset_peak()
        base.append(_hwm_and_rss_kib()[1])
        return original_setup(server, payload)

    expert_server.ExpertServer.setup = measured_setup

    def attention_main() -> None:
        for kind, spec in runs:
            results.append(train(spec) if kind == "tiny" else train_medium(spec))

    run_rank(HeterMoEConfig.from_dict(launcher_config), attention_main)
    if base:
        peaks_kib.append(_hwm_and_rss_kib()[0] - base[-1])
    return {"results": results, "peak_growth_bytes": [k * 1024 for k in peaks_kib], "reports": collect.messages}
