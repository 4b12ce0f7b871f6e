"""``mgda``: the Multiple-Gradient Descent Algorithm's min-norm point of the convex hull of the task
gradients (Désidéri 2012; Frank-Wolfe solver of Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", 2018, Alg. 2; torchjd's ``MGDA``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._common import all_done, check_choice, check_float, check_int, matvec, mean_weights, trace_normalize
from ._native_solvers import inputs, lcp_solver, native_solver, outputs, module_output, threads
from ._projection import regularized_cosine
from ._qp import default_max_pivots, solve_lcp
from .base import State, Weighting, register


@register
class MGDAWeighting(Weighting):
    """W = argmin_{w in simplex} w^T G w over the tasks present in the module.

    Options:
        epsilon: Frank-Wolfe stops when the step size gamma < epsilon (torchjd default 1e-3).
        max_iters: Frank-Wolfe iteration cap (torchjd default 100).
        solver: "frank_wolfe" (default; torchjd's algorithm step for step, batched with a done mask:
            it stops up to ~0.2 away in direction from the true min-norm point) or "exact" (the exact
            min-norm point: the LCP ``min 1/2 b^T (G + delta D) b - 1^T b, b >= 0`` with w = b / 1^T b,
            where delta is the relative regularisation of ``upgrad``).
        reg_eps: "exact" only: relative regularisation (None: automatic, as for ``upgrad``).
        max_pivots: "exact" only: cap of the pivoting solver.

    Scale-invariant by construction (the Frank-Wolfe step size is a ratio). A task with no gradient in
    the module is left out; torchjd would pick it (its weight 1 gives the zero vector, the minimum
    norm) and zero the whole module.
    """

    name = "mgda"

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100, *, solver: str = "frank_wolfe",
                 reg_eps: Optional[float] = None, max_pivots: Optional[int] = None) -> None:
        super().__init__()
        self.epsilon = check_float(self.name, "epsilon", epsilon, minimum=0.0, strict=True)
        self.max_iters = check_int(self.name, "max_iters", max_iters, minimum=1)
        self.solver = check_choice(self.name, "solver", solver, ("frank_wolfe", "exact"))
        self.reg_eps = None if reg_eps is None else check_float(self.name, "reg_eps", reg_eps, minimum=0.0)
        self.max_pivots = None if max_pivots is None else check_int(self.name, "max_pivots", max_pivots, minimum=1)
        self._repr_options = {"epsilon": self.epsilon, "max_iters": self.max_iters, "solver": self.solver}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.solver == "exact":
            return min_norm_point(gram, present, reg_eps=self.reg_eps, max_pivots=self.max_pivots, info=info)
        return self._frank_wolfe(gram, present, info)

    def _frank_wolfe(self, gram: torch.Tensor, present: torch.Tensor, info: Dict[str, torch.Tensor]) -> torch.Tensor:
        mod = native_solver(gram, "mgda_frank_wolfe")
        if mod is not None:
            g, p = inputs(gram, present)
            M, T, _ = g.shape
            w, conv, iters = outputs(M, T, g.device)
            mod.mgda_frank_wolfe(g.data_ptr(), p.data_ptr(), M, T, self.epsilon, self.max_iters, w.data_ptr(),
                                 conv.data_ptr(), iters.data_ptr(), threads())
            info["converged"] = conv
            info["iterations"] = iters
            return w
        g, _ = trace_normalize(gram)  # same iterates as on G (the step is a ratio), better scaled
        M, T, _ = g.shape
        alpha = mean_weights(present)
        big = torch.full_like(alpha, float("inf"))
        eye = torch.eye(T, dtype=g.dtype, device=g.device)
        diag = torch.diagonal(g, dim1=1, dim2=2)
        one = torch.ones((), dtype=g.dtype, device=g.device)
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        done = ~present.any(dim=1)
        iters = torch.zeros(M, dtype=torch.int64, device=g.device)
        for it in range(self.max_iters):
            if it % 4 == 0 and all_done(done):
                break
            g_alpha = matvec(g, alpha)
            t = torch.argmin(torch.where(present, g_alpha, big), dim=1, keepdim=True)
            a = g_alpha.gather(1, t).squeeze(1)  # alpha^T G e_t
            b = (g_alpha * alpha).sum(dim=1)  # alpha^T G alpha
            c = diag.gather(1, t).squeeze(1)  # e_t^T G e_t
            den = b + c - 2.0 * a
            gamma = torch.where(c <= a, one, torch.where(b <= a, zero, (b - a) / torch.where(den > 0, den, one)))
            gamma = torch.where(done, zero, gamma)
            at_vertex = alpha.gather(1, t).squeeze(1) == 1.0
            alpha = (1.0 - gamma)[:, None] * alpha + gamma[:, None] * eye[t.squeeze(1)]
            iters += ~done
            # Stopping where torchjd stops (gamma < epsilon), or at a vertex that the next steps would
            # repeat (gamma = 1 towards the vertex it is on), gives torchjd's result.
            done = done | (gamma < self.epsilon) | ((gamma == 1.0) & at_vertex)
        info["converged"] = done
        info["iterations"] = iters
        return alpha


def min_norm_point(gram: torch.Tensor, present: torch.Tensor, *, reg_eps: Optional[float],
                   max_pivots: Optional[int], info: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact min-norm point of the convex hull of the present tasks: [M, T] simplex weights.

    With z = D b (D = diag |g_k|): ``min 1/2 z^T (C + delta I) z - (1/d)^T z, z >= 0``, an LCP with a
    positive definite matrix; then w = b / sum(b). Where the hull contains 0 (the module is Pareto
    stationary), w is the regularised problem's answer, whose direction has norm ~ sqrt(delta).
    """
    mod = lcp_solver(gram, "mgda_min_norm")
    if mod is not None:  # the CPU: the same solve, one module per thread (csrc/cpu/weighting_projection.cpp)
        g, p = inputs(gram, present)
        M, T, _ = g.shape
        w, conv, iters = outputs(M, T, g.device)
        delta = module_output(M, g.device)
        mod.mgda_min_norm(g.data_ptr(), p.data_ptr(), M, T, reg_eps is None, 0.0 if reg_eps is None else float(reg_eps),
                          max_pivots if max_pivots is not None else default_max_pivots(T), w.data_ptr(),
                          conv.data_ptr(), iters.data_ptr(), delta.data_ptr(), threads())
        info["converged"] = conv
        info["iterations"] = iters
        info["reg"] = delta
        return w
    a, d, delta = regularized_cosine(gram, present, reg_eps)
    p = present.to(gram.dtype)
    q = -(p / d)
    z, conv, iters = solve_lcp(a, q[:, None, :], solver="auto", max_pivots=max_pivots, start_all=True)
    b = z[:, 0] / d
    s = b.sum(dim=1, keepdim=True)
    info["converged"] = conv[:, 0]
    info["iterations"] = iters[:, 0]
    info["reg"] = delta
    return b / torch.where(s > 0, s, torch.ones_like(s))
