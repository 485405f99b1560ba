"""Checkpoints stay stock: state-dict hooks that gather and scatter the remote experts, and the experts'
optimizer state saved beside the Trainer's own optimizer state.

- `state_dict()` of a patched model holds full `(E, ...)` expert tensors under the stock in-memory names
  (`model.layers.N.mlp.experts.gate_up_proj`), so `save_pretrained` (and with it `Trainer.save_model`,
  checkpoints and `push_to_hub`) writes files that stock transformers loads. Partial tensors are never saved:
  transformers' reverse conversion would renumber the experts.
- `load_state_dict()` accepts in-memory names and the on-disk names of stock files (the Trainer's resume path
  hands over the file's keys as they are); expert tensors are scattered to their holders. A state dict may hold
  any subset: the Trainer loads a sharded checkpoint one file per call, and a file may hold only some experts of
  a tensor, so those pieces are kept until the files seen so far complete the tensor. Each call reports the
  expert tensors it did not load as missing keys, as stock does.
- The experts' optimizer state is one safetensors file per checkpoint, keyed by stock parameter names and holding
  full `(E, ...)` tensors, so a run can resume on a different number of expert ranks. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_patches.conversion import convert_available

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
        # On-disk expert pieces (stock file keys) of tensors whose other experts are in files not loaded yet.
        self.pieces: dict[str, torch.Tensor] = {}
        self._listing = 0  # > 0: state_dict() lists expert keys with meta placeholders (see `listing_keys`)
        self._placeholders: dict[str, torch.Tensor] | None = None
        self._config = getattr(model, "config", None)
        self._dtype = getattr(model, "dtype", None)
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

    @contextlib.contextmanager
    def listing_keys(self) -> Iterator[None]:
        """While active, `state_dict()` names the experts with meta tensors of their full shape and gathers
        nothing. The Trainer's checkpoint loads call `model.state_dict()` only for its keys (to list missing
        ones); a gather there would fetch every expert from the servers, and in colocated mode it is a collective
        that ranks other than the leader would never join."""
        self._listing += 1
        try:
            yield
        finally:
            self._listing -= 1

    def _expert_placeholders(self) -> dict[str, torch.Tensor]:
        if self._placeholders is None:
            state = self.state
            with torch.device("meta"):
                stock = state.family.make_local_experts(self._config, state.placement.num_experts)
            self._placeholders = {
                f"{path}.{name}": torch.empty_like(getattr(stock, name), dtype=self._dtype)
                for path in state.slot_paths.values() for name in state.family.expert_param_names
            }
        return self._placeholders

    def _full_experts(self) -> dict | None:
        state = self.state
        if self._cache is not None and self._cache[0] == state.weights_version:
            return self._cache[1]
        if not state.groups.is_leader:
            return None
        return state.gather_expert_weights(collective=False)

    def _state_dict_post_hook(self, module, state_dict, prefix, local_metadata) -> None:
        if self._listing:
            for key, placeholder in self._expert_placeholders().items():
                state_dict[prefix + key] = placeholder
            return
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
        """Scatter the expert tensors the state dict completes (with the pieces earlier calls left: one file of a
        sharded checkpoint at a time); expert tensors not loaded by this call are reported missing, as stock
        `load_state_dict` reports every key a partial state dict lacks."""
        state = self.state
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for key in list(state_dict):
            if key.startswith(prefix):
                del state_dict[key]
        converted, self.pieces = convert_available(
            state.family.model_type, {**self.pieces, **own}, state.placement.num_experts
        )
        full: dict[int, dict[str, torch.Tensor]] = {}
        for layer, path in state.slot_paths.items():
            for name in state.family.expert_param_names:
                key = f"{path}.{name}"
                if key in converted:
                    full.setdefault(layer, {})[name] = converted.pop(key)
                else:
                    missing.append(prefix + key)
        state_dict.update({prefix + k: v for k, v in converted.items()})
        if full:
            state.load_expert_weights(full)
            self._cache = None

    def waiting_tensors(self) -> list[str]:
        """The on-disk tensors (expert index as `*`) whose pieces are held, waiting for the rest of their experts."""
        return sorted({re.sub(r"\.experts\.\d+\.", ".experts.*.", key) for key in self.pieces})


def load_trainer_checkpoint(hooks: ExpertStateHooks, folder: str, load: Callable[[], Any]) -> Any:
    """Run one of the Trainer's checkpoint loads (`load`, reading `folder`): experts are listed, not gathered;
    a sharded checkpoint whose index names a file that is not there, or whose files leave an expert tensor
    incomplete, is a ValueError naming what is missing (stock would resume with those weights untouched)."""
    check_checkpoint_files(folder)
    hooks.pieces = {}  # pieces of an earlier, unrelated load never mix with this checkpoint's
    with hooks.listing_keys():
        result = load()
    if hooks.pieces:
        waiting = hooks.waiting_tensors()
        hooks.pieces = {}
        raise ValueError(
            f"hetermoe: the checkpoint {folder} leaves expert tensors incomplete: {waiting} (some experts are in no "
            "file the index names). Resume from a complete checkpoint."
        )
    return result


def check_checkpoint_files(folder: str) -> None:
    """ValueError naming every file a sharded checkpoint's index lists that `folder` lacks."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME

    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index_path = os.path.join(folder, index_name)
        if not os.path.isfile(index_path):
            continue
        with open(index_path, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        lost = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if lost:
            raise ValueError(
                f"hetermoe: the checkpoint {folder} is missing {lost}, which {index_name} lists (holding "
                f"{sum(f in lost for f in weight_map.values())} tensors). Restore the file(s) or resume from "
                "another checkpoint."
            )
        return  # the Trainer loads the safetensors index when both exist


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
