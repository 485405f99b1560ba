"""Checkpoints stay stock: state-dict hooks that gather and scatter the remote experts, and the experts'
optimizer state saved beside the Trainer's own optimizer state.

- `state_dict()` of a patched model holds full `(E, ...)` expert tensors under the stock in-memory names
  (`model.layers.N.mlp.experts.gate_up_proj`), so `save_pretrained` (and with it `Trainer.save_model`,
  checkpoints and `push_to_hub`) writes files that stock transformers loads. Partial tensors are never saved:
  transformers' reverse conversion would renumber the experts.
- `load_state_dict()` accepts in-memory names and the on-disk names of stock files (the Trainer's resume path
  hands over the file's keys as they are); expert tensors are scattered to their holders.
- The experts' optimizer state is one safetensors file per checkpoint, keyed by stock parameter names and holding
  full `(E, ...)` tensors, so a run can resume on a different number of expert ranks. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .expert_state import ExpertState

logger = logging.getLogger(__name__)

EXPERT_OPTIMIZER_FILE = "hetermoe_experts_optimizer.safetensors"
EXPERT_OPTIMIZER_FORMAT = "hf-hetermoe/expert-optimizer/v1"


def _version() -> str:
    from ._version import __version__

    return __version__


# ---- state-dict hooks ---------------------------------------------------------------------------------------
class ExpertStateHooks:
    """Registered on the top-level model by `apply_hetermoe`; removed by `revert_hetermoe`."""

    def __init__(self, model: torch.nn.Module, state: ExpertState):
        self.state = state
        self._cache: tuple[int, dict] | None = None  # (weights_version, full expert tensors)
        self._warned = False
        # torch tags public hooks with an attribute, which bound methods cannot carry: wrap them in closures.
        self.handles = [
            model.register_state_dict_post_hook(lambda *a: self._state_dict_post_hook(*a)),
            model.register_load_state_dict_pre_hook(lambda *a: self._load_pre_hook(*a)),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # Gathering all experts is a collective when attention ranks hold some (colocated mode); the Trainer's
    # save_model runs on every rank, so it calls this first and the state-dict hook then uses the cache.
    def gather_for_save(self) -> None:
        state = self.state
        if state.can_gather_alone():
            full = state.gather_expert_weights(collective=False) if state.groups.is_leader else None
        else:
            full = state.gather_expert_weights(collective=True)
        self._cache = (state.weights_version, full) if full is not None else None

    def drop_cache(self) -> None:
        self._cache = None

    def _full_experts(self) -> dict | None:
        state = self.state
        if self._cache is not None and self._cache[0] == state.weights_version:
            return self._cache[1]
        if not state.groups.is_leader:
            return None
        return state.gather_expert_weights(collective=False)

    def _state_dict_post_hook(self, module, state_dict, prefix, local_metadata) -> None:
        full = self._full_experts()
        if full is None:
            if not self._warned:
                logger.warning(
                    "hetermoe: state_dict() on attention rank %d leaves out the routed experts (they are held on "
                    "other ranks); save from attention rank 0, e.g. with trainer.save_model().",
                    self.state.topology.attention_index(self.state.groups.rank),
                )
                self._warned = True
            return
        for layer, path in self.state.slot_paths.items():
            for name, tensor in full[layer].items():
                state_dict[f"{prefix}{path}.{name}"] = tensor

    def _load_pre_hook(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        state = self.state
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        converted = state.family.checkpoint_to_model_keys(own)
        for key in list(state_dict):
            if key.startswith(prefix):
                del state_dict[key]
        full: dict[int, dict[str, torch.Tensor]] = {}
        for layer, path in state.slot_paths.items():
            for name in state.family.expert_param_names:
                key = f"{path}.{name}"
                if key in converted:
                    full.setdefault(layer, {})[name] = converted.pop(key)
        state_dict.update({prefix + k: v for k, v in converted.items()})
        if not full:
            return
        complete = len(full) == len(state.slot_paths) and all(
            len(t) == len(state.family.expert_param_names) for t in full.values()
        )
        if not complete:
            raise ValueError(
                "hetermoe: the state dict holds routed experts for only some MoE layers; load a complete checkpoint."
            )
        state.load_expert_weights(full)
        self._cache = None


# ---- expert optimizer state ------------------------------------------------------------------------------------
def save_expert_optimizer(expert_state: ExpertState, output_dir: str) -> str | None:
    """Collective over attention ranks. Writes the experts' optimizer state atomically; returns the path (leader)."""
    state = expert_state.gather_optimizer_state()
    if state is None:
        return None
    if not state:
        return None  # no optimizer step yet: nothing to save
    os.makedirs(output_dir, exist_ok=True)
    metadata = {
        "format": EXPERT_OPTIMIZER_FORMAT,
        "hf_hetermoe_version": _version(),
        "optimizer": json.dumps(expert_state.optimizer_spec or {}),  # class and param groups the state belongs to
    }
    path = os.path.join(output_dir, EXPERT_OPTIMIZER_FILE)
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".tmp-hetermoe-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_expert_optimizer(expert_state: ExpertState, checkpoint_dir: str) -> bool:
    """Every attention rank calls this; returns False (and warns) when the checkpoint has no expert state."""
    path = os.path.join(checkpoint_dir, EXPERT_OPTIMIZER_FILE)
    if not os.path.isfile(path):
        logger.warning(
            "hetermoe: %s has no %s; the experts' optimizer starts fresh (resume is not exact).",
            checkpoint_dir, EXPERT_OPTIMIZER_FILE,
        )
        return False
    needs_file = expert_state.groups.is_leader or expert_state.shard is not None
    if needs_file:
        check_expert_optimizer_file(path)
    state = load_file(path) if needs_file else {}
    expert_state.load_optimizer_state(state)
    return True


def check_expert_optimizer_file(path: str) -> dict[str, str]:
    """Read the file's metadata: refuse a file that is not ours, warn when another hf-hetermoe version wrote it."""
    try:
        with safe_open(path, "pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(
            f"hetermoe: {path} is not a readable safetensors file ({exc}). Resume from a complete checkpoint "
            "(checkpoints are written atomically; an older folder may hold a good one)."
        ) from None
    if metadata.get("format") != EXPERT_OPTIMIZER_FORMAT:
        raise ValueError(
            f"hetermoe: {path} has format {metadata.get('format')!r}, not {EXPERT_OPTIMIZER_FORMAT!r}. Resume from "
            "a checkpoint written by hf-hetermoe."
        )
    saved, running = metadata.get("hf_hetermoe_version"), _version()
    if saved != running:
        logger.warning(
            "hetermoe: %s was written by hf-hetermoe %s and is loaded by hf-hetermoe %s; the expert optimizer state "
            "format is the same (%s), but check the release notes if the resumed run behaves differently.",
            path, saved or "an unknown version", running, EXPERT_OPTIMIZER_FORMAT,
        )
    return metadata
