"""pytest-benchmark suite for the core ops, on demand only (CI's default run collects ``tests/``):

    pytest bench/test_bench_ops.py                                   # every available backend
    pytest bench/test_bench_ops.py -k "cpu and T8" --benchmark-columns=median,iqr,ops
    pytest bench/test_bench_ops.py --benchmark-json=bench.json       # machine-readable

Layout: Llama-3.1-8B per-tensor (291 tensors) scaled to N ~ 2e6 (MGS_BENCH_N overrides), fp32 and bf16,
T in {3, 8}. Runs on CUDA when one is present (synchronised around every call), else on the CPU.
Each benchmark first checks the backend's result against the torch backend, so a broken kernel fails
instead of posting a time.
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import layouts  # noqa: E402
import mgs_kernels  # noqa: E402
from mgs_kernels import _settings, reference  # noqa: E402
from providers import backend_names  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backend_names(DEVICE)
N = float(_settings.get("MGS_BENCH_N") or 2e6)
LAYOUT = layouts.scaled("llama3.1-8b", N)
OFFSETS = LAYOUT.offsets("tensor").to(DEVICE)
M = LAYOUT.num_modules("tensor")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "bf16": 2e-2}

_cache = {}


def _inputs(T: int, dtype: str):
    key = (T, dtype)
    if key not in _cache:
        gen = torch.Generator().manual_seed(T)
        grads = torch.randn(T, LAYOUT.numel, generator=gen).to(DEVICE, DTYPES[dtype])
        order = mgs_kernels.random_order(M, T, generator=gen).to(DEVICE)
        _cache.clear()  # one input set alive at a time
        _cache[key] = (grads, order)
    return _cache[key]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, fn):
    def call():
        out = fn()
        _sync()
        return out

    call()  # warm-up: plans, caches, kernel compilation
    return benchmark(call)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item() or 1.0
    assert err / scale <= tol, f"max relative error {err / scale:.2e} > {tol:.0e}"


params = pytest.mark.parametrize("backend", BACKENDS)
shapes = pytest.mark.parametrize("T", [3, 8], ids=lambda t: f"T{t}")
dtypes = pytest.mark.parametrize("dtype", list(DTYPES))


@params
@shapes
@dtypes
def test_segmented_gram(benchmark, backend, T, dtype):
    grads, _ = _inputs(T, dtype)
    gram = _bench(benchmark, lambda: mgs_kernels.segmented_gram(grads, OFFSETS, backend=backend))
    _close(gram, reference.gram(grads, OFFSETS, torch.float64), 1e-4)
    benchmark.extra_info.update(N=LAYOUT.numel, M=M, bytes_read=grads.numel() * grads.element_size())


@params
@shapes
def test_pcgrad_weights(benchmark, backend, T):
    grads, order = _inputs(T, "fp32")
    gram = reference.gram(grads, OFFSETS, torch.float32)
    weights = _bench(benchmark, lambda: mgs_kernels.pcgrad_weights(gram, order=order, backend=backend))
    want = mgs_kernels.pcgrad_weights(gram, order=order, backend="torch")
    _close(weights, want, 1e-4)
    benchmark.extra_info.update(M=M)


@params
@shapes
@dtypes
def test_segmented_combine(benchmark, backend, T, dtype):
    grads, _ = _inputs(T, dtype)
    weights = torch.rand(M, T, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = _bench(benchmark, lambda: mgs_kernels.segmented_combine(grads, OFFSETS, weights, backend=backend))
    want = mgs_kernels.segmented_combine(grads, OFFSETS, weights, backend="torch")
    _close(out, want, TOL[dtype])
    benchmark.extra_info.update(N=LAYOUT.numel, M=M, bytes=(T + 1) * grads.shape[1] * grads.element_size())


@params
@shapes
@dtypes
def test_modular_pcgrad(benchmark, backend, T, dtype):
    grads, order = _inputs(T, dtype)
    out = _bench(benchmark, lambda: mgs_kernels.modular_pcgrad(grads, OFFSETS, order=order, backend=backend))
    want = mgs_kernels.modular_pcgrad(grads, OFFSETS, order=order, backend="torch")
    _close(out, want, TOL[dtype])
    benchmark.extra_info.update(N=LAYOUT.numel, M=M, floor_bytes=(2 * T + 1) * grads.shape[1] * grads.element_size())


@shapes
def test_reference_loop(benchmark, T):
    """The baseline: the per-module Python loop users write today (few rounds: it is slow)."""
    grads, order = _inputs(T, "fp32")
    benchmark.pedantic(lambda: (reference.modular_pcgrad(grads, OFFSETS, order=order), _sync()),
                       rounds=3, iterations=1, warmup_rounds=1)
