"""Helpers shared by the weighting methods: option checks and per-module Gram transforms.

Everything here works on batches [M, ...] in float64 on the Gram's device and never reads a value back
to the host, except ``all_done`` which only does so on the CPU (where there is no device to wait for).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch

from .._errors import MGSInputError

COMPAT_CHOICES = (None, "torchjd")


# ----------------------------------------------------------------------------------------- options
def check_float(method: str, name: str, value: Any, *, minimum: Optional[float] = None,
                strict: bool = False, maximum: Optional[float] = None) -> float:
    """``value`` as a finite float in the allowed range, else MGSInputError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise MGSInputError(f"{method}: {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise MGSInputError(f"{method}: {name} must be finite, got {v}")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        rel = ">" if strict else ">="
        raise MGSInputError(f"{method}: {name} must be {rel} {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise MGSInputError(f"{method}: {name} must be <= {maximum}, got {v}")
    return v


def check_int(method: str, name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MGSInputError(f"{method}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise MGSInputError(f"{method}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(method: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise MGSInputError(f"{method}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def check_vector(method: str, name: str, value: Any) -> torch.Tensor:
    """A 1-D finite float64 CPU tensor from a sequence or tensor."""
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                            dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise MGSInputError(f"{method}: {name} must be a 1-D sequence of numbers, got {value!r}") from None
    if t.dim() != 1 or t.numel() < 1:
        raise MGSInputError(f"{method}: {name} must be 1-D with at least one entry, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise MGSInputError(f"{method}: {name} must be finite, got {t.tolist()}")
    return t


def vector_for(method: str, name: str, vec: torch.Tensor, num_tasks: int, like: torch.Tensor) -> torch.Tensor:
    """``vec`` [T] on ``like``'s device (a length mismatch is the caller's error)."""
    if vec.numel() != num_tasks:
        raise MGSInputError(f"{method}: {name} has {vec.numel()} entries but the Gram has T = {num_tasks} tasks")
    return vec.to(device=like.device, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- Grams
def present_counts(present: torch.Tensor) -> torch.Tensor:
    """float64 [M]: number of present tasks per module."""
    return present.sum(dim=1).to(torch.float64)


def mean_weights(present: torch.Tensor) -> torch.Tensor:
    """[M, T] float64: 1/n on the n present tasks of each module, 0 elsewhere."""
    p = present.to(torch.float64)
    n = p.sum(dim=1, keepdim=True)
    return p / n.clamp_min(1.0)


def pref_weights(method: str, pref: Optional[torch.Tensor], present: torch.Tensor, default: str) -> torch.Tensor:
    """[M, T] float64 preference weights restricted to the present tasks.

    ``pref`` None gives the default: "mean" (1/n on present tasks) or "ones". A given vector is used
    as is on the present tasks (not renormalised), 0 on the others.
    """
    p = present.to(torch.float64)
    if pref is None:
        return mean_weights(present) if default == "mean" else p
    return vector_for(method, "pref_vector", pref, present.shape[1], present)[None, :] * p


def eye_like(gram: torch.Tensor) -> torch.Tensor:
    T = gram.shape[-1]
    return torch.eye(T, dtype=gram.dtype, device=gram.device)


def diag_of(gram: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(gram, dim1=-2, dim2=-1)


def trace_normalize(gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(G / tr G, tr G [M]); an all-zero module stays zero."""
    tr = diag_of(gram).sum(dim=-1)
    s = torch.where(tr > 0, tr, torch.ones_like(tr))
    return gram / s[:, None, None], tr


def restrict(gram: torch.Tensor, present: torch.Tensor, *, absent_diag: float = 0.0) -> torch.Tensor:
    """G with the rows and columns of absent tasks zeroed (their diagonal set to ``absent_diag``)."""
    p = present.to(gram.dtype)
    out = gram * (p[:, :, None] * p[:, None, :])
    if absent_diag != 0.0:
        out = out + torch.diag_embed((1.0 - p) * absent_diag)
    return out


def cosine(gram: torch.Tensor, present: torch.Tensor, *, absent_diag: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix of the present tasks and the task norms.

    Returns:
        C [M, T, T]: G[i, j] / (|g_i| |g_j|) on present tasks with an exact unit diagonal; rows and
            columns of absent tasks are zero with ``absent_diag`` on the diagonal.
        d [M, T]: |g_k| = sqrt(G[k, k]) on present tasks, 1 on absent ones.
    """
    p = present.to(gram.dtype)
    d = torch.where(present, diag_of(gram).clamp_min(0.0).sqrt(), torch.ones_like(p))
    c = gram / (d[:, :, None] * d[:, None, :])
    c = c * (p[:, :, None] * p[:, None, :])
    c = c - torch.diag_embed(diag_of(c)) + torch.diag_embed(p + (1.0 - p) * absent_diag)
    return c, d


def quad(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w^T G w per module: [M]. Broadcast-and-sum, faster than bmm for tiny T on the CPU."""
    return ((gram * w[..., None, :]).sum(dim=-1) * w).sum(dim=-1)


def matvec(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G w per module: [..., T]."""
    return (gram * w[..., None, :]).sum(dim=-1)


# ----------------------------------------------------------------------------------------- loops
# CPU shortcuts (reading a flag or gathering a subset costs nothing without a device to wait for).
# Tests switch them off to run, on the CPU, the code path a GPU takes.
HOST_SHORTCUTS = True


def host_shortcuts(t: torch.Tensor) -> bool:
    """Whether ``t``'s device allows host-side decisions (the CPU, unless switched off for tests)."""
    return HOST_SHORTCUTS and t.device.type == "cpu"


def all_done(done: torch.Tensor) -> bool:
    """True when every problem is done and the tensors live on the CPU.

    Iterative solvers freeze a problem once it is done (masked updates), so leaving the loop early
    gives bitwise the same result as running the full iteration count. On a GPU the loop always runs
    the full count (no host sync); on the CPU reading the flag costs nothing.
    """
    return host_shortcuts(done) and bool(done.all())


def set_info(info: dict, **values: torch.Tensor) -> None:
    for k, v in values.items():
        info[k] = v
