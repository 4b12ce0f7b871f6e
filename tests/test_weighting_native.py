"""The native CPU weighting solvers (csrc/cpu/mgs_weighting.h) against the batched torch code of the same
methods (the GPU path), module by module, on every Gram family, T = 1..8, float64 and float32 Grams.

The oracle tests (test_weighting_methods.py) run on the CPU, so they check the native solvers against
torchjd; this file ties the torch code to them, so both paths stay checked. The two run the same
algorithm in a different summation order: weights agree to rounding, and the iteration counts and
convergence flags agree except where a stopping test sits on a knife-edge (counted and bounded below).
"""

from __future__ import annotations

import pytest
import torch

import mgs_kernels.weighting._native_solvers as native_solvers
from mgs_kernels.weighting import get_weighting
from test_weighting_families import FAMILIES, TASK_COUNTS, direction, gram_of, jacobians

# method key -> (method, options, native solver name)
NATIVE = {
    "mgda": ("mgda", {}, "mgda_frank_wolfe"),
    "cagrad": ("cagrad", dict(c=0.5), "cagrad"),
    "cagrad_c09": ("cagrad", dict(c=0.9), "cagrad"),
    "cagrad_torchjd": ("cagrad", dict(c=0.5, compat="torchjd"), "cagrad"),
    "upgrad": ("upgrad", {}, "dual_cone_projection"),
    "upgrad_torchjd": ("upgrad", dict(compat="torchjd"), "dual_cone_projection"),
    "dualproj": ("dualproj", {}, "dual_cone_projection"),
    "dualproj_torchjd": ("dualproj", dict(compat="torchjd"), "dual_cone_projection"),
    "mgda_exact": ("mgda", dict(solver="exact"), "mgda_min_norm"),
}


def _native_module():
    try:
        from mgs_kernels import _native

        return _native.cpu()
    except ImportError:
        return None


pytestmark = pytest.mark.skipif(_native_module() is None, reason="native CPU module not built")


def solve(key, G, *, native, state=None):
    name, opts, _ = NATIVE[key]
    w = get_weighting(name, opts)
    if w.stateful and state is None:
        state = w.init_state(G.shape[0], G.shape[1], G.device)
    info = {}
    old = native_solvers.NATIVE_SOLVERS
    native_solvers.NATIVE_SOLVERS = native
    try:
        out = w(G, state=state, info=info, dtype=torch.float64)
    finally:
        native_solvers.NATIVE_SOLVERS = old
    return out, info


def test_every_native_solver_is_built():
    mod = _native_module()
    for key, (_, _, fn) in NATIVE.items():
        assert hasattr(mod, fn), f"{key}: mgs_kernels._mgs_cpu has no {fn}"


@pytest.mark.parametrize("key", sorted(NATIVE))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_native_equals_torch_path(rng, key, dtype):
    M = 16
    flips = total = 0
    for family in FAMILIES:
        for T in TASK_COUNTS:
            J = jacobians(family, M, T, torch.Generator().manual_seed(rng.randrange(1 << 30)))
            G = gram_of(J.to(dtype))
            a, ia = solve(key, G, native=True)
            b, ib = solve(key, G, native=False)
            assert not torch.isnan(a).any(), f"{key}: unwritten (poisoned) weights, {family} T={T}"
            assert (ia["iterations"] >= 0).all()
            same = ia["converged"] == ib["converged"]
            if "iterations" in ib:
                same &= ia["iterations"] == ib["iterations"]
            flips += int((~same).sum())
            total += M
            # Modules that took the same path: equal to rounding in the direction they give.
            da, db = direction(J, a), direction(J, b)
            scale = J.double().norm(dim=(1, 2)).clamp_min(1e-300)  # zero_row at T = 1: J = 0
            err = (da - db).norm(dim=1) / scale
            assert (err[same] <= 1e-9).all(), (family, T, err[same].max().item())
    assert flips <= 0.02 * total, f"{flips} of {total} modules stopped differently"


@pytest.mark.parametrize("key", sorted(NATIVE))
def test_native_handles_empty_and_degenerate_modules(key):
    T = 4
    J = jacobians("zero_row", 5, T, torch.Generator().manual_seed(3))
    G = gram_of(J)
    G[1] = 0.0  # an empty module
    G[2, :, 1:] = 0.0  # one task only
    G[2, 1:, :] = 0.0
    a, ia = solve(key, G, native=True)
    b, ib = solve(key, G, native=False)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert (a[1] == 0).all()
    assert torch.equal(ia["converged"], ib["converged"])
    assert get_weighting(NATIVE[key][0], NATIVE[key][1])(G[:0], dtype=torch.float64).shape == (0, T)


@pytest.mark.parametrize("key", sorted(NATIVE))
def test_native_is_bitwise_stable_across_thread_counts(key):
    J = jacobians("gaussian", 200, 6, torch.Generator().manual_seed(5))
    G = gram_of(J)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, _ = solve(key, G, native=True)
        torch.set_num_threads(max(2, n))
        b, _ = solve(key, G, native=True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
