"""Batched damped Newton for the alpha-fair bargaining weights of Nash-MTL and FairGrad.

Both ask, per module, for w > 0 with

    G w = w^(-1/a)          (a = 1: Nash-MTL's  w_i (G w)_i = 1)

on the present tasks. This is the stationarity condition of the strictly convex

    f(w) = 1/2 w^T G w - sum_i h(w_i),   h'(w) = w^(-1/a)   (h = log w for a = 1),

so Newton's method on f with a line search converges globally from any w > 0. The line search tries the
steps 1, 1/2, ..., 2^-6 and the damped step 1 / (1 + lambda) (lambda the Newton decrement; f is
self-concordant for a = 1, so that step always stays positive and decreases f) at once and keeps the
longest that stays positive and decreases f (Armijo), so every iteration has the same cost; the
quadratic part of f along the step comes from two numbers per module. A module is frozen once its residual
max_i |w_i^(1/a) (G w)_i - 1| is below 1e-13, or its Newton decrement below 1e-13 (f at its
minimum to rounding).

No solution exists when 0 is in the cone of the module's gradients (a Pareto-stationary module: f is
unbounded below along a nonnegative null vector of G); such modules run to the cap and report
converged False. Their iterates run off along that null vector (weights of 1e10 and more whose
combination cancels: in a float32 combine the cancellation leaves rounding noise larger than the task
gradients themselves), so the methods give such a module zero weights (``unsolved_to_zero``): no
direction improves every task there, the answer MGDA gives at a Pareto-stationary point.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import all_done, matvec

_STEPS = 8  # line-search candidates 2^0 .. 2^-6 and the damped Newton step
_DONE = 1e-13


def _h(w: torch.Tensor, a: float) -> torch.Tensor:
    if a == 1.0:
        return torch.log(w)
    e = 1.0 - 1.0 / a
    return w.pow(e) / e


def residual(G: torch.Tensor, w: torch.Tensor, present: torch.Tensor, a: float) -> torch.Tensor:
    """max_i |w_i^(1/a) (G w)_i - 1| over the present tasks: [M] (0 for an empty module)."""
    return _residual(matvec(G, w), w, present, a)


def _residual(gw: torch.Tensor, w: torch.Tensor, present: torch.Tensor, a: float) -> torch.Tensor:
    wa = w.clamp_min(0.0) if a == 1.0 else w.clamp_min(0.0).pow(1.0 / a)
    r = (wa * gw - 1.0).abs()
    return torch.where(present, r, torch.zeros_like(r)).amax(dim=1)


def diagonal_start(G: torch.Tensor, present: torch.Tensor, a: float, w0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A starting point: ``w0`` where it is valid (positive and finite on the present tasks), else the
    solution for diag(G), then the best multiple of it (f along the ray has a closed-form minimum)."""
    p = present.to(G.dtype)
    diag = torch.diagonal(G, dim1=1, dim2=2)
    v = torch.where(present, diag.clamp_min(1e-300).pow(-a / (a + 1.0)), torch.zeros_like(diag))
    if w0 is not None:
        valid = (torch.where(present, w0, torch.ones_like(w0)) > 0).all(dim=1) & torch.isfinite(w0).all(dim=1)
        v = torch.where(valid[:, None], w0 * p, v)
    vgv = (matvec(G, v) * v).sum(dim=1)
    num = torch.where(present, v.clamp_min(1e-300).pow(1.0 - 1.0 / a), torch.zeros_like(v)).sum(dim=1)
    tau = torch.where(vgv > 0, (num / torch.where(vgv > 0, vgv, torch.ones_like(vgv))).pow(a / (a + 1.0)),
                      torch.ones_like(vgv))
    return v * tau[:, None]


def alpha_fair(
    G: torch.Tensor,
    present: torch.Tensor,
    a: float,
    *,
    max_iters: int,
    w0: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve G w = w^(-1/a) on the present tasks of every module.

    Args:
        G: [M, T, T] float64 (well scaled: callers pass G / tr G and rescale the answer).
        present: bool [M, T]; absent tasks get w = 0.
        a: the fairness exponent (> 0).
        max_iters: Newton iterations.
        w0: optional warm start [M, T].

    Returns:
        w [M, T], residual [M] (see ``residual``), Newton iterations taken [M] (int64).
    """
    M, T, _ = G.shape
    dt, dev = G.dtype, G.device
    p = present.to(dt)
    w = diagonal_start(G, present, a, w0)
    halvings = torch.tensor([2.0 ** -k for k in range(_STEPS - 1)], dtype=dt, device=dev)
    absent_eye = torch.diag_embed(1.0 - p)
    pp = p[:, :, None] * p[:, None, :]
    gw = matvec(G, w)
    res = _residual(gw, w, present, a)
    iters = torch.zeros(M, dtype=torch.int64, device=dev)
    one = torch.ones((), dtype=dt, device=dev)
    done = res <= _DONE
    best, best_res = w, res
    for _ in range(max_iters):
        if all_done(done):
            break
        ws = torch.where(present, w, one)
        hp = ws.pow(-1.0 / a)
        grad = (gw - hp) * p
        hess = G * pp + torch.diag_embed((hp / ws) * (p / a)) + absent_eye
        chol, st = torch.linalg.cholesky_ex(hess)
        delta = torch.cholesky_solve(grad[:, :, None], chol).squeeze(-1) * p
        lam2 = (grad * delta).sum(dim=1)
        gd = matvec(G, delta)
        # f(w - t delta) - f(w) = -t delta^T G w + t^2/2 delta^T G delta - sum h(w - t delta) + sum h(w):
        # the quadratic part from two numbers per module, only h per candidate step.
        q1 = (delta * gw).sum(dim=1, keepdim=True)
        q2 = 0.5 * (delta * gd).sum(dim=1, keepdim=True)
        # Steps tried, longest first: 1, 1/2, ..., 2^-6, then the damped Newton step 1 / (1 + lambda)
        # (for a = 1, f is self-concordant and that step always stays positive and decreases f).
        damped = 1.0 / (1.0 + lam2.clamp_min(0.0).sqrt())
        ts = torch.cat((halvings[None, :].expand(M, -1), damped[:, None]), dim=1)  # [M, K]
        cand = w[:, None, :] - ts[:, :, None] * delta[:, None, :]
        inside = (cand > 0) | (p[:, None, :] == 0)
        positive = inside.all(dim=-1)
        safe = torch.where(inside & (p[:, None, :] > 0), cand, one)
        dh = ((_h(safe, a) - _h(ws, a)[:, None, :]) * p[:, None, :]).sum(dim=-1)
        df = -ts * q1 + ts * ts * q2 - dh
        armijo = df <= -1e-4 * ts * lam2[:, None]
        # Near the answer f no longer resolves the decrease: take the full step (quadratic region).
        armijo[:, 0] |= lam2 < 1e-10
        good = positive & armijo & torch.isfinite(df)
        k = torch.argmax(good.to(torch.int8), dim=1, keepdim=True)  # longest acceptable step
        step = torch.where(good.any(dim=1, keepdim=True), ts.gather(1, k), torch.zeros_like(damped)[:, None])
        move = (~done & (st == 0))[:, None]
        w = torch.where(move, w - step * delta, w)
        gw = matvec(G, w)
        iters = iters + move.squeeze(1).to(torch.int64)
        res = torch.where(done, res, _residual(gw, w, present, a))
        # The best iterate is returned: on an ill-conditioned module rounding can make a late step
        # worse, never the answer.
        better = res < best_res
        best = torch.where(better[:, None], w, best)
        best_res = torch.where(better, res, best_res)
        # Done at the answer, or when the Newton decrement says f is within rounding of its minimum
        # (an ill-conditioned module whose residual cannot reach _DONE).
        done = done | (res <= _DONE) | (move.squeeze(1) & (lam2 <= 1e-26))
    return best * p, best_res, iters


def unsolved_to_zero(w: torch.Tensor, converged: torch.Tensor) -> torch.Tensor:
    """``w`` [M, T] with the rows of the modules whose solve did not converge set to 0 (see above).
    The residual cannot tell a runaway from a solution: along the null vector it can fall to 1e-7
    while the weights grow past 1e5."""
    return torch.where(converged[:, None], w, torch.zeros_like(w))
