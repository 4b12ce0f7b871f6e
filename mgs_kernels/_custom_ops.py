"""The kernel-level ops as ``torch.library`` custom ops, so ``torch.compile``d code can call them.

Inside a compiled region the public functions of ``mgs_kernels.ops`` route here: each op is opaque to
the compiler (its kernels run as they are), with a fake implementation that gives the output's shape
and dtype for tracing. Outside compilation the public functions call the backends directly (no
dispatcher overhead). Order tables are built before the op (traceable tensor code), so the ops take
only tensors and scalars.
"""

from __future__ import annotations

import torch

from . import ops

_NS = "mgs_kernels"


@torch.library.custom_op(f"{_NS}::segmented_gram", mutates_args=())
def segmented_gram(grads: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    return ops.segmented_gram(grads, offsets, backend=backend)


@segmented_gram.register_fake
def _(grads, offsets, backend):
    T = grads.shape[0]
    return grads.new_empty(offsets.shape[0] - 1, T, T, dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::pcgrad_weights", mutates_args=())
def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return ops.pcgrad_weights(gram, order=order, eps=eps, backend=backend)


@pcgrad_weights.register_fake
def _(gram, order, eps, backend):
    return gram.new_empty(gram.shape[0], gram.shape[1], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::segmented_combine", mutates_args=())
def segmented_combine(grads: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, backend: str) -> torch.Tensor:
    return ops.segmented_combine(grads, offsets, weights, backend=backend)


@segmented_combine.register_fake
def _(grads, offsets, weights, backend):
    return grads.new_empty(grads.shape[1])


@torch.library.custom_op(f"{_NS}::modular_pcgrad", mutates_args=())
def modular_pcgrad(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor, eps: float,
                   backend: str) -> torch.Tensor:
    return ops.modular_pcgrad(grads, offsets, order=order, eps=eps, backend=backend)


@modular_pcgrad.register_fake
def _(grads, offsets, order, eps, backend):
    return grads.new_empty(grads.shape[1])
