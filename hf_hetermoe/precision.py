"""Mixed precision that equals stock: the dtype rows travel in, the fp16 loss scaler, bf16 on older GPUs.

Three rules, each stated where it is decided:
- `wire_dtype`: expert rows (forward inputs, results, and their gradients) travel in the dtype the stock experts
  module computes in, which is the narrowest dtype that reproduces stock numbers exactly;
- `scaled_clip_grad_norm` / `mark_step_skipped`: with fp16 and a `torch.amp.GradScaler`, a non-finite global
  gradient norm (expert gradients included, which the scaler never sees) skips the step everywhere and backs the
  scale off, as the scaler does for an inf in the attention gradients;
- `check_compute_dtype`: an expert server refuses to compute in bf16 on a GPU without bf16 support.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .expert_state import ExpertState

# transformers' experts implementations whose input cast is known (transformers/integrations/moe.py).
GROUPED_MM = "grouped_mm"
AUTOCAST_CAST_IMPLEMENTATIONS = ("eager", "batched_mm")


def wire_dtype(implementation: str | None, weight_dtype: torch.dtype, autocast_dtype: torch.dtype | None,
               input_dtype: torch.dtype, *, has_bias: bool = False) -> torch.dtype:
    """The dtype of expert rows on the wire: the dtype the stock experts module computes its first matmul in.

    Why this is exact (the holder runs the stock module on the received rows, top-1 with weight 1):
    - the stock module's first operation on its input is a cast to this dtype `c` (gathering rows changes no
      value), so casting before sending gives the same operand;
    - a row's expert output (before the routing weight) is computed in `c`, so it is representable in `c` and the
      module's final `.to(input dtype)` on the holder is lossless; the attention side multiplies it by the routing
      weight with the same type promotion as stock (`c` times the weights' dtype), and casts the top-k sum to the
      hidden states' dtype as stock does;
    - backward: the output gradient is rounded to `c` by the autograd of that same multiplication (where stock
      rounds it), and the input gradient leaves the first matmul in `c`; the attention side casts it to the input
      dtype as the backward of stock's cast does.

    Per implementation:
    - `grouped_mm` (transformers' default): `torch._grouped_mm` is not an autocast op, so transformers casts the
      input to the WEIGHT dtype: with fp32 master weights the stock experts compute in fp32 even under bf16
      autocast, and rows must stay fp32;
    - `eager` and `batched_mm`: `F.linear`/`@`/`bmm` are autocast ops, so under autocast the first matmul casts
      the input to the autocast dtype (fp64 is never cast by autocast). With biases (GPT-OSS) the stock output is
      `matmul (autocast dtype) + bias (weight dtype)`, promoted to the weight dtype, so the results would not be
      representable in the autocast dtype: such rows keep the input dtype;
    - anything else (kernels from the Hub, future implementations): the input dtype, which is exact whatever the
      module does (it is what the stock module receives).
    """
    if implementation == GROUPED_MM:
        return weight_dtype
    if implementation in AUTOCAST_CAST_IMPLEMENTATIONS:
        if autocast_dtype is not None and input_dtype != torch.float64 and not has_bias:
            return autocast_dtype
        return input_dtype
    return input_dtype


# ---- fp16: the loss scaler ---------------------------------------------------------------------------------------
# `torch.amp.GradScaler` keeps, per optimizer, the inf/NaN flags `unscale_` found on each device in
# `_per_optimizer_states[id(optimizer)]["found_inf_per_device"]` (float tensors, 1.0 = found); `step` skips the
# optimizer step when any flag is set and `update` backs the scale off. No public API sets a flag, and the
# scaler only inspects the gradients of the optimizer it unscales (the attention side's): expert gradients live
# on other ranks. `check_grad_scaler` verifies the private layout at start-up.
_SCALER_STATES = "_per_optimizer_states"
_FOUND_INF = "found_inf_per_device"


def enabled_scaler(accelerator: Any) -> Any:
    """The Accelerator's GradScaler when fp16 loss scaling is on, else None (no scaler, or a disabled one)."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def check_grad_scaler(scaler: Any) -> None:
    """Raise RuntimeError, naming the private field, when the installed torch's GradScaler lacks it."""
    if scaler is None:
        return
    from torch.amp import grad_scaler

    fresh = getattr(grad_scaler, "_refresh_per_optimizer_state", None)
    if not hasattr(scaler, _SCALER_STATES) or fresh is None or _FOUND_INF not in fresh() or "stage" not in fresh():
        raise RuntimeError(
            f"hetermoe: fp16 training needs torch.amp.GradScaler's private `{_SCALER_STATES}[id(optimizer)]"
            f"['{_FOUND_INF}']` to skip a step whose expert gradients overflow; {type(scaler).__name__} of torch "
            f"{torch.__version__} does not have it. Install a supported torch version, or train in bf16 or fp32."
        )


def mark_step_skipped(scaler: Any) -> None:
    """Set the found-inf flag of every optimizer the scaler unscaled this step: its `step` skips them and
    `update` reduces the scale, exactly as for an inf found in their own gradients (a fused optimizer, which the
    scaler calls anyway, reads the same flag as `optimizer.found_inf` and skips inside)."""
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, _SCALER_STATES)
    unscaled = [s for s in states.values() if s["stage"] is OptState.UNSCALED]
    if not unscaled:
        raise RuntimeError("hetermoe: a step with non-finite gradients must be marked after the scaler unscaled "
                           "the optimizer's gradients (accelerator.unscale_gradients / scaler.unscale_).")
    for state in unscaled:
        flags = state[_FOUND_INF]
        if flags:
            for flag in flags.values():
                flag.fill_(1.0)
        else:  # no attention gradient at all: `update` still needs one flag
            device = scaler._scale.device if scaler._scale is not None else torch.device("cpu")
            flags[device] = torch.ones((), dtype=torch.float32, device=device)


def scaled_clip_grad_norm(state: "ExpertState", params: list[torch.nn.Parameter], max_norm: float | None,
                          scaler: Any | None) -> torch.Tensor:
    """The global gradient norm of a step (clipping when `max_norm` is given), after the attention gradients
    were unscaled by `scaler` (None: no loss scaling). Expert gradients are unscaled by the same factor.

    With a scaler, a non-finite norm means some gradient (possibly only an expert's) overflowed: nothing is
    clipped (the coefficient would be 0 and inf * 0 = NaN), the step is marked skipped for the scaler, and
    `state.overflow` makes the experts skip it too (ExpertState.step), as stock fp16 skips the whole model.
    Without a scaler the stock clipping semantics stay (a non-finite norm clips by 0, as torch does).
    """
    unscale = 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0
    if max_norm is None:
        total = state.global_grad_norm(params, unscale=unscale)
    else:
        total = state.clip_grad_norm(params, max_norm, unscale=unscale, skip_if_nonfinite=scaler is not None)
    if scaler is not None and not torch.isfinite(total).item():
        mark_step_skipped(scaler)
        state.overflow = True
    return total


# ---- bf16 on expert servers ----------------------------------------------------------------------------------
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first CUDA generation with bf16 tensor cores


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of `device`, None on other devices (no bf16 restriction known)."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def check_compute_dtype(dtype: torch.dtype | None, *, rank: int, capability: tuple[int, int] | None,
                        device_name: str, what: str) -> None:
    """ValueError when an expert rank would compute in bf16 on a GPU older than Ampere (V100, T4: no bf16 tensor
    cores; kernels are emulated or missing), naming the GPU, the rank and the fix."""
    if dtype is not torch.bfloat16 or capability is None or tuple(capability) >= BF16_MIN_CAPABILITY:
        return
    major, minor = capability
    raise ValueError(
        f"hetermoe: expert rank {rank} runs on {device_name} (compute capability {major}.{minor}), which has no "
        f"bf16 support (it needs {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]} or newer), but {what} is bf16. "
        "Train with fp16 mixed precision (TrainingArguments(fp16=True)) or in fp32 instead of bf16."
    )
