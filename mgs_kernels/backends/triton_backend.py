"""Triton backend: the kernels of ``mgs_kernels.triton`` behind the backend interface.

Runs on CUDA devices, and on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, which is
how CI checks the kernels without a GPU; the setting must be made before triton is first imported). The
kernel modules are imported on first use, not by ``load()``.
"""

from __future__ import annotations

import torch

from .._plan import SegmentPlan
from .base import Backend


def _k():
    from .. import triton as triton_kernels

    return triton_kernels


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        from ..triton._config import interpreting

        return interpreting()
    return False


class TritonBackend(Backend):
    """Triton kernels on CUDA tensors (CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    device_types = ("cuda", "cpu")

    def load(self) -> None:
        import triton  # noqa: F401  (raises ImportError when Triton is not installed)
        import triton.language  # noqa: F401

    def supports(self, device: torch.device) -> bool:
        return supports(device)

    def max_tasks(self, dtype: torch.dtype) -> int:
        from ..triton import _config

        return _config.max_tasks(dtype)

    def preferred_tasks(self, dtype: torch.dtype):
        from ..triton import _config

        return _config.preferred_tasks(dtype)

    def segmented_gram(self, grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        return _k().segmented_gram(grads, plan)

    def pcgrad_weights(self, gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
        return _k().pcgrad_weights(gram, order, eps)

    def segmented_combine(self, grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor,
                          out: torch.Tensor) -> None:
        _k().segmented_combine(grads, plan, weights, out)

    def fused_step(self, args) -> None:
        """Fused combine + SGD / Adam(W) step over ``args`` (a ``mgs_kernels._fused_step.FusedStepArgs``)."""
        _k().fused_step(args)


BACKEND = TritonBackend()
