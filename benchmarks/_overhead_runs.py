"""One training run for benchmarks/overhead.py: the stock Trainer on a small Mixtral, with or without HeterMoE.

    python benchmarks/_overhead_runs.py SPEC.json            # stock or colocated, one process
    hetermoe launch --config C.yaml --num-processes 2 benchmarks/_overhead_runs.py SPEC.json   # disaggregated

SPEC: {"mode": "stock" | "hetermoe" | "alternate", "hidden": int, "steps": int, "seq_len": int, "batch": int,
"threads": int (0: torch's default), "output": path, "profile": path or null}. Every run builds the same model from the same seed and trains on the same
random tokens; the attention rank 0 writes {"step_ends": [...], "cpu_ends": [...], "train_runtime": s} to
`output` (wall clock and this process's CPU time at each step end), and with
`profile` the cProfile statistics of the whole `trainer.train()` to that path. "alternate": see `alternate`; writes
{"stock": [CPU s per step], "colocated": [...]}.
"""

import cProfile
import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = []
        self.cpu_ends = []  # this process's CPU time (all threads): less sensitive to other load on the machine

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())


def model_config(hidden: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, tie_word_embeddings=False,
    )


def alternate(spec: dict) -> dict:
    """Stock and colocated HeterMoE models in this one process, training steps alternated one by one (forward,
    backward, clipping at 1.0, fused AdamW), each step's CPU time recorded: no process start, no Trainer, and the
    same moment's machine load for both."""
    from hf_hetermoe import HeterMoEConfig, apply_hetermoe, get_engine

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (spec["batch"], spec["seq_len"]), generator=g)
    runs = {}
    for name in ("stock", "colocated"):
        torch.manual_seed(0)
        model = MixtralForCausalLM(model_config(spec["hidden"]))
        engine = None
        if name == "colocated":
            apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
            engine = get_engine(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        if engine is not None:
            engine.state.setup_optimizer(optimizer, {"gate_up_proj": 0, "down_proj": 0})
        runs[name] = (model, optimizer, engine)

    def step(model, optimizer, engine) -> float:
        start = time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        params = list(model.parameters())
        if engine is not None:
            engine.state.clip_grad_norm(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if engine is not None:
            engine.state.step(lrs=[1e-4], skipped=False)
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start

    for run in runs.values():  # warm-up: optimizer state
        step(*run)
    cpu = {name: [] for name in runs}
    for _ in range(spec["steps"]):
        for name, run in runs.items():
            cpu[name].append(step(*run))
    return cpu


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["mode"] == "alternate":
        with open(spec["output"], "w") as fh:
            json.dump(alternate(spec), fh)
        return
    torch.manual_seed(0)
    model = MixtralForCausalLM(model_config(spec["hidden"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (spec["batch"] * spec["steps"], spec["seq_len"]), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=spec["output"] + ".trainer", per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
        learning_rate=1e-4, logging_steps=spec["steps"], save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    steps = StepTimes()
    callbacks = [steps]
    if spec["mode"] == "hetermoe":
        from hf_hetermoe import HeterMoECallback

        callbacks.append(HeterMoECallback())  # the launcher's config under `hetermoe launch`, else colocated
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    profiler = cProfile.Profile() if spec.get("profile") else None
    if profiler is not None:
        profiler.enable()
    result = trainer.train()
    if profiler is not None:
        profiler.disable()
    if int(os.environ.get("RANK", "0")) == 0:
        if profiler is not None:
            profiler.dump_stats(spec["profile"])
        with open(spec["output"], "w") as fh:
            json.dump({"step_ends": steps.ends, "cpu_ends": steps.cpu_ends, "train_runtime": result.metrics["train_runtime"]}, fh)


if __name__ == "__main__":
    main()
