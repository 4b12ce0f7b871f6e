"""The private batched solvers behind the weightings: LCP (Murty pivoting and enumeration), the Jacobi
eigen-solver, the alpha-fair Newton solver and the automatic regularisation, each against an
independent float64 reference on fresh random inputs."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgs_kernels import _settings
from mgs_kernels.weighting._eig import sym_eig
from mgs_kernels.weighting._newton import alpha_fair
from mgs_kernels.weighting._qp import auto_regularization, kkt_ok, lcp_enumerate, lcp_pivot, solve_lcp
from test_weighting_families import generator

nnls = pytest.importorskip("scipy.optimize").nnls


def random_pd(gen, B, T, cond_log=3.0, exact=False):
    """Positive definite matrices with condition numbers up to 10^cond_log (exactly, with ``exact``:
    one eigenvalue 10^-cond_log, the others in [0.1, 1])."""
    Q, _ = torch.linalg.qr(torch.randn(B, T, T, generator=gen, dtype=torch.float64))
    lam = torch.pow(10.0, -cond_log * torch.rand(B, T, generator=gen, dtype=torch.float64))
    if exact:
        lam = 0.1 + 0.9 * torch.rand(B, T, generator=gen, dtype=torch.float64)
        lam[:, 0] = 10.0 ** -cond_log
    return (Q * lam[:, None, :]) @ Q.transpose(1, 2)


@pytest.mark.parametrize("T", range(1, 9))
def test_lcp_pivot_and_enumerate_agree_with_nnls(rng, T):
    """LCP(A, q) with A = L L^T is the NNLS problem min_{z >= 0} |L^T z + L^-1 q|: Lawson-Hanson is the
    reference."""
    gen = generator(rng)
    B = 64
    A = random_pd(gen, B, T)
    q = torch.randn(B, T, generator=gen, dtype=torch.float64)
    z1, c1, piv = lcp_pivot(A, q, max_pivots=2 ** T)
    z2, c2 = lcp_enumerate(A, q[:, None, :])
    assert c1.all() and c2.all() and kkt_ok(A, q, z1).all()
    assert (piv <= 2 ** T).all()
    L = torch.linalg.cholesky(A)
    ref = []
    for b in range(B):
        rhs = -torch.linalg.solve_triangular(L[b], q[b][:, None], upper=False)[:, 0]
        ref.append(torch.from_numpy(nnls(L[b].T.numpy(), rhs.numpy())[0]))
    ref = torch.stack(ref)
    scale = ref.abs().amax(dim=1, keepdim=True) + q.abs().amax(dim=1, keepdim=True)
    assert ((z1 - ref).abs() <= 1e-9 * scale).all()
    assert ((z2[:, 0] - ref).abs() <= 1e-9 * scale).all()


def test_lcp_pivot_cap_reports_unconverged(rng):
    gen = generator(rng)
    A = random_pd(gen, 32, 6)
    q = -torch.rand(32, 6, generator=gen, dtype=torch.float64) - 0.1  # every constraint starts violated
    z, conv, piv = lcp_pivot(A, q, max_pivots=1)
    assert (piv <= 1).all() and not conv.all()
    z, conv, piv = lcp_pivot(A, q, max_pivots=64)
    assert conv.all()


@pytest.mark.parametrize("cond_log,routed", [(6.0, False), (11.0, True)])
def test_solve_lcp_routes_ill_conditioned_problems_to_enumeration(rng, monkeypatch, cond_log, routed):
    """The tableau loses ~cond(A) digits: up to 1e6 pivoting agrees with enumeration; beyond 1e8 the
    problems go to enumeration (CPU), with its result."""
    import mgs_kernels.weighting._qp as qp

    gen = generator(rng)
    A = random_pd(gen, 100, 7, cond_log=cond_log, exact=True)
    q = torch.randn(100, 1, 7, generator=gen, dtype=torch.float64)
    calls = []
    real = qp.lcp_enumerate
    monkeypatch.setattr(qp, "lcp_enumerate", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    z, conv, _ = solve_lcp(A, q, solver="pivot")
    assert conv.all() and kkt_ok(A[:, None], q, z).all()
    ze, _ = real(A, q)
    if routed:
        assert sum(calls) == 100 and torch.equal(z, ze)
    else:
        assert not calls
        f = lambda x: 0.5 * ((A[:, None] @ x[..., None]).squeeze(-1) * x).sum(-1) + (q * x).sum(-1)  # noqa: E731
        assert ((f(z) - f(ze)).abs() <= 1e-10 * f(ze).abs() + 1e-14).all()


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_jacobi_matches_eigh(rng, T):
    gen = generator(rng)
    B = 50
    X = torch.randn(B, T, max(1, T - 2), generator=gen, dtype=torch.float64)
    A = X @ X.transpose(1, 2) * torch.pow(10.0, 6 * torch.rand(B, 1, 1, generator=gen, dtype=torch.float64) - 3)
    A[0] = 0.0  # an empty module
    if T >= 2:
        A[1] = torch.diag(torch.tensor([2.0] * (T - 1) + [5.0], dtype=torch.float64))  # repeated eigenvalues
    lam, V, conv = sym_eig(A)
    assert conv.all()
    ref = torch.linalg.eigvalsh(A)
    scale = A.abs().amax(dim=(1, 2), keepdim=True)[:, :, 0] + 1e-300
    assert ((lam.sort(dim=1).values - ref).abs() <= 1e-13 * T * scale).all()
    rec = (V * lam[:, None, :]) @ V.transpose(1, 2)
    assert ((rec - A).abs() <= 1e-13 * T * scale[:, :, None]).all()
    eye = torch.eye(T, dtype=torch.float64)
    assert ((V.transpose(1, 2) @ V - eye).abs() <= 1e-13 * T).all()


@settings(max_examples=30 * _settings.get("MGS_HYPOTHESIS_SCALE"), deadline=None)
@given(seed=st.integers(0, 2 ** 31), T=st.integers(2, 8), a=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]))
def test_alpha_fair_newton_solves_its_equation(seed, T, a):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(16, T, T + 4, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(1, 2)
    G = G / torch.diagonal(G, dim1=1, dim2=2).sum(dim=1)[:, None, None]
    present = torch.ones(16, T, dtype=torch.bool)
    present[3, 0] = False
    w, res, iters = alpha_fair(G, present, a, max_iters=60)
    Gp = G * (present[:, :, None] & present[:, None, :])
    lhs = (Gp @ w[..., None]).squeeze(-1)
    rhs = torch.where(present, w.clamp_min(1e-300).pow(-1.0 / a), torch.zeros_like(w))
    assert (res <= 1e-9).all()
    assert ((lhs - rhs).abs() <= 1e-8 * rhs.abs().amax(dim=1, keepdim=True)).all()
    assert (w[present] > 0).all() and (w[~present] == 0).all()
    # A warm start at the answer takes no step.
    w2, res2, iters2 = alpha_fair(G, present, a, max_iters=60, w0=w)
    assert (iters2 <= 1).all() and (res2 <= 1e-9).all()


def test_auto_regularization_levels():
    eye = torch.eye(3, dtype=torch.float64)
    well = eye.clone()
    singular = torch.ones(3, 3, dtype=torch.float64)  # three identical tasks: PSD, rank 1
    indefinite = singular.clone()
    indefinite[0, 1] = indefinite[1, 0] = 1.0 + 3e-7  # rounding made it indefinite by ~3e-7
    delta = auto_regularization(torch.stack([well, singular, indefinite]))
    assert delta[0] == 0.0 and delta[1] == 1e-12
    assert 3e-7 < delta[2] <= 1e-5
    assert (torch.linalg.eigvalsh(indefinite + delta[2] * eye) > 0).all()


def test_lcp_pivot_compact_and_masked_are_bitwise_equal(rng):
    gen = generator(rng)
    A = random_pd(gen, 200, 6)
    q = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    a = lcp_pivot(A, q, max_pivots=64, compact=True)
    b = lcp_pivot(A, q, max_pivots=64, compact=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_lcp_pivot_from_the_full_basis(rng):
    gen = generator(rng)
    A = random_pd(gen, 100, 6)
    q = -torch.rand(100, 6, generator=gen, dtype=torch.float64)
    a = lcp_pivot(A, q, max_pivots=64)
    b = lcp_pivot(A, q, max_pivots=64, start_all=True)
    assert a[1].all() and b[1].all()
    assert torch.allclose(a[0], b[0], rtol=1e-10, atol=1e-12)
    assert b[2].sum() < a[2].sum()  # most constraints inactive: fewer pivots from the full basis
