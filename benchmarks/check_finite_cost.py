"""What `check_finite: true` costs an expert holder: one expert shard, forward + backward + the step's gradient
preparation, with the check on and off, side by side in one process.

    python benchmarks/check_finite_cost.py [--rows 4096] [--hidden 512] [--intermediate 1408] [--repeats 20]

Defaults: 4 local experts of a Mixtral-shaped layer (hidden 512, intermediate 1408; production 4096 / 14336)
and 4096 rows per exchange, in fp32 on this machine's CPU, one thread. Prints the median time per iteration of
each setting and their ratio, in CPU time of this process (one thread: other load on the machine barely moves
it). Runs alternate, so drift hits both settings alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_hetermoe.transport import ExchangeKey
from hf_hetermoe.expert_shard import ExpertShard
from hf_hetermoe.grad_norm import to_host
from hf_hetermoe.placement import ExpertPlacement
from model_patches import get_family
from transformers import MixtralConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=ns.hidden, intermediate_size=ns.intermediate, num_local_experts=ns.experts,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    config._experts_implementation = "grouped_mm"  # what a model built from this config trains with
    placement = ExpertPlacement.even(layers=(0,), num_experts=ns.experts, host_ranks=(0,))
    shard = ExpertShard(family=get_family("mixtral"), model_config=config, placement=placement, rank=0,
                        device=torch.device("cpu"), dtype=torch.float32, num_replicas=1)
    for p in shard.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(ns.rows, ns.hidden)
    experts = torch.randint(0, ns.experts, (ns.rows,)).sort().values
    dy = torch.randn(ns.rows, ns.hidden)

    def iteration(session: int) -> float:
        start = time.process_time()
        key = ExchangeKey(session=session, layer=0, stripe=0)
        shard.forward(key, x, experts, keep=True, autocast_dtype=None)
        shard.backward(key, dy)
        # The step's gradient work as a holder does it: norm parts, their one host copy, the finite report.
        shard.end_grad_norm(to_host(shard.grad_norm_parts()))
        for p in shard.parameters():
            p.grad = None
        shard._grads_prepared = False
        shard._finite_checked = False
        return time.process_time() - start

    times = {True: [], False: []}
    session = 0
    for _ in range(2):  # warm-up
        session += 1
        iteration(session)
    for _ in range(ns.repeats):
        for check in (False, True):
            shard.check_finite = check
            session += 1
            times[check].append(iteration(session))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"expert shard: {ns.experts} experts, hidden {ns.hidden}, intermediate {ns.intermediate}, {ns.rows} rows")
    print(f"check_finite off: {off * 1e3:.2f} ms/iteration, on: {on * 1e3:.2f} ms/iteration, "
          f"ratio on/off {on / off:.4f} ({(on / off - 1) * 100:+.2f} %)")


if __name__ == "__main__":
    main()
