"""Parity self-check of a backend against the float64 reference, on a device, through the public API.

``parity_check(backend, device, quick=True)`` runs ``modular_pcgrad`` (and, unless ``quick``, the single
stages, more task counts / dtypes / layouts and the fused optimizer step of ``ModularGradientSurgery.step``)
with ``backend=<name>`` on fixed inputs whose PCGrad decisions are far from any threshold, and compares
with ``mgs_kernels.reference`` in float64. It returns None on success, else one line saying what failed.

Used by ``python -m mgs_kernels.doctor`` and by dispatch's first-use self-check of a native GPU backend
(``quick=True``: a few launches on a few KB; the comparisons read results back to the host, which is why
it must run once per device and process, never inside a training step). Only public API calls are made;
every call names its backend explicitly, and ``active()`` is True while a check runs in this thread, so a
dispatcher that self-checks on "auto" can avoid nesting.
"""

from __future__ import annotations

import functools
import threading
from typing import List, Optional, Sequence, Tuple

import torch

_state = threading.local()

# Relative tolerance of a result stored in each dtype (the reference sees the same stored inputs), times
# the module's scale (max |reference| or max |input|, whichever is larger).
_RTOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
_GRAM_RTOL = 1e-4  # float32 accumulation (tf32x3 on tensor cores), relative to the largest squared norm
_MARGIN = 1e-4  # modules whose decisions sit closer than this to a flip (|cos|) are not compared

QUICK_CASES: Tuple[Tuple[int, torch.dtype, str], ...] = (
    (2, torch.float32, "contiguous"),
    (3, torch.bfloat16, "offset"),
    (9, torch.bfloat16, "contiguous"),
    (16, torch.float32, "odd"),
)
FULL_TASKS = (1, 2, 3, 8, 9, 16, 64)
LAYOUTS = ("contiguous", "odd", "offset", "in_place", "out_fp32")
SIZES = (1000, 0, 77, 513, 41)  # odd sizes and an empty module, each wider than the task count
SIZES_MANY_TASKS = (300, 0, 129)  # T > 16: fewer, smaller modules keep the float64 reference loop short


def active() -> bool:
    """True while a parity check runs in this thread."""
    return bool(getattr(_state, "depth", 0))


def _layout(grads: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in ``layout``: contiguous rows; "odd": an odd row stride; "offset": a view whose
    base is one element past a 16-byte boundary (``buf[:, 1:]``); "in_place" / "out_fp32" use contiguous
    rows (the output differs, see _run)."""
    T, N = grads.shape
    if layout == "odd":
        buf = torch.zeros(T, N + 3 if (N + 3) % 2 else N + 4, dtype=grads.dtype, device=grads.device)
        buf[:, :N] = grads
        return buf[:, :N]
    if layout == "offset":
        pad = -(-(N + 1) // 64) * 64
        buf = torch.zeros(T, pad, dtype=grads.dtype, device=grads.device)
        buf[:, 1 : N + 1] = grads
        return buf[:, 1 : N + 1]
    return grads.clone()


@functools.lru_cache(maxsize=64)
def _draw(T: int, dtype: torch.dtype, seed: int, sizes: Tuple[int, ...]):
    """Deterministic inputs: (grads CPU, offsets, order, gram64, ref64, checked), where ``checked`` lists
    the non-empty modules whose PCGrad decisions are at least _MARGIN away from a flip (the others may
    legitimately differ between float32 and float64 and are not compared)."""
    import mgs_kernels as mgs
    from mgs_kernels import reference

    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    best = None
    for attempt in range(16):
        gen = torch.Generator().manual_seed(seed * 1000 + attempt)
        grads = torch.randn(T, int(offsets[-1]), generator=gen)
        if T >= 2:
            grads[1] = -0.8 * grads[0] + 0.3 * grads[1]  # a strong conflict
        grads = grads.to(dtype)
        order = mgs.random_order(len(sizes), T, generator=gen)
        gram64 = reference.gram(grads, offsets)
        checked = [m for m, n in enumerate(sizes) if n and (
            T == 1 or reference.decision_margin(gram64[m : m + 1], order[m : m + 1]) >= _MARGIN)]  # fmt: skip
        if best is None or len(checked) > len(best[-1]):
            best = (grads, offsets, order, gram64, checked)
        if len(checked) == sum(1 for n in sizes if n):
            break
    grads, offsets, order, gram64, checked = best
    if not checked:
        raise RuntimeError("no well-conditioned draw found")  # pragma: no cover
    ref = reference.modular_pcgrad(grads, offsets, order=order, dtype=torch.float64)
    return grads, offsets, order, gram64, ref, checked


def _compare(out: torch.Tensor, ref: torch.Tensor, grads: torch.Tensor, offsets: torch.Tensor,
             checked: Sequence[int], rtol: float, what: str) -> Optional[str]:  # fmt: skip
    out = out.detach().double().cpu()
    bounds = offsets.tolist()
    for m in checked:
        a, b = bounds[m], bounds[m + 1]
        if not torch.isfinite(out[a:b]).all():
            return f"{what}: non-finite output in module {m}"
        scale = max(ref[a:b].abs().max().item(), grads[:, a:b].double().abs().max().item(), 1e-30)
        err = (out[a:b] - ref[a:b]).abs().max().item()
        if not err <= rtol * scale:
            return f"{what}: module {m} [{a}:{b}] max error {err:.3e} > {rtol:.1e} * {scale:.3e}"
    return None


def _stages_many_tasks(backend: str, device: torch.device, T: int, dtype: torch.dtype, seed: int) -> Optional[str]:
    """T > 16: random task gradients put some PCGrad decisions within float32 rounding of a flip in every
    module, so the solve is not compared here; the Gram and the combine (with given weights) are."""
    import mgs_kernels as mgs
    from mgs_kernels import reference

    sizes = SIZES_MANY_TASKS
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(T, int(offsets[-1]), generator=gen).to(dtype)
    w = torch.randn(len(sizes), T, generator=gen)
    g = grads.to(device)
    off = offsets.to(device)
    gram = mgs.segmented_gram(g, off, backend=backend)
    gram64 = reference.gram(grads, offsets)
    scale = torch.diagonal(gram64, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    gerr = ((gram.double().cpu() - gram64).abs() / scale).max().item()
    if not gerr <= _GRAM_RTOL:
        return f"{backend} segmented_gram T={T} {str(dtype)[6:]} on {device}: relative error {gerr:.2e}"
    out = mgs.segmented_combine(g, off, w.to(device), backend=backend)
    ref = torch.cat([w[m].double() @ grads[:, a:b].double() for m, (a, b) in
                     enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])  # fmt: skip
    checked = [m for m, n in enumerate(sizes) if n]
    return _compare(out, ref, grads, offsets, checked, _RTOL[dtype],
                    f"{backend} segmented_combine T={T} {str(dtype)[6:]} on {device}")  # fmt: skip


def _kernel_case(backend: str, device: torch.device, T: int, dtype: torch.dtype, layout: str, seed: int,
                 stages: bool) -> Optional[str]:  # fmt: skip
    import mgs_kernels as mgs

    if T > 16:
        return _stages_many_tasks(backend, device, T, dtype, seed)
    grads, offsets, order, gram64, ref, checked = _draw(T, dtype, seed, SIZES)
    what = f"{backend} modular_pcgrad T={T} {str(dtype)[6:]} {layout} on {device}"
    g = _layout(grads.to(device), layout)
    off = offsets.to(device)
    table = order.to(device)
    if layout == "in_place":
        out = mgs.modular_pcgrad(g, off, order=table, out=g[T - 1], backend=backend)
        if out.data_ptr() != g[T - 1].data_ptr():
            return f"{what}: the result is not in the given row"
    elif layout == "out_fp32":
        out = torch.full((g.shape[1],), float("nan"), dtype=torch.float32, device=device)
        mgs.modular_pcgrad(g, off, order=table, out=out, backend=backend)
    else:
        out = mgs.modular_pcgrad(g, off, order=table, backend=backend)
    rtol = _RTOL[torch.float32 if layout == "out_fp32" else dtype]
    if layout == "out_fp32":
        rtol = max(rtol, 1e-5 if dtype == torch.float32 else 2e-4)
    err = _compare(out, ref, grads, offsets, checked, rtol, what)
    if err or not stages:
        return err
    g = _layout(grads.to(device), "contiguous")
    gram = mgs.segmented_gram(g, off, backend=backend)
    scale = torch.diagonal(gram64, dim1=1, dim2=2).amax(-1).clamp_min(1e-30)[:, None, None]
    gerr = ((gram.double().cpu() - gram64).abs() / scale).max().item() if gram.numel() else 0.0
    if not gerr <= _GRAM_RTOL:
        return f"{backend} segmented_gram T={T} {str(dtype)[6:]} on {device}: relative error {gerr:.2e}"
    w = mgs.pcgrad_weights(gram, order=table, backend=backend)
    out2 = mgs.segmented_combine(g, off, w, backend=backend)
    return _compare(out2, ref, grads, offsets, checked, _RTOL[dtype], f"{backend} stages T={T} on {device}")


class _Net(torch.nn.Module):
    """A tiny model with an odd-sized parameter (a 5-way head) and a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 33)
        self.b = torch.nn.Linear(33, 5)
        self.c = torch.nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


def _step_case(backend: str, device: torch.device, dtype: torch.dtype, opt_name: str) -> Optional[str]:
    """surgery.step(opt) with ``backend`` vs the torch backend's resolve() + clip + opt.step()."""
    import mgs_kernels as mgs

    T = 3
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    }[opt_name]
    torch.manual_seed(0)
    base = _Net()
    runs = []
    for be in (backend, "torch"):
        model = _Net().to(device)
        model.load_state_dict(base.state_dict())
        s = mgs.ModularGradientSurgery(model, num_tasks=T, backend=be, dtype=dtype, order="fixed")
        runs.append((model, s, make(model.parameters())))
    for step in range(2):
        for i, (model, s, opt) in enumerate(runs):
            for t in range(T):
                gen = torch.Generator().manual_seed(100 * step + t)
                x = torch.randn(4, 7, generator=gen).to(device)
                with s.capture(t):
                    (model(x).pow(2).mean() * (1.0 - t)).backward()
            if i == 0:
                s.step(opt, max_grad_norm=0.5)
            else:
                s.resolve()
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)
    (ma, _, oa), (mb, _, ob) = runs
    lr = oa.param_groups[0]["lr"]
    atol = 1e-2 * lr if opt_name == "adamw" else 1e-6
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        if not torch.allclose(pa.detach().cpu(), pb.detach().cpu(), rtol=rtol, atol=atol):
            err = (pa.detach().cpu() - pb.detach().cpu()).abs().max().item()
            return f"{backend} step({opt_name}) {str(dtype)[6:]} on {device}: parameter {name} differs by {err:.3e}"
    return None


def _cases(backend: str, device: torch.device, quick: bool) -> List[tuple]:
    if quick:
        return [("kernel", T, dt, layout) for T, dt, layout in QUICK_CASES]
    interpreted = device.type == "cpu" and backend == "triton"
    tasks = (2, 9) if interpreted else FULL_TASKS  # the interpreter runs every program in Python
    cases = []
    for T in tasks:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            if T == 64 and dt == torch.float16:
                continue  # fp16 at T = 64: the same kernels as bf16 (cost: the float64 reference loop)
            layouts = LAYOUTS if T in (2, 9) else ("contiguous",)
            cases += [("kernel", T, dt, layout) for layout in layouts]
    cases += [("step", 3, dt, opt) for dt in (torch.float32, torch.bfloat16) for opt in ("sgd", "adamw")]
    return cases


def parity_check(backend_name: str, device, quick: bool = True) -> Optional[str]:
    """None when ``backend_name`` agrees with the float64 reference on ``device``, else why not (one line).

    quick: ``modular_pcgrad`` on a few KB for four (T, dtype, layout) cases (the dispatcher's first-use
    check). Otherwise also the single stages, T in {1, 2, 3, 8, 9, 16, 64} x {fp32, bf16, fp16}, five
    layouts (contiguous rows, odd row stride, misaligned base, in place into a task row, float32 output)
    and ``ModularGradientSurgery.step`` with SGD and AdamW against the torch backend (the doctor). An
    exception raised by the backend is reported as the failure. Reads results back to the host.
    """
    device = torch.device(device)
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        for case in _cases(backend_name, device, quick):
            kind, T, dtype, detail = case
            if kind == "kernel":  # one fixed draw per (T, dtype), shared by its layouts (and cached)
                err = _kernel_case(backend_name, device, T, dtype, detail, T, stages=not quick)
            else:
                err = _step_case(backend_name, device, dtype, detail)
            if err:
                return err
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the backend is the answer
        return f"{backend_name} on {device}: {type(exc).__name__}: {exc}"
    finally:
        _state.depth -= 1
