"""Launch parameters of the Triton kernels: one place for every block size and heuristic.

Nothing here is needed for correctness: every kernel is correct for any power-of-two block size and
any chunk size >= 1 (the tests force small ones). The GPU values are first guesses for H100/H200
(memory-bound streaming over [T, N]), sized by offline compiles for sm_90 / sm_80
(tests/test_offline_compile.py); ``bash bench/gpu_check.sh`` measures them on a GPU.

Under ``TRITON_INTERPRET=1`` (CPU, numpy) every program is executed in Python, so the blocks are
tiny to keep tests fast, and ``tl.dot`` runs on float32 (the interpreter has no bf16 matmul).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import _settings


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at call time, not import time)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)  # the very setting triton.jit decorates by
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def fp32_dot_precision() -> str:
    """Precision of tl.dot on float32 storage (T >= gram_dot_min_t()), $MGS_TRITON_FP32_DOT: "tf32x3"
    splits each float32 into a tf32 high part and a tf32 low part and sums three tensor-core products
    (error ~1e-6 relative, about float32 rounding); "ieee" is exact float32 FMA math on CUDA cores. Plain
    "tf32" (10-bit mantissa) is NOT accurate enough for PCGrad's sign tests and is never used."""
    return _settings.get("MGS_TRITON_FP32_DOT")


def gram_dot_min_t() -> int:
    """The Gram pass uses tl.dot tiles from this many tasks on ($MGS_TRITON_GRAM_DOT_MIN_T; T is padded to
    >= 16 rows for tl.dot); below it, a register outer-product accumulator [T, T, BLOCK_N] of FMAs wins."""
    return _settings.get("MGS_TRITON_GRAM_DOT_MIN_T")


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
        return _settings.get("MGS_TRITON_CHUNK")
    return min(1 << 20, max(1 << 14, next_pow2(-(-max(numel, 1) // 8192))))


# Opt-in shared memory per block (bytes) by compute capability, for devices whose properties do not say.
SMEM_LIMITS = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376, (9, 0): 232_448,
               (10, 0): 232_448, (12, 0): 101_376}  # fmt: skip
# A launch asks for at most this fraction of the limit (Triton's own scratch and layout conversions may add
# a little; the offline checks compare the compiled kernels' real usage with the limits).
SMEM_FRACTION = 0.85
# The limit assumed for non-CUDA tensors (the offline compile checks set it to the target's).
OFFLINE_SMEM_LIMIT = SMEM_LIMITS[(9, 0)]


def smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block (bytes) of ``device`` (the offline target's for non-CUDA tensors)."""
    device = torch.device(device)
    if device.type != "cuda":
        return OFFLINE_SMEM_LIMIT
    props = torch.cuda.get_device_properties(device)
    value = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    return value or SMEM_LIMITS.get((props.major, props.minor), 101_376)


# tl.dot path, per T_PAD: (BLOCK_N, num_stages, num_warps), chosen from offline sm_90 / sm_80 compiles so that
# no configuration spills registers on either (tests/test_offline_compile.py keeps it so). float32 storage
# (tf32x3: hi / lo operand copies in registers) needs narrower tiles than bf16 / fp16 storage. On a device
# with less shared memory the launcher drops stages, then halves BLOCK_N, until gram_dot_smem fits.
_DOT_TILES = {
    True: {16: (128, 3, 4), 32: (64, 4, 4), 64: (32, 4, 8)},  # float32 storage (upcast)
    False: {16: (128, 4, 4), 32: (128, 4, 4), 64: (128, 3, 8), 128: (64, 4, 8)},  # bf16 / fp16 storage
}


def gram_dot_smem(t_pad: int, block_n: int, num_stages: int, elem_bytes: int) -> int:
    """Upper bound of the shared memory (bytes) of the tl.dot Gram kernel: num_stages pipelined
    [T_PAD, BLOCK_N] tiles in the storage dtype plus two MMA operand copies, or the [T_PAD, T_PAD]
    float32 epilogue buffer if larger (shared memory is reused between the two). Checked against the
    compiled kernels by tests/test_offline_compile.py."""
    tile = t_pad * block_n
    return max(tile * (num_stages + 2) * elem_bytes, t_pad * t_pad * 4)


def max_tasks(dtype: torch.dtype) -> int:
    """The largest task count the Triton kernels support for ``dtype`` storage on every target (sm_80 and
    newer): every kernel fits the shared memory of an sm_80 / sm_90 device with margin and the streaming
    kernels compile without register spills (tests/test_offline_compile.py). Dispatch routes larger T to
    another backend; the launchers raise above it."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"no Triton storage support for {dtype}")
    return MAX_TASKS[4 if dtype == torch.float32 else 2]


# The supported maximum per storage element size (see max_tasks): float32 T_PAD = 128 spills registers in
# the tf32x3 Gram on sm_80 at any tile width and warp count tried (offline compile), bf16 / fp16 do not.
MAX_TASKS = {4: 64, 2: 128}


def preferred_tasks(dtype: torch.dtype) -> tuple:
    """Inclusive range of task counts for which dispatch should prefer the Triton Gram (and so
    modular_pcgrad) over the native CUDA one when both are available: from the first tensor-core (tl.dot)
    task count to ``max_tasks(dtype)``. Below it the native CUDA register kernel streams at bandwidth with
    no JIT warm-up (see ``mgs_kernels._native.CUDA_GRAM_PREFERRED_TASKS`` for the estimate)."""
    return (gram_dot_min_t(), max_tasks(dtype))


def check_tasks(num_tasks: int, dtype: torch.dtype | None) -> None:
    """Raise BackendUnavailableError (before anything is launched) above ``max_tasks(dtype)`` (dtype None:
    the solve, which sees float32 Grams of any storage, up to the largest maximum)."""
    limit = max_tasks(dtype) if dtype is not None else max(MAX_TASKS.values())
    if num_tasks > limit:
        from .._errors import BackendUnavailableError

        storage = f" for {dtype} storage" if dtype is not None else ""
        raise BackendUnavailableError(
            f"the Triton kernels support at most {limit} tasks{storage}, got {num_tasks}; use another backend "
            "(backend='torch' has no task limit)"
        )


def gram_config(
    num_tasks: int, dtype: torch.dtype, force_dot: bool | None = None, smem: int | None = None
) -> GramConfig:
    """Launch parameters of the Gram pass for T tasks of ``dtype`` storage on a device with ``smem`` bytes
    of opt-in shared memory per block (default: the offline target's)."""
    interp = interpreting()
    use_dot = num_tasks >= gram_dot_min_t() if force_dot is None else bool(force_dot)
    tt = num_tasks * num_tasks
    tt_block = min(next_pow2(tt), 16 if interp else 256)
    c_block = 4 if interp else max(1, 4096 // tt_block)
    budget = int(SMEM_FRACTION * (smem if smem is not None else OFFLINE_SMEM_LIMIT))
    if use_dot:
        t_pad = max(16, next_pow2(num_tasks))
        # bf16/fp16 products are exact in float32, so tensor cores with float32 accumulation are
        # exact-product; float32 storage needs the tf32x3 split (or ieee). The interpreter's dot
        # is numpy: feed it float32 and ask for ieee.
        upcast = interp or dtype == torch.float32
        precision = "ieee" if interp else fp32_dot_precision()
        if interp:
            return GramConfig(t_pad, 32, True, upcast, precision, 4, 1, tt_block, c_block)
        elem = 4 if dtype == torch.float32 else 2
        table = _DOT_TILES[bool(upcast)]
        block_n, stages, num_warps = table[min(t_pad, max(table))]
        # Fit the device: fewer stages first (down to 2), then narrower tiles (down to 16 columns).
        while gram_dot_smem(t_pad, block_n, stages, elem) > budget and (stages > 2 or block_n > 16):
            if stages > 2:
                stages -= 1
            else:
                block_n //= 2
                stages = 3
        return GramConfig(t_pad, block_n, True, upcast, precision, num_warps, stages, tt_block, c_block)
    t_pad = next_pow2(num_tasks)
    # Keep the [T_PAD, T_PAD, BLOCK_N] accumulator at <= 8192 floats (64 registers a thread at 4 warps).
    block_n = 32 if interp else max(128, min(2048, 8192 // (t_pad * t_pad)))
    return GramConfig(t_pad, block_n, False, True, "ieee", 4, 3, tt_block, c_block)


def combine_config(num_tasks: int) -> CombineConfig:
    """Combine: [T_BLOCK, BLOCK_N] tiles, 8 elements a thread per row (one 16-byte vector of bf16 / fp16,
    two of fp32). T_BLOCK = 8 spilled registers on sm_80 (offline compile, fp16): 4 rows per step."""
    if interpreting():
        return CombineConfig(t_block=min(next_pow2(num_tasks), 4), block_n=32, num_warps=1)
    return CombineConfig(t_block=min(next_pow2(num_tasks), 4), block_n=1024, num_warps=4)


@dataclass(frozen=True)
class StepConfig:
    block_n: int  # elements per block of the fused optimizer step (a power of two)
    num_warps: int


def step_config(num_tasks: int) -> StepConfig:
    """Fused optimizer step: one program per slot chunk (<= 2^14 elements), walked in BLOCK_N blocks.

    Four elements a thread (BLOCK_N = 128 * num_warps) for every T: one 16-byte vector per fp32 state
    stream and one 8-byte vector per bf16 task row, so every stream shares one register layout (no
    shared-memory layout conversions). The task rows are summed in a loop (not unrolled), so registers
    and compile time do not grow with T (offline compile: tests/test_offline_compile.py).
    """
    if interpreting():
        return StepConfig(block_n=64, num_warps=1)
    return StepConfig(block_n=512, num_warps=4)


def solve_num_warps(num_tasks: int) -> int:
    """Warps of the solve program: C and a gathered G column, [T_PAD, T_PAD] float32 each, stay in
    registers (at most 16 elements of each a thread)."""
    t_pad = next_pow2(num_tasks)
    return max(1, min(16, t_pad * t_pad // (32 * 16)))
