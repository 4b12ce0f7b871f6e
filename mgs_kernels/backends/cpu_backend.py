"""Native CPU backend: C++/OpenMP kernels (csrc/cpu) bound in python_api/ as ``mgs_kernels._mgs_cpu``.

Inputs arrive validated, with at most ``_native.MAX_TASKS`` tasks (dispatch routes more elsewhere); this
layer only passes data pointers, sizes, the row stride of ``grads``, dtype codes and the thread count
(``torch.get_num_threads()``). Results are bitwise reproducible and independent of the thread count.

Capabilities: ``modular_pcgrad`` runs Gram, solve and combine in one native call, cache-blocked by module
groups (bitwise identical to the two-pass schedule); ``fused_step`` is the one-pass combine + SGD/Adam(W)
update of ``ModularGradientSurgery.step`` (contract: ``mgs_kernels._fused_step``); arguments the native
kernel cannot take (non-contiguous parameters / state) go to ``_fused_step.reference_kernel``.
"""

from __future__ import annotations

import torch

from .. import _fused_step, _native, _settings
from .._plan import SegmentPlan
from .base import Backend

# Elements per chunk of the Gram / combine passes (one OpenMP work item).
CHUNK = 1 << 14
_CPU = torch.device("cpu")


def cache_bytes() -> int:
    """The blocking budget passed to the native modular_pcgrad, read at every call: $MGS_CPU_CACHE_BYTES
    (0: two-pass schedule; > 0: that budget), or -1 when unset: the native default
    (_mgs_cpu.auto_cache_bytes: two passes when T rows + output fit in half the last-level cache, else
    groups of about the threads' L2 size)."""
    value = _settings.get("MGS_CPU_CACHE_BYTES")
    return -1 if value is None else value


def _table(plan: SegmentPlan):
    return plan.chunk_table(CHUNK, _CPU)


class CpuBackend(Backend):
    """C++17/OpenMP kernels on CPU tensors."""

    name = "cpu"
    device_types = ("cpu",)

    def load(self) -> None:
        _native.cpu()

    def max_tasks(self, dtype: torch.dtype) -> int:
        return _native.MAX_TASKS

    def segmented_gram(self, grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        T = grads.shape[0]
        M = plan.num_modules
        gram = torch.empty(M, T, T, dtype=torch.float32)
        if M == 0:
            return gram
        t = _table(plan)
        _native.cpu().segmented_gram(
            grads.data_ptr(), _native.dtype_code(grads.dtype), T, grads.stride(0),
            t.start.data_ptr(), t.length.data_ptr(), t.num_chunks, t.first.data_ptr(), M,
            gram.data_ptr(), _native.num_threads(),
        )
        return gram

    def pcgrad_weights(self, gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
        M, T, _ = gram.shape
        gram = gram.contiguous()
        order = order.contiguous()
        weights = torch.empty(M, T, dtype=torch.float32)
        if M == 0:
            return weights
        _native.cpu().pcgrad_weights(
            gram.data_ptr(), order.data_ptr(), M, T, float(eps), weights.data_ptr(), _native.num_threads()
        )
        return weights

    def segmented_combine(self, grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor,
                          out: torch.Tensor) -> None:
        T, N = grads.shape
        if N == 0:
            return
        weights = weights.float().contiguous()
        t = _table(plan)
        _native.cpu().segmented_combine(
            grads.data_ptr(), _native.dtype_code(grads.dtype), T, grads.stride(0),
            t.start.data_ptr(), t.length.data_ptr(), t.module.data_ptr(), t.num_chunks,
            weights.data_ptr(), out.data_ptr(), _native.dtype_code(out.dtype), _native.num_threads(),
        )

    def modular_pcgrad(self, grads: torch.Tensor, plan: SegmentPlan, order: torch.Tensor, eps: float,
                       out: torch.Tensor) -> None:
        """The three stages in one native call (Gram and weights in native scratch), cache-blocked by module
        groups of at most ``cache_bytes()`` bytes (bitwise identical to the two-pass schedule)."""
        T, N = grads.shape
        if N == 0 or plan.num_modules == 0:
            return
        order = order.contiguous()
        t = _table(plan)
        _native.cpu().modular_pcgrad(
            grads.data_ptr(), _native.dtype_code(grads.dtype), T, grads.stride(0),
            t.start.data_ptr(), t.length.data_ptr(), t.module.data_ptr(), t.num_chunks, t.first.data_ptr(),
            plan.num_modules, order.data_ptr(), float(eps), out.data_ptr(), _native.dtype_code(out.dtype),
            _native.num_threads(), cache_bytes(),
        )

    def fused_step(self, args: "_fused_step.FusedStepArgs") -> None:
        """Combined gradient (+ grad_out) and SGD / Adam(W) update of every active slot, one native pass."""
        native = _native.fused_step_args(args)
        if native is None:
            _fused_step.reference_kernel(args)
            return
        raw, keep = native
        if args.chunks.num_chunks == 0:
            return
        _native.cpu().fused_step(*raw, _native.num_threads())
        del keep


BACKEND = CpuBackend()
