"""Conflict statistics, the unbiased squared-norm estimator, sampling weights and plots."""

from __future__ import annotations

import pytest
import torch

import mgs_kernels as mgs
from mgs_kernels import MGSInputError
from mgs_kernels.imbalance import unbiased_sq_norm_from_gram
from models import lm_loss, task_batch, tiny_model

from conftest import offsets_from_sizes, random_sizes


def direct_per_task(grads64, offsets):
    """Per-module task gradients as a list of [T, n_m] float64 slices."""
    b = offsets.tolist()
    return [grads64[:, b[m] : b[m + 1]] for m in range(len(b) - 1)]


def test_stats_equal_quantities_computed_from_task_gradients(rng):
    T = rng.randint(2, 5)
    sizes = random_sizes(rng, 8, max_size=200)
    offsets = offsets_from_sizes(sizes)
    grads = torch.randn(T, sum(sizes))
    order = mgs.random_order(len(sizes), T, generator=torch.Generator().manual_seed(1))
    gram = mgs.segmented_gram(grads, offsets)
    weights = mgs.pcgrad_weights(gram, order=order)
    stats = mgs.SurgeryStats(gram, weights, [f"m{i}" for i in range(len(sizes))], order=order)
    g64 = grads.double()
    for m, v in enumerate(direct_per_task(g64, offsets)):
        norms = v.norm(dim=1)
        torch.testing.assert_close(stats.norms[m].double(), norms, rtol=1e-5, atol=1e-6)
        for i in range(T):
            for j in range(T):
                if norms[i] > 0 and norms[j] > 0:
                    cos = (v[i] @ v[j]) / (norms[i] * norms[j])
                    assert abs(stats.cosine[m, i, j].item() - cos.item()) < 1e-5
                    assert stats.conflicts[m, i, j].item() == (i != j and (v[i] @ v[j]).item() < 0)
                    assert abs(stats.norm_ratio[m, i, j].item() - (norms[i] / norms[j]).item()) < 1e-4 * (
                        1 + (norms[i] / norms[j]).item())
                else:
                    assert stats.cosine[m, i, j].item() == 0.0
        # Each task's projected gradient by the reference loop, to check the surgery-change stats.
        projected = []
        for i in range(T):
            g = v[i].clone()
            for j in order[m, i].tolist():
                d = g @ v[j]
                if d < 0 and v[j] @ v[j] > 0:
                    g = g - d / (v[j] @ v[j]) * v[j]
            projected.append(g)
        # Gram-space quantities are squared norms from float32 Grams: their error is absolute, ~eps32 |v|^2, so
        # they are compared squared (a norm that cancels to 0 comes out as sqrt(eps32) |v|: 2.4e-4 seen at
        # |v| = 1.3 on a one-element module, T = 5, MGS_TEST_SEED=273657232).
        tol = 1e-5 * (1 + v.norm().item()) ** 2
        for i in range(T):
            change_sq = (projected[i] - v[i]).norm().item() ** 2
            assert abs(stats.change_sq[m, i].item() - change_sq) <= tol
            assert abs(stats.projected_norms[m, i].item() ** 2 - projected[i].norm().item() ** 2) <= tol
        assert abs(stats.result_norm[m].item() ** 2 - sum(projected).norm().item() ** 2) <= T * tol
        assert stats.num_conflicts[m].item() == sum(
            (v[i] @ v[j]).item() < 0 for i in range(T) for j in range(i + 1, T))
    assert abs(stats.grad_norm.item() - stats.result_norm.square().sum().sqrt().item()) < 1e-6


def test_scalars_on_a_model_step():
    model = tiny_model("llama")
    s = mgs.ModularGradientSurgery(model, num_tasks=3, partition="module")
    stats = s.backward([lm_loss(model, task_batch(t)) for t in range(3)])
    sc = stats.scalars()
    assert all(isinstance(v, float) for v in sc.values())
    for key in ["mgs/grad_norm", "mgs/conflict_pair_fraction", "mgs/conflict_module_fraction", "mgs/cos/0-1",
                "mgs/cos/1-2", "mgs/task0/grad_norm", "mgs/task2/change", "mgs/attn/conflict_fraction",
                "mgs/mlp/cosine_mean", "mgs/norm/norm_ratio_max"]:
        assert key in sc, key
    # The global gradient norm from Gram space equals the norm of what landed in p.grad.
    direct = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert abs(sc["mgs/grad_norm"] - direct.item()) < 1e-4 * direct.item()
    # Whole-model cosine between tasks 0 and 1 from the task rows.
    row0, row1 = s.buffer[0].double(), s.buffer[1].double()
    assert abs(sc["mgs/cos/0-1"] - (row0 @ row1 / (row0.norm() * row1.norm())).item()) < 1e-5
    # Conflict fraction per kind equals the count over that kind's modules.
    attn = [m for m, k in enumerate(stats.module_kinds) if k == "attn"]
    frac = sum(stats.num_conflicts[m].item() for m in attn) / (len(attn) * 3)
    assert abs(sc["mgs/attn/conflict_fraction"] - frac) < 1e-6


def test_unbiased_sq_norm_equals_formula_and_selection(rng):
    B = rng.randint(2, 6)
    sizes = random_sizes(rng, 7, max_size=300)
    offsets = offsets_from_sizes(sizes)
    g = torch.randn(B, sum(sizes))
    est = mgs.unbiased_sq_norm(g, offsets)
    b = offsets.tolist()
    for m in range(len(sizes)):
        v = g[:, b[m] : b[m + 1]].double()
        formula = (v.sum(0).pow(2).sum() - v.pow(2).sum()) / (B * (B - 1))
        assert abs(est[m].item() - formula.item()) <= 1e-4 * (1 + v.pow(2).sum().item() / B)
    pick = [len(sizes) - 1, 2, 3]
    sub = mgs.unbiased_sq_norm(g, offsets, modules=pick)
    torch.testing.assert_close(sub, est[pick], rtol=1e-5, atol=1e-5)
    with pytest.raises(MGSInputError, match="B >= 2"):
        mgs.unbiased_sq_norm(g[:1], offsets)
    with pytest.raises(MGSInputError, match="out of range"):
        mgs.unbiased_sq_norm(g, offsets, modules=[len(sizes)])


def test_unbiased_sq_norm_is_unbiased_in_simulation():
    torch.manual_seed(0)
    n, B, trials = 64, 4, 4000
    mu = torch.randn(n) * 0.1
    true = mu.pow(2).sum().item()
    noise = 1.0  # per-coordinate std: the noise energy n * noise^2 / B = 16 dwarfs |mu|^2 = 0.64
    samples = mu + noise * torch.randn(trials, B, n)
    grams = torch.einsum("tbn,tcn->tbc", samples, samples)  # [trials, B, B]
    est = unbiased_sq_norm_from_gram(grams).double()
    naive = samples.mean(1).pow(2).sum(-1).double()
    se = est.std().item() / trials**0.5
    assert abs(est.mean().item() - true) < 4 * se
    assert naive.mean().item() - true > 10 * se  # the plug-in estimate is biased up by n sigma^2 / B
    assert (est < 0).any()  # signed, not clamped


def test_proportional_sampling_weights_and_ema():
    p = mgs.proportional_sampling_weights(torch.tensor([1.0, 3.0, -2.0, 0.0]))
    torch.testing.assert_close(p, torch.tensor([0.25, 0.75, 0.0, 0.0]))
    p = mgs.proportional_sampling_weights(torch.tensor([1.0, 4.0]), alpha=0.5, floor=0.1)
    torch.testing.assert_close(p, torch.tensor([0.1 + 0.8 / 3, 0.1 + 1.6 / 3]))
    assert abs(p.sum().item() - 1) < 1e-6
    torch.testing.assert_close(mgs.proportional_sampling_weights(torch.zeros(4)), torch.full((4,), 0.25))
    torch.testing.assert_close(mgs.proportional_sampling_weights(torch.tensor([1.0, 9.0]), alpha=0), torch.tensor([0.5, 0.5]))
    with pytest.raises(MGSInputError, match="floor"):
        mgs.proportional_sampling_weights(torch.ones(4), floor=0.3)
    ema = mgs.NormEMA(beta=0.8)
    torch.testing.assert_close(ema.update(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(ema.update(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 4.0]))
    v = ema.update(torch.tensor([12.0, 4.0]))
    expected = (0.8 * 0.8 * 0.2 * 2 + 0.8 * 0.2 * 2 + 0.2 * 12) / (1 - 0.8**3)
    assert abs(v[0].item() - expected) < 1e-5


def test_select_modules_last_attention_block():
    model = tiny_model("llama")
    s = mgs.ModularGradientSurgery(model, num_tasks=2, partition="module")
    assert [s.module_names[i] for i in mgs.select_modules(s.module_names, "model.layers.1.self_attn")] == [
        "model.layers.1.self_attn"]
    with pytest.raises(MGSInputError, match="matches no module"):
        mgs.select_modules(s.module_names, "model.layers.9.*")


def test_plots_render_png(tmp_path):
    pytest.importorskip("matplotlib")
    from mgs_kernels import plots

    model = tiny_model("qwen2")
    s = mgs.ModularGradientSurgery(model, num_tasks=3, partition="tensor")
    history = [s.backward([lm_loss(model, task_batch(t, seed=k)) for t in range(3)]) for k in range(3)]
    cos, layers, kinds = plots.layer_kind_cosine(history[-1], (0, 2))
    assert layers == [0, 1] and kinds == ["attn", "mlp", "norm"]
    # A cell's cosine pools its tensors exactly: equal to the cosine of the concatenated gradients.
    cell = [slot for slot in s.partition.slots if slot.name.startswith("model.layers.1.mlp")]
    a = torch.cat([s.buffer[0, sl.start : sl.end] for sl in cell]).double()
    c = torch.cat([s.buffer[2, sl.start : sl.end] for sl in cell]).double()
    assert abs(cos[1, 1].item() - (a @ c / (a.norm() * c.norm())).item()) < 1e-5
    heat, line = tmp_path / "heat.png", tmp_path / "line.png"
    plots.cosine_heatmap(history[-1], (0, 1), path=str(heat))
    plots.conflict_fraction_over_steps(history, path=str(line))
    for f in (heat, line):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 2000
