"""``dualproj``: the preference-weighted mean projected onto the dual cone of the task gradients
(Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", 2017, Eq. 11; torchjd's
``DualProj``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._common import pref_weights
from ._projection import project_dual_cone
from .base import State, Weighting, register
from .upgrad import setup_projection


@register
class DualProjWeighting(Weighting):
    """W = argmin v^T G v s.t. v >= u (u = preference weights, default 1/n on the present tasks).

    Options: as for ``upgrad`` (pref_vector, reg_eps, norm_eps, compat, solver, max_pivots).
    """

    name = "dualproj"

    def __init__(self, pref_vector: Any = None, *, reg_eps: Optional[float] = None, norm_eps: Optional[float] = None,
                 compat: Optional[str] = None, solver: str = "auto", max_pivots: Optional[int] = None) -> None:
        super().__init__()
        setup_projection(self, pref_vector, reg_eps, norm_eps, compat, solver, max_pivots)

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        u = pref_weights(self.name, self.pref_vector, present, "mean")
        V = project_dual_cone(gram, present, u[:, None, :], compat=self.compat, norm_eps=self.norm_eps,
                              reg_eps=self.reg_eps, solver=self.solver, max_pivots=self.max_pivots, info=info)
        return V[:, 0]
