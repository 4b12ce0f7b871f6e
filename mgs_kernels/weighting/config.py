"""``config``: ConFIG, Conflict-Free Inverse Gradients (Liu et al., ICLR 2025, Eq. 2; torchjd's ``ConFIG``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._common import check_vector, cosine, matvec, pref_weights, quad, trace_normalize
from ._native_solvers import inputs, native_solver, outputs, threads
from ._spectral import pinv_solve
from .base import State, Weighting, register


@register
class ConFIGWeighting(Weighting):
    """The direction whose cosines with the tasks' unit vectors are proportional to the preference
    weights p (default 1 on the present tasks), scaled so that its length is the sum of the tasks'
    projections on it. In Gram space, with C the cosine matrix and D = diag |g_k|:

        a = D^-1 C^+ p,   W = (1^T G a / max(a^T G a, 1e-24)) a

    (a^T G a is scale-free; the floor is torchjd's F.normalize eps, squared: a direction numerically 0,
    where p is orthogonal to the range of C, gives ~0.)

    C^+ keeps the eigenvalues of C above T * eps(input dtype) * the largest. (torchjd takes the pseudo-
    inverse of the [T, N] matrix of unit gradients, whose singular-value cut-off max(T, N) eps sigma_max
    is below what a Gram resolves; the two agree except for eigenvalues of C within rounding of 0.)
    Scale-invariant. A task with no gradient has a zero unit vector in torchjd too: it is ignored.

    Options:
        pref_vector: [T] preference weights.
    """

    name = "config"
    needs_input_eps = True

    def __init__(self, pref_vector: Any = None) -> None:
        super().__init__()
        self.pref_vector = None if pref_vector is None else check_vector(self.name, "pref_vector", pref_vector)
        self._repr_options = {} if self.pref_vector is None else {"pref_vector": self.pref_vector.tolist()}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor],
                input_eps: float = 2.0 ** -52) -> torch.Tensor:
        pw = pref_weights(self.name, self.pref_vector, present, "ones")
        mod = native_solver(gram, "config")
        if mod is not None:  # the same computation, one module per thread (csrc/cpu/weighting_spectral.cpp)
            g, p = inputs(gram, present)
            pc = pw.to(torch.float64).contiguous()
            M, T, _ = g.shape
            w, conv, rank = outputs(M, T, g.device)
            mod.config(g.data_ptr(), p.data_ptr(), pc.data_ptr(), M, T, input_eps, w.data_ptr(), conv.data_ptr(),
                       rank.data_ptr(), threads())
            info["converged"] = conv
            info["rank"] = rank
            return w
        gn, _ = trace_normalize(gram)
        c, d = cosine(gn, present, absent_diag=0.0)
        a = pinv_solve(c, pw, present, input_eps, info) / d
        ones = present.to(gn.dtype)
        # |J^T a|^2 = (C^+ p)^T C (C^+ p) does not depend on the scale of G; as torchjd's
        # F.normalize(eps=1e-12), a direction shorter than 1e-12 is not normalised (the result is ~0).
        aga = quad(gn, a).clamp_min(1e-24)
        num = (matvec(gn, a) * ones).sum(dim=1)
        return (num / aga)[:, None] * a
