"""Launch parameters of the Triton kernels: one place for every block size and heuristic.

Nothing here is needed for correctness: every kernel is correct for any power-of-two block size and
any chunk size >= 1 (the tests force small ones). The GPU values are first guesses for H100/H200
(memory-bound streaming over [T, N]); ``bench/`` should tune them (see ``GPU_CANDIDATES``).

Under ``TRITON_INTERPRET=1`` (CPU, numpy) every program is executed in Python, so the blocks are
tiny to keep tests fast, and ``tl.dot`` runs on float32 (the interpreter has no bf16 matmul).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at call time, not import time)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)  # the very setting triton.jit decorates by
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Precision of tl.dot on float32 storage (T >= GRAM_DOT_MIN_T). "tf32x3" splits each float32 into
# a tf32 high part and a tf32 low part and sums three tensor-core products (error ~1e-6 relative,
# about float32 rounding); "ieee" is exact float32 FMA math, but runs on CUDA cores. Plain "tf32"
# (10-bit mantissa) is NOT accurate enough for PCGrad's sign tests and is never used.
FP32_DOT_PRECISION = os.environ.get("MGS_TRITON_FP32_DOT", "tf32x3")

# The Gram pass uses tl.dot tiles from this many tasks on (T is padded to >= 16 rows for tl.dot);
# below it, a register outer-product accumulator [T, T, BLOCK_N] of FMAs wins (no 16-row padding).
GRAM_DOT_MIN_T = int(os.environ.get("MGS_TRITON_GRAM_DOT_MIN_T", "9"))


@dataclass(frozen=True)
class GramConfig:
    t_pad: int  # rows of a tile (tasks padded to a power of two, >= 16 on the tl.dot path)
    block_n: int  # columns (elements) per tile
    use_dot: bool  # tl.dot tiles vs. outer-product FMA accumulator
    upcast: bool  # convert tiles to float32 before tl.dot (float32 storage, or the interpreter)
    precision: str  # tl.dot input_precision for float32 operands
    num_warps: int
    num_stages: int
    tt_block: int  # Gram entries per program of the reduction pass
    c_block: int  # chunk partials summed per step of the reduction pass


@dataclass(frozen=True)
class CombineConfig:
    t_block: int  # task rows loaded per step (a power of two)
    block_n: int
    num_warps: int


def chunk_size(numel: int) -> int:
    """Elements per chunk of the chunk table (shared by the Gram and combine passes).

    On a GPU: a power of two in [2^14, 2^20] giving about 8192 chunks over the buffer, so that the
    grid has many waves of programs and the partials [K, T, T] stay small next to the data, while the
    largest module has at most a few thousand chunks to reduce (the reduction pass is per module).
    """
    if interpreting():
        return int(os.environ.get("MGS_TRITON_CHUNK", "256"))
    return min(1 << 20, max(1 << 14, next_pow2(-(-max(numel, 1) // 8192))))


def gram_config(num_tasks: int, dtype: torch.dtype, force_dot: bool | None = None) -> GramConfig:
    interp = interpreting()
    use_dot = num_tasks >= GRAM_DOT_MIN_T if force_dot is None else bool(force_dot)
    tt = num_tasks * num_tasks
    tt_block = min(next_pow2(tt), 16 if interp else 256)
    c_block = 4 if interp else max(1, 4096 // tt_block)
    if use_dot:
        t_pad = max(16, next_pow2(num_tasks))
        # bf16/fp16 products are exact in float32, so tensor cores with float32 accumulation are
        # exact-product; float32 storage needs the tf32x3 split (or ieee). The interpreter's dot
        # is numpy: feed it float32 and ask for ieee.
        upcast = interp or dtype == torch.float32
        precision = "ieee" if interp else FP32_DOT_PRECISION
        block_n = 32 if interp else 128
        num_warps = 8 if t_pad >= 64 else 4
        return GramConfig(t_pad, block_n, True, upcast, precision, num_warps, 3, tt_block, c_block)
    t_pad = next_pow2(num_tasks)
    # Keep the [T_PAD, T_PAD, BLOCK_N] accumulator at <= 8192 floats (64 registers a thread at 4 warps).
    block_n = 32 if interp else max(128, min(2048, 8192 // (t_pad * t_pad)))
    return GramConfig(t_pad, block_n, False, True, "ieee", 4, 3, tt_block, c_block)


def combine_config(num_tasks: int) -> CombineConfig:
    if interpreting():
        return CombineConfig(t_block=min(next_pow2(num_tasks), 4), block_n=32, num_warps=1)
    return CombineConfig(t_block=min(next_pow2(num_tasks), 8), block_n=1024, num_warps=4)


@dataclass(frozen=True)
class StepConfig:
    block_n: int  # elements per block of the fused optimizer step (a power of two)
    num_warps: int


def step_config(num_tasks: int) -> StepConfig:
    """Fused optimizer step: one program per slot chunk (<= 2^14 elements), walked in BLOCK_N blocks.

    Four elements a thread (BLOCK_N = 128 * num_warps): one 16-byte vector per fp32 state stream
    and one 8-byte vector per bf16 task row, so every stream shares one register layout (no
    shared-memory layout conversions) and ptxas stays under ~110 registers up to 16 tasks (sm_90,
    offline compile); past 16 tasks the unrolled row loads need halved blocks.
    """
    if interpreting():
        return StepConfig(block_n=64, num_warps=1)
    return StepConfig(block_n=512 if num_tasks <= 16 else 256, num_warps=4)


def solve_num_warps(num_tasks: int) -> int:
    t_pad = next_pow2(num_tasks)
    return 1 if t_pad <= 8 else (2 if t_pad <= 16 else 4)


# Candidate GPU configurations for a tuning sweep (bench/), never needed for correctness.
GPU_CANDIDATES = {
    "gram_fma_block_n": [128, 256, 512, 1024, 2048],
    "gram_dot_block_n": [64, 128, 256],
    "gram_num_warps": [4, 8],
    "gram_num_stages": [2, 3, 4],
    "gram_dot_min_t": [3, 5, 9, 17],
    "combine_block_n": [512, 1024, 2048, 4096],
    "combine_t_block": [2, 4, 8],
    "chunk_size": [1 << 14, 1 << 16, 1 << 18, 1 << 20],
    "step_block_n": [256, 512, 1024, 2048],  # with num_warps: 2-8 elements a thread
    "step_num_warps": [2, 4, 8],
}
