"""`hetermoe plan`, `hetermoe simulate` and `hetermoe profile` (wired into hf_hetermoe/cli.py).

Each entry point takes argv without the program name, returns the exit code, and turns user mistakes
(ValueError, bad arguments) into one line on stderr and exit code 2.

    hetermoe plan --cluster 6xA40,6xV100 --model D1 --seq-len 8192 [--global-batch 24] [--out DIR]
    hetermoe simulate --cluster O1 --model D1 --seq-len 8192 --strategy zp --microbatches 4 --asym-ea auto
    hetermoe profile --model path/to/config.json --seq-len 4096 --micro-batch 1 [--out profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cluster import parse_cluster
from .presets import MODEL_PRESETS, resolve_model
from .profile_file import load_profiles
from .routing import parse_routing
from .workload import Setup, check_offloads, default_global_batch

PLAN_YAML, PLAN_PNG, PLAN_PLACEMENT = "hetermoe_plan.yaml", "hetermoe_plan.png", "hetermoe_placement.json"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want one line and code 2
        raise _UsageError(message)


def _run(prog: str, body, argv: list[str]) -> int:
    try:
        return body(argv)
    except (_UsageError, ValueError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def _setup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True,
                   help="COUNTxGPU,... (e.g. 6xA40,6xV100 or 2xA100,4xV100,4xT4: the newest kind attends), roles given "
                        "explicitly (attention:2xA100;experts:4xV100,4xT4), or a preset: O1, O2, O3, C1, C2")
    p.add_argument("--model", help=f"preset ({', '.join(MODEL_PRESETS)}) or a HF config.json path; "
                                   "default: the model of --profile")
    p.add_argument("--seq-len", type=int, help="tokens per sequence; default: the sequence length of --profile")
    p.add_argument("--global-batch", type=int, help="sequences per iteration (default: >= 4 per attention GPU)")
    p.add_argument("--profile", action="append", default=[], metavar="FILE",
                   help="measured profile from `hetermoe profile` (repeatable); overrides built-in GPUs by name")
    p.add_argument("--link-gbps", type=float, help="per-GPU network bandwidth (default: preset's, else 100)")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--no-checkpointing", action="store_true", help="simulate without activation recomputation")
    p.add_argument("--routing", default="uniform",
                   help="per-expert load: uniform, zipf:S (e.g. zipf:1.2), or a routing log written by the runtime "
                        "under HETERMOE_ROUTING_LOG=DIR (the folder or one routing-rank*.json)")


def _setup_from(args: argparse.Namespace) -> Setup:
    measured, shape, seq_len = {}, None, None
    for path in args.profile:
        p_shape, p_seq, devices = load_profiles(path)
        if shape is not None and (p_shape != shape or p_seq != seq_len):
            raise ValueError(f"profile: {path} measures another model or sequence length than the other profiles. "
                             "Profile every device with the same --model and --seq-len.")
        shape, seq_len = p_shape, p_seq
        measured.update(devices)
    if args.model is not None:
        shape = resolve_model(args.model, dtype=args.dtype)
    if shape is None:
        raise ValueError("--model is required (a preset such as D1, or a config.json path) unless --profile is given.")
    seq_len = args.seq_len if args.seq_len is not None else seq_len
    if seq_len is None:
        raise ValueError("--seq-len is required unless --profile is given.")
    cluster = parse_cluster(args.cluster, link_gbps=args.link_gbps, measured=measured)
    batch = args.global_batch if args.global_batch is not None else default_global_batch(cluster)
    routing = parse_routing(args.routing, num_layers=shape.num_layers, num_experts=shape.num_experts)
    return Setup(cluster=cluster, shape=shape, seq_len=seq_len, global_batch=batch,
                 checkpointing=not args.no_checkpointing, routing=routing)


def _pools(setup: Setup) -> str:
    """Which rank is which GPU when a pool mixes kinds, and what the planner assumes about them."""
    c, lines = setup.cluster, []

    def spans(ranks, devices) -> str:
        out, start = [], 0
        for i in range(1, len(ranks) + 1):
            if i == len(ranks) or devices[i].name != devices[start].name:
                a, b = ranks[start], ranks[i - 1]
                out.append(f"{devices[start].name} (rank{'s' if b > a else ''} {a}{'-' + str(b) if b > a else ''})")
                start = i
        return ", ".join(out)

    if c.mixed_attention:
        lines.append(f"attention {spans(c.attention_ranks, c.attention_devices)}: every attention rank gets the same "
                     "batch share (the stock Trainer gives every data-parallel rank the same per-device batch), so "
                     "the slowest paces the others; the planner assumes exactly that")
    if c.mixed_expert:
        lines.append(f"experts  {spans(c.expert_ranks, c.expert_devices)}: launch the expert ranks on these GPUs in "
                     "this order (a weighted expert_split lists one count per expert rank)")
    return "".join(f"\n{line}" for line in lines)


def _describe(setup: Setup) -> str:
    s = setup.shape
    return (f"cluster  {setup.cluster.describe()}{_pools(setup)}\n"
            f"model    {s.name}: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_experts} experts (top-{s.top_k}),"
            f" {s.total_params / 1e9:.2f}B params, {s.dtype}\n"
            f"batch    {setup.global_batch} sequences x {setup.seq_len} tokens = {setup.tokens:,} tokens per iteration"
            f"{', activation checkpointing' if setup.checkpointing else ''}\n"
            f"routing  {setup.routing.name}")


# ---- hetermoe plan -----------------------------------------------------------------------------------------
def main_plan(argv: list[str]) -> int:
    return _run("hetermoe plan", _plan, argv)


def _plan(argv: list[str]) -> int:
    p = _Parser(prog="hetermoe plan", description="Predict every strategy and write the best plan.")
    _setup_arguments(p)
    p.add_argument("--out", default=".", help="directory for the YAML config, placement and Gantt chart")
    p.add_argument("--max-microbatches", type=int, default=16)
    args = p.parse_args(argv)
    # Imported after parsing: --help and argument errors answer without scipy and matplotlib.
    from .gantt import draw_gantt
    from .planning import make_plan
    from .tables import results_table
    if args.max_microbatches < 1:
        raise ValueError(f"--max-microbatches must be at least 1, got {args.max_microbatches}.")
    setup = _setup_from(args)
    plan = make_plan(setup, max_microbatches=args.max_microbatches)
    os.makedirs(args.out, exist_ok=True)
    yaml_path = os.path.join(args.out, PLAN_YAML)
    plan.config.to_yaml(yaml_path)
    placement_path = os.path.join(args.out, PLAN_PLACEMENT)
    with open(placement_path, "w", encoding="utf-8") as fh:
        json.dump(plan.placement.to_dict(), fh, indent=1)
    chosen = plan.chosen
    png_path = None
    if chosen.sim is not None:
        labels = dict(zip(("attn", "exp"), setup.cluster.labels))
        png_path = draw_gantt(chosen.sim, os.path.join(args.out, PLAN_PNG), labels=labels,
                              title=f"{chosen.strategy}, R={chosen.microbatches}: {setup.shape.name}, "
                                    f"S={setup.seq_len}, {setup.cluster.describe()}")
    print(_describe(setup))
    print()
    print(results_table(setup, plan.results, plan.lower_bound, plan.problems, chosen=chosen.strategy))
    print()
    print(f"chosen   {chosen.strategy} with R={chosen.microbatches} micro-batches: "
          f"{chosen.tokens_per_s:,.0f} tokens/s, {plan.lower_bound.iteration_s / chosen.iteration_s:.0%} of the bound"
          + (f"; {chosen.note}" if chosen.note else ""))
    if chosen.split:
        c = setup.cluster
        print("split    experts of every layer per expert GPU (proportional to expert speed, within memory): "
              + ", ".join(f"rank {r} ({c.device_of(r).name}) {k}" for r, k in zip(c.expert_ranks, chosen.split)))
    if chosen.offloads and any(chosen.offloads):
        print(f"asym-ea  experts moved per expert GPU, by layer: {list(chosen.offloads)}")
        for layer, o in enumerate(chosen.offloads):
            if o:
                moved = {r: plan.placement.experts_on(r, layer) for r in setup.cluster.attention_ranks}
                print(f"         layer {layer}: " + ", ".join(f"rank {r} <- experts {e}" for r, e in moved.items()))
    for warning in plan.warnings:
        print(f"warning  {warning}")
    print(f"wrote    {yaml_path} (hetermoe launch --config), {placement_path}"
          + (f", {png_path}" if png_path else ""))
    return 0


# ---- hetermoe simulate -------------------------------------------------------------------------------------
_STRATEGY_ALIASES = {"ep": "EP", "ep-ideal": "EP(Ideal)", "ep(ideal)": "EP(Ideal)", "distep": "DistEP", "zp": "ZP",
                     "zp+asym-ea": "ZP+Asym-EA", "asym-ea": "ZP+Asym-EA", "zp-asym": "ZP+Asym-EA",
                     "zp+proportional": "ZP+proportional", "proportional": "ZP+proportional", "all": "all"}


def _parse_asym(text: str | None) -> str | list[int] | dict[int, int]:
    """off | auto | '1,1,0,2' (per layer) | '{"1": 1}' (JSON mapping layer -> count)."""
    if text is None or text in ("off", "auto"):
        return text or "off"
    try:
        if text.strip().startswith("{"):
            return {int(k): int(v) for k, v in json.loads(text).items()}
        return [int(x) for x in text.split(",")]
    except (ValueError, AttributeError):
        raise ValueError(f"--asym-ea {text!r} is malformed. Use off, auto, 1,0,2 (per layer) or "
                         '{"layer": count}.') from None


def main_simulate(argv: list[str]) -> int:
    return _run("hetermoe simulate", _simulate, argv)


def _simulate(argv: list[str]) -> int:
    p = _Parser(prog="hetermoe simulate", description="Simulate one strategy (or all) and print its metrics.")
    _setup_arguments(p)
    p.add_argument("--strategy", default="all",
                   help="ep, ep-ideal, distep, zp, zp+asym-ea, zp+proportional (a mixed expert pool) or all")
    p.add_argument("--microbatches", type=int, help="R for zp / zp+asym-ea (default: the best)")
    p.add_argument("--asym-ea", help="off | auto | per-layer counts 1,0,2 | JSON {layer: count}")
    p.add_argument("--config", help="a hetermoe YAML config: its mode, zebra.microbatches and asym_ea are used")
    p.add_argument("--gantt", metavar="PNG", help="write the Gantt chart of the (last) simulated schedule")
    args = p.parse_args(argv)
    # Imported after parsing: --help and argument errors answer without scipy and matplotlib.
    from ..config import HeterMoEConfig
    from .gantt import draw_gantt
    from .lower_bound import lower_bound
    from .strategies import run_distep, run_ep, run_ep_ideal, run_zp, run_zp_asym, run_zp_split
    from .tables import results_table
    setup = _setup_from(args)
    strategy = _STRATEGY_ALIASES.get(args.strategy.lower())
    if strategy is None:
        raise ValueError(f"--strategy {args.strategy!r} is unknown. Use one of {sorted(set(_STRATEGY_ALIASES))}.")
    r, asym = args.microbatches, _parse_asym(args.asym_ea)
    counts = None
    if args.config:
        cfg = HeterMoEConfig.from_yaml(args.config)
        r = cfg.zebra.microbatches
        asym = cfg.asym_ea
        strategy = "EP" if cfg.mode == "colocated" else ("ZP" if asym == "off" else "ZP+Asym-EA")
        if cfg.expert_split != "even":
            strategy = "ZP+proportional"
            if isinstance(cfg.expert_split, tuple):  # weights: the counts the runtime places
                from ..placement import split_counts

                if len(cfg.expert_split) != setup.cluster.num_expert:
                    raise ValueError(f"{args.config}: `expert_split` gives {len(cfg.expert_split)} weights for the "
                                     f"cluster's {setup.cluster.num_expert} expert GPUs.")
                counts = split_counts(setup.shape.num_experts, cfg.expert_split)
        elif strategy == "ZP" and r == 1:
            strategy = "DistEP"
    if strategy == "ZP" and asym not in (None, "off"):
        strategy = "ZP+Asym-EA"
    offloads = None
    if isinstance(asym, dict):
        beyond = sorted(layer for layer in asym if not 0 <= layer < setup.shape.num_layers)
        if beyond:
            raise ValueError(f"asym_ea names layer(s) {beyond} but the model has layers 0..{setup.shape.num_layers - 1}.")
        offloads = [asym.get(layer, 0) for layer in range(setup.shape.num_layers)]
    elif isinstance(asym, list):
        offloads = asym
    if offloads is not None:
        check_offloads(setup, offloads)  # a user's counts are checked even when every strategy runs
    runners = {
        "EP": lambda: run_ep(setup), "EP(Ideal)": lambda: run_ep_ideal(setup), "DistEP": lambda: run_distep(setup),
        "ZP": lambda: run_zp(setup, r), "ZP+Asym-EA": lambda: run_zp_asym(setup, r, offloads=offloads),
        "ZP+proportional": lambda: run_zp_split(setup, r, counts=counts),
    }
    names = list(runners) if strategy == "all" else [strategy]
    if strategy == "all" and not setup.cluster.mixed_expert:
        names.remove("ZP+proportional")  # the same as ZP on an expert pool of one kind
    results, problems = {}, {}
    for name in names:
        try:
            results[name] = runners[name]()
        except ValueError as exc:
            if strategy != "all":
                raise
            problems[name] = str(exc)
    print(_describe(setup))
    print()
    print(results_table(setup, results, lower_bound(setup), problems))
    for name, res in results.items():
        if res.offloads and any(res.offloads):
            print(f"{name}: experts moved per expert GPU, by layer: {list(res.offloads)}")
        if res.split:
            print(f"{name}: experts of every layer per expert GPU: {list(res.split)}")
    if args.gantt:
        last = next((res for res in reversed(list(results.values())) if res.sim is not None), None)
        if last is not None:
            draw_gantt(last.sim, args.gantt, title=f"{last.strategy}, R={last.microbatches}",
                       labels=dict(zip(("attn", "exp"), setup.cluster.labels)))
            print(f"wrote {args.gantt}")
    return 0


# ---- hetermoe profile --------------------------------------------------------------------------------------
def main_profile(argv: list[str]) -> int:
    return _run("hetermoe profile", _profile, argv)


def _profile(argv: list[str]) -> int:
    import torch

    from .profile_file import save_profiles
    from .profiler import default_devices, profile_device

    p = _Parser(prog="hetermoe profile", description="Measure T_A^Attn, T_E and memory on the devices present.")
    p.add_argument("--model", required=True, help=f"preset ({', '.join(MODEL_PRESETS)}) or a HF config.json path")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch on one attention GPU")
    p.add_argument("--device", action="append", default=[], help="cpu, cuda or cuda:N (repeatable); default: all")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                   help="default: fp16 on CUDA, fp32 on CPU (CPU half-precision matmuls are not representative)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="hetermoe_profile.json")
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.micro_batch < 1 or args.repeats < 1:
        raise ValueError("--seq-len, --micro-batch and --repeats must be positive integers.")
    try:
        devices = [torch.device(d) for d in args.device] or default_devices()
    except RuntimeError:
        raise ValueError(f"--device {args.device} is not a torch device. Use cpu, cuda or cuda:N.") from None
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is present. Use --device cpu.")
    dtype = args.dtype or ("fp32" if all(d.type == "cpu" for d in devices) else "fp16")
    shape = resolve_model(args.model, dtype=dtype)
    entries = []
    for d in devices:
        entry = profile_device(shape, seq_len=args.seq_len, micro_batch=args.micro_batch, device=d,
                               repeats=args.repeats)
        entries.append(entry)
        print(f"{entry['name']:>8s} ({entry['description']}): attention {entry['attention']['fwd_s'][0] * 1e3:.2f} ms "
              f"fwd, expert {entry['expert']['fwd_s'][0] * 1e3:.2f} ms fwd ({entry['expert']['num_tokens'][0]} tokens), "
              f"head {entry['head']['fwd_s'][0] * 1e3:.2f} ms fwd")
    save_profiles(args.out, shape=shape, seq_len=args.seq_len, devices=entries, created_by=_version())
    print(f"wrote {args.out}")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"hf-hetermoe {version('hf-hetermoe')}"
    except Exception:  # not installed (running from a checkout)
        return "hf-hetermoe (source checkout)"
