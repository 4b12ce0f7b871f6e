"""Kernel-level API: the pipeline ``segmented_gram -> weights -> segmented_combine``, its stages, and
the stages fused (``modular_pcgrad``, ``modular_aggregate``).

All functions validate every input before any backend runs, so a failed call writes nothing. Which
backend runs is decided by ``mgs_kernels.backends.get_backend`` (routing by device, task count, dtype).
Inside ``torch.compile`` the four PCGrad functions go through the custom ops of ``_custom_ops``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import backends
from ._plan import OffsetsLike, get_plan
from ._validate import check_eps, check_grads, check_gram, check_out, check_weights
from .order import OrderLike, order_table
from .weighting import State, Weighting, get_weighting

__all__ = ["segmented_gram", "pcgrad_weights", "segmented_combine", "modular_pcgrad", "gram_weights",
           "modular_aggregate"]


def _compiled():
    """The custom ops when called inside torch.compile tracing, else None."""
    if not torch.compiler.is_compiling():
        return None
    from . import _custom_ops

    return _custom_ops


def _offsets_tensor(offsets: OffsetsLike) -> torch.Tensor:
    return offsets if isinstance(offsets, torch.Tensor) else torch.tensor(list(offsets), dtype=torch.int64)


def _traced_order(order: OrderLike, num_modules: int, num_tasks: int, device, generator) -> torch.Tensor:
    """An order table built in traceable code; an explicit table is passed on (the op checks it)."""
    return order if isinstance(order, torch.Tensor) else order_table(order, num_modules, num_tasks, device, generator)


def _into(out: Optional[torch.Tensor], result: torch.Tensor) -> torch.Tensor:
    return result if out is None else out.copy_(result)


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
    if (custom := _compiled()) is not None:
        return custom.segmented_gram(grads, _offsets_tensor(offsets), backend)
    check_grads(grads)
    plan = get_plan(offsets, grads.shape[1])
    be = backends.get_backend(backend, grads.device, grads.shape[0], grads.dtype)
    return be.segmented_gram(grads, plan)


def pcgrad_weights(
    gram: torch.Tensor,
    *,
    order: OrderLike = "random",
    generator: Optional[torch.Generator] = None,
    eps: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """The PCGrad combination weights of every module, from its Gram matrix (docs/design.md section 2).

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
    if (custom := _compiled()) is not None:
        M, T, _ = gram.shape
        return custom.pcgrad_weights(gram, _traced_order(order, M, T, gram.device, generator), float(eps), backend)
    check_gram(gram)
    eps = check_eps(eps)
    M, T, _ = gram.shape
    table = order_table(order, M, T, gram.device, generator)
    be = backends.get_backend(backend, gram.device, T)
    return be.pcgrad_weights(gram.float().contiguous(), table, eps)


def gram_weights(
    gram: torch.Tensor,
    method: Any = "pcgrad",
    *,
    state: Optional[State] = None,
    generator: Optional[torch.Generator] = None,
    info: Optional[Dict[str, torch.Tensor]] = None,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """Combination weights of every module from its Gram matrix, for any Gram-space method.

    Args:
        gram: [M, T, T] float Gram matrices (e.g. from ``segmented_gram``).
        method: a name from ``mgs_kernels.weighting.methods()`` ("pcgrad", "upgrad", "mgda", ...) or a
            ``Weighting`` instance.
        state: per-module state of a stateful method (``Weighting.init_state``), updated in place.
        generator: random source (pcgrad's order, random weights).
        info: optional dict that receives per-module diagnostics of the method (e.g. ``converged``).
        backend: where PCGrad's solve runs (other methods run batched in torch on gram's device).
        **options: the method's options (e.g. ``order=``, ``eps=`` for pcgrad; ``c=`` for cagrad).

    Returns:
        float32 [M, T]: module m's aggregate is ``sum_k W[m, k] * g_k``.
    """
    check_gram(gram)
    weighting = get_weighting(method, options)
    be = backends.get_backend(backend, gram.device, gram.shape[1])
    return weighting(gram, state=state, generator=generator, info=info, backend=be)


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
    if (custom := _compiled()) is not None:
        return _into(out, custom.segmented_combine(grads, _offsets_tensor(offsets), weights, backend))
    check_grads(grads)
    plan = get_plan(offsets, grads.shape[1])
    check_weights(weights, plan.num_modules, grads.shape[0], grads.device)
    check_out(out, grads)
    be = backends.get_backend(backend, grads.device, grads.shape[0], grads.dtype)
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
    if (custom := _compiled()) is not None:
        off = _offsets_tensor(offsets)
        table = _traced_order(order, off.shape[0] - 1, grads.shape[0], grads.device, generator)
        return _into(out, custom.modular_pcgrad(grads, off, table, float(eps), backend))
    check_grads(grads)
    eps = check_eps(eps)
    T, N = grads.shape
    plan = get_plan(offsets, N)
    check_out(out, grads)
    table = order_table(order, plan.num_modules, T, grads.device, generator)
    be = backends.get_backend(backend, grads.device, T, grads.dtype)
    if out is None:
        out = torch.empty(N, dtype=grads.dtype, device=grads.device)
    be.modular_pcgrad(grads, plan, table, eps, out)
    return out


def modular_aggregate(
    grads: torch.Tensor,
    offsets: OffsetsLike,
    method: Any = "pcgrad",
    *,
    state: Optional[State] = None,
    generator: Optional[torch.Generator] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """Any Gram-space method applied per module: segmented Gram, weights per module, segmented combine.

    Args:
        grads, offsets, out, backend: as for ``modular_pcgrad``.
        method, state, generator, **options: as for ``gram_weights``.

    Returns:
        [N] tensor of grads' dtype (or ``out``): module m's slice is ``sum_k W[m, k] * grads[k, slice]``.
    """
    check_grads(grads)
    T, N = grads.shape
    plan = get_plan(offsets, N)
    check_out(out, grads)
    weighting = get_weighting(method, options)
    be = backends.get_backend(backend, grads.device, T, grads.dtype)
    if out is None:
        out = torch.empty(N, dtype=grads.dtype, device=grads.device)
    if _is_pcgrad(weighting):
        table = order_table(weighting.order, plan.num_modules, T, grads.device, generator)
        be.modular_pcgrad(grads, plan, table, weighting.eps, out)
        return out
    gram = be.segmented_gram(grads, plan)
    weights = weighting(gram, state=state, generator=generator, backend=be)
    be.segmented_combine(grads, plan, weights, out)
    return out


def _is_pcgrad(weighting: Weighting) -> bool:
    from .weighting.pcgrad import PCGrad

    return type(weighting) is PCGrad
