"""Relative expert speed of every rank of a job, for `expert_split: proportional` (and any policy that places
experts by speed, e.g. a re-placement policy taking `speeds: dict[rank, float]`).

A rank's speed is one expert's routed rows per second (forward + backward) on its device's built-in planner
profile (hf_hetermoe/planner/profiles.py), for the model's shape at a nominal load (`tokens_per_expert`, default
one sequence of the emulated or nominal length routed over the experts: k * seq_len / n rows). The device is
`emulation.devices[rank]` when the job emulates devices, else the GPU name the rank reported at launch
(launch_facts.py) reduced to a built-in name ("Tesla V100-SXM2-32GB" -> V100). A device without a built-in
profile (a CPU without emulation, an unknown GPU) cannot be ranked: ValueError, give weights instead.

Pure Python (no torch): config.py calls it while validating, before any process group waits.
"""

from __future__ import annotations

from typing import Any, Iterable

NOMINAL_SEQ_LEN = 4096  # tokens per sequence of the nominal load when the job emulates no sequence length


def device_profile_name(device_name: str) -> str | None:
    """The built-in profile a reported device name stands for, or None."""
    from .planner.profiles import canonical_device_name
    from .planner.profiles import BUILTIN_GPUS

    if not isinstance(device_name, str) or not device_name:
        return None
    exact = {k.lower(): k for k in BUILTIN_GPUS}.get(device_name.lower())
    if exact is not None:
        return exact
    canonical = canonical_device_name(device_name)
    return canonical if canonical in BUILTIN_GPUS else None


def expert_speeds(*, ranks: Iterable[int], emulation: Any = None, device_names: list[str] | tuple[str, ...] | None = None,
                  model_config: Any = None, shape: Any = None, tokens_per_expert: float | None = None,
                  what: str = "`expert_split: proportional`", unknown: float | None = None) -> dict[int, float]:
    """{global rank: expert rows per second} for `ranks` (any ranks: expert or attention).

    `emulation` (an EmulationConfig) wins over `device_names` (every rank's reported GPU name, in rank order).
    `shape` (a planner ModelShape) or `model_config` (a transformers config) gives the expert's size; the
    emulated model's shape (`emulation.model`) replaces both when set. `unknown`: the speed of a rank whose device
    has no built-in profile, or of every rank when no device is known (default: a ValueError). With `unknown`, the
    speeds are relative to a device's rows/s only when every device is known; a caller that mixes known and unknown
    devices should pass speeds it scales itself.
    """
    from .planner.model_shape import ModelShape
    from .planner.presets import resolve_model
    from .planner.profiles import BUILTIN_GPUS

    ranks = list(ranks)
    if emulation is not None and emulation.model:
        shape = resolve_model(emulation.model)
    elif shape is None:
        if model_config is None:
            raise ValueError(f"hetermoe: {what} needs the model's shape to rank devices; pass the model config.")
        shape = ModelShape.from_hf_config(model_config)
    if emulation is not None:
        names = list(emulation.devices)
        source = "emulated"
    elif device_names is not None:
        names = list(device_names)
        source = "reported"
    elif unknown is not None:
        return {rank: float(unknown) for rank in ranks}
    else:
        raise ValueError(
            f"hetermoe: {what} needs each rank's device, and none is known here (no emulation, no launch facts). "
            "Give the weights per expert rank instead, e.g. `expert_split: [2, 1]`.")
    if tokens_per_expert is None:
        seq_len = (emulation.seq_len if emulation is not None and emulation.seq_len else None) or NOMINAL_SEQ_LEN
        tokens_per_expert = shape.top_k * seq_len / shape.num_experts
    speeds: dict[int, float] = {}
    for rank in ranks:
        name = names[rank] if 0 <= rank < len(names) else None
        profile = device_profile_name(name) if name is not None else None
        if profile is None and unknown is not None:
            speeds[rank] = float(unknown)
            continue
        if profile is None:
            raise ValueError(
                f"hetermoe: {what} ranks devices by their built-in profiles, but rank {rank} runs on the {source} "
                f"device {name!r}, which has none (built-in: {', '.join(BUILTIN_GPUS)}). Give the weights per expert "
                "rank instead, e.g. `expert_split: [2, 1]`, or emulate devices (`emulation.devices`).")
        fwd, bwd = BUILTIN_GPUS[profile].expert_s(shape, num_tokens=tokens_per_expert)
        speeds[rank] = tokens_per_expert / (fwd + bwd)
    return speeds
