"""The lower bound: every GPU busy all the time, with attention and expert work split ideally.

Variables: for each device group x, the fractions a_x and e_x of the iteration's attention and expert work it
does, and the iteration time T. One GPU of group x needs W^A_x / W^E_x seconds for all the attention /
expert work (`workload.iteration_work`), so

    minimise T  subject to  (a_x W^A_x + e_x W^E_x) / count_x <= T  for each x,
                            sum_x a_x = 1,  sum_x e_x = 1,  a, e >= 0.

Communication, dependencies and bubbles are ignored, and any real split costs at least its share of the
one-piece cost, so no schedule of the same work on the same GPUs can finish faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from .workload import Setup, iteration_work


@dataclass(frozen=True, kw_only=True)
class LowerBound:
    iteration_s: float
    attention_share: dict[str, float]  # group label -> fraction of attention work
    expert_share: dict[str, float]


def lower_bound(setup: Setup) -> LowerBound:
    c = setup.cluster
    if c.mixed_attention or c.mixed_expert:  # roles do not matter here: one group per GPU kind
        from .cluster import DeviceGroup

        kinds: dict[str, DeviceGroup] = {}
        for d in c.devices:
            kinds[d.name] = DeviceGroup(count=kinds[d.name].count + 1 if d.name in kinds else 1, device=d)
        groups, labels = list(kinds.values()), [f"{g.count}x{g.name}" for g in kinds.values()]
    else:
        groups, labels = [c.attention, c.expert], list(c.labels)
    work = [iteration_work(setup, g.device) for g in groups]
    k = len(groups)
    # x = [a_0..a_{k-1}, e_0..e_{k-1}, T]
    c = np.zeros(2 * k + 1)
    c[-1] = 1.0
    a_ub = np.zeros((k, 2 * k + 1))
    for i, (g, (wa, we)) in enumerate(zip(groups, work)):
        a_ub[i, i], a_ub[i, k + i], a_ub[i, -1] = wa / g.count, we / g.count, -1.0
    a_eq = np.zeros((2, 2 * k + 1))
    a_eq[0, :k] = 1.0
    a_eq[1, k:2 * k] = 1.0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(k), A_eq=a_eq, b_eq=np.ones(2), bounds=[(0, None)] * (2 * k + 1),
                  method="highs")
    assert res.status == 0, f"lower-bound LP failed: {res.message}"
    x = res.x
    return LowerBound(
        iteration_s=float(x[-1]),
        attention_share={lab: float(x[i]) for i, lab in enumerate(labels)},
        expert_share={lab: float(x[k + i]) for i, lab in enumerate(labels)},
    )
