"""The plain Python surgery loop, as users write it today, plus float64 Gram-space references.

``modular_pcgrad`` loops over modules, tasks and task pairs with ``torch.dot`` and ``.item()``
branching: readable, obviously PCGrad, and slow (O(M*T^2) launches and host syncs). It is the
baseline of the benchmarks and, run in float64, the ground truth of the tests.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .order import fixed_order, random_order


def _order_table(order, num_modules, num_tasks, generator) -> torch.Tensor:
    if isinstance(order, torch.Tensor):
        return order.cpu()
    if order == "fixed":
        return fixed_order(num_modules, num_tasks)
    if order == "random":
        return random_order(num_modules, num_tasks, generator=generator).cpu()
    raise ValueError(f"order must be 'random', 'fixed' or a tensor, got {order!r}")


def modular_pcgrad(
    grads: torch.Tensor,
    offsets: Union[torch.Tensor, Sequence[int]],
    *,
    order: Union[str, torch.Tensor] = "fixed",
    generator: Optional[torch.Generator] = None,
    eps: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-module PCGrad by the book: for every module, every task i, every other task j in order.

    Args:
        grads: [T, N] task gradients (any float dtype, any device).
        offsets: [M+1] module boundaries.
        order: "fixed", "random" (drawn with ``generator`` exactly as ``mgs_kernels.random_order``
            draws it) or an int64 table [M, T, T-1].
        eps: project only when ``g_i' . g_j < 0`` and ``|g_j|^2 > eps``.
        dtype: arithmetic dtype (default float32); the result has this dtype when given, else grads'.

    Returns:
        [N]: sum over tasks of each task's gradient projected off the conflicting ORIGINAL gradients.
    """
    acc = dtype or torch.float32
    T, N = grads.shape
    bounds = [int(v) for v in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
    M = len(bounds) - 1
    table = _order_table(order, M, T, generator).tolist()
    out = torch.zeros(N, dtype=acc, device=grads.device)
    for m in range(M):
        a, b = bounds[m], bounds[m + 1]
        if a == b:
            continue
        task_grads = [grads[t, a:b].to(acc) for t in range(T)]
        total = torch.zeros_like(task_grads[0])
        for i in range(T):
            g = task_grads[i].clone()
            for j in table[m][i]:
                g_j = task_grads[j]
                dot = torch.dot(g, g_j)
                norm_sq = torch.dot(g_j, g_j)
                if dot.item() < 0 and norm_sq.item() > eps:
                    g -= dot / norm_sq * g_j
            total += g
        out[a:b] = total
    return out if dtype is not None else out.to(grads.dtype)


def gram(grads: torch.Tensor, offsets, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[M, T, T] per-module Gram matrices, computed module by module in ``dtype``."""
    bounds = [int(v) for v in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
    T = grads.shape[0]
    out = torch.zeros(len(bounds) - 1, T, T, dtype=dtype, device=grads.device)
    for m in range(len(bounds) - 1):
        v = grads[:, bounds[m] : bounds[m + 1]].to(dtype)
        out[m] = v @ v.T
    return out


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[M, T] PCGrad weights from Gram matrices, the loop of DESIGN.md section 1 in gram's dtype."""
    M, T, _ = gram.shape
    g = gram.cpu()
    table = order.cpu().tolist()
    weights = torch.zeros(M, T, dtype=gram.dtype)
    for m in range(M):
        for i in range(T):
            c = torch.zeros(T, dtype=gram.dtype)
            c[i] = 1.0
            for j in table[m][i]:
                d = float(c @ g[m, :, j])
                if d < 0 and float(g[m, j, j]) > eps:
                    c[j] -= d / g[m, j, j]
            weights[m] += c
    return weights.to(gram.device)


def decision_margin(gram: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> float:
    """Smallest |g_i' . g_j| / (|g_i| |g_j|) over all conflict tests of the solve (float64).

    Tests use it to skip inputs whose PCGrad branch decisions sit on a knife edge, where float32 and
    float64 may legitimately disagree.
    """
    M, T, _ = gram.shape
    g = gram.double().cpu()
    table = order.cpu().tolist()
    margin = float("inf")
    for m in range(M):
        for i in range(T):
            c = torch.zeros(T, dtype=torch.float64)
            c[i] = 1.0
            for j in table[m][i]:
                d = float(c @ g[m, :, j])
                gjj = float(g[m, j, j])
                norm_i = max(float(g[m, i, i]), 0.0) ** 0.5
                if gjj > eps and norm_i > 0:
                    margin = min(margin, abs(d) / (norm_i * gjj**0.5))
                if d < 0 and gjj > eps:
                    c[j] -= d / gjj
    return margin
