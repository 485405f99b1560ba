"""Worst-case routing, empty stripes, server memory and numerical faults, in one HeterMoE session.

Attention rank 0 and expert ranks 1-2 (zebra, 2 stripes). A forward hook forces every router to send every
token to experts 0 and 1, both on rank 1: rank 1 receives every row, rank 2 receives none (empty stripes at
every layer). In that one session:
1. the tiny Mixtral trains 8 steps with forced routing: losses and weights equal stock transformers';
2. one expert's weights turn NaN at step 3: its server names layer, expert and rank, and the Trainer's own NaN
   handling (`logging_nan_inf_filter`) logs what stock transformers logs;
3. a medium model trains 2 steps with forced routing: the busy server's peak memory stays within the bound
   computed from the configs (server_memory.py), and is well above the idle server's.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import MixtralForCausalLM

from hf_hetermoe.server_memory import expert_server_memory_bound
from model_patches import get_family
from tests._dist import spawn
from tests._jobs import tiny_mixtral_config, train
from tests._reliability_jobs import MEDIUM, MEDIUM_BATCH, MEDIUM_SEQ, InjectNaN, forced_tiny, train_or_serve

pytestmark = pytest.mark.slow  # every test here runs multi-process jobs

NAN_AT = dict(step=3, layer=1, expert=2)  # expert 2 lives on expert rank 2


def weights(folder) -> dict:
    return MixtralForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("routing")


def specs(base, tag: str) -> tuple[dict, dict]:
    forced = {"output_dir": str(base / f"forced_{tag}"), "final_dir": str(base / f"forced_{tag}_final"),
              "model_factory": forced_tiny}
    nan = {"output_dir": str(base / f"nan_{tag}"), "max_steps": 5, "grad_accum": 1, "callbacks": [InjectNaN(**NAN_AT)]}
    return forced, nan


@pytest.fixture(scope="module")
def session(base):
    forced, nan = specs(base, "ours")
    runs = [("tiny", forced), ("tiny", nan), ("medium", {"output_dir": str(base / "medium")})]
    return spawn(3, train_or_serve, {"attention_ranks": [0]}, runs, timeout=600)


@pytest.fixture(scope="module")
def stock(base):
    forced, nan = specs(base, "stock")
    return train(forced), train(nan)


def test_all_tokens_to_one_server_trains_like_stock(base, session, stock):
    ours = session[0]["results"][0]
    assert len(ours["losses"]) == 16
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(stock[0]["losses"]), rtol=1e-5, atol=0)
    a, b = weights(base / "forced_ours_final"), weights(base / "forced_stock_final")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"weights differ by {worst:.3g}"
    # The routing really was forced: the experts nobody chose kept their initial weights up to weight decay,
    # which stock applies to them too (checked above); the chosen ones moved much more.
    down = a["model.layers.0.mlp.experts.down_proj"]
    torch.manual_seed(0)
    start = MixtralForCausalLM(tiny_mixtral_config()).state_dict()["model.layers.0.mlp.experts.down_proj"]
    moved = (down - start).flatten(1).abs().max(dim=1).values
    assert moved[:2].min() > 10 * moved[2:].max(), moved


def test_nan_in_one_expert_is_reported_with_layer_expert_and_rank(session):
    reports = session[2]["reports"]  # expert rank 2 holds experts 2 and 3
    outputs = [m for m in reports if "in the output of expert" in m]
    assert outputs, reports
    pattern = r"rank (\d+): NaN/inf in the output of expert (\d+) of layer (\d+) \(\d+ rows in step (\d+)"
    found = [tuple(map(int, re.search(pattern, m).groups())) for m in outputs + [
        m for m in session[1]["reports"] if "in the output of expert" in m]]
    # In the step the weights turned NaN (the Trainer's global_step + 1), the lowest layer with a non-finite
    # output is the poisoned one, and there only the poisoned expert: the report points at the cause.
    first_step = min(step for *_, step in found)
    assert first_step == NAN_AT["step"] + 1
    first_layer = min(layer for _, _, layer, step in found if step == first_step)
    assert first_layer == NAN_AT["layer"]
    assert {(r, e) for r, e, layer, step in found if (step, layer) == (first_step, first_layer)} == {
        (2, NAN_AT["expert"])}
    assert any("the gradient of" in m for m in reports)  # and the gradients it caused are named too


def test_trainer_nan_handling_is_unchanged(session, stock):
    ours, theirs = session[0]["results"][1]["log_history"], stock[1]["log_history"]
    ours_loss = [h["loss"] for h in ours if "loss" in h]
    stock_loss = [h["loss"] for h in theirs if "loss" in h]
    assert len(ours_loss) == len(stock_loss) == 5
    assert all(math.isfinite(v) for v in ours_loss)  # logging_nan_inf_filter kept the logged loss finite
    torch.testing.assert_close(torch.tensor(ours_loss), torch.tensor(stock_loss), rtol=1e-5, atol=1e-6)
    norms = [(h["grad_norm"], s["grad_norm"]) for h, s in zip(ours, theirs) if "grad_norm" in h]
    assert all(math.isnan(a) == math.isnan(b) for a, b in norms) and any(math.isnan(a) for a, _ in norms)


def test_worst_case_server_memory_stays_within_the_bound(session):
    config = tiny_mixtral_config(**MEDIUM)
    bound = expert_server_memory_bound(
        family=get_family("mixtral"), model_config=config, num_local_experts=2,
        num_layers=config.num_hidden_layers, tokens_per_microbatch=MEDIUM_BATCH * MEDIUM_SEQ, num_attention=1,
    )
    busy, idle = session[1]["peak_growth_bytes"][2], session[2]["peak_growth_bytes"][2]
    mib = 2**20
    print(f"\nworst-case routing, medium model: busy server peak RSS growth {busy / mib:.1f} MiB, idle server "
          f"{idle / mib:.1f} MiB; bound {bound.describe()}")
    assert busy <= bound.total
    assert idle <= bound.total - bound.activations - bound.transient
    # The busy server kept its activations (every row of every layer): the bound's activation term is real.
    assert busy - idle >= 0.5 * bound.activations
