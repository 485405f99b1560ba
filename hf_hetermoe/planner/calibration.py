"""How the five Figure-2-derived constants of the built-in table were obtained (rerun to reproduce them).

The datasheet peaks and the Ampere-or-newer efficiency factors are assumptions stated in `profiles.py`. Five
numbers are then *solved*, not guessed, from the paper's Figure 2 (Mixtral-8x7B shapes, forward+backward of
one module on one sequence):

* V100 `gemm_eff` so that V100 runs experts at 0.8x A40;
* T4 `gemm_eff` so that L40S runs experts 7.0x faster than T4;
* V100 and T4 `attn_eff_max` and their shared `attn_s_half` so that A40 runs attention 3.7x faster than
  V100 at 64K and L40S 9.9x / 13.6x faster than T4 at 4K / 64K (three equations, three unknowns).

    python -m hf_hetermoe.planner.calibration
"""

from __future__ import annotations

import dataclasses

from scipy.optimize import brentq, least_squares

from .profiles import BUILTIN_GPUS, MIXTRAL_8X7B, DeviceProfile, module_speed_ratio

_EXPERT_PROBE_LEN = 16384  # the expert ratio is flat in length; probe in the middle of Figure 2's range


def solve_figure2() -> dict[str, float]:
    gpus = BUILTIN_GPUS

    def expert_eff(slow: str, fast: str, fast_over_slow: float) -> float:
        def gap(eff: float) -> float:
            probe = dataclasses.replace(gpus[slow], gemm_eff=eff)
            return module_speed_ratio(gpus[fast], probe, "expert", _EXPERT_PROBE_LEN, MIXTRAL_8X7B) - fast_over_slow

        return float(brentq(gap, 0.05, 1.5))

    v100_gemm = expert_eff("V100", "A40", 1 / 0.8)
    t4_gemm = expert_eff("T4", "L40S", 7.0)

    def legacy(x: tuple[float, float, float]) -> tuple[DeviceProfile, DeviceProfile]:
        v_eff, t_eff, s_half = x
        v100 = dataclasses.replace(gpus["V100"], gemm_eff=v100_gemm, attn_eff_max=v_eff, attn_s_half=s_half)
        t4 = dataclasses.replace(gpus["T4"], gemm_eff=t4_gemm, attn_eff_max=t_eff, attn_s_half=s_half)
        return v100, t4

    def residuals(x: tuple[float, float, float]) -> list[float]:
        v100, t4 = legacy(x)
        return [
            module_speed_ratio(gpus["A40"], v100, "attention", 65536) / 3.7 - 1,
            module_speed_ratio(gpus["L40S"], t4, "attention", 4096) / 9.9 - 1,
            module_speed_ratio(gpus["L40S"], t4, "attention", 65536) / 13.6 - 1,
        ]

    fit = least_squares(residuals, [0.2, 0.3, 512.0], bounds=([0.01, 0.01, 1.0], [1.0, 1.0, 1e6]))
    v_eff, t_eff, s_half = (float(v) for v in fit.x)
    return {
        "V100.gemm_eff": v100_gemm, "T4.gemm_eff": t4_gemm,
        "V100.attn_eff_max": v_eff, "T4.attn_eff_max": t_eff, "legacy.attn_s_half": s_half,
    }


def table_values() -> dict[str, float]:
    """The same five numbers as they stand in the built-in table."""
    g = BUILTIN_GPUS
    return {
        "V100.gemm_eff": g["V100"].gemm_eff, "T4.gemm_eff": g["T4"].gemm_eff,
        "V100.attn_eff_max": g["V100"].attn_eff_max, "T4.attn_eff_max": g["T4"].attn_eff_max,
        "legacy.attn_s_half": g["V100"].attn_s_half,
    }


if __name__ == "__main__":
    solved, table = solve_figure2(), table_values()
    for key in solved:
        print(f"{key:20s} solved {solved[key]:10.4f}   table {table[key]:10.4f}")
