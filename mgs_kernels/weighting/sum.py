"""``sum``: every present task with weight 1 (plain gradient summation, torchjd's ``Sum``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import State, Weighting, register


@register
class SumWeighting(Weighting):
    """W[m, k] = 1 for every task k present in module m (0 for a task with no gradient there)."""

    name = "sum"

    def __init__(self) -> None:
        super().__init__()

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        return present.to(torch.float64)
