"""Projection onto the dual cone of a module's task gradients, in Gram space (UPGrad, DualProj).

For preference weights u (a row of U), the projection of J^T u onto {x : J x >= 0} is J^T v with

    v = argmin_v  v^T G v   subject to  v >= u                     (Jacobian descent, Prop. 1)

solved exactly as an LCP in x = v - u >= 0. Default (scale-invariant) mode works on the cosine matrix
C = D^-1 G D^-1 (D = diag |g_k|): with z = D v the problem is ``min z^T (C + delta I) z, z >= D u``,
where delta is relative to every task's own squared norm (see ``_qp.auto_regularization``).
``compat="torchjd"`` reproduces torchjd's QuadprogProjector: G / tr G (all zeros when tr G < norm_eps)
plus reg_eps I, with both thresholds absolute.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._common import cosine, eye_like, restrict, trace_normalize
from ._native_solvers import inputs, lcp_solver, outputs, module_output, threads
from ._qp import auto_regularization, default_max_pivots, solve_lcp


def regularized_cosine(gram: torch.Tensor, present: torch.Tensor, reg_eps: Optional[float]):
    """(C + delta I, d, delta [M]) of the present tasks; absent tasks are isolated unit coordinates."""
    gn, _ = trace_normalize(gram)
    c, d = cosine(gn, present)
    if reg_eps is None:
        delta = auto_regularization(c)
    else:
        delta = torch.full((gram.shape[0],), float(reg_eps), dtype=gram.dtype, device=gram.device)
    return c + delta[:, None, None] * eye_like(gram), d, delta


def torchjd_gram(gram: torch.Tensor, present: torch.Tensor, norm_eps: float, reg_eps: float) -> torch.Tensor:
    """torchjd's ``regularize(normalize(G, norm_eps), reg_eps)`` with absent tasks isolated."""
    gn, tr = trace_normalize(gram)
    gn = torch.where((tr < norm_eps)[:, None, None], torch.zeros_like(gn), gn)
    a = gn + reg_eps * eye_like(gram)
    return restrict(a, present, absent_diag=1.0)


def project_dual_cone(
    gram: torch.Tensor,
    present: torch.Tensor,
    U: torch.Tensor,
    *,
    compat: Optional[str],
    norm_eps: float,
    reg_eps: Optional[float],
    solver: str,
    max_pivots: Optional[int],
    info: Dict[str, torch.Tensor],
) -> torch.Tensor:
    """Weights v [M, R, T] of the projections of the R preference rows U [M, R, T] (zero on absent tasks).

    Adds to ``info``: "converged" bool [M], "iterations" int64 [M] (pivots, max over rows) and, in the
    default mode, "reg" float64 [M] (the relative regularisation used).
    """
    mod = lcp_solver(gram, "dual_cone_projection") if solver in ("auto", "pivot") else None
    if mod is not None:  # the CPU: "auto" and "pivot" are one solver there (csrc/cpu/weighting_projection.cpp)
        g, p = inputs(gram, present)
        M, T, _ = g.shape
        R = U.shape[1]
        u = U.to(torch.float64).contiguous()
        v = torch.full((M, R, T), float("nan"), dtype=torch.float64, device=g.device)
        _, conv, iters = outputs(M, T, g.device)
        delta = module_output(M, g.device)
        torchjd = compat == "torchjd"
        auto_reg = reg_eps is None and not torchjd
        mod.dual_cone_projection(g.data_ptr(), p.data_ptr(), u.data_ptr(), M, R, T, torchjd, float(norm_eps), auto_reg,
                                 0.0 if reg_eps is None else float(reg_eps),
                                 max_pivots if max_pivots is not None else default_max_pivots(T), v.data_ptr(),
                                 conv.data_ptr(), iters.data_ptr(), delta.data_ptr(), threads())
        info["converged"] = conv
        info["iterations"] = iters
        if not torchjd:
            info["reg"] = delta
        return v
    if compat == "torchjd":
        a = torchjd_gram(gram, present, norm_eps, float(reg_eps))
        b = U
    else:
        a, d, delta = regularized_cosine(gram, present, reg_eps)
        b = U * d[:, None, :]
        info["reg"] = delta
    q = (b[:, :, None, :] * a[:, None, :, :]).sum(dim=-1)  # q_r = A b_r
    x, conv, iters = solve_lcp(a, q, solver=solver, max_pivots=max_pivots)
    z = b + x
    info["converged"] = conv.all(dim=1)
    info["iterations"] = iters.amax(dim=1) if iters.shape[1] > 0 else torch.zeros_like(iters[:, 0])
    if compat == "torchjd":
        return z
    return z / d[:, None, :]
