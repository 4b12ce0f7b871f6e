"""Input checks shared by the kernel-level API. Every check runs before any output is written."""

from __future__ import annotations

from typing import Optional

import torch

from ._errors import MGSInputError

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_grads(grads: torch.Tensor, name: str = "grads") -> None:
    """grads must be a [T, N] float32/bfloat16/float16 tensor whose rows are contiguous."""
    if not isinstance(grads, torch.Tensor):
        raise MGSInputError(f"{name} must be a torch.Tensor [T, N], got {type(grads).__name__}")
    if grads.dim() != 2:
        raise MGSInputError(f"{name} must be 2-D [T, N] (tasks x elements), got shape {tuple(grads.shape)}")
    if grads.dtype not in STORAGE_DTYPES:
        raise MGSInputError(f"{name} must be float32, bfloat16 or float16, got dtype {grads.dtype}")
    if grads.shape[0] < 1:
        raise MGSInputError(f"{name} must hold at least one task (T >= 1), got shape {tuple(grads.shape)}")
    if grads.shape[1] > 1 and grads.stride(1) != 1:
        raise MGSInputError(
            f"{name} rows must be contiguous (stride(1) == 1), got strides {tuple(grads.stride())}; "
            f"call .contiguous() first"
        )
    if grads.requires_grad:
        raise MGSInputError(f"{name} must not require grad (mgs_kernels is autograd-free); pass .detach()")


def check_gram(gram: torch.Tensor) -> None:
    if not isinstance(gram, torch.Tensor):
        raise MGSInputError(f"gram must be a torch.Tensor [M, T, T], got {type(gram).__name__}")
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise MGSInputError(f"gram must be [M, T, T], got shape {tuple(gram.shape)}")
    if not gram.dtype.is_floating_point:
        raise MGSInputError(f"gram must be floating point (float32), got dtype {gram.dtype}")
    if gram.shape[1] < 1:
        raise MGSInputError("gram must hold at least one task (T >= 1)")


def check_weights(weights: torch.Tensor, num_modules: int, num_tasks: int, device: torch.device) -> None:
    if not isinstance(weights, torch.Tensor):
        raise MGSInputError(f"weights must be a torch.Tensor [M, T], got {type(weights).__name__}")
    if tuple(weights.shape) != (num_modules, num_tasks):
        raise MGSInputError(
            f"weights must be [M, T] = [{num_modules}, {num_tasks}], got shape {tuple(weights.shape)}"
        )
    if not weights.dtype.is_floating_point:
        raise MGSInputError(f"weights must be floating point, got dtype {weights.dtype}")
    if weights.device != device:
        raise MGSInputError(f"weights are on {weights.device} but grads are on {device}")


def check_out(out: Optional[torch.Tensor], grads: torch.Tensor) -> None:
    if out is None:
        return
    n = grads.shape[1]
    if not isinstance(out, torch.Tensor):
        raise MGSInputError(f"out must be a torch.Tensor [N], got {type(out).__name__}")
    if out.dim() != 1 or out.shape[0] != n:
        raise MGSInputError(f"out must be 1-D [N] = [{n}], got shape {tuple(out.shape)}")
    if out.dtype not in STORAGE_DTYPES:
        raise MGSInputError(f"out must be float32, bfloat16 or float16, got dtype {out.dtype}")
    if out.device != grads.device:
        raise MGSInputError(f"out is on {out.device} but grads are on {grads.device}")
    if n > 1 and out.stride(0) != 1:
        raise MGSInputError(f"out must be contiguous, got stride {out.stride(0)}")
    if out.requires_grad:
        raise MGSInputError("out must not require grad")
    _check_out_alias(out, grads)


def _check_out_alias(out: torch.Tensor, grads: torch.Tensor) -> None:
    # Writing into a row of grads is fine (each element is read before it is written); any other
    # overlap would let the combine read values it has already overwritten.
    n = grads.shape[1]
    if n == 0 or out.untyped_storage().data_ptr() != grads.untyped_storage().data_ptr():
        return
    if grads.shape[0] > 1 and grads.stride(0) < n:
        # expanded (stride 0) or overlapping rows: writing any element of out changes several task values
        raise MGSInputError(
            f"out shares storage with grads whose rows overlap (row stride {grads.stride(0)} < N = {n}): "
            "writing out would change gradients still to be read; use a separate out"
        )
    esz = grads.element_size()
    lo, hi = out.data_ptr(), out.data_ptr() + n * out.element_size()
    g_lo = grads.data_ptr()
    g_hi = g_lo + ((grads.shape[0] - 1) * grads.stride(0) + n) * esz
    if hi <= g_lo or lo >= g_hi:
        return
    if out.dtype == grads.dtype and (lo - g_lo) % (grads.stride(0) * esz) == 0:
        row = (lo - g_lo) // (grads.stride(0) * esz)
        if 0 <= row < grads.shape[0]:
            return
    raise MGSInputError("out overlaps grads other than as exactly one of its rows; use a separate buffer")


def check_eps(eps: float) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise MGSInputError(f"eps must be a non-negative float, got {eps!r}") from None
    if not eps >= 0.0:
        raise MGSInputError(f"eps must be a non-negative float, got {eps!r}")
    return eps
