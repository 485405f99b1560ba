"""An ordinary Trainer script for the dead-rank tests (run by `hetermoe launch`): trains the tiny Mixtral of
tests/_jobs.py for many steps; the first process writes `--ready_file` when step `--ready_step` begins, so the
test can kill a rank in the middle of a training step."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for tests._jobs

import torch  # noqa: E402
from transformers import MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tests._jobs import tiny_dataset, tiny_mixtral_config  # noqa: E402


class WriteWhenReady(TrainerCallback):
    def __init__(self, path: str, step: int):
        self.path, self.step = path, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            with open(self.path, "w") as fh:
                fh.write(str(os.getpid()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--ready_file", required=True)
    parser.add_argument("--ready_step", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=400)
    ns = parser.parse_args()
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    args = TrainingArguments(output_dir=ns.output_dir, per_device_train_batch_size=4, max_steps=ns.max_steps,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(num_rows=4096),
                      callbacks=[WriteWhenReady(ns.ready_file, ns.ready_step)])
    trainer.train()


if __name__ == "__main__":
    main()
