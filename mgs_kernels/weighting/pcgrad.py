"""PCGrad in Gram space: the one Python definition of the solve (docs/design.md section 2).

For module m with Gram matrix G and a visit order per task::

    c_i = e_i
    for j in order[m, i]:                    # the other tasks, in the order task i visits them
        d = c_i . G[:, j]                    # = g_i' . g_j   (g_j is the ORIGINAL gradient)
        if d < 0 and G[j, j] > eps:          # conflict
            c_i[j] -= d / G[j, j]
    w_m = sum_i c_i                          # result_m = w_m . V_m

``pcgrad_coefficients`` runs the T-1 visiting steps in sequence, each vectorized over modules and
tasks, in the Gram's own dtype: float32 for the torch backend (whose weights the native and Triton
kernels match bit for bit), float64 for references. An order entry outside [0, T) or equal to the
visiting task itself is skipped (no projection step), on every backend.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from .._validate import check_eps, check_gram
from ..order import OrderLike, order_table, parse_order
from .base import State, Weighting, register


def _steps(gram: torch.Tensor, order: torch.Tensor, eps: float) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Run the solve, yielding after each visiting step (d, G[j, j], valid, coef) for callers that
    inspect the decisions; ``coef`` [M, T, T] holds the coefficients after that step."""
    M, T, _ = gram.shape
    g = gram
    coef = torch.eye(T, dtype=g.dtype, device=g.device).expand(M, T, T).contiguous()
    diag = torch.diagonal(g, dim1=1, dim2=2)  # [M, T]
    self_index = torch.arange(T, device=g.device).expand(M, T)
    for step in range(T - 1):
        j = order[:, :, step]  # [M, T]: the task each task i visits now
        valid = (j >= 0) & (j < T) & (j != self_index)
        j = torch.where(valid, j, self_index)  # a skipped entry reads a harmless in-range row
        g_rows = torch.gather(g, 1, j.unsqueeze(-1).expand(M, T, T))  # G[m, j, :] (= G[m, :, j])
        d = (coef * g_rows).sum(-1)  # g_i' . g_j
        g_jj = torch.gather(diag, 1, j)
        conflict = (d < 0) & (g_jj > eps) & valid
        step_coef = torch.where(conflict, d / torch.where(conflict, g_jj, 1.0), 0.0)
        current = torch.gather(coef, 2, j.unsqueeze(-1))
        coef.scatter_(2, j.unsqueeze(-1), current - step_coef.unsqueeze(-1))
        yield d, g_jj, valid, coef
    if T == 1:
        yield None, None, None, coef


def pcgrad_coefficients(gram: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[M, T, T] in gram's dtype: row i of module m is c_i, with g_i' = sum_k c_ik g_k.

    Args:
        gram: [M, T, T] float Gram matrices (float32: the torch backend; float64: references).
        order: int64 [M, T, T-1] visit order on gram's device.
        eps: the conflict test is ``d < 0 and G[j, j] > eps``.
    """
    coef = None
    for step in _steps(gram, order, eps):
        coef = step[-1]
    return coef


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[M, T] in gram's dtype: w_m = sum_i c_i, the weights of the summed projected gradients."""
    return pcgrad_coefficients(gram, order, eps).sum(1)


def decision_margin(gram: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> float:
    """Smallest |g_i' . g_j| / (|g_i| |g_j|) over all conflict tests of the solve, in float64.

    Tests use it to skip inputs whose PCGrad branch decisions sit on a knife edge, where float32 and
    float64 may legitimately disagree. One host sync (a test / benchmark helper, not a training step).
    """
    g = gram.double()
    norm_i = torch.diagonal(g, dim1=1, dim2=2).clamp_min(0).sqrt()  # [M, T]
    margin = torch.tensor(float("inf"), dtype=torch.float64, device=g.device)
    for d, g_jj, valid, _ in _steps(g, order, eps):
        if d is None or d.numel() == 0:
            continue
        tested = valid & (g_jj > eps) & (norm_i > 0)
        ratio = d.abs() / torch.where(tested, norm_i * g_jj.clamp_min(0).sqrt(), 1.0)
        margin = torch.minimum(margin, torch.where(tested, ratio, float("inf")).amin())
    return float(margin)


@register
class PCGrad(Weighting):
    """PCGrad (Yu et al., 2020) per module: each task projected off the ORIGINAL gradients it conflicts
    with, in a random (or fixed, or given) order, projected gradients summed.

    Options:
        order: "random" (a fresh uniform permutation per module and task, drawn from ``generator`` on
            its device), "fixed" (ascending), or an int64 table [M, T, T-1].
        eps: conflict test ``g_i' . g_j < 0 and |g_j|^2 > eps`` (0: scale-invariant).

    A task with a zero gradient in a module is never projected on (|g_j|^2 = 0 is not > eps) and has
    nothing to project, so it drops out of that module's problem by itself; its own weight stays 1.
    Solved in float32 by the backend's kernel (bitwise equal weights on every backend).
    """

    name = "pcgrad"
    needs_generator = True

    def __init__(self, order: OrderLike = "random", eps: float = 0.0):
        self.order = parse_order(order)
        self.eps = check_eps(eps)

    def __call__(self, gram: torch.Tensor, *, state: Optional[State] = None,
                 generator: Optional[torch.Generator] = None, info: Optional[Dict[str, torch.Tensor]] = None,
                 dtype: torch.dtype = torch.float32, backend=None) -> torch.Tensor:
        from .. import backends

        check_gram(gram)
        M, T, _ = gram.shape
        table = order_table(self.order, M, T, gram.device, generator)
        be = backend if backend is not None else backends.get_backend("auto", gram.device, T)
        weights = be.pcgrad_weights(gram.float().contiguous(), table, self.eps)
        if info is not None:
            info["order"] = table
        return weights.to(dtype)

    def compute(self, gram, present, *, state, generator, info):
        M, T, _ = gram.shape
        table = order_table(self.order, M, T, gram.device, generator)
        info["order"] = table
        return pcgrad_weights(gram, table, self.eps)

    def __repr__(self) -> str:
        order = self.order if isinstance(self.order, str) else "table"
        return f"PCGrad(order={order!r}, eps={self.eps})"
