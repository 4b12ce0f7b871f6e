"""Backend registry and dispatch: the one place that decides which implementation runs.

A backend is a ``Backend`` (``backends/base.py``): the three pipeline stages, the devices and task
counts it supports, and optional capabilities (a fused ``modular_pcgrad`` schedule, a fused optimizer
step). Each lives in its own module that defines ``BACKEND``; adding one is one line in ``_REGISTRY``
(and, if "auto" should choose it, in ``_AUTO``).

Routing (``get_backend``): "auto" considers the backends of ``_AUTO[device type]`` that load here, run on
the device and handle the task count for the storage dtype; it takes the first whose ``preferred_tasks``
range holds T, else the first of them. A native GPU backend is parity-checked against the float64
reference the first time "auto" would choose it for a device in this process (``_selfcheck``, a few KB,
the one host sync at that moment; ``MGS_SELF_CHECK=0`` skips it); one that fails is skipped with a
warning. A named backend is used as asked, except that a task count beyond what it handles goes to the
``torch`` backend (any T, any device).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .._errors import BackendUnavailableError, MGSInputError
from .base import Backend

# name -> module path (relative to this package). Loaded lazily; a failed load marks it unavailable.
_REGISTRY: Dict[str, str] = {
    "torch": ".torch_backend",
    "cpu": ".cpu_backend",
    "cuda": ".cuda_backend",
    "triton": ".triton_backend",
}

# "auto" tries these in order for each device type.
_AUTO: Dict[str, List[str]] = {
    "cuda": ["cuda", "triton", "torch"],
    "cpu": ["cpu", "torch"],
}

# Handles any device and task count: where work beyond another backend's limits goes.
_FALLBACK = "torch"

_loaded: Dict[str, Backend] = {}
_errors: Dict[str, str] = {}
# (backend name, device) -> None when the first-use parity check passed, else why it failed.
_checked: Dict[Tuple[str, torch.device], Optional[str]] = {}

_DEVICE_HINTS = {
    "cuda": "needs a CUDA device",
    "triton": "needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, for testing)",
    "cpu": "runs on CPU tensors only",
}


def _load(name: str) -> Optional[Backend]:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        backend = importlib.import_module(_REGISTRY[name], __name__).BACKEND
        backend.load()  # raises if the backend's native code, driver or compiler is missing
    except Exception as exc:  # noqa: BLE001 - any failure just means "not available here"
        _errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = backend
    return backend


def available_backends() -> List[str]:
    """Names of the backends that load on this machine (whatever device they need)."""
    return [name for name in _REGISTRY if _load(name) is not None]


def usable_backends(device) -> List[str]:
    """Names of the available backends that can run on tensors of ``device``."""
    device = torch.device(device)
    return [name for name in available_backends() if _loaded[name].supports(device)]


def backend_errors() -> Dict[str, str]:
    """Why each unavailable backend did not load (name -> message)."""
    for name in _REGISTRY:
        _load(name)
    return dict(_errors)


def backend_status(device) -> Dict[str, Optional[str]]:
    """Every registered backend -> None where it can run on ``device`` here, else why not (one line)."""
    device = torch.device(device)
    status: Dict[str, Optional[str]] = {}
    for name in _REGISTRY:
        backend = _load(name)
        if backend is None:
            status[name] = f"not available: {_errors.get(name)}"
        elif not backend.supports(device):
            status[name] = f"not for {device.type} tensors: {_DEVICE_HINTS.get(name, 'unsupported device')}"
        else:
            status[name] = None
    return status


def _handles(backend: Backend, num_tasks: Optional[int], dtype: Optional[torch.dtype]) -> bool:
    if num_tasks is None:
        return True
    limit = backend.max_tasks(dtype or torch.float32)
    return limit is None or num_tasks <= limit


def _prefers(backend: Backend, num_tasks: Optional[int], dtype: Optional[torch.dtype]) -> bool:
    span = backend.preferred_tasks(dtype or torch.float32)
    return num_tasks is not None and span is not None and span[0] <= num_tasks <= span[1]


def _passes_self_check(backend: Backend, device: torch.device) -> bool:
    """First use of a native GPU backend by "auto" on ``device``: a tiny parity check, once per process."""
    if device.type != "cuda" or backend.name not in ("cuda", "triton"):
        return True
    from .. import _selfcheck, _settings

    if _selfcheck.active() or not _settings.get("MGS_SELF_CHECK"):
        return True
    key = (backend.name, device)
    if key not in _checked:
        _checked[key] = _selfcheck.parity_check(backend.name, device, quick=True)
        if _checked[key] is not None:
            warnings.warn(f"mgs_kernels: backend {backend.name!r} failed its self-check on {device} and is skipped "
                          f"by backend='auto' ({_checked[key]}); run `python -m mgs_kernels.doctor`", stacklevel=3)
    return _checked[key] is None


def get_backend(name: str, device, num_tasks: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend that runs ``name`` ("auto" or a registered name) for tensors on ``device``.

    Args:
        name: "auto" | "torch" | "cpu" | "cuda" | "triton".
        device: the tensors' device.
        num_tasks: T, when known: a backend that does not handle it for ``dtype`` storage is replaced
            (by the next "auto" candidate, or by the torch backend for a named one).
        dtype: storage dtype of the task rows (default float32).

    Raises:
        MGSInputError: unknown name. BackendUnavailableError: the named backend does not load here or
        does not run on ``device`` (the message says why).
    """
    device = torch.device(device)
    if name == "auto":
        fit = [b for b in (_load(c) for c in _AUTO.get(device.type, [_FALLBACK]))
               if b is not None and b.supports(device) and _handles(b, num_tasks, dtype)]
        for backend in sorted(fit, key=lambda b: not _prefers(b, num_tasks, dtype)):  # stable: list order
            if _passes_self_check(backend, device):
                return backend
        raise BackendUnavailableError(f"no backend supports device {device}")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise MGSInputError(f"unknown backend {name!r}; choose one of {['auto', *_REGISTRY]}")
    backend = _load(name)
    if backend is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {_errors.get(name)}")
    if not backend.supports(device):
        raise BackendUnavailableError(f"backend {name!r} does not support tensors on {device}")
    if not _handles(backend, num_tasks, dtype):
        return _load(_FALLBACK)
    return backend


__all__ = ["Backend", "get_backend", "available_backends", "usable_backends", "backend_errors", "backend_status"]
