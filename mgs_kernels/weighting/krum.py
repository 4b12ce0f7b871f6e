"""``krum``: (Multi-)Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017; torchjd's ``Krum``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .._errors import MGSInputError
from ._common import check_int, mean_weights
from .base import State, Weighting, register


@register
class KrumWeighting(Weighting):
    """Score each task by the sum of its distances to its n - f - 2 nearest other tasks (f =
    n_byzantine, n present tasks); W = 1 / n_selected on the n_selected lowest scores. Distances come
    from the Gram: |g_i - g_j|^2 = G_ii + G_jj - 2 G_ij. Scale-invariant.

    Tasks with no gradient in the module are left out. A module with fewer than f + 3 present tasks
    (where Krum is undefined) gets the mean of its present tasks; one with fewer than n_selected
    present tasks selects them all. Ties in the scores go to the lower task index.

    Options:
        n_byzantine: f >= 0 (required); T >= f + 3 is checked against the Gram.
        n_selected: >= 1 (default 1); T >= n_selected is checked.
    """

    name = "krum"

    def __init__(self, n_byzantine: Optional[int] = None, n_selected: int = 1) -> None:
        super().__init__()
        if n_byzantine is None:
            raise MGSInputError("krum: the option n_byzantine (number of adversarial tasks) is required, as in torchjd")
        self.n_byzantine = check_int(self.name, "n_byzantine", n_byzantine, minimum=0)
        self.n_selected = check_int(self.name, "n_selected", n_selected, minimum=1)
        self._repr_options = {"n_byzantine": self.n_byzantine, "n_selected": self.n_selected}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        M, T, _ = gram.shape
        if T < self.n_byzantine + 3:
            raise MGSInputError(f"krum: needs T >= n_byzantine + 3 = {self.n_byzantine + 3} tasks, got T = {T}")
        if T < self.n_selected:
            raise MGSInputError(f"krum: needs T >= n_selected = {self.n_selected} tasks, got T = {T}")
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        dist = (diag[:, :, None] + diag[:, None, :] - 2.0 * gram).clamp_min(0.0).sqrt()
        inf = torch.full_like(dist, float("inf"))
        pair = present[:, :, None] & present[:, None, :]
        dist = torch.where(pair, dist, inf)
        n = present.sum(dim=1)  # [M]
        n_closest = n - self.n_byzantine - 2
        srt = dist.sort(dim=2).values  # position 0: the task itself (distance 0)
        pos = torch.arange(T, device=gram.device)
        take = (pos[None, None, :] >= 1) & (pos[None, None, :] <= n_closest[:, None, None])
        scores = torch.where(take, srt, torch.zeros_like(srt)).sum(dim=2)
        scores = torch.where(present, scores, torch.full_like(scores, float("inf")))
        rank = scores.argsort(dim=1, stable=True).argsort(dim=1)
        k = torch.minimum(n, torch.full_like(n, self.n_selected))
        chosen = (rank < k[:, None]) & present
        w = chosen.to(gram.dtype) / k.clamp_min(1).to(gram.dtype)[:, None]
        return torch.where((n_closest >= 1)[:, None], w, mean_weights(present))
