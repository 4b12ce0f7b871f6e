"""Functions of a symmetric matrix through its batched Jacobi eigen-decomposition (``_eig``)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ._eig import sym_eig


def eig_with_rank(A: torch.Tensor, input_eps: float, info: Dict[str, torch.Tensor], *,
                  absolute: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues [B, T], eigenvectors [B, T, T], kept [B, T]) of symmetric A.

    An eigenvalue is kept when it exceeds ``T * input_eps * max`` (torch.linalg.pinv's default relative
    cut-off on singular values, for the precision the Gram was computed in): with ``absolute`` its
    magnitude against the largest magnitude (pinv), else its signed value against the largest
    (torchjd's Aligned-MTL). Adds info["converged"] (the Jacobi sweeps) and info["rank"].
    """
    T = A.shape[-1]
    lam, V, conv = sym_eig(A)
    if absolute:
        mag = lam.abs()
        kept = mag > (T * input_eps) * mag.amax(dim=-1, keepdim=True)
    else:
        kept = lam > (T * input_eps) * lam.amax(dim=-1, keepdim=True)
    info["converged"] = conv
    info["rank"] = kept.sum(dim=-1)
    return lam, V, kept


def apply_spectral(lam: torch.Tensor, V: torch.Tensor, coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """V diag(coef) V^T x per module: [B, T]."""
    y = (V * x[:, :, None]).sum(dim=1)  # V^T x
    return (V * (coef * y)[:, None, :]).sum(dim=2)


def safe_inv(lam: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(kept, 1.0 / torch.where(kept, lam, torch.ones_like(lam)), torch.zeros_like(lam))
