"""Native CUDA backend: kernels in csrc/cuda bound in python_api/ as ``mgs_kernels._mgs_cuda``.

Inputs arrive validated, with at most ``_native.MAX_TASKS`` tasks (dispatch routes more elsewhere).
Scratch (per-chunk partials) and outputs are allocated here with torch's caching allocator; kernels run
on torch's current stream of the tensors' device with no host synchronisation (CUDA-graph capturable).

``fused_step`` is the one-pass combine + SGD/Adam(W) update of ``ModularGradientSurgery.step`` (contract:
``mgs_kernels._fused_step``; arithmetic of torch's CUDA foreach optimizers); arguments the native kernel
cannot take (non-contiguous parameters / state) go to ``_fused_step.reference_kernel``.
"""

from __future__ import annotations

import torch

from .. import _fused_step, _native
from .._plan import SegmentPlan
from .base import Backend


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _table(plan: SegmentPlan, T: int, device: torch.device):
    return plan.chunk_table(_native.cuda().chunk_elems(T), device)


class CudaBackend(Backend):
    """CUDA kernels on CUDA tensors."""

    name = "cuda"
    device_types = ("cuda",)

    def load(self) -> None:
        _native.cuda()

    def max_tasks(self, dtype: torch.dtype) -> int:
        return _native.MAX_TASKS

    def preferred_tasks(self, dtype: torch.dtype):
        # The register-tiled Gram streams at bandwidth for small T; from 9 tasks on its shared-memory tiles
        # are estimated at 7-20% of HBM, so Triton's tensor-core Gram is preferred there (_native).
        return _native.CUDA_GRAM_PREFERRED_TASKS

    def segmented_gram(self, grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        T = grads.shape[0]
        device = grads.device
        M = plan.num_modules
        gram = torch.empty(M, T, T, dtype=torch.float32, device=device)
        if M == 0:
            return gram
        lib = _native.cuda()
        with torch.cuda.device(device):
            t = _table(plan, T, device)
            partials = torch.empty(max(t.num_chunks, 1) * lib.partial_size(T), dtype=torch.float32, device=device)
            lib.segmented_gram(
                grads.data_ptr(), _native.dtype_code(grads.dtype), T, grads.stride(0),
                t.start.data_ptr(), t.length.data_ptr(), t.num_chunks, t.first.data_ptr(), M,
                partials.data_ptr(), gram.data_ptr(), _stream(device),
            )
        return gram

    def pcgrad_weights(self, gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
        M, T, _ = gram.shape
        device = gram.device
        gram = gram.contiguous()
        order = order.contiguous()
        weights = torch.empty(M, T, dtype=torch.float32, device=device)
        if M == 0:
            return weights
        with torch.cuda.device(device):
            _native.cuda().pcgrad_weights(
                gram.data_ptr(), order.data_ptr(), M, T, float(eps), weights.data_ptr(), _stream(device)
            )
        return weights

    def segmented_combine(self, grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor,
                          out: torch.Tensor) -> None:
        T, N = grads.shape
        if N == 0:
            return
        device = grads.device
        weights = weights.float().contiguous()
        with torch.cuda.device(device):
            t = _table(plan, T, device)
            _native.cuda().segmented_combine(
                grads.data_ptr(), _native.dtype_code(grads.dtype), T, grads.stride(0),
                t.start.data_ptr(), t.length.data_ptr(), t.module.data_ptr(), t.num_chunks,
                weights.data_ptr(), out.data_ptr(), _native.dtype_code(out.dtype), _stream(device),
            )

    def fused_step(self, args: "_fused_step.FusedStepArgs") -> None:
        """Combined gradient (+ grad_out) and SGD / Adam(W) update of every active slot: one launch on torch's
        current stream of the buffer's device (the tables in ``args`` are already device tensors)."""
        native = _native.fused_step_args(args)
        if native is None:
            _fused_step.reference_kernel(args)
            return
        raw, keep = native
        if args.chunks.num_chunks == 0:
            return
        device = args.grads.device
        with torch.cuda.device(device):
            _native.cuda().fused_step(*raw, _stream(device))
        del keep  # temporaries were enqueued on the current stream: the caching allocator keeps them safe


BACKEND = CudaBackend()
