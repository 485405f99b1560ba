"""Jobs for the zebra tests: several trainings (one per HeterMoE config) in one launcher session."""

from __future__ import annotations

from typing import Any

from tests._jobs import train


def train_each(launcher_config: dict, runs: list[tuple[dict, dict]]) -> list[dict | None]:
    """Under one launcher session, train once per (hetermoe config, spec); the expert servers serve each model
    in turn. Returns the per-run results on attention rank 0."""
    from hf_hetermoe import HeterMoECallback, HeterMoEConfig
    from hf_hetermoe.config import HeterMoEConfig as _Config
    from hf_hetermoe.launch import run_rank

    results: list[Any] = []

    def attention_main() -> None:
        for hetermoe_config, spec in runs:
            callback = HeterMoECallback(HeterMoEConfig.from_dict(hetermoe_config))
            results.append(train(spec | {"callbacks": [callback]}))

    run_rank(_Config.from_dict(launcher_config), attention_main)
    return results
