"""Trainer integrations: MGS inside Hugging Face ``Trainer``, TRL ``GRPOTrainer`` and verl's actor update.

    from mgs_kernels.integrations import MGSTrainer, MGSGRPOTrainer, register_engine, MGSActorAdapter

``register_engine`` (verl >= 0.9) imports verl only when called; ``MGSActorAdapter`` (verl <= 0.5) never does.

Everything here is imported lazily: ``import mgs_kernels`` never imports transformers / trl / verl, and
``from mgs_kernels.integrations import MGSTrainer`` raises an ImportError that names the missing package.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_LAZY = {
    # name: (submodule, package the submodule needs, pip hint)
    "MGSTrainer": ("hf", "transformers", "pip install transformers accelerate"),
    "MGSTrainerMixin": ("hf", "transformers", "pip install transformers accelerate"),
    "MGSGRPOTrainer": ("trl", "trl", "pip install trl"),
    "TaskSplitter": ("_split", None, None),
    "StatsAccumulator": ("_split", None, None),
    "register_engine": ("verl", None, None),
    "MGSActorAdapter": ("verl", None, None),
    "task_ids_from_labels": ("verl", None, None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mgs_kernels.integrations' has no attribute {name!r}")
    sub, needs, hint = _LAZY[name]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise ImportError(
            f"mgs_kernels.integrations.{name} needs the '{needs}' package, which is not installed: {hint} "
            f"(or pip install 'mgs_kernels[integrations]')"
        )
    module = importlib.import_module(f"{__name__}.{sub}")
    return getattr(module, name)


def __dir__():
    return __all__
