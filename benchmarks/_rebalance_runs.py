"""Training script for benchmarks/rebalance_emulated.py, run under `hetermoe launch`: one Trainer per run.

Every run trains the same tiny D1-shaped Mixtral on the same random tokens, with the same Zipf-skewed router
(`skew` in the spec: a fixed bias added to the router logits by a forward hook on every gate, see
`skew_router`), under its own HeterMoE config (static placement, or re-placement every K steps). Records when
each optimizer step ended, the routing log, and the final placement. Rank 0 writes the results JSON.
"""

import json
import math
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_hetermoe import HeterMoECallback, HeterMoEConfig, get_engine


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def zipf_bias(num_experts: int, exponent: float, seed: int) -> torch.Tensor:
    """bias[e] = -exponent * ln(popularity rank of e + 1), ranks a seeded random permutation of the experts: it
    multiplies expert e's routing weight by 1 / (rank + 1) ** exponent."""
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.tensor([-exponent * math.log(order[e] + 1) for e in range(num_experts)])


def skew_router(model: MixtralForCausalLM, exponent: float, logit_scale: float) -> None:
    """Scale every router's weights by `logit_scale` (so token-dependent logits spread like a trained router's,
    not the near-zero logits of a fresh init), and add a per-layer Zipf bias to the logits through a forward hook
    on the gate (layer l's popularity order is a permutation seeded with l)."""
    num_experts = model.config.num_local_experts
    for index, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        with torch.no_grad():
            gate.weight.mul_(logit_scale)
        bias = zipf_bias(num_experts, exponent, seed=index)

        def hook(module, args, output, bias=bias):
            logits = output[0] + bias.to(output[0].dtype)
            probs = torch.softmax(logits.float(), dim=-1)
            top, chosen = torch.topk(probs, module.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), chosen

        gate.register_forward_hook(hook)


def run_one(run: dict, base: dict) -> dict:
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**base["model"]))
    skew_router(model, base["skew"]["exponent"], base["skew"]["logit_scale"])
    rows = run["batch_size"] * base["attention_ranks"] * base["steps"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base["model"]["vocab_size"], (rows, base["seq_len"]), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=f"{base['output']}-{run['name']}", per_device_train_batch_size=run["batch_size"],
        max_steps=base["steps"], learning_rate=base["learning_rate"], logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    steps = StepTimes()
    os.environ["HETERMOE_ROUTING_LOG"] = run["routing_log"]
    callback = HeterMoECallback(HeterMoEConfig.from_dict(run["hetermoe"]))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, steps])
    trainer.train()
    placement = get_engine(trainer.model).placement
    return {"name": run["name"], "step_ends": steps.ends, "log_history": trainer.state.log_history,
            "placement": {str(layer): list(row) for layer, row in placement.owner.items()}}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    results = [run_one(run, spec) for run in spec["runs"]]
    if int(os.environ.get("RANK", "0")) == 0:  # attention rank 0
        with open(spec["output"] + ".json", "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
