"""The PCGrad solve of every backend: bitwise agreement with the torch backend, and malformed order tables.

Bitwise equality across backends can only be asked where the arithmetic does not depend on the
summation order (Triton sums d = C[i, :] . G[:, j] as a tree, the CPU kernel left to right, torch in its
own vectorized order):
* T = 2 with any Gram: every sum has a single nonzero term, so the only rounding is the division
  d / G[j, j] (IEEE on every backend; the PTX check is in test_offline_compile.py);
* conflict-heavy "dyadic" Grams (integer entries, powers of two on the diagonal) whose whole solve is
  exact in float32 (checked against float64 for each draw), so any summation order gives the same bits.
Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from mgs_kernels import backends, random_order, reference
from mgs_kernels.backends import torch_backend

from conftest import BACKENDS, DEVICE


def solve(backend: str, gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The backend's solve kernel itself (no host-side validation of the order table), result on the CPU."""
    return backends.get_backend(backend, DEVICE).pcgrad_weights(gram.to(DEVICE), order.to(DEVICE), 0.0).cpu()


def dyadic_grams(M: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """float32 [M, T, T] Gram matrices of sign vectors with 2 or 4 nonzeros (G[j, j] in {2, 4}),
    drawn so that many task pairs conflict (shared coordinates with opposite signs)."""
    D = 6
    grams = []
    for _ in range(M):
        V = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            k = 2 if torch.rand((), generator=gen) < 0.5 else 4
            idx = torch.randperm(D, generator=gen)[:k]
            V[t, idx] = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0).double()
        grams.append(V @ V.T)
    return torch.stack(grams).float()


def exact_case(M: int, T: int, gen: torch.Generator):
    """(gram, order) whose float32 solve is exact (equal to float64), with at least one conflict."""
    for _ in range(200):
        gram = dyadic_grams(M, T, gen)
        order = random_order(M, T, generator=gen)
        w32 = torch_backend.pcgrad_weights(gram, order, 0.0)
        w64 = reference.pcgrad_weights(gram.double(), order)
        conflicts = (gram < 0).any()
        if conflicts and torch.equal(w32.double(), w64):
            return gram, order
    pytest.skip("no exact draw found")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [2, 3, 4, 5, 8])
def test_bitwise_equal_to_torch_backend_on_exact_conflict_heavy_grams(backend, T, rng):
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    gram, order = exact_case(7, T, gen)
    expected = torch_backend.pcgrad_weights(gram, order, 0.0)
    got = solve(backend, gram, order)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, gram.new_ones(expected.shape)), "some projection must have happened"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_equal_to_torch_backend_t2_random_grams(backend, rng):
    # T = 2: d = G[i, j] exactly, so the weights are 1 - G[i, j] / G[j, j] rounded once (inexact
    # divisions of random values): bitwise equal only with IEEE division.
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    M = 512
    v = torch.randn(M, 2, 9, generator=gen)
    v[: M // 2, 1] = -v[: M // 2, 0] + 0.3 * torch.randn(M // 2, 9, generator=gen)  # conflicts
    gram = (v @ v.transpose(1, 2)).float()
    order = random_order(M, 2, generator=gen)
    expected = torch_backend.pcgrad_weights(gram, order, 0.0)
    got = solve(backend, gram, order)
    assert (expected != 1).sum() >= M // 4
    assert torch.equal(got, expected)


def skipping_reference(gram: torch.Tensor, order: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """float64 solve where an order entry outside [0, T) or equal to the task itself is skipped."""
    M, T, _ = gram.shape
    g = gram.double()
    w = torch.zeros(M, T, dtype=torch.float64)
    for m in range(M):
        for i in range(T):
            c = torch.zeros(T, dtype=torch.float64)
            c[i] = 1
            for j in order[m, i].tolist():
                if j < 0 or j >= T or j == i:
                    continue
                d = float(c @ g[m, :, j])
                if d < 0 and float(g[m, j, j]) > eps:
                    c[j] -= d / g[m, j, j]
            w[m] += c
    return w


def malformed_tables(gen: torch.Generator, M: int, T: int) -> torch.Tensor:
    order = random_order(M, T, generator=gen).clone()
    bad = torch.tensor([-1, T, T + 7, -(1 << 40), 1 << 40])
    flat = order.view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 3]
    flat[pos] = bad[torch.randint(len(bad), (len(pos),), generator=gen)]
    # entries equal to the visiting task itself
    for m in range(M):
        order[m, 0, 0] = 0
        order[m, T - 1, -1] = T - 1
    return order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [2, 3, 5, 9])
def test_malformed_order_entries_are_skipped(backend, T, rng):
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    M = 6
    v = torch.randn(M, T, 11, generator=gen)
    v[:, 1] = -v[:, 0] * 0.7 + 0.1 * v[:, 1]
    gram = (v @ v.transpose(1, 2)).float()
    order = malformed_tables(gen, M, T)
    expected = skipping_reference(gram, order)
    got = solve(backend, gram, order)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # an all-malformed table is the plain sum
    assert torch.equal(solve(backend, gram, torch.full_like(order, -3)), torch.ones(M, T))


def test_malformed_tables_from_the_host_are_rejected_before_any_kernel():
    import mgs_kernels as mgs

    gram = torch.eye(3).expand(2, 3, 3).contiguous()
    order = mgs.fixed_order(2, 3)
    order[1, 2, 0] = 7
    with pytest.raises(mgs.MGSInputError, match="must list every task other than i exactly once"):
        mgs.pcgrad_weights(gram, order=order)
