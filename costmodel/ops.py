"""The price of one operator on one GPU: the op-pricing functions every part of paraplan uses.

The layer formulas (`costmodel.layer`), the serving model (`costmodel.serving`), the sharding
ILP and the graph pricer (`planner.intra_op`, `planner.graph_cost`) all time an operator here,
so a GEMM, a fused attention or a memory-bound kernel costs the same whichever path asks:

  gemm_s             2 m k n FLOPs, reading A (m x k) and B (k x n), writing C (m x n), at the
                     device's GEMM roofline (`DeviceProfile.gemm_s`, efficiency by rows); under
                     fp8 the input's fp8 copy and transpose written (FP8_CAST_BYTES_PER_INPUT)
  attention_s        FlashAttention-2: 4 b s s_kv d_q FLOPs forward (halved under a causal mask,
                     whose upper blocks the kernel skips), Q, O read/written and K, V read once;
                     the backward runs FLASH_BACKWARD_FLOPS_RATIO x the forward's FLOPs and moves
                     twice its bytes; in 16 bits under an fp8 recipe
  memory_bound_s     a kernel that moves `bytes` at the device's memory bandwidth
"""

from __future__ import annotations

FLASH_BACKWARD_FLOPS_RATIO = 2.5  # FlashAttention-2 backward: 5 matmuls against 2 forward
CAUSAL_FRACTION = 0.5  # of the s x s_kv score blocks a causal FlashAttention computes
# FP8 training (Transformer Engine's recipes): each GEMM's 16-bit activation input is written
# again as fp8 and as its fp8 transpose (the backward's weight-gradient operand), fused into the
# kernel that produced it (no extra read): 2 bytes per input value
FP8_CAST_BYTES_PER_INPUT = 2
ATTENTION_DTYPE_UNDER_FP8 = "bf16"  # TE's fp8 recipes keep dot-product attention in 16 bits


def gemm_s(device, dtype: str, m: float, k: float, n: float, bytes_per_value: int) -> float:
    """C (m x n) = A (m x k) @ B (k x n), forward; under fp8 with its input's quantization."""
    e = bytes_per_value
    t = device.gemm_s(2.0 * m * k * n, e * (m * k + k * n + m * n), dtype, rows=int(m))
    if dtype == "fp8":
        t += device.memory_s(FP8_CAST_BYTES_PER_INPUT * m * k)
    return t


def attention_s(device, dtype: str, *, tokens: float, s_kv: float, q_width: float, kv_width: float, batch: float,
                bytes_per_value: int, causal: bool = True) -> tuple[float, float]:
    """(forward, backward) seconds of a fused attention over `tokens` = b x s queries of width
    `q_width` (heads x head_dim on this GPU) against `s_kv` keys of width `kv_width` each."""
    dtype = ATTENTION_DTYPE_UNDER_FP8 if dtype == "fp8" else dtype
    flops = 4.0 * tokens * s_kv * q_width * (CAUSAL_FRACTION if causal else 1.0)
    moved = bytes_per_value * (2 * tokens * q_width + 2 * batch * s_kv * kv_width)
    return (device.attention_s(flops, moved, dtype),
            device.attention_s(FLASH_BACKWARD_FLOPS_RATIO * flops, 2 * moved, dtype, backward=True))


def memory_bound_s(device, bytes_moved: float) -> float:
    return device.memory_s(bytes_moved)
