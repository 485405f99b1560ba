"""Guards against HeterMoE's overhead over stock training creeping back (benchmarks/overhead.py times it; these
count what makes it, so they do not depend on the machine's speed).

A colocated one-process training step (forward, backward, clipped global norm, optimizer steps) is run under a
dispatch mode that sees every aten call:
- no float64 tensor is made (the norm is computed in the gradients' dtype, as stock computes it);
- the gradient norm takes one `_foreach_norm` per side (attention, experts), as stock takes one per dtype;
- host reads in the step's gradient work (norm, clipping, stepping the experts, the torch optimizers' own step
  aside) are one, whatever the number of layers.
And the holders' grouped-matmul path (grouped_rows.py) equals the stock experts module, rows from one source and
from several.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MixtralForCausalLM

from hf_hetermoe import HeterMoEConfig, apply_hetermoe, get_engine
from hf_hetermoe.grouped_rows import expert_order, run_experts, uses_grouped_mm
from model_patches import get_family
from tests._jobs import tiny_mixtral_config


class OpCounter(TorchDispatchMode):
    """Counts float64 outputs, foreach norms and host reads (`item`/`float`/`int`/`tolist`, copies to the CPU
    from another device)."""

    def __init__(self):
        super().__init__()
        self.float64 = 0
        self.foreach_norms = 0
        self.host_reads = 0
        self.paused = False  # inside a torch optimizer's step: stock code, not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.host_reads += 1
        if name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
            target = out if isinstance(out, torch.Tensor) else args[0]
            if target.device.type == "cpu" and args[-1 if name == "copy_" else 0].device.type != "cpu":
                self.host_reads += 1
        if name == "_foreach_norm":
            self.foreach_norms += 1
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.float64 += 1
        return out


@contextlib.contextmanager
def counting(monkeypatch):
    """An OpCounter that also counts `Tensor.tolist` (a host read the dispatcher does not see)."""
    counter = OpCounter()
    original = torch.Tensor.tolist

    def tolist(self):
        counter.host_reads += 0 if counter.paused else 1
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", tolist)
        with counter:
            yield counter


def _colocated(num_layers: int):
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(num_hidden_layers=num_layers))
    apply_hetermoe(model, HeterMoEConfig(mode="colocated"))
    engine = get_engine(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine.state.setup_optimizer(optimizer, {name: 0 for name in get_family("mixtral").expert_param_names})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return model, engine, optimizer, {"input_ids": ids, "labels": ids}


def _step_counts(num_layers: int, monkeypatch) -> tuple[OpCounter, OpCounter]:
    """(whole training step, its gradient work only), after one warm-up step (optimizer state exists)."""
    model, engine, optimizer, batch = _colocated(num_layers)
    params = list(model.parameters())

    def gradient_work():
        engine.state.clip_grad_norm(params, 1.0)
        optimizer.step()
        engine.state.step(lrs=[1e-3], skipped=False)
        optimizer.zero_grad(set_to_none=True)

    model(**batch).loss.backward()
    gradient_work()
    with counting(monkeypatch) as whole:
        model(**batch).loss.backward()
        with counting(monkeypatch) as grads:
            # torch's AdamW on CPU reads each parameter's step count (`.item()`): stock work, not counted.
            for opt in (optimizer, engine.shard.optimizer):
                monkeypatch.setattr(opt, "step", _paused(grads, opt.step))
            gradient_work()
    return whole, grads


def _paused(counter: OpCounter, step):
    def run(*args, **kwargs):
        counter.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            counter.paused = False

    return run


def test_colocated_step_makes_no_float64_and_reads_the_host_once_per_step(monkeypatch):
    one_whole, one = _step_counts(1, monkeypatch)
    three_whole, three = _step_counts(3, monkeypatch)
    assert one_whole.float64 == 0 and three_whole.float64 == 0
    # One foreach norm for the attention gradients, one for the experts' (all fp32 on the CPU).
    assert one.foreach_norms == 2 and three.foreach_norms == 2
    # The norm's one host copy (a tolist of the stacked parts), whatever the number of layers.
    assert one.host_reads == three.host_reads == 1


@pytest.mark.parametrize("sources", [1, 3])
def test_grouped_rows_equal_the_stock_experts_module(sources):
    torch.manual_seed(0)
    module = get_family("mixtral").make_local_experts(tiny_mixtral_config(), 3)
    module.config._experts_implementation = "grouped_mm"
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert uses_grouped_mm(module)
    # Rows as a holder receives them: by source, then by local expert (expert 1 gets no row).
    g = torch.Generator().manual_seed(2)
    per_source = [torch.tensor([3, 0, 2]), torch.tensor([1, 0, 4]), torch.tensor([2, 0, 0])][:sources]
    local_expert_R = torch.cat([torch.repeat_interleave(torch.arange(3), c) for c in per_source])
    x_RH = torch.randn(len(local_expert_R), 32, generator=g)
    dy_RH = torch.randn(len(local_expert_R), 32, generator=g)

    x_ours = x_RH.clone().requires_grad_()
    y_ours = run_experts(module, x_ours, local_expert_R, expert_order(local_expert_R, sources), 3)
    y_ours.backward(dy_RH)
    ours_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()

    x_stock = x_RH.clone().requires_grad_()
    index_R1 = local_expert_R.unsqueeze(1)
    y_stock = module(x_stock, index_R1, torch.ones(index_R1.shape))
    y_stock.backward(dy_RH)
    torch.testing.assert_close(y_ours, y_stock, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_stock.grad, rtol=1e-6, atol=1e-6)
    for ours, p in zip(ours_grads, module.parameters()):
        torch.testing.assert_close(ours, p.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_clip_coefficient_is_torch_clip_coefficient_bit_for_bit(dtype):
    from hf_hetermoe.grad_norm import clip_coefficient

    g = torch.Generator().manual_seed(3)
    for norm in (torch.rand(200, generator=g) * 4).to(dtype):
        # torch.nn.utils.clip_grads_with_norm_: max_norm / (total_norm + 1e-6), clamped to 1, in the norm's dtype
        reference = torch.clamp(0.5 / (norm + 1e-6), max=1.0).item()
        assert clip_coefficient(0.5, norm.item(), dtype) == reference
