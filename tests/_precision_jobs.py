"""Mixed-precision training jobs (bf16 autocast, fp16 with a GradScaler) for tests/test_precision.py.

The stock Trainer runs them, stock or with HeterMoE (colocated in one process, or under the launcher). fp16 on CPU:
accelerate creates a GradScaler and enables autocast only on accelerators (`Accelerator.__init__`: "fp16 ... and
self.device.type != 'cpu'"), so `cpu_fp16_like_a_gpu` does, on CPU, the two things it does there (a
`torch.amp.GradScaler` and `native_amp`); the Trainer, AcceleratedOptimizer and HeterMoE code paths are then the
GPU ones.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from transformers import MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tests._jobs import tiny_dataset, tiny_mixtral_config

INIT_SCALE = 2.0 ** 12
INF_LAYER, INF_EXPERT = 0, 1  # the expert whose gradient overflows


@contextlib.contextmanager
def cpu_fp16_like_a_gpu() -> Iterator[None]:
    """While active, an fp16 Accelerator on CPU gets the GradScaler accelerate gives it on GPUs."""
    from accelerate import Accelerator

    original = Accelerator.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu" and self.scaler is None:
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)

    Accelerator.__init__ = __init__
    try:
        yield
    finally:
        Accelerator.__init__ = original


@contextlib.contextmanager
def inject_inf_in_expert_shards(step: int) -> Iterator[None]:
    """HeterMoE: make the gradient of expert INF_EXPERT of layer INF_LAYER inf (still loss-scaled) on optimizer
    step `step`, on whichever rank holds it, before the step's gradient norm. Only while active: a patch left
    behind would inject the inf into every later test's training in this process."""
    from hf_hetermoe.expert_shard import ExpertShard

    if getattr(ExpertShard.prepare_grads, "_injects_inf", False):  # already active (nested): inject once
        yield
        return
    original = ExpertShard.prepare_grads

    def prepare_grads(self, unscale: float = 1.0) -> float:
        if not self._grads_prepared:
            self._test_steps = getattr(self, "_test_steps", 0) + 1
            experts = self.local.get(INF_LAYER, ())
            if self._test_steps == step and INF_EXPERT in experts:
                p = self.modules[INF_LAYER].gate_up_proj
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad[experts.index(INF_EXPERT), 0, 0] = float("inf")
        return original(self, unscale)

    prepare_grads._injects_inf = True
    ExpertShard.prepare_grads = prepare_grads
    try:
        yield
    finally:
        ExpertShard.prepare_grads = original


def _inject_inf_before_clipping(trainer: Trainer, model: MixtralForCausalLM, step: int, where: str) -> None:
    """The gradient entry made inf after backward, before clipping: the stock expert (stock runs), or an attention
    weight (any run)."""
    original = trainer._clip_grad_norm
    seen = {"steps": 0}

    def clip_grad_norm(model_arg):
        seen["steps"] += 1
        if seen["steps"] == step:
            layer = model.model.layers[INF_LAYER]
            if where == "expert":
                grad = layer.mlp.experts.gate_up_proj.grad[INF_EXPERT]
            else:
                grad = layer.self_attn.q_proj.weight.grad
            grad[0, 0] = float("inf")
        return original(model_arg)

    trainer._clip_grad_norm = clip_grad_norm


class _Record(TrainerCallback):
    """Per optimizer step: the loss scale after it and a copy of every weight (experts gathered from holders)."""

    def __init__(self, model):
        self.model = model
        self.scales: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.trainer: Trainer | None = None

    def on_step_end(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler
        self.scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)
        from hf_hetermoe import get_engine
        from hf_hetermoe.patching import state_hooks

        if get_engine(self.model) is None:
            self.weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
            return
        hooks = state_hooks(self.model)
        hooks.gather_for_save()
        try:
            self.weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        finally:
            hooks.drop_cache()


def train_precision(spec: dict) -> dict | None:
    """spec: output_dir, precision ("bf16" | "fp16"), experts_implementation, colocated (bool), inf_step (fp16:
    the optimizer step whose gradient gets an inf), inf_in ("expert", default, or "attention"), max_steps.
    Returns losses, logs, loss scales and per-step weights on (attention) rank 0."""
    with contextlib.ExitStack() as patches:
        if spec["precision"] == "fp16":
            patches.enter_context(cpu_fp16_like_a_gpu())
        hetermoe = spec.get("colocated") or spec.get("hetermoe")
        if spec.get("inf_step") and hetermoe and spec.get("inf_in") != "attention":
            patches.enter_context(inject_inf_in_expert_shards(spec["inf_step"]))
        return _train_precision(spec)


def _train_precision(spec: dict) -> dict | None:
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(experts_implementation=spec.get("experts_implementation",
                                                                                    "grouped_mm")))
    losses: list[float] = []
    model.register_forward_hook(
        lambda module, args, output: losses.append(output.loss.item()) if module.training else None)
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=spec.get("max_steps", 6), learning_rate=3e-3, warmup_steps=2, lr_scheduler_type="linear",
        weight_decay=0.01, max_grad_norm=0.5, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
        bf16=spec["precision"] == "bf16", fp16=spec["precision"] == "fp16",
    )
    record = _Record(model)
    callbacks: list[TrainerCallback] = [record]
    if spec.get("colocated"):
        from hf_hetermoe import HeterMoECallback, HeterMoEConfig

        callbacks.append(HeterMoECallback(HeterMoEConfig(mode="colocated")))
    hetermoe = spec.get("colocated") or spec.get("hetermoe")
    in_attention = spec.get("inf_in") == "attention"
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=callbacks)
    record.trainer = trainer
    if spec.get("inf_step") and (in_attention or not hetermoe):
        _inject_inf_before_clipping(trainer, model, spec["inf_step"], "attention" if in_attention else "expert")
    trainer.train()
    if not trainer.is_world_process_zero():
        return None
    # numpy, not tensors: a spawned rank's result travels through a multiprocessing queue, where tensors would be
    # shared-memory handles that die with the rank.
    weights = [{k: v.float().numpy() for k, v in step.items()} for step in record.weights]
    return {"losses": losses, "log_history": trainer.state.log_history, "scales": record.scales, "weights": weights}


def train_precision_under_launcher(hetermoe_config: dict, spec: dict) -> dict | None:
    """One process of a HeterMoE job: attention ranks run `train_precision`, expert ranks serve (and inject)."""
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    spec = dict(spec, hetermoe=True)
    result: dict[str, Any] = {}

    def attention_main() -> None:
        result["value"] = train_precision(spec)

    with contextlib.ExitStack() as patches:
        if spec.get("inf_step") and spec.get("inf_in") != "attention":
            patches.enter_context(inject_inf_in_expert_shards(spec["inf_step"]))  # servers hold the expert
        run_rank(HeterMoEConfig.from_dict(hetermoe_config), attention_main)
    return result.get("value")


def output_dir(base, name: str) -> str:
    path = os.path.join(str(base), name)
    os.makedirs(path, exist_ok=True)
    return path


def train_on_pre_ampere_servers(hetermoe_config: dict, spec: dict) -> dict | None:
    """As `train_precision_under_launcher`, with every expert server reporting a V100 (compute capability 7.0)."""
    import hf_hetermoe.expert_server as expert_server

    expert_server.device_capability = lambda device: (7, 0)
    return train_precision_under_launcher(hetermoe_config, spec)
