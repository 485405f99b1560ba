"""Shared assertions of the multi-process tests: same losses and same final weights as a reference run."""

from __future__ import annotations

import torch
from transformers import MixtralForCausalLM


def stock_weights(folder) -> dict:
    return MixtralForCausalLM.from_pretrained(folder).state_dict()


def max_weight_difference(folder_a, folder_b) -> float:
    a, b = stock_weights(folder_a), stock_weights(folder_b)
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_weights(folder_a, folder_b, atol=1e-5) -> None:
    worst = max_weight_difference(folder_a, folder_b)
    assert worst <= atol, f"weights differ by {worst:.3g}"


def assert_same_losses(reference: dict, ours: dict, rtol=1e-5) -> None:
    assert len(ours["losses"]) == len(reference["losses"]) == 16
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0)


def logged(result: dict, key: str) -> list[float]:
    return [h[key] for h in result["log_history"] if key in h]
