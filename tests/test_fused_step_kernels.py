"""Every backend's fused optimizer-step kernel (``Backend.fused_step``: native CPU, Triton, CUDA on a GPU)
against the plain-torch definition ``_fused_step.reference_kernel``; Triton-specific block sizes and
alignment at the end. The end-to-end comparison with resolve() + clip + optimizer.step() is
tests/test_step.py's, over every backend.

Two identical set-ups (model, optimizer, surgery) see the same captured task gradients and the same
weights; one is updated by the backend's kernel, the other by the reference kernel, and after every
comparison the reference's parameters and states are copied into the kernel's side, so every step is
compared from identical inputs. Without a GPU the Triton kernel runs in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before any kernel module is imported).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import _fused_step, backends
from conftest import BACKENDS, DEVICE, fused_step_args, surgery_weights

# Backends with a fused-step kernel on DEVICE.
FUSED = [b for b in BACKENDS if backends.get_backend(b, DEVICE).fused_step is not None]
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not usable here")
NAN = float("nan")

# The interpreter computes with numpy, which warns on inf - inf / 0 * inf in the propagation tests.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def triton_kernels():
    from mgs_kernels import triton as k

    return k


# ---------------------------------------------------------------------------------------- set-ups


class Net(nn.Module):
    """Odd-sized slots (partial blocks), a slot with no gradient and one outside the optimizer."""

    def __init__(self, wide: int = 37, big: bool = False):
        super().__init__()
        self.a = nn.Linear(5, wide)
        self.b = nn.Linear(wide, 7)
        self.big = nn.Linear(7, 2400) if big else None  # 16800 weights: two slot chunks (SLOT_CHUNK = 2^14)
        self.unused = nn.Linear(3, 3)  # never gets a gradient: inactive slot
        self.frozen = nn.Linear(7, 2)  # gets gradients but is in no param group: inactive slot

    def forward(self, x):
        h = torch.tanh(self.b(torch.relu(self.a(x))))
        out = self.frozen(h)
        if self.big is not None:
            out = out + self.big(h)[:, :2] * self.big(h)[:, -2:]
        return out


class Setup:
    def __init__(self, opt_fn, dtype=torch.float32, num_tasks=3, seed=0, **net_kw):
        torch.manual_seed(seed)
        self.model = Net(**net_kw).to(DEVICE)
        self.num_tasks = num_tasks
        self.surgery = mgs.ModularGradientSurgery(self.model, num_tasks=num_tasks, backend="torch", dtype=dtype,
                                                  order="fixed")  # fmt: skip
        params = [p for n, p in self.model.named_parameters() if not n.startswith("frozen")]
        self.opt = opt_fn(params)

    def capture(self, step):
        for t in range(self.num_tasks):
            g = torch.Generator().manual_seed(100 * step + t)
            x = torch.randn(4, 5, generator=g).to(DEVICE)
            y = torch.randn(4, 2, generator=g).to(DEVICE) * (t + 1)
            with self.surgery.capture(t):
                ((self.model(x) - y) ** 2).mean().backward()

    def args(self, weights, keep_grads):
        args = fused_step_args(self.surgery, self.opt, weights, keep_grads)
        assert args is not None
        if args.grad_out is not None:
            args.grad_out.fill_(NAN)  # the kernel must write every active element
        return args

    def finish(self):
        self.surgery.zero_grad()

    def states(self):
        return [(n, p, self.opt.state.get(p, {})) for n, p in self.model.named_parameters()]


def sync(dst: Setup, src: Setup):
    """Copy src's parameters and optimizer state into dst's tensors (in place: same pointers)."""
    with torch.no_grad():
        for (_, pd, sd), (_, ps, ss) in zip(dst.states(), src.states()):
            pd.copy_(ps)
            for key, v in ss.items():
                if isinstance(v, torch.Tensor) and key != "step":
                    sd[key].copy_(v)


def assert_setups_close(a: Setup, b: Setup, args_a, args_b, rtol=1e-5, atol=1e-6):
    adam = isinstance(a.opt, torch.optim.Adam)
    # Adam moves an element by ~lr whatever its gradient: where the combine nearly cancels, float32
    # rounding of the sum decides (see tests/test_step.py); 1% of a step still catches any formula slip.
    param_atol = max(atol, 1e-2 * max(g["lr"] for g in a.opt.param_groups)) if adam else atol
    for (name, pa, sa), (_, pb, sb) in zip(a.states(), b.states()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=param_atol, equal_nan=True, msg=f"parameter {name}")
        assert sa.keys() == sb.keys(), name
        for key in sa:
            va, vb = sa[key], sb[key]
            assert type(va) is type(vb)
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and va.device == vb.device and va.shape == vb.shape, (name, key)
                torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, equal_nan=True, msg=f"state {key} of {name}")
            else:
                assert va == vb, (name, key)
    assert (args_a.grad_out is None) == (args_b.grad_out is None)
    if args_a.grad_out is not None:
        ga, gb = args_a.grad_out, args_b.grad_out
        assert ga.dtype == gb.dtype == a.surgery.dtype
        if ga.dtype == torch.float32:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, equal_nan=True)
        else:  # one rounding of (nearly) the same float32 value: at most one unit in the last place
            ulp = 2.0 ** (-7 if ga.dtype == torch.bfloat16 else -10)
            torch.testing.assert_close(ga.float(), gb.float(), rtol=ulp, atol=atol, equal_nan=True)


def inactive(setup: Setup):
    return [p for n, p in setup.model.named_parameters() if n.startswith(("unused", "frozen"))]


def run_pair(opt_fn, dtype=torch.float32, keep_grads=True, steps=3, num_tasks=3, block_n=None, clip=0.7,
             mutate=None, backend="triton", **net_kw):  # fmt: skip
    """Steps of ``backend``'s kernel (Triton's with a forced ``block_n`` when given) vs the reference from
    identical inputs; returns the two set-ups and last args."""
    if block_n is None:
        kernel = backends.get_backend(backend, DEVICE).fused_step
    else:
        kernel = lambda args: triton_kernels().fused_step(args, block_n=block_n)  # noqa: E731
    a = Setup(opt_fn, dtype, num_tasks, **net_kw)
    b = Setup(opt_fn, dtype, num_tasks, **net_kw)
    for step in range(steps):
        a.capture(step)
        b.capture(step)
        assert torch.equal(a.surgery.buffer, b.surgery.buffer)
        weights = surgery_weights(a.surgery) * clip  # a clip coefficient, as step() folds it in
        if mutate is not None:
            mutate(a.surgery.buffer)
            mutate(b.surgery.buffer)
        args_a, args_b = a.args(weights, keep_grads), b.args(weights, keep_grads)
        frozen = [p.detach().clone() for p in inactive(a)]
        kernel(args_a)
        _fused_step.reference_kernel(args_b)
        assert_setups_close(a, b, args_a, args_b)
        for p, before in zip(inactive(a), frozen):  # inactive slots untouched, no state created
            assert torch.equal(p, before) and len(a.opt.state.get(p, {})) == 0
        if keep_grads:
            off = {s.name: (s.start, s.end) for s in a.surgery.partition.slots}
            for name, (lo, hi) in off.items():
                if name.startswith(("unused", "frozen")):
                    assert torch.isnan(args_a.grad_out[lo:hi].float()).all(), name  # not written
        sync(a, b)
        a.finish()
        b.finish()
    return a, b, args_a, args_b


SGD_CASES = {
    "plain": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "dampening_maximize": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3, maximize=True),
    "momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.1),
}
ADAM_CASES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1),
    "adam_wd_amsgrad": lambda ps: torch.optim.Adam(ps, lr=3e-3, amsgrad=True, weight_decay=0.01),
    "adam_maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True),
    # beta1 < 0.5: lerp's weight 1 - beta1 >= 0.5 takes torch's other branch; amsgrad on AdamW.
    "adamw_small_beta1_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.3, 0.9), amsgrad=True,
                                                              weight_decay=0.05, eps=1e-6),
    "adam_no_wd": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}


# ---------------------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("keep_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_reference(case, dtype, keep_grads, backend):
    # Three steps: the first creates the momentum buffer (FIRST), the later ones update it.
    a, _, _, _ = run_pair(SGD_CASES[case], dtype, keep_grads, backend=backend)
    p = a.model.a.weight
    momentum = a.opt.param_groups[0]["momentum"]
    assert ("momentum_buffer" in a.opt.state[p]) == (momentum != 0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("keep_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_reference(case, dtype, keep_grads, backend):
    a, _, _, _ = run_pair(ADAM_CASES[case], dtype, keep_grads, backend=backend)
    state = a.opt.state[a.model.a.weight]
    assert float(state["step"]) == 3
    assert ("max_exp_avg_sq" in state) == a.opt.param_groups[0]["amsgrad"]


@needs_triton
@pytest.mark.parametrize("block_n", [16, 64, 1024])
@pytest.mark.parametrize("num_tasks", [1, 2, 5])
def test_block_sizes_and_task_counts(block_n, num_tasks):
    # From every block masked (slots smaller than a block) to several full blocks plus a tail per slot.
    run_pair(ADAM_CASES["adam_wd_amsgrad"], torch.float16, num_tasks=num_tasks, block_n=block_n, steps=2)


@needs_triton
def test_slot_of_several_chunks():
    # big.weight has 16800 elements: its second chunk starts 2^14 elements into the slot.
    a, _, args, _ = run_pair(SGD_CASES["momentum_nesterov_wd"], torch.bfloat16, steps=2, block_n=256, big=True)
    first = args.chunks.first.cpu()
    slot = [s.name for s in a.surgery.partition.slots].index("big.weight")
    assert int(first[slot + 1] - first[slot]) == 2
    run_pair(ADAM_CASES["adamw"], torch.float32, steps=2, block_n=256, big=True)


@pytest.mark.parametrize("backend", FUSED)
def test_per_group_flags(backend):
    # Per-slot flags are runtime values: groups with different settings in one launch.
    def sgd(ps):
        ps = list(ps)
        return torch.optim.SGD([
            {"params": ps[:2], "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            {"params": ps[2:4], "lr": 0.2, "maximize": True},
            {"params": ps[4:], "lr": 0.1, "momentum": 0.5, "dampening": 0.5},
        ], lr=0.1)  # fmt: skip

    def adam(ps):
        ps = list(ps)
        return torch.optim.Adam([
            {"params": ps[:2], "amsgrad": True, "weight_decay": 0.1, "betas": (0.2, 0.5)},
            {"params": ps[2:4], "maximize": True, "lr": 1e-2},
            {"params": ps[4:], "eps": 1e-3, "weight_decay": 0.0},
        ], lr=3e-3)  # fmt: skip

    run_pair(sgd, torch.bfloat16, backend=backend)
    run_pair(adam, torch.float32, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_later_momentum_buffer_after_state_dict_round_trip(backend):
    kernel = backends.get_backend(backend, DEVICE).fused_step
    a, b, _, _ = run_pair(SGD_CASES["momentum_wd"], torch.float32, steps=1, backend=backend)
    for s in (a, b):
        s.opt.load_state_dict(s.opt.state_dict())  # state tensors are re-created: new pointers
    for step in (1, 2):
        a.capture(step)
        b.capture(step)
        w = surgery_weights(a.surgery)
        args_a, args_b = a.args(w, True), b.args(w, True)
        assert not bool(args_a.hyper[:, _fused_step.FIRST].any())
        kernel(args_a)
        _fused_step.reference_kernel(args_b)
        assert_setups_close(a, b, args_a, args_b)
        sync(a, b)
        a.finish()
        b.finish()


@pytest.mark.parametrize("backend", FUSED)
def test_unaligned_parameter_pointer(backend):
    # A parameter that is a view at an odd storage offset: no 16-byte alignment is promised for it.
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            store = torch.randn(1 + 9 * 5)
            self.w = nn.Parameter(store[1:].view(9, 5))
            self.b = nn.Parameter(torch.randn(9))

        def forward(self, x):
            return x @ self.w.t() + self.b

    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = Odd().to(DEVICE)
        s = mgs.ModularGradientSurgery(model, num_tasks=2, backend="torch")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for t in range(2):
            with s.capture(t):
                (model(torch.ones(3, 5, device=DEVICE)) * (1 - 2 * t)).sum().backward()
        args = fused_step_args(s, opt, surgery_weights(s), True)
        outs.append((model, opt, args))
    (ma, oa, aa), (mb, ob, ab) = outs
    assert ma.w.data_ptr() % 16 == 4
    if backend == "triton":
        from mgs_kernels.triton import _step

        assert _step._check_slots(aa) == 4
    backends.get_backend(backend, DEVICE).fused_step(aa)
    _fused_step.reference_kernel(ab)
    torch.testing.assert_close(ma.w, mb.w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(oa.state[ma.w]["exp_avg_sq"], ob.state[mb.w]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(aa.grad_out, ab.grad_out, rtol=1e-5, atol=1e-6)


def bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    x, y = x.detach(), y.detach()
    return x.dtype == y.dtype and torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()]))


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_identical_reruns(backend):
    kernel = backends.get_backend(backend, DEVICE).fused_step
    for opt_fn in (SGD_CASES["momentum_nesterov_wd"], ADAM_CASES["adamw_small_beta1_amsgrad"]):
        a = Setup(opt_fn, torch.bfloat16)
        c = Setup(opt_fn, torch.bfloat16)
        for step in range(2):
            for s in (a, c):
                s.capture(step)
            w = surgery_weights(a.surgery)
            args_a, args_c = a.args(w, True), c.args(w, True)
            kernel(args_a)
            kernel(args_c)
            assert bits_equal(args_a.grad_out, args_c.grad_out)  # NaN where inactive: compare bits
            for (_, pa, sa), (_, pc, sc) in zip(a.states(), c.states()):
                assert bits_equal(pa, pc)
                for key in sa:
                    assert bits_equal(torch.as_tensor(sa[key]), torch.as_tensor(sc[key]))
            a.finish()
            c.finish()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("opt_fn", [SGD_CASES["momentum_nesterov_wd"], ADAM_CASES["adam_wd_amsgrad"]])
def test_nan_and_inf_in_a_task_row_propagate(opt_fn, backend):
    slots = {s.name: s for s in mgs.build_partition(Net(), "tensor").slots}  # the set-ups' layout
    a_w, b_w = slots["a.weight"].start, slots["b.weight"].start

    def mutate(buffer):
        buffer[1, a_w + 3] = NAN  # a.weight[3]
        buffer[2, b_w + 8] = float("inf")  # b.weight[8]
        buffer[0, b_w + 9] = float("-inf")

    a, _, args, _ = run_pair(opt_fn, torch.float32, steps=1, mutate=mutate, backend=backend)
    flat = torch.cat([p.detach().reshape(-1) for p in a.model.parameters()])
    flat_b = sum(p.numel() for n, p in a.model.named_parameters() if n in ("a.weight", "a.bias"))
    assert torch.isnan(args.grad_out[a_w + 3]) and not torch.isfinite(args.grad_out[b_w + 8 : b_w + 10]).any()
    assert torch.isnan(flat[3]) and not torch.isfinite(flat[flat_b + 8 : flat_b + 10]).any()
    bad = torch.zeros_like(flat, dtype=torch.bool)
    bad[[3, flat_b + 8, flat_b + 9]] = True
    assert torch.isfinite(flat[~bad]).all()  # elementwise: nothing else is touched


# ---------------------------------------------------------------------------------------- GPU only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(1024, 4096 + 3)  # odd sizes: unaligned slot starts in the task buffer
        self.up = nn.Linear(4096 + 3, 2048)
        self.out = nn.Linear(2048, 5)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.emb(x)))))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adamw_amsgrad"])
def test_gpu_large_matches_reference(dtype, opt_name):
    opt_fn = {
        "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True, weight_decay=0.1),
    }[opt_name]
    T = 4
    setups = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Wide().cuda()
        s = mgs.ModularGradientSurgery(model, num_tasks=T, backend="triton", dtype=dtype, order="fixed")
        setups.append((model, s, opt_fn(model.parameters())))
    for step in range(2):
        for model, s, _ in setups:
            for t in range(T):
                g = torch.Generator(device="cuda").manual_seed(10 * step + t)
                with s.capture(t):
                    model(torch.randn(64, 1024, device="cuda", generator=g)).pow(2).mean().mul(t - 1.5).backward()
        w = surgery_weights(setups[0][1])
        args = [fused_step_args(s, opt, w, True) for _, s, opt in setups]
        for a in args:
            a.grad_out.fill_(NAN)
        triton_kernels().fused_step(args[0])
        _fused_step.reference_kernel(args[1])
        lr = setups[0][2].param_groups[0]["lr"]
        p_atol = 1e-2 * lr if "adam" in opt_name else 1e-6
        for pa, pb in zip(setups[0][0].parameters(), setups[1][0].parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=p_atol)
            for key, va in setups[0][2].state[pa].items():
                if isinstance(va, torch.Tensor) and va.is_cuda:
                    torch.testing.assert_close(va, setups[1][2].state[pb][key], rtol=1e-5, atol=1e-6)
        ulp = 1e-5 if dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(args[0].grad_out.float(), args[1].grad_out.float(), rtol=ulp, atol=1e-6)
        (ma, _, oa), (mb, _, ob) = setups
        with torch.no_grad():  # continue both from the reference's values
            for pa, pb in zip(ma.parameters(), mb.parameters()):
                pa.copy_(pb)
                for key, v in ob.state[pb].items():
                    if isinstance(v, torch.Tensor) and v.is_cuda:
                        oa.state[pa][key].copy_(v)
        for _, s, _ in setups:
            s.zero_grad()


@pytest.mark.gpu
@needs_cuda
def test_gpu_step_equals_torch_foreach_optimizer():
    torch.manual_seed(0)
    models = [Wide().cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for m in models]
    surgeries = [mgs.ModularGradientSurgery(m, num_tasks=3, backend=b, dtype=torch.bfloat16, seed=1)
                 for m, b in zip(models, ("triton", "torch"))]  # fmt: skip
    for step in range(3):
        for m, s in zip(models, surgeries):
            for t in range(3):
                g = torch.Generator(device="cuda").manual_seed(10 * step + t)
                with s.capture(t):
                    m(torch.randn(32, 1024, device="cuda", generator=g)).pow(2).mean().mul(t - 1).backward()
        surgeries[0].step(opts[0], max_grad_norm=1.0)
        surgeries[1].resolve()
        torch.nn.utils.clip_grad_norm_(models[1].parameters(), 1.0)
        opts[1].step()
        for pa, pb in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=2e-2 * 1e-3)
