"""What is specific to the native CPU fused optimizer-step kernel (CpuBackend.fused_step): thread-count
independence, the reference fallback above 64 tasks, rejected tables, constants checked at load, and that
surgery.step() really runs it. Kernel-vs-reference equality for every backend is test_fused_step_kernels.py.

Skipped when the native CPU module is not built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import _fused_step, _native
from mgs_kernels.backends.cpu_backend import BACKEND as CPU_BACKEND, CpuBackend
from conftest import fused_step_args

pytest.importorskip("mgs_kernels._mgs_cpu", reason="native CPU module not built")

T = 3
# odd sizes; 40000 spans three 16384-element slot chunks (offsets inside a parameter), 1 is a lone element
SHAPES = [(7,), (40000,), (33, 5), (1,), (1000,), (129, 3)]
UNTOUCHED = 2  # slot without a gradient this step
NOT_IN_OPT = 5  # parameter the optimizer does not own (no gradient either): must stay untouched

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                          weight_decay=0.01),
    "sgd_dampening_maximize": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3,
                                                        maximize=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=3e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1),
    "adam_amsgrad_wd_maximize": lambda ps: torch.optim.Adam(ps, lr=3e-3, amsgrad=True, weight_decay=0.01,
                                                           maximize=True),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.3, 0.9), amsgrad=True, weight_decay=0.05),
}


class Toy(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES])


class Pair:
    """Two identical (model, optimizer, surgery) setups: A runs the native kernel, B the reference."""

    def __init__(self, opt_name, dtype, seed=0):
        self.model_a = Toy(seed)
        self.model_b = copy.deepcopy(self.model_a)
        make = OPTIMIZERS[opt_name]
        self.lr = None
        owned = lambda m: [p for i, p in enumerate(m.ps) if i != NOT_IN_OPT]  # noqa: E731
        self.opt_a, self.opt_b = make(owned(self.model_a)), make(owned(self.model_b))
        kw = dict(num_tasks=T, partition="tensor", dtype=dtype)
        self.s_a = mgs.ModularGradientSurgery(self.model_a, backend="cpu", **kw)
        self.s_b = mgs.ModularGradientSurgery(self.model_b, backend="torch", **kw)
        self.gen = torch.Generator().manual_seed(100 + seed)

    def load(self, rows=None, touched=None):
        S = len(self.s_a.partition.slots)
        if rows is None:
            rows = torch.randn(T, self.s_a.buffer.shape[1], generator=self.gen)
        if touched is None:
            touched = [i not in (UNTOUCHED, NOT_IN_OPT) for i in range(S)]
        for s in (self.s_a, self.s_b):
            s.buffer.copy_(rows)
            s.task_grads.mark_touched(touched)
        # random signed weights (PCGrad weights are >= 1 off-diagonal corrections, clip folded in: any sign)
        return torch.rand(self.s_a.partition.num_modules, T, generator=self.gen) * 2 - 0.5

    def prepare(self, weights, keep_grads):
        args_a = fused_step_args(self.s_a, self.opt_a, weights, keep_grads)
        args_b = fused_step_args(self.s_b, self.opt_b, weights, keep_grads)
        assert args_a is not None and args_b is not None
        if keep_grads:
            args_a.grad_out.fill_(float("nan"))
            args_b.grad_out.fill_(float("nan"))
        return args_a, args_b

    def snapshot(self):
        params = [p.detach().clone() for p in self.model_a.parameters()]
        states = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                  for p, st in self.opt_a.state.items()}
        return params, states

    def restore(self, snap):
        params, states = snap
        with torch.no_grad():
            for p, v in zip(self.model_a.parameters(), params):
                p.copy_(v)
        for p, st in self.opt_a.state.items():
            for k, v in states[id(p)].items():
                if isinstance(v, torch.Tensor):
                    st[k].copy_(v)


def assert_match(pair, args_a, args_b, adam, inactive=(UNTOUCHED, NOT_IN_OPT)):
    lr = pair.opt_a.param_groups[0]["lr"]
    param_atol = 1e-2 * lr if adam else 1e-6  # see tests/test_step.py: Adam where the gradient nearly cancels
    for i, (pa, pb) in enumerate(zip(pair.model_a.parameters(), pair.model_b.parameters())):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=param_atol, equal_nan=True, msg=f"param {i}")
        sa, sb = pair.opt_a.state.get(pa, {}), pair.opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, equal_nan=True,
                                           msg=f"state {key} of param {i}")
    if args_a.grad_out is not None:
        # both were poisoned with NaN; the reference writes every element of every active slot
        out_a, out_b = args_a.grad_out, args_b.grad_out
        tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-6)}[out_a.dtype]
        torch.testing.assert_close(out_a, out_b, rtol=tol[0], atol=tol[1], equal_nan=True)
        for i, s in enumerate(pair.s_a.partition.slots):
            if i in inactive:
                assert torch.isnan(out_a[s.start:s.end]).all(), f"grad_out of inactive slot {i} was written"


@pytest.mark.parametrize("opt_name", ["sgd_momentum_nesterov_wd", "adamw_amsgrad"])
def test_bitwise_reproducible_across_runs_and_threads(opt_name):
    pair = Pair(opt_name, torch.float32, seed=3)
    weights = pair.load()
    CPU_BACKEND.fused_step(pair.prepare(weights, False)[0])  # states exist, SGD not FIRST
    weights = pair.load()
    snap = pair.snapshot()
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (threads, threads, 1):
            torch.set_num_threads(nt)
            pair.restore(snap)
            # prepare() advances Adam's step counter: rebuild the args from the same optimizer state each time
            for st in pair.opt_a.state.values():
                if "step" in st:
                    st["step"].fill_(1.0)
            args = pair.prepare(weights, True)[0]
            CPU_BACKEND.fused_step(args)
            results.append([p.detach().clone() for p in pair.model_a.parameters()]
                           + [v.clone() for st in pair.opt_a.state.values() for v in st.values()]
                           + [args.grad_out.clone()])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):  # bitwise (grad_out of inactive slots keeps its NaN poison)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_more_than_max_tasks_falls_back_to_reference(monkeypatch):
    model_a = nn.Linear(5, 3)
    model_b = copy.deepcopy(model_a)
    nt = _native.MAX_TASKS + 1
    s_a = mgs.ModularGradientSurgery(model_a, num_tasks=nt, backend="cpu")
    s_b = mgs.ModularGradientSurgery(model_b, num_tasks=nt, backend="torch")
    assert s_a.backend_name == "torch"  # dispatch routes T > MAX_TASKS away from the native backend
    opt_a, opt_b = torch.optim.AdamW(model_a.parameters(), lr=0.1), torch.optim.AdamW(model_b.parameters(), lr=0.1)
    rows = torch.randn(nt, s_a.buffer.shape[1])
    weights = torch.rand(s_a.partition.num_modules, nt)
    for s in (s_a, s_b):
        s.buffer.copy_(rows)
        s.task_grads.mark_touched()
    called = []
    monkeypatch.setattr(_native.cpu(), "fused_step", lambda *a: called.append(a), raising=False)
    CPU_BACKEND.fused_step(fused_step_args(s_a, opt_a, weights, False))  # the kernel itself hands T > 64 on
    _fused_step.reference_kernel(fused_step_args(s_b, opt_b, weights, False))
    assert not called
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_native_rejects_bad_tables():
    pair = Pair("adamw", torch.float32)
    args = pair.prepare(pair.load(), False)[0]
    (desc,), keep = _native.fused_step_args(args)
    lib = _native.cpu()
    desc.kind = 7
    with pytest.raises(ValueError, match="optimizer kind"):
        lib.fused_step(desc, 1)
    (desc,), keep = _native.fused_step_args(args)
    bad_ptr = args.state1_ptr.clone()
    bad_ptr[0] = 0
    desc.state1_ptr = bad_ptr.data_ptr()
    with pytest.raises(ValueError, match="lacks a parameter or state pointer"):
        lib.fused_step(desc, 1)


def test_native_arguments_are_one_descriptor():
    pair = Pair("adamw", torch.bfloat16)
    args = pair.prepare(pair.load(), True)[0]
    raw, keep = _native.fused_step_args(args)
    assert len(raw) == 1
    (desc,) = raw
    assert isinstance(desc, _native.cpu().FusedStepDesc)
    assert desc.grads == args.grads.data_ptr() and desc.row_stride == args.grads.stride(0)
    assert desc.T == args.grads.shape[0] and desc.num_slots == args.num_slots
    assert desc.num_chunks == args.chunks.num_chunks and desc.kind == args.kind
    assert desc.grad_out == args.grad_out.data_ptr() and desc.out_dtype == _native.dtype_code(torch.bfloat16)
    assert desc.param_ptr == args.param_ptr.data_ptr() and desc.hyper == args.hyper.data_ptr()


def test_fused_constants_checked_at_load():
    assert _native.cpu().FUSED_CONSTANTS["NUM_HYPER"] == _fused_step.NUM_HYPER
    fake = type("M", (), {"FUSED_CONSTANTS": dict(_native.cpu().FUSED_CONSTANTS, EPS=_fused_step.EPS + 1),
                          "NO_OUTPUT": _native.NO_OUTPUT})
    with pytest.raises(ImportError, match="fused-step constants"):
        _native._check_fused_constants(fake, "_fake")


# ------------------------------------------------------------------ end to end (surgery.step)
@pytest.mark.parametrize("opt_name", ["sgd_momentum_nesterov_wd", "adam", "adamw"])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_step_runs_native_fused_kernel(monkeypatch, opt_name, max_norm):
    models = pytest.importorskip("models")  # tests/models.py (needs transformers)
    from test_step import assert_states_equal, capture_all

    calls = []
    original = CpuBackend.fused_step

    def counting(self, args):
        calls.append(args.kind)
        original(self, args)

    monkeypatch.setattr(CpuBackend, "fused_step", counting)
    monkeypatch.setattr(_fused_step, "reference_kernel", lambda args: pytest.fail("reference kernel ran"))
    model_a = models.tiny_model("llama", seed=5)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = OPTIMIZERS[opt_name](model_a.parameters()), OPTIMIZERS[opt_name](model_b.parameters())
    s_a = mgs.ModularGradientSurgery(model_a, num_tasks=3, partition="module", seed=2, backend="cpu")
    s_b = mgs.ModularGradientSurgery(model_b, num_tasks=3, partition="module", seed=2, backend="torch")
    for step in range(3):
        capture_all(s_a, model_a, step)
        s_a.step(opt_a, max_grad_norm=max_norm)
        capture_all(s_b, model_b, step)
        s_b.resolve()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model_b.parameters(), max_norm)
        opt_b.step()
        assert_states_equal(opt_a, opt_b, model_a, model_b)
    kind = _fused_step.SGD_KIND if opt_name.startswith("sgd") else _fused_step.ADAM_KIND
    assert calls == [kind] * 3, "the native fused kernel ran on every step"
