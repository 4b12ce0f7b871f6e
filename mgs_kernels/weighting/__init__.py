"""Weightings: the Gram -> weights stage of the pipeline ``segmented_gram -> weights -> segmented_combine``.

``get_weighting("upgrad", {...})`` returns a configured ``Weighting``; ``methods()`` lists them. Each
method lives in its own module below and registers itself on import; shared batched solvers are in the
private modules (``_qp``: quadratic programs, ``_eig``: Jacobi eigen-solver, ``_newton``: damped Newton,
``_spectral``: pseudo-inverses). Formulas and semantics: docs/methods.md.
"""

from __future__ import annotations

import importlib

from .base import State, Weighting, get_weighting, methods, register
from .pcgrad import PCGrad

# Modules that define (and register) methods, imported once here.
_METHOD_MODULES = ("sum", "mean", "constant", "random", "upgrad", "dualproj", "mgda", "cagrad", "imtl_g",
                   "aligned_mtl", "config", "fairgrad", "nash_mtl", "gradvac", "krum")

for _name in _METHOD_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["Weighting", "State", "PCGrad", "get_weighting", "methods", "register"]
