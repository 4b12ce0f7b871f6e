"""Functions of a symmetric matrix through its batched Jacobi eigen-decomposition (``_eig``)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ._common import host_shortcuts
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


def pinv_solve(A: torch.Tensor, x: torch.Tensor, present: torch.Tensor, input_eps: float,
               info: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A^+ x per module, with ``eig_with_rank``'s cut-off (T * input_eps * the largest |eigenvalue|).

    A [B, T, T] is symmetric positive semi-definite with the rows and columns of absent tasks zero, and
    x is zero there. Where ``A - 4 T input_eps tr(A) I`` (absent tasks isolated) passes a Cholesky
    test, every eigenvalue is above the cut-off, A^+ = A^-1 on the present tasks, and one Cholesky
    solve gives it; on the CPU only the other modules (rank-deficient or close) go through Jacobi,
    on a GPU every module does (no host sync). Adds info["converged"] and info["rank"].
    """
    B, T, _ = A.shape
    p = present.to(A.dtype)
    top = torch.diagonal(A, dim1=1, dim2=2).amax(dim=1).clamp_min(1e-300)
    iso = A + torch.diag_embed((1.0 - p) * top[:, None])
    tr = torch.diagonal(A, dim1=1, dim2=2).sum(dim=1)
    eye = torch.eye(T, dtype=A.dtype, device=A.device)
    _, st = torch.linalg.cholesky_ex(iso - (4 * T * input_eps * tr)[:, None, None] * eye)
    fast = (st == 0) & (tr > 0)
    if not host_shortcuts(A) or T == 1:
        lam, V, kept = eig_with_rank(A, input_eps, info)
        return apply_spectral(lam, V, safe_inv(lam, kept), x)
    out = torch.zeros_like(x)
    conv = torch.ones(B, dtype=torch.bool, device=A.device)
    rank = present.sum(dim=1)
    f_idx = fast.nonzero().squeeze(1)
    if f_idx.numel():
        chol, _ = torch.linalg.cholesky_ex(iso.index_select(0, f_idx))
        out.index_copy_(0, f_idx, torch.cholesky_solve(x.index_select(0, f_idx)[:, :, None], chol).squeeze(-1))
    s_idx = (~fast).nonzero().squeeze(1)
    if s_idx.numel():
        sub: Dict[str, torch.Tensor] = {}
        lam, V, kept = eig_with_rank(A.index_select(0, s_idx), input_eps, sub)
        out.index_copy_(0, s_idx, apply_spectral(lam, V, safe_inv(lam, kept), x.index_select(0, s_idx)))
        conv.index_copy_(0, s_idx, sub["converged"])
        rank = rank.index_copy(0, s_idx, sub["rank"])
    info["converged"] = conv
    info["rank"] = rank
    return out * p
