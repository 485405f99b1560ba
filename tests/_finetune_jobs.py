"""Fine-tuning jobs the fine-tuning tests run (module level, so `spawn` can import them): TRL's SFTTrainer, full or
with a PEFT LoRA adapter, or with the routed experts frozen, on a tiny Mixtral and a tiny tokenizer built here
(nothing from the Hub). One job, three ways to run it, as in tests/_jobs.py: stock (one process or DDP), under the
HeterMoE launcher (`sft_each_under_launcher`, attention + expert ranks), or with the callback added by hand
(colocated).
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import MixtralForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from tests._jobs import tiny_mixtral_config

VOCAB = 96
PAD = 0


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB tokens `t0`..`t95` (t0 pads, t1 ends a sequence)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1", unk_token="t2")


def sft_dataset(num_rows: int = 64, seed: int = 0) -> Dataset:
    """Pre-tokenized rows of different lengths (8..20 tokens), so padding and packing both matter."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        length = int(torch.randint(8, 21, (1,), generator=g))
        rows.append(torch.randint(3, VOCAB, (length,), generator=g).tolist() + [1])
    return Dataset.from_dict({"input_ids": rows})


LORA_TARGETS = ["q_proj", "v_proj"]


def build_model(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(**spec.get("model", {})))
    if spec.get("freeze_experts"):
        # Whatever froze them: here by hand, as a user freezing the experts of a full fine-tuning would.
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                param.requires_grad_(False)
    return model


def lora_config(spec: dict):
    from peft import LoraConfig

    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": spec.get("lora_targets", LORA_TARGETS),
              "task_type": "CAUSAL_LM"}
    if spec.get("lora_target_parameters"):
        kwargs["target_parameters"] = spec["lora_target_parameters"]
    return LoraConfig(**kwargs)


class _PrepareAtInit(TrainerCallback):
    """What HeterMoECallback used to do: prepare the model with the Trainer's Accelerator (autocast, no DDP) as the
    Trainer's __init__ ends, before SFTTrainer replaces `forward` with its fused LM head. The regression test runs
    it to show that the golden comparison catches the dropped autocast."""

    def on_init_end(self, args, state, control, model=None, **kwargs):
        from hf_hetermoe.integrations.trainer import _find_trainer

        _find_trainer(self).accelerator.prepare_model(model, evaluation_mode=True)


def sft(spec: dict) -> dict | None:
    """Train with TRL's SFTTrainer as `spec` says; returns losses, logs and a few facts on (attention) rank 0."""
    from trl import SFTConfig, SFTTrainer

    model = build_model(spec)
    losses: list[float] = []
    aux_losses: list[float] = []

    def record(module, args, output):
        if module.training and output.loss is not None:
            losses.append(output.loss.item())
            if getattr(output, "aux_loss", None) is not None:
                aux_losses.append(output.aux_loss.item())

    model.register_forward_hook(record)
    report_to = ["tensorboard"] if spec.get("tensorboard") else []
    args = SFTConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=spec.get("max_steps", 6),
        learning_rate=3e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        max_grad_norm=spec.get("max_grad_norm", 0.5),
        logging_steps=1,
        save_strategy="steps" if spec.get("save_steps") else "no",
        save_steps=spec.get("save_steps") or 500,
        report_to=report_to,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=spec.get("bf16", False),
        max_length=32,
        packing=spec.get("packing", False),
        shuffle_dataset=False,
        dataset_num_proc=None,
    )
    callbacks = []
    if spec.get("colocated_callback"):
        from hf_hetermoe import HeterMoECallback, HeterMoEConfig

        callbacks.append(HeterMoECallback(HeterMoEConfig(mode="colocated")))
    if spec.get("prepare_at_init"):
        callbacks.append(_PrepareAtInit())
    peft_config = lora_config(spec) if spec.get("lora") else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer(),
                         peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    if spec.get("final_dir"):
        trainer.save_model(spec["final_dir"])
    result: dict[str, Any] = {"losses": losses, "aux_losses": aux_losses, "log_history": trainer.state.log_history}
    from hf_hetermoe import get_engine, revert_hetermoe

    engine = get_engine(trainer.model)
    if engine is not None and engine.shard is not None:
        shard = engine.shard
        result["shard_trainable"] = len(shard.trainable_parameters())
        result["shard_optimizer_state"] = 0 if shard.optimizer is None else len(shard.optimizer.state)
    if spec.get("merged_dir"):
        # Stock experts back (with the trained weights), then PEFT folds the adapter into the base weights.
        unwrapped = revert_hetermoe(trainer.model) if engine is not None else trainer.model
        merged = unwrapped.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(spec["merged_dir"])
    if not trainer.is_world_process_zero():
        return None
    return result


def sft_each(specs: list[dict]) -> list[dict | None]:
    """Several SFT runs in one process (stock, or colocated with the callback in the spec)."""
    return [sft(spec) for spec in specs]


def sft_each_under_launcher(hetermoe_config: dict, specs: list[dict]) -> list[dict | None]:
    """One process of a HeterMoE job: attention ranks run each SFT spec in turn (the launcher gives every Trainer
    its callback; the expert servers serve each model in turn), expert ranks serve."""
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    results: list[Any] = []

    def attention_main() -> None:
        results.extend(sft(spec) for spec in specs)

    run_rank(HeterMoEConfig.from_dict(hetermoe_config), attention_main)
    return results
