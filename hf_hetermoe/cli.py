"""The `hetermoe` command: launch | demo | plan | simulate | profile."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

USAGE = """hetermoe <command> [options]

commands:
  launch    run a training script on attention + expert ranks (wraps `accelerate launch`)
  demo      train a small Mixtral on 2 attention + 2 expert CPU processes, then reload it with stock transformers
  plan      predict every strategy's throughput on a cluster and write a hetermoe config
  simulate  simulate one strategy's schedule
  profile   measure attention and expert times on the devices present
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def launch_command(config_path: str, num_processes: int, script: str, script_args: list[str],
                   main_process_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for a HeterMoE job on this machine."""
    port = main_process_port or free_port()
    env = dict(os.environ)
    if not _has_cuda():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo processes on CPU (the CPU launcher alone fans out only via mpirun)
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
        if not config.uses_auto_roles:
            config.resolve_topology(ns.num_processes)
        if not os.path.isfile(ns.script):
            raise ValueError(f"hetermoe launch: training script {ns.script!r} does not exist.")
    except (ValueError, UnsupportedVersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd, env = launch_command(ns.config, ns.num_processes, ns.script, ns.script_args, ns.main_process_port)
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
