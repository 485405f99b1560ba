"""Training script for benchmarks/zebra_emulated.py, run under `hetermoe launch`: one Trainer per run.

Each run trains the same tiny Mixtral-shaped model on the same random tokens with its own HeterMoE config
(schedule and device emulation) and records when each optimizer step ended, and its routing log under the run's
`routing_log` folder. Rank 0 writes the results JSON.
"""

import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_hetermoe import HeterMoECallback, HeterMoEConfig


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run_one(run: dict, base: dict) -> dict:
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**base["model"]))
    rows = run["batch_size"] * base["attention_ranks"] * base["steps"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base["model"]["vocab_size"], (rows, base["seq_len"]), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=f"{base['output']}-{run['name']}", per_device_train_batch_size=run["batch_size"],
        max_steps=base["steps"], learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    steps = StepTimes()
    if run.get("routing_log"):  # this run's routed pairs per expert, for the planner's prediction
        os.environ["HETERMOE_ROUTING_LOG"] = run["routing_log"]
    config = dict(run["hetermoe"])
    if isinstance(config.get("asym_ea"), dict):  # JSON made the layer keys strings
        config["asym_ea"] = {int(layer): count for layer, count in config["asym_ea"].items()}
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[HeterMoECallback(HeterMoEConfig.from_dict(config)), steps])
    trainer.train()
    from hf_hetermoe import get_engine

    engine = get_engine(trainer.model)  # the placement the run used (e.g. an expert_split's), for the prediction
    return {"name": run["name"], "step_ends": steps.ends, "log_history": trainer.state.log_history,
            "batch_size": run["batch_size"], "placement": engine.placement.to_dict() if engine is not None else None}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    results = [run_one(run, spec) for run in spec["runs"]]
    if int(os.environ.get("RANK", "0")) == 0:  # attention rank 0
        with open(spec["output"] + ".json", "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
