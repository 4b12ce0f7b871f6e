"""Segmented Gram: G[m] = V_m V_m^T for every module m of a [T, N] gradient buffer.

Two launches, deterministic, no float atomics:

1. ``_gram_partial_kernel``, grid (K,): program k reads chunk k of the chunk table (a piece of one
   module, at most ``chunk_size`` elements) and writes its T x T partial Gram to ``partial[k]``. A
   misaligned base (``grads = buf[:, 1:]``) is viewed from the preceding 16-byte boundary with the
   columns shifted by ``col0`` (``_aligned_view``), so full blocks stay provably aligned (vector loads).
2. ``_gram_reduce_kernel``, grid (M, cdiv(T*T, TT_BLOCK)): program (m, b) sums the partials of
   module m's chunks ``first[m]:first[m+1]`` in a fixed order (blocks of C_BLOCK chunks, each block
   tree-summed the same way on every run) and writes entries of G[m]; an empty module owns no chunks
   and gets exact zeros. Entry (i, j) is read from the partials' (min(i,j), max(i,j)) entry, so G is
   exactly symmetric whatever order the tile math used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._plan import SegmentPlan
from . import _config
from ._launch import _add, _aligned_view, _launch_context



@triton.jit
def _gram_update(acc, x, USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add the products of one tile x [T_PAD, BLOCK_N] (zeros outside the data) to acc."""
    if USE_DOT:
        if UPCAST:
            xf = x.to(tl.float32)
            acc = tl.dot(xf, tl.trans(xf), acc, input_precision=PRECISION)
        else:
            # bf16 / fp16 operands: products are exact in fp32, accumulated in fp32 by the MMA.
            acc = tl.dot(x, tl.trans(x), acc)
    else:
        xf = x.to(tl.float32)
        # Outer product per column, reduced over the columns only once per chunk (no shuffles here).
        acc += xf[:, None, :] * xf[None, :, :]
    return acc


@triton.jit
def _gram_partial_kernel(
    grads_ptr,  # *T   [T, N] (row stride stride_t, unit column stride)
    start_ptr,  # *i64 [K] first element of each chunk
    length_ptr,  # *i64 [K] elements in each chunk
    partial_ptr,  # *f32 [K, T, T] out
    stride_t,  # row stride of grads in elements (int64 when >= 2^31)
    col0,  # column shift: chunk columns are start + col0 in grads_ptr's frame (see _aligned_view)
    T: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.load(start_ptr + pid) + col0  # int64: element indices never pass through int32
    e = s + tl.load(length_ptr + pid)
    rows = tl.arange(0, T_PAD)
    row_ok = rows < T
    row_ptr = grads_ptr + (rows.to(tl.int64) * stride_t)[:, None]  # [T_PAD, 1]
    lanes = tl.arange(0, BLOCK_N)
    if USE_DOT:
        acc = tl.full([T_PAD, T_PAD], 0.0, tl.float32)
    else:
        acc = tl.full([T_PAD, T_PAD, BLOCK_N], 0.0, tl.float32)

    # The chunk [s, e) is walked in blocks aligned to multiples of BLOCK_N (not to s): the blocks
    # fully inside [s, e) load without a column mask, from aligned addresses, so they compile to
    # wide vector loads; only the (at most one) head block and tail block are column-masked.
    # Blocks: head [b_lo, f_lo), full [f_lo, f_hi), tail [f_hi, b_hi): a partition of [b_lo, b_hi).
    b_lo = s // BLOCK_N
    f_lo = (s + BLOCK_N - 1) // BLOCK_N
    f_hi = tl.maximum(e // BLOCK_N, f_lo)
    b_hi = (e + BLOCK_N - 1) // BLOCK_N
    for b in range(b_lo, f_lo):
        col = b * BLOCK_N + lanes
        col_ok = (col >= s) & (col < e)
        x = tl.load(row_ptr + col[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _gram_update(acc, x, USE_DOT, UPCAST, PRECISION)
    for b in range(f_lo, f_hi):
        col = tl.multiple_of(b * BLOCK_N, BLOCK_N) + lanes
        # The row mask is constant along a row, so it does not prevent vectorization.
        x = tl.load(row_ptr + col[None, :], mask=row_ok[:, None], other=0.0)
        acc = _gram_update(acc, x, USE_DOT, UPCAST, PRECISION)
    for b in range(f_hi, b_hi):
        col = b * BLOCK_N + lanes
        col_ok = (col >= s) & (col < e)
        x = tl.load(row_ptr + col[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _gram_update(acc, x, USE_DOT, UPCAST, PRECISION)

    if USE_DOT:
        part = acc
    else:
        part = tl.reduce(acc, 2, _add)
    cols = tl.arange(0, T_PAD)
    out = partial_ptr + pid * (T * T) + rows[:, None] * T + cols[None, :]
    tl.store(out, part, mask=row_ok[:, None] & (cols < T)[None, :])


@triton.jit
def _gram_reduce_kernel(
    partial_ptr,  # *f32 [K, T, T]
    first_ptr,  # *i64 [M+1] chunks of module m are first[m]:first[m+1]
    gram_ptr,  # *f32 [M, T, T] out (every entry written)
    T: tl.constexpr,
    TT_BLOCK: tl.constexpr,
    C_BLOCK: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * TT_BLOCK + tl.arange(0, TT_BLOCK)  # flat (i, j) entries of this program
    q_ok = q < T * T
    i = q // T
    j = q % T
    src = tl.minimum(i, j) * T + tl.maximum(i, j)  # mirror: G[i, j] and G[j, i] sum the same values
    c0 = tl.load(first_ptr + m)
    c1 = tl.load(first_ptr + m + 1)
    lanes = tl.arange(0, C_BLOCK)
    acc = tl.full([TT_BLOCK], 0.0, tl.float32)
    # Fixed order: blocks of C_BLOCK consecutive chunks, each summed by the same reduction tree.
    for k0 in range(c0, c1, C_BLOCK):
        k = k0 + lanes  # int64
        v = tl.load(
            partial_ptr + (k * (T * T))[:, None] + src[None, :],
            mask=(k < c1)[:, None] & q_ok[None, :],
            other=0.0,
        )
        acc += tl.reduce(v, 0, _add)
    tl.store(gram_ptr + m * (T * T) + q, acc, mask=q_ok)


def segmented_gram(
    grads: torch.Tensor,
    plan: SegmentPlan,
    *,
    chunk_size: int | None = None,
    force_dot: bool | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """float32 [M, T, T] per-module Gram matrices of ``grads`` [T, N] (fp32 / bf16 / fp16).

    ``chunk_size``, ``force_dot`` and ``block_n`` override the heuristics of ``_config`` (tests and
    tuning); results agree to rounding for any choice and are bitwise reproducible for a fixed one.
    """
    T, N = grads.shape
    M = plan.num_modules
    device = grads.device
    if M == 0:
        return torch.empty(0, T, T, dtype=torch.float32, device=device)
    _config.check_tasks(T, grads.dtype)
    cfg = _config.gram_config(T, grads.dtype, force_dot, smem=_config.smem_limit(device))
    bn = int(block_n) if block_n is not None else cfg.block_n
    table = plan.chunk_table(chunk_size or _config.chunk_size(N), device)
    K = table.num_chunks
    if K == 0:  # every module is empty
        return torch.zeros(M, T, T, dtype=torch.float32, device=device)
    # torch.empty, not zeros: the kernels write every entry (tests rely on this to catch gaps).
    partial = torch.empty(K, T, T, dtype=torch.float32, device=device)
    gram = torch.empty(M, T, T, dtype=torch.float32, device=device)
    stride_t = grads.stride(0)
    rows, col0 = _aligned_view(grads)
    with _launch_context(grads):
        _gram_partial_kernel[(K,)](
            rows, table.start, table.length, partial, stride_t, col0,
            T=T, T_PAD=cfg.t_pad, BLOCK_N=bn, USE_DOT=cfg.use_dot, UPCAST=cfg.upcast,
            PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        grid = (M, triton.cdiv(T * T, cfg.tt_block))
        _gram_reduce_kernel[grid](
            partial, table.first, gram, T=T, TT_BLOCK=cfg.tt_block, C_BLOCK=cfg.c_block, num_warps=4
        )
    return gram
