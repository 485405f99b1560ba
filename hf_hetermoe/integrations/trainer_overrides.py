"""The private `transformers.Trainer` methods HeterMoE replaces on one Trainer instance, in one list.

HeterMoECallback uses the Trainer's public callback events wherever one exists (optimizer setup at
`on_train_begin`, the expert step at `on_optimizer_step`, the gradient average at `on_pre_optimizer_step`,
pool statistics at `on_log`). What no event can do is below: every entry of `TRAINER_OVERRIDES` names the
method, the parameters HeterMoE calls it with and is called with, and why no public hook does the job.
`check_trainer_overrides` compares the list with the installed Trainer (existence and parameter names) before
anything is replaced, so a transformers release that renames a method or changes its parameters fails at
start-up, naming the method and the supported versions, instead of training the wrong thing.

Only the instance's attributes change (`trainer.<name> = ...`); the Trainer class, and every other Trainer,
stay stock.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .. import atomic_checkpoint
from ..checkpoint import load_expert_optimizer, load_trainer_checkpoint, save_expert_optimizer
from ..patching import state_hooks
from ..precision import check_grad_scaler, enabled_scaler, scaled_clip_grad_norm
from ..versions import SUPPORTED

if TYPE_CHECKING:
    from transformers import Trainer

    from ..expert_state import ExpertState


@dataclass(frozen=True)
class Override:
    name: str
    params: tuple[str, ...]  # parameter names after `self`, in order
    why: str


TRAINER_OVERRIDES: tuple[Override, ...] = (
    Override("_clip_grad_norm", ("model",),
             "the norm must be global over attention and expert gradients of all ranks, and the experts clipped by "
             "the same coefficient; the Trainer clips with a local norm before any callback event "
             "(on_pre_optimizer_step comes after) and logs the norm this method returns"),
    Override("_get_grad_norm", ("model", "grad_norm"),
             "without clipping the Trainer still computes (and logs) a norm; it must be the global one"),
    Override("save_model", ("output_dir", "_internal_call"),
             "gathering the experts is a collective over attention ranks; the Trainer calls save_model on every "
             "rank but writes on one, and no event fires before the weights are written (on_save comes after)"),
    Override("_save_optimizer_and_scheduler", ("output_dir",),
             "the experts' optimizer state must be in the checkpoint folder before it is published; on_save fires "
             "only after the whole checkpoint is written"),
    Override("_load_optimizer_and_scheduler", ("checkpoint",),
             "on resume the experts' optimizer must be built and loaded where the Trainer loads its own; no event "
             "is told the checkpoint folder"),
    Override("_save_checkpoint", ("model", "trial"),
             "checkpoint-N must appear only complete (atomic_checkpoint.py); there is no hook around the whole save"),
    Override("_get_output_dir", ("trial",),
             "replaced only while _save_checkpoint runs: the stock save then writes into the staging folder"),
    Override("_push_from_checkpoint", ("checkpoint_folder",),
             "replaced only while _save_checkpoint runs: a push waits until the folder is published"),
    Override("_load_from_checkpoint", ("resume_from_checkpoint", "model"),
             "resume calls model.state_dict() only to list keys, which would gather every expert (a collective in "
             "colocated mode); a sharded checkpoint must complete each expert tensor and name a lost file; no event "
             "runs around the weight load"),
    Override("_load_best_model", (),
             "the same weight load as resume, for load_best_model_at_end; no event runs around it"),
)

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _signature_problem(method: Callable, expected: tuple[str, ...]) -> str | None:
    """None when `method(self, *expected)` is called and calls as HeterMoE does; else what differs."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return "has no readable signature"
    params = list(signature.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    fixed = [p for p in params if p.kind not in _VARIADIC]
    names = tuple(p.name for p in fixed)
    absorbs_rest = {p.kind for p in params} >= set(_VARIADIC)  # (..., *args, **kwargs) accepts the rest
    if names[: len(expected)] != expected and not (absorbs_rest and expected[: len(names)] == names):
        return f"takes {signature}, expected parameters ({', '.join(expected)})"
    if any(p.default is inspect.Parameter.empty for p in fixed[len(expected):]):
        return f"takes {signature}, which adds required parameters to ({', '.join(expected)})"
    return None


def _override_problems(cls: type, overrides) -> list[str]:
    """What is wrong with `cls` for these overrides: each listed method that is missing or whose parameters changed."""
    problems = []
    for override in overrides:
        method = getattr(cls, override.name, None)
        if not callable(method):
            problems.append(f"{cls.__name__}.{override.name} is missing")
            continue
        problem = _signature_problem(method, override.params)
        if problem is not None:
            problems.append(f"{cls.__name__}.{override.name} {problem}")
    return problems


def check_trainer_overrides(trainer_cls: type) -> None:
    """Raise RuntimeError naming every listed method that `trainer_cls` lacks or whose parameters changed."""
    problems = _override_problems(trainer_cls, TRAINER_OVERRIDES)
    if problems:
        import transformers

        raise RuntimeError(
            "hetermoe: the Trainer does not have the private methods HeterMoE replaces, as HeterMoE expects them: "
            + "; ".join(problems)
            + f". Installed transformers {transformers.__version__}; hf-hetermoe supports transformers "
            f"{SUPPORTED['transformers']} (pip install 'transformers{SUPPORTED['transformers']}'). A Trainer "
            "subclass that overrides these methods must keep their parameters."
        )


def install_trainer_overrides(
    trainer: Trainer, *, model: torch.nn.Module, state: ExpertState,
    setup_expert_optimizer: Callable[[torch.optim.Optimizer | None], None],
) -> None:
    """Check, then replace every method of `TRAINER_OVERRIDES` on this Trainer instance. Collective over the
    attention ranks (atomic checkpoints recover the output folder and wait for every rank)."""
    check_trainer_overrides(type(trainer))
    original_save_model = trainer.save_model
    original_save_optim = trainer._save_optimizer_and_scheduler
    original_load_optim = trainer._load_optimizer_and_scheduler

    def unscaled_scaler():
        """Unscale the attention gradients (fp16), as the stock clipping does first; the enabled scaler or None."""
        trainer.accelerator.unscale_gradients()
        return enabled_scaler(trainer.accelerator)

    # fp16: a non-finite global norm marks the step skipped in the scaler (precision.py); check its fields now.
    check_grad_scaler(getattr(trainer.accelerator, "scaler", None))

    def clip_grad_norm(model_arg):
        params = list(model_arg.parameters())
        return scaled_clip_grad_norm(state, params, trainer.args.max_grad_norm, unscaled_scaler())

    def get_grad_norm(model_arg, grad_norm=None):
        if grad_norm is None:
            grad_norm = scaled_clip_grad_norm(state, list(model_arg.parameters()), None, unscaled_scaler())
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
        save_expert_optimizer(state, output_dir)

    def load_optimizer_and_scheduler(checkpoint):
        original_load_optim(checkpoint)
        if checkpoint is not None:
            setup_expert_optimizer(trainer.optimizer)
            if not state.frozen:  # frozen experts have no optimizer state to restore
                load_expert_optimizer(state, checkpoint)

    trainer._clip_grad_norm = clip_grad_norm
    trainer._get_grad_norm = get_grad_norm
    trainer.save_model = save_model
    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler
    original_load_checkpoint = trainer._load_from_checkpoint
    original_load_best = trainer._load_best_model
    trainer._load_from_checkpoint = lambda resume_from_checkpoint, model_arg=None: load_trainer_checkpoint(
        state_hooks(model), resume_from_checkpoint,
        lambda: original_load_checkpoint(resume_from_checkpoint, model_arg))
    trainer._load_best_model = lambda: load_trainer_checkpoint(
        state_hooks(model), trainer.state.best_model_checkpoint, original_load_best)
    _install_atomic_checkpoints(trainer)


_MISSING = object()


def _install_atomic_checkpoints(trainer: Trainer) -> None:
    """Route `trainer._save_checkpoint` through a staging folder (atomic_checkpoint.py); recover the output
    folder now, so `resume_from_checkpoint=True` never picks an interrupted save. Every attention rank calls
    this (it is collective: barriers keep the ranks' files and the rename in order)."""
    if trainer.args.should_save:
        atomic_checkpoint.recover(trainer.args.output_dir)
    trainer.accelerator.wait_for_everyone()
    original = trainer._save_checkpoint

    def save_checkpoint(model, trial):
        from transformers import trainer as hf_trainer
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        args = trainer.args
        step = trainer.state.global_step
        run_dir = trainer._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        final = os.path.join(run_dir, name)
        root = atomic_checkpoint.staging_root(run_dir, step)
        if args.should_save:
            atomic_checkpoint.prepare(run_dir, step)
        trainer.accelerator.wait_for_everyone()  # the staging root exists before any rank writes into it

        pushes: list[str] = []
        saved = {attr: trainer.__dict__.get(attr, _MISSING) for attr in ("_get_output_dir", "_push_from_checkpoint")}
        # The stock method builds its folder from _get_output_dir; pushing waits until the folder is final.
        trainer._get_output_dir = lambda trial=None: root
        trainer._push_from_checkpoint = pushes.append
        try:
            original(model, trial)
        finally:
            for attr, value in saved.items():
                if value is _MISSING:
                    trainer.__dict__.pop(attr, None)
                else:
                    trainer.__dict__[attr] = value
        trainer.accelerator.wait_for_everyone()  # every rank's files (rng_state_<i>.pth, ...) are written
        staged = os.path.join(root, name)
        if args.should_save:
            atomic_checkpoint.publish(staged, final)
        trainer.accelerator.wait_for_everyone()
        if args.local_process_index == 0 and os.path.isdir(staged):
            # A node that does not share the saver's filesystem keeps its own files too.
            atomic_checkpoint.publish(staged, final)

        best = trainer.state.best_model_checkpoint
        if best is not None and os.path.dirname(best) == root:
            trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if pushes:
            trainer._push_from_checkpoint(final)
        if args.should_save:
            hf_trainer.rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                                          best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)

    trainer._save_checkpoint = save_checkpoint


# ---- the Trainer's Accelerator ----------------------------------------------------------------------------------
ACCELERATOR_OVERRIDES: tuple[Override, ...] = (
    Override("prepare_model", ("model", "device_placement", "evaluation_mode"),
             "the Trainer's Accelerator must prepare a HeterMoE model itself, when training or evaluation starts "
             "(device placement, the mixed-precision autocast around whatever `forward` the model has by then, e.g. "
             "TRL's fused LM head), but never wrap it in DDP: HeterMoE averages the attention gradients itself and "
             "expert gradients must not be all-reduced. Accelerate has no option to skip DDP for one model, and "
             "`Accelerator.prepare` calls this method for every module it gets"),
)


def check_accelerator_overrides(accelerator_cls: type) -> None:
    """Raise RuntimeError naming every listed Accelerator method that is missing or whose parameters changed."""
    problems = _override_problems(accelerator_cls, ACCELERATOR_OVERRIDES)
    if problems:
        import accelerate

        raise RuntimeError(
            "hetermoe: the Accelerator does not have the methods HeterMoE replaces, as HeterMoE expects them: "
            + "; ".join(problems)
            + f". Installed accelerate {accelerate.__version__}; hf-hetermoe supports accelerate "
            f"{SUPPORTED['accelerate']} (pip install 'accelerate{SUPPORTED['accelerate']}')."
        )


def install_accelerator_overrides(trainer: Trainer, *, is_hetermoe_model: Callable[[torch.nn.Module], bool]) -> None:
    """Replace every method of `ACCELERATOR_OVERRIDES` on this Trainer's Accelerator instance (the class and other
    Accelerators stay stock): a model for which `is_hetermoe_model` is true is prepared in evaluation mode
    (placement and autocast, no DDP wrapper); any other model as Accelerate would."""
    accelerator = trainer.accelerator
    check_accelerator_overrides(type(accelerator))
    original_prepare_model = accelerator.prepare_model

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        if is_hetermoe_model(model):
            evaluation_mode = True
        return original_prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    accelerator.prepare_model = prepare_model
