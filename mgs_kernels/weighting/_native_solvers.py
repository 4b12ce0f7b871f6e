"""The native CPU solvers of the weighting methods (csrc/cpu/mgs_weighting.h) and when to use them.

A method whose Grams live on the CPU hands its whole batch of modules to ``mgs_kernels._mgs_cpu`` (one
call, each module solved start to finish by one thread in float64) instead of running the batched torch
code, whose ~1000 small tensor ops cost more on the CPU than the arithmetic of every module together.
Both run the same algorithm; the torch code stays the GPU path and is tested on the CPU too
(``NATIVE_SOLVERS = False``). Without the built module the torch code runs everywhere.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

import torch

from .. import _native
from ._common import host_shortcuts

# Tests switch this off to run, on the CPU, the batched torch code a GPU runs.
NATIVE_SOLVERS = True


def native_solver(gram: torch.Tensor, name: str) -> Optional[ModuleType]:
    """The native module when ``gram`` is on the CPU and the module (with solver ``name``) is built, else None."""
    if not (NATIVE_SOLVERS and host_shortcuts(gram)):
        return None
    try:
        mod = _native.cpu()
    except ImportError:
        return None
    return mod if hasattr(mod, name) else None


def lcp_solver(gram: torch.Tensor, name: str) -> Optional[ModuleType]:
    """``native_solver`` for the QP-based methods, whose native LCP solver (csrc/cpu/weighting_lcp.h) takes
    1 <= T <= ``WEIGHTING_LCP_MAX_TASKS`` (the torch code's enumeration limit); None outside it."""
    mod = native_solver(gram, name)
    if mod is None or not 1 <= gram.shape[-1] <= mod.WEIGHTING_LCP_MAX_TASKS:
        return None
    return mod


def inputs(gram: torch.Tensor, present: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float64 contiguous Gram, uint8 contiguous present mask) as the native solvers read them."""
    return gram.to(torch.float64).contiguous(), present.to(torch.uint8).contiguous()


def outputs(M: int, T: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights float64 [M, T], converged bool [M], iterations int64 [M]) for a solver to write, poisoned
    (NaN, -1) so that an element a solver leaves unwritten shows (tests/test_weighting_native.py)."""
    return (torch.full((M, T), float("nan"), dtype=torch.float64, device=device),
            torch.zeros(M, dtype=torch.bool, device=device), torch.full((M,), -1, dtype=torch.int64, device=device))


def module_output(M: int, device: torch.device) -> torch.Tensor:
    """float64 [M] for a solver to write one number per module into (the regularisation it used, the
    residual it reached), poisoned (NaN)."""
    return torch.full((M,), float("nan"), dtype=torch.float64, device=device)


def threads() -> int:
    return _native.num_threads()
