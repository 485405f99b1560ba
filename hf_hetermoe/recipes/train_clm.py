"""Train a causal-LM Mixture-of-Experts model with the stock Hugging Face Trainer.

An ordinary Trainer script: it knows nothing about HeterMoE. Run it plainly (`python train_clm.py ...`,
`accelerate launch train_clm.py ...`) or under HeterMoE (`hetermoe launch --config CFG.yaml --num-processes 4
train_clm.py ...`); the output folder is a stock checkpoint either way.

Without `--model_name_or_path` it builds a Mixtral from the size flags with random weights; without
`--tokenizer_name` it trains a small byte-level BPE tokenizer on the training text. All data is local.

    python train_clm.py --train_file corpus.txt --output_dir out --max_steps 100 --per_device_train_batch_size 8
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "local model folder; else build from sizes"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "local tokenizer folder; else train BPE"})
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    init_seed: int = 0


@dataclass
class DataArguments:
    train_file: str = field(default=None, metadata={"help": "a UTF-8 text file"})
    block_size: int = 64
    validation_fraction: float = 0.05


EOS = "<|endoftext|>"


def build_tokenizer(train_file: str, vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([train_file], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def load_blocks(train_file: str, tokenizer, block_size: int) -> Dataset:
    with open(train_file, encoding="utf-8") as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    ids: list[int] = []
    for encoded in tokenizer(lines)["input_ids"]:
        ids.extend(encoded + [tokenizer.eos_token_id])
    num_blocks = len(ids) // block_size
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(num_blocks)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    if data_args.train_file is None:
        raise ValueError("--train_file is required (a UTF-8 text file).")

    with training_args.main_process_first(desc="tokenizer"):
        tokenizer_dir = os.path.join(training_args.output_dir, "tokenizer")
        if model_args.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        elif training_args.process_index == 0:
            tokenizer = build_tokenizer(data_args.train_file, model_args.vocab_size)
            tokenizer.save_pretrained(tokenizer_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    dataset = load_blocks(data_args.train_file, tokenizer, data_args.block_size)
    split = dataset.train_test_split(test_size=data_args.validation_fraction, seed=training_args.seed)

    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        config = MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=model_args.hidden_size,
            intermediate_size=model_args.intermediate_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_key_value_heads,
            num_local_experts=model_args.num_local_experts,
            num_experts_per_tok=model_args.num_experts_per_tok,
            max_position_embeddings=max(2 * data_args.block_size, 128),
            output_router_logits=True,
            router_aux_loss_coef=model_args.router_aux_loss_coef,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(model_args.init_seed)
        model = MixtralForCausalLM(config)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
