"""``cagrad``: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021, Alg. 1; torchjd's ``CAGrad``)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._common import (COMPAT_CHOICES, all_done, check_choice, check_float, check_int, cosine, host_shortcuts,
                      matvec, mean_weights, quad, trace_normalize)
from ._native_solvers import inputs, lcp_solver, outputs, module_output, threads
from ._qp import auto_regularization, default_max_pivots, solve_lcp
from .base import State, Weighting, register


@register
class CAGradWeighting(Weighting):
    """W = u + (rho / |g_w|) w, with u = 1/n on the n present tasks, g0 = J^T u, rho = c |g0| and

        w = argmin_{w in simplex}  w^T G u + rho sqrt(w^T G w),

    on G / tr G. The direction maximises the worst task improvement min_i g_i . d over the ball
    |d - g0| <= c |g0|. When |g_w| < norm_eps (on G / tr G) the module is taken as Pareto stationary
    and gets zero weights, as in torchjd.

    Solver: for fixed t > 0 the problem ``min_w w^T G u + rho/2 (w^T G w / t + t)`` is a simplex QP,
    solved exactly (as the homogeneous LCP ``min 1/2 b^T Q b - 1^T b`` with Q = s/2 G + sym(G u 1^T) +
    K 1 1^T, s = rho/t, K = |g0|^2/s, which is positive definite on the simplex's span); on the QP's
    support the optimal t solves a quadratic in closed form. Iterating t <- t*(support) inside a
    bisection bracket is exact once the support repeats (usually 2-3 QPs).

    Options:
        c: radius scale of the ball (required, >= 0).
        norm_eps: zero weights below |g_w| < norm_eps (on G / tr G; default 1e-4). With
            compat="torchjd" also torchjd's absolute test: G / tr G is zero when tr G < norm_eps.
        compat: None or "torchjd".
        reg_eps: relative regularisation of G in the QPs (None: automatic, as for ``upgrad``).
        max_iters: cap on the QPs solved per module (default 20); info["converged"] says which
            modules reached the fixed point.
        max_pivots: cap of the pivoting LCP solver.
    """

    name = "cagrad"

    def __init__(self, c: Optional[float] = None, norm_eps: float = 1e-4, *, compat: Optional[str] = None,
                 reg_eps: Optional[float] = None, max_iters: int = 20, max_pivots: Optional[int] = None) -> None:
        super().__init__()
        if c is None:
            from .._errors import MGSInputError

            raise MGSInputError("cagrad: the option c (radius scale, e.g. 0.5) is required, as in torchjd")
        self.c = check_float(self.name, "c", c, minimum=0.0)
        self.norm_eps = check_float(self.name, "norm_eps", norm_eps, minimum=0.0)
        self.compat = check_choice(self.name, "compat", compat, COMPAT_CHOICES)
        self.reg_eps = None if reg_eps is None else check_float(self.name, "reg_eps", reg_eps, minimum=0.0)
        self.max_iters = check_int(self.name, "max_iters", max_iters, minimum=1)
        self.max_pivots = None if max_pivots is None else check_int(self.name, "max_pivots", max_pivots, minimum=1)
        self._repr_options = {k: v for k, v in dict(c=self.c, norm_eps=self.norm_eps, compat=self.compat).items()
                              if v is not None}

    def compute(self, gram: torch.Tensor, present: torch.Tensor, *, state: Optional[State],
                generator: Optional[torch.Generator], info: Dict[str, torch.Tensor]) -> torch.Tensor:
        mod = lcp_solver(gram, "cagrad")
        if mod is not None:  # the CPU: the same algorithm, one module per thread (csrc/cpu/weighting_cagrad.cpp)
            return self._native(mod, gram, present, info)
        gn, tr = trace_normalize(gram)
        if self.compat == "torchjd":
            gn = torch.where((tr < self.norm_eps)[:, None, None], torch.zeros_like(gn), gn)
            present = present & (tr >= self.norm_eps)[:, None]
        M, T, _ = gn.shape
        p = present.to(gn.dtype)
        u = mean_weights(present)
        b = matvec(gn, u)  # G u: the task gradients' inner products with g0
        g0sq = (b * u).sum(dim=1)
        rho = self.c * g0sq.clamp_min(0.0).sqrt()
        w, conv, iters, delta = _solve(gn, present, p, b, g0sq, rho, reg_eps=self.reg_eps, max_iters=self.max_iters,
                                       max_pivots=self.max_pivots)
        gw = quad(gn, w).clamp_min(0.0).sqrt()
        ok = (gw >= self.norm_eps) & (gw > 0)
        weights = u + (rho / torch.where(ok, gw, torch.ones_like(gw)))[:, None] * w
        # c = 0 (or g0 = 0): the ball is a point and the answer is the mean, whatever w is.
        weights = torch.where((rho > 0)[:, None], weights, u)
        info["converged"] = conv
        info["iterations"] = iters
        info["reg"] = delta
        return torch.where(ok[:, None] | (rho <= 0)[:, None], weights, torch.zeros_like(weights))

    def _native(self, mod, gram: torch.Tensor, present: torch.Tensor, info: Dict[str, torch.Tensor]) -> torch.Tensor:
        g, p = inputs(gram, present)
        M, T, _ = g.shape
        w, conv, iters = outputs(M, T, g.device)
        delta = module_output(M, g.device)
        max_pivots = self.max_pivots if self.max_pivots is not None else default_max_pivots(T)
        mod.cagrad(g.data_ptr(), p.data_ptr(), M, T, self.c, self.norm_eps, self.compat == "torchjd",
                   self.reg_eps is None, 0.0 if self.reg_eps is None else self.reg_eps, self.max_iters, max_pivots,
                   w.data_ptr(), conv.data_ptr(), iters.data_ptr(), delta.data_ptr(), threads())
        info["converged"] = conv
        info["iterations"] = iters
        info["reg"] = delta
        return w


def _solve(gn, present, p, b, g0sq, rho, *, reg_eps, max_iters, max_pivots):
    """The CAGrad dual on every module: (w [M, T] on the simplex, converged [M], QPs solved [M], delta [M])."""
    M, T, _ = gn.shape
    dt, dev = gn.dtype, gn.device
    c, d = cosine(gn, present)
    delta = auto_regularization(c) if reg_eps is None else torch.full((M,), float(reg_eps), dtype=dt, device=dev)
    # Regularised G (relative to each task's squared norm), absent tasks isolated.
    gr = gn + torch.diag_embed(delta[:, None] * d * d * p) + torch.diag_embed(1.0 - p)
    one = torch.ones((), dtype=dt, device=dev)
    rho_safe = torch.where(rho > 0, rho, one)
    # |g_w| <= max_k |g_k| (regularised: the problem solved), so t* is in [0, hi].
    hi = torch.where(present, torch.diagonal(gr, dim1=1, dim2=2), torch.zeros_like(p)).amax(dim=1).sqrt()
    hi = torch.where(hi > 0, hi, one)
    lo = torch.zeros_like(hi)
    slack = 1e-12 * hi  # t* of a vertex is |g_k| = hi up to rounding
    t = g0sq.clamp_min(0.0).sqrt().clamp(min=1e-3 * hi, max=hi)  # |g0|: the typical size of |g_w|
    t_prev = torch.full_like(t, -1.0)
    done = (rho <= 0) | ~present.any(dim=1)
    w = torch.zeros_like(p)
    iters = torch.zeros(M, dtype=torch.int64, device=dev)
    pp = p[:, :, None] * p[:, None, :]
    bp = 0.5 * (b[:, :, None] * p[:, None, :] + p[:, :, None] * b[:, None, :])
    for _ in range(max_iters):
        if all_done(done):
            break
        s = rho_safe / t
        kk = g0sq / s
        Q = (0.5 * s)[:, None, None] * gr * pp + bp + kk[:, None, None] * pp + torch.diag_embed(1.0 - p)
        z, _, _ = solve_lcp(Q, (-p)[:, None, :], solver="auto", max_pivots=max_pivots, start_all=True)
        z = z[:, 0]
        zs = z.sum(dim=1, keepdim=True)
        w_t = z / torch.where(zs > 0, zs, one)
        w = torch.where(done[:, None], w, w_t)
        iters = iters + (~done).to(torch.int64)
        # Bracket: |g_w(t)| / t decreases in t and equals 1 at the answer.
        dn = quad(gr, w_t).clamp_min(0.0).sqrt()
        lo = torch.where(done | (dn <= t), lo, t)
        hi = torch.where(done | (dn > t), hi, t)
        ok, t_star, w_star = _closed_form(gr, (z > 0).to(dt) * p, b, rho_safe)
        inside = ok & (t_star >= lo - slack) & (t_star <= hi + slack)
        converged_now = ok & ((t_star - t).abs() <= slack)
        # The supports on either side of the answer can send the closed form back to the t tried
        # before (a 2-cycle, seen on rank-deficient G): bisect there instead.
        cycle = (t_star - t_prev).abs() <= slack
        t_next = torch.where(inside & ~cycle, torch.minimum(torch.maximum(t_star, lo), hi), 0.5 * (lo + hi))
        t_prev = t
        w = torch.where((converged_now & ~done)[:, None], w_star, w)
        done = done | converged_now
        t = torch.where(done, t, t_next)
    # delta = 1e-12 (a Gram positive semi-definite to working precision) moves the answer by ~1e-12; more
    # is rounding that made G indefinite (float32 Grams of singular families), whose bias the polish removes.
    w = _polish(gn, p, b, rho_safe, w, done & (delta > 1e-12))
    return w, done, iters, delta


def _closed_form(g, f, b, rho_safe):
    """The answer on the support f [M, T] (0/1) for the Gram g: w = x1/s1 + (t/rho) q with q = (s2/s1) x1 - x2,
    H x1 = 1_F, H x2 = b_F (H = g_FF), and t^2 = 1/s1 + (t/rho)^2 q^T H q. (ok [M], t* [M], w* [M, T]); ok is
    False where H fails Cholesky or t* has no real solution (t* and w* are then meaningless)."""
    one = torch.ones((), dtype=g.dtype, device=g.device)
    H = g * (f[:, :, None] * f[:, None, :]) + torch.diag_embed(1.0 - f)
    chol, st = torch.linalg.cholesky_ex(H)
    x = torch.cholesky_solve(torch.stack((f, b * f), dim=2), chol)
    x1, x2 = x[:, :, 0] * f, x[:, :, 1] * f
    s1, s2 = x1.sum(dim=1), x2.sum(dim=1)
    s1_safe = torch.where(s1 > 0, s1, one)
    qv = (s2 / s1_safe)[:, None] * x1 - x2
    den = 1.0 - quad(g, qv) / (rho_safe * rho_safe)
    ok = (st == 0) & (s1 > 0) & (den > 0)
    t_star = (1.0 / (s1_safe * torch.where(ok, den, one))).sqrt()
    return ok, t_star, x1 / s1_safe[:, None] + (t_star / rho_safe)[:, None] * qv


def _polish(gn, p, b, rho_safe, w, mask):
    """Where the solve was regularised (``mask``), the closed form once more on the final support with the
    Gram as given: the answer of the problem as posed, kept where it is a KKT point of it (nonnegative,
    no improving vertex off the support) and its objective is not higher, to rounding (1e-12 of the terms: where
    the regularisation moved w by ~1e-8 the two objectives differ by ~1e-16, and which one rounding makes
    smaller would pick w or wp at random, 1e-8 apart, differently in the native and the torch code). [M, T]."""
    if host_shortcuts(mask) and not bool(mask.any()):
        return w
    dt = gn.dtype
    one = torch.ones((), dtype=dt, device=gn.device)
    f = (w > 0).to(dt) * p
    ok, _, wp = _closed_form(gn, f, b, rho_safe)
    wp = wp * f

    def objective(v):
        vb, vn = (v * b).sum(dim=1), rho_safe * quad(gn, v).clamp_min(0.0).sqrt()
        return vb + vn, vb.abs() + vn

    gwp = quad(gn, wp).clamp_min(0.0).sqrt()
    grad = b + (rho_safe / torch.where(gwp > 0, gwp, one))[:, None] * matvec(gn, wp)
    lam = (grad * wp).sum(dim=1)  # equal on the support; wp sums to 1
    scale = grad.abs().amax(dim=1)
    off = ((lam[:, None] - grad) * p * (1.0 - f)).amax(dim=1)
    ok = ok & (gwp > 0) & (wp >= 0).all(dim=1) & (off <= 1e-9 * scale)
    obj_p, _ = objective(wp)
    obj_w, obj_scale = objective(w)
    ok = ok & (obj_p <= obj_w + 1e-12 * obj_scale)
    return torch.where((mask & ok)[:, None], wp, w)
