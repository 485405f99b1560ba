"""ExpertShard: the routed experts one rank holds, with their activations, gradients and optimizer.

An expert server holds one; so does every rank in colocated mode. Each MoE layer's local experts live in a
stock experts module of the family (e.g. `MixtralExperts`) built for `num_local` experts, so the math (and the
experts implementation transformers picked: grouped_mm or a loop) is the stock one. Rows arrive one per
(token, k) pair, so the module is called with top-1 routing and weight 1; the routing weights are applied by
the attention rank on combine.

Gradient semantics match DDP: a holder's gradient is the sum of every attention rank's contribution, divided by
the number of data-parallel replicas (attention ranks) before clipping and stepping.

Legend: R = rows received, H = hidden size, n = experts of a layer held here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any

import torch
from torch import nn

from .expert_keys import ExpertTensorKey
from .grad_norm import local_norm
from .grouped_rows import run_experts
from .instrumentation import DataPathObserver
from .numerics import FiniteMonitor
from .placement import ExpertPlacement
from .transport import ExchangeKey

# Optimizer hyperparameters that are bookkeeping added by schedulers, not constructor arguments.
_NOT_HYPERPARAMS = {"params", "initial_lr"}


def optimizer_hyperparams(optimizer: torch.optim.Optimizer, group_index: int) -> dict[str, Any]:
    """The JSON-able hyperparameters of one param group, restricted to what the class constructor accepts."""
    accepted = set(inspect.signature(type(optimizer).__init__).parameters)
    out = {}
    for k, v in optimizer.param_groups[group_index].items():
        if k in _NOT_HYPERPARAMS or k not in accepted:
            continue
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    return out


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def select_experts(tensor: torch.Tensor, experts: tuple[int, ...] | list[int], *,
                   view_ok: bool = False) -> torch.Tensor:
    """Rows `experts` of a full `(E, ...)` tensor, as a new tensor on its device (the index is built on that
    device: index_select refuses a CPU index for a CUDA tensor).

    `view_ok`: consecutive experts (every placement's usual case) come back as a view instead, for a caller that
    only reads them at once (sending): no copy of them is made on the tensor's device."""
    experts = list(experts)
    if view_ok and experts == list(range(experts[0], experts[0] + len(experts))):
        return tensor.narrow(0, experts[0], len(experts))
    index = torch.tensor(experts, dtype=torch.int64, device=tensor.device)
    return tensor.index_select(0, index)


def import_class(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    if module_name == "__main__":
        raise ValueError(
            f"hetermoe: the Trainer's optimizer class {qualname} is defined in the training script itself; expert "
            "servers cannot import it. Define it in an importable module."
        )
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class ExpertShard:
    def __init__(
        self, *, family: Any, model_config: Any, placement: ExpertPlacement, rank: int, device: torch.device,
        dtype: torch.dtype, num_replicas: int, recompute: bool = False, allocate: bool = True,
    ):
        """`allocate=False`: the experts' tensors stay unallocated (on the meta device) until `load_layer_weights`
        gives each layer its weights, which then become the parameters' storage. Setup uses it so that no layer's
        experts are ever held twice (its random initial values would be overwritten anyway)."""
        self.family = family
        self.model_config = model_config  # a move (expert_moves.py) builds new modules of the same family
        self.placement = placement
        self.rank = rank
        self.device = device
        self.dtype = dtype
        self.num_replicas = num_replicas
        # Keep only the inputs between forward and backward; rebuild the experts' graph in backward.
        self.recompute = recompute
        self.local: dict[int, tuple[int, ...]] = {}  # layer -> expert ids held here
        self.modules: dict[int, nn.Module] = {}  # layer -> stock experts module with the local experts
        for layer in placement.layers:
            experts = placement.local_experts(rank, layer)
            if experts:
                self.local[layer] = experts
                if allocate:
                    module = family.make_local_experts(model_config, len(experts)).to(device=device, dtype=dtype)
                else:
                    with torch.device("meta"):
                        module = family.make_local_experts(model_config, len(experts)).to(dtype=dtype)
                self.modules[layer] = module
        self.saved: dict[ExchangeKey, tuple] = {}
        self.observer = DataPathObserver()  # the owner's instrumentation (timeline, device emulation)
        self.optimizer: torch.optim.Optimizer | None = None
        self._grads_prepared = False
        self._finite_checked = False  # this step's finite report was made (with the norm, or at the step)
        # NaN/inf in expert outputs and gradients, reported per layer/expert/rank (numerics.py).
        self.check_finite = True
        self.finite = FiniteMonitor(rank)

    # ---- parameters ------------------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[int, str, nn.Parameter]]:
        return [
            (layer, name, getattr(self.modules[layer], name))
            for layer in sorted(self.modules)
            for name in self.family.expert_param_names
        ]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, p in self.named_parameters()]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The shard's parameters that train (frozen experts, e.g. under PEFT, have requires_grad=False)."""
        return [p for p in self.parameters() if p.requires_grad]

    def freeze(self, frozen: bool) -> None:
        """Frozen routed experts (the model's expert tensors had requires_grad=False when it was patched, e.g. a
        PEFT base model): they get no gradient, no optimizer state and nothing in the global norm; input gradients
        still flow through them."""
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's `(n, ...)` slice of every fused expert tensor, keyed by `ExpertTensorKey.weight`."""
        return {ExpertTensorKey.weight(layer, name).encode(): p.detach() for layer, name, p in self.named_parameters()}

    def load_local_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """The expert tensors `tensors` holds, keyed by `ExpertTensorKey.weight` (from any device). A sharded
        checkpoint completes its tensors file by file, so a load may bring only some layers or tensors; a key for
        a layer or tensor this shard does not hold is a ValueError (before anything is loaded)."""
        keys = {text: ExpertTensorKey.decode(text) for text in tensors}
        for text, key in keys.items():
            if key.layer not in self.modules or key.name not in self.family.expert_param_names or not key.is_weight:
                raise ValueError(f"hetermoe: rank {self.rank} holds no expert weights {text!r} (layers "
                                 f"{sorted(self.modules)}, tensors {list(self.family.expert_param_names)}).")
        for text, key in sorted(keys.items(), key=lambda item: (item[1].layer, item[1].name)):
            self._load_tensor(key.layer, key.name, tensors[text])

    def load_layer_weights(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """One layer's `(n, ...)` expert weights, keyed by `ExpertTensorKey.weight` (from any device); every
        tensor of the layer must be there."""
        for name in self.family.expert_param_names:
            key = ExpertTensorKey.weight(layer, name).encode()
            if key not in tensors:
                raise ValueError(f"hetermoe: expert weights for layer {layer} ({name}) are missing.")
            self._load_tensor(layer, name, tensors[key])

    def _load_tensor(self, layer: int, name: str, src: torch.Tensor) -> None:
        """A parameter not yet allocated (`allocate=False`) takes the given tensor as its storage when it already has
        this shard's device and dtype (the caller hands it over), else a converted copy; an allocated one is copied
        into, so its identity and storage (which an optimizer may hold) stay."""
        p = getattr(self.modules[layer], name)
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(
                f"hetermoe: expert weights {name} of layer {layer} have shape {tuple(src.shape)}, "
                f"expected {tuple(p.shape)} on rank {self.rank}."
            )
        with torch.no_grad():
            if p.is_meta:
                # A new Parameter (a meta tensor cannot take real storage in place); nothing refers to the
                # placeholder yet, the optimizer is built after setup.
                weights = src.detach().to(device=self.device, dtype=self.dtype).contiguous()
                setattr(self.modules[layer], name, nn.Parameter(weights, requires_grad=p.requires_grad))
            else:
                p.copy_(src.to(device=p.device, dtype=p.dtype))

    def check_loaded(self) -> None:
        """RuntimeError if a layer never got its weights (a setup that sent fewer layers than this rank holds)."""
        missing = sorted(layer for layer, module in self.modules.items()
                         if any(t.is_meta for t in [*module.parameters(), *module.buffers()]))
        if missing:
            raise RuntimeError(f"hetermoe: rank {self.rank} got no expert weights for layers {missing}.")

    def slice_full(self, full: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pick this rank's experts out of full `(E, ...)` tensors `{layer: {name: tensor}}` (of any subset of
        layers and tensors), on the device those tensors are on."""
        out = {}
        for layer, tensors in full.items():
            if layer not in self.local:
                continue
            for name, tensor in tensors.items():  # a sharded checkpoint's file may complete only some tensors
                out[ExpertTensorKey.weight(layer, name).encode()] = select_experts(tensor, self.local[layer])
        return out

    # ---- compute ---------------------------------------------------------------------------------------
    def _run(self, layer: int, x: torch.Tensor, local_expert_R: torch.Tensor, grad: bool,
             autocast_dtype: torch.dtype | None, grouping: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.detach().clone()
        autocast = (
            torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        # The experts' graph is the holder's own: keep it out of any activation checkpoint the attention model
        # is running (in-process holders), whose saved-tensor hooks would count it as part of the layer.
        own_graph = torch.autograd.graph.saved_tensors_hooks(_identity, _identity)
        with torch.set_grad_enabled(grad), autocast, own_graph:
            return run_experts(self.modules[layer], x, local_expert_R.to(x.device), grouping,
                               len(self.local[layer]), autocast=autocast_dtype is not None)

    def _report(self, direction: str, key: ExchangeKey, local_expert_R: torch.Tensor, seq_len: int, start: float) -> None:
        rows = []
        if self.observer.needs_rows_per_expert:
            rows = torch.bincount(local_expert_R, minlength=len(self.local[key.layer])).tolist()
        self.observer.experts_done(direction, key.layer, key.stripe, start, rows_per_expert=rows, seq_len=seq_len)

    def forward(
        self, key: ExchangeKey, x_RH: torch.Tensor, local_expert_R: torch.Tensor, *, keep: bool,
        autocast_dtype: torch.dtype | None, seq_len: int = 1,
        grouping: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`grouping`: the rows' permutation into expert order (`ExchangePlan.recv_grouping`); None when they
        arrive in expert order (grouped_rows.py)."""
        start = self.observer.now()
        if keep:
            self._drop_sessions_before(key.session)
        x = x_RH.detach().requires_grad_(keep)
        y = self._run(key.layer, x, local_expert_R, keep and not self.recompute, autocast_dtype, grouping)
        if keep:
            # With recompute, only the inputs stay; the graph is rebuilt in backward.
            self.saved[key] = (x, None if self.recompute else y, autocast_dtype, local_expert_R, seq_len, grouping)
        self._report("F", key, local_expert_R, seq_len, start)
        if self.check_finite:  # docs/reliability.md, "NaN reports"
            self.finite.rows("the output", key.layer, y, local_expert_R, len(self.local[key.layer]))
        return y.detach()

    def backward(self, key: ExchangeKey, dy_RH: torch.Tensor) -> torch.Tensor:
        start = self.observer.now()
        if key not in self.saved:
            raise RuntimeError(
                f"hetermoe: rank {self.rank} has no saved activations for layer {key.layer} stripe {key.stripe} "
                f"of forward {key.session}; a backward ran without its forward (or after a newer forward)."
            )
        x, y, autocast_dtype, local_expert_R, seq_len, grouping = self.saved.pop(key)
        if self.recompute:
            y = self._run(key.layer, x, local_expert_R, True, autocast_dtype, grouping)
        if x.shape[0] and y.requires_grad:
            torch.autograd.backward(y, dy_RH.to(y.dtype))
        self._report("B", key, local_expert_R, seq_len, start)
        dx = x.grad if x.grad is not None else torch.zeros_like(x)
        if self.check_finite:  # docs/reliability.md, "NaN reports"
            self.finite.rows("the input gradient", key.layer, dx, local_expert_R, len(self.local[key.layer]))
        return dx

    def _drop_sessions_before(self, session: int) -> None:
        for stale in [k for k in self.saved if k.session < session]:
            del self.saved[stale]

    # ---- gradients and optimizer -------------------------------------------------------------------------
    def prepare_grads(self, unscale: float = 1.0) -> None:
        """Once per optimizer step (later calls until `step` do nothing): average over replicas (DDP semantics)
        and unscale, one foreach multiply for all trainable gradients."""
        if self._grads_prepared:
            return
        self._grads_prepared = True
        grads = []
        for p in self.trainable_parameters():
            if p.grad is None:
                # Stock fused expert tensors always get a gradient (zeros for unused experts), and optimizers
                # such as AdamW still decay and update momentum for them; keep that.
                p.grad = torch.zeros_like(p)
            else:
                grads.append(p.grad)
        factor = unscale / self.num_replicas
        if factor != 1.0 and grads:
            torch._foreach_mul_(grads, factor)

    def grad_norm_parts(self, unscale: float = 1.0) -> list[torch.Tensor]:
        """Prepare this step's gradients, then what the step's one host copy carries for this shard (0-dim
        tensors on the device, no synchronisation): the norm of its trainable gradients, computed as stock
        computes norms (grad_norm.py), and with `check_finite` the non-finite rows counted since the last step.
        Hand the host values to `end_grad_norm`."""
        self.prepare_grads(unscale)
        parts = [local_norm((p.grad for p in self.trainable_parameters() if p.grad is not None), self.device)]
        if self.check_finite:
            parts.append(self.finite.pending_bad_rows(self.device))
        return parts

    def end_grad_norm(self, host_parts: list[float]) -> None:
        """The host values of `grad_norm_parts`: the once-per-step finite report (docs/reliability.md, "NaN and
        inf"), which reads nothing more from the device unless something is not finite."""
        if self.check_finite and not self._finite_checked:
            self._finite_checked = True
            self.finite.end_step(host_parts[0], self, bad_rows=host_parts[1])

    def build_optimizer(self, class_path: str, groups: list[dict[str, Any]]) -> None:
        """`groups`: [{"hyperparams": {...}, "params": [fused tensor names]}], in the order STEP sends lrs."""
        cls = import_class(class_path)

        def typed(hyper: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}

        param_groups = []
        for group in groups:
            # Frozen experts take no optimizer state (as the Trainer leaves requires_grad=False parameters out).
            params = [p for _, name, p in self.named_parameters() if name in group["params"] and p.requires_grad]
            param_groups.append({"params": params, **typed(group["hyperparams"])})
        placed = sum(len(g["params"]) for g in param_groups)
        if placed != len(self.trainable_parameters()):
            raise RuntimeError(f"hetermoe: expert rank {self.rank}: optimizer groups cover {placed} of "
                               f"{len(self.trainable_parameters())} trainable expert tensors.")
        if not placed:
            self.optimizer, self._group_lr_index = None, []  # every expert here is frozen: nothing to step
            return
        self.optimizer = cls([g for g in param_groups if g["params"]], **typed(groups[0]["hyperparams"]))
        self._group_lr_index = [i for i, g in enumerate(param_groups) if g["params"]]

    def step(self, *, lrs: list[float], clip_coef: float, skipped: bool) -> None:
        self.prepare_grads()
        if self.check_finite and not self._finite_checked:  # no norm this step: the check reads its own counters
            self.finite.end_step(None, self, bad_rows=None)
        params = self.trainable_parameters()
        if not skipped and params:  # a shard whose experts are all frozen has no optimizer and steps nothing
            if self.optimizer is None:
                raise RuntimeError(
                    f"hetermoe: expert rank {self.rank} was asked to step before its optimizer was set up."
                )
            if clip_coef != 1.0:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], clip_coef)
            for group, lr_index in zip(self.optimizer.param_groups, self._group_lr_index):
                group["lr"] = lrs[lr_index]
            self.optimizer.step()
        for p in params:
            p.grad = None
        self._grads_prepared = False
        self._finite_checked = False

    # ---- optimizer state (topology independent) ------------------------------------------------------------
    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Every optimizer-state tensor of this rank, keyed by `ExpertTensorKey.optimizer`: per-expert state as
        `(n, ...)` slices, state shared by all experts of a tensor (e.g. a scalar step) as it is."""
        if self.optimizer is None:
            return {}
        out = {}
        for layer, name, p in self.named_parameters():
            for state_key, value in self.optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                per_expert = value.dim() >= 1 and value.shape[0] == p.shape[0]
                key = ExpertTensorKey.optimizer(layer, name, state_key, per_expert=per_expert)
                out[key.encode()] = value.detach()
        return out

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.optimizer is None and not self.trainable_parameters():
            return  # every expert here is frozen: no optimizer, no state
        if self.optimizer is None:
            raise RuntimeError(f"hetermoe: expert rank {self.rank} has no optimizer to load state into.")
        index_of_tensor = {(layer, name): i for i, (layer, name, _) in enumerate(self.named_parameters())}
        params = self.parameters()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for text, value in tensors.items():
            key = ExpertTensorKey.decode(text)
            index = index_of_tensor.get((key.layer, key.name))
            if index is not None and key.state is not None:
                # As stock resume does (the Trainer loads optimizer.pt with map_location="cpu"): hand the optimizer
                # CPU tensors and let its load_state_dict place them by torch's own policy, which moves per-parameter
                # state to the parameter's device and dtype but keeps `step` where it is (on CPU, unless the
                # optimizer is fused or capturable). A CUDA `step` would cost a device sync per parameter per step.
                # State shared by all experts of a tensor (`step`) is copied: the optimizer increments it in place,
                # and the caller's tensor must not change with it.
                value = value.detach().to("cpu")
                state.setdefault(index, {})[key.state] = value if key.per_expert else value.clone()
        index_of = {id(p): i for i, p in enumerate(params)}
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": [index_of[id(p)] for p in g["params"]]}
            for g in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
