"""HeterMoEConfig: the typed, strictly validated HeterMoE configuration (YAML in and out).

A config file looks like::

    attention_ranks: [0, 1]      # global ranks, or "auto" (ranks on the newest devices)
    expert_ranks: [2, 3]         # default: every rank not listed as attention
    mode: disaggregated          # or colocated (every rank runs attention and holds 1/W of the experts)
    zebra: {microbatches: 2}     # R: stripes per micro-batch (default 2 disaggregated, 1 colocated)
    asym_ea: off                 # off | auto | {layer: experts moved per expert rank}
    timeout_s: 300               # how long a data-path collective may wait before it fails

Every mistake is a `ValueError` that names the field and says how to fix it. Validation happens in three
stages, each as early as the facts it needs are known, and always before any process group waits:
`HeterMoEConfig.from_dict` (the file alone), `resolve_topology` (plus the world size) and
`HeterMoEConfig.check_model` (plus the model config).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .emulation import EmulationConfig

MODES = ("disaggregated", "colocated")


def _fail(field_name: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"hetermoe config: `{field_name}` {problem}. {fix}")


def _as_rank_list(field_name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail(field_name, f"must be a list of global ranks, got {value!r}", f"Write e.g. `{field_name}: [0, 1]`.")
    ranks = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise _fail(field_name, f"holds {item!r}, which is not an integer rank", "List integer ranks only.")
        if item < 0:
            raise _fail(field_name, f"holds the negative rank {item}", "Ranks count from 0.")
        ranks.append(item)
    if len(set(ranks)) != len(ranks):
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        raise _fail(field_name, f"lists rank(s) {dup} more than once", "List each rank once.")
    if not ranks:
        raise _fail(field_name, "is empty", "List at least one rank, or leave the field out.")
    return tuple(sorted(ranks))


@dataclass(frozen=True, kw_only=True)
class ZebraConfig:
    """Zebra parallelism: each micro-batch is split into `microbatches` (R) stripes on the batch axis.

    `microbatches` None means the default: 2 with expert ranks (disaggregated), 1 when colocated.
    `expert_recompute`: expert servers keep only their inputs between forward and backward and recompute the
    experts' activations in backward (less memory, one more expert forward).
    """

    microbatches: int | None = None
    expert_recompute: bool = False

    def stripes(self, mode: str) -> int:
        if self.microbatches is not None:
            return self.microbatches
        return 2 if mode == "disaggregated" else 1

    @classmethod
    def from_dict(cls, data: Any) -> "ZebraConfig":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise _fail("zebra", f"must be a mapping, got {data!r}", "Write e.g. `zebra: {microbatches: 2}`.")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise _fail("zebra", f"has unknown key(s) {unknown}", "Known keys: microbatches, expert_recompute.")
        r = data.get("microbatches")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise _fail("zebra.microbatches", f"must be an integer >= 1, got {r!r}", "Use 1 (no zebra), 2 or 4.")
        recompute = data.get("expert_recompute", False)
        if not isinstance(recompute, bool):
            raise _fail("zebra.expert_recompute", f"must be true or false, got {recompute!r}", "Use true or false.")
        return cls(microbatches=r, expert_recompute=recompute)


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The resolved role of every global rank (DESIGN.md section 2)."""

    world_size: int
    mode: str
    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]  # pure expert servers (empty in colocated mode)

    @property
    def num_attention(self) -> int:
        return len(self.attention_ranks)

    @property
    def host_ranks(self) -> tuple[int, ...]:
        """Ranks that hold routed experts by default: the servers, or every rank when colocated."""
        return self.attention_ranks if self.mode == "colocated" else self.expert_ranks

    def is_attention(self, rank: int) -> bool:
        return rank in self.attention_ranks

    def attention_index(self, rank: int) -> int:
        return self.attention_ranks.index(rank)

    def describe(self) -> str:
        if self.mode == "colocated":
            return f"colocated: {self.world_size} ranks, each runs attention and holds 1/{self.world_size} of the experts"
        return (
            f"disaggregated: attention ranks {list(self.attention_ranks)}, "
            f"expert ranks {list(self.expert_ranks)} (world size {self.world_size})"
        )


@dataclass(frozen=True, kw_only=True)
class HeterMoEConfig:
    """Typed HeterMoE configuration. Build with `from_yaml`, `from_dict` or keywords."""

    attention_ranks: tuple[int, ...] | str | None = None  # None: "auto" when disaggregated, all when colocated
    expert_ranks: tuple[int, ...] | None = None
    mode: str = "disaggregated"
    zebra: ZebraConfig = field(default_factory=ZebraConfig)
    asym_ea: str | dict[int, int] = "off"
    timeout_s: float = 300.0
    emulation: EmulationConfig | None = None  # device emulation for CPU benchmarks (see emulation.py)

    def __post_init__(self) -> None:
        # Keyword construction is validated and normalised exactly like a file, so both accept the same configs.
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in HeterMoEConfig._validate_fields(raw).items():
            object.__setattr__(self, name, value)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> "HeterMoEConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(
                f"hetermoe config: the file must hold a mapping of settings, got {type(data).__name__}. "
                "Write e.g. `mode: colocated` or `attention_ranks: [0, 1]`."
            )
        unknown = sorted(set(map(str, data)) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"hetermoe config: unknown key(s) {unknown}. Known keys: {sorted(f.name for f in dataclasses.fields(cls))}.")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "HeterMoEConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"hetermoe config: no file at {path!r}. Pass the path of a hetermoe YAML config.")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"hetermoe config: {path} is not valid YAML ({exc}). Fix the syntax.") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{exc} (in {path})") from None

    def to_dict(self) -> dict[str, Any]:
        att = self.attention_ranks
        return {
            "attention_ranks": list(att) if isinstance(att, tuple) else att,
            "expert_ranks": list(self.expert_ranks) if self.expert_ranks is not None else None,
            "mode": self.mode,
            "zebra": {k: v for k, v in (("microbatches", self.zebra.microbatches),
                                        ("expert_recompute", self.zebra.expert_recompute)) if v is not None},
            "asym_ea": dict(self.asym_ea) if isinstance(self.asym_ea, dict) else self.asym_ea,
            "timeout_s": self.timeout_s,
            "emulation": self.emulation.to_dict() if self.emulation is not None else None,
        }

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        data = {k: v for k, v in self.to_dict().items() if v is not None}
        text = yaml.safe_dump(data, sort_keys=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    # ---- stage 1: the file alone --------------------------------------------------------------------
    @staticmethod
    def _validate_fields(data: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in dataclasses.fields(HeterMoEConfig)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ValueError(
                f"hetermoe config: unknown key(s) {unknown}. Known keys: {sorted(known)}."
            )
        out: dict[str, Any] = {}

        mode = data.get("mode", "disaggregated")
        if mode not in MODES:
            raise _fail("mode", f"is {mode!r}", f"Use one of {list(MODES)}.")
        out["mode"] = mode

        att = data.get("attention_ranks")
        if att is not None and att != "auto":
            att = _as_rank_list("attention_ranks", att)
        elif isinstance(att, str) and att != "auto":
            raise _fail("attention_ranks", f"is {att!r}", 'Use a list of ranks or "auto".')
        out["attention_ranks"] = att

        exp = data.get("expert_ranks")
        if exp is not None:
            exp = _as_rank_list("expert_ranks", exp)
        out["expert_ranks"] = exp

        if mode == "colocated" and exp:
            raise _fail(
                "expert_ranks", "is set in colocated mode, where every rank runs attention and holds experts",
                "Remove `expert_ranks`, or use `mode: disaggregated`.",
            )
        if mode == "colocated" and att == "auto":
            raise _fail("attention_ranks", 'is "auto" in colocated mode', "Leave it out: every rank is both.")
        if isinstance(att, tuple) and exp is not None:
            both = sorted(set(att) & set(exp))
            if both:
                raise _fail(
                    "expert_ranks", f"overlaps attention_ranks on rank(s) {both}",
                    "A rank is either an attention rank or an expert rank in disaggregated mode.",
                )

        zebra = data.get("zebra")
        out["zebra"] = zebra = zebra if isinstance(zebra, ZebraConfig) else ZebraConfig.from_dict(zebra)
        if mode == "colocated" and (zebra.microbatches or 1) > 1:
            raise _fail(
                "zebra.microbatches", f"is {zebra.microbatches} in colocated mode; zebra parallelism overlaps attention "
                "ranks with separate expert ranks", "Use `mode: disaggregated` with expert ranks, or microbatches 1.",
            )

        out["asym_ea"] = _validate_asym_ea(data.get("asym_ea", "off"))

        timeout = data.get("timeout_s", 300.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise _fail("timeout_s", f"must be a positive number of seconds, got {timeout!r}", "Use e.g. 300.")
        out["timeout_s"] = float(timeout)
        emulation = data.get("emulation")
        out["emulation"] = emulation if isinstance(emulation, EmulationConfig) else EmulationConfig.from_dict(emulation)
        return out

    # ---- stage 2: plus the world size ---------------------------------------------------------------
    @property
    def uses_auto_roles(self) -> bool:
        """Roles come from each rank's device generation (newest -> attention), known only at launch."""
        return self.mode == "disaggregated" and self.expert_ranks is None and self.attention_ranks in (None, "auto")

    def resolve_topology(self, world_size: int, device_capabilities: list[tuple[int, int]] | None = None) -> Topology:
        """Decide each rank's role for `world_size` processes.

        `device_capabilities[r]` is rank r's device generation (CUDA compute capability); it is only needed for
        `attention_ranks: auto`, which picks the ranks on the newest devices.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"hetermoe: world size must be a positive integer, got {world_size!r}.")
        if self.emulation is not None:
            self.emulation.check_world(world_size)
        if self.mode == "colocated":
            if self.attention_ranks not in (None, "auto"):
                if tuple(self.attention_ranks) != tuple(range(world_size)):
                    raise _fail(
                        "attention_ranks", f"is {list(self.attention_ranks)} but colocated mode uses every rank "
                        f"of the world of {world_size}", "Leave `attention_ranks` out in colocated mode.",
                    )
            ranks = tuple(range(world_size))
            return Topology(world_size=world_size, mode="colocated", attention_ranks=ranks, expert_ranks=())

        att = self.attention_ranks
        if att is None or att == "auto":
            if self.expert_ranks is not None:
                att = tuple(r for r in range(world_size) if r not in self.expert_ranks)
            else:
                att = _auto_attention_ranks(world_size, device_capabilities)
        for name, ranks in (("attention_ranks", att), ("expert_ranks", self.expert_ranks or ())):
            bad = [r for r in ranks if r >= world_size]
            if bad:
                raise _fail(
                    name, f"lists rank(s) {bad}, outside the world of {world_size} processes (ranks 0..{world_size - 1})",
                    "Launch more processes or list ranks that exist.",
                )
        exp = self.expert_ranks if self.expert_ranks is not None else tuple(r for r in range(world_size) if r not in att)
        if not exp:
            raise _fail(
                "attention_ranks", f"covers all {world_size} ranks, leaving no expert ranks",
                "List fewer attention ranks, launch more processes, or use `mode: colocated`.",
            )
        covered = set(att) | set(exp)
        if len(covered) != world_size:
            missing = sorted(set(range(world_size)) - covered)
            raise ValueError(
                f"hetermoe config: attention_ranks {list(att)} and expert_ranks {list(exp)} cover "
                f"{len(covered)} ranks but {world_size} processes were launched (rank(s) {missing} have no role). "
                f"Launch {len(covered)} processes or give every rank a role."
            )
        return Topology(world_size=world_size, mode="disaggregated", attention_ranks=tuple(att), expert_ranks=tuple(exp))

    # ---- stage 3: plus the model --------------------------------------------------------------------
    def check_model(self, model_config: Any, topology: Topology) -> None:
        """Check that this model can be split over `topology` (supported family, divisible experts, ...)."""
        from model_patches import get_family  # local import: model_patches imports transformers

        family = get_family(getattr(model_config, "model_type", None))
        num_experts = family.num_experts(model_config)
        hosts = len(topology.host_ranks)
        if num_experts % hosts != 0:
            raise ValueError(
                f"hetermoe: the model has {num_experts} experts per layer, which do not divide evenly over "
                f"{hosts} expert-holding ranks ({list(topology.host_ranks)}). Use a number of expert ranks that "
                f"divides {num_experts} (e.g. {_divisors(num_experts, hosts)})."
            )
        moe_layers = family.moe_layers(model_config)
        if isinstance(self.asym_ea, dict):
            bad = [layer for layer in self.asym_ea if layer not in moe_layers]
            if bad:
                raise _fail(
                    "asym_ea", f"names layer(s) {bad}, which have no routed experts (MoE layers: {list(moe_layers)})",
                    "Name MoE layers.",
                )


def _validate_asym_ea(value: Any) -> str | dict[int, int]:
    # YAML 1.1 reads a bare `off` as False.
    if value is False or value is None or value == "off":
        return "off"
    if value == "auto":
        return "auto"
    if isinstance(value, dict):
        out: dict[int, int] = {}
        for layer, count in value.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise _fail("asym_ea", f"has layer key {layer!r}", "Layer keys are integers >= 0.")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise _fail("asym_ea", f"moves {count!r} experts at layer {layer}", "Counts are integers >= 0.")
            out[layer] = count
        return out
    raise _fail("asym_ea", f"is {value!r}", "Use off, auto, or a mapping {layer: experts moved per expert rank}.")


def _auto_attention_ranks(world_size: int, caps: list[tuple[int, int]] | None) -> tuple[int, ...]:
    if not caps or len(caps) != world_size:
        raise _fail(
            "attention_ranks", "is auto, which needs every rank's device generation, and none was given",
            "List `attention_ranks` explicitly (CPU runs always must).",
        )
    newest = max(caps)
    att = tuple(r for r, c in enumerate(caps) if c == newest)
    if len(att) == world_size:
        raise _fail(
            "attention_ranks", f"is auto but all {world_size} ranks have the same device generation {newest}",
            "List `attention_ranks` explicitly, or use `mode: colocated`.",
        )
    return att


def _divisors(n: int, near: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - near))[:3]
