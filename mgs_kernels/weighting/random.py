"""``random``: Random Loss Weighting (RLW, Lin et al. 2022; torchjd's ``Random``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import State, Weighting, register


@register
class RandomWeighting(Weighting):
    """W[m] = softmax of i.i.d. standard normals over the tasks present in module m, drawn afresh
    for every module at every call.

    Every call draws exactly M x T normals from ``generator`` (on the generator's device, then moved
    to the Gram's; without a generator, from the default generator of the Gram's device), whatever the
    present mask, so the random stream does not depend on the data.
    """

    name = "random"
    scale_invariant = True
    needs_generator = True

    def __init__(self) -> None:
        super().__init__()

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        M, T, _ = gram.shape
        dev = generator.device if generator is not None else gram.device
        z = torch.randn(M, T, generator=generator, device=dev, dtype=torch.float64).to(gram.device)
        z = torch.where(present, z, torch.full_like(z, float("-inf")))
        w = torch.softmax(z, dim=1)
        return torch.where(present, w, torch.zeros_like(w))  # an empty module: softmax of -inf is NaN
