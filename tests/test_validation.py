"""Bad input raises a clear MGSInputError before anything is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import MGSInputError

T, N = 3, 20
OFF = torch.tensor([0, 5, 5, 20])


def grads():
    return torch.randn(T, N)


@pytest.mark.parametrize(
    "bad_offsets, message",
    [
        (torch.tensor([1, 5, 20]), "start at 0"),
        (torch.tensor([0, 9, 5, 20]), "non-decreasing"),
        (torch.tensor([0, 5, 19]), "end at N"),
        (torch.tensor([0.0, 5.0, 20.0]), "integer"),
        (torch.tensor([[0, 20]]), "1-D"),
        (torch.tensor([], dtype=torch.int64), "at least one"),
        ([0, 2.5, 20], "integers"),
    ],
)
def test_bad_offsets(bad_offsets, message):
    g = grads()
    out = torch.full((N,), 7.0)
    before = g.clone()
    for call in (
        lambda: mgs.segmented_gram(g, bad_offsets),
        lambda: mgs.modular_pcgrad(g, bad_offsets, out=out),
        lambda: mgs.segmented_combine(g, bad_offsets, torch.ones(3, T), out=out),
    ):
        with pytest.raises(MGSInputError, match=message):
            call()
    assert torch.equal(out, torch.full((N,), 7.0)) and torch.equal(g, before)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(N), "2-D"),
        (torch.randn(T, N, dtype=torch.float64), "dtype"),
        (torch.randint(0, 5, (T, N)), "dtype"),
        (torch.randn(N, T).t(), "contiguous"),
        (torch.randn(0, N), "T >= 1"),
        (torch.randn(T, N, requires_grad=True), "require grad"),
        ([[1.0] * N] * T, "torch.Tensor"),
    ],
)
def test_bad_grads(bad, message):
    with pytest.raises(MGSInputError, match=message):
        mgs.modular_pcgrad(bad, OFF)
    with pytest.raises(MGSInputError, match=message):
        mgs.segmented_gram(bad, OFF)


@pytest.mark.parametrize(
    "bad_out, message",
    [
        (torch.zeros(N + 1), "shape"),
        (torch.zeros(N, dtype=torch.float64), "dtype"),
        (torch.zeros(2 * N)[::2], "contiguous"),
        (torch.zeros(1, N), "1-D"),
    ],
)
def test_bad_out(bad_out, message):
    with pytest.raises(MGSInputError, match=message):
        mgs.modular_pcgrad(grads(), OFF, out=bad_out)


def test_out_overlapping_grads_other_than_a_row():
    buf = torch.randn(T * N + 3)
    g = buf[: T * N].view(T, N)
    before = buf.clone()
    with pytest.raises(MGSInputError, match="overlaps"):
        mgs.modular_pcgrad(g, OFF, out=buf[3 : 3 + N])
    assert torch.equal(buf, before)
    mgs.modular_pcgrad(g, OFF, out=g[1])  # exactly a row is fine


@pytest.mark.parametrize("row_stride", [0, 1, N // 2])
def test_out_into_grads_with_overlapping_rows_is_rejected(row_stride):
    # An expanded grads (row stride 0) or rows overlapping each other: any write into their storage changes
    # several task values at once. The error names the problem (it used to be a ZeroDivisionError for 0).
    base = torch.randn(row_stride * (T - 1) + N)
    g = base.as_strided((T, N), (row_stride, 1))
    before = base.clone()
    with pytest.raises(MGSInputError, match="rows overlap"):
        mgs.modular_pcgrad(g, OFF, out=base[:N])
    assert torch.equal(base, before)
    mgs.modular_pcgrad(g, OFF, out=torch.empty(N))  # reading overlapping rows into a separate out is fine


def test_bad_weights_and_gram():
    g = grads()
    out = torch.full((N,), 7.0)
    with pytest.raises(MGSInputError, match=r"\[M, T\]"):
        mgs.segmented_combine(g, OFF, torch.ones(3, T + 1), out=out)
    with pytest.raises(MGSInputError, match="floating"):
        mgs.segmented_combine(g, OFF, torch.ones(3, T, dtype=torch.int64), out=out)
    assert torch.equal(out, torch.full((N,), 7.0))
    with pytest.raises(MGSInputError, match=r"\[M, T, T\]"):
        mgs.pcgrad_weights(torch.zeros(3, T, T + 1))


def test_bad_order_and_eps():
    g = grads()
    with pytest.raises(MGSInputError, match="shape"):
        mgs.modular_pcgrad(g, OFF, order=torch.zeros(3, T, T, dtype=torch.int64))
    with pytest.raises(MGSInputError, match="int64"):
        mgs.modular_pcgrad(g, OFF, order=torch.zeros(3, T, T - 1, dtype=torch.int32))
    with pytest.raises(MGSInputError, match="exactly once"):
        mgs.modular_pcgrad(g, OFF, order=torch.zeros(3, T, T - 1, dtype=torch.int64))
    with pytest.raises(MGSInputError, match="'random', 'fixed'"):
        mgs.modular_pcgrad(g, OFF, order="sorted")
    with pytest.raises(MGSInputError, match="eps"):
        mgs.modular_pcgrad(g, OFF, eps=-1.0)


def test_unknown_backend():
    with pytest.raises(MGSInputError, match="unknown backend"):
        mgs.modular_pcgrad(grads(), OFF, backend="fortran")


def test_unavailable_backend_says_why():
    # CUDA kernels cannot run on CPU tensors whatever was built.
    with pytest.raises(mgs.BackendUnavailableError, match="cuda"):
        mgs.modular_pcgrad(grads(), OFF, backend="cuda")


def test_offsets_modified_in_place_are_revalidated():
    off = OFF.clone()
    mgs.segmented_gram(grads(), off)
    off[1] = 50
    with pytest.raises(MGSInputError, match="non-decreasing"):
        mgs.segmented_gram(grads(), off)


def _model():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_surgery_bad_task_and_losses_leave_grads_alone():
    model = _model()
    s = mgs.ModularGradientSurgery(model, num_tasks=2)
    x = torch.randn(5, 4)
    stats = s.backward([model(x).sum(), model(x).pow(2).sum()])
    assert stats is not None
    grads_before = [p.grad.clone() for p in model.parameters()]
    for bad in (2, -1, 1.0, True):
        with pytest.raises(MGSInputError, match="task id"):
            with s.capture(bad):
                pass
    with pytest.raises(MGSInputError, match="num_tasks is 2"):
        s.backward([model(x).sum()])
    with pytest.raises(MGSInputError, match="task 1 does not require grad"):
        s.backward([model(x).sum(), torch.tensor(1.0)])
    with pytest.raises(MGSInputError, match="task 0 must be a scalar"):
        s.backward([model(x), model(x).sum()])
    for p, before in zip(model.parameters(), grads_before):
        assert torch.equal(p.grad, before)


def test_surgery_bad_construction():
    with pytest.raises(MGSInputError, match="num_tasks"):
        mgs.ModularGradientSurgery(_model(), num_tasks=0)
    with pytest.raises(MGSInputError, match="partition"):
        mgs.ModularGradientSurgery(_model(), num_tasks=2, partition="blocks")
    with pytest.raises(MGSInputError, match="matches no module"):
        mgs.ModularGradientSurgery(_model(), num_tasks=2, exclude=["*attention*"])
    with pytest.raises(MGSInputError, match="dtype"):
        mgs.ModularGradientSurgery(_model(), num_tasks=2, dtype=torch.float64)
    with pytest.raises(MGSInputError, match="top_k"):
        mgs.ModularGradientSurgery(_model(), num_tasks=2, top_k=-1)
    frozen = _model().requires_grad_(False)
    with pytest.raises(MGSInputError, match="no trainable"):
        mgs.ModularGradientSurgery(frozen, num_tasks=2)


def test_nested_capture_rejected():
    model = _model()
    s = mgs.ModularGradientSurgery(model, num_tasks=2)
    with s.capture(0):
        with pytest.raises(MGSInputError, match="nest"):
            with s.capture(1):
                pass
