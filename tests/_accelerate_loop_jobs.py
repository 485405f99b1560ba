"""The Accelerate-loop recipe (hf_hetermoe/recipes/train_loop.py) as a function spawned ranks can run."""

from __future__ import annotations

import json
import os


def run_loop(argv: list[str]) -> dict:
    """One rank of the loop (stock, colocated HeterMoE, or an attention rank under the launcher)."""
    from hf_hetermoe.recipes.train_loop import main

    return main(argv)


def loop_args(out: str, *extra: str) -> list[str]:
    """The recipe's arguments used by every golden run: 8 optimizer steps, accumulation 2, clipping 0.5."""
    os.makedirs(out, exist_ok=True)
    return ["--output_dir", out, "--results_file", os.path.join(out, "results.json"), "--max_steps", "8", *extra]


def results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def stock_ddp(basetemp) -> tuple[str, dict]:
    """The stock reference: the loop without HeterMoE under DDP on 2 gloo ranks, computed once per test session
    (the multi-machine tests and the loop tests compare with it)."""
    from tests._dist import spawn

    out = os.path.join(str(basetemp), "loop_stock_ddp")
    if not os.path.isfile(os.path.join(out, "results.json")):
        spawn(2, run_loop, loop_args(out, "--stock"))
    return out, results(out)


def refusals() -> dict:
    """What `hf_hetermoe.prepare` refuses, with a tiny model on this rank's world (colocated)."""
    import torch
    from accelerate import Accelerator
    from transformers import MixtralForCausalLM

    import hf_hetermoe
    from tests._jobs import tiny_mixtral_config

    accelerator = Accelerator(gradient_accumulation_steps=2)
    messages = {}
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    no_experts = torch.optim.AdamW([p for n, p in model.named_parameters() if ".experts." not in n])
    try:
        hf_hetermoe.prepare(accelerator, MixtralForCausalLM(tiny_mixtral_config()), no_experts)
    except ValueError as exc:
        messages["optimizer"] = str(exc)
    model, optimizer = hf_hetermoe.prepare(accelerator, model, torch.optim.AdamW(model.parameters()))
    ids = torch.randint(0, 96, (2, 8))
    with accelerator.accumulate(model):  # the first of two micro-batches: no gradient sync
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        for name, call in (("clip_norm", lambda: accelerator.clip_grad_norm_(model.parameters(), 1.0)),
                           ("clip_value", lambda: accelerator.clip_grad_value_(model.parameters(), 1.0))):
            try:
                call()
            except ValueError as exc:
                messages[name] = str(exc)
    try:
        hf_hetermoe.prepare(accelerator, model, optimizer)
    except ValueError as exc:
        messages["twice"] = str(exc)
    other = torch.nn.Linear(2, 2)  # a model HeterMoE does not own keeps stock clipping
    other(torch.ones(1, 2)).sum().backward()
    messages["other_norm"] = float(accelerator.clip_grad_norm_(other.parameters(), 1e9))
    return messages
