"""mgs_kernels: fast, exact Modular Gradient Surgery (per-module PCGrad) for multi-task training.

Kernel level: ``segmented_gram``, ``pcgrad_weights`` / ``gram_weights``, ``segmented_combine``,
``modular_pcgrad`` / ``modular_aggregate``, ``random_order``. Model level: ``ModularGradientSurgery``. Baseline: ``mgs_kernels.reference``.
"""

from . import _custom_ops  # noqa: F401  (registers the torch.library ops used inside torch.compile)
from ._errors import BackendUnavailableError, MGSInputError
from .backends import available_backends
from .distributed import aligned_schedule
from .imbalance import NormEMA, proportional_sampling_weights, select_modules, unbiased_sq_norm
from .ops import gram_weights, modular_aggregate, modular_pcgrad, pcgrad_weights, segmented_combine, segmented_gram
from .order import fixed_order, random_order
from .partition import Partition, build_partition
from .stats import SurgeryStats
from .surgery import ModularGradientSurgery

__version__ = "0.1.0"

__all__ = [
    "segmented_gram",
    "pcgrad_weights",
    "segmented_combine",
    "modular_pcgrad",
    "gram_weights",
    "modular_aggregate",
    "random_order",
    "fixed_order",
    "ModularGradientSurgery",
    "SurgeryStats",
    "Partition",
    "build_partition",
    "available_backends",
    "unbiased_sq_norm",
    "proportional_sampling_weights",
    "NormEMA",
    "select_modules",
    "aligned_schedule",
    "MGSInputError",
    "BackendUnavailableError",
    "__version__",
]
