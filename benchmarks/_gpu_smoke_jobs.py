"""The jobs of benchmarks/gpu_smoke.py, at module level so spawned ranks and launched scripts can import them.

`train_gpu(spec)` is tests/_jobs.py's tiny Mixtral training (same model, data, optimizer and schedule) on a
chosen device and precision: stock, or with HeterMoE colocated in one process, or as the attention side of a
launched job. Each probe checks one assumption the GPU path rests on and returns (ok, detail).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


# ---- training --------------------------------------------------------------------------------------------------
def train_gpu(spec: dict) -> dict | None:
    """Train the tiny Mixtral as `spec` says (device "cuda"/"cpu", precision fp32/bf16/fp16, hetermoe None or
    "colocated", final_dir, max_steps, ready_file/ready_step); returns losses on (attention) rank 0."""
    from transformers import MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tests._jobs import tiny_dataset, tiny_mixtral_config

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    losses: list[float] = []

    def record_loss(module, args, output):
        if module.training and output.loss is not None:
            losses.append(output.loss.item())

    model.register_forward_hook(record_loss)
    precision = spec.get("precision", "fp32")
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=spec.get("max_steps", 8), learning_rate=3e-3, warmup_steps=2, lr_scheduler_type="linear",
        weight_decay=0.01, max_grad_norm=0.5, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=spec.get("device", "cuda") == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callbacks: list[Any] = []
    if spec.get("hetermoe") == "colocated":
        from hf_hetermoe import HeterMoECallback, HeterMoEConfig

        callbacks.append(HeterMoECallback(HeterMoEConfig(mode="colocated")))
    if spec.get("ready_file"):
        class WriteWhenReady(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == spec.get("ready_step", 2) and state.is_world_process_zero:
                    with open(spec["ready_file"], "w") as fh:
                        fh.write(str(os.getpid()))

        callbacks.append(WriteWhenReady())
    if spec.get("trace_dir"):
        os.environ["HETERMOE_TRACE"] = spec["trace_dir"]
    num_rows = 4096 if spec.get("max_steps", 8) > 50 else 96
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(num_rows=num_rows), callbacks=callbacks)
    trainer.train()
    if spec.get("final_dir"):
        trainer.save_model(spec["final_dir"])
    if not trainer.is_world_process_zero():
        return None
    result = {"losses": losses, "device": str(trainer.args.device)}
    if spec.get("result_json"):
        with open(spec["result_json"], "w") as fh:
            json.dump(result, fh)
    return result


def launched_rank(hetermoe_config: dict, spec: dict) -> dict | None:
    """One process of a HeterMoE job (tests/_dist.spawn): attention ranks train, expert ranks serve."""
    from hf_hetermoe.config import HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    out: dict[str, Any] = {}
    run_rank(HeterMoEConfig.from_dict(hetermoe_config), lambda: out.update(value=train_gpu(spec)))
    return out.get("value")


# ---- probes ------------------------------------------------------------------------------------------------------
def _nccl_world_of_one(timeout_s: float = 60.0):
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupNCCL(dist.HashStore(), 0, 1, options)


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles for torch.cuda._sleep to keep the current stream busy about `seconds`."""
    rate_khz = None
    try:
        rate_khz = torch.cuda.get_device_properties(0).clock_rate  # kHz
    except Exception:
        pass
    return int(seconds * (rate_khz or 2_000_000) * 1000)


def probe_thread_device() -> tuple[bool, str]:
    """The current CUDA device is per host thread (a new thread starts on device 0); StripeStreams.stripe sets the
    rank's device and the stripe's stream in a stripe thread."""
    from hf_hetermoe.streams import StripeStreams

    n = torch.cuda.device_count()
    index = n - 1
    torch.cuda.set_device(index)
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(torch.cuda.current_device()))
    thread.start()
    thread.join()
    device = torch.device("cuda", index)
    streams = StripeStreams(device, 2)
    streams.begin()
    inside: list[Any] = []

    def stripe():
        with streams.stripe(1):
            inside.append((torch.cuda.current_device(), torch.cuda.current_stream(device) == streams.streams[1]))

    thread = threading.Thread(target=stripe)
    thread.start()
    thread.join()
    fact = (f"a new thread starts on device {seen[0]} while the main thread is on device {index}" if n > 1 else
            f"one GPU: a new thread reports device {seen[0]} (per-thread device not distinguishable)")
    ok = inside == [(index, True)] and (n == 1 or seen[0] == 0)
    return ok, f"{fact}; in a stripe thread StripeStreams gives device/own-stream {inside[0]}"


def probe_nccl_wait() -> tuple[bool, str]:
    """NCCL work.wait() returns before the collective completes; health.wait (DeviceWork) blocks until it has; a
    collective that never completes within the timeout is aborted and named."""
    from hf_hetermoe import health
    from hf_hetermoe.groups import DeviceGroup

    torch.cuda.set_device(0)
    pg = _nccl_world_of_one()
    x = torch.ones(1 << 20, device="cuda")
    pg.allreduce([x]).wait()
    torch.cuda.synchronize()  # the communicator exists now
    torch.cuda._sleep(_sleep_cycles(1.0))  # the current stream is busy ~1 s; NCCL's stream waits for it
    work = pg.allreduce([x])
    t0 = time.perf_counter()
    work.wait()
    wait_s = time.perf_counter() - t0
    done_after_wait = work.is_completed()
    torch.cuda.synchronize()
    done_after_sync = work.is_completed()
    early = (not done_after_wait) and done_after_sync and wait_s < 0.2
    detail = (f"work.wait() returned after {wait_s * 1e3:.1f} ms with is_completed()={done_after_wait} "
              f"(after a stream sync: {done_after_sync})")

    guard = health.DeviceAbort(30.0, [pg])
    group = DeviceGroup(pg, guard)
    torch.cuda._sleep(_sleep_cycles(0.5))
    t0 = time.perf_counter()
    health.wait(group.allreduce([x]), "a probe all-reduce", 0)
    polled_s = time.perf_counter() - t0
    blocked = polled_s > 0.2
    detail += f"; health.wait blocked {polled_s:.2f} s until the device finished"

    pg2 = _nccl_world_of_one()
    y = torch.ones(4, device="cuda")
    pg2.allreduce([y]).wait()
    torch.cuda.synchronize()
    guard2 = health.DeviceAbort(0.3, [pg2])
    torch.cuda._sleep(_sleep_cycles(2.0))
    t0 = time.perf_counter()
    named = False
    try:
        health.wait(DeviceGroup(pg2, guard2).allreduce([y]), "a probe all-reduce that is too slow", 0)
    except RuntimeError as exc:
        named = "failed waiting for a probe all-reduce that is too slow" in str(exc)
        detail += f"; a 2 s collective with timeout 0.3 s raised after {time.perf_counter() - t0:.2f} s: {exc}"
    aborted = guard2.reason is not None
    torch.cuda.synchronize()
    return early and blocked and named and aborted, detail + f" (groups aborted: {aborted})"


def probe_side_stream() -> tuple[bool, str]:
    """A collective issued while a side stream is current: that stream waits for it (health.wait), the main stream
    then waits for the side stream and reads the right values."""
    from hf_hetermoe import health
    from hf_hetermoe.groups import DeviceGroup

    torch.cuda.set_device(0)
    pg = _nccl_world_of_one()
    group = DeviceGroup(pg, health.DeviceAbort(30.0, [pg]))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(_sleep_cycles(0.2))
        y = torch.full((1 << 16,), 2.0, device="cuda")
        work = group.alltoall_base(torch.empty_like(y), y, [y.numel()], [y.numel()], dist.AllToAllOptions())
        health.wait(work, "a side-stream all-to-all", 0)
        z = y * 2
    torch.cuda.current_stream().wait_stream(side)
    ok = bool((z == 4).all().item())
    return ok, f"all-to-all on a side stream, consumed on it and read on the main stream: values {'right' if ok else 'WRONG'}"


def probe_bf16() -> tuple[bool, str]:
    supported = torch.cuda.is_bf16_supported()
    a = torch.randn(64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = a @ a
    ok = supported and out.dtype == torch.bfloat16
    return ok, f"torch.cuda.is_bf16_supported()={supported}; autocast matmul gives {out.dtype}"


PROBES = {"probe-thread-device": probe_thread_device, "probe-nccl-wait": probe_nccl_wait,
          "probe-side-stream": probe_side_stream, "probe-bf16": probe_bf16}
