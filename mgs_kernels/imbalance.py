"""Gradient-imbalance tools from "Imbalanced Gradients in RL Post-Training of Multi-Task LLMs"
(arXiv 2510.19178), computed with the same segmented Gram kernels as the surgery.

- ``unbiased_sq_norm``: from B micro-batch gradients of one task, an unbiased estimate of the squared
  norm of the task's expected gradient, per module.
- ``proportional_sampling_weights``: task probabilities proportional to (estimated) squared norms.
- ``NormEMA``: exponential moving average of such estimates across steps.
- ``select_modules``: module indices by name pattern (e.g. the last attention block, which that paper
  found a reliable proxy for the whole model's gradient norm).
"""

from __future__ import annotations

import fnmatch
import re
from typing import List, Optional, Sequence, Union

import torch

from ._errors import MGSInputError
from ._plan import OffsetsLike, get_plan
from .ops import segmented_gram


def unbiased_sq_norm_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """[M] unbiased |E g|^2 per module from the Gram matrices [M, B, B] of B i.i.d. gradient samples.

    (|sum_b g_b|^2 - sum_b |g_b|^2) / (B (B - 1)) = (sum of off-diagonal Gram entries) / (B (B - 1)):
    the cross products only, whose expectation is |E g|^2. Signed: it can be negative when the
    signal is small against the noise; it is not clamped, so averages stay unbiased.
    """
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise MGSInputError(f"gram must be [M, B, B], got shape {tuple(gram.shape)}")
    B = gram.shape[1]
    if B < 2:
        raise MGSInputError(f"the unbiased estimator needs B >= 2 micro-batch gradients, got B = {B}")
    g = gram.double()
    total = g.sum(dim=(1, 2))
    diag = torch.diagonal(g, dim1=1, dim2=2).sum(-1)
    return ((total - diag) / (B * (B - 1))).to(torch.float32)


def unbiased_sq_norm(
    grads: torch.Tensor,
    offsets: OffsetsLike,
    *,
    modules: Optional[Union[Sequence[int], torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-module unbiased estimate of the squared norm of a task's expected gradient.

    Args:
        grads: [B, N] float32 / bfloat16 / float16, B >= 2 micro-batch gradients of ONE task
            (each the gradient of an independent micro-batch), in a module layout given by ``offsets``.
        offsets: int64 [M+1] module boundaries.
        modules: optional module indices to restrict the estimate to (only those columns are read).
        backend: as for ``segmented_gram``.

    Returns:
        float32 [M] (or [len(modules)] in the order given): (|sum_b g_b|^2 - sum_b |g_b|^2) / (B (B-1)).
    """
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
        raise MGSInputError("grads must be a [B, N] tensor of micro-batch gradients")
    if grads.shape[0] < 2:
        raise MGSInputError(f"the unbiased estimator needs B >= 2 micro-batch gradients, got B = {grads.shape[0]}")
    if modules is None:
        return unbiased_sq_norm_from_gram(segmented_gram(grads, offsets, backend=backend))
    plan = get_plan(offsets, grads.shape[1])
    idx = [int(m) for m in (modules.tolist() if isinstance(modules, torch.Tensor) else modules)]
    for m in idx:
        if not 0 <= m < plan.num_modules:
            raise MGSInputError(f"module index {m} out of range: there are {plan.num_modules} modules")
    bounds = plan.offsets_host.tolist()
    # Read only the selected modules: one Gram call per contiguous run of selected modules.
    wanted = sorted(set(idx))
    result = {}
    run: List[int] = []
    for m in wanted + [None]:
        if run and (m is None or m != run[-1] + 1):
            a, b = bounds[run[0]], bounds[run[-1] + 1]
            local = [bounds[k] - a for k in run] + [b - a]
            est = unbiased_sq_norm_from_gram(segmented_gram(grads[:, a:b], local, backend=backend))
            result.update(zip(run, est.unbind(0)))
            run = []
        if m is not None:
            run.append(m)
    if not idx:
        return torch.zeros(0, dtype=torch.float32, device=grads.device)
    return torch.stack([result[m] for m in idx])


def proportional_sampling_weights(sq_norms: torch.Tensor, alpha: float = 1.0, floor: float = 0.0) -> torch.Tensor:
    """Task sampling probabilities proportional to ``sq_norms ** alpha``, each at least ``floor``.

    Args:
        sq_norms: [K] per-task (estimated) squared gradient norms; negative estimates count as 0.
        alpha: exponent (0 gives uniform sampling, 1 proportional to the squared norm).
        floor: minimum probability of every task, 0 <= floor <= 1/K.

    Returns:
        float32 [K] probabilities summing to 1: floor + (1 - K floor) * p, with p proportional to
        ``max(sq_norms, 0) ** alpha`` (uniform if all are 0).
    """
    x = torch.as_tensor(sq_norms, dtype=torch.float64)
    if x.dim() != 1 or x.numel() == 0:
        raise MGSInputError(f"sq_norms must be a non-empty 1-D tensor [K], got shape {tuple(x.shape)}")
    K = x.numel()
    if not 0.0 <= floor <= 1.0 / K:
        raise MGSInputError(f"floor must be in [0, 1/K] = [0, {1.0 / K:.4g}], got {floor}")
    if alpha < 0:
        raise MGSInputError(f"alpha must be >= 0, got {alpha}")
    score = x.clamp_min(0) ** alpha if alpha > 0 else torch.ones_like(x)
    total = score.sum()
    p = torch.where(total > 0, score / torch.where(total > 0, total, 1.0), torch.full_like(x, 1.0 / K))
    return (floor + (1 - K * floor) * p).to(torch.float32)


class NormEMA:
    """Bias-corrected exponential moving average of per-task norm estimates across steps.

    ``ema.update(x)`` folds in a new [K] estimate and returns the current average
    ``sum_s beta^(n-s) (1-beta) x_s / (1 - beta^n)``, which for a constant input is that input.
    """

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise MGSInputError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.steps = 0
        self._avg: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        self._avg = (1 - self.beta) * x if self._avg is None else self.beta * self._avg + (1 - self.beta) * x
        self.steps += 1
        return self.value

    @property
    def value(self) -> torch.Tensor:
        if self._avg is None:
            raise MGSInputError("NormEMA has no value before the first update()")
        return (self._avg / (1 - self.beta**self.steps)).to(torch.float32)


def select_modules(names: Sequence[str], pattern: Union[str, "re.Pattern[str]"]) -> List[int]:
    """Indices of the module names matching a glob string or compiled regex.

    ``select_modules(surgery.module_names, "model.layers.31.self_attn*")`` picks the last attention
    block of a 32-layer Llama; use the result as ``modules=`` of ``unbiased_sq_norm``.
    """
    if isinstance(pattern, re.Pattern):
        hits = [i for i, n in enumerate(names) if pattern.search(n)]
    else:
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise MGSInputError(f"pattern {pattern!r} matches no module")
    return hits
