"""The command protocol between the leader (global attention rank 0) and the expert servers.

One dataclass per command, with named fields. A command travels as one fixed-size int64 header, optionally
followed by a JSON payload of the same message:

    header = [MAGIC, PROTOCOL_VERSION, op, payload bytes, int slots ..., float slots (float64 bits) ...]

Field types decide where a field goes: `int`, `bool` and dtypes (`torch.dtype | None`, as small codes) take
int slots in declaration order; `float` takes a float slot and `tuple[float, ...]` takes a count (int slot)
plus float slots; `dict` and `str` go to the JSON payload. `encode` and `decode` are the only code that knows
the layout, so adding a field to a command touches this file alone. A server built from another version
refuses the first header with a message naming both versions.

See docs/architecture.md ("Command protocol") for when each command is sent and what follows it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

PROTOCOL_VERSION = 5
MAGIC = 0x4845544552  # "HETER"
NUM_INTS = 10
NUM_FLOATS = 6
HEADER_LEN = 4 + NUM_INTS + NUM_FLOATS

# Dtypes travel as small integer codes (None: autocast off).
DTYPE_CODES: dict[torch.dtype | None, int] = {
    None: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4,
}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class Command:
    """Base of every command; `OP` is its code on the wire."""

    OP: ClassVar[int]


# ---- the commands ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup(Command):
    """A model was patched: `config` holds the model config and placement (`expert_server.build_setup_payload`);
    the server's expert weights follow, one tensor dict per layer it holds experts of, in ascending layer order.
    `frozen`: the routed experts do not train (requires_grad=False in the model, e.g. a PEFT base model)."""

    OP: ClassVar[int] = 1
    config: dict = field(default_factory=dict)
    frozen: bool = False


@dataclass(frozen=True)
class Forward(Command):
    """Serve the forward exchange of one (layer, stripe) of forward pass `session`."""

    OP: ClassVar[int] = 2
    layer: int
    stripe: int
    session: int
    keep: bool  # keep activations for a backward
    autocast: torch.dtype | None  # autocast dtype of the attention side (None: off)
    row_dtype: torch.dtype  # dtype of the rows on the wire
    seq_len: int  # tokens per sequence of this forward (device emulation scales by it)


@dataclass(frozen=True)
class Backward(Command):
    """Serve the backward exchange of a forward that was kept."""

    OP: ClassVar[int] = 3
    layer: int
    stripe: int
    session: int


@dataclass(frozen=True)
class OptimSetup(Command):
    """Build the experts' optimizer: `spec` = {"class": "module:Qualname", "groups": [...]}."""

    OP: ClassVar[int] = 4
    spec: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GradNorm(Command):
    """Prepare gradients (average over replicas, unscale) and join the squared-norm all-reduce."""

    OP: ClassVar[int] = 5
    unscale: float = 1.0


@dataclass(frozen=True)
class Step(Command):
    """Step the experts with the Trainer's learning rates (one per expert param group) and clip coefficient."""

    OP: ClassVar[int] = 6
    clip_coef: float
    lrs: tuple[float, ...]
    skipped: bool


@dataclass(frozen=True)
class FetchWeights(Command):
    """Send this server's expert weights to the leader (a tensor dict)."""

    OP: ClassVar[int] = 7


@dataclass(frozen=True)
class LoadWeights(Command):
    """Receive this server's expert weights from the leader (a tensor dict follows)."""

    OP: ClassVar[int] = 8


@dataclass(frozen=True)
class FetchOptim(Command):
    """Send this server's expert optimizer state to the leader (a tensor dict)."""

    OP: ClassVar[int] = 9


@dataclass(frozen=True)
class LoadOptim(Command):
    """Receive this server's expert optimizer state from the leader (a tensor dict follows)."""

    OP: ClassVar[int] = 10


@dataclass(frozen=True)
class Stop(Command):
    """The job ended normally: flush, shut down, exit 0."""

    OP: ClassVar[int] = 11


@dataclass(frozen=True)
class Abort(Command):
    """The job failed on an attention rank; `reason` says why."""

    OP: ClassVar[int] = 12
    reason: str = "no reason given"


@dataclass(frozen=True)
class Stats(Command):
    """Send [expert-busy seconds, window seconds] since the previous Stats to the leader."""

    OP: ClassVar[int] = 13


@dataclass(frozen=True)
class Move(Command):
    """Re-place the experts at an optimizer-step boundary: `placement` is the new `ExpertPlacement.to_dict()`;
    moved experts then travel holder to holder (expert_moves.py), in the order every rank derives from the old
    and new placements."""

    OP: ClassVar[int] = 14
    placement: dict = field(default_factory=dict)


COMMANDS: dict[int, type[Command]] = {
    cls.OP: cls for cls in (Setup, Forward, Backward, OptimSetup, GradNorm, Step, FetchWeights, LoadWeights,
                            FetchOptim, LoadOptim, Stop, Abort, Stats, Move)
}


# ---- encoding ---------------------------------------------------------------------------------------------------
class ProtocolError(RuntimeError):
    """A header that is not a command of this protocol version."""


def _kind(hint: Any) -> str:
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    if hint in (dict, str):
        return "json"
    if hint is torch.dtype or set(typing.get_args(hint)) == {torch.dtype, type(None)}:
        return "dtype"
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (float, ...):
        return "floats"
    raise TypeError(f"hetermoe protocol: field type {hint!r} has no wire encoding")


def _layout(cls: type[Command]) -> list[tuple[str, str]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, _kind(hints[f.name])) for f in dataclasses.fields(cls)]


_LAYOUTS = {op: _layout(cls) for op, cls in COMMANDS.items()}


def encode(command: Command) -> tuple[torch.Tensor, bytes]:
    """The int64 header and the JSON payload bytes (empty when the command has no JSON field)."""
    ints: list[int] = []
    floats: list[float] = []
    payload: dict[str, Any] = {}
    for name, kind in _LAYOUTS[command.OP]:
        value = getattr(command, name)
        if kind in ("int", "bool"):
            ints.append(int(value))
        elif kind == "dtype":
            ints.append(DTYPE_CODES[value])
        elif kind == "float":
            floats.append(float(value))
        elif kind == "floats":
            ints.append(len(value))
            floats.extend(float(v) for v in value)
        else:
            payload[name] = value
    if len(ints) > NUM_INTS or len(floats) > NUM_FLOATS:
        raise ValueError(
            f"hetermoe: {type(command).__name__} needs {len(ints)} int and {len(floats)} float slots; the header has "
            f"{NUM_INTS} and {NUM_FLOATS} (experts use at most {NUM_FLOATS - 1} optimizer param groups)."
        )
    data = json.dumps(payload).encode() if payload else b""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1], header[2], header[3] = MAGIC, PROTOCOL_VERSION, command.OP, len(data)
    if ints:
        header[4 : 4 + len(ints)] = torch.tensor(ints, dtype=torch.int64)
    if floats:
        header[4 + NUM_INTS : 4 + NUM_INTS + len(floats)] = torch.tensor(floats, dtype=torch.float64).view(torch.int64)
    return header, data


def payload_size(header: torch.Tensor) -> int:
    """Bytes of JSON payload that follow this header; checks magic and version first."""
    if int(header[0]) != MAGIC:
        raise ProtocolError("hetermoe: received a malformed command (bad magic number).")
    if int(header[1]) != PROTOCOL_VERSION:
        raise ProtocolError(
            f"hetermoe: received a command of protocol version {int(header[1])}, this process speaks version "
            f"{PROTOCOL_VERSION}. Install the same hf-hetermoe version on every node."
        )
    return int(header[3])


def decode(header: torch.Tensor, data: bytes) -> Command:
    payload_size(header)
    op = int(header[2])
    if op not in COMMANDS:
        raise ProtocolError(f"hetermoe: received unknown command code {op}.")
    ints = [int(v) for v in header[4 : 4 + NUM_INTS].tolist()]
    floats = header[4 + NUM_INTS : 4 + NUM_INTS + NUM_FLOATS].clone().view(torch.float64).tolist()
    payload = json.loads(data.decode()) if data else {}
    values: dict[str, Any] = {}
    for name, kind in _LAYOUTS[op]:
        if kind == "int":
            values[name] = ints.pop(0)
        elif kind == "bool":
            values[name] = bool(ints.pop(0))
        elif kind == "dtype":
            values[name] = DTYPES[ints.pop(0)]
        elif kind == "float":
            values[name] = floats.pop(0)
        elif kind == "floats":
            count = ints.pop(0)
            values[name], floats = tuple(floats[:count]), floats[count:]
        else:
            values[name] = payload[name]
    return COMMANDS[op](**values)
