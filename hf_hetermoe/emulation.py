"""Device emulation: make each compute task take the time it would take on a chosen GPU.

On a 2-core CPU machine four processes cannot overlap real compute, so schedules cannot show their speed-up.
With emulation on, every compute task computes its real result (numbers stay exact) and then sleeps until
the modelled duration for its rank's emulated device has passed. Sleeping frees the CPU, so what is measured
is the schedule: which tasks overlap and where ranks wait. The modelled durations come from the planner's
device profiles (hf_hetermoe/planner/profiles.py) for an emulated model shape and sequence length:

    emulation:
      devices: [A40, A40, V100, V100]   # the emulated GPU of each global rank
      model: D1                         # shape whose costs are emulated (preset or config.json); default: the real model
      seq_len: 8192                     # emulated tokens per sequence; default: the real length

A real row of the tiny model stands for `seq_len / real_seq_len` emulated tokens. Everything printed or
logged under emulation says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

EMULATION_LABEL = "EMULATED"


def _show(value: Any) -> str:
    from .config_messages import show  # shared with config.py, which imports this module

    return show(value)


@dataclass(frozen=True, kw_only=True)
class EmulationConfig:
    devices: tuple[str, ...]
    model: str | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        # Validated on keyword construction too, so `EmulationConfig(devices=...)` fails like the same YAML.
        devices = self.devices
        if not isinstance(devices, (list, tuple)) or not devices or not all(isinstance(d, str) for d in devices):
            raise ValueError(
                f"hetermoe config: `emulation.devices` must list one GPU name per global rank, got {_show(devices)}. "
                "Write e.g. `devices: [A40, A40, V100, V100]`."
            )
        object.__setattr__(self, "devices", tuple(devices))
        from .planner.presets import resolve_model
        from .planner.profiles import builtin_profile

        for name in self.devices:
            try:
                builtin_profile(name)
            except (KeyError, ValueError) as exc:
                raise ValueError(
                    f"hetermoe config: `emulation.devices` names unknown GPU {_show(name)} ({exc}). Use built-in GPU names."
                ) from None
        seq_len = self.seq_len
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= 1 << 24):
            raise ValueError(
                f"hetermoe config: `emulation.seq_len` must be an integer from 1 to {1 << 24}, got {_show(seq_len)}. "
                "Use the emulated sequence length, e.g. 8192."
            )
        model = self.model
        if model is not None:
            if not isinstance(model, str) or not model.strip() or "\0" in model:
                raise ValueError(
                    f"hetermoe config: `emulation.model` must be a preset name or a config.json path, got {_show(model)}. "
                    "Name a preset (W1, W2, D1, D2, D3) or the path of a Hugging Face config.json."
                )
            try:  # resolved now, before any process waits, rather than when the first rank builds its emulator
                resolve_model(model)
            except Exception as exc:  # a malformed config.json fails in many ways; each is the same user mistake
                raise ValueError(
                    f"hetermoe config: `emulation.model` {_show(model)} cannot be used ({type(exc).__name__}: {exc}). "
                    "Name a preset (W1, W2, D1, D2, D3) or the path of a Hugging Face config.json."
                ) from None

    @classmethod
    def from_dict(cls, data: Any) -> "EmulationConfig | None":
        if data is None or data is False:
            return None
        if not isinstance(data, dict):
            raise ValueError(
                f"hetermoe config: `emulation` must be a mapping, got {_show(data)}. Write e.g. "
                "`emulation: {devices: [A40, A40, V100, V100]}`."
            )
        known = {"devices", "model", "seq_len"}
        unknown = sorted(_show(k) if not isinstance(k, str) else k for k in data if not (isinstance(k, str) and k in known))
        if unknown:
            raise ValueError(f"hetermoe config: `emulation` has unknown key(s) {unknown}. Known: devices, model, seq_len.")
        return cls(devices=data.get("devices"), model=data.get("model"), seq_len=data.get("seq_len"))

    def to_dict(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "model": self.model, "seq_len": self.seq_len}

    def check_world(self, world_size: int) -> None:
        if len(self.devices) != world_size:
            raise ValueError(
                f"hetermoe config: `emulation.devices` lists {len(self.devices)} devices but {world_size} processes "
                "run. List one emulated GPU per global rank."
            )


class DeviceEmulator:
    """Modelled durations on one rank's emulated device, and the sleep that pads a task up to them."""

    def __init__(self, config: EmulationConfig, *, rank: int, model_config: Any):
        from .planner.presets import resolve_model
        from .planner.model_shape import ModelShape
        from .planner.profiles import builtin_profile

        self.config = config
        self.device_name = config.devices[rank]
        self.profile = builtin_profile(self.device_name)
        self.shape = resolve_model(config.model) if config.model else ModelShape.from_hf_config(model_config)
        self.emulated_seq_len = config.seq_len

    def _scale(self, real_seq_len: int) -> float:
        return (self.emulated_seq_len or real_seq_len) / max(real_seq_len, 1)

    def attention_s(self, direction: str, *, num_seqs: int, real_seq_len: int) -> float:
        if num_seqs == 0:
            return 0.0
        seq = self.emulated_seq_len or real_seq_len
        fwd, bwd = self.profile.attention_s(self.shape, num_seqs=num_seqs, seq_len=seq)
        return fwd if direction == "F" else bwd

    def experts_s(self, direction: str, *, rows_per_expert: list[int], real_seq_len: int) -> float:
        scale = self._scale(real_seq_len)
        total = 0.0
        for rows in rows_per_expert:
            if rows:
                fwd, bwd = self.profile.expert_s(self.shape, num_tokens=rows * scale)
                total += fwd if direction == "F" else bwd
        return total

    def head_s(self, direction: str, *, num_tokens: int, real_seq_len: int) -> float:
        if num_tokens == 0:
            return 0.0
        fwd, bwd = self.profile.head_s(self.shape, num_tokens=num_tokens * self._scale(real_seq_len))
        return fwd if direction == "F" else bwd

    @staticmethod
    def pad(start: float, modelled_s: float) -> None:
        """Sleep until `modelled_s` seconds have passed since `start` (perf_counter)."""
        remaining = modelled_s - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
