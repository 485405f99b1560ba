"""A training loop written directly on `accelerate.Accelerator` (no Trainer), with HeterMoE.

    hetermoe launch --config recipes/hetermoe/cpu_2attn_2exp.yaml --num-processes 4 recipes/train_loop.py \
        --output_dir out --max_steps 20

The loop is the stock Accelerate loop; the one HeterMoE line is `hf_hetermoe.prepare` in place of
`accelerator.prepare` for the model and optimizer (`--stock` runs it without HeterMoE, for comparison). It trains
a small Mixtral from scratch on the bytes of a text file (no tokenizer needed), with gradient accumulation,
clipping, a warm-up schedule, `save_state`/`load_state` (`--save_state_at`, `--resume_from`) and a stock
`save_pretrained` at the end. Run directly (`python recipes/train_loop.py ...`) or under `accelerate launch`
it runs colocated over its own processes; under `hetermoe launch` the expert ranks serve the experts.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import MixtralConfig, MixtralForCausalLM, get_linear_schedule_with_warmup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--train_file", default=None, help="text file (default: the corpus shipped with hf-hetermoe)")
    p.add_argument("--max_steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per process and micro-batch")
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max_grad_norm", type=float, default=0.5)
    p.add_argument("--hidden_size", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--save_state_at", type=int, default=None, help="accelerator.save_state after this step")
    p.add_argument("--resume_from", default=None, help="a folder written by --save_state_at")
    p.add_argument("--results_file", default=None, help="JSON with the main process's losses and grad norms")
    p.add_argument("--stock", action="store_true", help="plain Accelerate, without HeterMoE")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def byte_sequences(path: str, seq_len: int) -> list[torch.Tensor]:
    data = torch.tensor(list(open(path, "rb").read()), dtype=torch.long)
    return list(data[: len(data) // seq_len * seq_len].view(-1, seq_len))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    torch.manual_seed(args.seed)
    config = MixtralConfig(
        vocab_size=256, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3 // 2,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, num_local_experts=args.experts,
        num_experts_per_tok=2, max_position_embeddings=max(64, args.seq_len), output_router_logits=True,
        router_aux_loss_coef=0.02, tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr)
    if args.stock:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        import hf_hetermoe

        model, optimizer = hf_hetermoe.prepare(accelerator, model, optimizer)
    if args.train_file is None:
        from hf_hetermoe.data import demo_corpus_path

        args.train_file = demo_corpus_path()
    rows = byte_sequences(args.train_file, args.seq_len)
    loader = DataLoader(rows, batch_size=args.batch_size, shuffle=False, collate_fn=lambda b: torch.stack(b))
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=args.max_steps)
    loader, scheduler = accelerator.prepare(loader, scheduler)

    step = 0
    if args.resume_from:
        accelerator.load_state(args.resume_from)
        with open(os.path.join(args.resume_from, "loop_step.json")) as fh:
            step = json.load(fh)["step"]
        loader = accelerator.skip_first_batches(loader, step * args.grad_accum)
    losses, grad_norms = [], []
    model.train()
    for ids in loader:
        if step >= args.max_steps:
            break
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            if step == args.save_state_at:
                folder = os.path.join(args.output_dir, f"state-{step}")
                accelerator.save_state(folder)
                if accelerator.is_main_process:
                    with open(os.path.join(folder, "loop_step.json"), "w") as fh:
                        json.dump({"step": step}, fh)
    final = os.path.join(args.output_dir, "final")
    accelerator.unwrap_model(model).save_pretrained(
        final, is_main_process=accelerator.is_main_process, state_dict=accelerator.get_state_dict(model))
    results = {"losses": losses, "grad_norms": grad_norms, "world": accelerator.num_processes}
    if not args.stock:  # where the experts live (expert ranks under `hetermoe launch`, else this world's ranks)
        import hf_hetermoe

        results["experts"] = hf_hetermoe.get_engine(accelerator.unwrap_model(model)).placement.describe()
    if accelerator.is_main_process and args.results_file:
        with open(args.results_file, "w") as fh:
            json.dump(results, fh)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
