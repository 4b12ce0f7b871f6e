"""ModularGradientSurgery with every Gram-space method (``method=``): what lands in ``p.grad`` equals the method
applied module by module, in float64, to per-task gradients computed independently with autograd; over two
steps, so per-module state (GradVac's EMA targets, Nash-MTL's warm start) and the random stream carry over."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import reference
from mgs_kernels.weighting import get_weighting, methods

from conftest import assert_close_to_reference
from models import lm_loss, task_batch, tiny_model
from test_surgery import collected_grads, per_task_flat

T = 3
OPTIONS = {"constant": {"weights": [0.5, 1.0, 2.0]}, "cagrad": {"c": 0.4}, "fairgrad": {"alpha": 1.5},
           "krum": {"n_byzantine": 0, "n_selected": 2}, "aligned_mtl": {"scale_mode": "median"}}
METHODS = sorted(m for m in methods() if m != "pcgrad")  # PCGrad: tests/test_surgery.py


def expected_step(flat: torch.Tensor, offsets: torch.Tensor, weighting, state, generator) -> torch.Tensor:
    """float64 [N]: ``weighting`` applied per module to the float64 Grams of ``flat`` [T, N]."""
    gram = reference.gram(flat, offsets)
    w = weighting(gram, state=state, generator=generator, dtype=torch.float64)
    out = torch.zeros(flat.shape[1], dtype=torch.float64)
    bounds = offsets.tolist()
    for m in range(len(bounds) - 1):
        a, b = bounds[m], bounds[m + 1]
        out[a:b] = w[m] @ flat[:, a:b]
    return out


def run_and_compare(model, method, partition, losses_per_step, rtol):
    options = OPTIONS.get(method)
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition=partition, seed=7, method=method,
                                   method_options=options)
    part = s.partition
    weighting = get_weighting(method, options)  # an independent instance with its own state
    state = weighting.init_state(part.num_modules, T, torch.device("cpu")) if weighting.stateful else None
    gen = torch.Generator().manual_seed(7)
    for losses in losses_per_step:
        flat = per_task_flat(model, part, [[fn] for fn in losses])
        expected = expected_step(flat, part.offsets, weighting, state, gen)
        stats = s.backward([fn() for fn in losses])
        assert stats.method == method
        assert_close_to_reference(collected_grads(part), expected, part.offsets, rtol, flat)
    return s, stats


@pytest.mark.parametrize("partition", ["tensor", "module", "global"])
@pytest.mark.parametrize("method", METHODS)
def test_surgery_with_method_equals_the_method_per_module(method, partition):
    model = tiny_model("llama", seed=3)
    steps = [[lambda t=t, k=k: lm_loss(model, task_batch(t, seed=k)) for t in range(T)] for k in range(2)]
    # float32 Grams (the surgery) against float64 ones (here): the solvers see inputs ~1e-7 apart
    s, stats = run_and_compare(model, method, partition, steps, rtol=2e-3)
    if method in ("gradvac", "nash_mtl"):
        assert s.state_dict()["method_state"], "a stateful method keeps per-module state"
    assert "mgs/task0/result_cos" in stats.scalars()


class TwoHeads(nn.Module):
    """Task 2's loss never reaches head ``a``: in that module task 2 has no gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x, head):
        return getattr(self, head)(torch.tanh(self.body(x)))


@pytest.mark.parametrize("method", METHODS)
def test_a_task_absent_from_a_module_is_left_out_of_it(method):
    model = TwoHeads()
    xs = torch.randn(T, 5, 6, generator=torch.Generator().manual_seed(1))
    heads = ["a", "a", "b"]
    signs = [1.0, -1.0, 1.0]
    losses = [lambda t=t: (signs[t] * model(xs[t], heads[t]).pow(2).mean() + model(xs[t], heads[t]).sum() * 0.1)
              for t in range(T)]
    s, stats = run_and_compare(model, method, "module", [losses], rtol=2e-3)
    names = stats.module_names
    a = names.index("a")
    if method not in ("sum",):  # sum keeps weight 1 everywhere; every other method left task 2 out of "a"
        assert stats.weights[a, 2] == 0


def test_method_options_are_checked_at_construction():
    model = tiny_model("llama")
    with pytest.raises(mgs.MGSInputError, match="cagrad"):
        mgs.ModularGradientSurgery(model, num_tasks=T, method="cagrad")  # c is required
    with pytest.raises(mgs.MGSInputError, match="order= and eps= configure method='pcgrad'"):
        mgs.ModularGradientSurgery(model, num_tasks=T, method="upgrad", eps=1e-12)
    with pytest.raises(mgs.MGSInputError, match="unknown method"):
        mgs.ModularGradientSurgery(model, num_tasks=T, method="pcgard")
    with pytest.raises(mgs.MGSInputError, match="takes its options as arguments"):
        mgs.ModularGradientSurgery(model, num_tasks=T, method="pcgrad", method_options={"eps": 1.0})


def test_state_dict_round_trip_continues_bitwise():
    # Two surgeries on two identical models: B is restored from A's state after step 1, then both take step 2.
    models = [tiny_model("llama", seed=4), tiny_model("llama", seed=4)]
    surg = [mgs.ModularGradientSurgery(m, num_tasks=T, partition="module", method="gradvac", seed=1) for m in models]
    batches = [[task_batch(t, seed=k) for t in range(T)] for k in range(2)]
    surg[0].backward([lm_loss(models[0], b) for b in batches[0]])
    surg[1].load_state_dict(surg[0].state_dict())
    assert surg[1].steps == 1
    results = [s.backward([lm_loss(m, b) for b in batches[1]]) for s, m in zip(surg, models)]
    assert torch.equal(results[0].weights, results[1].weights)
    fresh = mgs.ModularGradientSurgery(tiny_model("llama", seed=4), num_tasks=T, partition="module",
                                       method="gradvac", seed=1)
    assert not torch.equal(fresh.backward([lm_loss(fresh.model, b) for b in batches[1]]).weights,
                           results[0].weights)  # without the state, step 2 differs
    with pytest.raises(mgs.MGSInputError, match="method"):
        mgs.ModularGradientSurgery(tiny_model("llama"), num_tasks=T, partition="module").load_state_dict(
            surg[0].state_dict())
