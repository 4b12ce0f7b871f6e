"""Loader for the native modules (``mgs_kernels._mgs_cpu``, ``mgs_kernels._mgs_cuda``) and the one place
where storage-dtype codes are defined for them.

The native modules take raw data pointers, sizes, row strides, dtype codes and (CUDA) the stream handle;
the fused optimizer step takes one descriptor (``FusedStepDesc``) instead. They link no torch C++ symbols.
Tensors are validated by ``mgs_kernels.ops`` before they get here.

The CUDA module links the CUDA runtime statically: it imports on any machine, which says nothing about
whether it can run. ``cuda_module()`` is the built module (build checks), ``cuda()`` the module only when
it can run here (driver, devices, architectures; else ImportError with the reason), ``cuda_probe(device)``
runs a tiny kernel on a device.
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

# Task counts (inclusive range) for which the native CUDA Gram is the one dispatch should pick when Triton
# is available; its combine, solve and fused step are fine up to MAX_TASKS. Until a GPU bench says
# otherwise (bench/gpu_check.sh), this comes from an estimate:
# * T <= 8 (gram_small_kernel): each thread keeps the T(T+1)/2 products of its elements in registers and
#   reads 16-byte vectors of every row; about 2T FLOP per element pair against 2T (bf16) or 4T (fp32) bytes,
#   far below an H100's FMA rate, so the kernel streams at memory bandwidth.
# * 9 <= T <= 64 (gram_generic_kernel): [T, 32] tiles staged in shared memory with scalar 2- or 4-byte
#   loads and two barriers per tile; every FMA reads two shared-memory words. At T = 64 a tile of 4 KB (bf16)
#   costs 64 * 65 / 2 * 32 * 2 = 133k shared loads, ~4200 cycles at 32 loads/cycle: ~1 B/cycle/SM, about
#   220 GB/s on 132 SMs (~7% of 3.35 TB/s); at T = 9 only 45 of 256 threads compute and the scalar global
#   loads are not overlapped with the math (~15-20%). The Triton Gram stages 16-byte cp.async tiles through a
#   3-4 stage pipeline into tensor-core dots (bf16 products exact; float32 through tf32x3), whose math is
#   far from its limit at these T: it is the one expected to stream at bandwidth.
CUDA_GRAM_PREFERRED_TASKS = (1, 8)

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the source tree (a C++17 compiler with "
    "OpenMP for the CPU module; nvcc for the CUDA module, or MGS_BUILD_CUDA=1 to insist). "
    "The 'torch' backend works without it."
)

_modules: Dict[str, ModuleType] = {}
_cuda_state: Dict[str, Optional[str]] = {}  # "runtime": why the CUDA module cannot run here ("" = it can)
_cuda_probes: Dict[int, str] = {}  # device index -> probe result ("" = ok)


def _load(name: str, what: str) -> ModuleType:
    mod = _modules.get(name)
    if mod is not None:
        return mod
    try:
        mod = importlib.import_module(f"mgs_kernels.{name}")
    except ImportError as exc:
        raise ImportError(
            f"the native {what} module mgs_kernels.{name} is not available ({exc}); {_BUILD_HINT}"
        ) from exc
    for dtype, attr in _CODE_ATTRS.items():
        if getattr(mod, attr, None) != DTYPE_CODES[dtype]:
            raise ImportError(f"mgs_kernels.{name} was built from different sources (dtype codes differ); rebuild it")
    _check_fused_constants(mod, name)
    _modules[name] = mod
    return mod


def cpu() -> ModuleType:
    """The native CPU module (raises ImportError with build instructions when it is missing)."""
    return _load("_mgs_cpu", "CPU")


def cuda_module() -> ModuleType:
    """The native CUDA module as built and imported, whether or not it can run here (build checks and
    diagnostics; raises ImportError with build instructions when it is missing)."""
    return _load("_mgs_cuda", "CUDA")


def cuda_runtime_error() -> Optional[str]:
    """None when the CUDA module is built and can run here, else why not (one line, cached per process).

    The module links the CUDA runtime statically, so importing it succeeds on any machine; whether the
    driver is new enough for that runtime, a device is visible and one of the compiled architectures fits
    is asked here (version and attribute queries: no CUDA context is created)."""
    reason = _cuda_state.get("runtime")
    if reason is None:
        try:
            mod = cuda_module()
        except ImportError as exc:
            return str(exc)  # not cached: a later build may add it
        reason = mod.runtime_error()
        _cuda_state["runtime"] = reason
    return reason or None


def cuda() -> ModuleType:
    """The native CUDA module, only when it can run here: raises ImportError with the reason (no driver, a
    driver older than the linked runtime, no device, no compiled architecture for the devices). Backend
    loading goes through here, so ``backends.backend_errors()`` shows the reason and "auto" skips cuda."""
    mod = cuda_module()
    reason = cuda_runtime_error()
    if reason is not None:
        raise ImportError(f"the native CUDA module is built ({mod.runtime_info()}) but cannot run here: {reason}")
    return mod


def cuda_probe(device) -> Optional[str]:
    """Run a tiny kernel of the CUDA module on ``device`` once per process: None when it ran and computed
    the right values, else the error. Creates the device's CUDA context and synchronises: for diagnostics
    and the first-use self-check, never inside a training step."""
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    result = _cuda_probes.get(index)
    if result is None:
        try:
            result = cuda().probe_device(index)
        except ImportError as exc:
            return str(exc)
        _cuda_probes[index] = result
    return result or None


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


def fused_step_args(args, lib: Optional[ModuleType] = None) -> Optional[Tuple[tuple, List[torch.Tensor]]]:
    """The native ``fused_step`` arguments for a ``_fused_step.FusedStepArgs``: ``((desc,), keep)`` where
    ``desc`` is the module's ``FusedStepDesc`` (csrc/mgs_fused_step.h, bound in python_api/fused_step_desc.h)
    holding every table pointer, size and code of the launch, and ``keep`` the temporaries that must stay
    alive during the call. Call ``lib.fused_step(*raw, num_threads_or_stream)``.

    ``lib``: the native module that will run the step (default: the CUDA module for CUDA tensors, else the
    CPU module); each module binds its own descriptor class.

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
    if lib is None:
        lib = cuda() if grads.device.type == "cuda" else cpu()
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
    d = lib.FusedStepDesc()
    d.grads, d.dtype, d.T, d.row_stride = grads.data_ptr(), dtype_code(grads.dtype), T, grads.stride(0)
    d.chunk_start = as_(c.start, torch.int64, K)
    d.chunk_len = as_(c.length, torch.int64, K)
    d.chunk_slot = as_(c.module, torch.int64, K)
    d.slot_first = as_(c.first, torch.int64, S + 1)
    d.num_chunks, d.num_slots = K, S
    d.active = as_(args.active, torch.int32, S)
    d.slot_weights = as_(args.slot_weights, torch.float32, S * T)
    d.param_ptr = as_(args.param_ptr, torch.int64, S)
    d.state1_ptr = as_(args.state1_ptr, torch.int64, S)
    d.state2_ptr = as_(args.state2_ptr, torch.int64, S)
    d.state3_ptr = as_(args.state3_ptr, torch.int64, S)
    d.hyper = as_(args.hyper, torch.float32, S * _fused_step.NUM_HYPER)
    d.grad_out = 0 if out is None else out.data_ptr()
    d.out_dtype = NO_OUTPUT if out is None else dtype_code(out.dtype)
    d.kind = int(args.kind)
    return (d,), keep
