"""Kernel-level API: segmented Gram, PCGrad solve, segmented combine, and the three fused together.

All functions validate every input before any backend runs, so a failed call writes nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ._plan import OffsetsLike, get_plan
from ._validate import check_eps, check_grads, check_gram, check_out, check_weights
from .order import OrderLike, resolve_order

__all__ = ["segmented_gram", "pcgrad_weights", "segmented_combine", "modular_pcgrad"]


def segmented_gram(grads: torch.Tensor, offsets: OffsetsLike, *, backend: str = "auto") -> torch.Tensor:
    """Per-module Gram matrices of the task gradients.

    Args:
        grads: [T, N] float32 / bfloat16 / float16, rows contiguous.
        offsets: int64 [M+1] (tensor on any device, or a list): module m is ``grads[:, offsets[m]:offsets[m+1]]``;
            starts at 0, non-decreasing, ends at N. Empty modules are allowed (their Gram is zero).
        backend: "auto" | "torch" | "cpu" | "cuda" | "triton".

    Returns:
        float32 [M, T, T] on grads' device: ``G[m] = V_m @ V_m.T`` accumulated in float32.
    """
    check_grads(grads)
    plan = get_plan(offsets, grads.shape[1])
    be = backends.get_backend(backend, grads.device)
    return be.segmented_gram(grads, plan)


def pcgrad_weights(
    gram: torch.Tensor,
    *,
    order: OrderLike = "random",
    generator: Optional[torch.Generator] = None,
    eps: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """The PCGrad combination weights of every module, from its Gram matrix (DESIGN.md section 1).

    Args:
        gram: [M, T, T] float (float32 is used for the solve).
        order: "random" (a fresh uniform permutation per module and task from ``generator``), "fixed"
            (ascending), or an explicit int64 table [M, T, T-1] on gram's device.
        generator: random source for ``order="random"``.
        eps: conflict test is ``d < 0 and G[j, j] > eps``.
        backend: as for ``segmented_gram``.

    Returns:
        float32 [M, T]: the surgery's result for module m is ``sum_k W[m, k] * g_k``.
    """
    check_gram(gram)
    eps = check_eps(eps)
    M, T, _ = gram.shape
    table = resolve_order(order, M, T, gram.device, generator)
    be = backends.get_backend(backend, gram.device)
    return be.pcgrad_weights(gram.float(), table, eps)


def segmented_combine(
    grads: torch.Tensor,
    offsets: OffsetsLike,
    weights: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum of the task gradients with per-module weights.

    Args:
        grads: [T, N] float32 / bfloat16 / float16.
        offsets: int64 [M+1], as for ``segmented_gram``.
        weights: [M, T] float (used as float32), on grads' device.
        out: optional [N] float32 / bfloat16 / float16 tensor on grads' device to write into; it may be
            exactly one row of ``grads`` (in place). Default: a new tensor of grads' dtype.

    Returns:
        [N] tensor (``out`` if given): ``out[n] = sum_k W[m(n), k] * grads[k, n]``, fp32 accumulation.
    """
    check_grads(grads)
    plan = get_plan(offsets, grads.shape[1])
    check_weights(weights, plan.num_modules, grads.shape[0], grads.device)
    check_out(out, grads)
    be = backends.get_backend(backend, grads.device)
    if out is None:
        out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    be.segmented_combine(grads, plan, weights.float(), out)
    return out


def modular_pcgrad(
    grads: torch.Tensor,
    offsets: OffsetsLike,
    *,
    order: OrderLike = "random",
    generator: Optional[torch.Generator] = None,
    eps: float = 0.0,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Modular PCGrad in one call: segmented Gram, per-module solve, segmented combine.

    Args and result as for the three stages above; ``order`` / ``generator`` / ``eps`` as in
    ``pcgrad_weights``. No host synchronisation once ``offsets`` has been seen (its validated plan is
    cached per tensor), so a step can be captured in a CUDA graph given an explicit order table or a
    generator on the gradients' device.

    Returns:
        [N] tensor of grads' dtype (or ``out``): the sum over tasks of the projected task gradients.
    """
    check_grads(grads)
    eps = check_eps(eps)
    T, N = grads.shape
    plan = get_plan(offsets, N)
    check_out(out, grads)
    table = resolve_order(order, plan.num_modules, T, grads.device, generator)
    be = backends.get_backend(backend, grads.device)
    if out is None:
        out = torch.empty(N, dtype=grads.dtype, device=grads.device)
    fused = getattr(be, "modular_pcgrad", None)
    if fused is not None:
        fused(grads, plan, table, eps, out)
        return out
    gram = be.segmented_gram(grads, plan)
    weights = be.pcgrad_weights(gram, table, eps)
    be.segmented_combine(grads, plan, weights, out)
    return out
