"""Setup, gather and scatter are correct on any device, and the pieces of a light setup behave.

No GPU here: device correctness is checked on the meta device (which, like CUDA, is not CPU) under a torch
function mode that refuses an index living on another device than the tensor it indexes, as CUDA kernels do
(or copy it over synchronously). The optimizer's `step` placement follows torch.optim's own policy, checked
through a dtype change (the same policy casts moments to the parameter's dtype and device, never `step`).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import MixtralConfig

from hf_hetermoe import asym_ea
from hf_hetermoe.expert_keys import ExpertTensorKey
from hf_hetermoe.expert_shard import ExpertShard, select_experts
from hf_hetermoe.expert_state import _put_experts
from hf_hetermoe.placement import ExpertPlacement
from model_patches import get_family

_INDEXING = {torch.Tensor.index_select, torch.index_select, torch.Tensor.index_copy_, torch.Tensor.index_copy,
             torch.Tensor.index_add_, torch.Tensor.__getitem__, torch.Tensor.__setitem__}


class IndexOnSameDevice(TorchFunctionMode):
    """Fail any indexing whose index is on another device than the indexed tensor, or a Python list."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEXING:
            target = args[0]
            index = args[2] if func not in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) else args[1]
            if isinstance(index, (list, tuple)) and func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
                raise AssertionError(f"{func.__name__} with a Python list index (copied from the host)")
            if isinstance(index, torch.Tensor) and index.device != target.device:
                raise AssertionError(f"{func.__name__}: index on {index.device}, tensor on {target.device}")
        return func(*args, **kwargs)


def tiny_config() -> MixtralConfig:
    return MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=32)


def make_shard(*, allocate: bool = True, dtype=torch.float32, experts=(0, 1, 2, 3)) -> ExpertShard:
    owner = tuple(0 if e in experts else 1 for e in range(4))
    placement = ExpertPlacement(num_experts=4, owner={0: owner, 1: owner})
    return ExpertShard(family=get_family("mixtral"), model_config=tiny_config(), placement=placement, rank=0,
                       device=torch.device("cpu"), dtype=dtype, num_replicas=1, allocate=allocate)


# ---- index tensors on the indexed tensor's device -------------------------------------------------------------
def test_the_mode_catches_a_host_index_into_a_device_tensor():
    with IndexOnSameDevice(), pytest.raises(AssertionError, match="index on cpu"):
        torch.empty(4, 3, device="meta").index_select(0, torch.tensor([1, 2]))


def test_slicing_and_assembling_index_on_the_tensors_device():
    full = {layer: {"gate_up_proj": torch.empty(4, 16, 16, device="meta"),
                    "down_proj": torch.empty(4, 16, 8, device="meta")} for layer in (0, 1)}
    shard = make_shard(allocate=False, experts=(0, 2))
    with IndexOnSameDevice():
        sliced = shard.slice_full(full)
        assert {t.device.type for t in sliced.values()} == {"meta"}
        assert all(t.shape[0] == 2 for t in sliced.values())
        out = torch.empty(4, 16, 8, device="meta")
        _put_experts(out, (1, 3), torch.empty(2, 16, 8, device="meta"))
        assert select_experts(full[0]["down_proj"], [1, 3]).device.type == "meta"


def test_select_experts_values_views_and_copies():
    full = torch.arange(4 * 3.0).reshape(4, 3)
    picked = select_experts(full, (1, 3))
    assert torch.equal(picked, full[[1, 3]])
    view = select_experts(full, (1, 2), view_ok=True)  # consecutive: no copy, for senders
    assert view.data_ptr() == full[1].data_ptr() and torch.equal(view, full[1:3])
    own = select_experts(full, (1, 2))  # a holder's own storage otherwise
    assert own.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
    out = torch.zeros(4, 3)
    _put_experts(out, (0, 2), torch.ones(2, 3))
    assert out[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


# ---- a shard built from slices ----------------------------------------------------------------------------------
def test_an_unallocated_shard_takes_each_layers_slices_as_its_storage():
    shard = make_shard(allocate=False)
    assert all(p.is_meta for p in shard.parameters())
    layer0 = {ExpertTensorKey.weight(0, "gate_up_proj").encode(): torch.randn(4, 16, 16),
              ExpertTensorKey.weight(0, "down_proj").encode(): torch.randn(4, 16, 8)}
    shard.load_layer_weights(0, layer0)
    with pytest.raises(RuntimeError, match=r"no expert weights for layers \[1\]"):
        shard.check_loaded()
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(shard.modules[0], name)
        given = layer0[ExpertTensorKey.weight(0, name).encode()]
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert p.data_ptr() == given.data_ptr()  # handed over, not copied
    # An allocated parameter is copied into: the Parameter an optimizer holds stays the same object.
    before = shard.modules[0].down_proj
    shard.load_layer_weights(0, {k: v + 1 for k, v in layer0.items()})
    assert shard.modules[0].down_proj is before


def test_shard_weights_of_another_dtype_are_converted():
    shard = make_shard(allocate=False, dtype=torch.bfloat16)
    for layer in (0, 1):
        shard.load_layer_weights(layer, {ExpertTensorKey.weight(layer, "gate_up_proj").encode(): torch.randn(4, 16, 16),
                                         ExpertTensorKey.weight(layer, "down_proj").encode(): torch.randn(4, 16, 8)})
    shard.check_loaded()
    assert {p.dtype for p in shard.parameters()} == {torch.bfloat16}


# ---- optimizer state: `step` where stock keeps it ----------------------------------------------------------------
def _stepped_shard(dtype: torch.dtype) -> ExpertShard:
    shard = make_shard(dtype=dtype)
    shard.build_optimizer("torch.optim:AdamW", [{"hyperparams": {"lr": 0.1}, "params": ["gate_up_proj", "down_proj"]}])
    for p in shard.parameters():
        p.grad = torch.ones_like(p)
    shard.step(lrs=[0.1], clip_coef=1.0, skipped=False)
    return shard


def test_loaded_step_stays_a_cpu_tensor_of_the_stock_dtype():
    stock = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], lr=0.1)
    stock.param_groups[0]["params"][0].grad = torch.ones(2, dtype=torch.bfloat16)
    stock.step()
    stock_step = next(iter(stock.state.values()))["step"]

    saved = _stepped_shard(torch.float32).optimizer_state()  # what a checkpoint holds (fp32 moments)
    shard = _stepped_shard(torch.bfloat16)
    shard.load_optimizer_state(saved)
    for p in shard.parameters():
        state = shard.optimizer.state[p]
        assert state["step"].device == stock_step.device == torch.device("cpu")
        assert state["step"].dtype == stock_step.dtype  # not cast to the parameter's dtype
        assert state["exp_avg"].dtype == p.dtype and state["exp_avg"].device == p.device  # moments are
    # The optimizer owns its step: stepping again leaves the caller's state untouched.
    step_key = next(k for k in saved if ExpertTensorKey.decode(k).state == "step")
    before = saved[step_key].clone()
    for p in shard.parameters():
        p.grad = torch.ones_like(p)
    shard.step(lrs=[0.1], clip_coef=1.0, skipped=False)
    assert torch.equal(saved[step_key], before)


# ---- Asym-EA auto timing and the memory check --------------------------------------------------------------------
def test_profiling_timer_synchronises_cuda_around_each_clock_read(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    asym_ea._time(lambda: events.append("run"), torch.device("cuda", 0), repeats=2)
    # warm-up, then per repeat: sync (clock) run sync (clock)
    assert events == ["run", "sync", "run", "sync", "sync", "run", "sync"]
    events.clear()
    asym_ea._time(lambda: events.append("run"), torch.device("cpu"), repeats=2)
    assert events == ["run"] * 3


def test_check_fits_counts_the_experts_setup_releases(monkeypatch):
    placement = ExpertPlacement(num_experts=4, owner={0: (0, 0, 0, 0)})
    monkeypatch.setattr(asym_ea, "free_bytes", lambda device: 1000)
    # 4 experts x 100 bytes x 4 training copies = 1600 bytes: too much for 1000 free ...
    with pytest.raises(ValueError, match="once the model's own expert tensors are released"):
        asym_ea.check_fits(placement, rank=0, bytes_per_expert=100, device=torch.device("cpu"))
    # ... but fits once the model's 1000 bytes of experts are released.
    asym_ea.check_fits(placement, rank=0, bytes_per_expert=100, device=torch.device("cpu"), released_bytes=1000)


def test_a_device_parameters_step_stays_on_cpu_and_its_moments_move_to_the_device():
    """Parameters on a non-CPU device (meta, standing in for CUDA): as torch.optim places stock state on resume,
    the moments follow the parameter and `step` stays on the host (no device sync per parameter per step)."""
    saved = _stepped_shard(torch.float32).optimizer_state()
    owner = (0, 0, 0, 0)
    shard = ExpertShard(family=get_family("mixtral"), model_config=tiny_config(),
                        placement=ExpertPlacement(num_experts=4, owner={0: owner, 1: owner}), rank=0,
                        device=torch.device("meta"), dtype=torch.float32, num_replicas=1)
    shard.build_optimizer("torch.optim:AdamW", [{"hyperparams": {"lr": 0.1}, "params": ["gate_up_proj", "down_proj"]}])
    shard.load_optimizer_state(saved)
    for p in shard.parameters():
        state = shard.optimizer.state[p]
        assert state["step"].device == torch.device("cpu")
        assert state["exp_avg"].is_meta and state["exp_avg_sq"].is_meta


# ---- the initial parameter broadcast ------------------------------------------------------------------------------
class _RecordingGroup:
    """Stands in for the attention group: records what is broadcast and fills it with the root's values (2.0)."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensors, opts):
        (t,) = tensors
        self.sent.append(t)
        t.fill_(2.0)
        return type("Done", (), {"wait": lambda self, *a: True})()


def test_broadcast_sends_large_tensors_in_place_and_small_ones_in_bounded_buckets(monkeypatch):
    from types import SimpleNamespace

    from hf_hetermoe import patching

    monkeypatch.setattr(patching, "_BROADCAST_BUCKET_BYTES", 1024)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).double())
    big = model[0].weight  # 4 KiB: above the bucket bound
    big_ptr = big.data_ptr()
    group = _RecordingGroup()
    patching._broadcast_from_first_attention_rank(model, SimpleNamespace(attention=group, timeout_s=5, rank=1))
    assert all(bool((p == 2.0).all()) for p in model.parameters())  # every tensor took the root's values
    assert any(t.data_ptr() == big_ptr for t in group.sent)  # no copy of the large tensor
    assert max(t.numel() * t.element_size() for t in group.sent if t.data_ptr() != big_ptr) <= 1024
    assert {t.dtype for t in group.sent} == {torch.float32, torch.float64}  # buckets never mix dtypes
