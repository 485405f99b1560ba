"""HeterMoECallback: makes a stock `transformers.Trainer` train a HeterMoE model with stock meaning.

What it does, and when (the Trainer's own order):
- `on_init_end` (before the optimizer exists): patch the model (`apply_hetermoe`; through PEFT wrappers), make
  the Trainer's Accelerator prepare it without DDP when training starts (HeterMoE averages attention gradients
  itself), and install the Trainer overrides (integrations/trainer_overrides.py: gradient norm, save and load
  steps cover the experts; atomic checkpoints).
- `_load_optimizer_and_scheduler` (resume) and `on_train_begin`: give the experts an optimizer of the Trainer's
  class and hyperparameters, and restore its state from the checkpoint.
- gradient clipping: the norm is global over attention and expert gradients of all ranks.
- `on_optimizer_step` (after `optimizer.step()`, before the scheduler moves): step the experts with the lr the
  Trainer just used and the same clip coefficient.
- `on_log`: training logs get how busy each pool was and how evenly routing spread the tokens.
- `save_model` / `_save_optimizer_and_scheduler`: full stock weights, plus the experts' optimizer state.
"""

from __future__ import annotations

import inspect
import logging
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from ..block import HeterMoEExperts
from ..config import HeterMoEConfig
from ..engine import HeterMoEEngine
from ..groups import HeterMoEGroups
from ..patching import apply_hetermoe, get_engine
from ..versions import check_versions
from .trainer_overrides import check_trainer_overrides, install_accelerator_overrides, install_trainer_overrides

logger = logging.getLogger(__name__)


def _find_trainer(callback: TrainerCallback) -> Trainer:
    """The Trainer whose `__init__` is running `on_init_end` for `callback`, found on the call stack.

    No public route gives a callback its Trainer: events receive the model, optimizer, scheduler, processing class
    and dataloaders, not the Trainer, and a callback passed to `Trainer(callbacks=[...])` exists before its Trainer.
    The Trainer's own `__init__` fires `on_init_end`, so its frame is on the stack; this runs once per Trainer."""
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
        self.engine: HeterMoEEngine | None = None
        self._stats_since = time.perf_counter()

    # ---- setup ------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = _find_trainer(self)
        self.trainer = trainer
        check_trainer_overrides(type(trainer))  # before anything is patched
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "hetermoe: DeepSpeed and FSDP are not supported with HeterMoE (it shards the experts itself). "
                "Launch without them."
            )
        if not args.ddp_find_unused_parameters in (None, False):
            logger.warning("hetermoe: ddp_find_unused_parameters has no effect (HeterMoE does not use DDP).")
        config = self.config or HeterMoEConfig(mode="colocated")
        self.engine = apply_hetermoe(model, config, self.groups, workload=_workload(trainer, config, self.groups))
        # Not prepared here: the Trainer's Accelerator prepares the model when training (or evaluation) starts, as
        # for stock training, so the autocast wraps the `forward` the model has then. A trainer that replaces
        # `forward` after its __init__ (TRL's SFTTrainer adds its fused LM head) would otherwise drop the autocast
        # (mixed precision silently off) while Accelerate skips the already prepared model. Prepared without the
        # DDP wrapper: HeterMoE averages the attention gradients itself (expert gradients must not be all-reduced).
        install_accelerator_overrides(trainer, is_hetermoe_model=lambda m: get_engine(m) is self.engine)
        install_trainer_overrides(
            trainer, model=model, state=self.engine.state, setup_expert_optimizer=self._setup_expert_optimizer
        )
        if self.engine.shard is not None:  # servers take it from the launcher's config (expert_server.serve)
            self.engine.shard.check_finite = config.check_finite
        # First in the callback list, so `on_log` adds the pool statistics before reporting callbacks (TensorBoard,
        # W&B, the progress bar) see the logs. Safe while the handler iterates: the callbacks after this one keep
        # their positions.
        callbacks = trainer.callback_handler.callbacks
        callbacks.remove(self)
        callbacks.insert(0, self)
        self._stats_since = time.perf_counter()

    def _setup_expert_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            return
        experts = next(m for m in self.trainer.model.modules() if isinstance(m, HeterMoEExperts))._original_experts
        self.engine.state.setup_optimizer(optimizer, _expert_param_groups(self.trainer, optimizer, experts))

    # ---- training events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._setup_expert_optimizer(optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The gradient-norm path already did this; a Trainer subclass that skips it still gets DDP semantics.
        self.engine.state.finish_gradients(list(model.parameters()))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Whether the GradScaler skipped this step (fp16 overflow, in attention or, via the global norm, expert
        # gradients; precision.py): the experts skip it too. The Trainer asks the Accelerator, as here: the
        # optimizer this event receives is the bare torch optimizer, which has no `step_was_skipped`.
        skipped = bool(self.trainer.accelerator.optimizer_step_was_skipped)
        inner = getattr(optimizer, "optimizer", optimizer)
        expert_state = self.engine.state
        lrs = [float(inner.param_groups[i]["lr"]) for i in expert_state.optimizer_groups]
        expert_state.step(lrs=lrs, skipped=skipped)

    def on_step_end(self, args, state, control, **kwargs):
        # After the optimizer step, the scheduler and zero_grad, before logging and saving: a step boundary on every
        # attention rank (all of them reach it together), where experts may move (rebalancer.py).
        if self.engine.rebalancer is not None:
            self.engine.rebalancer.after_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # only training logs get statistics
        # The Trainer recorded this log (`state.log_history[-1]`) just before this event; add the same entries.
        busy = self.engine.stats.pool_busy(self._stats_since)
        added = {f"hetermoe_{key}": round(value, 4) for key, value in busy.items()}
        if self.engine.rebalancer is not None:
            added.update(self.engine.rebalancer.log_entries())
        if self.engine.instruments.emulator is not None:
            added["hetermoe_emulated_devices"] = ",".join(self.engine.config.emulation.devices)
        self._stats_since = time.perf_counter()
        logs.update(added)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(added)

    def on_train_end(self, args, state, control, **kwargs):
        if os.environ.get("HETERMOE_TRACE"):
            self.engine.timeline.write_chrome_trace(os.environ["HETERMOE_TRACE"])
