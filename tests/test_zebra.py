"""Zebra parallelism: the runtime's compute order (the batched-head variant of Theorem 1) read from the recorded
timelines, and overlap under device emulation. The orders themselves are tested in tests/test_schedule_order.py.

(Golden equivalence for R in {1, 2, 4}, M in {1, 2}, with accumulation and checkpointing, is in
tests/test_golden_distributed.py.)
"""

import json
import os
import statistics

import pytest

from hf_hetermoe.schedule_order import timeline_order
from tests._assertions import assert_same_losses, assert_same_weights
from tests._dist import spawn
from tests._jobs import train
from tests._zebra_jobs import train_each

M1 = {"attention_ranks": [0]}  # rank 0 attention, rank 1 expert server
LAYERS = 4


def _read_trace(folder, rank):
    with open(os.path.join(folder, f"hetermoe-trace-rank{rank}.json")) as fh:
        events = json.load(fh)["traceEvents"]
    return [(e["cat"], e["args"]["direction"], e["args"]["layer"], e["args"]["stripe"], e["ts"], e["ts"] + e["dur"])
            for e in events]


def _order(tasks, kinds, window=None):
    chosen = [t for t in tasks if t[0] in kinds and (window is None or window[0] <= t[4] <= window[1])]
    return [t[:4] for t in sorted(chosen, key=lambda t: t[4])]


@pytest.mark.slow
def test_runtime_compute_order_is_the_batched_head_variant(tmp_path):
    """One micro-batch (L=4 MoE layers) for R = 2 and R = 3: attention and expert compute order, from traces,
    equal the batched-head variant of Theorem 1 (the paper's order except at the top stage)."""
    runs = []
    for r in (2, 3):
        spec = {"output_dir": str(tmp_path / f"r{r}"), "model": {"num_hidden_layers": LAYERS}, "max_steps": 1,
                "grad_accum": 1, "batch_size": 6, "trace_dir": str(tmp_path / f"trace{r}")}
        runs.append(({"zebra": {"microbatches": r}}, spec))
    spawn(2, train_each, M1, runs, env={"HETERMOE_TRACE": str(tmp_path / "servers")})
    server = _read_trace(tmp_path / "servers", 1)
    for r in (2, 3):
        attention = _read_trace(tmp_path / f"trace{r}", 0)
        expected_attention, expected_experts = timeline_order(LAYERS, r, batched_head=True)
        assert _order(attention, ("A", "H")) == expected_attention
        window = (min(t[4] for t in attention), max(t[5] for t in attention))
        assert _order(server, ("E",), window) == expected_experts
        # The dispatch of stripe j is issued before the attention of stripe j+1 in the same layer ends.
        starts = {t[:4]: t[4] for t in attention}
        ends = {t[:4]: t[5] for t in attention}
        for layer in range(LAYERS):
            for j in range(r - 1):
                assert starts[("D", "F", layer, j)] < ends[("A", "F", layer, j + 1)]


EMULATION = {"devices": ["A40", "V100"], "model": "D1", "seq_len": 16384}


@pytest.mark.slow
def test_zebra_overlaps_under_emulation(tmp_path):
    """With emulated A40 (attention) and V100 (experts), R = 2 iterations are faster than R = 1 (DistEP)."""
    model = {"num_hidden_layers": 4, "num_local_experts": 24}
    runs = [({"zebra": {"microbatches": r}, "emulation": EMULATION},
             {"output_dir": str(tmp_path / f"r{r}"), "model": model, "batch_size": 4, "grad_accum": 1,
              "max_steps": 4}) for r in (1, 2)]
    results = spawn(2, train_each, dict(M1, emulation=EMULATION), runs)[0]
    iteration = {}
    for (config, _), result in zip(runs, results):
        ends = result["step_ends"]
        iteration[config["zebra"]["microbatches"]] = statistics.mean(b - a for a, b in zip(ends[1:], ends[2:]))
        logs = [h for h in result["log_history"] if "hetermoe_attention_busy" in h]
        assert logs and all(h["hetermoe_emulated_devices"] == "A40,V100" for h in logs)
        assert all(0 < h["hetermoe_expert_busy"] <= 1 for h in logs)
        assert all(h["hetermoe_load_imbalance"] >= 1 and 0 < h["hetermoe_busiest_expert_share"] <= 1 for h in logs)
    assert iteration[2] < iteration[1], iteration


@pytest.mark.slow
def test_stripes_without_rows(tmp_path):
    """R = 4 with 2 rows per micro-batch: two stripes are empty but still take part in every exchange."""
    spec = {"batch_size": 2, "model": {"num_hidden_layers": 2}}
    stock = train(spec | {"output_dir": str(tmp_path / "stock"), "final_dir": str(tmp_path / "stock_final")})
    runs = [({"zebra": {"microbatches": 4}}, spec | {"output_dir": str(tmp_path / "z"), "final_dir": str(tmp_path / "z_final")})]
    ours = spawn(2, train_each, M1, runs)[0][0]
    assert_same_losses(stock, ours)
    assert_same_weights(tmp_path / "stock_final", tmp_path / "z_final")
