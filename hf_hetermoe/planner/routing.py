"""Per-expert routing loads for the simulator: uniform, Zipf-skewed, or the counts the runtime logged.

Real routing is not uniform: in every all-to-all the busiest holder (the GPU whose experts received the most
rows) sets the pace, both for its compute and for its link. A `Routing` gives, per MoE layer, each expert's
share of the layer's routed (token, k) copies; `workload.py` turns shares into the busiest holder's rows.

    uniform       every expert 1/n (the paper's profiler assumes this)
    zipf:S        shares proportional to 1/rank^S (S > 0), the ranks shuffled over the experts with a fixed seed
                  per layer (so hot experts do not all sit on the first expert GPU)
    PATH          counts logged by the runtime (`HETERMOE_ROUTING_LOG=DIR` writes DIR/routing-rank<R>.json,
                  cumulative per layer and expert); PATH is one such file or a folder whose files are summed
"""

from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass

LOG_ENV = "HETERMOE_ROUTING_LOG"


@dataclass(frozen=True, kw_only=True)
class Routing:
    name: str
    shares: tuple[tuple[float, ...], ...] | None = None  # [layer][expert], each row sums to 1; None: uniform

    @property
    def is_uniform(self) -> bool:
        return self.shares is None

    def layer_shares(self, layer: int, num_experts: int) -> list[float]:
        if self.shares is None:
            return [1.0 / num_experts] * num_experts
        return list(self.shares[layer])

    def check(self, *, num_layers: int, num_experts: int) -> None:
        if self.shares is None:
            return
        if len(self.shares) != num_layers or any(len(row) != num_experts for row in self.shares):
            widths = sorted({len(row) for row in self.shares})
            raise ValueError(
                f"routing {self.name}: gives {len(self.shares)} layers x {widths} experts but the model has "
                f"{num_layers} MoE layers x {num_experts} experts. Log the routing of the same model."
            )


UNIFORM = Routing(name="uniform")


def zipf(exponent: float, *, num_layers: int, num_experts: int, seed: int = 0) -> Routing:
    if not exponent > 0:
        raise ValueError(f"routing zipf:{exponent}: the exponent must be positive, e.g. zipf:1.2.")
    weights = [1.0 / (rank + 1) ** exponent for rank in range(num_experts)]
    total = sum(weights)
    rows = []
    for layer in range(num_layers):
        order = list(range(num_experts))
        random.Random(seed * 1_000_003 + layer).shuffle(order)  # expert order[r] gets the r-th largest share
        row = [0.0] * num_experts
        for rank, expert in enumerate(order):
            row[expert] = weights[rank] / total
        rows.append(tuple(row))
    return Routing(name=f"zipf:{exponent:g}", shares=tuple(rows))


def write_counts(folder: str, rank: int, counts: dict[int, list[int]]) -> str:
    """The runtime's log: cumulative routed (token, k) pairs per expert of each MoE layer (layer keys as given)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"routing-rank{rank}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"layers": {str(layer): list(row) for layer, row in sorted(counts.items())}}, fh)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def load_counts(path: str) -> dict[int, list[int]]:
    files = sorted(glob.glob(os.path.join(path, "routing-rank*.json"))) if os.path.isdir(path) else [path]
    if not files:
        raise ValueError(f"routing {path}: the folder holds no routing-rank*.json. Train with {LOG_ENV}={path} first.")
    total: dict[int, list[int]] = {}
    for file in files:
        try:
            with open(file) as fh:
                layers = json.load(fh)["layers"]
            rows = {int(layer): [int(c) for c in row] for layer, row in layers.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"routing {file}: not a routing log ({type(exc).__name__}: {exc}). Use a file written under "
                f"{LOG_ENV}, or uniform, or zipf:S."
            ) from None
        for layer, row in rows.items():
            if layer in total and len(total[layer]) != len(row):
                raise ValueError(f"routing {file}: layer {layer} has {len(row)} experts, other files {len(total[layer])}.")
            total[layer] = [a + b for a, b in zip(total[layer], row)] if layer in total else row
    return total


def observed(path: str) -> Routing:
    counts = load_counts(path)
    rows = []
    for layer in sorted(counts):
        row = counts[layer]
        if sum(row) <= 0 or min(row) < 0:
            raise ValueError(f"routing {path}: layer {layer} has no routed pairs (or negative counts).")
        rows.append(tuple(c / sum(row) for c in row))
    return Routing(name=os.path.basename(os.path.normpath(path)), shares=tuple(rows))


def parse_routing(text: str, *, num_layers: int, num_experts: int) -> Routing:
    """`uniform`, `zipf:S` or the path of a runtime routing log (file or folder)."""
    if text == "uniform":
        return UNIFORM
    if text.startswith("zipf:"):
        try:
            exponent = float(text[5:])
        except ValueError:
            raise ValueError(f"routing {text!r}: write zipf:S with a number S > 0, e.g. zipf:1.2.") from None
        return zipf(exponent, num_layers=num_layers, num_experts=num_experts)
    if not os.path.exists(text):
        raise ValueError(f"routing {text!r}: not uniform, zipf:S or an existing routing log (file or folder).")
    routing = observed(text)
    routing.check(num_layers=num_layers, num_experts=num_experts)
    return routing
