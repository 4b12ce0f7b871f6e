"""``aligned_mtl``: Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
Learning", CVPR 2023, Alg. 1; torchjd's ``AlignedMTL``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._common import check_choice, check_vector, pref_weights, trace_normalize
from ._native_solvers import native_solver, outputs, threads
from ._spectral import apply_spectral, eig_with_rank
from .base import State, Weighting, register


@register
class AlignedMTLWeighting(Weighting):
    """W = B u with the balance transformation B = sqrt(scale) V_r Lambda_r^-1/2 V_r^T (the rank-r part
    of G's eigen-decomposition; eigenvalues kept above T * eps(input dtype) * the largest), u the
    preference weights (default 1/n on the present tasks) and scale the smallest kept eigenvalue
    ("min"), their lower median ("median", as torch.median) or their mean ("rmse"). B = I when no
    eigenvalue is kept. Scale-invariant (all thresholds are relative).

    Options:
        pref_vector: [T] preference weights.
        scale_mode: "min" (default) | "median" | "rmse".
    """

    name = "aligned_mtl"
    needs_input_eps = True

    def __init__(self, pref_vector: Any = None, scale_mode: str = "min") -> None:
        super().__init__()
        self.pref_vector = None if pref_vector is None else check_vector(self.name, "pref_vector", pref_vector)
        self.scale_mode = check_choice(self.name, "scale_mode", scale_mode, ("min", "median", "rmse"))
        self._repr_options = {"scale_mode": self.scale_mode}
        if self.pref_vector is not None:
            self._repr_options["pref_vector"] = self.pref_vector.tolist()

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor],
                input_eps: float = 2.0 ** -52) -> torch.Tensor:
        u = pref_weights(self.name, self.pref_vector, present, "mean")
        mod = native_solver(gram, "aligned_mtl")
        if mod is not None:  # the same computation, one module per thread (csrc/cpu/weighting_aligned_mtl.cpp)
            g, uc = gram.to(torch.float64).contiguous(), u.to(torch.float64).contiguous()
            M, T, _ = g.shape
            w, conv, rank = outputs(M, T, g.device)
            mod.aligned_mtl(g.data_ptr(), uc.data_ptr(), M, T, ("min", "median", "rmse").index(self.scale_mode),
                            input_eps, w.data_ptr(), conv.data_ptr(), rank.data_ptr(), threads())
            info["converged"] = conv
            info["rank"] = rank
            return w
        gn, _ = trace_normalize(gram)
        lam, V, kept = eig_with_rank(gn, input_eps, info, absolute=False)
        r = kept.sum(dim=1)
        one = torch.ones_like(lam)
        if self.scale_mode == "rmse":
            scale = (lam * kept).sum(dim=1) / r.clamp_min(1).to(lam.dtype)
        else:
            vals = torch.where(kept, lam, torch.full_like(lam, float("inf"))).sort(dim=1).values
            pos = torch.zeros_like(r) if self.scale_mode == "min" else ((r - 1).clamp_min(0) // 2)
            scale = vals.gather(1, pos[:, None]).squeeze(1)
        scale = torch.where(r > 0, scale, torch.ones_like(scale))
        coef = torch.where(kept, torch.rsqrt(torch.where(kept, lam, one)), torch.zeros_like(lam))
        alpha = scale.sqrt()[:, None] * apply_spectral(lam, V, coef, u)
        return torch.where((r > 0)[:, None], alpha, u)
