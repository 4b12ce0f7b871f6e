"""What is specific to the native CPU backend (mgs_kernels._mgs_cpu): its register-tile task counts, up to
64 tasks, thread-count independence and the cache-blocked schedule. The behaviour every backend shares is
tests/test_ops.py's matrix. Skipped when the module is not built.
"""

from __future__ import annotations

import pytest
import torch

import mgs_kernels as mk
from mgs_kernels import reference

cpu_native = pytest.importorskip("mgs_kernels._mgs_cpu", reason="native CPU module not built")

STORAGE = [torch.float32, torch.bfloat16, torch.float16]
# fp32 accumulation against float64, relative to each module's scale; output tolerances include the
# final rounding to the storage dtype.
OUT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
ODD_SIZES = [0, 1, 7, 0, 33, 1000, 16385, 5, 0, 40001, 3]  # empty modules, chunk edges, odd tails


def offsets_of(sizes):
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    if sizes:
        torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0, out=off[1:])
    return off


def rand_grads(T, N, dtype, seed, row_pad=0):
    g = torch.Generator().manual_seed(seed)
    # a shared direction with random signed weights plus noise: cosines spread over (-1, 1), so that
    # conflicts and projections happen and few decisions sit on a knife edge; mixed task scales
    mix = torch.rand(T, 1, generator=g) * 2 - 1
    base = mix * torch.randn(1, N + row_pad, generator=g) + 0.5 * torch.randn(T, N + row_pad, generator=g)
    base *= torch.logspace(-1, 1, T).unsqueeze(1)
    return base[:, :N].to(dtype) if row_pad == 0 else base.to(dtype)[:, row_pad // 2 : row_pad // 2 + N]


def check_gram(G, grads, off):
    ref = reference.gram(grads, off)
    diag = torch.diagonal(ref, dim1=1, dim2=2).clamp_min(0).sqrt()
    scale = diag.unsqueeze(2) * diag.unsqueeze(1)
    assert G.dtype == torch.float32 and G.shape == ref.shape
    err = (G.double() - ref).abs()
    assert torch.all(err <= 1e-4 * scale + 1e-30), f"max err {float((err / (scale + 1e-30)).max())}"
    assert torch.equal(G, G.transpose(1, 2))


def check_output(out, grads, off, order, eps=0.0, rtol=None):
    """out vs the float64 Python loop; scale per module = sum_k max|g_k| over the module. Modules whose
    PCGrad decisions sit on a knife edge (decision_margin < 1e-3) are not compared."""
    rtol = rtol if rtol is not None else OUT_RTOL[grads.dtype]
    ref = reference.modular_pcgrad(grads, off, order=order, eps=eps, dtype=torch.float64)
    gram = reference.gram(grads, off)
    bounds = off.tolist()
    checked = 0
    for m in range(len(bounds) - 1):
        a, b = bounds[m], bounds[m + 1]
        if a == b or reference.decision_margin(gram[m : m + 1], order[m : m + 1], eps) < 1e-3:
            continue
        checked += 1
        scale = float(grads[:, a:b].double().abs().amax(dim=1).sum()) * max(1, grads.shape[0])
        err = float((out[a:b].double() - ref[a:b]).abs().max())
        assert err <= rtol * scale + 1e-30, f"module {m}: err {err} > {rtol} * {scale}"
    return checked


# ------------------------------------------------------------------------------------------------------
# the three stages


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 13])
def test_gram_matches_reference(dtype, T):
    off = offsets_of(ODD_SIZES)
    grads = rand_grads(T, int(off[-1]), dtype, seed=T)
    check_gram(mk.segmented_gram(grads, off, backend="cpu"), grads, off)


@pytest.mark.parametrize("T", [33, 64])
def test_gram_many_tasks(T):
    off = offsets_of([0, 17, 300, 1, 0, 129])
    grads = rand_grads(T, int(off[-1]), torch.float32, seed=T)
    check_gram(mk.segmented_gram(grads, off, backend="cpu"), grads, off)


@pytest.mark.parametrize("T", [1, 2, 3, 6, 17, 64])
def test_weights_match_torch_backend_and_reference(T):
    M = 9
    off = offsets_of([0, 50, 3, 100, 64, 1, 0, 257, 31])
    grads = rand_grads(T, int(off[-1]), torch.float32, seed=100 + T)
    gram = mk.segmented_gram(grads, off, backend="cpu")
    order = mk.random_order(M, T, generator=torch.Generator().manual_seed(T))
    w = mk.pcgrad_weights(gram, order=order, backend="cpu")
    w_torch = mk.pcgrad_weights(gram, order=order, backend="torch")
    w_ref = reference.pcgrad_weights(gram.double(), order)
    assert w.dtype == torch.float32 and w.shape == (M, T)
    if reference.decision_margin(gram, order) >= 1e-3:
        torch.testing.assert_close(w.double(), w_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w, w_torch, rtol=1e-4, atol=1e-4)


def test_modular_pcgrad_many_tasks_and_eps():
    T = 64
    off = offsets_of([5, 0, 200, 77])
    grads = rand_grads(T, int(off[-1]), torch.float32, seed=64)
    order = mk.random_order(4, T, generator=torch.Generator().manual_seed(1))
    for eps in (0.0, 1e-12, 30.0):
        out = mk.modular_pcgrad(grads, off, order=order, eps=eps, backend="cpu")
        check_output(out, grads, off, order, eps=eps, rtol=3e-4)


def test_bitwise_deterministic_across_runs_and_thread_counts():
    T = 5
    off = offsets_of(ODD_SIZES * 3)
    grads = rand_grads(T, int(off[-1]), torch.float32, seed=13)
    order = mk.random_order(len(ODD_SIZES) * 3, T, generator=torch.Generator().manual_seed(13))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, 3, threads):
            torch.set_num_threads(n)
            results.append((mk.segmented_gram(grads, off, backend="cpu"),
                            mk.modular_pcgrad(grads, off, order=order, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for G, out in results[1:]:
        assert torch.equal(G, results[0][0])
        assert torch.equal(out, results[0][1])


# ------------------------------------------------------------------------------------------------------
# cache-blocked schedule


BLOCK_SIZES = [0, 5, 16384, 0, 16385, 3, 40001, 0, 0, 700, 1, 70000, 2, 0]
BUDGETS = [0, 1, 4096, 100_000, 1 << 20, -1]  # 0: two passes; 1 / 4 KB: every module alone; -1: default


def run_with_budget(monkeypatch, budget, grads, off, order, out=None, eps=0.0, threads=None):
    if budget is None:
        monkeypatch.delenv("MGS_CPU_CACHE_BYTES", raising=False)
    else:
        monkeypatch.setenv("MGS_CPU_CACHE_BYTES", str(budget))
    old = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return mk.modular_pcgrad(grads, off, order=order, eps=eps, out=out, backend="cpu")
    finally:
        torch.set_num_threads(old)


def staged(grads, off, order, eps=0.0):
    """The separate segmented_gram / pcgrad_weights / segmented_combine entries (unchanged two-pass code)."""
    w = mk.pcgrad_weights(mk.segmented_gram(grads, off, backend="cpu"), order=order, eps=eps, backend="cpu")
    return mk.segmented_combine(grads, off, w, backend="cpu")


def test_cache_budget_env_parsing(monkeypatch):
    from mgs_kernels.backends import cpu_backend

    monkeypatch.delenv("MGS_CPU_CACHE_BYTES", raising=False)
    assert cpu_backend.cache_bytes() == -1
    monkeypatch.setenv("MGS_CPU_CACHE_BYTES", "0")
    assert cpu_backend.cache_bytes() == 0
    monkeypatch.setenv("MGS_CPU_CACHE_BYTES", "4e6")
    assert cpu_backend.cache_bytes() == 4_000_000
    monkeypatch.setenv("MGS_CPU_CACHE_BYTES", "lots")
    with pytest.raises(ValueError):
        cpu_backend.cache_bytes()
    assert cpu_native.llc_bytes() > 0 and cpu_native.l2_bytes() > 0
    assert 0 < cpu_native.default_cache_bytes(2) <= cpu_native.llc_bytes()
    assert cpu_native.auto_cache_bytes(1, 2) == 0  # fits in the LLC: two passes
    assert cpu_native.auto_cache_bytes(1 << 50, 2) == cpu_native.default_cache_bytes(2)


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("T", [1, 3, 8, 64])
def test_blocked_schedule_bitwise_equal_two_pass(monkeypatch, dtype, T):
    off = offsets_of(BLOCK_SIZES)
    grads = rand_grads(T, int(off[-1]), dtype, seed=100 + T)
    order = mk.random_order(len(BLOCK_SIZES), T, generator=torch.Generator().manual_seed(T))
    expected = staged(grads, off, order)
    results = {}
    for budget in BUDGETS + [None]:
        for threads in (1, 2):
            out = run_with_budget(monkeypatch, budget, grads, off, order, threads=threads)
            assert torch.equal(out, expected), (budget, threads)
            results[budget, threads] = out
    if T <= 8:
        assert check_output(expected, grads, off, order) > 0


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("budget", [0, 4096, 300_000])
def test_blocked_schedule_in_place_and_poisoned_out(monkeypatch, dtype, budget):
    T = 3
    off = offsets_of(BLOCK_SIZES)
    grads = rand_grads(T, int(off[-1]), dtype, seed=7)
    order = mk.random_order(len(BLOCK_SIZES), T, generator=torch.Generator().manual_seed(7))
    expected = staged(grads, off, order)
    out = torch.full_like(expected, float("nan"))
    assert run_with_budget(monkeypatch, budget, grads, off, order, out=out) is out
    assert torch.equal(out, expected)
    for row in range(T):
        for threads in (1, 2):
            g = grads.clone()
            run_with_budget(monkeypatch, budget, g, off, order, out=g[row], threads=threads)
            assert torch.equal(g[row], expected)
            others = [r for r in range(T) if r != row]
            assert torch.equal(g[others], grads[others])
    # bf16 / fp16 output of fp32 storage (and the reverse) through the blocked path
    out2 = torch.empty(grads.shape[1], dtype=torch.float32 if dtype != torch.float32 else torch.bfloat16)
    ref2 = torch.empty_like(out2)
    run_with_budget(monkeypatch, 0, grads, off, order, out=ref2)
    run_with_budget(monkeypatch, budget, grads, off, order, out=out2)
    assert torch.equal(out2, ref2)


@pytest.mark.parametrize("budget", [0, 4096, 1 << 20])
def test_blocked_schedule_nan_inf_and_eps(monkeypatch, budget):
    T = 4
    off = offsets_of(BLOCK_SIZES)
    grads = rand_grads(T, int(off[-1]), torch.float32, seed=11)
    grads[1, 5 + 100] = float("nan")     # module 2
    grads[2, int(off[6]) + 7] = float("inf")  # module 6
    order = mk.random_order(len(BLOCK_SIZES), T, generator=torch.Generator().manual_seed(11))
    expected = staged(grads, off, order, eps=1e-3)
    out = run_with_budget(monkeypatch, budget, grads, off, order, eps=1e-3)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(expected))
    assert torch.isnan(out[5 + 100])  # never masked
    assert not torch.isfinite(out[int(off[6]) + 7])
    assert torch.isfinite(out[off[8] :]).all()


def test_blocked_schedule_large_layout_threads(monkeypatch):
    """Many modules, several groups per call, odd thread counts: identical bits everywhere."""
    T = 5
    sizes = [0, 3, 9000, 17000, 1, 65536, 33000, 0, 120] * 12
    off = offsets_of(sizes)
    grads = rand_grads(T, int(off[-1]), torch.bfloat16, seed=5)
    order = mk.random_order(len(sizes), T, generator=torch.Generator().manual_seed(5))
    expected = staged(grads, off, order)
    for budget in (0, 50_000, 1 << 20, 8 << 20, None):
        for threads in (1, 2, 3):
            assert torch.equal(run_with_budget(monkeypatch, budget, grads, off, order, threads=threads), expected)
