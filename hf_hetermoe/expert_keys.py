"""Names of expert tensors, in one place: what travels between holders and what the checkpoint file holds.

Two spellings, each encoded and decoded only here:
- `ExpertTensorKey.encode()`: the key of one holder's tensor in a tensor dict sent over the command channel.
  Weights: `"<layer>/<name>"` (this holder's `(n, ...)` slice of a fused expert tensor). Optimizer state:
  `"E|<layer>/<name>/<state>"` for per-expert state (`(n, ...)`, e.g. Adam's `exp_avg`) and
  `"S|<layer>/<name>/<state>"` for state shared by all experts of the tensor (e.g. Adam's scalar `step`).
- `stock_state_name` / `parse_stock_state_name`: the key of a full `(E, ...)` optimizer-state tensor in the
  checkpoint file, `"<experts module path>.<name>#<state>"` (stock parameter name, then the state key).
"""

from __future__ import annotations

from dataclasses import dataclass

_PER_EXPERT, _SHARED = "E", "S"


@dataclass(frozen=True)
class ExpertTensorKey:
    """One fused expert tensor of a layer (`state` None), or one optimizer-state entry of it."""

    layer: int
    name: str  # fused expert tensor, e.g. "gate_up_proj"
    state: str | None = None  # optimizer state key, e.g. "exp_avg"; None for the weight itself
    per_expert: bool = True  # indexed by expert along dim 0 (sliced per holder) or shared by all experts

    def __post_init__(self) -> None:
        if "/" in self.name or "|" in self.name:
            raise ValueError(f"hetermoe: expert tensor name {self.name!r} may not contain '/' or '|'.")
        if self.state is None and not self.per_expert:
            raise ValueError("hetermoe: an expert weight key is always per expert.")

    @classmethod
    def weight(cls, layer: int, name: str) -> ExpertTensorKey:
        return cls(layer=layer, name=name)

    @classmethod
    def optimizer(cls, layer: int, name: str, state: str, *, per_expert: bool) -> ExpertTensorKey:
        return cls(layer=layer, name=name, state=state, per_expert=per_expert)

    @property
    def is_weight(self) -> bool:
        return self.state is None

    def encode(self) -> str:
        base = f"{self.layer}/{self.name}"
        if self.state is None:
            return base
        return f"{_PER_EXPERT if self.per_expert else _SHARED}|{base}/{self.state}"

    @classmethod
    def decode(cls, text: str) -> ExpertTensorKey:
        kind, bar, rest = text.partition("|")
        try:
            if not bar:
                layer, name = text.split("/")
                return cls.weight(int(layer), name)
            if kind not in (_PER_EXPERT, _SHARED):
                raise ValueError(kind)
            layer, name, state = rest.split("/", 2)
            return cls.optimizer(int(layer), name, state, per_expert=kind == _PER_EXPERT)
        except ValueError:
            raise ValueError(f"hetermoe: {text!r} is not an expert tensor key.") from None


def stock_state_name(module_path: str, name: str, state: str) -> str:
    """Checkpoint-file key of a full optimizer-state tensor: stock parameter name, '#', state key."""
    return f"{module_path}.{name}#{state}"


def parse_stock_state_name(text: str) -> tuple[str, str, str]:
    """(experts module path, fused tensor name, state key) of a checkpoint-file key."""
    stem, hash_, state = text.partition("#")
    path, dot, name = stem.rpartition(".")
    if not hash_ or not dot or not state:
        raise ValueError(f"hetermoe: expert optimizer state {text!r} is not '<experts path>.<param>#<state>'.")
    return path, name, state
