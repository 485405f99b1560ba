"""On-disk checkpoint keys -> in-memory names, with transformers' own conversion mapping.

`from_pretrained` converts stock files (e.g. Mixtral's per-expert `block_sparse_moe.experts.3.w1.weight`) into
fused in-memory tensors (`mlp.experts.gate_up_proj`), and `save_pretrained` converts back. The Trainer's resume
path does neither: it hands the file's keys to `model.load_state_dict`. This module runs the forward
conversion on a plain state dict, with the same transforms `from_pretrained` uses for the model type
(`transformers.conversion_mapping`), in the same order (renamings, then at most one converter per key, keys in
natural order so expert 10 follows expert 9). Families without a mapping (e.g. gpt_oss) store in-memory names
on disk, so their keys pass through unchanged, as do keys that are already in-memory names.

`convert_available` is the same conversion for one file of a sharded checkpoint at a time: it converts what is
complete and hands back the pieces of tensors whose other experts are in files not read yet.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    apply_converters,
    apply_renamings,
    dot_natural_key,
)


def checkpoint_to_model_keys(model_type: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Every key converted; a converted tensor whose sources are incomplete is a ValueError."""
    out, groups, by_pattern = _group(model_type, state_dict)
    for target, members in groups.items():
        _check_complete(target, _found(members), by_pattern[members[0][2]].source_patterns)
        out.update(_convert(target, members, by_pattern, state_dict))
    return out


def convert_available(model_type: str, state_dict: dict[str, Any], num_experts: int) -> tuple[dict, dict]:
    """(converted, waiting): the keys that can be converted now, and the on-disk keys of converted tensors whose
    sources are not all here yet (a sharded checkpoint may put experts 0-3 of a tensor in one file and 4-7 in the
    next; the caller keeps them until the files it has seen complete the tensor). Expert indices outside
    0..num_experts-1 are a ValueError at once: no later file can make such a tensor right."""
    out, groups, by_pattern = _group(model_type, state_dict)
    waiting: dict[str, Any] = {}
    for target, members in groups.items():
        patterns = by_pattern[members[0][2]].source_patterns
        if _is_complete(target, _found(members), patterns, num_experts):
            out.update(_convert(target, members, by_pattern, state_dict))
        else:
            waiting.update({key: state_dict[key] for key, _, _ in members})
    return out, waiting


def _group(model_type: str, state_dict: dict[str, Any]):
    """Renamed pass-through keys, the keys of each converted target (key, renamed key, source pattern), and the
    converter of each source pattern."""
    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    out: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for key in sorted(state_dict, key=dot_natural_key):  # natural order: expert 10 follows expert 9
        renamed = apply_renamings(key, renamings)
        target, pattern = apply_converters(renamed, converters)
        if pattern is None:
            out[renamed] = state_dict[key]
        else:
            groups.setdefault(target, []).append((key, renamed, pattern))
    return out, groups, by_pattern


def _found(members: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for _, renamed, pattern in members:
        found.setdefault(pattern, []).append(renamed)
    return found


def _convert(target: str, members, by_pattern, state_dict) -> dict[str, Any]:
    converter = copy.deepcopy(by_pattern[members[0][2]])  # its own instance: converters collect their sources
    for key, _, pattern in members:
        converter.add_tensor(target, key, pattern, state_dict[key])
    return converter.convert(target)


def _expert_numbers(pattern: str, keys: list[str]) -> list[int]:
    # The `*` of a converter pattern is the expert index (one number per module-list entry).
    index = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
    return [int(m.group(1)) for m in map(index.search, keys) if m is not None]


def _is_complete(target: str, found: dict[str, list[str]], patterns: list[str], num_experts: int) -> bool:
    complete = True
    for pattern in patterns:
        keys = found.get(pattern, [])
        if "*" not in pattern:
            complete = complete and len(keys) == 1
            continue
        numbers = _expert_numbers(pattern, keys)
        wrong = sorted({n for n in numbers if n >= num_experts} | {n for n in numbers if numbers.count(n) > 1})
        if len(numbers) != len(keys) or wrong:
            raise ValueError(
                f"hetermoe: the checkpoint holds experts {sorted(numbers)} for {target!r} ({pattern}); the model has "
                f"experts 0..{num_experts - 1}, each once. Load a checkpoint of this model."
            )
        complete = complete and len(numbers) == num_experts
    return complete


def _check_complete(target: str, found: dict[str, list[str]], patterns: list[str]) -> None:
    """A many-to-one converter stacks whatever it was given: refuse a gap (expert 2 missing) or a missing part
    (w1 without w3) here, rather than load a tensor with the wrong number of experts."""
    counts = set()
    for pattern in patterns:
        keys = found.get(pattern, [])
        if "*" not in pattern:
            counts.add(len(keys))
            continue
        numbers = _expert_numbers(pattern, keys)
        if len(numbers) != len(keys) or sorted(numbers) != list(range(len(numbers))):
            raise ValueError(
                f"hetermoe: the checkpoint holds experts {sorted(numbers)} for {target!r} ({pattern}); expected "
                "0..E-1 without gaps. Load a complete checkpoint."
            )
        counts.add(len(numbers))
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"hetermoe: the checkpoint holds an incomplete set of tensors for {target!r}: "
            f"{ {p: len(found.get(p, [])) for p in patterns} }. Load a complete checkpoint."
        )
