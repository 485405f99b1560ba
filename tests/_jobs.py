"""Training jobs the distributed tests run in spawned processes (module level, so `spawn` can import them).

One script, three ways to run it: stock (single process or DDP), under the HeterMoE launcher
(`run_rank`, attention + expert ranks), or with the callback added by hand (colocated, no launcher).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments


def tiny_mixtral_config(**overrides: Any) -> MixtralConfig:
    """Mixtral-8x7B shape, shrunk (production values in comments)."""
    values = dict(
        vocab_size=96,               # 32000
        hidden_size=32,              # 4096
        intermediate_size=48,        # 14336
        num_hidden_layers=3,         # 32
        num_attention_heads=4,       # 32
        num_key_value_heads=2,       # 8
        num_local_experts=4,         # 8
        num_experts_per_tok=2,       # 2
        max_position_embeddings=64,  # 32768
        output_router_logits=True,   # aux loss on
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return MixtralConfig(**values)


def tiny_dataset(num_rows: int = 96, seq_len: int = 16, vocab: int = 96, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num_rows, seq_len), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


class LocalHub:
    """Stands in for the Hub API the Trainer uses (`transformers.trainer.hf_api()`): uploads go to a local folder."""

    def __init__(self, root: str):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        os.makedirs(os.path.join(self.root, repo_id), exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        import shutil

        shutil.copytree(folder_path, os.path.join(self.root, repo_id), dirs_exist_ok=True)
        return None


PROMPT = [[5, 17, 33, 2, 61, 8]]


class _StepEnds(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def train(spec: dict) -> dict | None:
    """Train the tiny Mixtral (or `spec["model_factory"]()`, a module-level function so spawned ranks can import
    it) as `spec` says; returns losses and logs on (attention) rank 0, else None."""
    torch.manual_seed(0)
    if spec.get("model_factory") is not None:
        model = spec["model_factory"]()
    else:
        model = MixtralForCausalLM(tiny_mixtral_config(**spec.get("model", {})))
    losses: list[float] = []

    def record_loss(module, args, output):
        if module.training and output.loss is not None:
            losses.append(output.loss.item())

    model.register_forward_hook(record_loss)
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec.get("batch_size", 4),
        gradient_accumulation_steps=spec.get("grad_accum", 2),
        max_steps=spec.get("max_steps", 8),
        learning_rate=3e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        weight_decay=spec.get("weight_decay", 0.01),
        max_grad_norm=spec.get("max_grad_norm", 0.5),
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        logging_steps=1,
        save_strategy="steps" if spec.get("save_steps") else "no",
        save_steps=spec.get("save_steps") or 500,
        eval_strategy="steps" if spec.get("eval_steps") else "no",
        eval_steps=spec.get("eval_steps"),
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks: list[TrainerCallback] = list(spec.get("callbacks", []))
    if spec.get("stop_at"):
        callbacks.append(_StopAt(spec["stop_at"]))
    step_ends = _StepEnds()
    callbacks.append(step_ends)
    if spec.get("trace_dir"):
        os.environ["HETERMOE_TRACE"] = spec["trace_dir"]  # HeterMoECallback writes this rank's trace at train end
    if spec.get("colocated_callback"):
        from hf_hetermoe import HeterMoECallback, HeterMoEConfig

        callbacks.append(HeterMoECallback(HeterMoEConfig(mode="colocated")))
    if spec.get("push_to_dir"):
        import transformers.trainer

        transformers.trainer.hf_api = lambda: LocalHub(spec["push_to_dir"])
        args.push_to_hub, args.hub_model_id = True, "local/tiny-mixtral"
    eval_dataset = tiny_dataset(num_rows=16, seed=1) if spec.get("eval_steps") else None
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), eval_dataset=eval_dataset,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=spec.get("resume_from"))
    if spec.get("final_dir"):
        trainer.save_model(spec["final_dir"])
    if spec.get("push_to_dir"):
        trainer.push_to_hub()
    generated = None
    if spec.get("generate"):
        model.eval()
        with torch.no_grad():
            generated = model.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False).tolist()
    if not trainer.is_world_process_zero():
        return None
    from hf_hetermoe import get_engine

    engine = get_engine(trainer.model)
    return {"placement": engine.placement.to_dict() if engine is not None else None,"losses": losses, "log_history": trainer.state.log_history, "generated": generated,
            "step_ends": step_ends.ends}


def train_under_launcher(hetermoe_config: dict, spec: dict) -> dict | None:
    """One process of a HeterMoE job: attention ranks run `train(spec)`, expert ranks serve."""
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    result: dict[str, Any] = {}

    def attention_main() -> None:
        result["value"] = train(spec)

    run_rank(HeterMoEConfig.from_dict(hetermoe_config), attention_main)
    return result.get("value")


def output_dir(base: str, name: str) -> str:
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path
