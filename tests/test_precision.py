"""Mixed precision equals stock: the dtype of expert rows on the wire, bf16 and fp16 training against stock,
an fp16 overflow in one expert's gradient skipping the step everywhere, and bf16 refused on pre-Ampere servers.

Tolerances (measured on this CPU, 6 optimizer steps of the tiny Mixtral, fp32 master weights):
- bf16 autocast, `grouped_mm` experts (rows stay fp32): weights within 1.2e-7 of stock, so the fp32 golden
  tolerance (1e-5) holds.
- bf16 autocast, `eager` experts (rows travel in bf16, bitwise the same results as fp32 rows): not exactly stock.
  The experts' numbers are identical; what differs is fp32 summation order elsewhere (stock eager adds the top-k
  outputs with `index_add_` expert by expert, HeterMoE sums over k; the global norm is accumulated in fp64), and
  a 1-ulp fp32 difference flips a bf16 rounding in the next layer's matmul now and then (2^-9 relative), which
  training then carries. Stock against stock with only that summation order changed (eager against batched_mm,
  which sums over k like HeterMoE) differs by 4.1e-5 in the losses and 8.8e-4 in the weights after 6 steps;
  HeterMoE against stock eager: 6.0e-5 and 1.3e-3. Tolerance: 3x the stock-against-stock difference
  (losses 1.5e-4 absolute, weights 3e-3).
  With 1 attention rank + 2 expert servers and one stripe per micro-batch: 6.0e-5 and 1.3e-3 (same tolerance).
- zebra with R = 2 stripes under bf16 autocast is further off stock than fp32 zebra, whatever the rows' dtype:
  attention runs on half micro-batches, and CPU bf16 kernels round differently for other shapes. Measured after
  6 steps: grouped_mm (fp32 rows, the exchange is the fp32 one) 4.6e-5 (losses) and 1.3e-3 (weights), eager (bf16
  rows) 1.0e-4 and 4.8e-3. Not tested here: no stock run has those shapes to compare with.
- fp16 autocast with a GradScaler (grouped_mm, fp32 experts), one of 6 steps skipped: 2.9e-6 (relative, losses)
  and 6.4e-6 (weights), colocated and on 1 attention + 2 expert ranks with R = 1 alike (R = 2: 1.1e-4 in the
  weights, the shape effect above); tolerance 1e-5 (relative, losses) and 1e-4 (weights). The loss scales and the
  skipped step must be exactly stock's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import MixtralForCausalLM

from hf_hetermoe import HeterMoEConfig, apply_hetermoe, get_engine
from hf_hetermoe import protocol as cmds
from hf_hetermoe.expert_server import ExpertServer
from hf_hetermoe.precision import check_grad_scaler, wire_dtype
from tests._dist import spawn
from tests._jobs import tiny_mixtral_config
from tests._precision_jobs import (INIT_SCALE, train_on_pre_ampere_servers, train_precision,
                                   train_precision_under_launcher)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
M1 = {"attention_ranks": [0]}  # 1 attention rank + 2 expert servers on 3 processes

BF16_EAGER_LOSS_ATOL, BF16_EAGER_WEIGHT_ATOL = 1.5e-4, 3e-3
FP32_LIKE_ATOL = 1e-5


# ---- the wire dtype --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation, weight, autocast, given, has_bias, expected", [
    ("grouped_mm", F32, BF16, F32, False, F32),    # grouped_mm casts to the weight dtype: fp32 experts
    ("grouped_mm", BF16, None, BF16, False, BF16),  # a bf16 model
    ("grouped_mm", BF16, BF16, F32, False, BF16),  # bf16 weights under autocast: the cast goes to bf16
    ("eager", F32, BF16, F32, False, BF16),        # F.linear is an autocast op
    ("batched_mm", F32, F16, F32, False, F16),
    ("eager", F32, None, F32, False, F32),
    ("eager", BF16, None, BF16, False, BF16),
    ("eager", F32, BF16, F32, True, F32),          # GPT-OSS biases: results are promoted to fp32
    ("eager", torch.float64, BF16, torch.float64, False, torch.float64),  # autocast leaves fp64 alone
    ("some_hub_kernel", F32, BF16, F32, False, F32),  # unknown: what the stock module receives
])
def test_wire_dtype_rule(implementation, weight, autocast, given, has_bias, expected):
    assert wire_dtype(implementation, weight, autocast, given, has_bias=has_bias) is expected


def _rows_on_the_wire(implementation: str, *, model_dtype: torch.dtype, autocast: torch.dtype | None):
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(experts_implementation=implementation)).to(model_dtype)
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    transport = get_engine(model).transport
    seen = {"F": set(), "B": set()}
    forward, backward = transport.dispatch_forward, transport.dispatch_backward

    def dispatch_forward(key, x_PH, *args, **kwargs):
        seen["F"].add(x_PH.dtype)
        return forward(key, x_PH, *args, **kwargs)

    def dispatch_backward(key, plan, dy_PH, **kwargs):
        seen["B"].add(plan.row_dtype)
        return backward(key, plan, dy_PH, **kwargs)

    transport.dispatch_forward, transport.dispatch_backward = dispatch_forward, dispatch_backward
    ids = torch.randint(0, 96, (2, 8))
    with torch.autocast("cpu", dtype=autocast or BF16, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad.dtype is model_dtype and torch.isfinite(grad).all()
    return seen


@pytest.mark.parametrize("implementation, model_dtype, autocast, expected", [
    ("eager", F32, BF16, BF16),       # eager computes in bf16 under bf16 autocast: rows travel in bf16
    ("grouped_mm", F32, BF16, F32),   # grouped_mm computes in the fp32 weight dtype: rows stay fp32
    ("grouped_mm", BF16, None, BF16),  # a bf16 model without autocast
])
def test_rows_on_the_wire(implementation, model_dtype, autocast, expected):
    seen = _rows_on_the_wire(implementation, model_dtype=model_dtype, autocast=autocast)
    assert seen == {"F": {expected}, "B": {expected}}


# ---- bf16 on pre-Ampere expert servers ------------------------------------------------------------------------
def _server(capability, implementation="eager"):
    server = object.__new__(ExpertServer)  # only what the dtype checks read
    server.groups = type("Groups", (), {"rank": 2})()
    server.capability, server.device_name = capability, "Tesla V100-SXM2-32GB"
    server.experts_implementation = implementation
    return server


def _forward(autocast, row_dtype):
    return cmds.Forward(layer=0, stripe=0, session=1, keep=True, autocast=autocast, row_dtype=row_dtype, seq_len=8)


def test_bf16_refused_on_pre_ampere_server():
    with pytest.raises(ValueError, match=r"expert rank 2 runs on Tesla V100-SXM2-32GB \(compute capability 7\.0\).*"
                                         r"fp16 mixed precision.*or in fp32"):
        _server((7, 0)).check_forward_dtypes(_forward(BF16, BF16))
    with pytest.raises(ValueError, match="expert weights dtype"):  # a bf16 model, at Setup
        _server((7, 0)).check_dtype(BF16, "the model's expert weights dtype")
    # grouped_mm with fp32 weights computes in fp32 even under bf16 autocast: nothing runs in bf16 there.
    _server((7, 0), "grouped_mm").check_forward_dtypes(_forward(BF16, F32))
    with pytest.raises(ValueError):
        _server((7, 0), "grouped_mm").check_forward_dtypes(_forward(BF16, BF16))
    _server((7, 0)).check_forward_dtypes(_forward(F16, F16))  # fp16 is the fix
    _server((8, 0)).check_forward_dtypes(_forward(BF16, BF16))  # Ampere
    _server(None).check_forward_dtypes(_forward(BF16, BF16))  # CPU


def test_grad_scaler_fields_are_checked():
    check_grad_scaler(torch.amp.GradScaler("cpu"))
    check_grad_scaler(None)
    with pytest.raises(RuntimeError, match="_per_optimizer_states"):
        check_grad_scaler(object())


# ---- training against stock, one process ----------------------------------------------------------------------
def _max_weight_diff(a: dict, b: dict) -> float:
    return max(float(abs(a[k] - b[k]).max()) for k in a)


def _assert_close_run(stock: dict, ours: dict, *, loss_atol: float, weight_atol: float) -> None:
    assert len(ours["losses"]) == len(stock["losses"]) == 12
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock["losses"]), rtol=0, atol=loss_atol)
    assert len(ours["weights"]) == len(stock["weights"]) == 6
    worst = _max_weight_diff(stock["weights"][-1], ours["weights"][-1])
    assert worst <= weight_atol, f"final weights differ by {worst:.3g}"


@pytest.mark.parametrize("implementation, loss_atol, weight_atol", [
    ("grouped_mm", FP32_LIKE_ATOL, FP32_LIKE_ATOL),
    ("eager", BF16_EAGER_LOSS_ATOL, BF16_EAGER_WEIGHT_ATOL),
])
def test_bf16_autocast_colocated_equals_stock(tmp_path, implementation, loss_atol, weight_atol):
    spec = {"precision": "bf16", "experts_implementation": implementation}
    stock = train_precision(dict(spec, output_dir=str(tmp_path / "stock")))
    ours = train_precision(dict(spec, output_dir=str(tmp_path / "ours"), colocated=True))
    _assert_close_run(stock, ours, loss_atol=loss_atol, weight_atol=weight_atol)


INF_STEP = 3


def _assert_overflow_skipped(run: dict) -> None:
    """Optimizer step INF_STEP changed no weight, halved the scale; every weight stays finite."""
    scales = run["scales"]
    assert scales[INF_STEP - 2] == INIT_SCALE and scales[INF_STEP - 1] == INIT_SCALE / 2, scales
    before, after = run["weights"][INF_STEP - 2], run["weights"][INF_STEP - 1]
    assert all((before[k] == after[k]).all() for k in before), "the overflowing step changed weights"
    assert all(np.isfinite(w).all() for weights in run["weights"] for w in weights.values())
    norms = [h["grad_norm"] for h in run["log_history"] if "grad_norm" in h]
    assert math.isinf(norms[INF_STEP - 1]) and all(math.isfinite(n) for i, n in enumerate(norms) if i != INF_STEP - 1)


def _assert_fp16_run_equals_stock(stock: dict, ours: dict) -> None:
    _assert_overflow_skipped(stock)
    _assert_overflow_skipped(ours)
    assert ours["scales"] == stock["scales"]
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock["losses"]), rtol=1e-5, atol=0)
    worst = _max_weight_diff(stock["weights"][-1], ours["weights"][-1])
    assert worst <= 1e-4, f"final weights differ by {worst:.3g}"


@pytest.mark.parametrize("inf_in", ["expert", "attention"])
def test_fp16_overflow_skips_the_step_everywhere_colocated(tmp_path, inf_in):
    """fp16 autocast + torch.amp.GradScaler through the stock Trainer (tests/_precision_jobs.py gives the CPU the
    scaler accelerate creates on GPUs). An inf only in one expert's gradient, which the scaler never sees, skips
    that step for attention and experts, halves the scale, and training goes on equal to stock (where the scaler
    finds the same inf itself). An inf in an attention gradient (found by the scaler) skips the experts too: the
    Trainer's default fused AdamW skips inside `step()`, which accelerate does not report."""
    spec = {"precision": "fp16", "inf_step": INF_STEP, "inf_in": inf_in}
    stock = train_precision(dict(spec, output_dir=str(tmp_path / "stock")))
    ours = train_precision(dict(spec, output_dir=str(tmp_path / "ours"), colocated=True))
    _assert_fp16_run_equals_stock(stock, ours)


# ---- 1 attention rank + 2 expert servers ------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_autocast_m1_n2_equals_stock(tmp_path):
    """Rows travel in bf16 to two expert servers. One stripe per micro-batch (R = 1): attention runs on the same
    batch shapes as stock, so the comparison isolates the exchange (see the module docstring for R = 2)."""
    spec = {"precision": "bf16", "experts_implementation": "eager"}
    stock = train_precision(dict(spec, output_dir=str(tmp_path / "stock")))
    config = dict(M1, zebra={"microbatches": 1})
    ours = spawn(3, train_precision_under_launcher, config, dict(spec, output_dir=str(tmp_path / "ours")))[0]
    _assert_close_run(stock, ours, loss_atol=BF16_EAGER_LOSS_ATOL, weight_atol=BF16_EAGER_WEIGHT_ATOL)


@pytest.mark.slow
def test_fp16_overflow_on_an_expert_server_skips_the_step_everywhere(tmp_path):
    """The overflowing expert lives on an expert server: the server's norm share is inf, the leader marks the
    scaler, and the Step command tells both servers the step is skipped."""
    spec = {"precision": "fp16", "inf_step": INF_STEP}
    stock = train_precision(dict(spec, output_dir=str(tmp_path / "stock")))
    config = dict(M1, zebra={"microbatches": 1})  # stock batch shapes (the module docstring says why)
    ours = spawn(3, train_precision_under_launcher, config, dict(spec, output_dir=str(tmp_path / "ours")))[0]
    _assert_fp16_run_equals_stock(stock, ours)


@pytest.mark.slow
def test_bf16_on_pre_ampere_servers_fails_fast_with_the_reason_on_the_attention_rank(tmp_path):
    """Servers reporting compute capability 7.0 refuse the first bf16 forward before entering its collectives;
    the attention rank waiting in the exchange fails at once and names the servers' reason (no timeout)."""
    spec = {"precision": "bf16", "experts_implementation": "eager", "output_dir": str(tmp_path / "ours")}
    with pytest.raises(AssertionError) as failed:
        spawn(3, train_on_pre_ampere_servers, dict(M1, timeout_s=60), spec, timeout=60)
    attention_rank = str(failed.value).split("rank 0:\n", 1)[1].split("\nrank 1:\n", 1)[0]
    assert "expert rank 1 runs on cpu (compute capability 7.0)" in attention_rank
    assert "Train with fp16 mixed precision" in attention_rank
