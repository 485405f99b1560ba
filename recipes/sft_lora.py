"""Supervised fine-tuning of a Mixture-of-Experts model with TRL's SFTTrainer and a PEFT LoRA adapter.

An ordinary TRL script with one addition, `callbacks=[HeterMoECallback()]`: run plainly (`python sft_lora.py ...`,
`accelerate launch sft_lora.py ...`; colocated, each rank holds 1/W of the experts) or under HeterMoE
(`hetermoe launch --config CFG.yaml --num-processes 3 sft_lora.py ...`; attention + expert ranks). The adapter
goes on attention and the router; the base model, routed experts included, stays frozen (LoRA on the routed
experts themselves is refused: they live on other ranks). The output folder holds the stock adapter
(`adapter_model.safetensors`); `--merged_dir` also writes the merged stock model.

Without `--model_name_or_path` it builds a small Mixtral with random weights and trains a byte-level BPE tokenizer
on the training text, so it runs on any machine with nothing downloaded:

    python recipes/sft_lora.py --train_file hf_hetermoe/data/demo_corpus.txt --output_dir sft-out --max_steps 20
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, MixtralConfig, MixtralForCausalLM
from trl import SFTConfig, SFTTrainer

from hf_hetermoe import HeterMoECallback, revert_hetermoe
from hf_hetermoe.recipes.train_clm import build_tokenizer


@dataclass
class ScriptArguments:
    train_file: str = field(default=None, metadata={"help": "a UTF-8 text file, one example per line"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "local model folder; else a small Mixtral"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate",
                              metadata={"help": "comma-separated module names (attention and router)"})
    merged_dir: str | None = field(default=None, metadata={"help": "also write the merged stock model here"})


def small_mixtral(tokenizer) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        output_router_logits=True, router_aux_loss_coef=0.02, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def main() -> None:
    script_args, sft_args = HfArgumentParser((ScriptArguments, SFTConfig)).parse_args_into_dataclasses()
    if script_args.train_file is None:
        raise ValueError("--train_file is required (a UTF-8 text file, one example per line).")
    with sft_args.main_process_first(desc="tokenizer"):
        if script_args.model_name_or_path:
            tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
        else:
            tokenizer_dir = os.path.join(sft_args.output_dir, "tokenizer")
            if sft_args.process_index == 0:
                build_tokenizer(script_args.train_file, 512).save_pretrained(tokenizer_dir)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = (AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
             if script_args.model_name_or_path else small_mixtral(tokenizer))
    with open(script_args.train_file, encoding="utf-8") as fh:
        dataset = Dataset.from_dict({"text": [line for line in fh.read().splitlines() if line.strip()]})

    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=script_args.lora_r, lora_alpha=script_args.lora_alpha, lora_dropout=0.0,
                               target_modules=script_args.lora_targets.split(","), task_type="CAUSAL_LM"),
        callbacks=[HeterMoECallback()],  # under `hetermoe launch` the launcher's roles apply; else colocated
    )
    trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    trainer.save_model()  # the stock adapter: adapter_config.json + adapter_model.safetensors
    if script_args.merged_dir:
        # Every attention rank: put the stock experts back (with their weights), then fold the adapter in.
        merged = revert_hetermoe(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(script_args.merged_dir)
            tokenizer.save_pretrained(script_args.merged_dir)


if __name__ == "__main__":
    main()
