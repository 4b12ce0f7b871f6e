"""``upgrad``: Unconflicting Projection of Gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024; torchjd's ``UPGrad``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._common import COMPAT_CHOICES, check_choice, check_float, check_int, check_vector, pref_weights
from ._projection import project_dual_cone
from .base import State, Weighting, register


@register
class UPGradWeighting(Weighting):
    """Each task's gradient, scaled by its preference weight, projected onto the dual cone of the
    module's task gradients; the projections summed.

    In Gram space: W = sum_i v_i with v_i = argmin v^T G v s.t. v >= u_i e_i (u = preference
    weights, default 1/n on the n present tasks), solved exactly per module (see ``_projection``).

    Options:
        pref_vector: [T] preference weights (default: the mean over the present tasks).
        reg_eps: regularisation. Default mode: delta * |g_k|^2 added to every G_kk (None: 0 where the
            module's cosine matrix has smallest eigenvalue >= 1e-10, i.e. exact UPGrad; else the
            smallest of 1e-12, 1e-11, ..., 1e-4 that keeps it positive definite; see docs/methods.md).
            With compat="torchjd": added to G / tr G (torchjd default 1e-4).
        norm_eps: compat="torchjd" only: G / tr G is replaced by zeros when tr G < norm_eps (default 1e-4).
        compat: None (scale-invariant per module) or "torchjd" (torchjd's absolute thresholds).
        solver: "auto" | "pivot" | "enumerate" (see ``_qp``).
        max_pivots: cap of the pivoting solver (default 2^T for T <= 8, else 4 T).
    """

    name = "upgrad"

    def __init__(self, pref_vector: Any = None, *, reg_eps: Optional[float] = None, norm_eps: Optional[float] = None,
                 compat: Optional[str] = None, solver: str = "auto", max_pivots: Optional[int] = None) -> None:
        super().__init__()
        setup_projection(self, pref_vector, reg_eps, norm_eps, compat, solver, max_pivots)

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        u = pref_weights(self.name, self.pref_vector, present, "mean")
        U = torch.diag_embed(u)  # one projection problem per task
        V = project_dual_cone(gram, present, U, compat=self.compat, norm_eps=self.norm_eps, reg_eps=self.reg_eps,
                              solver=self.solver, max_pivots=self.max_pivots, info=info)
        return V.sum(dim=1)


def setup_projection(obj: Weighting, pref_vector: Any, reg_eps: Any, norm_eps: Any, compat: Any, solver: Any,
                     max_pivots: Any) -> None:
    """Validate and store the options shared by UPGrad and DualProj."""
    name = obj.name
    obj.compat = check_choice(name, "compat", compat, COMPAT_CHOICES)
    obj.pref_vector = None if pref_vector is None else check_vector(name, "pref_vector", pref_vector)
    if obj.compat == "torchjd":
        obj.norm_eps = 1e-4 if norm_eps is None else check_float(name, "norm_eps", norm_eps, minimum=0.0)
        obj.reg_eps = 1e-4 if reg_eps is None else check_float(name, "reg_eps", reg_eps, minimum=0.0)
    else:
        if norm_eps is not None:
            from .._errors import MGSInputError

            raise MGSInputError(f"{name}: norm_eps only applies with compat='torchjd' (the default mode has no "
                                "absolute threshold)")
        obj.norm_eps = 0.0
        obj.reg_eps = None if reg_eps is None else check_float(name, "reg_eps", reg_eps, minimum=0.0)
    obj.solver = check_choice(name, "solver", solver, ("auto", "pivot", "enumerate"))
    obj.max_pivots = None if max_pivots is None else check_int(name, "max_pivots", max_pivots, minimum=1)
    obj._repr_options = {k: v for k, v in dict(
        pref_vector=None if obj.pref_vector is None else obj.pref_vector.tolist(), reg_eps=obj.reg_eps,
        norm_eps=obj.norm_eps if obj.compat else None, compat=obj.compat, solver=solver,
        max_pivots=obj.max_pivots).items() if v is not None}
