"""Loader for the native modules (``mgs_kernels._mgs_cpu``, ``mgs_kernels._mgs_cuda``) and the one place
where storage-dtype codes are defined for them.

The native modules take raw data pointers, sizes, row strides, dtype codes and (CUDA) the stream handle;
they link no torch C++ symbols. Tensors are validated by ``mgs_kernels.ops`` before they get here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

# Storage dtype codes shared with csrc/cpu/mgs_cpu.h and csrc/cuda/mgs_cuda.h (checked at load).
DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_ATTRS = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16"}

# grad_out dtype code meaning "no grad_out" for the fused-step kernels (csrc/mgs_fused_step.h kNoOutput).
NO_OUTPUT = -1

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
    _check_fused_constants(mod, name)
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


def _check_fused_constants(mod: ModuleType, name: str) -> None:
    """The fused-step constants of csrc/mgs_fused_step.h (optimizer kinds, hyper-parameter columns) must be
    those of mgs_kernels._fused_step: same value for every name, and every column 0..NUM_HYPER-1 known."""
    from . import _fused_step

    consts = getattr(mod, "FUSED_CONSTANTS", None)
    ok = isinstance(consts, dict) and consts.get("NUM_HYPER") == _fused_step.NUM_HYPER
    if ok:
        ok = all(getattr(_fused_step, k, None) == v for k, v in consts.items())
        kinds = {"NUM_HYPER", "SGD_KIND", "ADAM_KIND"}
        columns = sorted(v for k, v in consts.items() if k not in kinds)
        ok = ok and columns == list(range(_fused_step.NUM_HYPER)) and kinds <= consts.keys()
    ok = ok and getattr(mod, "NO_OUTPUT", None) == NO_OUTPUT
    if not ok:
        raise ImportError(f"mgs_kernels.{name} was built from different sources (fused-step constants differ from "
                          "mgs_kernels._fused_step); rebuild it")


def fused_step_args(args) -> Optional[Tuple[tuple, List[torch.Tensor]]]:
    """Raw arguments of the native ``fused_step`` kernels for a ``_fused_step.FusedStepArgs``, without the
    trailing thread count / stream: ``(grads, dtype, T, row_stride, chunk_start, chunk_len, chunk_slot,
    slot_first, num_chunks, S, active, slot_weights, param_ptr, state1_ptr, state2_ptr, state3_ptr, hyper,
    grad_out, out_dtype, kind)``, plus the temporaries that must stay alive during the call.

    None when the native kernels cannot take these arguments (more than MAX_TASKS tasks, a non-contiguous
    or non-fp32 parameter / state, a grads layout other than rows of unit stride): the caller then runs
    ``_fused_step.reference_kernel``. Only host-side metadata is inspected (no device synchronisation).
    """
    from . import _fused_step

    grads = args.grads
    if grads.dim() != 2 or grads.dtype not in DTYPE_CODES or (grads.shape[1] > 1 and grads.stride(1) != 1):
        return None
    T = grads.shape[0]
    if not 1 <= T <= MAX_TASKS:
        return None
    if args.kind not in (_fused_step.SGD_KIND, _fused_step.ADAM_KIND):
        return None
    S = args.num_slots
    for p, states in zip(args.param_tensors, args.state_tensors):
        if p is None:
            continue
        if p.dtype != torch.float32 or not p.is_contiguous():
            return None
        for t in states:
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != p.numel()):
                return None
    out = args.grad_out
    if out is not None and (out.dtype not in DTYPE_CODES or not out.is_contiguous()):
        return None
    c = args.chunks
    keep: List[torch.Tensor] = []

    def as_(t: torch.Tensor, dtype: torch.dtype, numel: int) -> int:
        if t.numel() != numel:
            raise ValueError(f"fused step: table of {t.numel()} entries, expected {numel}")
        if t.dtype != dtype or not t.is_contiguous():
            t = t.to(dtype).contiguous()
            keep.append(t)
        return t.data_ptr()

    K = c.num_chunks
    raw = (
        grads.data_ptr(), dtype_code(grads.dtype), T, grads.stride(0),
        as_(c.start, torch.int64, K), as_(c.length, torch.int64, K), as_(c.module, torch.int64, K),
        as_(c.first, torch.int64, S + 1), K, S,
        as_(args.active, torch.int32, S), as_(args.slot_weights, torch.float32, S * T),
        as_(args.param_ptr, torch.int64, S), as_(args.state1_ptr, torch.int64, S),
        as_(args.state2_ptr, torch.int64, S), as_(args.state3_ptr, torch.int64, S),
        as_(args.hyper, torch.float32, S * _fused_step.NUM_HYPER),
        0 if out is None else out.data_ptr(), NO_OUTPUT if out is None else dtype_code(out.dtype), int(args.kind),
    )
    return raw, keep
