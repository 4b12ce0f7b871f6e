"""What is specific to the Triton backend (tile paths, chunk sizes, large T, edge layouts, GPU-only shapes);
the behaviour every backend shares is tests/test_ops.py's matrix, which includes Triton.

Without a GPU the kernels run on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before any kernel module is imported): small shapes only, the interpreter executes every program in
Python. With a GPU the same tests run compiled on cuda, plus the tests marked
``gpu`` (large shapes, N > 2^31 indexing, CUDA-graph capture).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


import mgs_kernels as mgs  # noqa: E402
from mgs_kernels import reference  # noqa: E402
from mgs_kernels._plan import get_plan  # noqa: E402
from mgs_kernels.backends import torch_backend, triton_backend  # noqa: E402

from conftest import (assert_close_to_reference, offsets_from_sizes, random_sizes,  # noqa: E402
                      storage_rtol)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MARGIN = 1e-3  # skip draws whose PCGrad branch decisions sit within float32 rounding of a flip
GRAM_RTOL = 1e-5  # float32 accumulation, relative to the module's largest squared norm

# The interpreter computes with numpy, which warns on inf * 0 in the NaN / Inf propagation tests.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def kernels():
    from mgs_kernels import triton as k

    return k


def make_grads(T, sizes, dtype, gen=None):
    return torch.randn(T, sum(sizes), generator=gen).to(dtype).to(DEVICE)


def draw_order(M, T, rng):
    return mgs.random_order(M, T, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).to(DEVICE)


def draw_case(rng, T, dtype, num_modules=(1, 8), max_size=700):
    """Fresh random inputs of odd sizes (with empty modules) whose decisions are not on a knife edge."""
    for _ in range(50):
        sizes = random_sizes(rng, rng.randint(*num_modules), max_size=max_size)
        offsets = offsets_from_sizes(sizes)
        grads = make_grads(T, sizes, dtype)
        order = draw_order(len(sizes), T, rng)
        if reference.decision_margin(reference.gram(grads.cpu(), offsets), order) > MARGIN:
            break
    return sizes, offsets.to(DEVICE), grads, order


def assert_gram_close(gram, grads, offsets):
    ref = reference.gram(grads.cpu(), offsets.cpu())
    assert gram.dtype == torch.float32 and gram.shape == ref.shape
    scale = torch.diagonal(ref, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    err = ((gram.double().cpu() - ref).abs() / scale).max().item() if ref.numel() else 0.0
    assert err < GRAM_RTOL, err
    assert torch.equal(gram, gram.transpose(1, 2))  # exactly symmetric by construction
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    for m, n in enumerate(sizes):
        if n == 0:
            assert (gram[m] == 0).all()


def test_backend_is_available_here():
    assert "triton" in mgs.available_backends()
    assert triton_backend.supports(DEVICE)
    assert mgs.backends.get_backend("triton", DEVICE) is triton_backend.BACKEND


# ---------------------------------------------------------------------------------------- Gram


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_gram_matches_reference(T, dtype, rng):
    sizes = random_sizes(rng, rng.randint(1, 7), max_size=900)
    offsets = offsets_from_sizes(sizes).to(DEVICE)
    grads = make_grads(T, sizes, dtype)
    gram = mgs.segmented_gram(grads, offsets, backend="triton")
    assert_gram_close(gram, grads, offsets)


@pytest.mark.parametrize("force_dot", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 33, 100, 4096])
def test_segmented_gram_tile_paths_and_chunk_sizes(force_dot, chunk_size, rng):
    # Both tile paths (outer-product FMA, tl.dot padded to 16 rows) with chunks from one element
    # (every block masked) to larger than any module (one chunk per module), unaligned module starts.
    T = rng.choice([2, 3, 5])
    sizes = [0, 1, 31, 32, 33, 0, 257, rng.randint(1, 400)]
    offsets = offsets_from_sizes(sizes).to(DEVICE)
    grads = make_grads(T, sizes, torch.float32)
    plan = get_plan(offsets, grads.shape[1])
    gram = kernels().segmented_gram(grads, plan, chunk_size=chunk_size, force_dot=force_dot)
    assert_gram_close(gram, grads, offsets)


def test_segmented_gram_t64_tiny():
    sizes = [5, 0, 70, 1]
    offsets = offsets_from_sizes(sizes).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        grads = make_grads(64, sizes, dtype)
        assert_gram_close(mgs.segmented_gram(grads, offsets, backend="triton"), grads, offsets)


def test_segmented_gram_many_chunks_per_module():
    # A module of many chunks (more than one block of the reduction pass) next to tiny ones.
    sizes = [3, 0, 3001, 1]
    offsets = offsets_from_sizes(sizes).to(DEVICE)
    grads = make_grads(3, sizes, torch.float32)
    plan = get_plan(offsets, grads.shape[1])
    assert_gram_close(kernels().segmented_gram(grads, plan, chunk_size=64), grads, offsets)


def test_segmented_gram_edge_layouts():
    for sizes in ([0], [0, 0, 0], [1], [7, 0]):
        offsets = offsets_from_sizes(sizes).to(DEVICE)
        grads = make_grads(2, sizes, torch.float32)
        gram = mgs.segmented_gram(grads, offsets, backend="triton")
        assert gram.shape == (len(sizes), 2, 2)
        assert_gram_close(gram, grads, offsets)
    # Rows with padding between them (stride(0) > N): a view of a wider buffer.
    wide = torch.randn(3, 200, device=DEVICE)
    view = wide[:, 10:147]
    offsets = torch.tensor([0, 50, 137], device=DEVICE)
    assert_gram_close(mgs.segmented_gram(view, offsets, backend="triton"), view, offsets)


# ---------------------------------------------------------------------------------------- solve


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 16, 64])
def test_pcgrad_weights_match_reference(T, rng):
    M = 6 if T < 64 else 2
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(50):
        v = torch.randn(M, T, 4 * T + 3, generator=gen, dtype=torch.float64)
        gram64 = v @ v.transpose(1, 2)
        order = mgs.random_order(M, T, generator=gen)
        if reference.decision_margin(gram64, order) > MARGIN:
            break
    w = mgs.pcgrad_weights(gram64.float().to(DEVICE), order=order.to(DEVICE), backend="triton")
    ref = reference.pcgrad_weights(gram64, order)
    assert w.dtype == torch.float32 and w.shape == (M, T)
    torch.testing.assert_close(w.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    # Same arithmetic as the torch backend.
    w_torch = torch_backend.pcgrad_weights(gram64.float(), order, 0.0)
    torch.testing.assert_close(w.cpu(), w_torch, rtol=1e-5, atol=1e-5)


def test_pcgrad_weights_eps_zero_and_opposite_tasks():
    n = 64
    g = torch.zeros(5, n)
    g[1, :32] = torch.rand(32) + 0.1
    g[2, 32:] = torch.rand(32) + 0.1
    g[3, :32] = -g[1, :32]  # exactly opposite of task 1
    g[4] = 1e-4 * torch.rand(n)  # tiny norm: eps decides whether anybody projects on it
    gram = reference.gram(g, [0, n])
    for eps in (0.0, 1e-12, 1.0):
        order = mgs.fixed_order(1, 5)
        w = mgs.pcgrad_weights(gram.float().to(DEVICE), order=order.to(DEVICE), eps=eps, backend="triton")
        ref = reference.pcgrad_weights(gram, order, eps)
        torch.testing.assert_close(w.double().cpu(), ref, rtol=1e-5, atol=1e-6)
        assert w[0, 0] == 1.0  # nobody projects on the zero task


@pytest.mark.parametrize("chunk_size", [1, 45, 4096])
def test_segmented_combine_blocks_and_chunks(chunk_size):
    T = 7  # two row groups of the combine's task loop, the second one padded
    sizes = [0, 1, 31, 32, 33, 0, 300]
    offsets = offsets_from_sizes(sizes).to(DEVICE)
    grads = make_grads(T, sizes, torch.float32)
    weights = torch.randn(len(sizes), T, device=DEVICE)
    plan = get_plan(offsets, grads.shape[1])
    out = torch.full((sum(sizes),), float("nan"), device=DEVICE)
    kernels().segmented_combine(grads, plan, weights, out, chunk_size=chunk_size)
    expected = torch.cat([(weights[m, :, None] * grads[:, offsets[m]:offsets[m + 1]]).sum(0) for m in range(len(sizes))])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [2, 8, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_large_matches_torch_backend(T, dtype):
    gen = torch.Generator(device="cuda").manual_seed(T)
    sizes = [4096 * 4096, 0, 1, 11_008 * 4096 + 3, 4096, 17]
    N = sum(sizes) if T <= 16 else sum(sizes) // 8
    sizes = sizes if T <= 16 else [s // 8 for s in sizes]
    off = offsets_from_sizes(sizes).cuda()
    g = torch.randn(T, N, device="cuda", generator=gen).to(dtype)
    gram = mgs.segmented_gram(g, off, backend="triton")
    ref = torch_backend.segmented_gram(g, get_plan(off, N))
    scale = torch.diagonal(ref, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    assert ((gram - ref).abs() / scale).max().item() < 1e-4
    order = mgs.random_order(len(sizes), T, generator=gen)
    out = mgs.modular_pcgrad(g, off, order=order, backend="triton")
    w = torch_backend.pcgrad_weights(gram, order, 0.0)
    expected = torch.empty(N, dtype=torch.float32, device="cuda")
    torch_backend.segmented_combine(g, get_plan(off, N), w, expected)
    assert_close_to_reference(out.float(), expected, off.cpu(), storage_rtol(dtype))
    assert torch.equal(out, mgs.modular_pcgrad(g, off, order=order, backend="triton"))


@pytest.mark.gpu
@needs_cuda
def test_gpu_int64_indexing_beyond_2_31():
    # bf16, T=2: 2 x (2^31 + 4101) elements (~8.6 GB). The last modules start past 2^31 elements, and
    # row 1 starts past 2^31 elements from the base pointer.
    free, _ = torch.cuda.mem_get_info()
    n_big = (1 << 31) + 5
    tail = [0, 4095, 1]
    N = n_big + sum(tail)
    if free < 2.6 * 2 * N * 2:
        pytest.skip("not enough GPU memory")
    g = torch.empty(2, N, dtype=torch.bfloat16, device="cuda")
    g[:, :n_big].fill_(0.5)
    g[1, :n_big].fill_(-0.25)
    small = torch.randn(2, sum(tail), device="cuda").to(torch.bfloat16)
    small[1, :100] = -small[0, :100]
    g[:, n_big:] = small
    off = offsets_from_sizes([n_big, *tail]).cuda()
    gram = mgs.segmented_gram(g, off, backend="triton")
    ref_tail = reference.gram(small.cpu(), offsets_from_sizes(tail))
    torch.testing.assert_close(gram[1:].double().cpu(), ref_tail, rtol=1e-5, atol=1e-5)
    big = torch.tensor([[0.25, -0.125], [-0.125, 0.0625]], dtype=torch.float64) * n_big
    torch.testing.assert_close(gram[0].double().cpu(), big, rtol=1e-5, atol=0)
    order = mgs.fixed_order(len(tail) + 1, 2, device="cuda")
    out = mgs.modular_pcgrad(g, off, order=order, backend="triton")
    # Module 0: exactly opposite directions, so each projects off the other completely -> 0.
    assert out[:n_big].abs().max().item() == 0.0
    ref = reference.modular_pcgrad(small.cpu(), offsets_from_sizes(tail), order=mgs.fixed_order(len(tail), 2),
                                   dtype=torch.float64)  # fmt: skip
    assert_close_to_reference(out[n_big:], ref, offsets_from_sizes(tail), storage_rtol(torch.bfloat16))
    mgs.modular_pcgrad(g, off, order=order, out=g[1], backend="triton")  # in place into row 1
    assert torch.equal(g[1, n_big:], out[n_big:])


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_capture():
    T, sizes = 4, [1000, 0, 123_457, 77]
    off = offsets_from_sizes(sizes).cuda()
    g = torch.randn(T, sum(sizes), device="cuda")
    order = mgs.random_order(len(sizes), T, generator=torch.Generator(device="cuda").manual_seed(0))
    out = torch.empty(sum(sizes), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mgs.modular_pcgrad(g, off, order=order, out=out, backend="triton")  # warm up: compile + plan
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mgs.modular_pcgrad(g, off, order=order, out=out, backend="triton")
    g.copy_(torch.randn_like(g))
    graph.replay()
    torch.cuda.synchronize()
    expected = mgs.modular_pcgrad(g, off, order=order, backend="triton")
    assert torch.equal(out, expected)
