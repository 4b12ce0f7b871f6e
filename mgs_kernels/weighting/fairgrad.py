"""``fairgrad``: FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
Eq. 4; torchjd's ``FairGrad``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._common import check_float, check_int, mean_weights, trace_normalize
from ._native_solvers import inputs, module_output, native_solver, outputs, threads
from ._newton import alpha_fair, unsolved_to_zero
from .base import State, Weighting, register


@register
class FairGradWeighting(Weighting):
    """W solves G W = W^(-1/alpha), W > 0, on the tasks present in the module (alpha-fair
    utilities); alpha = 0 gives the mean (linear scalarisation), alpha = 1 Nash-MTL's condition.

    Not scale-invariant (as in the paper and torchjd): multiplying G by c multiplies W by
    c^(-alpha/(alpha+1)); for alpha = 1 every module's aggregated gradient has norm sqrt(n). Solved by
    damped Newton on G / tr G (``_newton``), then rescaled. torchjd's scipy least_squares stops at
    100 T evaluations, short of the solution on badly scaled modules.

    Options:
        alpha: fairness exponent (required, >= 0).
        max_iters: Newton iterations (default 50); info["converged"] is residual <= 1e-9.
    """

    name = "fairgrad"
    scale_invariant = False

    def __init__(self, alpha: Optional[float] = None, max_iters: Optional[int] = None) -> None:
        super().__init__()
        if alpha is None:
            from .._errors import MGSInputError

            raise MGSInputError("fairgrad: the option alpha (fairness exponent, e.g. 1.0) is required, as in torchjd")
        self.alpha = check_float(self.name, "alpha", alpha, minimum=0.0)
        self.max_iters = 50 if max_iters is None else check_int(self.name, "max_iters", max_iters, minimum=1)
        self._repr_options = {"alpha": self.alpha, "max_iters": self.max_iters}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.alpha == 0.0:
            info["converged"] = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
            return mean_weights(present)
        mod = native_solver(gram, "fairgrad")
        if mod is not None:  # the same solve, one module per thread (csrc/cpu/weighting_fairgrad.cpp)
            g, p = inputs(gram, present)
            M, T, _ = g.shape
            w, conv, iters = outputs(M, T, g.device)
            res = module_output(M, g.device)
            mod.fairgrad(g.data_ptr(), p.data_ptr(), M, T, self.alpha, self.max_iters, w.data_ptr(), conv.data_ptr(),
                         res.data_ptr(), iters.data_ptr(), threads())
            info["converged"] = conv
            info["residual"] = res
            info["iterations"] = iters
            return w
        gn, tr = trace_normalize(gram)
        w, res, iters = alpha_fair(gn, present, self.alpha, max_iters=self.max_iters)
        info["converged"] = res <= 1e-9
        info["residual"] = res
        info["iterations"] = iters
        scale = torch.where(tr > 0, tr, torch.ones_like(tr)).pow(-self.alpha / (self.alpha + 1.0))
        return unsolved_to_zero(w * scale[:, None], info["converged"])
