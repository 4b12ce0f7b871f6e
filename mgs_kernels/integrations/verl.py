"""verl: MGS in the actor update.

verl >= 0.9 (engine API; tested with 0.9.1): ``register_engine`` registers an MGS subclass of verl's FSDP2
LM engine in verl's ``EngineRegistry`` under the vendor "mgs"; ``VERL_ENGINE_VENDOR=mgs`` selects it, with no
change to verl's trainer::

    from mgs_kernels.integrations.verl import register_engine
    register_engine(["gsm8k", "math", "code"], partition="module", seed=0)   # data_source values

In Ray workers, importing this module registers the engine from the environment variable ``MGS_VERL_OPTIONS``
(a JSON object: ``{"task_names": [...], "task_key": "data_source", "partition": "module", ...}``); put it,
``VERL_ENGINE_VENDOR=mgs`` and ``VERL_USE_EXTERNAL_MODULES=mgs_kernels.integrations.verl`` (verl imports
that module in every process) in the runtime environment. README "verl" has the full recipe; the engine is
in ``_verl_engine`` (how it hooks into verl), the graph cut in ``_output_cut``.

verl <= 0.5 (``DataParallelPPOActor.update_policy`` in ``verl/workers/actor/dp_actor.py``): patch three lines
with ``MGSActorAdapter`` (needs only torch and the actor's module; one task per micro-batch under FSDP)::

    self.mgs = MGSActorAdapter(self.actor_module, num_tasks=T, task_names=[...], partition="module")
    ...
    select_keys = [..., "mgs_task"]                      # 1. carry the task id tensor through data.select()
    for micro_batch in micro_batches:
        with self.mgs.micro_batch(micro_batch["mgs_task"]):      # 2. around forward + loss + loss.backward()
            entropy, log_prob = self._forward_micro_batch(...)
            ... policy_loss ...; loss.backward()
    append_to_dict(metrics, self.mgs.resolve())          # 3. right before self._optimizer_step() (clip + step)
    grad_norm = self._optimizer_step()

with the task id tensor made once per batch before the actor update::

    batch.batch["mgs_task"] = task_ids_from_labels(batch.non_tensor_batch["data_source"], task_names)

Multi-GPU with the adapter: every micro-batch must hold one task, the same on every rank (sort each
mini-batch by task, equal micro-batch counts per task on every rank, ``use_dynamic_bsz`` off, padded
batches); ``resolve()`` checks the alignment under FSDP2. The engine has none of these limits.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .. import _settings
from .._errors import MGSInputError
from ..surgery import ModularGradientSurgery
from ._split import TaskSplitter, to_task_ids


def task_ids_from_labels(labels: Sequence, task_names: Sequence[str]) -> torch.Tensor:
    """int64 [B] task ids from per-row labels (verl's ``data_source`` strings, or ints)."""
    return to_task_ids(list(labels), list(task_names), len(task_names))


class MGSActorAdapter:
    """Per-task gradients per micro-batch, resolved into ``p.grad`` before the actor's optimizer step.

    Args:
        actor_module: the actor's model (plain, DDP, or FSDP2-sharded).
        num_tasks: T. task_names: optional names (``data_source`` values) for labels and metrics.
        head: the module whose output the loss is built from (default: ``get_output_embeddings()``).
        **surgery_options: ``ModularGradientSurgery`` options (partition, order, seed, exclude, backend, eps,
            dtype, method, method_options, ...); partition defaults to "module".
    """

    def __init__(self, actor_module: nn.Module, num_tasks: int, task_names: Optional[Sequence[str]] = None,
                 head: Optional[nn.Module] = None, **surgery_options):
        self.num_tasks = num_tasks
        self.task_names = list(task_names) if task_names is not None else None
        self.surgery = ModularGradientSurgery(actor_module, num_tasks=num_tasks,
                                              **{"partition": "module", **surgery_options})
        self.splitter = TaskSplitter(self.surgery, actor_module, head=head)
        self.last_stats = None

    @contextlib.contextmanager
    def micro_batch(self, task_ids) -> Iterator[None]:
        """Wrap one micro-batch's forward, loss and ``loss.backward()``; ``task_ids``: [B] ints or labels."""
        ids = to_task_ids(task_ids if isinstance(task_ids, torch.Tensor) else list(task_ids), self.task_names,
                          self.num_tasks)
        with self.splitter.micro_batch(ids):
            yield

    def resolve(self, prefix: str = "actor/") -> Dict[str, float]:
        """Modular PCGrad into ``p.grad`` (call before clipping); returns verl-style metrics (floats)."""
        stats = self.surgery.resolve()
        self.last_stats = stats
        scalars = stats.scalars()
        if self.task_names:
            for t, name in enumerate(self.task_names):
                scalars = {k.replace(f"/task{t}/", f"/{name}/"): v for k, v in scalars.items()}
        return {prefix + k: v for k, v in scalars.items()}

    def remove(self) -> None:
        self.splitter.remove()
        self.surgery.remove()


# ---------------------------------------------------------------------------------------------- verl >= 0.9
def register_engine(task_names: Sequence[str], *, task_key: str = "data_source", **surgery_options) -> type:
    """Register the MGS engine in verl's ``EngineRegistry`` (vendor "mgs"); select it with ``VERL_ENGINE_VENDOR=mgs``.

    Args:
        task_names: the task labels, in task order (values of ``task_key``; ``data_source`` in verl).
            Metrics use these names (``actor/mgs/<name>/grad_norm``, ...).
        task_key: the per-sequence column of verl's batch holding the label (a non-tensor column).
        **surgery_options: passed unchanged to ``ModularGradientSurgery`` (partition, order, seed, eps,
            exclude, backend, dtype, top_k, ...; ``partition`` defaults to "module"). Unknown names raise here.

    Returns:
        the engine class (a subclass of verl's ``FSDPEngineWithLMHead``). Calling again replaces the settings
        for engines built afterwards. Forward-only engines (reference policy) are plain verl.
    """
    names = _check_task_names(task_names)
    if not isinstance(task_key, str) or not task_key:
        raise MGSInputError(f"task_key must be a non-empty string, got {task_key!r}")
    _check_surgery_options(surgery_options)
    try:
        from . import _verl_engine
    except ImportError as exc:
        raise ImportError(
            f"register_engine needs verl >= 0.9 (pip install verl; tested with 0.9.1): {exc}"
        ) from exc
    _verl_engine.configure(names, task_key, surgery_options)
    return _verl_engine.MGSFSDPEngine


def _check_task_names(task_names) -> List[str]:
    if isinstance(task_names, str) or not isinstance(task_names, (list, tuple)):
        raise MGSInputError(f"task_names must be a list of strings, got {task_names!r}")
    names = list(task_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise MGSInputError(f"task_names must be a non-empty list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise MGSInputError(f"task_names has duplicates: {names!r}")
    return names


def _check_surgery_options(options: Dict[str, Any]) -> None:
    from ..surgery import ModularGradientSurgery

    for reserved in ("model", "num_tasks"):
        if reserved in options:
            raise MGSInputError(f"{reserved!r} is set by the engine (the actor module, len(task_names))")
    try:
        inspect.signature(ModularGradientSurgery).bind(model=None, num_tasks=1, **options)
    except TypeError as exc:
        raise MGSInputError(f"not a ModularGradientSurgery option: {exc}") from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def options_from_env(text: str) -> Dict[str, Any]:
    """``register_engine`` keyword arguments from ``MGS_VERL_OPTIONS`` (a JSON object with "task_names")."""
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise MGSInputError(f"MGS_VERL_OPTIONS is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict) or "task_names" not in options:
        raise MGSInputError(f'MGS_VERL_OPTIONS must be a JSON object with "task_names", got {text!r}')
    dtype = options.get("dtype")
    if isinstance(dtype, str):  # JSON has no torch dtypes
        key = dtype.replace("torch.", "")
        if key not in _DTYPES:
            raise MGSInputError(f"MGS_VERL_OPTIONS dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        options["dtype"] = _DTYPES[key]
    return options


if _settings.get("MGS_VERL_OPTIONS"):
    register_engine(**options_from_env(_settings.get("MGS_VERL_OPTIONS")))
