"""On-disk checkpoint keys -> in-memory names, with transformers' own conversion mapping.

`from_pretrained` converts stock files (e.g. Mixtral's per-expert `block_sparse_moe.experts.3.w1.weight`) into
fused in-memory tensors (`mlp.experts.gate_up_proj`), and `save_pretrained` converts back. The Trainer's resume
path does neither: it hands the file's keys to `model.load_state_dict`. This module runs the forward
conversion on a plain state dict, with the same transforms `from_pretrained` uses for the model type
(`transformers.conversion_mapping`), in the same order (renamings, then at most one converter per key, keys in
natural order so expert 10 follows expert 9). Families without a mapping (e.g. gpt_oss) store in-memory names
on disk, so their keys pass through unchanged, as do keys that are already in-memory names.
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
    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}

    out: dict[str, Any] = {}
    pending: dict[str, WeightConverter] = {}  # target key -> its own converter instance, collecting sources
    sources: dict[str, dict[str, list[str]]] = {}  # target key -> source pattern -> renamed source keys
    for key in sorted(state_dict, key=dot_natural_key):
        renamed = apply_renamings(key, renamings)
        target, pattern = apply_converters(renamed, converters)
        if pattern is None:
            out[renamed] = state_dict[key]
            continue
        converter = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        converter.add_tensor(target, key, pattern, state_dict[key])
        sources.setdefault(target, {}).setdefault(pattern, []).append(renamed)
    for target, converter in pending.items():
        _check_complete(target, sources[target], converter.source_patterns)
        out.update(converter.convert(target))
    return out


def _check_complete(target: str, found: dict[str, list[str]], patterns: list[str]) -> None:
    """A many-to-one converter stacks whatever it was given: refuse a gap (expert 2 missing) or a missing part
    (w1 without w3) here, rather than load a tensor with the wrong number of experts."""
    counts = set()
    for pattern in patterns:
        keys = found.get(pattern, [])
        if "*" not in pattern:
            counts.add(len(keys))
            continue
        # The `*` of a converter pattern is the expert index (one number per module-list entry).
        index = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
        numbers = [int(m.group(1)) for m in map(index.search, keys) if m is not None]
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
