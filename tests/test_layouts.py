"""Every backend on the layouts whose vector paths differ: a misaligned base (``buf[:, 1:]``; Triton views it
from the preceding 16-byte boundary with ``_aligned_view``), odd N, N % 8 == 0 with odd module starts, an odd
row stride, in place into a task row, and an output of another dtype (and another alignment).
Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

from __future__ import annotations

import pytest
import torch

import mgs_kernels as mgs
from mgs_kernels import reference

from conftest import BACKENDS, DEVICE, assert_close_to_reference, offsets_from_sizes, storage_rtol

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def test_aligned_view_shifts_to_the_boundary():
    pytest.importorskip("triton")
    from mgs_kernels.triton._launch import _aligned_view

    buf = torch.zeros(3, 128, dtype=torch.bfloat16, device=DEVICE)
    for k in range(9):
        v = buf[:, k : k + 100]
        w, shift = _aligned_view(v)
        assert w.data_ptr() % 16 == 0 and shift == k % 8
        assert w.stride() == v.stride() and w.shape == v.shape
        assert w.data_ptr() + shift * 2 == v.data_ptr()
    fresh = torch.zeros(5, dtype=torch.float32, device=DEVICE)
    assert _aligned_view(fresh) == (fresh, 0)


def rows_in(layout, grads):
    T, N = grads.shape
    if layout == "offset_base":
        buf = torch.full((T, N + 64), float("nan"), dtype=grads.dtype, device=DEVICE)  # NaN around: never read
        buf[:, 3 : N + 3] = grads
        return buf[:, 3 : N + 3]
    if layout == "odd_stride":
        buf = torch.full((T, N + 1 + N % 2), float("nan"), dtype=grads.dtype, device=DEVICE)
        buf[:, :N] = grads
        return buf[:, :N]
    return grads.clone()


CASES = {
    "offset_base": [70, 0, 129, 33],
    "odd_stride": [70, 0, 129, 33],
    "odd_n": [5, 0, 127, 3],
    "n8_odd_starts": [3, 61, 0, 17, 7],  # N = 88, modules start at 0, 3, 64, 64, 81
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(CASES))
@pytest.mark.parametrize("T", [2, 9])
def test_layouts_match_reference(backend, T, layout, dtype, rng):
    sizes = CASES[layout]
    offsets = offsets_from_sizes(sizes)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(30):  # a draw whose PCGrad decisions are not on a knife edge
        grads = torch.randn(T, sum(sizes), generator=gen).to(dtype)
        order = mgs.random_order(len(sizes), T, generator=gen)
        if reference.decision_margin(reference.gram(grads, offsets), order) >= 1e-3:
            break
    g = rows_in(layout, grads.to(DEVICE))
    off = offsets.to(DEVICE)
    gram = mgs.segmented_gram(g, off, backend=backend)
    ref_gram = reference.gram(grads, offsets)
    scale = torch.diagonal(ref_gram, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    assert ((gram.double().cpu() - ref_gram).abs() / scale).max().item() < 1e-5
    if reference.decision_margin(ref_gram, order) < 1e-3:
        pytest.skip("no draw with decisions away from a knife edge")
    ref = reference.modular_pcgrad(grads, offsets, order=order, dtype=torch.float64)
    out = mgs.modular_pcgrad(g, off, order=order.to(DEVICE), backend=backend)
    assert_close_to_reference(out, ref, offsets, storage_rtol(dtype), grads=grads)
    # out of another dtype and alignment: a float32 view one element past a boundary
    store = torch.full((g.shape[1] + 1,), float("nan"), device=DEVICE)
    out2 = mgs.modular_pcgrad(g, off, order=order.to(DEVICE), out=store[1:], backend=backend)
    assert_close_to_reference(out2, ref, offsets, max(storage_rtol(dtype), 2e-4), grads=grads)
    assert torch.isnan(store[0])
    # in place into the last task row (shares the rows' alignment)
    mgs.modular_pcgrad(g, off, order=order.to(DEVICE), out=g[T - 1], backend=backend)
    assert torch.equal(g[T - 1], out)
    if layout in ("offset_base", "odd_stride"):  # the padding around the rows was never written
        assert torch.isnan(g._base[:, g.shape[1] + (3 if layout == "offset_base" else 0):]).all()
