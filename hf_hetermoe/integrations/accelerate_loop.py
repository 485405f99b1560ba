"""`hf_hetermoe.prepare(accelerator, model, optimizer)`: HeterMoE for a training loop written on `Accelerator`.

The loop stays the stock Accelerate loop::

    model, optimizer = hf_hetermoe.prepare(accelerator, model, optimizer)    # instead of accelerator.prepare
    loader, scheduler = accelerator.prepare(loader, scheduler)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

What keeps its stock meaning, and how (DDP semantics over the attention ranks, experts on their holders):
- the model is patched (`apply_hetermoe`) and prepared by the Accelerator without DDP (device placement,
  autocast): HeterMoE averages the attention gradients itself, once per optimizer step, and only on steps
  where `accelerator.sync_gradients` is true (so `accelerator.accumulate` keeps its meaning);
- `accelerator.backward` is unchanged: the experts' backward runs on their holders inside it;
- `accelerator.clip_grad_norm_` clips by the norm over attention and expert gradients of all ranks, experts by the
  same coefficient; it is refused on an accumulation step that does not sync (the gradients are partial there),
  and `clip_grad_value_` is refused (the experts' gradients are not on this rank);
- `optimizer.step()` also steps the experts (an optimizer of the same class, each expert tensor with the
  hyperparameters of the param group its stock tensor is in, at the learning rate just used); a step the fp16
  loss scaler skips is skipped by the experts too;
- `accelerator.get_state_dict`, `save_state`, `load_state` and the model's `save_pretrained` hold and restore the
  full stock experts (and the experts' optimizer state beside the optimizer's, `hetermoe_experts_optimizer.safetensors`).

Under `hetermoe launch` (attention ranks run the script; expert ranks, started by the same launcher, serve the
experts) the roles come from the launcher; without it the model runs colocated over the script's own world.
Only the given Accelerator instance and model instance change; the classes stay stock.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from ..checkpoint import load_expert_optimizer, save_expert_optimizer
from ..config import HeterMoEConfig
from ..patching import apply_hetermoe, default_groups, get_engine, state_hooks
from ..precision import check_grad_scaler, enabled_scaler, scaled_clip_grad_norm

_REFUSED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def prepare(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            config: HeterMoEConfig | str | None = None) -> tuple[torch.nn.Module, Any]:
    """Patch `model` for HeterMoE and prepare it and `optimizer` with `accelerator`; returns (model, optimizer)
    to use as `accelerator.prepare` would return them. Every attention rank calls it, in the same order.

    `optimizer` must be built over the model's parameters before this call (the experts' optimizer takes each
    expert tensor's hyperparameters from the param group that holds it). `config`: a HeterMoEConfig or a YAML
    path; under `hetermoe launch` None means the launcher's config, else colocated."""
    from ..launch import job

    _check_accelerator(accelerator, model)
    group_of = _expert_groups(model, optimizer)  # first: a refused optimizer leaves the model stock, no groups built
    if isinstance(config, str):
        config = HeterMoEConfig.from_yaml(config)
    launched = job()
    if launched is not None:
        groups = launched[1]
        config = config or launched[0]
    else:
        config = config or HeterMoEConfig(mode="colocated")
        groups = default_groups(config, accelerator.device)
    engine = apply_hetermoe(model, config, groups)
    model = accelerator.prepare_model(model, evaluation_mode=True)  # no DDP: HeterMoE averages gradients itself
    optimizer = accelerator.prepare_optimizer(optimizer)
    check_grad_scaler(getattr(accelerator, "scaler", None))
    engine.state.setup_optimizer(optimizer, group_of)
    _Loop(accelerator, model, optimizer, engine.state).install()
    return model, optimizer


def _check_accelerator(accelerator: Any, model: torch.nn.Module) -> None:
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if str(kind).upper() in _REFUSED:
        raise ValueError(f"hetermoe: the Accelerator uses {kind}, which shards or places the model itself; HeterMoE "
                         "places the experts itself. Launch with plain data parallelism (MULTI_GPU, MULTI_CPU).")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or getattr(model, "_is_accelerate_prepared", False):
        raise ValueError("hetermoe: the model was already prepared by the Accelerator (wrapped in DDP). Pass the "
                         "bare model to hf_hetermoe.prepare instead of accelerator.prepare.")
    if get_engine(model) is not None:
        raise ValueError("hetermoe: this model is already patched for HeterMoE; call hf_hetermoe.prepare once.")


def _expert_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The optimizer param group of each fused expert tensor: the group that holds its stock parameter in the
    first MoE layer (every layer's experts share the groups' rules), so the experts get the stock hyperparameters."""
    from model_patches import get_family

    family = get_family(getattr(model.config, "model_type", None))
    slots = family.experts_slots(model)
    if not slots:
        raise ValueError(f"hetermoe: found no routed-experts modules ({family.experts_class.__name__}) in the model.")
    index_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    out = {}
    for name, param in model.get_submodule(slots[0].path).named_parameters():
        if id(param) not in index_of:
            raise ValueError(
                f"hetermoe: the optimizer does not hold the experts' `{name}`; build it over model.parameters() (or "
                "param groups that include the experts) before hf_hetermoe.prepare.")
        out[name] = index_of[id(param)]
    return out


class _Loop:
    """The replaced methods of one Accelerator instance, one model instance and its optimizer."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, state: Any):
        self.accelerator, self.model, self.optimizer, self.state = accelerator, model, optimizer, state
        self.norm_done = False  # the global norm (which unscales the experts' fp16 gradients) ran this step

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def owns(self, parameters: list[torch.nn.Parameter]) -> bool:
        ours = {id(p) for p in self.model.parameters()}
        return any(id(p) in ours for p in parameters)

    def scaler(self) -> Any:
        return enabled_scaler(self.accelerator)

    def install(self) -> None:
        acc, state, hooks = self.accelerator, self.state, state_hooks(self.model)
        stock = {name: getattr(acc, name) for name in
                 ("clip_grad_norm_", "clip_grad_value_", "get_state_dict", "save_state", "load_state")}
        stock_step = self.optimizer.step
        stock_save_pretrained = self.model.save_pretrained

        def clip_grad_norm_(parameters, max_norm, norm_type=2):
            parameters = list(parameters)
            if not self.owns(parameters):
                return stock["clip_grad_norm_"](parameters, max_norm, norm_type)
            if not acc.sync_gradients:
                raise ValueError(
                    "hetermoe: accelerator.clip_grad_norm_ was called on an accumulation step that does not sync "
                    "gradients; the norm is global over attention and expert gradients, which are complete only on "
                    "the step that syncs. Clip under `if accelerator.sync_gradients:`.")
            if float(norm_type) != 2.0:
                raise ValueError(f"hetermoe: clip_grad_norm_ supports the L2 norm (norm_type=2), got {norm_type}.")
            acc.unscale_gradients()
            self.norm_done = True
            return scaled_clip_grad_norm(state, parameters, float(max_norm), self.scaler())

        def clip_grad_value_(parameters, clip_value):
            parameters = list(parameters)
            if not self.owns(parameters):
                return stock["clip_grad_value_"](parameters, clip_value)
            raise ValueError("hetermoe: accelerator.clip_grad_value_ is not supported with HeterMoE (the experts' "
                             "gradients live on their holders); use accelerator.clip_grad_norm_.")

        def step(optimizer, *args, **kwargs):
            if not acc.sync_gradients:
                return stock_step(*args, **kwargs)  # a no-op, as stock (accumulating)
            state.finish_gradients(self.params())  # DDP's average, before the optimizer reads the gradients
            if not self.norm_done and self.scaler() is not None:
                acc.unscale_gradients()  # fp16 without clipping: the experts are unscaled (and checked) too
                scaled_clip_grad_norm(state, self.params(), None, self.scaler())
            out = stock_step(*args, **kwargs)
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            lrs = [float(inner.param_groups[i]["lr"]) for i in state.optimizer_groups]
            state.step(lrs=lrs, skipped=bool(self.optimizer.step_was_skipped))
            self.norm_done = False
            rebalancer = get_engine(self.model).rebalancer
            if rebalancer is not None:  # a step boundary: the experts just stepped (rebalancer.py)
                rebalancer.after_step()
            return out

        def get_state_dict(model, unwrap=True):
            if acc.unwrap_model(model) is not self.model:
                return stock["get_state_dict"](model, unwrap)
            hooks.gather_for_save()  # collective over attention ranks when some of them hold experts
            try:
                return stock["get_state_dict"](model, unwrap)
            finally:
                hooks.drop_cache()

        def save_pretrained(*args, **kwargs):
            if kwargs.get("state_dict") is not None:
                return stock_save_pretrained(*args, **kwargs)
            hooks.gather_for_save()
            try:
                return stock_save_pretrained(*args, **kwargs)
            finally:
                hooks.drop_cache()

        def save_state(output_dir=None, *args, **kwargs):
            location = stock["save_state"](output_dir, *args, **kwargs)
            save_expert_optimizer(state, location)  # collective over attention ranks; the leader writes
            acc.wait_for_everyone()
            return location

        def load_state(input_dir=None, *args, **kwargs):
            folders: list[str] = []  # the folder accelerate resolves (automatic checkpoint naming included)
            handle = acc.register_load_state_pre_hook(lambda models, folder: folders.append(folder))
            # safetensors' load_model reads model.state_dict() first (for its key check): gather the experts now,
            # on every attention rank, since attention ranks that hold experts must all take part.
            hooks.gather_for_save()
            try:
                out = stock["load_state"](input_dir, *args, **kwargs)
            finally:
                handle.remove()
                hooks.drop_cache()
            load_expert_optimizer(state, folders[0])
            return out

        acc.clip_grad_norm_ = clip_grad_norm_
        acc.clip_grad_value_ = clip_grad_value_
        acc.get_state_dict = get_state_dict
        acc.save_state = save_state
        acc.load_state = load_state
        # A bound method, as torch's lr schedulers expect of `optimizer.step` (they wrap it through __func__).
        self.optimizer.step = types.MethodType(step, self.optimizer)
        self.model.save_pretrained = save_pretrained
