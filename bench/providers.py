"""Benchmark providers: ``name -> callable(grads [T, N], offsets [M+1], order [M, T, T-1]) -> out [N]``.

Every provider gets the same gradients, offset table and visit-order table, so their outputs can be
checked against one float64 reference before their times are believed.

- ``reference_loop``: ``mgs_kernels.reference.modular_pcgrad``, the per-module Python loop users write
  today (``torch.dot`` per task pair, ``.item()`` branching).
- ``pcgrad_global_loop``: global PCGrad written the way the popular PyTorch PCGrad port does it
  (flatten every task's gradient, for each task walk the shuffled other tasks and project with
  ``torch.dot``, then sum). It ignores the partition: it is what people run instead of modular surgery.
- ``mgs:<backend>``: ``mgs_kernels.modular_pcgrad(..., backend=<backend>)`` for every backend that
  ``mgs_kernels.backends.backend_status(device)`` reports usable on the device (the others, with the
  reason, are listed in the benchmark's header). A new package backend shows up here with no change.

Adding any other provider is one line in ``EXTRA_PROVIDERS``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import mgs_kernels  # noqa: E402
from mgs_kernels import reference  # noqa: E402
from mgs_kernels.backends import backend_status  # noqa: E402

ProviderFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_loop(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return reference.modular_pcgrad(grads, offsets, order=order)


def pcgrad_global_loop(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Global PCGrad over the flattened gradients, one task pair at a time.

    The port shuffles the task list with ``random.shuffle`` inside the loop; here task i visits the
    others in the order ``order[0, i]`` so the result can be checked (the shuffle itself costs nothing
    measurable). Arithmetic is in float32, as when the port flattens fp32 master gradients.
    """
    num_tasks = grads.shape[0]
    flat = [grads[t].float() for t in range(num_tasks)]  # "flatten": one vector per task
    visit = order[0].tolist() if order.shape[0] else [[] for _ in range(num_tasks)]
    projected = []
    for i in range(num_tasks):
        g_i = flat[i].clone()
        for j in visit[i]:
            g_j = flat[j]
            g_i_g_j = torch.dot(g_i, g_j)
            if g_i_g_j < 0:  # implicit .item(): a host sync per task pair
                g_i -= g_i_g_j * g_j / torch.dot(g_j, g_j)
        projected.append(g_i)
    merged = torch.stack(projected).sum(dim=0)
    return merged.to(grads.dtype)


@dataclass(frozen=True)
class Provider:
    name: str
    fn: ProviderFn
    modular: bool = True  # False: computes global PCGrad whatever the partition
    loop: bool = False  # a Python loop with host syncs: slow, timed with fewer repeats


def _backend_fn(backend: str) -> ProviderFn:
    def run(grads: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return mgs_kernels.modular_pcgrad(grads, offsets, order=order, backend=backend)

    run.__name__ = f"mgs_{backend}"
    return run


# Providers that are not package backends. Adding one is one line.
EXTRA_PROVIDERS: List[Provider] = [
    Provider("reference_loop", reference_loop, modular=True, loop=True),
    Provider("pcgrad_global_loop", pcgrad_global_loop, modular=False, loop=True),
]

REFERENCE = "reference_loop"


def backend_names(device: torch.device) -> List[str]:
    """Package backends that load here and can run on ``device``."""
    return [name for name, why_not in backend_status(device).items() if why_not is None]


def unusable_backends(device: torch.device) -> Dict[str, str]:
    """Package backends that cannot run on ``device`` here -> why not (one line each)."""
    return {name: why_not for name, why_not in backend_status(device).items() if why_not is not None}


def get_providers(device: torch.device, only: Optional[List[str]] = None) -> Dict[str, Provider]:
    """Every provider runnable on ``device`` (optionally only those named in ``only``)."""
    provs: Dict[str, Provider] = {p.name: p for p in EXTRA_PROVIDERS}
    for name in backend_names(device):
        provs[f"mgs:{name}"] = Provider(f"mgs:{name}", _backend_fn(name))
    if only:
        missing = [n for n in only if n not in provs]
        if missing:
            raise SystemExit(f"unknown or unavailable providers {missing}; available: {list(provs)}")
        provs = {n: provs[n] for n in only}
    return provs
