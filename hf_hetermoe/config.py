"""HeterMoEConfig: the typed, strictly validated HeterMoE configuration (YAML in and out).

A config file looks like::

    attention_ranks: [0, 1]      # global ranks, or "auto" (ranks on the newest devices)
    expert_ranks: [2, 3]         # default: every rank not listed as attention
    attention_machines: [0]      # or name roles per machine (--machine-rank); expert_machines: default the rest
    mode: disaggregated          # or colocated (every rank runs attention and holds 1/W of the experts)
    zebra: {microbatches: 2}     # R: stripes per micro-batch (default 2 disaggregated, 1 colocated)
    asym_ea: off                 # off | auto | {layer: experts moved per expert rank}
    expert_split: even           # even | proportional (to each expert rank's device speed) | [w0, w1, ...]
    timeout_s: 300               # how long a data-path collective may wait before it fails
    check_finite: true           # report NaN/inf in expert outputs and gradients (layer, expert, rank)
    rebalance: {every_steps: 50} # re-place experts from the observed routing every K steps (off by default)

Every mistake is a `ValueError` that names the field and says how to fix it. Validation happens in three
stages, each as early as the facts it needs are known, and always before any process group waits:
`HeterMoEConfig.from_dict` (the file alone), `resolve_topology` (plus the world size) and
`HeterMoEConfig.check_model` (plus the model config).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import yaml

from .asym_ea_placement import placement_for
from .config_messages import fail as _fail
from .config_messages import show as _show
from .emulation import EmulationConfig
from .rebalance import RebalanceConfig
from .topology import MAX_WORLD_SIZE, Topology, resolve_topology

__all__ = ["MAX_TIMEOUT_S", "MAX_WORLD_SIZE", "MODES", "HeterMoEConfig", "Topology", "ZebraConfig"]

MODES = ("disaggregated", "colocated")
# The control group waits up to 7 days (groups.CONTROL_TIMEOUT); a data-path timeout beyond that is a typo, and
# an infinite one would overflow the backends' timedelta.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _sorted_keys(keys: Any) -> list[str]:
    # YAML keys may be of any type (1, null, [a]); sort their text so a mixed set cannot raise TypeError.
    return sorted(_show(k) if not isinstance(k, str) else k for k in keys)


def _as_rank_list(field_name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail(field_name, f"must be a list of global ranks, got {_show(value)}", f"Write e.g. `{field_name}: [0, 1]`.")
    if len(value) > MAX_WORLD_SIZE:
        raise _fail(field_name, f"lists {len(value)} ranks, more than the largest supported world ({MAX_WORLD_SIZE})",
                    "List the ranks of one job.")
    ranks = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise _fail(field_name, f"holds {_show(item)}, which is not an integer rank", "List integer ranks only.")
        if item < 0:
            raise _fail(field_name, f"holds the negative rank {item}", "Ranks count from 0.")
        if item >= MAX_WORLD_SIZE:
            raise _fail(field_name, f"holds rank {_show(item)}, beyond the largest supported world ({MAX_WORLD_SIZE})",
                        "List ranks of the launched processes (0 .. world size - 1).")
        ranks.append(item)
    if len(set(ranks)) != len(ranks):
        dup = sorted(r for r, n in Counter(ranks).items() if n > 1)
        raise _fail(field_name, f"lists rank(s) {_show(dup)} more than once", "List each rank once.")
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

    def __post_init__(self) -> None:
        # Checked here too, so `ZebraConfig(microbatches=-1)` passed by keyword fails like the same YAML.
        r = self.microbatches
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1 or r > 1024):
            raise _fail("zebra.microbatches", f"must be an integer from 1 to 1024, got {_show(r)}",
                        "Use 1 (no zebra), 2 or 4.")
        if not isinstance(self.expert_recompute, bool):
            raise _fail("zebra.expert_recompute", f"must be true or false, got {_show(self.expert_recompute)}",
                        "Use true or false.")

    def stripes(self, mode: str) -> int:
        if self.microbatches is not None:
            return self.microbatches
        return 2 if mode == "disaggregated" else 1

    @classmethod
    def from_dict(cls, data: Any) -> "ZebraConfig":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise _fail("zebra", f"must be a mapping, got {_show(data)}", "Write e.g. `zebra: {microbatches: 2}`.")
        unknown = _sorted_keys(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise _fail("zebra", f"has unknown key(s) {unknown}", "Known keys: microbatches, expert_recompute.")
        return cls(microbatches=data.get("microbatches"), expert_recompute=data.get("expert_recompute", False))


@dataclass(frozen=True, kw_only=True)
class HeterMoEConfig:
    """Typed HeterMoE configuration. Build with `from_yaml`, `from_dict` or keywords."""

    attention_ranks: tuple[int, ...] | str | None = None  # None: "auto" when disaggregated, all when colocated
    expert_ranks: tuple[int, ...] | None = None
    # Roles per machine (a launcher's --machine-rank) instead of per rank: every rank of these machines.
    attention_machines: tuple[int, ...] | None = None
    expert_machines: tuple[int, ...] | None = None
    mode: str = "disaggregated"
    zebra: ZebraConfig = field(default_factory=ZebraConfig)
    asym_ea: str | dict[int, int] = "off"
    # Experts of every layer per expert rank: "even", "proportional" (expert_speeds.py) or weights per expert rank.
    expert_split: str | tuple[float, ...] = "even"
    timeout_s: float = 300.0
    emulation: EmulationConfig | None = None  # device emulation for CPU benchmarks (see emulation.py)
    # Count NaN/inf in expert outputs and gradients and report them with layer, expert and rank (numerics.py).
    check_finite: bool = True
    # Re-place experts from the observed routing every K optimizer steps (rebalance.py); off by default.
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = _sorted_keys(k for k in data if not (isinstance(k, str) and k in known))
        if unknown:
            raise ValueError(f"hetermoe config: unknown key(s) {unknown}. Known keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "HeterMoEConfig":
        try:
            path = os.fspath(path)
        except TypeError:
            raise ValueError(f"hetermoe config: the config path must be a file path, got {_show(path)}.") from None
        if not os.path.isfile(path):
            raise ValueError(f"hetermoe config: no file at {path!r}. Pass the path of a hetermoe YAML config.")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"hetermoe config: cannot read {path} ({exc}). Pass a readable UTF-8 YAML file.") from None
        return cls.from_yaml_text(text, source=path)

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "<text>") -> "HeterMoEConfig":
        """Parse YAML text (strict: duplicate keys are an error) and validate it like `from_dict`."""
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"hetermoe config: {source} is not valid YAML ({_first_lines(exc)}). Fix the syntax.") from None
        except (ValueError, TypeError, IndexError, OverflowError, RecursionError) as exc:
            # PyYAML lets some constructor errors through as they are (the date 2001-02-30, nesting too deep, "!!int ").
            raise ValueError(f"hetermoe config: {source} is not valid YAML ({type(exc).__name__}: "
                             f"{_first_lines(exc)}). Fix the value.") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{exc} (in {source})") from None

    def to_dict(self) -> dict[str, Any]:
        att = self.attention_ranks
        return {
            "attention_ranks": list(att) if isinstance(att, tuple) else att,
            "expert_ranks": list(self.expert_ranks) if self.expert_ranks is not None else None,
            "attention_machines": list(self.attention_machines) if self.attention_machines is not None else None,
            "expert_machines": list(self.expert_machines) if self.expert_machines is not None else None,
            "mode": self.mode,
            "zebra": {k: v for k, v in (("microbatches", self.zebra.microbatches),
                                        ("expert_recompute", self.zebra.expert_recompute)) if v is not None},
            "asym_ea": dict(self.asym_ea) if isinstance(self.asym_ea, dict) else self.asym_ea,
            "expert_split": ([int(w) if float(w).is_integer() else w for w in self.expert_split]
                             if isinstance(self.expert_split, tuple) else self.expert_split),
            "timeout_s": self.timeout_s,
            "emulation": self.emulation.to_dict() if self.emulation is not None else None,
            "check_finite": self.check_finite,
            "rebalance": self.rebalance.to_dict(),
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
        unknown = _sorted_keys(k for k in data if not (isinstance(k, str) and k in known))
        if unknown:
            raise ValueError(
                f"hetermoe config: unknown key(s) {unknown}. Known keys: {sorted(known)}."
            )
        out: dict[str, Any] = {}

        mode = data.get("mode", "disaggregated")
        if not isinstance(mode, str) or mode not in MODES:
            raise _fail("mode", f"is {_show(mode)}", f"Use one of {list(MODES)}.")
        out["mode"] = mode

        att = data.get("attention_ranks")
        if isinstance(att, str) and att != "auto":
            raise _fail("attention_ranks", f"is {_show(att)}", 'Use a list of ranks, e.g. [0, 1], or "auto".')
        if att is not None and att != "auto":
            att = _as_rank_list("attention_ranks", att)
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
                    "expert_ranks", f"overlaps attention_ranks on rank(s) {_show(both)}",
                    "List each rank once: it is an attention rank or an expert rank in disaggregated mode.",
                )

        out.update(_validate_machines(data, mode, att, exp))

        zebra = data.get("zebra")
        out["zebra"] = zebra = zebra if isinstance(zebra, ZebraConfig) else ZebraConfig.from_dict(zebra)
        if mode == "colocated" and zebra.expert_recompute:
            raise _fail("zebra.expert_recompute", "is true in colocated mode, which has no expert servers to recompute on",
                        "Remove it, or use `mode: disaggregated`.")
        if mode == "colocated" and (zebra.microbatches or 1) > 1:
            raise _fail(
                "zebra.microbatches", f"is {zebra.microbatches} in colocated mode; zebra parallelism overlaps attention "
                "ranks with separate expert ranks", "Use `mode: disaggregated` with expert ranks, or microbatches 1.",
            )

        out["asym_ea"] = asym = _validate_asym_ea(data.get("asym_ea", "off"))
        if mode == "colocated" and asym != "off":
            raise _fail("asym_ea", "moves experts from expert ranks to attention ranks, and colocated mode has no "
                        "expert ranks", "Use `asym_ea: off` with `mode: colocated`, or `mode: disaggregated`.")

        out["expert_split"] = _validate_expert_split(data.get("expert_split", "even"), mode, asym)

        timeout = data.get("timeout_s", 300.0)
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout)
                or not 0 < timeout <= MAX_TIMEOUT_S):
            raise _fail("timeout_s", f"must be a number of seconds in (0, {MAX_TIMEOUT_S:.0f}], got {_show(timeout)}",
                        "Use e.g. 300.")
        out["timeout_s"] = float(timeout)
        emulation = data.get("emulation")
        out["emulation"] = emulation if isinstance(emulation, EmulationConfig) else EmulationConfig.from_dict(emulation)
        check_finite = data.get("check_finite", True)
        if not isinstance(check_finite, bool):
            raise _fail("check_finite", f"must be true or false, got {_show(check_finite)}",
                        "Use true (report NaN/inf in expert outputs and gradients) or false.")
        out["check_finite"] = check_finite
        out["rebalance"] = RebalanceConfig.from_dict(data.get("rebalance"))
        return out

    # ---- stage 2: plus the world size ---------------------------------------------------------------
    @property
    def uses_auto_roles(self) -> bool:
        """Roles come from each rank's device generation (newest -> attention), known only at launch."""
        return (self.mode == "disaggregated" and self.expert_ranks is None and self.attention_ranks in (None, "auto")
                and not self.uses_machine_roles)

    @property
    def uses_machine_roles(self) -> bool:
        """Roles are named per machine (`attention_machines` / `expert_machines`), known only at launch."""
        return self.attention_machines is not None or self.expert_machines is not None

    def resolve_topology(self, world_size: int, device_capabilities: list[tuple[int, int]] | None = None,
                         rank_machines: list[int] | None = None) -> Topology:
        """Decide each rank's role for `world_size` processes (topology.resolve_topology).

        `device_capabilities[r]` is rank r's device generation (CUDA compute capability); it is only needed for
        `attention_ranks: auto`, which picks the ranks on the newest devices. `rank_machines[r]` is rank r's
        machine; it is only needed for `attention_machines` / `expert_machines`.
        """
        return resolve_topology(world_size=world_size, mode=self.mode, attention_ranks=self.attention_ranks,
                                expert_ranks=self.expert_ranks, emulation=self.emulation,
                                device_capabilities=device_capabilities, attention_machines=self.attention_machines,
                                expert_machines=self.expert_machines, rank_machines=rank_machines)

    # ---- stage 3: plus the model --------------------------------------------------------------------
    def check_model(self, model_config: Any, topology: Topology) -> None:
        """Check that this model can be split over `topology` (supported family, divisible experts, ...)."""
        from model_patches import get_family, supported_model_types  # local import: imports transformers

        model_type = getattr(model_config, "model_type", None)
        if not isinstance(model_type, str) or not model_type:
            raise ValueError(
                f"hetermoe: the model config has no model family (model_type {_show(model_type)}). Pass a transformers "
                f"config of a supported family: {supported_model_types()}."
            )
        family = get_family(model_type)
        try:
            num_experts = family.num_experts(model_config)
            moe_layers = tuple(family.moe_layers(model_config))
        except (AttributeError, TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as exc:
            raise ValueError(
                f"hetermoe: the {model_type} model config does not describe its experts ({type(exc).__name__}: "
                f"{_first_lines(exc)}). Build it with transformers' {model_type} config class (e.g. "
                f"AutoConfig.for_model({model_type!r}, ...))."
            ) from None
        if num_experts < 1:
            raise ValueError(
                f"hetermoe: the {model_type} model config has {num_experts} routed experts per layer "
                f"(`{family.num_experts_attr}`); Use a model with routed experts (HeterMoE places nothing otherwise)."
            )
        if not moe_layers:
            raise ValueError(
                f"hetermoe: the {model_type} model config has no layer with routed experts; HeterMoE has nothing to "
                "place. Train it without HeterMoE."
            )
        hosts = len(topology.host_ranks)
        weighted = self.expert_split != "even"
        if isinstance(self.expert_split, tuple) and len(self.expert_split) != len(topology.expert_ranks):
            raise _fail("expert_split", f"gives {len(self.expert_split)} weights for {len(topology.expert_ranks)} expert "
                        f"ranks {_show(list(topology.expert_ranks))}", "Give one weight per expert rank, in rank order.")
        if num_experts % hosts != 0 and not weighted:
            raise ValueError(
                f"hetermoe: the model has {num_experts} experts per layer, which do not divide evenly over "
                f"{hosts} expert-holding ranks ({_show(list(topology.host_ranks))}). Use a number of expert ranks that "
                f"divides {num_experts} (e.g. {_divisors(num_experts, hosts)})."
            )
        if isinstance(self.asym_ea, dict):
            bad = [layer for layer in self.asym_ea if layer not in moe_layers]
            if bad:
                raise _fail(
                    "asym_ea", f"names layer(s) {_show(bad)}, which have no routed experts (MoE layers: "
                    f"{_show(list(moe_layers))})", "Name MoE layers.",
                )
            per_rank = num_experts // hosts
            too_many = {layer: n for layer, n in self.asym_ea.items() if n > per_rank}
            if too_many:
                raise _fail(
                    "asym_ea", f"moves {_show(too_many)} experts per expert rank, but each expert rank holds only "
                    f"{per_rank} of a layer's {num_experts}", f"Move at most {per_rank} per layer.",
                )
        # Proportional without emulation needs every rank's reported GPU: checked where apply_hetermoe places experts.
        speeds_known = self.expert_split != "proportional" or self.emulation is not None
        if self.asym_ea != "auto" and topology.mode == "disaggregated" and speeds_known:
            # Build the placement now (it is cheap), so one that does not fit (moved experts that do not split over
            # the attention ranks, a placement file that does not match the model) fails before any group waits.
            placement_for(self, layers=moe_layers, num_experts=num_experts, topology=topology,
                          model_config=model_config)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it as a YAML error
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {_show(key)} is written twice; keep one", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _first_lines(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_machines(data: dict[str, Any], mode: str, att: Any, exp: Any) -> dict[str, Any]:
    """`attention_machines` / `expert_machines`: roles per machine, instead of (never with) roles per rank."""
    out: dict[str, Any] = {}
    for name in ("attention_machines", "expert_machines"):
        value = data.get(name)
        if value is not None:
            if not isinstance(value, (list, tuple)):
                raise _fail(name, f"must be a list of machine ranks, got {_show(value)}", f"Write e.g. `{name}: [0]`.")
            value = _as_rank_list(name, value)
        out[name] = value
    att_m, exp_m = out["attention_machines"], out["expert_machines"]
    if att_m is None and exp_m is None:
        return out
    if mode == "colocated":
        raise _fail("attention_machines" if att_m is not None else "expert_machines",
                    "is set in colocated mode, where every rank runs attention and holds experts",
                    "Remove it, or use `mode: disaggregated`.")
    if att is not None or exp is not None:
        raise _fail("attention_machines" if att_m is not None else "expert_machines",
                    "is set together with `attention_ranks`/`expert_ranks`",
                    "Name roles either per machine or per rank, not both.")
    if att_m is not None and exp_m is not None:
        both = sorted(set(att_m) & set(exp_m))
        if both:
            raise _fail("expert_machines", f"overlaps attention_machines on machine(s) {_show(both)}",
                        "List each machine once: its ranks run attention or serve experts.")
    return out


def _validate_asym_ea(value: Any) -> str | dict[int, int]:
    # YAML 1.1 reads a bare `off` as False.
    if value is False or value is None or (isinstance(value, str) and value == "off"):
        return "off"
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, str) and value.endswith(".json"):
        return value  # a placement file {layer: {expert: rank}} (hetermoe plan writes one); read at apply time
    if isinstance(value, dict):
        out: dict[int, int] = {}
        for layer, count in value.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise _fail("asym_ea", f"has layer key {_show(layer)}", "Layer keys are integers >= 0.")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise _fail("asym_ea", f"moves {_show(count)} experts at layer {layer}", "Counts are integers >= 0.")
            out[layer] = count
        return out
    raise _fail("asym_ea", f"is {_show(value)}",
                "Use off, auto, a mapping {layer: experts moved per expert rank}, or a placement .json file.")


def _validate_expert_split(value: Any, mode: str, asym: Any) -> str | tuple[float, ...]:
    if isinstance(value, str) and value in ("even", "proportional"):
        split: str | tuple[float, ...] = value
    elif isinstance(value, (list, tuple)):
        if not value or len(value) > MAX_WORLD_SIZE:
            raise _fail("expert_split", f"lists {len(value)} weights", "Give one weight per expert rank, e.g. [2, 1].")
        for w in value:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise _fail("expert_split", f"holds the weight {_show(w)}",
                            "Weights are finite numbers >= 0 (relative expert speeds), e.g. [2, 1].")
        if not sum(value) > 0:
            raise _fail("expert_split", "has weights that are all 0", "Give at least one expert rank a weight > 0.")
        split = tuple(float(w) for w in value)
    else:
        raise _fail("expert_split", f"is {_show(value)}",
                    "Use even, proportional (to each expert rank's device speed) or weights per expert rank, e.g. [2, 1].")
    if split != "even" and mode == "colocated":
        raise _fail("expert_split", f"is {_show(value)} in colocated mode, where every rank holds 1/W of the experts",
                    "Use `expert_split: even` with `mode: colocated`, or `mode: disaggregated`.")
    if split != "even" and asym != "off":
        raise _fail("expert_split", f"is {_show(value)} together with `asym_ea: {_show(asym)}`; Asym-EA's counts move "
                    "experts off an even split", "Use one of them (`asym_ea: off`), or give the whole placement as a "
                    "file (`asym_ea: placement.json`, which `hetermoe plan` writes).")
    return split


def _divisors(n: int, near: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - near))[:3]
