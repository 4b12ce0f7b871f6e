"""The plain Python surgery loop, as users write it today, plus float64 Gram-space references.

``modular_pcgrad`` loops over modules, tasks and task pairs with ``torch.dot`` and ``.item()``
branching: readable, obviously PCGrad, and slow (O(M*T^2) launches and host syncs). It is the
baseline of the benchmarks and, run in float64, the ground truth of the tests.

``gram`` computes per-module Grams module by module; ``pcgrad_weights`` and ``decision_margin`` are the
Gram-space solve of ``mgs_kernels.weighting.pcgrad`` (the one definition), run in the Gram's dtype
(float64 for references). Tests check that solve against the plain loop above.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .order import order_table
from .weighting.pcgrad import decision_margin, pcgrad_weights

__all__ = ["modular_pcgrad", "gram", "pcgrad_weights", "decision_margin"]


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
    if isinstance(order, torch.Tensor):
        order = order.cpu()
    table = order_table(order, M, T, torch.device("cpu"), generator).tolist()
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
