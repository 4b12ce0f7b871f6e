"""The kernel-level ops inside ``torch.compile``: registered as torch.library custom ops with fake
implementations, so a compiled function that calls them traces without graph breaks
(``fullgraph=True``) and computes exactly what eager mode computes."""

from __future__ import annotations

import pytest
import torch

import mgs_kernels as mgs

from conftest import BACKENDS, DEVICE, offsets_from_sizes, random_sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_function_calling_the_ops_equals_eager(backend, rng):
    T = rng.randint(1, 5)
    sizes = random_sizes(rng, rng.randint(1, 6), max_size=200)
    offsets = offsets_from_sizes(sizes).to(DEVICE)
    grads = torch.randn(T, sum(sizes), device=DEVICE)
    table = mgs.random_order(len(sizes), T, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)),
                             device=DEVICE)

    def step(g):
        g = g * 2.0  # traced torch code around the ops
        gram = mgs.segmented_gram(g, offsets, backend=backend)
        w = mgs.pcgrad_weights(gram, order=table, backend=backend)
        combined = mgs.segmented_combine(g, offsets, w, backend=backend)
        fused = mgs.modular_pcgrad(g, offsets, order="fixed", backend=backend)
        out = torch.empty_like(fused)
        mgs.modular_pcgrad(g, offsets, order=table, out=out, backend=backend)
        return gram, w, combined, fused, out

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(grads), step(grads)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_compiled_call_still_validates_inputs():
    grads = torch.randn(2, 10, device=DEVICE)
    bad = torch.tensor([0, 4, 9], device=DEVICE)  # does not end at N = 10

    torch._dynamo.reset()
    compiled = torch.compile(lambda g: mgs.modular_pcgrad(g, bad, order="fixed"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(mgs.MGSInputError, match="must end at N = 10"):
        compiled(grads)
