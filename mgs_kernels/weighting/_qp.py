"""Batched solvers for the small linear complementarity problems behind the QP-based methods.

Every quadratic program of UPGrad, DualProj, exact MGDA and CAGrad is brought to the form

    LCP(A, q):  find z >= 0 with  w = A z + q >= 0  and  z^T w = 0,

with A a (regularised) positive definite T x T matrix, i.e. the KKT conditions of
``min 1/2 z^T A z + q^T z  s.t.  z >= 0``. Its solution is unique. Two exact solvers:

- ``lcp_pivot``: Murty's least-index principal pivoting on a T x T tableau, one rank-1 update per pivot,
  batched with a done mask. For a P-matrix it terminates at the exact solution after at most 2^T pivots
  (Murty 1974); in practice after about as many pivots as there are active constraints. Two steps of
  iterative refinement use the inverse of the active block, which the tableau holds. The tableau
  loses about cond(A) digits, so on the CPU ``solve_lcp`` hands the problems whose matrix has an
  eigenvalue below 1e-8 of its largest diagonal entry, and any that fail the KKT check on the
  original data, to enumeration.
- ``lcp_enumerate``: every one of the 2^T candidate active sets at once (batched Cholesky on the
  masked matrices), keeping the candidate with the smallest KKT violation. Fixed cost, no loop: the
  choice on a GPU for T <= 8; on the CPU it costs 2^T factorizations per problem.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import all_done, host_shortcuts

# Regularisations tried by ``auto_regularization``, relative to a unit diagonal, and the shift of
# the Cholesky test of each: no regularisation needs the smallest eigenvalue >= 1e-10 (condition
# number <= ~1e10); a level delta > 0 needs C + delta/2 I positive definite.
_ENUM_FALLBACK_MAX_T = 10

REG_LADDER = (0.0,) + tuple(10.0 ** -k for k in range(12, 3, -1))  # 0, 1e-12, 1e-11, ..., 1e-4
_REG_TEST_SHIFT = (-1e-10,) + tuple(0.5 * d for d in REG_LADDER[1:])


def default_max_pivots(num_tasks: int) -> int:
    """Pivot cap that guarantees exact termination (2^T) for T <= 8, else 4 T."""
    return 2 ** num_tasks if num_tasks <= 8 else 4 * num_tasks


def lcp_pivot(
    A: torch.Tensor,
    q: torch.Tensor,
    *,
    max_pivots: int,
    tol: float = 1e-13,
    compact: Optional[bool] = None,
    start_all: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Murty's least-index principal pivoting, batched.

    Args:
        A: [..., T, T] float64 P-matrix (here: positive definite).
        q: [..., T] float64.
        max_pivots: iteration cap (problems that need more are returned with converged False).
        tol: a component counts as negative below ``-tol * max|q|``.
        compact: pivot only the problems still active, gathered when fewer than half of the
            working set are (default: on the CPU, where finding them costs nothing); otherwise every
            problem runs every iteration with a mask. Both give bitwise the same result.
        start_all: start from the basis with every z_k basic (tableau A^-1, by Cholesky) instead of
            none: fewer pivots when most constraints are inactive at the solution (min-norm points).

    Returns:
        z [..., T] (>= 0), converged bool [...], pivots int64 [...].
    """
    lead, T = q.shape[:-1], q.shape[-1]
    A2 = A.reshape(-1, T, T)
    q2 = q.reshape(-1, T)
    if compact is None:
        compact = host_shortcuts(q)
    if start_all:
        chol, _ = torch.linalg.cholesky_ex(A2)
        tab = torch.cholesky_inverse(chol)
        c = -(tab * q2[:, None, :]).sum(dim=-1)
        z_basic = torch.ones_like(q2, dtype=torch.bool)
    else:
        tab = A2.clone()
        c = q2.clone()
        z_basic = torch.zeros_like(q2, dtype=torch.bool)
    thr = -tol * q2.abs().amax(dim=-1, keepdim=True)
    failed = torch.zeros(q2.shape[0], dtype=torch.bool, device=q.device)
    pivots = torch.zeros(q2.shape[0], dtype=torch.int64, device=q.device)
    eye = torch.eye(T, dtype=q.dtype, device=q.device)
    # Working set: with ``compact``, the problems still pivoting, gathered (and the finished ones written
    # back) whenever fewer than half of the set are active; otherwise all problems, masked.
    ws = None
    w_tab, w_c, w_zb, w_thr, w_failed, w_piv = tab, c, z_basic, thr, failed, pivots
    for _ in range(max_pivots):
        neg = w_c < w_thr
        active = neg.any(dim=-1) & ~w_failed
        if all_done(~active):
            break
        if compact and 2 * int(active.sum()) < active.numel():
            if ws is not None:  # write the working set back, then shrink it
                tab.index_copy_(0, ws, w_tab)
                c.index_copy_(0, ws, w_c)
                z_basic.index_copy_(0, ws, w_zb)
                failed.index_copy_(0, ws, w_failed)
                pivots.index_copy_(0, ws, w_piv)
                keep = ws[active]
            else:  # the full-size state so far (tab and c were updated in place)
                z_basic, failed, pivots = w_zb, w_failed, w_piv
                keep = active.nonzero().squeeze(1)
            ws = keep
            w_tab, w_c, w_zb = tab.index_select(0, ws), c.index_select(0, ws), z_basic.index_select(0, ws)
            w_thr, w_failed, w_piv = thr.index_select(0, ws), failed.index_select(0, ws), pivots.index_select(0, ws)
            neg = neg[active]
            active = active[active]
        act = active.to(q.dtype)[:, None]
        k = torch.argmax(neg.to(torch.int8), dim=-1, keepdim=True)  # least index with c_k < 0
        e = eye[k.squeeze(-1)]  # one-hot
        col = w_tab.gather(-1, k[:, :, None].expand(-1, T, 1)).squeeze(-1)  # A[:, k]
        row = w_tab.gather(-2, k[:, :, None].expand(-1, 1, T)).squeeze(-2)  # A[k, :]
        p = col.gather(-1, k)
        ok = (p > 1e-300) & (act > 0)  # a P-matrix has positive pivots; else the problem stops
        p_safe = torch.where(ok, p, torch.ones_like(p))
        okf = ok.to(q.dtype)
        # Principal pivot on k as one rank-1 update: A' = A - (A[:, k] + e_k)(A[k, :] - e_k)^T / A_kk,
        # c' = c - (A[:, k] + e_k) c_k / A_kk (exchanges z_k and w_k in the basis).
        a = (col + e) * okf
        bv = (row - e) / p_safe
        w_tab.addcmul_(a[:, :, None], bv[:, None, :], value=-1.0)
        w_c.sub_(a * (w_c.gather(-1, k) / p_safe))
        w_zb = w_zb ^ ((e * okf) > 0)
        w_piv = w_piv + ok.squeeze(-1).to(torch.int64)
        w_failed = w_failed | (active & ~ok.squeeze(-1))
    if ws is not None:
        tab.index_copy_(0, ws, w_tab)
        c.index_copy_(0, ws, w_c)
        z_basic.index_copy_(0, ws, w_zb)
        failed.index_copy_(0, ws, w_failed)
        pivots.index_copy_(0, ws, w_piv)
    else:
        tab, c, z_basic, failed, pivots = w_tab, w_c, w_zb, w_failed, w_piv
    converged = ~(c < thr).any(dim=-1) & ~failed
    # Iterative refinement on the final active set F: the tableau's F x F block is A_FF^{-1}, so
    # z_F -= A_FF^{-1} (A z + q)_F (twice: the tableau inverse carries the pivots' rounding).
    fmask = z_basic.to(q.dtype)
    z = torch.where(z_basic, c, torch.zeros_like(c))
    inv_ff = tab * (fmask[:, :, None] * fmask[:, None, :])
    for _ in range(2):
        resid = ((A2 * z[:, None, :]).sum(dim=-1) + q2) * fmask
        z = z - (inv_ff * resid[:, None, :]).sum(dim=-1)
    return z.clamp_min(0.0).reshape(q.shape), converged.reshape(lead), pivots.reshape(lead)


def kkt_ok(A: torch.Tensor, q: torch.Tensor, z: torch.Tensor, rtol: float = 1e-9) -> torch.Tensor:
    """Whether z >= 0 solves LCP(A, q) to ``rtol``: w = A z + q >= 0 and z_i w_i = 0, measured
    against the size of the terms. [...] bool."""
    w = (A * z[..., None, :]).sum(dim=-1) + q
    scale = q.abs().amax(dim=-1) + ((A.abs() * z[..., None, :]).sum(dim=-1)).amax(dim=-1)
    tol = rtol * scale + 1e-300
    compl = (z * w).abs().amax(dim=-1) <= tol * (z.abs().amax(dim=-1) + 1.0)
    return ((w >= -tol[..., None]).all(dim=-1) & compl & torch.isfinite(w).all(dim=-1))


def _subset_masks(T: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(2 ** T, device=device)
    return ((idx[:, None] >> torch.arange(T, device=device)) & 1).bool()  # [S, T]


def lcp_enumerate(A: torch.Tensor, q: torch.Tensor, *, tol: float = 1e-10) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact LCP solution by trying every active set; several right-hand sides share each matrix.

    Args:
        A: [..., T, T] float64 positive definite.
        q: [..., R, T] float64 (R problems per matrix).
        tol: converged when the best candidate's KKT violation is within ``tol * max|q|``.

    Returns:
        z [..., R, T], converged bool [..., R].
    """
    T = A.shape[-1]
    f = _subset_masks(T, A.device)  # [S, T]
    ff = f[:, :, None] & f[:, None, :]
    eye = torch.eye(T, dtype=A.dtype, device=A.device)
    a_sub = torch.where(ff, A[..., None, :, :], eye)  # [..., S, T, T]
    chol, status = torch.linalg.cholesky_ex(a_sub)
    fq = f.to(A.dtype)
    rhs = -(q[..., None, :, :] * fq[:, None, :])  # [..., S, R, T]
    z = torch.cholesky_solve(rhs.transpose(-1, -2), chol).transpose(-1, -2)
    w = (z[..., None, :] * A[..., None, None, :, :]).sum(dim=-1) + q[..., None, :, :]
    viol = torch.maximum((-z * fq[:, None, :]).amax(dim=-1), (-w * (1.0 - fq[:, None, :])).amax(dim=-1))
    viol = viol.clamp_min(0.0)
    viol = torch.where((status == 0)[..., None] & torch.isfinite(viol), viol, torch.full_like(viol, float("inf")))
    best = torch.argmin(viol, dim=-2, keepdim=True)  # [..., 1, R]
    z_best = z.gather(-3, best[..., None].expand(*best.shape, T)).squeeze(-3)
    v_best = viol.gather(-2, best).squeeze(-2)
    scale = q.abs().amax(dim=-1)
    converged = v_best <= tol * scale + 1e-300
    return z_best.clamp_min(0.0), converged


def solve_lcp(
    A: torch.Tensor,
    q: torch.Tensor,
    *,
    solver: str,
    max_pivots: Optional[int] = None,
    start_all: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LCP(A, q) for R right-hand sides per matrix.

    Args:
        A: [B, T, T]; q: [B, R, T].
        solver: "pivot" | "enumerate" | "auto" (enumerate on a GPU for T <= 8, else pivot).
        max_pivots: cap of the pivoting solver (default ``default_max_pivots(T)``).
        start_all: see ``lcp_pivot``.

    Returns:
        z [B, R, T], converged bool [B, R], iterations int64 [B, R] (pivots; 0 for enumeration).
    """
    T = A.shape[-1]
    if solver == "auto":
        solver = "pivot" if (host_shortcuts(A) or T > 8) else "enumerate"
    if solver == "enumerate":
        z, conv = lcp_enumerate(A, q)
        return z, conv, torch.zeros(conv.shape, dtype=torch.int64, device=A.device)
    B, R = q.shape[0], q.shape[1]
    a_rep = A[:, None].expand(B, R, T, T)
    z, conv, iters = lcp_pivot(a_rep, q, max_pivots=max_pivots if max_pivots is not None else default_max_pivots(T),
                               start_all=start_all)
    conv = conv & kkt_ok(a_rep, q, z)
    if host_shortcuts(A) and T <= _ENUM_FALLBACK_MAX_T and B * R > 0:
        # The tableau loses about cond(A) digits: matrices with an eigenvalue below 1e-8 of the largest
        # diagonal entry (singular Grams regularised by ``auto_regularization``) and any problem that
        # fails the KKT check are solved by enumeration, whose Cholesky solves are backward stable
        # (CPU only: the subset is found on the host; on a GPU "auto" enumerates everything at T <= 8).
        scale = torch.diagonal(A, dim1=-2, dim2=-1).amax(dim=-1)
        eye = torch.eye(T, dtype=A.dtype, device=A.device)
        _, st = torch.linalg.cholesky_ex(A - (1e-8 * scale)[:, None, None] * eye)
        redo = ~conv | (st != 0)[:, None]
        if bool(redo.any()):
            bad = redo.nonzero()
            zb, cb = lcp_enumerate(A[bad[:, 0]], q[bad[:, 0], bad[:, 1]][:, None, :])
            z = z.index_put((bad[:, 0], bad[:, 1]), zb[:, 0])
            conv = conv.index_put((bad[:, 0], bad[:, 1]), cb[:, 0])
    return z, conv, iters


def auto_regularization(unit_gram: torch.Tensor) -> torch.Tensor:
    """Per module, the smallest delta in ``REG_LADDER`` whose Cholesky test passes: [M] float64.

    ``C`` has a unit diagonal (a cosine matrix), so delta is relative to every task's own squared norm.
    A module whose smallest eigenvalue is at least 1e-10 gets 0 (the exact problem); a (nearly)
    singular one, where the QP's weights are not unique, gets the smallest level that leaves
    ``C + delta I`` safely positive definite: 1e-12 for a Gram that is positive semi-definite to
    working precision, more where rounding made it indefinite (a float32 Gram of exactly conflicting
    or duplicated tasks), so the QPs stay bounded and the pivots positive.
    """
    M, T, _ = unit_gram.shape
    levels = torch.tensor(REG_LADDER, dtype=unit_gram.dtype, device=unit_gram.device)
    shifts = torch.tensor(_REG_TEST_SHIFT, dtype=unit_gram.dtype, device=unit_gram.device)
    eye = torch.eye(T, dtype=unit_gram.dtype, device=unit_gram.device)
    if host_shortcuts(unit_gram) and M > 0:
        # Common case first: when every module passes at the first level, the answer is known.
        _, st = torch.linalg.cholesky_ex(unit_gram + shifts[0] * eye)
        if bool((st == 0).all()):
            return levels[0].expand(M).clone()
    trial = unit_gram[:, None] + shifts[None, :, None, None] * eye
    _, status = torch.linalg.cholesky_ex(trial)
    ok = status == 0  # [M, L]
    ok[:, -1] = True  # the largest level is used when none passes
    first = torch.argmax(ok.to(torch.int8), dim=1)
    return levels[first]
