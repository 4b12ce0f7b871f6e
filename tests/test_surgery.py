"""ModularGradientSurgery on tiny Hugging Face models and plain modules, against the reference loop
run on per-task gradients computed directly with autograd."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import nn

import mgs_kernels as mgs
from mgs_kernels import reference
from models import lm_loss, task_batch, tiny_model

from conftest import assert_close_to_reference

PARTITIONS = ["tensor", "module", "layer", "global", lambda name: name.split(".")[-1]]
PARTITION_IDS = ["tensor", "module", "layer", "global", "callable"]


def per_task_flat(model, partition, task_losses) -> torch.Tensor:
    """[T, N] float64 per-task gradients in the partition's layout, by plain autograd."""
    rows = []
    for losses in task_losses:
        grads: Dict[str, torch.Tensor] = {}
        for loss_fn in losses:
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
            for s in partition.slots:
                if s.param.grad is not None:
                    grads[s.name] = grads.get(s.name, 0) + s.param.grad.detach().double().clone()
        row = torch.zeros(partition.numel, dtype=torch.float64)
        for s in partition.slots:
            if s.name in grads:
                row[s.start : s.end] = grads[s.name].reshape(-1)
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def expected_result(model, partition, task_losses, order, exclude_mask=None):
    flat = per_task_flat(model, partition, task_losses)
    out = reference.modular_pcgrad(flat, partition.offsets, order=order, dtype=torch.float64)
    if exclude_mask is not None:
        plain = flat.sum(0)
        for m, ex in enumerate(exclude_mask):
            if ex:
                a, b = partition.offsets[m].item(), partition.offsets[m + 1].item()
                out[a:b] = plain[a:b]
    return out


def collected_grads(partition) -> torch.Tensor:
    out = torch.zeros(partition.numel, dtype=torch.float64)
    for s in partition.slots:
        if s.param.grad is not None:
            out[s.start : s.end] = s.param.grad.detach().double().reshape(-1)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("partition", PARTITIONS, ids=PARTITION_IDS)
def test_backward_matches_reference(kind, partition):
    model = tiny_model(kind)
    T = 3
    batches = [task_batch(t) for t in range(T)]
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition=partition, seed=11)
    order = mgs.random_order(s.partition.num_modules, T, generator=torch.Generator().manual_seed(11))
    expected = expected_result(model, s.partition, [[lambda b=b: lm_loss(model, b)] for b in batches], order)
    stats = s.backward([lm_loss(model, b) for b in batches])
    assert_close_to_reference(collected_grads(s.partition), expected, s.partition.offsets, 2e-4)
    assert stats.gram.shape == (s.partition.num_modules, T, T)
    assert len(stats.module_names) == s.partition.num_modules


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("partition", PARTITIONS, ids=PARTITION_IDS)
def test_capture_with_interleaved_micro_batches(kind, partition):
    model = tiny_model(kind, seed=1)
    T = 3
    micro = {t: [task_batch(t, seed=k) for k in range(t + 1)] for t in range(T)}  # 1, 2, 3 micro-batches
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition=partition, seed=5, order="fixed")
    order = mgs.fixed_order(s.partition.num_modules, T)
    expected = expected_result(
        model, s.partition, [[lambda b=b: lm_loss(model, b) for b in micro[t]] for t in range(T)], order
    )
    # Interleave tasks: 2, 0, 1, 2, 1, 2 — windows for the same task accumulate.
    schedule = [(2, 0), (0, 0), (1, 0), (2, 1), (1, 1), (2, 2)]
    for t, k in schedule:
        with s.capture(t):
            lm_loss(model, micro[t][k]).backward()
    s.resolve()
    assert_close_to_reference(collected_grads(s.partition), expected, s.partition.offsets, 2e-4)


@pytest.mark.parametrize("kind", ["mistral", "gpt2"])
def test_other_architectures_module_partition(kind):
    model = tiny_model(kind)
    T = 2
    batches = [task_batch(t) for t in range(T)]
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module", seed=3)
    order = mgs.random_order(s.partition.num_modules, T, generator=torch.Generator().manual_seed(3))
    expected = expected_result(model, s.partition, [[lambda b=b: lm_loss(model, b)] for b in batches], order)
    s.backward([lm_loss(model, b) for b in batches])
    assert_close_to_reference(collected_grads(s.partition), expected, s.partition.offsets, 2e-4)


def test_capture_is_zero_copy_and_result_lives_in_one_buffer():
    model = tiny_model("llama")
    s = mgs.ModularGradientSurgery(model, num_tasks=2)
    storage = s.buffer.untyped_storage().data_ptr()
    span = s.buffer.numel() * s.buffer.element_size()
    with s.capture(1):
        lm_loss(model, task_batch(1)).backward()
        for slot in s.partition.slots:
            ptr = slot.param.grad.data_ptr()
            assert storage + s.buffer.shape[1] * 4 <= ptr < storage + span  # inside row 1
    with s.capture(0):
        lm_loss(model, task_batch(0)).backward()
    s.resolve()
    out_ptrs = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    assert len(out_ptrs) == 1


def test_untouched_parameters_keep_none_and_partial_tasks_count_as_zero():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(5, 4)
            self.head_a = nn.Linear(4, 1)
            self.head_b = nn.Linear(4, 1)
            self.unused = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.trunk(x))
            return self.head_a(h).sum(), self.head_b(h).sum()

    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(6, 5)
    s = mgs.ModularGradientSurgery(model, num_tasks=2, partition="module", order="fixed")
    flat = per_task_flat(model, s.partition, [[lambda: model(x)[0]], [lambda: -3 * model(x)[0] + model(x)[1]]])
    a, b = model(x)
    s.backward([a, -3 * a + b])
    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    assert model.head_b.weight.grad is not None  # only task 1 touches it; task 0 counts as zero
    expected = reference.modular_pcgrad(flat, s.partition.offsets, order="fixed", dtype=torch.float64)
    got = collected_grads(s.partition)
    touched = torch.ones(s.partition.numel, dtype=torch.bool)
    for slot in s.partition.slots:
        if slot.name.startswith("unused"):
            touched[slot.start : slot.end] = False
    torch.testing.assert_close(got[touched], expected[touched], rtol=1e-5, atol=1e-6)


def test_exclude_gets_plain_sum():
    model = tiny_model("llama", seed=2)
    T = 3
    batches = [task_batch(t) for t in range(T)]
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module", exclude="*self_attn", seed=4)
    order = mgs.random_order(s.partition.num_modules, T, generator=torch.Generator().manual_seed(4))
    expected = expected_result(model, s.partition, [[lambda b=b: lm_loss(model, b)] for b in batches], order,
                               exclude_mask=s.partition.excluded)
    stats = s.backward([lm_loss(model, b) for b in batches])
    assert_close_to_reference(collected_grads(s.partition), expected, s.partition.offsets, 2e-4)
    excluded = torch.tensor(s.partition.excluded)
    assert (stats.weights[excluded] == 1).all()


@pytest.mark.parametrize("buffer_dtype", [torch.bfloat16, torch.float16])
def test_copy_path_when_buffer_dtype_differs(buffer_dtype):
    model = tiny_model("llama", seed=3)
    T = 2
    batches = [task_batch(t) for t in range(T)]
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module", dtype=buffer_dtype, order="fixed")
    order = mgs.fixed_order(s.partition.num_modules, T)
    flat = per_task_flat(model, s.partition, [[lambda b=b: lm_loss(model, b)] for b in batches])
    # The reference sees the task gradients as the buffer stores them.
    expected = reference.modular_pcgrad(flat.to(buffer_dtype), s.partition.offsets, order=order,
                                        dtype=torch.float64)
    s.backward([lm_loss(model, b) for b in batches])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert_close_to_reference(collected_grads(s.partition), expected, s.partition.offsets, 2e-2)


def test_random_order_reproducible_from_seed_and_advances():
    T = 3
    batches = [task_batch(t) for t in range(T)]

    def run(seed, steps):
        model = tiny_model("llama", seed=9)
        s = mgs.ModularGradientSurgery(model, num_tasks=T, partition="tensor", seed=seed)
        results = []
        for _ in range(steps):
            s.backward([lm_loss(model, b) for b in batches])
            results.append(collected_grads(s.partition))
        return model, s, results

    model, s, a = run(seed=1, steps=2)
    _, _, b = run(seed=1, steps=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Step 2 used the generator's second table (no optimizer step, so the task gradients are equal).
    gen = torch.Generator().manual_seed(1)
    M = s.partition.num_modules
    mgs.random_order(M, T, generator=gen)
    second = mgs.random_order(M, T, generator=gen)
    flat = per_task_flat(model, s.partition, [[lambda b=b: lm_loss(model, b)] for b in batches])
    expected = reference.modular_pcgrad(flat, s.partition.offsets, order=second, dtype=torch.float64)
    assert_close_to_reference(a[1], expected, s.partition.offsets, 2e-4)


def test_training_loop_with_optimizer_and_model_zero_grad():
    model = tiny_model("qwen2", seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s = mgs.ModularGradientSurgery(model, num_tasks=2, partition="module")
    losses: List[float] = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        for t in range(2):
            with s.capture(t):
                loss = lm_loss(model, task_batch(t))
                loss.backward()
            losses.append(loss.item())
        stats = s.resolve()
        opt.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert set(stats.scalars()) >= {"mgs/conflict_pair_fraction", "mgs/grad_norm"}
    assert losses[-2] < losses[0] and losses[-1] < losses[1]


def test_grad_replaced_inside_window_is_still_captured():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    s = mgs.ModularGradientSurgery(model, num_tasks=2, order="fixed")
    with s.capture(0):
        model(x).sum().backward()
        model.weight.grad = None  # e.g. a user's zero_grad(set_to_none=True) mid-window
        model(x).sum().backward()
    with s.capture(1):
        (2 * model(x).sum()).backward()
    s.resolve()
    direct_w = torch.autograd.grad(model(x).sum(), model.weight)[0]
    # Tasks 0 and 1 are both 2x the same gradient: no conflict, so the plain sum.
    torch.testing.assert_close(model.weight.grad, 4 * direct_w)


def test_t1_and_create_graph_style_grads():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    s = mgs.ModularGradientSurgery(model, num_tasks=1)
    s.backward([model(x).pow(2).sum()])
    direct = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
    for p, g in zip(model.parameters(), direct):
        torch.testing.assert_close(p.grad, g)


def test_backward_outside_capture_is_left_alone():
    model = nn.Linear(3, 2)
    s = mgs.ModularGradientSurgery(model, num_tasks=2)
    model(torch.randn(2, 3)).sum().backward()
    assert (s.buffer == 0).all()
    assert model.weight.grad is not None


def test_top_k_applies_surgery_to_the_largest_modules_only():
    model = tiny_model("llama", seed=6)
    T, k = 3, 3
    batches = [task_batch(t) for t in range(T)]
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module", seed=8, top_k=k, exclude="*.norm")
    part = s.partition
    order = mgs.random_order(part.num_modules, T, generator=torch.Generator().manual_seed(8))
    flat = per_task_flat(model, part, [[lambda b=b: lm_loss(model, b)] for b in batches])
    # The k largest modules by the norm of the plain summed gradient, among those not excluded.
    b = part.offsets.tolist()
    norms = [flat[:, b[m]:b[m + 1]].sum(0).norm().item() if not part.excluded[m] else -1.0
             for m in range(part.num_modules)]
    top = sorted(range(part.num_modules), key=lambda m: -norms[m])[:k]
    expected = expected_result(model, part, [[lambda b=b: lm_loss(model, b)] for b in batches], order,
                               exclude_mask=[m not in top for m in range(part.num_modules)])
    stats = s.backward([lm_loss(model, b) for b in batches])
    assert_close_to_reference(collected_grads(part), expected, part.offsets, 2e-4)
    assert stats.plain_sum.tolist() == [m not in top for m in range(part.num_modules)]
    assert stats.excluded.tolist() == part.excluded  # the user's exclusions only: top_k's plain sums are not
    assert any((stats.weights[m] != 1).any() for m in top)  # surgery did act on the chosen modules


def test_explicit_order_table_is_used_every_step():
    model = tiny_model("llama", seed=7)
    T = 3
    batches = [task_batch(t) for t in range(T)]
    probe = mgs.build_partition(model, "module")
    # Descending visit order, different from both "fixed" (ascending) and the seed's random draw.
    table = mgs.fixed_order(probe.num_modules, T).flip(-1).contiguous()
    s = mgs.ModularGradientSurgery(model, num_tasks=T, partition="module", order=table)
    expected = expected_result(model, s.partition, [[lambda b=b: lm_loss(model, b)] for b in batches], table)
    for _ in range(2):
        stats = s.backward([lm_loss(model, b) for b in batches])
        assert torch.equal(stats.order, table)
        assert_close_to_reference(collected_grads(s.partition), expected, s.partition.offsets, 2e-4)
