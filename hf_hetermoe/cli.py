"""The `hetermoe` command: launch | demo | plan | simulate | profile."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

USAGE = """hetermoe <command> [options]

commands:
  launch    run a training script on attention + expert ranks (wraps `accelerate launch`)
  demo      train a small Mixtral on 2 attention + 2 expert CPU processes, then reload it with stock transformers
  plan      predict every strategy's throughput on a cluster and write a hetermoe config
  simulate  simulate one strategy's schedule
  profile   measure attention and expert times on the devices present
"""


def _uses_cpu(environ) -> bool:
    return environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Gpu:
    visible_id: str  # how CUDA_VISIBLE_DEVICES names it (an index or a UUID)
    name: str
    capability: tuple[int, int]  # CUDA compute capability: the device generation


def query_gpus() -> list[Gpu]:
    """The GPUs the launched processes will see, in CUDA's numbering (local rank i uses GPU i).

    Asked of torch.cuda in this process, which sees the same CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER as the
    processes it starts (nvidia-smi numbers GPUs by PCI bus, which may differ from CUDA's default order). Tests
    replace this function."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        count = torch.cuda.device_count()
        entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
        return [Gpu(entries[i] if i < len(entries) else str(i), torch.cuda.get_device_name(i),
                    tuple(torch.cuda.get_device_capability(i))) for i in range(count)]
    except Exception:  # no usable CUDA: the job runs on CPU
        return []


def gpu_environment(config, num_processes: int, gpus: list[Gpu]) -> dict[str, str]:
    """Check a launch on `gpus` (one process per GPU; attention on local ranks 0..A-1) and return the environment
    it needs: with `attention_ranks: auto`, CUDA_VISIBLE_DEVICES ordered newest generation first, so the ranks
    `auto` picks (those on the newest GPUs) are local ranks 0..A-1 and local rank 0, Accelerate's local main
    process, runs attention. Raises ValueError before any process starts."""
    from .launch import check_attention_ranks_first

    if num_processes > len(gpus):
        raise ValueError(
            f"hetermoe launch: --num-processes {num_processes} is more than the {len(gpus)} GPU(s) visible here "
            f"(each process uses one GPU: local rank i uses GPU i). Launch at most {len(gpus)} processes, make more "
            "GPUs visible (CUDA_VISIBLE_DEVICES), or run on CPU with ACCELERATE_USE_CPU=1."
        )
    if not config.uses_auto_roles:
        check_attention_ranks_first(config.resolve_topology(num_processes), num_processes)
        return {}
    # Stable: GPUs of one generation keep their order. Newest first, then only the first num_processes are used.
    ordered = sorted(gpus, key=lambda g: g.capability, reverse=True)
    config.resolve_topology(num_processes, [g.capability for g in ordered[:num_processes]])  # ValueError if all alike
    if ordered == list(gpus):
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(g.visible_id for g in ordered)}


def launch_command(config_path: str, num_processes: int, script: str, script_args: list[str],
                   main_process_port: int | None = None, gpu_env: dict[str, str] | None = None,
                   ) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for a HeterMoE job on this machine (`gpu_env` from
    `gpu_environment`, None on CPU)."""
    port = main_process_port or free_port()
    env = dict(os.environ)
    if gpu_env is None:
        env["ACCELERATE_USE_CPU"] = "1"  # gloo processes on CPU (the CPU launcher alone fans out only via mpirun)
    else:
        env.update(gpu_env)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "hf_hetermoe.launch", "--hetermoe-config", os.path.abspath(config_path), script, *script_args,
    ]
    return cmd, env


def cmd_launch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hetermoe launch",
        description="Run an ordinary Trainer script on HeterMoE attention ranks, with expert ranks serving the experts.",
    )
    parser.add_argument("--config", required=True, help="hetermoe YAML config (recipes/hetermoe/*.yaml)")
    parser.add_argument("--num-processes", type=int, required=True, help="total processes: attention + expert ranks")
    parser.add_argument("--main-process-port", type=int, default=None)
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)

    from .config import HeterMoEConfig
    from .versions import UnsupportedVersionError, check_versions

    try:
        check_versions()
        config = HeterMoEConfig.from_yaml(ns.config)
        if ns.num_processes < 2:
            raise ValueError(
                f"hetermoe launch: --num-processes must be at least 2 (got {ns.num_processes}); for one process, "
                "run the script directly with HeterMoECallback (colocated)."
            )
        gpus = [] if _uses_cpu(os.environ) else query_gpus()
        gpu_env = gpu_environment(config, ns.num_processes, gpus) if gpus else None
        if not gpus:  # CPU processes: `auto` sees one device generation everywhere, and says so now
            config.resolve_topology(ns.num_processes, [(0, 0)] * ns.num_processes if config.uses_auto_roles else None)
        if not os.path.isfile(ns.script):
            raise ValueError(f"hetermoe launch: training script {ns.script!r} does not exist.")
    except (ValueError, UnsupportedVersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if gpu_env and "CUDA_VISIBLE_DEVICES" in gpu_env:
        print(f"hetermoe launch: attention_ranks: auto; GPUs ordered newest generation first: CUDA_VISIBLE_DEVICES="
              f"{gpu_env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr)
    cmd, env = launch_command(ns.config, ns.num_processes, ns.script, ns.script_args, ns.main_process_port, gpu_env)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


def _delegate(module: str, function: str, argv: list[str]) -> int:
    import importlib

    try:
        target = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        print(f"error: this installation has no {module}.{function} ({exc}).", file=sys.stderr)
        return 2
    return int(target(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "launch":
        return cmd_launch(rest)
    if command == "demo":
        return _delegate("hf_hetermoe.demo", "main", rest)
    if command in ("plan", "simulate", "profile"):
        return _delegate("hf_hetermoe.planner.plan_cli", f"main_{command}", rest)
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
