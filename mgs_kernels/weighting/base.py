"""The Gram -> weights stage: a ``Weighting`` turns per-module Gram matrices [M, T, T] into combine
weights [M, T], so that module m's aggregated gradient is ``sum_k W[m, k] * g_k``.

Every multi-task aggregator that needs only the task Gram matrix G = V V^T fits here (PCGrad, UPGrad,
MGDA, CAGrad, Nash-MTL, ...). A weighting runs batched over all M modules on the Gram's device: no host
sync, no Python loop over modules, fixed iteration counts with masks (so it can sit inside a training
step and a CUDA graph).

Contract of a subclass (see ``Weighting.compute``):

- options are validated in ``__init__`` (bad values raise ``MGSInputError`` naming the option);
- ``compute`` receives the Grams in float64 and a ``present`` mask [M, T] (task k has a nonzero
  gradient in module m: G[m, k, k] > 0, or a non-finite diagonal). Tasks that are not present are left
  out of that module's problem: the others are aggregated as if T were smaller. Their weight is
  irrelevant to the result (their gradient is zero) and is returned as 0 (PCGrad, whose kernels never
  project on a zero gradient anyway, keeps its own weight for them);
- NaN / Inf in a Gram propagate to that module's weights (never silently replaced);
- per-module state (EMA targets, warm starts) lives in a dict of tensors with leading dim M, created by
  ``init_state`` and updated in place by ``compute``; it round-trips through ``state_dict`` untouched.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional

import torch

from .._errors import MGSInputError

State = Dict[str, torch.Tensor]


class Weighting:
    """Base of every weighting method. Subclasses set ``name`` and implement ``compute``.

    Class attributes:
        name: the ``method=`` string that selects it.
        scale_invariant: weights unchanged when a module's G is multiplied by c > 0 (under the default
            options); documented per method.
        stateful: keeps per-module state across steps (``init_state`` / ``compute(state=...)``).
        needs_generator: draws random numbers (``compute(generator=...)``).
    """

    name: ClassVar[str] = ""
    scale_invariant: ClassVar[bool] = True
    stateful: ClassVar[bool] = False
    needs_generator: ClassVar[bool] = False

    def __init__(self, **options: Any):
        if options:
            raise MGSInputError(f"method {self.name!r} takes no option {sorted(options)}")

    # ----------------------------------------------------------------- to implement
    def compute(
        self,
        gram: torch.Tensor,
        present: torch.Tensor,
        *,
        state: Optional[State],
        generator: Optional[torch.Generator],
        info: Dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Weights of every module.

        Args:
            gram: float64 [M, T, T] symmetric Gram matrices on the device (M may be 0).
            present: bool [M, T], task k has a nonzero (or non-finite) gradient in module m.
            state: the dict made by ``init_state`` (stateful methods), updated in place; else None.
            generator: random source (methods with ``needs_generator``); may be None (default RNG).
            info: per-module diagnostics the method may add (e.g. ``"converged"``: bool [M],
                ``"iterations"``: int64 [M]); they end up in ``SurgeryStats.method_info``.

        Returns:
            float64 (or float32) [M, T] on gram's device.
        """
        raise NotImplementedError

    def init_state(self, num_modules: int, num_tasks: int, device: torch.device) -> State:
        """Fresh per-module state (stateful methods); {} otherwise."""
        return {}

    # ----------------------------------------------------------------- the stage
    def __call__(
        self,
        gram: torch.Tensor,
        *,
        state: Optional[State] = None,
        generator: Optional[torch.Generator] = None,
        info: Optional[Dict[str, torch.Tensor]] = None,
        backend: Any = None,
    ) -> torch.Tensor:
        """float32 [M, T] weights from ``gram`` [M, T, T] (any float dtype; solved in float64).

        ``backend`` (a ``mgs_kernels.backends.Backend``) is where a method with its own kernels runs
        them (PCGrad); methods solved in torch ignore it.
        """
        M, T, _ = gram.shape
        g = gram.double()
        diag = torch.diagonal(g, dim1=1, dim2=2)
        present = (diag > 0) | ~torch.isfinite(diag)
        if self.stateful and state is None:
            raise MGSInputError(f"method {self.name!r} keeps per-module state: pass state=... "
                                "(from init_state, or use ModularGradientSurgery, which keeps it)")
        w = self.compute(g, present, state=state, generator=generator, info=info if info is not None else {})
        if tuple(w.shape) != (M, T):  # a bug in the method, not the caller's input
            raise AssertionError(f"{type(self).__name__}.compute returned shape {tuple(w.shape)}, want {(M, T)}")
        return w.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` selectable as ``method=cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"weighting name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> Dict[str, type]:
    """name -> Weighting class of every registered method."""
    return dict(_REGISTRY)


def get_weighting(method: Any, options: Optional[Dict[str, Any]] = None) -> Weighting:
    """A configured ``Weighting`` from a name (options passed to its constructor) or an instance."""
    if isinstance(method, Weighting):
        if options:
            raise MGSInputError("pass options either to the Weighting instance or as method_options, not both")
        return method
    if not isinstance(method, str) or method not in _REGISTRY:
        raise MGSInputError(f"unknown method {method!r}; choose one of {sorted(_REGISTRY)} or pass a Weighting")
    return _REGISTRY[method](**(options or {}))
