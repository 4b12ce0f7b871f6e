"""Batched symmetric eigen-decomposition by cyclic Jacobi rotations, for the small [M, T, T] Grams.

``torch.linalg.eigh`` synchronises with the host on CUDA and fails on the all-zero matrices that empty
modules produce; Jacobi needs neither: fixed sweeps of plane rotations, batched over modules, with
the classical quadratic convergence. Every round rotates T/2 disjoint index pairs at once (the
round-robin "circle" schedule): the matrix is permuted so the pairs are adjacent and each rotation
is a few elementwise operations on a [M, T/2, 2, T] view. A module whose off-diagonal part is below
rounding is frozen (identity rotations), so stopping early on the CPU gives bitwise the same result
as running every sweep.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch

from ._common import all_done


@lru_cache(maxsize=None)
def _schedule(n: int) -> Tuple[Tuple[List[int], ...], List[int]]:
    """The arrangement every sweep starts and ends in (arrangement[pos] = original index), and per
    round the gather index from the previous arrangement to the one with that round's pairs adjacent.
    n is even."""
    players = list(range(n))
    arrangements = []
    for _ in range(n - 1):
        pairs = [(players[i], players[n - 1 - i]) for i in range(n // 2)]
        arrangements.append([x for p in pairs for x in (min(p), max(p))])
        players = [players[0]] + [players[-1]] + players[1:-1]
    rels = []
    cur = arrangements[-1]  # a sweep starts where the previous one ended
    for new in arrangements:
        where = {o: i for i, o in enumerate(cur)}
        rels.append([where[o] for o in new])
        cur = new
    return tuple(rels), cur


def sym_eig(
    A: torch.Tensor,
    *,
    max_sweeps: int = 10,
    rtol: float = 1e-15,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric matrices.

    Args:
        A: [B, T, T] float64 symmetric (only approximately is fine; it is symmetrised).
        max_sweeps: sweeps of all T(T-1)/2 pairs.
        rtol: a matrix is done when its off-diagonal Frobenius norm is below ``rtol * |A|_F``.

    Returns:
        eigenvalues [B, T] (unordered), eigenvectors [B, T, T] (columns, same order),
        converged bool [B]. ``A = V diag(lam) V^T``.
    """
    B, T, _ = A.shape
    dev, dt = A.device, A.dtype
    if T == 1:
        return A[:, :, 0].clone(), torch.ones_like(A), torch.ones(B, dtype=torch.bool, device=dev)
    n = T + (T % 2)
    h = n // 2
    a = 0.5 * (A + A.transpose(-1, -2))
    if n != T:  # odd T: a dummy index, never coupled to the others (its off-diagonal stays 0)
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    # Batch-last layout [n, n, B]: every (i, j) entry is a contiguous vector over the batch, and a
    # permutation of rows and columns is one index_select on the flattened [n * n, B] view.
    a = a.permute(1, 2, 0).reshape(n * n, B)
    rels, final = _schedule(n)
    start = torch.tensor(final, dtype=torch.long, device=dev)
    a = a.index_select(0, _flat(start, n)).view(n, n, B)
    # vt[j] is eigenvector column j (in the current arrangement), over the original rows.
    vt = torch.eye(n, dtype=dt, device=dev).index_select(0, start)[:, :, None].expand(n, n, B).contiguous()
    round_idx = []
    for r in rels:
        rt = torch.tensor(r, dtype=torch.long, device=dev)
        round_idx.append((_flat(rt, n), rt))
    blk_idx = torch.tensor([2 * k * n + 2 * k for k in range(h)] + [(2 * k + 1) * n + 2 * k + 1 for k in range(h)]
                           + [2 * k * n + 2 * k + 1 for k in range(h)], dtype=torch.long, device=dev)
    offmask = (1.0 - torch.eye(n, dtype=dt, device=dev))[:, :, None]
    scale2 = (a * a).sum(dim=(0, 1)) * (rtol * rtol)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_sweeps):
        done = ((a * a * offmask).sum(dim=(0, 1)) <= scale2) | done
        if all_done(done):
            break
        for flat, rt in round_idx:
            a = a.view(n * n, B).index_select(0, flat).view(n, n, B)
            vt = vt.index_select(0, rt)
            app, aqq, apq = a.view(n * n, B).index_select(0, blk_idx).view(3, h, B).unbind(0)
            # Symmetric Schur 2x2 (Golub & Van Loan 8.4.1): J = [[c, s], [-s, c]] zeroes a_pq.
            zero = (apq == 0) | done
            apq_safe = torch.where(zero, torch.ones_like(apq), apq)
            tau = (aqq - app) / (2.0 * apq_safe)
            t = torch.where(tau >= 0, 1.0, -1.0) / (tau.abs() + torch.hypot(torch.ones_like(tau), tau))
            c = torch.where(zero, 1.0, torch.rsqrt(1.0 + t * t))
            s = torch.where(zero, 0.0, t * c)
            a = _rotate_rows(a, c, s, h, n, B)  # J^T A
            a = _rotate_cols(a, c, s, h, n, B)  # (J^T A) J
            vt = _rotate_rows(vt, c, s, h, n, B)  # V J (vt holds V's columns as rows)
    done = ((a * a * offmask).sum(dim=(0, 1)) <= scale2) | done
    lam = torch.diagonal(a, dim1=0, dim2=1)  # [B, n]
    v = vt.permute(2, 1, 0)  # [B, rows, cols]
    if n != T:
        keep_pos = torch.tensor([i for i, o in enumerate(final) if o != T], dtype=torch.long, device=dev)
        lam = lam.index_select(1, keep_pos)
        v = v.index_select(2, keep_pos)[:, :T, :]
    return lam.contiguous(), v.contiguous(), done


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    return (idx[:, None] * n + idx[None, :]).reshape(-1)


def _rotate_rows(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, h: int, n: int, B: int) -> torch.Tensor:
    """Rows (2k, 2k+1) of x [n, n, B] <- [[c, -s], [s, c]] applied to them, per pair k."""
    r = x.view(h, 2, n, B)
    r0, r1 = r[:, 0], r[:, 1]
    cr, sr = c[:, None, :], s[:, None, :]
    out = torch.empty_like(r)
    torch.mul(r0, cr, out=out[:, 0])
    out[:, 0].addcmul_(r1, sr, value=-1.0)
    torch.mul(r0, sr, out=out[:, 1])
    out[:, 1].addcmul_(r1, cr)
    return out.view(n, n, B)


def _rotate_cols(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, h: int, n: int, B: int) -> torch.Tensor:
    """Columns (2k, 2k+1) of x [n, n, B] <- columns times [[c, s], [-s, c]], per pair k."""
    r = x.view(n, h, 2, B)
    r0, r1 = r[:, :, 0], r[:, :, 1]
    out = torch.empty_like(r)
    torch.mul(r0, c, out=out[:, :, 0])
    out[:, :, 0].addcmul_(r1, s, value=-1.0)
    torch.mul(r0, s, out=out[:, :, 1])
    out[:, :, 1].addcmul_(r1, c)
    return out.view(n, n, B)
