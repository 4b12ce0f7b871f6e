"""Loader for the native modules (``mgs_kernels._mgs_cpu``, ``mgs_kernels._mgs_cuda``) and the one place
where storage-dtype codes are defined for them.

The native modules take raw data pointers, sizes, row strides, dtype codes and (CUDA) the stream handle;
they link no torch C++ symbols. Tensors are validated by ``mgs_kernels.ops`` before they get here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

import torch

# Storage dtype codes shared with csrc/cpu/mgs_cpu.h and csrc/cuda/mgs_cuda.h (checked at load).
DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_ATTRS = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16"}

# Largest task count the native kernels handle; backends fall back to the torch backend above it.
MAX_TASKS = 64

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the source tree (a C++17 compiler with "
    "OpenMP for the CPU module; nvcc for the CUDA module, or MGS_BUILD_CUDA=1 to insist). "
    "The 'torch' backend works without it."
)

_modules: Dict[str, ModuleType] = {}


def _load(name: str, what: str) -> ModuleType:
    mod = _modules.get(name)
    if mod is not None:
        return mod
    try:
        mod = importlib.import_module(f"mgs_kernels.{name}")
    except ImportError as exc:
        raise ImportError(f"the native {what} module mgs_kernels.{name} is not available ({exc}); {_BUILD_HINT}") from exc
    for dtype, attr in _CODE_ATTRS.items():
        if getattr(mod, attr, None) != DTYPE_CODES[dtype]:
            raise ImportError(f"mgs_kernels.{name} was built from different sources (dtype codes differ); rebuild it")
    _modules[name] = mod
    return mod


def cpu() -> ModuleType:
    """The native CPU module (raises ImportError with build instructions when it is missing)."""
    return _load("_mgs_cpu", "CPU")


def cuda() -> ModuleType:
    """The native CUDA module (raises ImportError with build instructions when it is missing)."""
    return _load("_mgs_cuda", "CUDA")


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"no native storage code for {dtype}") from None


def num_threads() -> int:
    """Threads for the CPU kernels: what torch is configured with (torch.set_num_threads / OMP_NUM_THREADS)."""
    return max(1, torch.get_num_threads())
