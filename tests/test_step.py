"""ModularGradientSurgery.step(): parameters and optimizer state equal resolve() + clip_grad_norm_ +
optimizer.step() with torch's own optimizers, for every backend that runs here."""

from __future__ import annotations

import copy

import pytest
import torch

import mgs_kernels as mgs
from mgs_kernels import _fused_step
from mgs_kernels.backends.torch_backend import TorchBackend
from conftest import CPU_BACKENDS
from models import lm_loss, task_batch, tiny_model

# "reference-fused": the torch backend plus the plain-torch fused-step kernel, which checks the shared
# host side (eligibility, torch-format state, slot tables) independently of any native kernel.
BACKENDS = CPU_BACKENDS + ["reference-fused"]
FUSED_OPTIMIZERS = {"sgd", "sgd_momentum_nesterov_wd", "sgd_dampening_maximize", "adamw", "adam_amsgrad_wd"}


class ReferenceFusedBackend(TorchBackend):
    """The torch backend plus the plain-torch fused-step kernel, counting its calls."""

    name = "reference-fused"

    def __init__(self):
        self.calls = []

    def fused_step(self, args):
        self.calls.append(args.kind)
        _fused_step.reference_kernel(args)


def make_surgery(model, backend, **kw):
    if backend != "reference-fused":
        return mgs.ModularGradientSurgery(model, backend=backend, **kw), None
    s = mgs.ModularGradientSurgery(model, backend="torch", **kw)
    s.backend = ReferenceFusedBackend()
    return s, s.backend.calls

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                          weight_decay=0.01),
    "sgd_dampening_maximize": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3, maximize=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1),
    "adam_amsgrad_wd": lambda ps: torch.optim.Adam(ps, lr=3e-3, amsgrad=True, weight_decay=0.01),
    "rmsprop_fallback": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
}


def losses(model, step):
    return [lm_loss(model, task_batch(t, seed=step)) for t in range(3)]


def capture_all(s, model, step):
    for t, loss in enumerate(losses(model, step)):
        with s.capture(t):
            loss.backward()


def assert_states_equal(opt_a, opt_b, model_a, model_b, rtol=2e-5, atol=1e-7):
    # Adam's and RMSprop's updates are ~lr per element whatever the gradient's size (they divide by a
    # running RMS of the gradient), so where surgery nearly cancels an element's gradient, float32
    # rounding of the combine (~1e-3 relative there; the clip folded into the weights rounds
    # differently from clip_grad_norm_'s multiply) moves the parameter by ~1e-3 lr. Compare parameters
    # to 1% of a step: a wrong bias correction, decay or formula is off by far more.
    normalized = isinstance(opt_a, (torch.optim.Adam, torch.optim.RMSprop))
    param_atol = max(atol, 1e-2 * opt_a.param_groups[0]["lr"]) if normalized else atol
    for (na, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=param_atol, msg=f"parameter {na}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), na
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and va.device == vb.device and va.shape == vb.shape, (na, key)
                torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=f"state {key} of {na}")
            else:
                assert va == vb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_step_equals_resolve_clip_step(backend, opt_name, max_norm):
    model_a = tiny_model("llama", seed=5)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = OPTIMIZERS[opt_name](model_a.parameters()), OPTIMIZERS[opt_name](model_b.parameters())
    s_a, calls = make_surgery(model_a, backend, num_tasks=3, partition="module", seed=2)
    s_b = mgs.ModularGradientSurgery(model_b, num_tasks=3, partition="module", seed=2, backend="torch")
    clipped = False
    for step in range(3):
        capture_all(s_a, model_a, step)
        stats = s_a.step(opt_a, max_grad_norm=max_norm)
        assert all(p.grad is None for p in model_a.parameters())

        capture_all(s_b, model_b, step)
        s_b.resolve()
        if max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(model_b.parameters(), max_norm)
            torch.testing.assert_close(stats.grad_norm, total, rtol=1e-5, atol=1e-8)
            clipped |= bool(stats.clip_coef < 1)
        opt_b.step()
        assert_states_equal(opt_a, opt_b, model_a, model_b)
    assert max_norm is None or clipped, "the clip threshold never bit: the test would not see a wrong coefficient"
    # The state dict round-trips through torch's own format.
    opt_a.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    capture_all(s_a, model_a, 3)
    s_a.step(opt_a, max_grad_norm=max_norm)
    capture_all(s_b, model_b, 3)
    s_b.resolve()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), max_norm)
    opt_b.step()
    assert_states_equal(opt_a, opt_b, model_a, model_b)
    if calls is not None:
        assert len(calls) == (4 if opt_name in FUSED_OPTIMIZERS else 0), "fused path ran / fell back as expected"


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_grads_leaves_clipped_combined_gradient(backend):
    model_a = tiny_model("qwen2", seed=1)
    model_b = copy.deepcopy(model_a)
    s_a, _ = make_surgery(model_a, backend, num_tasks=3, seed=4)
    s_b = mgs.ModularGradientSurgery(model_b, num_tasks=3, seed=4)
    capture_all(s_a, model_a, 0)
    s_a.step(torch.optim.SGD(model_a.parameters(), lr=0.0), max_grad_norm=0.01, keep_grads=True)
    capture_all(s_b, model_b, 0)
    s_b.resolve()
    torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.01)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=2e-5, atol=1e-9)


def test_nonfinite_norm_raises_or_propagates_like_torch():
    model = torch.nn.Linear(3, 2)
    s = mgs.ModularGradientSurgery(model, num_tasks=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3)
    with s.capture(0):
        (model(x).sum() * float("inf")).backward()
    with s.capture(1):
        model(x).sum().backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        s.step(opt, max_grad_norm=1.0, error_if_nonfinite=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    stats = s.step(opt, max_grad_norm=1.0)
    assert not torch.isfinite(stats.grad_norm)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_skips_step_on_inf():
    model = torch.nn.Linear(3, 2)
    s = mgs.ModularGradientSurgery(model, num_tasks=2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    with s.capture(0):
        scaler.scale(model(x).sum() * float("inf")).backward()
    with s.capture(1):
        scaler.scale(model(x).sum()).backward()
    s.step(opt, max_grad_norm=1.0, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # step skipped
    assert scaler.get_scale() < 1024.0
    with s.capture(0):
        scaler.scale(model(x).sum()).backward()
    with s.capture(1):
        scaler.scale(-0.5 * model(x).sum()).backward()
    s.step(opt, max_grad_norm=1.0, scaler=scaler)
    scaler.update()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bad_max_grad_norm():
    model = torch.nn.Linear(3, 2)
    s = mgs.ModularGradientSurgery(model, num_tasks=1)
    with pytest.raises(mgs.MGSInputError, match="max_grad_norm"):
        s.step(torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=-1.0)
