"""Spawn W processes on 127.0.0.1 (gloo) and run a function in each, as a launcher would.

Each child gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (a free port) and
ACCELERATE_USE_CPU=1, then calls `target(*args)` and reports its return value or its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, env: dict, target: Callable, args: tuple, queue) -> None:
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(1)
        queue.put((rank, True, target(*args)))
    except BaseException:  # report everything, including SystemExit
        queue.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)


# Importing torch and transformers costs ~7 s per process on this machine; a fork server that has imported
# them once hands every rank a ready interpreter (rank environment variables are set after the fork).
_PRELOAD = ["torch", "torch.distributed", "transformers", "accelerate", "datasets", "safetensors",
            "transformers.models.mixtral.modeling_mixtral", "tests._jobs"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def spawn(world: int, target: Callable, *args: Any, env: dict | None = None, timeout: float = 300) -> list[Any]:
    """Run `target(*args)` in `world` processes; return the per-rank results or raise with every failure."""
    if os.environ.get("HETERMOE_TEST_IS_SLOW") == "0":  # set by tests/conftest.py for each test
        raise AssertionError("spawn() starts a multi-process job: mark the test @pytest.mark.slow")
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, env or {}, target, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, ok, value = queue.get(timeout=0.5)
            results[rank] = (ok, value)
        except Exception:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(results.items()) if not ok]
    if alive:
        failures.append(f"ranks {alive} still running after {timeout:.0f}s (killed)")
    missing = [r for r in range(world) if r not in results and r not in alive]
    if missing:
        failures.append(f"ranks {missing} exited without a result (exit codes {[procs[r].exitcode for r in missing]})")
    if failures:
        raise AssertionError("distributed job failed:\n" + "\n".join(failures))
    return [results[r][1] for r in range(world)]
