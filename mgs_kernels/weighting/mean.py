"""``mean``: the average of the tasks present in a module (torchjd's ``Mean``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._common import mean_weights
from .base import State, Weighting, register


@register
class MeanWeighting(Weighting):
    """W[m, k] = 1 / n_m on the n_m tasks present in module m.

    A task with no gradient in a module is left out of that module's average (the module is averaged
    as if T were n_m), unlike torchjd's global ``Mean`` whose 1/T counts it.
    """

    name = "mean"

    def __init__(self) -> None:
        super().__init__()

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_weights(present)
