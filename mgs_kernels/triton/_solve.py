"""PCGrad solve in Gram space (DESIGN.md section 1), every module in one launch.

``_pcgrad_solve_kernel``, grid (M,): program m holds the coefficient matrix C [T, T] of module m in
registers (row i is c_i, g_i' = sum_k C[i, k] g_k) and runs the T-1 visit steps in sequence, each
step vectorized over the T tasks i:

    j_i  = order[m, i, s]                 # the task i visits at step s
    d_i  = C[i, :] . G[:, j_i]            # g_i' . g_j (g_j ORIGINAL)
    if d_i < 0 and G[j_i, j_i] > eps:     # conflict
        C[i, j_i] -= d_i / G[j_i, j_i]    # IEEE division (tl.div_rn)

and writes W[m] = sum_i C[i, :]. An order entry outside [0, T) or equal to i itself is skipped (no
step, nothing read): the documented behaviour of every backend for a malformed table. Same arithmetic
as the torch backend (NaN / Inf in G flow into W exactly as there), no data-dependent host work: the
order table is an input, so a step using this kernel can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._launch import _add, _launch_context



@triton.jit
def _pcgrad_solve_kernel(
    gram_ptr,  # *f32 [M, T, T] contiguous
    order_ptr,  # *i64 [M, T, T-1] contiguous
    w_ptr,  # *f32 [M, T] out
    eps,  # fp32 scalar: conflict needs G[j, j] > eps
    T: tl.constexpr,
    T_PAD: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, T_PAD)  # task rows (c_i)
    k = tl.arange(0, T_PAD)  # coefficient columns
    i_ok = i < T
    k_ok = k < T
    g_base = gram_ptr + m * (T * T)
    o_base = order_ptr + m * (T * (T - 1))
    # Identity on the real tasks; padded rows stay all-zero and never take a step.
    coef = tl.where((i[:, None] == k[None, :]) & i_ok[:, None], 1.0, 0.0)
    for s in range(T - 1):
        j = tl.load(o_base + i * (T - 1) + s, mask=i_ok, other=0)  # int64 [T_PAD]
        # A malformed entry (outside [0, T), or the task itself) is skipped: no step, no read.
        valid = i_ok & (j >= 0) & (j < T) & (j != i)
        j = tl.where(valid, j, 0)
        # Column j_i of G (reads stay in L1; G is at most 16 KB).
        g_col = tl.load(g_base + k[None, :] * T + j[:, None], mask=valid[:, None] & k_ok[None, :], other=0.0)
        d = tl.reduce(coef * g_col, 1, _add)
        g_jj = tl.load(g_base + j * (T + 1), mask=valid, other=0.0)
        conflict = valid & (d < 0) & (g_jj > eps)
        # IEEE division (div.rn.f32): a plain `/` compiles to the approximate div.full.f32 on NVIDIA GPUs,
        # and the weights must be bitwise those of the torch / cpu / cuda backends for the same Gram.
        step = tl.where(conflict, tl.div_rn(d, tl.where(conflict, g_jj, 1.0)), 0.0)
        coef = coef - tl.where(k[None, :] == j[:, None], step[:, None], 0.0)
    w = tl.reduce(coef, 0, _add)
    tl.store(w_ptr + m * T + k, w, mask=k_ok)


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 [M, T] PCGrad weights from float32 Gram matrices [M, T, T] and an int64 order table
    [M, T, T-1] on the same device; one launch, no host synchronisation."""
    M, T, _ = gram.shape
    _config.check_tasks(T, None)
    w = torch.empty(M, T, dtype=torch.float32, device=gram.device)
    if M == 0:
        return w
    if T == 1:  # no other task to visit: c_0 = e_0 (and no empty order table is handed to Triton)
        return w.fill_(1.0)
    g = gram.to(torch.float32).contiguous()
    o = order.to(torch.int64).contiguous()
    with _launch_context(g):
        _pcgrad_solve_kernel[(M,)](
            g, o, w, float(eps), T=T, T_PAD=_config.next_pow2(T), num_warps=_config.solve_num_warps(T),
            enable_fp_fusion=False,  # products rounded before the sum, as torch's (coef * g).sum(-1)
        )
    return w
