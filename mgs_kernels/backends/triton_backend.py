"""Triton backend: the kernels of ``mgs_kernels.triton`` behind the backend protocol.

Runs on CUDA devices, and on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, which
is how CI checks the kernels without a GPU). The kernel modules are imported on first use, not by
``load()``, so the interpreter setting in effect when a kernel first runs is the one that counts.
"""

from __future__ import annotations

import os

import torch

from .._plan import SegmentPlan


def load() -> None:
    """Raise ImportError when Triton is not installed."""
    import triton  # noqa: F401
    import triton.language  # noqa: F401


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return False


def _k():
    from .. import triton as triton_kernels

    return triton_kernels


def segmented_gram(grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    return _k().segmented_gram(grads, plan)


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
    return _k().pcgrad_weights(gram, order, eps)


def segmented_combine(grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor, out: torch.Tensor) -> None:
    _k().segmented_combine(grads, plan, weights, out)


def modular_pcgrad(grads: torch.Tensor, plan: SegmentPlan, order: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    _k().modular_pcgrad(grads, plan, order, eps, out)


def fused_optimizer_kernel(args) -> None:
    """Fused combine + SGD / Adam(W) step over ``args`` (a ``mgs_kernels._fused_step.FusedStepArgs``)."""
    _k().fused_step(args)
