"""Device profiles: how long a GPU takes for one attention half, one expert FFN and the LM head.

A *device profile* answers three questions for a model shape (`ModelShape`, which carries the dtype), a token
count and a sequence length: forward and backward seconds of (1) one decoder layer's attention half plus router, (2) one routed
expert on a number of routed token copies, (3) the final norm, LM head and loss. It also carries the memory
size and the device generation (newer generations become attention ranks). Link bandwidth belongs to the
cluster (`cluster.py`), since it depends on the fabric, not on the GPU.

Two kinds exist: `DeviceProfile` (analytic, built in for V100, T4, A40, L40S, A100, H100, H200) and
`MeasuredProfile` (from `hetermoe profile`, see `profile_file.py`). Both satisfy `DeviceCosts`.

Sources and assumptions of the built-in table
---------------------------------------------
* Peak dense fp16/bf16 tensor-core TFLOP/s, memory size and memory bandwidth are the vendors' datasheet
  figures (T4 65, V100-SXM2 125, A40 149.7, A100-SXM 312, L40S 362,
  H100-SXM 989, H200 989 TFLOP/s). The fp32 column is the datasheet's TF32 tensor rate where the GPU has one,
  else the CUDA-core FP32 rate (V100 15.7, T4 8.1).
* `gemm_eff` is the fraction of that peak reached by large fp16 GEMMs (expert FFNs, projections, LM head).
  Assumed from commonly reported cuBLAS measurements, then pinned by the paper's Figure 2: V100 reaches 0.8x
  of A40 on experts and L40S 7.0x T4, which fixes the V100:A40 and T4:L40S efficiency ratios (the peak ratios
  alone would give 0.84x and 5.6x). Absolute levels: A40 0.70, L40S 0.60 (both are power-capped cards), A100
  0.80, H100 0.72; H200 0.80 from the ~790 TFLOP/s measured on an 8192^3 bf16 matmul.
* Core attention (QK^T, softmax, PV) is modelled as its causal FLOPs (quadratic in sequence length) at an
  efficiency that depends on the kernel class and grows with sequence length:
  ``eff(S) = attn_eff_max * S / (S + attn_s_half)``. Ampere and newer run FlashAttention-2 (the FA2 paper
  reports ~50-70% of peak for causal forward+backward at long lengths, ~0.3 at 512; we take s_half = 512 and
  attn_eff_max = 0.85 * gemm_eff, 0.5 * gemm_eff on Hopper where FA2 is not the native kernel). Volta and
  Turing have no FA2 and fall back to xformers / FlashAttention-1-class kernels: their two parameters are
  solved from Figure 2 (A40 3.7x V100 at 64K; L40S 9.9x T4 at 4K, 13.6x at 64K) with V100 and T4 sharing
  s_half. `figure2_ratios()` recomputes the ratios; a test keeps them within 3% of the paper's.
* Linear terms: projections and router run at `gemm_eff`; elementwise work (norms, rotary, residual, softmax
  of the router, SwiGLU, gathers) is charged as bytes moved at 80% of memory bandwidth (the pass counts are
  rough per-op counts, stated at the constants below); small GEMMs are bounded below by reading their weights
  (roofline); each module pays a fixed launch overhead.
* Backward costs 2x forward (two GEMMs per forward GEMM); activation recomputation is added by the
  simulator, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .model_shape import ModelShape

MEM_EFF = 0.8  # achievable fraction of datasheet memory bandwidth for streaming elementwise kernels
BACKWARD_FACTOR = 2.0  # backward = 2x forward: a forward GEMM becomes two (input grad, weight grad)
# Elementwise bytes per token, in units of h * dtype bytes, for one attention half: two RMSNorms (fp32
# internally: read, write, re-read), rotary on q and k, residual add, router softmax/top-k, transposes.
ATTN_ELEMENTWISE_PASSES = 16
# For one expert, per routed token copy: SwiGLU reads gate and up and writes the product (3 f), plus the
# gather and the weighted scatter-add of the token row (4 h).
EXPERT_ELEMENTWISE_F, EXPERT_ELEMENTWISE_H = 3, 4
# LM head loss: fp32 logits written, read by the log-softmax, read again for the gradient (bytes per logit).
HEAD_LOGIT_BYTES = 12
LAUNCH_S_ATTENTION = 40e-6  # ~10 kernels per attention half at ~4 us each
LAUNCH_S_EXPERT = 15e-6  # ~4 kernels per expert
LAUNCH_S_HEAD = 20e-6

FwdBwd = tuple[float, float]


class DeviceCosts(Protocol):
    """What the planner needs from a device: forward and backward seconds of the three module kinds."""

    name: str
    generation: tuple[int, int]  # CUDA compute capability; larger is newer
    memory_bytes: int

    def attention_s(self, shape: ModelShape, *, num_seqs: float, seq_len: int) -> FwdBwd: ...

    def expert_s(self, shape: ModelShape, *, num_tokens: float) -> FwdBwd: ...

    def head_s(self, shape: ModelShape, *, num_tokens: float) -> FwdBwd: ...


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Analytic profile of one GPU model: datasheet peaks times documented efficiency factors."""

    name: str
    arch: str
    generation: tuple[int, int]
    fp16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # TF32 tensor peak where available, else CUDA-core FP32
    has_bf16: bool
    memory_gb: float
    mem_bw_gbs: float
    gemm_eff: float
    flash_attn2: bool
    attn_eff_max: float
    attn_s_half: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    # ---- rates ------------------------------------------------------------------------------------------
    def _peak_flops(self, dtype: str) -> float:
        if dtype == "bf16" and not self.has_bf16:
            raise ValueError(
                f"planner: {self.name} ({self.arch}) has no bf16 tensor cores. Use `dtype: fp16` for this cluster."
            )
        return (self.fp32_tflops if dtype == "fp32" else self.fp16_tflops) * 1e12

    def _mem_s(self, num_bytes: float) -> float:
        return num_bytes / (self.mem_bw_gbs * 1e9 * MEM_EFF)

    def _gemm_s(self, flops: float, weight_bytes: float, dtype: str) -> float:
        # Roofline: a GEMM is never faster than reading its weights once.
        return max(flops / (self._peak_flops(dtype) * self.gemm_eff), self._mem_s(weight_bytes))

    def core_attention_eff(self, seq_len: int) -> float:
        return self.attn_eff_max * seq_len / (seq_len + self.attn_s_half)

    # ---- modules ----------------------------------------------------------------------------------------
    def attention_s(self, shape: ModelShape, *, num_seqs: float, seq_len: int) -> FwdBwd:
        b, h = shape.bytes_per_element, shape.hidden_size
        tokens = num_seqs * seq_len
        proj_out = 2 * shape.num_heads * shape.head_dim + 2 * shape.num_kv_heads * shape.head_dim + shape.num_experts
        proj_flops = 2.0 * tokens * h * proj_out
        # Causal QK^T and PV: 2 matmuls x 2 flops x S^2/2 (causal) x heads x head_dim, per sequence.
        core_flops = 2.0 * num_seqs * seq_len * seq_len * shape.num_heads * shape.head_dim
        fwd = (
            self._gemm_s(proj_flops, h * proj_out * b, shape.dtype)
            + core_flops / (self._peak_flops(shape.dtype) * self.core_attention_eff(seq_len))
            + self._mem_s(ATTN_ELEMENTWISE_PASSES * tokens * h * b)
            + LAUNCH_S_ATTENTION
        )
        return fwd, BACKWARD_FACTOR * fwd

    def expert_s(self, shape: ModelShape, *, num_tokens: float) -> FwdBwd:
        b, h, f = shape.bytes_per_element, shape.hidden_size, shape.intermediate_size
        fwd = (
            self._gemm_s(2.0 * num_tokens * 3 * h * f, 3 * h * f * b, shape.dtype)
            + self._mem_s(num_tokens * (EXPERT_ELEMENTWISE_F * f + EXPERT_ELEMENTWISE_H * h) * b)
            + LAUNCH_S_EXPERT
        )
        return fwd, BACKWARD_FACTOR * fwd

    def head_s(self, shape: ModelShape, *, num_tokens: float) -> FwdBwd:
        b, h, v = shape.bytes_per_element, shape.hidden_size, shape.vocab_size
        fwd = (
            self._gemm_s(2.0 * num_tokens * h * v, h * v * b, shape.dtype)
            + self._mem_s(num_tokens * v * HEAD_LOGIT_BYTES + 4 * num_tokens * h * b)
            + LAUNCH_S_HEAD
        )
        return fwd, BACKWARD_FACTOR * fwd


def _fa2(gemm_eff: float, hopper: bool = False) -> dict[str, float | bool]:
    return {"flash_attn2": True, "attn_eff_max": (0.5 if hopper else 0.85) * gemm_eff, "attn_s_half": 512.0}


# Volta/Turing attention-kernel parameters, solved from Figure 2 (see the module docstring).
# `calibration.solve_figure2()` returns them (and the two gemm_eff values); these are its output, rounded.
_LEGACY_S_HALF = 2700.0
_V100_ATTN_EFF_MAX = 0.178
_T4_ATTN_EFF_MAX = 0.194

BUILTIN_GPUS: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(name="T4", arch="Turing", generation=(7, 5), fp16_tflops=65.0, fp32_tflops=8.1, has_bf16=False,
                      memory_gb=16, mem_bw_gbs=320, gemm_eff=0.447, flash_attn2=False,
                      attn_eff_max=_T4_ATTN_EFF_MAX, attn_s_half=_LEGACY_S_HALF),
        DeviceProfile(name="V100", arch="Volta", generation=(7, 0), fp16_tflops=125.0, fp32_tflops=15.7, has_bf16=False,
                      memory_gb=32, mem_bw_gbs=900, gemm_eff=0.655, flash_attn2=False,
                      attn_eff_max=_V100_ATTN_EFF_MAX, attn_s_half=_LEGACY_S_HALF),
        DeviceProfile(name="A40", arch="Ampere", generation=(8, 6), fp16_tflops=149.7, fp32_tflops=74.8, has_bf16=True,
                      memory_gb=48, mem_bw_gbs=696, gemm_eff=0.70, **_fa2(0.70)),
        DeviceProfile(name="A100", arch="Ampere", generation=(8, 0), fp16_tflops=312.0, fp32_tflops=156.0, has_bf16=True,
                      memory_gb=80, mem_bw_gbs=2039, gemm_eff=0.80, **_fa2(0.80)),
        DeviceProfile(name="L40S", arch="Ada", generation=(8, 9), fp16_tflops=362.0, fp32_tflops=183.0, has_bf16=True,
                      memory_gb=48, mem_bw_gbs=864, gemm_eff=0.60, **_fa2(0.60)),
        DeviceProfile(name="H100", arch="Hopper", generation=(9, 0), fp16_tflops=989.0, fp32_tflops=495.0, has_bf16=True,
                      memory_gb=80, mem_bw_gbs=3350, gemm_eff=0.72, **_fa2(0.72, hopper=True)),
        DeviceProfile(name="H200", arch="Hopper", generation=(9, 0), fp16_tflops=989.0, fp32_tflops=495.0, has_bf16=True,
                      memory_gb=141, mem_bw_gbs=4800, gemm_eff=0.80, **_fa2(0.80, hopper=True)),
    )
}


def builtin_profile(name: str) -> DeviceProfile:
    key = {k.lower(): k for k in BUILTIN_GPUS}.get(name.lower())
    if key is None:
        raise ValueError(f"planner: unknown GPU {name!r}. Built-in GPUs: {', '.join(BUILTIN_GPUS)}.")
    return BUILTIN_GPUS[key]


def canonical_device_name(description: str) -> str:
    """'Tesla V100-SXM2-32GB' -> 'V100' (the longest built-in name it contains), else a cleaned-up name."""
    hits = [name for name in BUILTIN_GPUS if name.lower() in description.lower()]
    if hits:
        return max(hits, key=len)
    return "".join(ch if ch.isalnum() else "-" for ch in description).strip("-") or "device"


# ---- calibration check against the paper's Figure 2 --------------------------------------------------------
MIXTRAL_8X7B = ModelShape(
    name="Mixtral-8x7B", num_layers=32, hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2,
    num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32000,
)

# (numerator GPU, denominator GPU, module, sequence length or None for "every length"): paper's speed ratio.
PAPER_FIGURE2: dict[tuple[str, str, str, int | None], float] = {
    ("V100", "A40", "expert", None): 0.8,
    ("A40", "V100", "attention", 65536): 3.7,
    ("L40S", "T4", "expert", None): 7.0,
    ("L40S", "T4", "attention", 4096): 9.9,
    ("L40S", "T4", "attention", 65536): 13.6,
}


def module_speed_ratio(fast: DeviceCosts, slow: DeviceCosts, module: str, seq_len: int,
                       shape: ModelShape = MIXTRAL_8X7B) -> float:
    """Speed of `fast` over `slow` (time(slow)/time(fast)) on one module, forward+backward, one sequence."""
    if module == "attention":
        t_fast, t_slow = (sum(d.attention_s(shape, num_seqs=1, seq_len=seq_len)) for d in (fast, slow))
    else:
        tokens = seq_len * shape.top_k / shape.num_experts  # one expert's share of one sequence
        t_fast, t_slow = (sum(d.expert_s(shape, num_tokens=tokens)) for d in (fast, slow))
    return t_slow / t_fast


def figure2_ratios(lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)) -> list[dict[str, object]]:
    """Each Figure-2 claim with the built-in profiles' ratio (for expert claims: at every length given)."""
    rows: list[dict[str, object]] = []
    for (num, den, module, seq), paper in PAPER_FIGURE2.items():
        for s in (lengths if seq is None else (seq,)):
            ratio = module_speed_ratio(BUILTIN_GPUS[num], BUILTIN_GPUS[den], module, s)
            rows.append({"fast": num, "slow": den, "module": module, "seq_len": s, "model": ratio, "paper": paper})
    return rows
