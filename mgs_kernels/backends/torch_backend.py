"""Pure-PyTorch backend: vectorized over modules and tasks, no host sync, works on any device.

It is the portable fallback and the model the fused kernels are checked against for layout and
semantics. Temporaries are bounded by processing the buffer in batches of chunks / elements.
"""

from __future__ import annotations

import torch

from .._plan import SegmentPlan

# Elements per chunk of the Gram pass, and the rough number of fp32 temporaries per batch.
CHUNK = 1 << 14
BATCH_ELEMS = 1 << 24


def supports(device: torch.device) -> bool:
    return True


def segmented_gram(grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """float32 [M, T, T]: per-module Gram matrices, per-chunk partials reduced in a fixed order."""
    T = grads.shape[0]
    M = plan.num_modules
    device = grads.device
    gram = torch.zeros(M, T * T, dtype=torch.float32, device=device)
    if M == 0 or plan.numel == 0:
        return gram.view(M, T, T)
    table = plan.chunk_table(CHUNK, device)
    lane = torch.arange(CHUNK, device=device)
    per_batch = max(1, BATCH_ELEMS // (T * CHUNK))
    for k0 in range(0, table.num_chunks, per_batch):
        k1 = min(k0 + per_batch, table.num_chunks)
        length = table.length[k0:k1, None]
        # Padding lanes repeat the chunk's last element (never another module's) and are then zeroed
        # with where(), not a multiply, so an Inf elsewhere cannot leak in as NaN.
        idx = table.start[k0:k1, None] + torch.minimum(lane, length - 1)
        x = grads[:, idx].float()  # [T, kb, C]
        x = torch.where(lane < length, x, 0.0)
        partial = torch.matmul(x.permute(1, 0, 2), x.permute(1, 2, 0))  # [kb, T, T]
        # Chunks of this batch, counted per module; a fixed-order segmented sum, no atomics.
        lo = torch.clamp(table.first[:-1], k0, k1)
        hi = torch.clamp(table.first[1:], k0, k1)
        gram += torch.segment_reduce(partial.reshape(k1 - k0, T * T), "sum", lengths=hi - lo, unsafe=True)
    return gram.view(M, T, T)


def pcgrad_coefficients(gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 [M, T, T]: row i of module m is c_i, the projected task gradient g_i' = sum_k c_ik g_k
    (DESIGN.md section 1), all modules and tasks at once.

    The T-1 visiting steps run in sequence, each vectorized over modules and tasks.
    """
    M, T, _ = gram.shape
    g = gram.float()
    coef = torch.eye(T, dtype=torch.float32, device=g.device).expand(M, T, T).contiguous()
    diag = torch.diagonal(g, dim1=1, dim2=2)  # [M, T]
    for step in range(T - 1):
        j = order[:, :, step]  # [M, T]: the task each task i visits now
        g_rows = torch.gather(g, 1, j.unsqueeze(-1).expand(M, T, T))  # G[m, j, :] (= G[m, :, j])
        d = (coef * g_rows).sum(-1)  # g_i' . g_j
        g_jj = torch.gather(diag, 1, j)
        conflict = (d < 0) & (g_jj > eps)
        step_coef = torch.where(conflict, d / torch.where(conflict, g_jj, 1.0), 0.0)
        current = torch.gather(coef, 2, j.unsqueeze(-1))
        coef.scatter_(2, j.unsqueeze(-1), current - step_coef.unsqueeze(-1))
    return coef


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 [M, T]: w_m = sum_i c_i, the weights of the summed projected gradients."""
    return pcgrad_coefficients(gram, order, eps).sum(1)


def segmented_combine(grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = sum_k weights[m(n), k] * grads[k, n], fp32 accumulation, written batch by batch.

    Each batch is read completely before it is written, so ``out`` may be a row of ``grads``.
    """
    T, N = grads.shape
    if N == 0:
        return
    device = grads.device
    offsets = plan.offsets(device)
    w = weights.float()
    step = max(1, BATCH_ELEMS // max(T, 1))
    for a in range(0, N, step):
        b = min(a + step, N)
        module = torch.searchsorted(offsets, torch.arange(a, b, device=device), right=True) - 1
        w_elem = w[module]  # [B, T]
        y = torch.einsum("tb,bt->b", grads[:, a:b].float(), w_elem)
        out[a:b].copy_(y)
