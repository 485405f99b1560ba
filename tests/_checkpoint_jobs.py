"""Jobs for the pretrained-checkpoint tests (tests/test_checkpoint_sharded.py, tests/test_bf16_weights.py): the
training script of tests/_jobs.py, with the model loaded by `from_pretrained` from a local folder, optionally
writing its checkpoints in small shards (several safetensors files and an index, as a large model's are)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from transformers import MixtralForCausalLM, PreTrainedModel

from tests._jobs import tiny_mixtral_config, train, train_under_launcher

SHARD_SIZE = "20KB"  # the tiny Mixtral's expert tensors are 6-12 KB: ~13 files, w1 and w3 of a layer in different ones


def write_pretrained(folder: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = SHARD_SIZE) -> None:
    """A tiny Mixtral as a local 'pretrained' checkpoint (never the Hub)."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_mixtral_config()).to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def load_pretrained(folder: str, dtype: str = "float32") -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def small_shards(max_shard_size: str | None) -> Iterator[None]:
    """While active, `save_pretrained` (and with it the Trainer's checkpoints) writes shards of `max_shard_size`:
    the Trainer has no argument for it, and the default (50GB) never shards a tiny model."""
    if not max_shard_size:
        yield
        return
    original = PreTrainedModel.save_pretrained

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        kwargs.setdefault("max_shard_size", max_shard_size)
        return original(self, *args, **kwargs)

    PreTrainedModel.save_pretrained = save_pretrained
    try:
        yield
    finally:
        PreTrainedModel.save_pretrained = original


@contextlib.contextmanager
def float64_norm(enabled: bool) -> Iterator[None]:
    """While active, stock Trainers clip with the gradient norm summed in float64 (HeterMoE's arithmetic: squares
    summed in float64, one Python-float coefficient) instead of torch's norm in the gradients' dtype. The
    bf16 test runs stock both ways to measure how much that rounding alone moves stock bf16 training."""
    if not enabled:
        yield
        return
    from transformers import Trainer

    original = Trainer._clip_grad_norm

    def clip_grad_norm(self, model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = torch.sqrt(sum((g.detach().double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64)))
        coef = min(self.args.max_grad_norm / (float(total) + 1e-6), 1.0)
        torch._foreach_mul_(grads, coef)
        return total.to(grads[0].dtype)

    Trainer._clip_grad_norm = clip_grad_norm
    try:
        yield
    finally:
        Trainer._clip_grad_norm = original


def run(hetermoe_config: dict | None, spec: dict) -> dict | None:
    """Train as `spec` says from `spec["pretrained"]` (in `spec["dtype"]`, default float32): stock or with the
    colocated callback when `hetermoe_config` is None, else one process of a HeterMoE job."""
    spec = dict(spec, model_factory=functools.partial(load_pretrained, spec["pretrained"], spec.get("dtype", "float32")))
    with small_shards(spec.get("max_shard_size")), float64_norm(spec.get("float64_norm", False)):
        if hetermoe_config is None:
            return train(spec)
        return train_under_launcher(hetermoe_config, spec)


def final_weights(folder: str) -> dict[str, Any]:
    return MixtralForCausalLM.from_pretrained(folder, dtype="auto").state_dict()
