"""Kernel-level API against the float64 reference: the behaviour matrix every backend that runs on CPU
tensors must pass (Triton through its interpreter when there is no GPU; on a GPU machine tests/test_gpu.py
runs the same checks on the device). Backend files keep only what is specific to one backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mgs_kernels as mgs
from mgs_kernels import _settings
from mgs_kernels import reference

from conftest import (CPU_BACKENDS as BACKENDS, assert_close_to_reference, offsets_from_sizes, property_case,
                      random_sizes, reference_result, storage_rtol)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Smallest |g_i' . g_j| / (|g_i| |g_j|) a test accepts: well above float32 rounding of that ratio.
MARGIN = 1e-4


def test_backend_matrix_holds_every_backend_that_can_run_here():
    # Triton runs everywhere it is installed (its CPU interpreter without a GPU), so a matrix without
    # it means the interpreter mode was decided too late (after the kernels were imported).
    if importlib.util.find_spec("triton") is not None:
        assert "triton" in BACKENDS
    assert "torch" in BACKENDS


def make_grads(T, sizes, dtype, rng_torch=None):
    g = torch.randn(T, sum(sizes), generator=rng_torch)
    return g.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_modular_pcgrad_matches_reference(backend, T, dtype, rng):
    for _ in range(50):  # redraw inputs whose PCGrad decisions sit on a knife edge
        sizes = random_sizes(rng, rng.randint(1, 12))
        offsets = offsets_from_sizes(sizes)
        grads = make_grads(T, sizes, dtype)
        order = mgs.random_order(len(sizes), T, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        if reference.decision_margin(reference.gram(grads, offsets), order) > MARGIN:
            break
    out = mgs.modular_pcgrad(grads, offsets, order=order, backend=backend)
    assert out.dtype == dtype and out.shape == (sum(sizes),)
    assert_close_to_reference(out, reference_result(grads, offsets, order), offsets, storage_rtol(dtype), grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_gram_matches_reference(backend, dtype, rng):
    T = rng.randint(1, 9)
    sizes = random_sizes(rng, rng.randint(1, 10), max_size=5000)
    offsets = offsets_from_sizes(sizes)
    grads = make_grads(T, sizes, dtype)
    gram = mgs.segmented_gram(grads, offsets, backend=backend)
    assert gram.dtype == torch.float32 and gram.shape == (len(sizes), T, T)
    ref = reference.gram(grads, offsets)
    scale = torch.diagonal(ref, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    assert ((gram.double() - ref).abs() / scale).max() < 1e-5
    for m, n in enumerate(sizes):
        if n == 0:
            assert (gram[m] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pcgrad_weights_match_reference(backend, rng):
    T = rng.randint(1, 8)
    sizes = random_sizes(rng, 20, max_size=50)
    grads = make_grads(T, sizes, torch.float32)
    offsets = offsets_from_sizes(sizes)
    gram64 = reference.gram(grads, offsets)
    order = mgs.random_order(len(sizes), T, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    if reference.decision_margin(gram64, order) < MARGIN:
        pytest.skip("PCGrad decisions on a knife edge for this draw")
    w = mgs.pcgrad_weights(gram64.float(), order=order, backend=backend)
    ref = reference.pcgrad_weights(gram64, order)
    assert w.dtype == torch.float32 and w.shape == (len(sizes), T)
    torch.testing.assert_close(w.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_combine_into_poisoned_out_and_in_place(backend, dtype, rng):
    T = rng.randint(1, 6)
    sizes = random_sizes(rng, rng.randint(1, 8), max_size=700)
    offsets = offsets_from_sizes(sizes)
    grads = make_grads(T, sizes, dtype)
    weights = torch.randn(len(sizes), T)
    expected = torch.zeros(sum(sizes), dtype=torch.float64)
    for m in range(len(sizes)):
        a, b = offsets[m].item(), offsets[m + 1].item()
        expected[a:b] = (weights[m].double()[:, None] * grads[:, a:b].double()).sum(0)
    for out_dtype in DTYPES:
        out = torch.full((sum(sizes),), float("nan"), dtype=out_dtype)
        res = mgs.segmented_combine(grads, offsets, weights, out=out, backend=backend)
        assert res is out
        assert_close_to_reference(out, expected, offsets, storage_rtol(out_dtype))
    in_place = grads.clone()
    row = rng.randrange(T)
    mgs.segmented_combine(in_place, offsets, weights, out=in_place[row], backend=backend)
    assert_close_to_reference(in_place[row], expected, offsets, storage_rtol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_t1_returns_gradient_unchanged(backend, rng):
    sizes = random_sizes(rng, 7)
    g = torch.randn(1, sum(sizes))
    out = mgs.modular_pcgrad(g, offsets_from_sizes(sizes), backend=backend)
    assert torch.equal(out, g[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_conflict_gives_plain_sum(backend, rng):
    # Non-negative gradients never conflict: every inner product is >= 0.
    T = rng.randint(2, 8)
    sizes = random_sizes(rng, 9)
    g = torch.rand(T, sum(sizes))
    out = mgs.modular_pcgrad(g, offsets_from_sizes(sizes), backend=backend)
    torch.testing.assert_close(out, g.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exactly_opposite_gradients_cancel(backend, rng):
    n = rng.randint(1, 500)
    g = torch.randn(1, n)
    grads = torch.cat([g, -g])
    # Each projects off the other completely: g1' = g1 - (-1) * g2 = 0, and likewise g2' = 0.
    out = mgs.modular_pcgrad(grads, [0, n], backend=backend)
    assert out.abs().max().item() <= 1e-6 * g.abs().max().item()
    w = mgs.pcgrad_weights(mgs.segmented_gram(grads, [0, n], backend=backend), backend=backend)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_orthogonal_gradients_never_project(backend):
    # Task 0 zero; tasks 1 and 2 on disjoint supports (exactly orthogonal); task 3 conflicts with 1.
    n = 64
    g = torch.zeros(4, n)
    g[1, :32] = torch.rand(32) + 0.1
    g[2, 32:] = torch.rand(32) + 0.1
    g[3, :32] = -g[1, :32]
    w = mgs.pcgrad_weights(mgs.segmented_gram(g, [0, n], backend=backend), order="fixed", backend=backend)
    ref = reference.pcgrad_weights(reference.gram(g, [0, n]), mgs.fixed_order(1, 4))
    torch.testing.assert_close(w.double(), ref)
    assert w[0, 0] == 1.0 and w[0, 2] == 1.0  # nobody projects on the zero or the orthogonal task


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    g = torch.randn(3, 60)
    g[1, 5] = float("inf")
    g[2, 30] = float("nan")
    g[0, 50] = float("-inf")
    off = [0, 20, 40, 60]
    gram = mgs.segmented_gram(g, off, backend=backend)
    assert gram[0, 1, 1] == float("inf") and torch.isfinite(gram[0, 0, 0]) and torch.isfinite(gram[0, 0, 2])
    assert torch.isnan(gram[1, 2, 2]) and torch.isfinite(gram[1, 0, 1])
    out = mgs.modular_pcgrad(g, off, order="fixed", backend=backend)
    ref = mgs.modular_pcgrad(g, off, order="fixed", backend="torch")
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert not torch.isfinite(out[5]) and torch.isnan(out[30]) and not torch.isfinite(out[50])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_does_not_hide_inf_or_nan(backend):
    grads = torch.randn(3, 50)
    grads[1, 7] = float("inf")
    grads[2, 40] = float("nan")
    weights = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = mgs.segmented_combine(grads, [0, 20, 50], weights, backend=backend)
    assert torch.isnan(out[7]) and torch.isnan(out[40])  # 0 * inf and 0 * nan are NaN: no task is skipped
    mask = torch.ones(50, dtype=torch.bool)
    mask[[7, 40]] = False
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pcgrad_weights_nonfinite_like_torch_backend(backend):
    gram = torch.randn(4, 3, 3)
    gram = gram @ gram.transpose(1, 2)
    gram[1, 0, 0] = float("inf")
    gram[2, 1, 2] = gram[2, 2, 1] = float("nan")
    gram[3] = float("inf")
    order = mgs.random_order(4, 3, generator=torch.Generator().manual_seed(0))
    w = mgs.pcgrad_weights(gram, order=order, backend=backend)
    w_torch = mgs.pcgrad_weights(gram, order=order, backend="torch")
    assert torch.equal(torch.isnan(w), torch.isnan(w_torch)) and torch.equal(torch.isinf(w), torch.isinf(w_torch))
    fin = torch.isfinite(w_torch)
    torch.testing.assert_close(w[fin], w_torch[fin])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for sizes in ([], [0], [0, 0, 0]):
        off = offsets_from_sizes(sizes)
        grads = torch.zeros(3, 0)
        gram = mgs.segmented_gram(grads, off, backend=backend)
        assert gram.shape == (len(sizes), 3, 3) and torch.all(gram == 0)
        assert mgs.modular_pcgrad(grads, off, backend=backend).shape == (0,)
    assert mgs.pcgrad_weights(torch.zeros(0, 3, 3), order="fixed", backend=backend).shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tasks_small_modules(backend, rng):
    # T = 64 (the native kernels' limit): small modules keep the float64 reference loop and the interpreter
    # short; wider than T so the Grams have full rank and the decisions a margin.
    for _ in range(50):
        sizes = [rng.randint(65, 96) for _ in range(rng.randint(2, 3))]
        offsets = offsets_from_sizes(sizes)
        grads = make_grads(64, sizes, torch.float32)
        order = mgs.random_order(len(sizes), 64, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        if reference.decision_margin(reference.gram(grads, offsets), order) > MARGIN:
            break
    out = mgs.modular_pcgrad(grads, offsets, order=order, backend=backend)
    assert_close_to_reference(out, reference_result(grads, offsets, order), offsets, 3e-4, grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_identical_reruns(backend, rng):
    T = rng.randint(2, 8)
    # modules of many chunks (the CPU's are 2^14 elements); the interpreter runs each program in Python
    sizes = random_sizes(rng, 15, max_size=40000 if backend != "triton" else 3000)
    g = torch.randn(T, sum(sizes))
    off = offsets_from_sizes(sizes)
    a = mgs.modular_pcgrad(g, off, generator=torch.Generator().manual_seed(3), backend=backend)
    b = mgs.modular_pcgrad(g, off, generator=torch.Generator().manual_seed(3), backend=backend)
    assert torch.equal(a, b)
    assert torch.equal(mgs.segmented_gram(g, off, backend=backend), mgs.segmented_gram(g, off, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_spanning_many_chunks(backend):
    # One module much larger than any chunk size, next to tiny and empty ones.
    sizes = [3, 0, 300_001, 1, 0]
    off = offsets_from_sizes(sizes)
    g = torch.randn(3, sum(sizes))
    gram = mgs.segmented_gram(g, off, backend=backend)
    ref = reference.gram(g, off)
    assert ((gram.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_random_order_is_a_permutation_of_the_others_and_reproducible():
    gen = torch.Generator().manual_seed(7)
    o = mgs.random_order(50, 6, generator=gen)
    assert o.shape == (50, 6, 5) and o.dtype == torch.int64
    for i in range(6):
        rows = o[:, i]
        assert not (rows == i).any()
        assert torch.equal(rows.sort(-1).values, torch.tensor([t for t in range(6) if t != i]).expand(50, 5))
    o2 = mgs.random_order(50, 6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(o, o2)
    assert not torch.equal(o, mgs.random_order(50, 6, generator=gen))  # the generator advances
    assert mgs.random_order(4, 1).shape == (4, 1, 0)
    # Uniform over permutations: the first visited task is each of the others about equally often.
    first = mgs.random_order(6000, 3, generator=torch.Generator().manual_seed(1))[:, 0, 0]
    frac = (first == 1).float().mean().item()
    assert 0.45 < frac < 0.55


def test_fixed_order_is_ascending():
    assert mgs.fixed_order(2, 4)[1].tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_reference_random_order_matches_fused_random_order():
    g = torch.randn(4, 90)
    off = [0, 30, 60, 90]
    a = mgs.modular_pcgrad(g, off, generator=torch.Generator().manual_seed(5))
    b = reference.modular_pcgrad(g, off, order="random", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=40 * _settings.get("MGS_HYPOTHESIS_SCALE"), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 6),
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    dtype=st.sampled_from(DTYPES),
    eps=st.sampled_from([0.0, 1e-12, 0.5]),
)
def test_property_modular_pcgrad(T, sizes, seed, scale, dtype, eps):
    case = property_case(T, sizes, seed, scale, dtype, eps, MARGIN)
    assume(case is not None)
    grads, offsets, order, ref = case
    for backend in BACKENDS:
        out = mgs.modular_pcgrad(grads, offsets, order=order, eps=eps, backend=backend)
        assert_close_to_reference(out, ref, offsets, storage_rtol(dtype), grads)
