"""Helpers shared by every Triton kernel module: the sum combiner and the launch device context."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# The kernels call Triton builtins only (tl.full, tl.reduce(x, axis, _add); not tl.zeros / tl.sum):
# tl.zeros and tl.sum are @jit functions of triton.language, decorated when triton is first imported,
# and raise under TRITON_INTERPRET=1 when triton was imported before it was set (as happens when other
# test modules load the backends first). _add is triton's own sum combiner, which the interpreter
# recognises and reduces with numpy (any other combiner runs element by element in Python); on GPU
# tl.reduce(x, axis, _add) is exactly what tl.sum compiles to.
_add = getattr(tl.standard, "_sum_combine", None)
if _add is None:  # pragma: no cover - a Triton without it

    @triton.jit
    def _add(a, b):
        return a + b


def _launch_context(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton uses the current device and stream)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _aligned_view(t: torch.Tensor) -> tuple:
    """``(view, shift)``: when ``t``'s first element is not 16-byte aligned, the same tensor viewed ``shift``
    elements earlier in its storage (so that the view's base is 16-byte aligned) and the column shift the
    kernels add to every index; ``(t, 0)`` when it is aligned or cannot be shifted (the storage does not
    extend that far back, or the element size does not divide the misalignment).

    Triton vectorizes loads only where it can prove alignment: for a view such as ``buf[:, 1:]`` the base
    pointer is misaligned although every row is aligned at the same columns, and shifting the frame makes
    those columns provably aligned (the masks keep the extra leading columns unread).
    """
    mis = t.data_ptr() % 16
    elem = t.element_size()
    if mis == 0 or mis % elem:
        return t, 0
    shift = mis // elem
    if t.storage_offset() < shift:
        return t, 0
    return t.as_strided(t.shape, t.stride(), t.storage_offset() - shift), shift
