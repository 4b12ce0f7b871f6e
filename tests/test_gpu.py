"""GPU checks of EVERY GPU backend (native ``cuda`` and ``triton``); skipped without a CUDA device.

Run by ``bash bench/gpu_check.sh`` (``pytest -m gpu``). What only a GPU can prove:
* parity of each backend with the torch backend and the float64 reference for T in {1, 2, 3, 8, 9, 16, 64}
  x {fp32, bf16, fp16} x layouts (contiguous rows, odd N, N % 8 == 0 with odd module starts, a misaligned
  base ``buf[:, 1:]``, in place into a task row, an output of another dtype);
* IEEE division in the solves (weights bitwise equal to the torch backend where only a division rounds);
* the fused optimizer step against torch's foreach and fused Adam / AdamW / SGD, with a parameter that is
  not 16-byte aligned and odd-sized parameters (unaligned slots in the task buffer);
* CUDA-graph capture of ``modular_pcgrad`` and of ``ModularGradientSurgery.step``;
* tensors on cuda:1 while cuda:0 is current (with two devices);
* the tensor-core Gram (T >= 9) on a 2^22-element module against float64 (long tf32x3 / bf16 accumulations);
* N > 2^31 elements (int64 indexing).
A backend that is built but cannot run on this GPU machine FAILS here (with the reason), it is not skipped.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import _native, _settings, backends, reference
from mgs_kernels._plan import get_plan
from mgs_kernels.backends import torch_backend

from conftest import offsets_from_sizes, storage_rtol

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ("cuda", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TASKS = (1, 2, 3, 8, 9, 16, 64)
LAYOUTS = ("contiguous", "odd_n", "odd_starts", "offset_base", "in_place", "out_other_dtype")
MARGIN = 1e-4  # modules whose decisions sit closer than this to a flip are not compared with float64


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    name = request.param
    if name == "cuda":
        try:
            _native.cuda_module()
        except ImportError as exc:
            if "cuda" in _settings.get("MGS_REQUIRE_NATIVE"):
                pytest.fail(str(exc))
            pytest.skip(f"native CUDA module not built: {exc}")
    if name == "triton":
        pytest.importorskip("triton")
    why = backends.backend_status(torch.device("cuda"))[name]
    assert why is None, f"backend {name!r} cannot run on this GPU machine: {why}"
    return name


def _max_tasks(backend_name: str, dtype: torch.dtype) -> int:
    if backend_name == "triton":
        from mgs_kernels.triton import _config

        return _config.max_tasks(dtype)
    return _native.MAX_TASKS


def _sizes(layout: str, T: int):
    if layout == "odd_starts":  # N % 8 == 0, but modules start at odd offsets
        return [3, 4093, 0, 17, 70_001, 2, 1]  # sum 74_117 ... padded below to a multiple of 8
    if layout == "odd_n":
        return [5, 0, 40_001, 77, 2049]
    return [4096, 0, 65_536 + 8, 512, 24]


@functools.lru_cache(maxsize=None)
def _case(T: int, dtype: torch.dtype, layout: str):
    """CPU inputs, offsets, order, float64 Gram / reference output and the modules to compare."""
    sizes = list(_sizes(layout, T))
    if layout == "odd_starts":
        sizes[-1] += (-sum(sizes)) % 8
    offsets = offsets_from_sizes(sizes)
    gen = torch.Generator().manual_seed(1000 * T + len(layout))
    grads = torch.randn(T, sum(sizes), generator=gen)
    if T >= 2:
        grads[1] = -0.7 * grads[0] + 0.4 * grads[1]
    grads = grads.to(dtype)
    order = mgs.random_order(len(sizes), T, generator=gen)
    gram64 = reference.gram(grads, offsets)
    checked = [m for m, n in enumerate(sizes) if n and (T == 1 or T > 16 or
               reference.decision_margin(gram64[m:m + 1], order[m:m + 1]) >= MARGIN)]  # fmt: skip
    ref = reference.modular_pcgrad(grads, offsets, order=order, dtype=torch.float64) if T <= 16 else None
    return grads, offsets, order, gram64, ref, checked


def _on_gpu(grads: torch.Tensor, layout: str) -> torch.Tensor:
    T, N = grads.shape
    if layout == "offset_base":
        buf = torch.zeros(T, N + 64, dtype=grads.dtype, device="cuda")
        buf[:, 1 : N + 1] = grads.cuda()
        return buf[:, 1 : N + 1]
    return grads.cuda().contiguous()


def _assert_modules_close(out, ref, grads, offsets, checked, rtol, what):
    out = out.double().cpu()
    b = offsets.tolist()
    for m in checked:
        lo, hi = b[m], b[m + 1]
        scale = max(ref[lo:hi].abs().max().item(), grads[:, lo:hi].double().abs().max().item(), 1e-30)
        err = (out[lo:hi] - ref[lo:hi]).abs().max().item()
        assert err <= rtol * scale, f"{what}: module {m} error {err:.3e} > {rtol:.1e} * {scale:.3e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T", TASKS)
def test_parity_with_torch_backend_and_float64(backend, T, dtype, layout):
    if T > _max_tasks(backend, dtype):
        pytest.skip(f"{backend} supports at most {_max_tasks(backend, dtype)} tasks for {dtype}")
    grads, offsets, order, gram64, ref, checked = _case(T, dtype, layout)
    g = _on_gpu(grads, layout)
    off = offsets.cuda()
    table = order.cuda()
    what = f"{backend} T={T} {dtype} {layout}"
    # Gram: float32 accumulation (tf32x3 / exact bf16 products on tensor cores) vs float64
    gram = mgs.segmented_gram(g, off, backend=backend)
    scale = torch.diagonal(gram64, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    # (16384-element chunks are summed sequentially in float32 by the CUDA generic kernel: ~1e-5 relative)
    assert ((gram.double().cpu() - gram64).abs() / scale).max().item() < 5e-5, what
    assert torch.equal(gram, gram.transpose(1, 2)), what
    gram_t = torch_backend.segmented_gram(g, get_plan(off, g.shape[1]))
    assert ((gram.double() - gram_t.double()).abs().cpu() / scale).max().item() < 5e-5, what
    # solve on the same Gram as the torch backend: same decisions away from knife edges
    w = mgs.pcgrad_weights(gram, order=table, backend=backend)
    w_t = torch_backend.pcgrad_weights(gram, table, 0.0)
    for m in checked if T <= 16 else []:  # T > 16: random draws always have knife-edge decisions
        torch.testing.assert_close(w[m], w_t[m], rtol=1e-5, atol=1e-5, msg=what)
    # the whole pipeline vs float64 (T <= 16) and vs the torch backend
    if layout == "in_place":
        out = mgs.modular_pcgrad(g, off, order=table, out=g[T - 1], backend=backend)
        assert out.data_ptr() == g[T - 1].data_ptr()
    elif layout == "out_other_dtype":
        out_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
        out = torch.full((g.shape[1],), float("nan"), dtype=out_dtype, device="cuda")
        mgs.modular_pcgrad(g, off, order=table, out=out, backend=backend)
    else:
        out = mgs.modular_pcgrad(g, off, order=table, backend=backend)
    if ref is not None:
        rtol = max(storage_rtol(out.dtype), storage_rtol(dtype))
        _assert_modules_close(out, ref, grads, offsets, checked, rtol, what)
    # the combine with the backend's own weights (bitwise those of its pipeline) vs the torch backend's
    g2 = _on_gpu(grads, "contiguous")
    expected = torch.empty(g2.shape[1], dtype=out.dtype, device="cuda")
    torch_backend.segmented_combine(g2, get_plan(off, g2.shape[1]), w, expected)
    nonempty = [m for m in range(len(offsets) - 1) if offsets[m + 1] > offsets[m]]
    _assert_modules_close(out, expected.double().cpu(), grads, offsets, nonempty,
                          max(storage_rtol(out.dtype), storage_rtol(dtype)), what + " vs torch backend")
    # bitwise re-runs
    if layout not in ("in_place",):
        again = mgs.modular_pcgrad(g, off, order=table, out=torch.empty_like(out), backend=backend)
        assert torch.equal(again, out), what


def test_solve_ieee_division_bitwise(backend):
    # T = 2: every sum has one nonzero term, the only rounding is d / G[j, j]: bitwise equal to the torch
    # backend on the GPU only with IEEE division (not div.full.f32 / fast-math).
    gen = torch.Generator().manual_seed(7)
    M = 4096
    v = torch.randn(M, 2, 33, generator=gen)
    v[:, 1] = -0.9 * v[:, 0] + 0.5 * v[:, 1]
    gram = (v @ v.transpose(1, 2)).float().cuda()
    order = mgs.random_order(M, 2, generator=gen).cuda()
    w = mgs.pcgrad_weights(gram, order=order, backend=backend)
    w_t = torch_backend.pcgrad_weights(gram, order, 0.0)
    assert (w_t != 1).sum().item() > M // 2
    assert torch.equal(w, w_t)


def test_malformed_order_entries_skipped(backend):
    gen = torch.Generator().manual_seed(3)
    M, T = 64, 9
    v = torch.randn(M, T, 40, generator=gen)
    v[:, 1] = -v[:, 0]
    gram = (v @ v.transpose(1, 2)).float()
    order = mgs.random_order(M, T, generator=gen).clone()
    flat = order.view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 3]
    flat[pos] = torch.tensor([-1, T, 1 << 40, -(1 << 40)])[torch.randint(4, (len(pos),), generator=gen)]
    order[:, 0, 0] = 0  # the task itself
    expected = torch.zeros(M, T, dtype=torch.float64)
    g64 = gram.double()
    for m in range(M):
        for i in range(T):
            c = torch.zeros(T, dtype=torch.float64)
            c[i] = 1
            for j in order[m, i].tolist():
                if 0 <= j < T and j != i:
                    d = float(c @ g64[m, :, j])
                    if d < 0 and float(g64[m, j, j]) > 0:
                        c[j] -= d / g64[m, j, j]
            expected[m] += c
    # kernel level: the ops layer validates host tables, so call the backend's solve directly
    be = backends.get_backend(backend, torch.device("cuda"))
    w = be.pcgrad_weights(gram.cuda(), order.cuda(), 0.0)
    torch.testing.assert_close(w.double().cpu(), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ fused step


class Odd(nn.Module):
    """A parameter at an odd storage offset (not 16-byte aligned), a 5-way head and odd widths."""

    def __init__(self, device="cuda"):
        super().__init__()
        store = torch.randn(1 + 33 * 17, device=device)  # made on the device: .cuda() would re-align it
        self.w = nn.Parameter(store[1:].view(33, 17))
        self.up = nn.Linear(33, 4099, device=device)
        self.head = nn.Linear(4099, 5, device=device)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.tanh(x @ self.w.t()))))


OPTS = {
    "sgd_momentum": lambda ps, **kw: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                                                     **kw),
    "adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01, **kw),
    "adamw_amsgrad": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, amsgrad=True, **kw),
}


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_vs_torch_foreach_and_fused(backend, opt_name, impl, dtype):
    T = 3
    torch.manual_seed(0)
    base = Odd("cpu")
    runs = []
    for be, kw in ((backend, {}), ("torch", {impl: True})):
        model = Odd()
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q)
        if be == backend:
            assert model.w.data_ptr() % 16 != 0, "the test needs a misaligned parameter"
        s = mgs.ModularGradientSurgery(model, num_tasks=T, backend=be, dtype=dtype, order="fixed")
        runs.append((model, s, OPTS[opt_name](model.parameters(), **kw)))
    for step in range(3):
        for i, (model, s, opt) in enumerate(runs):
            for t in range(T):
                gen = torch.Generator(device="cuda").manual_seed(10 * step + t)
                x = torch.randn(64, 17, device="cuda", generator=gen)
                with s.capture(t):
                    (model(x).pow(2).mean() * (t - 1.2)).backward()
            if i == 0:
                s.step(opt, max_grad_norm=1.0)
            else:
                s.resolve()
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        (ma, _, oa), (mb, _, ob) = runs
        lr = oa.param_groups[0]["lr"]
        atol = 2e-2 * lr if "adam" in opt_name else 1e-6
        for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=atol, msg=f"{name} step {step}")
            for key, va in oa.state[pa].items():
                if isinstance(va, torch.Tensor) and va.dim():
                    torch.testing.assert_close(va, ob.state[pb][key], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


# ------------------------------------------------------------------------------------------ no host syncs


def test_no_host_sync_in_a_step(backend):
    # After the first call (which validates and caches the offsets: the one host read), neither the kernel-level
    # call (random order from a CUDA generator, or a CPU generator through pinned memory) nor a surgery's
    # resolve() / step() synchronises with the host.
    T, sizes = 3, [1000, 0, 12_345, 77]
    off = offsets_from_sizes(sizes).cuda()
    g = torch.randn(T, sum(sizes), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    mgs.modular_pcgrad(g, off, generator=gen, backend=backend)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 5)).cuda()
    s = mgs.ModularGradientSurgery(model, num_tasks=T, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs = torch.randn(T, 8, 16, device="cuda")

    def capture():
        for t in range(T):
            with s.capture(t):
                (model(xs[t]).pow(2).mean() * (1 - t)).backward()

    capture()
    s.step(opt)  # warm up: plans, slot tables, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mgs.modular_pcgrad(g, off, generator=gen, backend=backend)
        mgs.modular_pcgrad(g, off, generator=torch.Generator().manual_seed(1), backend=backend)
        capture()
        s.resolve()
        capture()
        s.step(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ CUDA graphs


def test_cuda_graph_capture_modular_pcgrad(backend):
    T, sizes = 9, [1000, 0, 123_457, 77]
    off = offsets_from_sizes(sizes).cuda()
    g = torch.randn(T, sum(sizes), device="cuda").to(torch.bfloat16)
    order = mgs.random_order(len(sizes), T, generator=torch.Generator(device="cuda").manual_seed(0))
    out = torch.empty(sum(sizes), dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mgs.modular_pcgrad(g, off, order=order, out=out, backend=backend)  # warm up: compile + plan
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mgs.modular_pcgrad(g, off, order=order, out=out, backend=backend)
    for k in range(3):
        g.copy_(torch.randn_like(g, dtype=torch.float32).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, mgs.modular_pcgrad(g, off, order=order, backend=backend)), k


def test_cuda_graph_capture_step(backend):
    # step() with a fixed order and SGD: one graph replays the whole surgery + update. Each replay must
    # equal an eager step from the same state.
    T = 3
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 5)).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    surg = [mgs.ModularGradientSurgery(m, num_tasks=T, backend=backend, order="fixed") for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    xs = torch.randn(T, 8, 16, device="cuda")

    def capture(model, s):
        for t in range(T):
            with s.capture(t):
                (model(xs[t]).pow(2).mean() * (1 - t)).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up both (kernels compiled, tables built)
            for m, s, o in zip(models, surg, opts):
                capture(m, s)
                s.step(o)
    torch.cuda.current_stream().wait_stream(side)
    models[1].load_state_dict(models[0].state_dict())
    capture(models[0], surg[0])  # gradients in the task buffer
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        surg[0].step(opts[0])
    for k in range(3):
        models[1].load_state_dict(models[0].state_dict())
        capture(models[0], surg[0])
        capture(models[1], surg[1])
        graph.replay()
        surg[1].step(opts[1])
        torch.cuda.synchronize()
        for pa, pb in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=f"replay {k}")


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_while_first_is_current(backend):
    torch.cuda.set_device(0)
    grads, offsets, order, _, ref, checked = _case(9, torch.bfloat16, "contiguous")
    g = grads.to("cuda:1")
    before = torch.cuda.memory_allocated(0)
    out = mgs.modular_pcgrad(g, offsets.to("cuda:1"), order=order.to("cuda:1"), backend=backend)
    torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == before, "nothing may be allocated on the current device"
    _assert_modules_close(out, ref, grads, offsets, checked, storage_rtol(torch.bfloat16), "cuda:1")


# ------------------------------------------------------------------------------------------ scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [9, 16, 64])
def test_tensor_core_gram_on_a_2_22_module(backend, T, dtype):
    if T > _max_tasks(backend, dtype):
        pytest.skip("beyond the backend's task range")
    sizes = [1 << 22, 3, 0, 1000]
    off = offsets_from_sizes(sizes).cuda()
    gen = torch.Generator(device="cuda").manual_seed(T)
    g = (torch.randn(T, sum(sizes), device="cuda", generator=gen) + 0.1).to(dtype)  # nonzero means: long sums
    gram = mgs.segmented_gram(g, off, backend=backend)
    g64 = g.double()
    b = off.tolist()
    for m in range(len(sizes)):
        ref = g64[:, b[m]:b[m + 1]] @ g64[:, b[m]:b[m + 1]].T
        scale = ref.diagonal().max().clamp_min(1e-30)
        err = ((gram[m].double() - ref).abs() / scale).max().item()
        # plain tf32 (10-bit mantissa) products would be off by ~1e-3: tf32x3 / exact bf16 products are not
        assert err < 5e-5, f"module {m}: relative error {err:.2e}"


def test_more_than_2_31_elements(backend):
    # bf16, T = 2: 2 x (2^31 + 4101) elements (~8.6 GB). The last modules start past 2^31 elements and
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
    small = torch.randn(2, sum(tail)).to(torch.bfloat16)
    small[1, :100] = -small[0, :100]
    g[:, n_big:] = small.cuda()
    off = offsets_from_sizes([n_big, *tail]).cuda()
    gram = mgs.segmented_gram(g, off, backend=backend)
    torch.testing.assert_close(gram[1:].double().cpu(), reference.gram(small, offsets_from_sizes(tail)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    big = torch.tensor([[0.25, -0.125], [-0.125, 0.0625]], dtype=torch.float64) * n_big
    torch.testing.assert_close(gram[0].double().cpu(), big, rtol=1e-5, atol=0)
    order = mgs.fixed_order(len(tail) + 1, 2, device="cuda")
    out = mgs.modular_pcgrad(g, off, order=order, backend=backend)
    assert out[:n_big].abs().max().item() == 0.0  # exactly opposite: each projects the other off completely
    ref = reference.modular_pcgrad(small, offsets_from_sizes(tail), order=mgs.fixed_order(len(tail), 2),
                                   dtype=torch.float64)  # fmt: skip
    _assert_modules_close(out[n_big:], ref, small, offsets_from_sizes(tail), [1, 2],
                          storage_rtol(torch.bfloat16), "tail")  # fmt: skip
    del out
    mgs.modular_pcgrad(g, off, order=order, out=g[1], backend=backend)  # in place into row 1
    assert g[1, :n_big].abs().max().item() == 0.0
