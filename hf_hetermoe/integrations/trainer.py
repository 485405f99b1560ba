"""HeterMoECallback: makes a stock `transformers.Trainer` train a HeterMoE model with stock meaning.

What it does, and when (the Trainer's own order):
- `on_init_end` (before the optimizer exists): patch the model (`apply_hetermoe`), prepare it with Accelerate
  without DDP (HeterMoE averages attention gradients itself), and route the Trainer's gradient-norm, save and
  load steps through HeterMoE so they cover the experts too.
- `_load_optimizer_and_scheduler` (resume) and `on_train_begin`: give the experts an optimizer of the Trainer's
  class and hyperparameters, and restore its state from the checkpoint.
- gradient clipping: the norm is global over attention and expert gradients of all ranks.
- `on_optimizer_step` (after `optimizer.step()`, before the scheduler moves): step the experts with the lr the
  Trainer just used and the same clip coefficient.
- `save_model` / `_save_optimizer_and_scheduler`: full stock weights, plus the experts' optimizer state.

Callbacks receive the model, not the Trainer; the Trainer is found once, in `on_init_end`, on the call stack
(the Trainer's `__init__` calls that event itself).
"""

from __future__ import annotations

import inspect
import logging
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from ..atomic_checkpoint import TRAINER_METHODS as _ATOMIC_CHECKPOINT_METHODS
from ..atomic_checkpoint import install_atomic_checkpoints
from ..block import HeterMoEExperts
from ..checkpoint import load_expert_optimizer, save_expert_optimizer
from ..config import HeterMoEConfig
from ..groups import HeterMoEGroups
from ..patching import apply_hetermoe, state_hooks
from ..versions import check_versions

logger = logging.getLogger(__name__)

# Trainer methods HeterMoE routes through itself; checked up front so a transformers change fails loudly.
_TRAINER_METHODS = ("_clip_grad_norm", "_get_grad_norm", "save_model", "_save_optimizer_and_scheduler",
                    "_load_optimizer_and_scheduler", *_ATOMIC_CHECKPOINT_METHODS)


def _find_trainer(callback: TrainerCallback) -> Trainer:
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    raise RuntimeError("hetermoe: HeterMoECallback could not find the Trainer that owns it.")


def _expert_param_groups(trainer: Trainer, optimizer: torch.optim.Optimizer, experts: torch.nn.Module) -> dict[str, int]:
    """The Trainer param group each fused expert tensor would be in, by the Trainer's own decay rules: weight
    matrices in the decay group, biases (e.g. GPT-OSS's) in the no-decay group."""
    inner = getattr(optimizer, "optimizer", optimizer)
    decay_names = set(trainer.get_decay_parameter_names(experts))
    weight_decay = trainer.args.weight_decay

    def first_group(decay: bool) -> int:
        for index, group in enumerate(inner.param_groups):
            if group.get("weight_decay") == (weight_decay if decay else 0.0):
                return index
        return 0

    return {name: first_group(name in decay_names) for name, _ in experts.named_parameters()}


def _workload(trainer: Trainer, config: HeterMoEConfig, groups: HeterMoEGroups | None) -> tuple[int, int] | None:
    """(sequences per stripe, tokens per sequence) of training, for `asym_ea: auto`: from the Trainer's batch size
    and the first training example."""
    if config.asym_ea != "auto" or trainer.train_dataset is None:
        return None
    try:
        seq_len = len(trainer.train_dataset[0]["input_ids"])
    except (KeyError, IndexError, TypeError):
        return None
    mode = groups.topology.mode if groups is not None else "colocated"
    stripes = config.zebra.stripes(mode)
    return max(trainer.args.per_device_train_batch_size // stripes, 1), seq_len


class HeterMoECallback(TrainerCallback):
    """Add to `Trainer(callbacks=[...])`; the HeterMoE launcher adds it to every Trainer by itself.

    `config`: a HeterMoEConfig, a YAML path, or None (the launcher's config under the launcher, else colocated).
    Without the launcher (`groups` is None) the model runs colocated over the script's own world: every rank runs
    attention and holds 1/W of the experts. Under the launcher the roles come from the launcher; a config given
    here still sets the schedule (zebra, emulation, timeouts).
    """

    def __init__(self, config: HeterMoEConfig | str | None = None, *, groups: HeterMoEGroups | None = None):
        check_versions()
        if isinstance(config, str):
            config = HeterMoEConfig.from_yaml(config)
        self.config = config
        self.groups = groups
        self.trainer: Trainer | None = None
        self.engine = None

    # ---- setup ------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = _find_trainer(self)
        self.trainer = trainer
        missing = [m for m in _TRAINER_METHODS if not hasattr(trainer, m)]
        if missing:
            raise RuntimeError(f"hetermoe: this transformers version's Trainer lacks {missing}; it is not supported.")
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "hetermoe: DeepSpeed and FSDP are not supported with HeterMoE (it shards the experts itself). "
                "Launch without them."
            )
        if not args.ddp_find_unused_parameters in (None, False):
            logger.warning("hetermoe: ddp_find_unused_parameters has no effect (HeterMoE does not use DDP).")
        config = self.config or HeterMoEConfig(mode="colocated")
        self.engine = apply_hetermoe(model, config, self.groups, workload=_workload(trainer, config, self.groups))
        # Device placement and mixed-precision autocast as Accelerate gives every model, but no DDP wrapper:
        # HeterMoE averages the attention gradients itself (expert gradients must not be all-reduced).
        trainer.accelerator.prepare_model(model, evaluation_mode=True)
        self._route_trainer_methods(trainer, model)
        if self.engine.shard is not None:  # servers take it from the launcher's config (expert_server.serve)
            self.engine.shard.check_finite = config.check_finite
        install_atomic_checkpoints(trainer)  # checkpoint-N folders appear only complete (atomic_checkpoint.py)

    def _route_trainer_methods(self, trainer: Trainer, model: torch.nn.Module) -> None:
        engine = self.engine
        original_save_model = trainer.save_model
        original_save_optim = trainer._save_optimizer_and_scheduler
        original_load_optim = trainer._load_optimizer_and_scheduler

        def unscale_factor() -> float:
            trainer.accelerator.unscale_gradients()
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                return 1.0 / float(scaler.get_scale())
            return 1.0

        def clip_grad_norm(model_arg):
            params = list(model_arg.parameters())
            return engine.clip_grad_norm(params, trainer.args.max_grad_norm, unscale=unscale_factor())

        def get_grad_norm(model_arg, grad_norm=None):
            if grad_norm is None:
                grad_norm = engine.global_grad_norm(list(model_arg.parameters()), unscale=unscale_factor())
            return grad_norm

        def save_model(output_dir=None, _internal_call=False):
            hooks = state_hooks(model)
            hooks.gather_for_save()
            try:
                return original_save_model(output_dir, _internal_call=_internal_call)
            finally:
                hooks.drop_cache()

        def save_optimizer_and_scheduler(output_dir):
            original_save_optim(output_dir)
            save_expert_optimizer(engine, output_dir)

        def load_optimizer_and_scheduler(checkpoint):
            original_load_optim(checkpoint)
            if checkpoint is not None:
                self._setup_expert_optimizer(trainer.optimizer)
                load_expert_optimizer(engine, checkpoint)

        original_log = trainer.log
        self._stats_since = time.perf_counter()

        def log(logs, *args, **kwargs):
            if "loss" in logs:  # a training log: add how busy each pool was since the previous one
                for key, value in engine.pool_busy(self._stats_since).items():
                    logs[f"hetermoe_{key}"] = round(value, 4)
                if engine.instruments.emulator is not None:
                    logs["hetermoe_emulated_devices"] = ",".join(engine.config.emulation.devices)
                self._stats_since = time.perf_counter()
            return original_log(logs, *args, **kwargs)

        trainer.log = log
        trainer._clip_grad_norm = clip_grad_norm
        trainer._get_grad_norm = get_grad_norm
        trainer.save_model = save_model
        trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
        trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler

    def _setup_expert_optimizer(self, optimizer) -> None:
        if optimizer is None:
            return
        experts = next(m for m in self.trainer.model.modules() if isinstance(m, HeterMoEExperts))._original_experts
        self.engine.setup_optimizer(optimizer, _expert_param_groups(self.trainer, optimizer, experts))

    # ---- training events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._setup_expert_optimizer(optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The gradient-norm path already did this; a Trainer subclass that skips it still gets DDP semantics.
        self.engine.finish_gradients(list(model.parameters()))

    def on_train_end(self, args, state, control, **kwargs):
        if os.environ.get("HETERMOE_TRACE"):
            self.engine.timeline.write_chrome_trace(os.environ["HETERMOE_TRACE"])

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        inner = getattr(optimizer, "optimizer", optimizer)
        lrs = [float(inner.param_groups[i]["lr"]) for i in self.engine.optimizer_groups]
        self.engine.step(lrs=lrs, skipped=skipped)
