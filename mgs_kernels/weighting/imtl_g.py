"""``imtl_g``: the gradient part of Impartial Multi-Task Learning (Liu et al., ICLR 2021), in the
generalisation of Quinton & Rey 2024 that allows linearly dependent gradients (torchjd's ``IMTLG``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._common import COMPAT_CHOICES, check_choice, trace_normalize
from ._native_solvers import inputs, native_solver, outputs, threads
from ._spectral import pinv_solve
from .base import State, Weighting, register


@register
class IMTLGWeighting(Weighting):
    """W = v / sum(v) with v = G^+ sqrt(diag G): the combination whose projections on every task's
    unit vector are equal. 0 when |sum(v)| < 1e-12.

    G^+ keeps the eigenvalues above T * eps(input dtype) * the largest, as torch.linalg.pinv does.
    Default: the 1e-12 test is on G / tr G (scale-invariant); compat="torchjd": on G itself.
    A task with no gradient in the module gets weight 0 (also in torchjd).

    Options:
        compat: None or "torchjd".
    """

    name = "imtl_g"
    needs_input_eps = True

    def __init__(self, *, compat: Optional[str] = None) -> None:
        super().__init__()
        self.compat = check_choice(self.name, "compat", compat, COMPAT_CHOICES)
        self._repr_options = {"compat": self.compat} if self.compat else {}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor],
                input_eps: float = 2.0 ** -52) -> torch.Tensor:
        mod = native_solver(gram, "imtl_g")
        if mod is not None:  # the same computation, one module per thread (csrc/cpu/weighting_spectral.cpp)
            g, p = inputs(gram, present)
            M, T, _ = g.shape
            w, conv, rank = outputs(M, T, g.device)
            mod.imtl_g(g.data_ptr(), p.data_ptr(), M, T, self.compat == "torchjd", input_eps, w.data_ptr(),
                       conv.data_ptr(), rank.data_ptr(), threads())
            info["converged"] = conv
            info["rank"] = rank
            return w
        gn, tr = trace_normalize(gram)
        d = torch.diagonal(gn, dim1=1, dim2=2).clamp_min(0.0).sqrt()
        v = pinv_solve(gn, d, present, input_eps, info)
        v_sum = v.sum(dim=1)
        # On G itself v is v(G / tr G) / sqrt(tr G).
        test = v_sum.abs() if self.compat is None else v_sum.abs() / tr.clamp_min(1e-300).sqrt()
        ok = test >= 1e-12
        w = v / torch.where(ok, v_sum, torch.ones_like(v_sum))[:, None]
        return torch.where(ok[:, None], w, torch.zeros_like(w))
