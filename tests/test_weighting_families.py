"""Gram families for the weighting tests, the per-module oracle harness, and checks of the families.

A family draws per-module task Jacobians J [M, T, n] (the Gram is J J^T): Gaussian, conflicting,
rank-deficient, nearly rank-deficient, parallel, a zero row, fewer dimensions than tasks (n_m < T) and
heterogeneous task norms. ``oracle`` applies a single-matrix reference (torchjd) to every module's
Gram restricted to its present tasks and scatters the result back, which is the "left out of the
problem" semantics every method follows.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import pytest
import torch

FAMILIES = ("gaussian", "conflicting", "rank_deficient", "nearly_rank_deficient", "parallel", "zero_row",
            "few_dims", "heterogeneous")
TASK_COUNTS = tuple(range(1, 9))


def jacobians(family: str, M: int, T: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[M, T, n] task Jacobians of ``family`` (drawn in float64, then cast)."""
    f64 = torch.float64
    n = 2 * T + 3
    if family == "gaussian":
        J = torch.randn(M, T, n, generator=gen, dtype=f64)
    elif family == "conflicting":
        J = torch.randn(M, T, n, generator=gen, dtype=f64)
        for a in range(0, T - 1, 2):  # pairs of strongly opposed tasks
            J[:, a + 1] = -0.9 * J[:, a] + 0.3 * J[:, a + 1]
    elif family in ("rank_deficient", "nearly_rank_deficient"):
        r = max(1, T - 2)
        J = torch.randn(M, T, r, generator=gen, dtype=f64) @ torch.randn(M, r, n, generator=gen, dtype=f64)
        if family == "nearly_rank_deficient":
            J = J + 1e-3 * torch.randn(M, T, n, generator=gen, dtype=f64)
    elif family == "parallel":
        v = torch.randn(M, 1, n, generator=gen, dtype=f64)
        c = 0.5 + 1.5 * torch.rand(M, T, 1, generator=gen, dtype=f64)
        J = c * v
    elif family == "zero_row":
        J = torch.randn(M, T, n, generator=gen, dtype=f64)
        J[:, T // 2] = 0.0
    elif family == "few_dims":
        J = torch.randn(M, T, max(1, T - 2), generator=gen, dtype=f64)
    elif family == "heterogeneous":
        J = torch.randn(M, T, n, generator=gen, dtype=f64)
        J = J * torch.pow(10.0, 3.0 * torch.rand(M, T, 1, generator=gen, dtype=f64) - 1.5)
    else:
        raise ValueError(family)
    return J.to(dtype)


def gram_of(J: torch.Tensor) -> torch.Tensor:
    """J J^T in J's dtype (a float32 J gives a float32 Gram, as segmented_gram does), exactly symmetric
    (as segmented_gram's are; a batched matmul may round G[i, j] and G[j, i] differently)."""
    G = J @ J.transpose(-1, -2)
    return torch.triu(G) + torch.triu(G, diagonal=1).transpose(-1, -2)


def present_of(G: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(G, dim1=-2, dim2=-1) > 0


def oracle(G: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]],
           normalize: bool = False) -> torch.Tensor:
    """[M, T] float64: ``fn(G_sub, m)`` for every module's Gram restricted to its present tasks
    (divided by its trace when ``normalize``), scattered back with 0 for absent tasks. ``fn`` may
    return None (no reference for that module): the row is NaN."""
    M, T, _ = G.shape
    out = torch.zeros(M, T, dtype=torch.float64)
    G = G.double().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in range(M):
            p = present_of(G[m])
            if not bool(p.any()):
                continue
            sub = G[m][p][:, p]
            if normalize:
                sub = sub / torch.diagonal(sub).sum()
            w = fn(sub, m)
            if w is None:
                out[m] = float("nan")
            else:
                out[m, p] = w.double()
    return out


def direction(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """J^T w per module: [M, n] float64."""
    return (w.double()[:, None, :] @ J.double()).squeeze(1)


def rel_rows(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> torch.Tensor:
    """Per row max|a - b| / max|b|: [M]."""
    a, b = a.double(), b.double()
    return (a - b).abs().amax(dim=1) / b.abs().amax(dim=1).clamp_min(floor)


def rel_norm_rows(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per row |a - b| / max(|b|, scale)."""
    return (a - b).norm(dim=1) / torch.maximum(b.norm(dim=1), scale).clamp_min(1e-300)


def generator(rng) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(1 << 62))


# ----------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", TASK_COUNTS)
def test_family_shapes_and_ranks(rng, family, T):
    J = jacobians(family, 7, T, generator(rng))
    G = gram_of(J)
    assert G.shape == (7, T, T)
    assert torch.isfinite(G).all()
    rank = torch.linalg.matrix_rank(G, hermitian=True, rtol=1e-10)
    if family == "parallel":
        assert (rank == 1).all()
    if family == "rank_deficient" and T >= 3:
        assert (rank == T - 2).all()
    if family == "few_dims":
        assert (rank <= max(1, T - 2)).all()
    if family == "zero_row":
        assert not present_of(G)[:, T // 2].any()
    if family in ("gaussian", "heterogeneous", "conflicting", "nearly_rank_deficient"):
        assert (rank == T).all()


def test_oracle_scatters_present_tasks():
    G = torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64))[None]
    out = oracle(G, lambda sub, m: torch.arange(1, sub.shape[0] + 1, dtype=torch.float64))
    assert out.tolist() == [[1.0, 0.0, 2.0]]
