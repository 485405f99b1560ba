"""Planner: the paper's trends on its evaluation setups, and the lower bound against every simulation.

One sweep (clusters O1-O3, C1-C2 x models W1..D3 x 4K/16K/32K, default batch) is shared by the trend checks.
"""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_hetermoe.planner.cluster import ClusterSpec, DeviceGroup
from hf_hetermoe.planner.lower_bound import lower_bound
from hf_hetermoe.planner.model_shape import ModelShape
from hf_hetermoe.planner.planning import evaluate
from hf_hetermoe.planner.profiles import BUILTIN_GPUS
from hf_hetermoe.planner.report import sweep
from hf_hetermoe.planner.strategies import DISTEP, EP, EP_IDEAL, ZP, microbatch_choices, run_zp
from hf_hetermoe.planner.workload import Setup

LENGTHS = (4096, 16384, 32768)


@pytest.fixture(scope="module")
def rows():
    rows, skipped = sweep(seq_lens=LENGTHS)
    assert len(rows) >= 50 and skipped  # every paper setup whose experts divide, and the ones that cannot run
    return rows


def _by_setup(rows):
    out = {}
    for r in rows:
        out.setdefault((r.cluster, r.model), {})[r.seq_len] = r
    return out


def test_zp_asym_ea_beats_ep_and_distep_everywhere(rows):
    for r in rows:
        assert r.speedup(EP) > 1.0, (r.cluster, r.model, r.seq_len)
        assert r.speedup(DISTEP) > 1.0, (r.cluster, r.model, r.seq_len)


def test_gain_over_ep_grows_with_sequence_length(rows):
    means = [statistics.fmean(r.speedup(EP) for r in rows if r.seq_len == s) for s in LENGTHS]
    assert means[0] < means[1] < means[2]
    for key, by_len in _by_setup(rows).items():
        assert by_len[16384].speedup(EP) > by_len[4096].speedup(EP), key
        assert by_len[32768].speedup(EP) > by_len[4096].speedup(EP), key


def test_asym_ea_gain_shrinks_with_sequence_length(rows):
    means = [statistics.fmean(r.asym_gain for r in rows if r.seq_len == s) for s in LENGTHS]
    assert means[0] > means[1] > means[2]
    for key, by_len in _by_setup(rows).items():
        gains = [by_len[s].asym_gain for s in LENGTHS]
        assert all(later <= earlier + 0.02 for earlier, later in zip(gains, gains[1:])), (key, gains)
        assert min(gains) >= 1.0 - 1e-9, (key, gains)  # never worse than plain ZP


def test_asym_ea_vanishes_once_attention_outlasts_the_experts(rows):
    vanished = 0
    for r in rows:
        c, shape, s = r.setup.cluster, r.setup.shape, r.seq_len
        dominated = True
        for x in microbatch_choices(r.setup):
            seqs = max(r.setup.microbatch_seqs(x))
            per_expert = c.num_attention * shape.top_k * seqs * s / shape.num_experts
            t_attn = c.attention.device.attention_s(shape, num_seqs=seqs, seq_len=s)[0]
            t_exp = shape.num_experts // c.num_expert * c.expert.device.expert_s(shape, num_tokens=per_expert)[0]
            dominated &= t_attn >= t_exp
        if dominated:  # T_A^Attn >= T_E^Exp at every R: nothing to gather, nothing moved
            vanished += 1
            assert sum(r.best.offloads) == 0 and r.asym_gain == pytest.approx(1.0), (r.cluster, r.model, s)
    assert vanished >= 3


def test_lower_bound_is_never_above_a_simulated_time(rows):
    for r in rows:
        for res in r.results.values():
            assert r.bound_s <= res.iteration_s * (1 + 1e-9), (r.cluster, r.model, r.seq_len, res.strategy)


@settings(max_examples=40, deadline=None)
@given(att=st.sampled_from(["A40", "L40S", "A100", "H100"]), exp=st.sampled_from(["V100", "T4", "A40"]),
       m=st.integers(1, 4), n_exp=st.sampled_from([1, 2, 4]), layers=st.integers(1, 4),
       hidden=st.sampled_from([512, 1024, 2048]), seq=st.sampled_from([1024, 4096, 16384]),
       per_gpu=st.integers(1, 3), gbps=st.sampled_from([25.0, 100.0, 400.0]), ckpt=st.booleans())
def test_lower_bound_holds_on_random_setups(att, exp, m, n_exp, layers, hidden, seq, per_gpu, gbps, ckpt):
    cluster = ClusterSpec(attention=DeviceGroup(count=m, device=BUILTIN_GPUS[att]),
                          expert=DeviceGroup(count=n_exp, device=BUILTIN_GPUS[exp]), link_gbps=gbps)
    shape = ModelShape(name="random", num_layers=layers, hidden_size=hidden, intermediate_size=hidden * 3,
                       num_experts=8, top_k=2, num_heads=hidden // 128, num_kv_heads=2, head_dim=128, vocab_size=32000)
    setup = Setup(cluster=cluster, shape=shape, seq_len=seq, global_batch=m * per_gpu, checkpointing=ckpt)
    bound = lower_bound(setup).iteration_s
    results, _ = evaluate(setup, max_microbatches=3)
    for res in results.values():
        assert bound <= res.iteration_s * (1 + 1e-9), res.strategy
    for x in microbatch_choices(setup, 3):  # every R, not only the best
        assert bound <= run_zp(setup, x).iteration_s * (1 + 1e-9)
    assert results[EP_IDEAL].iteration_s <= results[EP].iteration_s * 1.5  # sanity: the bound-like baseline
    assert results[ZP].iteration_s <= results[DISTEP].iteration_s * (1 + 1e-9)
