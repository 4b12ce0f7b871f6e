"""The Gram -> weights stage: a ``Weighting`` turns per-module Gram matrices [M, T, T] into combine
weights [M, T], so that module m's aggregated gradient is ``sum_k W[m, k] * g_k``.

Every multi-task aggregator that needs only the task Gram matrix G = V V^T fits here (PCGrad, UPGrad,
MGDA, CAGrad, Nash-MTL, ...). A weighting runs batched over all M modules on the Gram's device: no host
sync, no Python loop over modules, fixed iteration counts with masks (so it can sit inside a training
step and a CUDA graph).

Contract of a subclass (see ``Weighting.compute``):

- options are validated in ``__init__`` (bad values raise ``MGSInputError`` naming the option);
- ``compute`` receives the Grams in float64, symmetrised ((G + G^T) / 2, a no-op for the Grams of
  ``segmented_gram``), and a ``present`` mask [M, T] (task k has a nonzero
  gradient in module m: G[m, k, k] > 0). Tasks that are not present are left out of that module's
  problem: the others are aggregated as if T were smaller. Their weight is irrelevant to the result
  (their gradient is zero) but is returned as 0 (``__call__`` enforces it; PCGrad, which has kernels of its
  own and never projects on a zero gradient anyway, keeps its own weight for them);
- NaN / Inf in a Gram propagate to that module's weights, never silently replaced: ``__call__`` hands
  such a module to ``compute`` as an all-zero Gram with no task present (so solvers never iterate on
  non-finite numbers and per-module state is left as it was) and returns NaN for the module's tasks
  whose diagonal entry is nonzero or non-finite;
- per-module state (EMA targets, warm starts) lives in a dict of tensors with leading dim M, created by
  ``init_state`` and updated in place by ``compute``; it round-trips through ``state_dict`` untouched;
- methods whose thresholds depend on the precision the Gram was computed in (a rank cut-off) set
  ``needs_input_eps``; ``compute`` then also receives ``input_eps=torch.finfo(input dtype).eps``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Dict, Optional

import torch

from .._errors import MGSInputError
from .._validate import check_gram

State = Dict[str, torch.Tensor]


class Weighting:
    """Base of every weighting method. Subclasses set ``name`` and implement ``compute``.

    Class attributes:
        name: the ``method=`` string that selects it.
        scale_invariant: weights unchanged when a module's G is multiplied by c > 0 (under the default
            options); documented per method.
        stateful: keeps per-module state across steps (``init_state`` / ``compute(state=...)``).
        needs_generator: draws random numbers (``compute(generator=...)``).
        needs_input_eps: ``compute`` also takes ``input_eps`` (unit roundoff of the Gram's dtype
            before the float64 conversion), for rank thresholds that must match the input precision.
    """

    name: ClassVar[str] = ""
    scale_invariant: ClassVar[bool] = True
    stateful: ClassVar[bool] = False
    needs_generator: ClassVar[bool] = False
    needs_input_eps: ClassVar[bool] = False

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
            gram: float64 [M, T, T] symmetric Gram matrices on the device (M may be 0), all finite.
            present: bool [M, T], task k has a nonzero gradient in module m (G[m, k, k] > 0).
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
        dtype: torch.dtype = torch.float32,
        backend: Any = None,
    ) -> torch.Tensor:
        """[M, T] weights (float32 unless ``dtype`` says otherwise) from ``gram`` [M, T, T] (any float
        dtype; solved in float64).

        ``backend`` (a ``mgs_kernels.backends.Backend``) is where a method with its own kernels runs them
        (PCGrad); methods solved in torch ignore it.
        """
        check_gram(gram)
        if dtype not in (torch.float32, torch.float64):
            raise MGSInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        M, T, _ = gram.shape
        if self.stateful and state is None:
            raise MGSInputError(f"method {self.name!r} keeps per-module state: pass state=... "
                                "(from init_state, or use ModularGradientSurgery, which keeps it)")
        g = gram.detach().double()
        g = 0.5 * (g + g.transpose(1, 2))  # exact no-op for a symmetric Gram (segmented_gram's are)
        diag = torch.diagonal(g, dim1=1, dim2=2)
        present = (diag > 0) | ~torch.isfinite(diag)
        # A module with a non-finite entry reaches compute() as an empty module (zero Gram, no task
        # present) and gets NaN weights below: no solver iterates on NaN, no state is touched.
        finite = torch.isfinite(g).all(dim=2).all(dim=1)  # [M]
        g_ok = torch.where(finite[:, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        present_ok = present & finite[:, None]
        kwargs = {}
        if self.needs_input_eps:
            kwargs["input_eps"] = float(torch.finfo(gram.dtype).eps)
        w = self.compute(g_ok, present_ok, state=state, generator=generator,
                         info=info if info is not None else {}, **kwargs)
        if tuple(w.shape) != (M, T):  # a bug in the method, not the caller's input
            raise AssertionError(f"{type(self).__name__}.compute returned shape {tuple(w.shape)}, want {(M, T)}")
        w = torch.where(present_ok, w.double(), torch.zeros((), dtype=torch.float64, device=w.device))
        w = torch.where(present & ~finite[:, None], torch.full((), math.nan, dtype=torch.float64, device=w.device), w)
        return w.to(dtype)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in getattr(self, "_repr_options", {}).items())
        return f"{type(self).__name__}({opts})"


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
    cls = _REGISTRY[method]
    options = dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise MGSInputError(f"method {method!r} takes no option {unknown}; its options are {known}")
    return cls(**options)
