"""The HeterMoE planner: device profiles, the profiler, Asym-EA (Algorithm 1), the schedule simulator and
`hetermoe plan | simulate | profile`. Pure Python plus small measurements; independent of the runtime (it shares
only the pure-Python split arithmetic of hf_hetermoe/placement.py, so a plan's split is what the runtime places).

Modules (one concern each):
    model_shape, presets    model geometry; the paper's W1, W2, D1, D2, D3
    profiles, calibration   built-in GPU profiles and how their Figure-2 constants were solved
    profile_file, profiler  measured profiles: the JSON file and the measurement
    cluster                 `6xA40,6xV100`, `2xA100,4xV100,4xT4`, explicit roles, the O1-O3 / C1-C2 presets; network
    workload, memory        per-task costs and bytes of a setup (per-rank devices); memory bounds and per-GPU caps
    pools                   mixed-speed expert pools: expert speeds and the proportional split
    asym_ea                 Algorithm 1 (gather and squeeze) and the expert placement it implies
    simulator, schedules    discrete-event engine; zebra (Theorem 1) and EP task graphs
    lower_bound             the LP bound (every GPU busy all the time)
    strategies, planning    EP, EP(Ideal), DistEP, ZP, ZP+Asym-EA, ZP+proportional; the chosen plan and its config
    gantt, tables, report   outputs; `python -m hf_hetermoe.planner.report`
    plan_cli                main_plan / main_simulate / main_profile (wired into `hetermoe`)
"""

from .asym_ea import Placement, gather_and_squeeze, placement_from_offloads
from .cluster import CLUSTER_PRESETS, parse_cluster
from .presets import MODEL_PRESETS, resolve_model
from .profiles import BUILTIN_GPUS

__all__ = ["BUILTIN_GPUS", "CLUSTER_PRESETS", "MODEL_PRESETS", "Placement", "gather_and_squeeze", "parse_cluster",
           "placement_from_offloads", "resolve_model"]
