"""Segmented combine: out[n] = sum_k W[m(n), k] * grads[k, n], float32 accumulation.

``_segmented_combine_kernel``, grid (K,) over the same chunk table as the Gram pass: program k knows
its module from the table (no search), walks its chunk in BLOCK_N-aligned blocks (unmasked, vector
loads inside; masked head / tail), loads T_BLOCK task rows at a time and writes one BLOCK_N slice of
``out`` in the output's dtype. A misaligned base (``grads = buf[:, 1:]``) is viewed from the preceding
16-byte boundary (``_aligned_view``) so that the blocks stay provably aligned. Every task is always read
and multiplied (a zero weight times an Inf gives NaN, so non-finite gradients always reach the output);
padding rows / columns are masked loads with other=0 and weight 0, never real data times 0.

In place: ``out`` may be a row of ``grads``. A program reads all T rows of a block before it stores
that block, and programs own disjoint columns, so no element is overwritten before it is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._plan import SegmentPlan
from . import _config
from ._launch import _add, _aligned_view, _launch_context



@triton.jit
def _combine_block(
    grads_ptr, w_row, out_ptr, stride_t, col, s, e, out_off,
    T: tl.constexpr, T_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One block of columns ``col`` [BLOCK_N] (int64); MASKED restricts to s <= col < e."""
    col_ok = (col >= s) & (col < e)
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    # A loop, not unrolled: one copy of the body keeps compile time flat in T (the warps of the SM hide
    # the load latency); the blocks of rows are summed in task order.
    for t0 in tl.range(0, T, T_BLOCK):
        rows = t0 + tl.arange(0, T_BLOCK)
        row_ok = rows < T
        w = tl.load(w_row + rows, mask=row_ok, other=0.0)
        ptrs = grads_ptr + (rows.to(tl.int64) * stride_t)[:, None] + col[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        acc += tl.reduce(x.to(tl.float32) * w[:, None], 0, _add)
    y = acc.to(out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + out_off + col, y, mask=col_ok)
    else:
        tl.store(out_ptr + out_off + col, y)


@triton.jit
def _segmented_combine_kernel(
    grads_ptr,  # *T [T, N]
    module_ptr,  # *i64 [K] module of each chunk
    start_ptr,  # *i64 [K]
    length_ptr,  # *i64 [K]
    w_ptr,  # *f32 [M, T]
    out_ptr,  # *T_out [N]
    stride_t,
    col0,  # column shift of grads_ptr's frame (see _aligned_view): chunk columns are start + col0
    out_off,  # out element of grads column c is out_ptr + out_off + c (0 when out shares the frame)
    T: tl.constexpr,
    T_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    m = tl.load(module_ptr + pid)
    s = tl.load(start_ptr + pid) + col0
    e = s + tl.load(length_ptr + pid)
    w_row = w_ptr + m * T
    lanes = tl.arange(0, BLOCK_N)
    # Same aligned block walk as the Gram pass: head [b_lo, f_lo), full [f_lo, f_hi), tail [f_hi, b_hi).
    b_lo = s // BLOCK_N
    f_lo = (s + BLOCK_N - 1) // BLOCK_N
    f_hi = tl.maximum(e // BLOCK_N, f_lo)
    b_hi = (e + BLOCK_N - 1) // BLOCK_N
    for b in range(b_lo, f_lo):
        _combine_block(grads_ptr, w_row, out_ptr, stride_t, b * BLOCK_N + lanes, s, e, out_off, T, T_BLOCK, BLOCK_N,
                       True)  # fmt: skip
    for b in range(f_lo, f_hi):
        col = tl.multiple_of(b * BLOCK_N, BLOCK_N) + lanes
        _combine_block(grads_ptr, w_row, out_ptr, stride_t, col, s, e, out_off, T, T_BLOCK, BLOCK_N, False)
    for b in range(f_hi, b_hi):
        _combine_block(grads_ptr, w_row, out_ptr, stride_t, b * BLOCK_N + lanes, s, e, out_off, T, T_BLOCK, BLOCK_N,
                       True)  # fmt: skip


def segmented_combine(
    grads: torch.Tensor,
    plan: SegmentPlan,
    weights: torch.Tensor,
    out: torch.Tensor,
    *,
    chunk_size: int | None = None,
    block_n: int | None = None,
    t_block: int | None = None,
) -> None:
    """Write ``out`` [N] (fp32 / bf16 / fp16, may be a row of ``grads``) from ``grads`` [T, N] and
    float32 ``weights`` [M, T]. Keyword overrides are for tests and tuning."""
    T, N = grads.shape
    _config.check_tasks(T, grads.dtype)
    if N == 0:
        return
    cfg = _config.combine_config(T)
    table = plan.chunk_table(chunk_size or _config.chunk_size(N), grads.device)
    w = weights.to(torch.float32).contiguous()
    rows, col0 = _aligned_view(grads)
    out_v, out_shift = _aligned_view(out)
    with _launch_context(grads):
        _segmented_combine_kernel[(table.num_chunks,)](
            rows, table.module, table.start, table.length, w, out_v, grads.stride(0), col0, out_shift - col0,
            T=T, T_BLOCK=t_block or cfg.t_block, BLOCK_N=block_n or cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
