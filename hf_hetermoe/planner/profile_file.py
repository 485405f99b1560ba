"""Measured device profiles: the JSON file `hetermoe profile` writes and `hetermoe plan --profile` reads.

Layout (one file may hold several devices, e.g. every GPU of one machine)::

    {"format": "hetermoe-profile/1", "created_by": "...", "model": {ModelShape fields}, "seq_len": 8192,
     "devices": [{"name": "A40", "description": "NVIDIA A40", "kind": "cuda", "generation": [8, 6],
                  "memory_bytes": 47...,
                  "attention": {"num_seqs": [1, 2], "fwd_s": [...], "bwd_s": [...]},     # T_A^Attn
                  "expert": {"num_tokens": [512, 1024], "fwd_s": [...], "bwd_s": [...]},  # T_E on this device
                  "head": {"num_tokens": [8192, 16384], "fwd_s": [...], "bwd_s": [...]},
                  "memory": {"method": "...", "activation_bytes_per_token_attention": ...,
                             "activation_bytes_per_copy_expert": ..., "peak_attention_bytes": ...,
                             "peak_expert_bytes": ...}}]}

Each module is measured at two sizes; `MeasuredProfile` fits time = fixed + per-unit * size through them
(both terms clamped at >= 0, so splitting work never looks cheaper: the lower bound stays a bound). A
measured profile is valid only for its model and sequence length; asking it about others is a ValueError.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .model_shape import ModelShape

FORMAT = "hetermoe-profile/1"
_GEOMETRY = ("num_layers", "hidden_size", "intermediate_size", "num_experts", "top_k", "num_heads", "num_kv_heads",
             "head_dim", "vocab_size", "dtype")


@dataclass(frozen=True, kw_only=True)
class Affine:
    """time(size) = fixed + per_unit * size, from measurements at several sizes."""

    fixed: float
    per_unit: float

    @classmethod
    def fit(cls, sizes: list[float], times: list[float]) -> "Affine":
        if len(sizes) != len(times) or not sizes:
            raise ValueError("profile: each module needs as many times as sizes (at least one).")
        if len(sizes) == 1 or max(sizes) == min(sizes):
            return cls(fixed=0.0, per_unit=max(times) / max(sizes))
        n = len(sizes)
        mx, my = sum(sizes) / n, sum(times) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
        slope = max(slope, 0.0)
        fixed = my - slope * mx
        if fixed < 0:  # noise made the intercept negative: go through the origin instead
            fixed, slope = 0.0, sum(x * y for x, y in zip(sizes, times)) / sum(x * x for x in sizes)
        return cls(fixed=fixed, per_unit=slope)

    def __call__(self, size: float) -> float:
        return self.fixed + self.per_unit * size


@dataclass(frozen=True, kw_only=True)
class MeasuredProfile:
    """A `DeviceCosts` built from measurements of one device on one model and sequence length."""

    name: str
    description: str
    kind: str  # "cuda" or "cpu"
    generation: tuple[int, int]
    memory_bytes: int
    shape: ModelShape
    seq_len: int
    attention_fwd: Affine
    attention_bwd: Affine
    expert_fwd: Affine
    expert_bwd: Affine
    head_fwd: Affine
    head_bwd: Affine
    activation_bytes_per_token_attention: float | None = None
    activation_bytes_per_copy_expert: float | None = None

    def _check(self, shape: ModelShape, seq_len: int | None = None) -> None:
        mismatched = [k for k in _GEOMETRY if getattr(shape, k) != getattr(self.shape, k)]
        if mismatched:
            k = mismatched[0]
            raise ValueError(
                f"profile: the measured profile of {self.name} is for model {self.shape.name!r} ({k}="
                f"{getattr(self.shape, k)!r}) but the plan uses {shape.name!r} ({k}={getattr(shape, k)!r}). "
                "Profile the same model, or drop --model to use the profile's."
            )
        if seq_len is not None and seq_len != self.seq_len:
            raise ValueError(
                f"profile: the measured profile of {self.name} is for --seq-len {self.seq_len}, not {seq_len}. "
                f"Profile at {seq_len} or plan at {self.seq_len}."
            )

    def attention_s(self, shape: ModelShape, *, num_seqs: float, seq_len: int) -> tuple[float, float]:
        self._check(shape, seq_len)
        return self.attention_fwd(num_seqs), self.attention_bwd(num_seqs)

    def expert_s(self, shape: ModelShape, *, num_tokens: float) -> tuple[float, float]:
        self._check(shape)
        return self.expert_fwd(num_tokens), self.expert_bwd(num_tokens)

    def head_s(self, shape: ModelShape, *, num_tokens: float) -> tuple[float, float]:
        self._check(shape)
        return self.head_fwd(num_tokens), self.head_bwd(num_tokens)


def _fail(path: str, problem: str) -> ValueError:
    return ValueError(f"profile: {path} {problem}. Write it with `hetermoe profile`.")


def _series(path: str, device: dict[str, Any], module: str, size_key: str) -> tuple[Affine, Affine]:
    entry = device.get(module)
    if not isinstance(entry, dict) or not all(k in entry for k in (size_key, "fwd_s", "bwd_s")):
        raise _fail(path, f"lacks `{module}` timings ({size_key}, fwd_s, bwd_s) for device {device.get('name')!r}")
    sizes = [float(x) for x in entry[size_key]]
    return Affine.fit(sizes, [float(x) for x in entry["fwd_s"]]), Affine.fit(sizes, [float(x) for x in entry["bwd_s"]])


def load_profiles(path: str | os.PathLike) -> tuple[ModelShape, int, dict[str, MeasuredProfile]]:
    """(model shape, sequence length, {device name: profile}) from one profile file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"profile: no file at {path!r}. Pass a file written by `hetermoe profile`.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail(path, f"is not a {FORMAT} file")
    try:
        shape = ModelShape.from_dict(data["model"])
        seq_len = int(data["seq_len"])
        devices = data["devices"]
    except (KeyError, TypeError) as exc:
        raise _fail(path, f"lacks the field {exc}") from None
    out: dict[str, MeasuredProfile] = {}
    for device in devices:
        if not isinstance(device, dict) or "name" not in device or "memory_bytes" not in device:
            raise _fail(path, "has a device entry without `name` or `memory_bytes`")
        attention, expert, head = (_series(path, device, m, k) for m, k in
                                   (("attention", "num_seqs"), ("expert", "num_tokens"), ("head", "num_tokens")))
        memory = device.get("memory") or {}
        name = str(device["name"])
        out[name] = MeasuredProfile(
            name=name, description=str(device.get("description", name)), kind=str(device.get("kind", "cuda")),
            generation=tuple(device.get("generation", (0, 0))), memory_bytes=int(device["memory_bytes"]),
            shape=shape, seq_len=seq_len,
            attention_fwd=attention[0], attention_bwd=attention[1], expert_fwd=expert[0], expert_bwd=expert[1],
            head_fwd=head[0], head_bwd=head[1],
            activation_bytes_per_token_attention=memory.get("activation_bytes_per_token_attention"),
            activation_bytes_per_copy_expert=memory.get("activation_bytes_per_copy_expert"),
        )
    if not out:
        raise _fail(path, "lists no devices")
    return shape, seq_len, out


def save_profiles(path: str | os.PathLike, *, shape: ModelShape, seq_len: int, devices: list[dict[str, Any]],
                  created_by: str) -> str:
    data = {"format": FORMAT, "created_by": created_by, "model": shape.to_dict(), "seq_len": seq_len,
            "devices": devices}
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    return path
