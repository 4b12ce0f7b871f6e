"""verl: MGS inside the actor's PPO/GRPO update (``MGSActorAdapter``).

verl is not imported here (it pins its own transformers/ray and needs a GPU stack); the adapter only needs
torch and the actor's ``nn.Module``. It hooks into the per-micro-batch loop the same way the trainer
integrations do (``TaskSplitter``: graph cut at the model's output, one capture window per task):

verl <= 0.5 (``verl/workers/actor/dp_actor.py``, ``DataParallelPPOActor.update_policy``)::

    self.mgs = MGSActorAdapter(self.actor_module, num_tasks=T, task_names=[...], partition="module")
    ...
    select_keys = [..., "mgs_task"]                      # 1. carry the task id tensor through data.select()
    for micro_batch in micro_batches:
        with self.mgs.micro_batch(micro_batch["mgs_task"]):      # 2. around forward + loss + loss.backward()
            entropy, log_prob = self._forward_micro_batch(...)
            ... policy_loss ...; loss.backward()
    append_to_dict(metrics, self.mgs.resolve())          # 3. right before self._optimizer_step() (clip + step)
    grad_norm = self._optimizer_step()

verl >= 0.6 (engine API, ``verl/workers/engine/fsdp/transformer_impl.py``): the same three lines go in a
subclass of ``FSDPEngine``: (2) around ``forward_step(...)`` + ``loss.backward()`` inside
``forward_backward_batch`` (the micro-batch TensorDict carries ``mgs_task``), (3) at the start of
``optimizer_step()`` before ``clip_grad_norm_``, and the returned scalars merged into the ``metrics`` dict
``train_batch`` returns.

The task id: verl keeps each prompt's ``data_source`` as a non-tensor column of the ``DataProto``; map it to
an int64 tensor once per batch, before the actor update (``task_ids_from_labels``)::

    batch.batch["mgs_task"] = task_ids_from_labels(batch.non_tensor_batch["data_source"], task_names)

Multi-GPU: with FSDP every micro-batch must hold one task, the same on every rank (sort each mini-batch by
task and use equal micro-batch counts per task on every rank; verl's ``use_dynamic_bsz`` re-packs rows and
must be off); ``resolve()`` checks the alignment under FSDP2.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch import nn

from ._split import TaskSplitter, make_surgery, to_task_ids


def task_ids_from_labels(labels: Sequence, task_names: Sequence[str]) -> torch.Tensor:
    """int64 [B] task ids from per-row labels (verl's ``data_source`` strings, or ints)."""
    return to_task_ids(list(labels), list(task_names), len(task_names))


class MGSActorAdapter:
    """Per-task gradients per micro-batch, resolved into ``p.grad`` before the actor's optimizer step.

    Args:
        actor_module: the actor's model (plain, DDP, or FSDP2-sharded).
        num_tasks: T. task_names: optional names (``data_source`` values) for labels and metrics.
        partition, order, seed, exclude, backend, eps, dtype: ``ModularGradientSurgery`` options.
        head: the module whose output the loss is built from (default: ``get_output_embeddings()``).
    """

    def __init__(self, actor_module: nn.Module, num_tasks: int, task_names: Optional[Sequence[str]] = None,
                 partition="module", order="random", seed: int = 0, exclude=None, backend: str = "auto",
                 eps: float = 0.0, dtype=None, head: Optional[nn.Module] = None):
        self.num_tasks = num_tasks
        self.task_names = list(task_names) if task_names is not None else None
        self.surgery = make_surgery(actor_module, num_tasks, partition=partition, order=order, seed=seed,
                                    exclude=exclude, backend=backend, eps=eps, dtype=dtype)
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
