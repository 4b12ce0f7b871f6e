"""``constant``: fixed, user-given task weights (torchjd's ``Constant``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._common import check_vector, vector_for
from .base import State, Weighting, register


@register
class ConstantWeighting(Weighting):
    """W[m, k] = weights[k] for the tasks present in module m (0 for the others; not renormalised).

    Options:
        weights: 1-D sequence or tensor of T finite numbers (required).
    """

    name = "constant"

    def __init__(self, weights: Any = None) -> None:
        super().__init__()
        if weights is None:
            from .._errors import MGSInputError

            raise MGSInputError("constant: the option weights (one number per task) is required")
        self.weights = check_vector(self.name, "weights", weights)
        self._repr_options = {"weights": self.weights.tolist()}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        w = vector_for(self.name, "weights", self.weights, gram.shape[1], gram)
        return w[None, :] * present.to(torch.float64)
