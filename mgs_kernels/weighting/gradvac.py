"""``gradvac``: Gradient Vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021; torchjd's ``GradVac``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..order import random_order
from .base import State, Weighting, register
from ._common import check_float
from .nash_mtl import check_state


def draw_order(num_modules: int, num_tasks: int, generator: Optional[torch.Generator],
               device: torch.device) -> torch.Tensor:
    """The visit order int64 [M, T, T-1]: per module and task, a uniform permutation of the others
    (``mgs_kernels.random_order``, the same draws as PCGrad's random order)."""
    return random_order(num_modules, num_tasks, generator=generator, device=device)


@register
class GradVacWeighting(Weighting):
    """For every task i, the other tasks j in a random order: with phi the cosine between the current
    (already corrected) g_i and the original g_j and phi_hat an EMA target per (i, j), when
    phi < phi_hat add

        w = |g_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2) + eps)

    times g_j to g_i (which raises the cosine to phi_hat); then phi_hat <- (1 - beta) phi_hat + beta phi.
    W = sum of the corrected tasks' coefficients. Batched over modules and tasks i (the pairs of one
    task are sequential).

    State (per module): "phi" float64 [M, T, T], the EMA targets (start at 0). Pairs involving a task
    with no gradient in the module are skipped and their target left as it was (torchjd would add a
    huge multiple, |g_i| phi_hat / eps, of the zero vector and move the target towards 0).
    ``eps`` is absolute (as in torchjd), so the method is not scale-invariant for tiny modules.

    Options:
        beta: EMA rate in [0, 1] (default 0.5).
        eps: added to the denominators (default 1e-8).
    """

    name = "gradvac"
    scale_invariant = False
    stateful = True
    needs_generator = True

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = check_float(self.name, "beta", beta, minimum=0.0, maximum=1.0)
        self.eps = check_float(self.name, "eps", eps, minimum=0.0)
        self._repr_options = {"beta": self.beta, "eps": self.eps}

    def init_state(self, num_modules: int, num_tasks: int, device: torch.device) -> State:
        return {"phi": torch.zeros(num_modules, num_tasks, num_tasks, dtype=torch.float64, device=device)}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        M, T, _ = gram.shape
        check_state(self.name, state, {"phi": (M, T, T)}, gram.device)
        order = draw_order(M, T, generator, gram.device)
        phi = state["phi"]
        G = gram
        beta, eps = self.beta, self.eps
        coef = torch.eye(T, dtype=G.dtype, device=G.device).expand(M, T, T).clone()  # row i: g_i^PC
        cg = G.clone()  # cg[m, i, :] = g_i^PC . g_k for every k
        norm = torch.diagonal(G, dim1=1, dim2=2).clamp_min(0.0).sqrt()
        zero = torch.zeros((), dtype=G.dtype, device=G.device)
        for k in range(T - 1):
            j = order[:, :, k]  # [M, T]: task i's k-th partner
            jj = j[:, :, None]
            dot = cg.gather(2, jj).squeeze(2)
            norm_i = (cg * coef).sum(dim=2).clamp_min(0.0).sqrt()
            norm_j = norm.gather(1, j)
            phi_ij = dot / (norm_i * norm_j + eps)
            phi_hat = phi.gather(2, jj).squeeze(2)
            pair = present & present.gather(1, j)
            fix = pair & (phi_ij < phi_hat)
            s1 = (1.0 - phi_ij * phi_ij).clamp_min(0.0).sqrt()
            s2 = (1.0 - phi_hat * phi_hat).clamp_min(0.0).sqrt()
            w = norm_i * (phi_hat * s1 - phi_ij * s2) / (norm_j * s2 + eps)
            w = torch.where(fix, w, zero)
            coef.scatter_add_(2, jj, w[:, :, None])
            cg = cg + w[:, :, None] * G.gather(1, jj.expand(M, T, T))
            phi.scatter_(2, jj, torch.where(pair, (1.0 - beta) * phi_hat + beta * phi_ij, phi_hat)[:, :, None])
        return coef.sum(dim=1)
