"""The backend interface: what every implementation of the pipeline provides.

    segmented_gram(grads [T, N], plan)                    -> float32 [M, T, T]
    pcgrad_weights(gram float32 [M, T, T], order, eps)     -> float32 [M, T]
    segmented_combine(grads [T, N], plan, weights, out)   -> None (writes out [N])

plus what it supports (device types, task counts per storage dtype) and two optional capabilities:

- ``modular_pcgrad`` (the three stages for PCGrad): the base class composes the stages; a backend
  overrides it when it has a faster fused schedule (the native CPU backend's cache-blocked pass);
- ``fused_step(args)``: the one-pass combine + SGD/Adam(W) update of ``ModularGradientSurgery.step``
  (contract: ``mgs_kernels._fused_step``); None when the backend has none.

Inputs reach a backend validated (``mgs_kernels.ops`` / the surgery), on a device it supports, with a
task count it supports: routing lives in ``mgs_kernels.backends.get_backend``, nowhere else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Optional, Tuple

import torch

from .._plan import SegmentPlan


class Backend(ABC):
    """One implementation of the Gram -> weights -> combine pipeline.

    Class attributes:
        name: the ``backend=`` string that selects it.
        device_types: torch device types whose tensors it runs on.
    """

    name: ClassVar[str]
    device_types: ClassVar[Tuple[str, ...]]

    # Optional capability: the fused optimizer step (None: the surgery runs resolve + optimizer.step()).
    fused_step: Optional[Callable[..., None]] = None

    def load(self) -> None:  # noqa: B027 - optional hook: most backends need no loading
        """Raise (any exception, with a message saying why) when the backend cannot run in this process."""

    def supports(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` can be handed to this backend."""
        return torch.device(device).type in self.device_types

    def max_tasks(self, dtype: torch.dtype) -> Optional[int]:
        """Largest task count handled for ``dtype`` storage (None: no limit); dispatch routes larger T away."""
        return None

    def preferred_tasks(self, dtype: torch.dtype) -> Optional[Tuple[int, int]]:
        """Inclusive task-count range where "auto" should prefer this backend over an earlier candidate that
        also handles T (None: no preference; "auto" then keeps its list order)."""
        return None

    @abstractmethod
    def segmented_gram(self, grads: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """float32 [M, T, T]: ``G[m] = V_m V_m^T`` with fp32 accumulation, reduced in a fixed order."""

    @abstractmethod
    def pcgrad_weights(self, gram: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor:
        """float32 [M, T] PCGrad weights from float32 Grams and an int64 [M, T, T-1] order table."""

    @abstractmethod
    def segmented_combine(self, grads: torch.Tensor, plan: SegmentPlan, weights: torch.Tensor,
                          out: torch.Tensor) -> None:
        """``out[n] = sum_k weights[m(n), k] * grads[k, n]`` (fp32 accumulation); ``out`` may be a row of grads."""

    def modular_pcgrad(self, grads: torch.Tensor, plan: SegmentPlan, order: torch.Tensor, eps: float,
                       out: torch.Tensor) -> None:
        """The three stages for PCGrad, into ``out`` (override for a fused schedule)."""
        gram = self.segmented_gram(grads, plan)
        self.segmented_combine(grads, plan, self.pcgrad_weights(gram, order, eps), out)

    def __repr__(self) -> str:
        return f"<mgs backend {self.name!r}>"
