"""The `hetermoe` command: launch | demo | plan | simulate | profile."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from .launch_facts import MACHINE_RANK_ENV

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


# Accelerate configs that shard or compile the model their own way: HeterMoE places the experts itself.
_REFUSED_ACCELERATE_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA", "TPU")


@dataclass(frozen=True)
class MachineLayout:
    """Where the processes of one job run: `per_machine[m]` processes on machine m; this launcher is `machine_rank`."""

    per_machine: tuple[int, ...]
    machine_rank: int
    main_process_ip: str
    main_process_port: int

    @property
    def total(self) -> int:
        return sum(self.per_machine)

    @property
    def local(self) -> int:
        return self.per_machine[self.machine_rank]

    @property
    def uneven(self) -> bool:
        return len(set(self.per_machine)) > 1


def read_accelerate_config(path: str) -> dict:
    """An accelerate config file (YAML or JSON), refused when it asks for DeepSpeed, FSDP, Megatron-LM or XLA."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"hetermoe launch: --config-file {path!r} does not exist. Pass an accelerate config file "
                         "(`accelerate config` writes one).")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}  # JSON is YAML too
        except yaml.YAMLError as exc:
            raise ValueError(f"hetermoe launch: --config-file {path} is not YAML or JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"hetermoe launch: --config-file {path} must hold a mapping of accelerate settings.")
    kind = str(data.get("distributed_type", "")).upper()
    plugins = [k for k in ("deepspeed_config", "fsdp_config", "megatron_lm_config") if data.get(k)]
    if kind in _REFUSED_ACCELERATE_TYPES or plugins:
        raise ValueError(
            f"hetermoe launch: --config-file {path} asks for {kind or plugins[0]}, which shards or places the model "
            "itself; HeterMoE places the experts itself and runs with plain data parallelism on the attention ranks. "
            "Use a config with distributed_type MULTI_GPU or MULTI_CPU (mixed precision and the rest are kept).")
    return data


def machine_layout(*, num_processes: int | None, num_machines: int | None, machine_rank: int | None,
                   main_process_ip: str | None, main_process_port: int | None, processes_per_machine: str | None,
                   accelerate_config: dict | None = None) -> MachineLayout:
    """Check the multi-machine arguments (accelerate's names and meaning: --num-processes is the total) and return
    the layout; a ValueError that says what to fix, before any process starts."""
    file = accelerate_config or {}
    num_machines = num_machines if num_machines is not None else int(file.get("num_machines", 1))
    machine_rank = machine_rank if machine_rank is not None else int(file.get("machine_rank", 0))
    main_process_ip = main_process_ip or file.get("main_process_ip") or "127.0.0.1"
    main_process_port = main_process_port or file.get("main_process_port")
    if num_processes is None and processes_per_machine is None:
        num_processes = file.get("num_processes")
    if num_machines < 1:
        raise ValueError(f"hetermoe launch: --num-machines must be at least 1 (got {num_machines}).")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"hetermoe launch: --machine-rank {machine_rank} is not one of the {num_machines} machines "
                         f"(0 .. {num_machines - 1}).")
    if processes_per_machine is not None:
        try:
            per_machine = tuple(int(v) for v in processes_per_machine.split(","))
        except ValueError:
            raise ValueError(f"hetermoe launch: --processes-per-machine {processes_per_machine!r} must be a comma-"
                             "separated list of counts, one per machine, e.g. 1,2.") from None
        if len(per_machine) != num_machines or min(per_machine) < 1:
            raise ValueError(f"hetermoe launch: --processes-per-machine {processes_per_machine} must give one count "
                             f">= 1 for each of the {num_machines} machines (--num-machines).")
        if num_processes is not None and int(num_processes) != sum(per_machine):
            raise ValueError(f"hetermoe launch: --num-processes {num_processes} is the total over all machines, but "
                             f"--processes-per-machine {processes_per_machine} adds up to {sum(per_machine)}.")
    else:
        if num_processes is None:
            raise ValueError("hetermoe launch: give --num-processes (the total over all machines), or "
                             "--processes-per-machine.")
        num_processes = int(num_processes)
        if num_processes % num_machines:
            raise ValueError(
                f"hetermoe launch: --num-processes {num_processes} does not divide over {num_machines} machines; for "
                "machines with different process counts give --processes-per-machine (e.g. 1,2).")
        per_machine = (num_processes // num_machines,) * num_machines
    if sum(per_machine) < 2:
        raise ValueError(
            f"hetermoe launch: --num-processes must be at least 2 (got {sum(per_machine)}); for one process, "
            "run the script directly with HeterMoECallback (colocated)."
        )
    if num_machines > 1 and main_process_port is None:
        raise ValueError("hetermoe launch: with several machines every launcher needs the same --main-process-ip "
                         "and --main-process-port (machine 0's address and a free port there).")
    return MachineLayout(per_machine=per_machine, machine_rank=machine_rank, main_process_ip=str(main_process_ip),
                         main_process_port=int(main_process_port or free_port()))


def check_roles(config, layout: MachineLayout, gpus: list[Gpu]) -> dict[str, str] | None:
    """Check the roles this launch gives every rank, as far as this machine can know them, and return the GPU
    environment (None on CPU). Ranks are numbered machine by machine (accelerate's static rendezvous; with
    --processes-per-machine, torchrun's c10d rendezvous may number the machines in join order, and each rank's
    role then comes from the machine it reports, launch_facts.py)."""
    from .launch import check_attention_first, planned_facts

    facts = planned_facts(list(layout.per_machine))
    machines = [f.machine for f in facts]
    single = len(layout.per_machine) == 1
    if gpus:
        if single and not config.uses_machine_roles:
            return gpu_environment(config, layout.total, gpus)
        if layout.local > len(gpus):
            gpu_environment(config, layout.local, gpus)  # raises: more processes than GPUs here
        if config.uses_auto_roles:  # other machines' GPUs are unknown here: order this machine's newest first
            ordered = sorted(gpus, key=lambda g: g.capability, reverse=True)
            return {} if ordered == list(gpus) else {"CUDA_VISIBLE_DEVICES": ",".join(g.visible_id for g in ordered)}
        check_attention_first(config.resolve_topology(layout.total, None, machines), facts)
        return {}
    caps = [(0, 0)] * layout.total if config.uses_auto_roles else None  # CPU: one device generation everywhere
    config.resolve_topology(layout.total, caps, machines if config.uses_machine_roles else None)
    return None


def launch_command(config_path: str, num_processes: int, script: str, script_args: list[str],
                   main_process_port: int | None = None, gpu_env: dict[str, str] | None = None,
                   layout: MachineLayout | None = None, accelerate_config_file: str | None = None,
                   ) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start this machine's processes of a HeterMoE job (`gpu_env` from
    `check_roles`, None on CPU): `accelerate launch` with its multi-machine arguments, or torchrun with the c10d
    rendezvous when machines run different numbers of processes (accelerate starts the same number on each)."""
    layout = layout or MachineLayout((num_processes,), 0, "127.0.0.1", main_process_port or free_port())
    env = dict(os.environ)
    env[MACHINE_RANK_ENV] = str(layout.machine_rank)  # every rank reports it (launch_facts.py)
    if gpu_env is None:
        env["ACCELERATE_USE_CPU"] = "1"  # gloo processes on CPU (the CPU launcher alone fans out only via mpirun)
    else:
        env.update(gpu_env)
    ours = ["-m", "hf_hetermoe.launch", "--hetermoe-config", os.path.abspath(config_path), script, *script_args]
    if layout.uneven:
        endpoint = f"{layout.main_process_ip}:{layout.main_process_port}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(layout.per_machine)),
            # No --node-rank: c10d ignores it (ranks follow join order); HETERMOE_MACHINE_RANK names the machine.
            "--nproc-per-node", str(layout.local),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"hetermoe-{layout.main_process_port}",
            # Machine 0 hosts the rendezvous store; the others connect to it (on one host, too).
            "--rdzv-conf", f"is_host={str(layout.machine_rank == 0).lower()}", "--max-restarts", "0", *ours,
        ]
        return cmd, env
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config_file is not None:
        cmd += ["--config_file", os.path.abspath(accelerate_config_file)]  # mixed precision and the rest from it
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [
        "--multi_gpu", "--num_processes", str(layout.total), "--num_machines", str(len(layout.per_machine)),
        "--machine_rank", str(layout.machine_rank), "--main_process_port", str(layout.main_process_port),
    ]
    if len(layout.per_machine) > 1:
        cmd += ["--main_process_ip", layout.main_process_ip]
    return cmd + ours, env


def cmd_launch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hetermoe launch",
        description="Run an ordinary Trainer (or Accelerate loop) script on HeterMoE attention ranks, with expert "
                    "ranks serving the experts; on one machine or several (start it once per machine).",
    )
    parser.add_argument("--config", required=True, help="hetermoe YAML config (recipes/hetermoe/*.yaml)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="total processes over all machines: attention + expert ranks (as in accelerate)")
    parser.add_argument("--num-machines", type=int, default=None, help="machines in the job (default 1)")
    parser.add_argument("--machine-rank", type=int, default=None, help="this machine's rank, 0 .. num-machines - 1")
    parser.add_argument("--main-process-ip", default=None, help="machine 0's address (several machines)")
    parser.add_argument("--main-process-port", type=int, default=None, help="a free port on machine 0")
    parser.add_argument("--processes-per-machine", default=None,
                        help="process count of each machine, e.g. 1,2 (machines may differ; started with torchrun)")
    parser.add_argument("--config-file", default=None,
                        help="accelerate config file passed to accelerate launch (not DeepSpeed, FSDP, Megatron, XLA)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)

    from .config import HeterMoEConfig
    from .versions import UnsupportedVersionError, check_versions

    try:
        check_versions()
        config = HeterMoEConfig.from_yaml(ns.config)
        accelerate_config = read_accelerate_config(ns.config_file) if ns.config_file else None
        layout = machine_layout(
            num_processes=ns.num_processes, num_machines=ns.num_machines, machine_rank=ns.machine_rank,
            main_process_ip=ns.main_process_ip, main_process_port=ns.main_process_port,
            processes_per_machine=ns.processes_per_machine, accelerate_config=accelerate_config)
        if layout.uneven and ns.config_file:
            raise ValueError(
                "hetermoe launch: --processes-per-machine with different counts starts the machines with torchrun "
                "(accelerate launch starts the same number on each), so an accelerate --config-file cannot apply; "
                "drop it and set mixed precision in the script (Accelerator(mixed_precision=...)).")
        gpus = [] if _uses_cpu(os.environ) else query_gpus()
        gpu_env = check_roles(config, layout, gpus)
        if not os.path.isfile(ns.script):
            raise ValueError(f"hetermoe launch: training script {ns.script!r} does not exist.")
    except (ValueError, UnsupportedVersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if gpu_env and "CUDA_VISIBLE_DEVICES" in gpu_env:
        print(f"hetermoe launch: attention_ranks: auto; GPUs ordered newest generation first: CUDA_VISIBLE_DEVICES="
              f"{gpu_env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr)
    cmd, env = launch_command(ns.config, layout.total, ns.script, ns.script_args, gpu_env=gpu_env, layout=layout,
                              accelerate_config_file=ns.config_file)
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
