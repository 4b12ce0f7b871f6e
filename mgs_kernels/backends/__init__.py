"""Backend registry and dispatch.

A backend is a module-like object with three functions over validated inputs:

    segmented_gram(grads [T, N], plan) -> float32 [M, T, T]
    pcgrad_weights(gram float32 [M, T, T], order int64 [M, T, T-1], eps: float) -> float32 [M, T]
    segmented_combine(grads [T, N], plan, weights float32 [M, T], out [N]) -> None   (writes out)

plus ``supports(device) -> bool``. Validation happens in ``mgs_kernels.ops`` before a backend runs.
Adding a backend is one line in ``_REGISTRY`` (and, if it should be chosen by "auto", in ``_AUTO``).
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional

import torch

from .._errors import BackendUnavailableError, MGSInputError

# name -> module path (relative to this package). Loaded lazily; a failed import marks it unavailable.
_REGISTRY: Dict[str, str] = {
    "torch": ".torch_backend",
    "cpu": ".cpu_backend",
    "cuda": ".cuda_backend",
    "triton": ".triton_backend",
}

# "auto" tries these in order for each device type, taking the first that loads and supports the device.
_AUTO: Dict[str, List[str]] = {
    "cuda": ["cuda", "triton", "torch"],
    "cpu": ["cpu", "torch"],
}

_loaded: Dict[str, object] = {}
_errors: Dict[str, str] = {}


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        mod = importlib.import_module(_REGISTRY[name], __name__)
        if hasattr(mod, "load"):
            mod.load()  # raises if the backend's native code or compiler is missing
    except Exception as exc:  # noqa: BLE001 - any failure just means "not available here"
        _errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = mod
    return mod


def available_backends() -> List[str]:
    """Names of the backends that load on this machine (whatever device they need)."""
    return [name for name in _REGISTRY if _load(name) is not None]


def usable_backends(device: torch.device) -> List[str]:
    """Names of the available backends that can run on tensors of ``device``."""
    device = torch.device(device)
    return [name for name in available_backends() if _loaded[name].supports(device)]


def backend_errors() -> Dict[str, str]:
    """Why each unavailable backend did not load (name -> message)."""
    for name in _REGISTRY:
        _load(name)
    return dict(_errors)


def get_backend(name: str, device: torch.device):
    """The backend object for ``name`` ("auto" picks the fastest available one for ``device``)."""
    if name == "auto":
        for candidate in _AUTO.get(device.type, ["torch"]):
            mod = _load(candidate)
            if mod is not None and mod.supports(device):
                return mod
        raise BackendUnavailableError(f"no backend supports device {device}")
    if name not in _REGISTRY:
        raise MGSInputError(f"unknown backend {name!r}; choose one of {['auto', *_REGISTRY]}")
    mod = _load(name)
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {_errors.get(name)}")
    if not mod.supports(device):
        raise BackendUnavailableError(f"backend {name!r} does not support tensors on {device}")
    return mod


_DEVICE_HINTS = {
    "cuda": "needs a CUDA device",
    "triton": "needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, for testing)",
    "cpu": "runs on CPU tensors only",
}


def backend_status(device) -> Dict[str, Optional[str]]:
    """Every registered backend -> None where it can run on ``device`` here, else why not (one line)."""
    device = torch.device(device)
    status: Dict[str, Optional[str]] = {}
    for name in _REGISTRY:
        mod = _load(name)
        if mod is None:
            status[name] = f"not available: {_errors.get(name)}"
        elif not mod.supports(device):
            status[name] = f"not for {device.type} tensors: {_DEVICE_HINTS.get(name, 'unsupported device')}"
        else:
            status[name] = None
    return status
